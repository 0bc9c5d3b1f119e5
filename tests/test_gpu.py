"""On a CUDA GPU (skipped elsewhere): an fp16 distillation step, fp16 generation at any batch size, and an fp16
DreamBooth LoRA run, on the tiny teacher. `benchmarks/gpu_check.sh` runs these with the GPU benchmarks."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from bksdm.cli import main
from bksdm.mini.world import ShapesWorld, Shape, render

pytestmark = pytest.mark.gpu


def test_fp16_distillation_steps_are_finite_and_the_result_loads(tiny_teacher_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:32", "--out", str(out),
                 "--resolution", "32", "--batch-size", "8", "--grad-accum", "2", "--max-steps", "3",
                 "--mixed-precision", "fp16", "--num-workers", "0", "report_to=none", "random_flip=false"]) == 0
    rows = list(csv.DictReader(open(out / "logs" / "losses.csv")))
    assert len(rows) == 3 and all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "task", "out_kd", "feat_kd"))
    pipe = StableDiffusionPipeline.from_pretrained(out / "final", safety_checker=None).to("cuda")
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_fp16_generation_does_not_depend_on_batch_size(tiny_teacher_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(ShapesWorld(seed=3).prompts(6)))
    for b in (1, 4):
        assert main(["generate", "--model", str(tiny_teacher_dir), "--prompts", str(prompts), "--out", str(tmp_path / f"b{b}"),
                     "--steps", "4", "--batch-size", str(b), "--lossless", "--save-size", "0", "--device", "cuda"]) == 0
    for f in sorted((tmp_path / "b1" / "images").iterdir()):
        a = np.asarray(Image.open(f), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b4" / "images" / f.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 8, f.name  # fp16 kernels per batch size round differently: 4 levels on an H200


def test_fp16_dreambooth_lora(tiny_teacher_dir, tmp_path):
    from bksdm.recipes.dreambooth import personalised_pipeline

    subject = tmp_path / "subject"
    subject.mkdir()
    for i, jit in enumerate([(0, 0), (1, -1), (-1, 1)]):
        render((Shape("triangle", "red", "large", "top left"),), 32, (jit,)).save(subject / f"{i}.png")
    out = tmp_path / "lora"
    assert main(["dreambooth", "--model", str(tiny_teacher_dir), "--instance-dir", str(subject), "--instance-prompt",
                 "a sks11df triangle", "--class-prompt", "a triangle", "--num-class-images", "2", "--class-steps", "2",
                 "--resolution", "32", "--max-steps", "4", "--out", str(out), "--lora",
                 "--mixed-precision", "fp16"]) == 0
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["memory"]["kind"] == "CUDA peak allocated" and math.isfinite(rec["final"]["loss"])
    pipe = personalised_pipeline(str(tiny_teacher_dir), out, lora=True).to("cuda")
    assert pipe("a sks11df triangle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
