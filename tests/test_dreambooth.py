"""DreamBooth on tiny models: full and LoRA fine-tuning with prior preservation, the resumable benchmark,
metrics equal to directly computed cosines on random-weight networks of the real architectures, bad input."""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path

import pytest
import torch

import bksdm

from bksdm.cli import main
from tests.conftest import hf_image_dataset, one_line_error




@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    # DINO ViT-S/16's architecture (random weights)
    ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(path)
    return path


def _ft(teacher, subject, out, *extra):
    return main(["dreambooth", "--model", str(teacher), "--instance-dir", str(subject), "--instance-prompt",
                 "a sks triangle", "--class-prompt", "a triangle", "--num-class-images", "2", "--class-steps", "2",
                 "--resolution", "32", "--max-steps", "3", "--out", str(out), "--no-gradient-checkpointing",
                 "--mixed-precision", "no", *extra])


def test_full_finetune_with_prior(tiny_teacher_dir, subject_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "full"
    t0 = time.perf_counter()
    assert _ft(tiny_teacher_dir, subject_dir, out, "--lr", "1e-3") == 0
    wall = time.perf_counter() - t0
    assert (out / "final" / "model_index.json").is_file()  # every trainer: OUT/final
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["final"]["prior"] > 0 and rec["final"]["loss"] == pytest.approx(rec["final"]["instance"] + rec["final"]["prior"], rel=1e-4)
    assert 0 < rec["seconds"] < wall  # the training loop alone, inside the whole command
    if not torch.cuda.is_available():  # the process's peak RSS: at least what torch alone holds, at most the peak now
        assert rec["memory"]["kind"] == "peak RSS of the process"
        assert 0.1 < rec["memory"]["peak_gb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert len(list((out / "class_images").glob("*.png"))) == 2
    tuned = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_teacher_dir / "unet")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
    from bksdm.recipes.dreambooth import personalised_pipeline

    img = personalised_pipeline(str(tiny_teacher_dir), out, lora=False)("a sks triangle", num_inference_steps=2).images[0]
    assert img.size == (32, 32)


def test_class_images_from_a_hugging_face_dataset_and_the_model_card(tiny_teacher_dir, subject_dir, tmp_path):
    from huggingface_hub import ModelCard

    disk, _ = hf_image_dataset(tmp_path, n=4, broken=1)
    out = tmp_path / "hf"
    assert _ft(tiny_teacher_dir, subject_dir, out, "--class-dir", f"hf:{disk}", "class_image_column=picture") == 0
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["class_images"] == 2 and rec["class_skipped"] == 1  # rows 0 and 2 used, the corrupt row 1 counted
    assert not (out / "class_images").exists()  # nothing generated
    card = ModelCard.load(out / "final" / "README.md")
    assert "dreambooth" in card.data.tags and card.data.instance_prompt == "a sks triangle"
    assert "2 images of \"a triangle\"" in card.text


def test_lora_finetune_loads_into_diffusers(tiny_teacher_dir, subject_dir, tmp_path):
    from bksdm.recipes.dreambooth import personalised_pipeline

    out = tmp_path / "lora"
    assert _ft(tiny_teacher_dir, subject_dir, out, "--lora", "--lora-rank", "4") == 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file() and not (out / "final" / "unet").exists()
    pipe = personalised_pipeline(str(tiny_teacher_dir), out, lora=True)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    assert json.loads((out / "finetune.json").read_text())["final"]["prior"] > 0


def test_metrics_equal_direct_cosines(dino_dir, metric_home):
    from bksdm.dreambooth import metrics as DM
    from bksdm.evaluate.weights import clip_model
    from bksdm.mini.world import ShapesWorld

    world = ShapesWorld(seed=9)
    gen = [world.sample(i)[0] for i in range(3)]
    real = [world.sample(10 + i)[0] for i in range(2)]
    prompts = ["a sks circle in the snow", "a sks circle on the beach", "a red sks circle"]
    dino = DM.dino_model(str(dino_dir))
    clip = clip_model("bksdm-tiny-clip", str(metric_home / "tiny-clip.pt"))
    got = DM.subject_scores(gen, prompts, real, dino, clip)
    with torch.no_grad():
        x = DM.dino_inputs(gen + real, 224)
        cls = dino(pixel_values=x).last_hidden_state[:, 0]
        want_dino = torch.stack([torch.nn.functional.cosine_similarity(cls[i], cls[3 + j], dim=0)
                                 for i in range(3) for j in range(2)]).mean()
        model, pre, tok = clip
        emb = model.encode_image(torch.stack([pre(im) for im in gen + real]))
        want_i = torch.stack([torch.nn.functional.cosine_similarity(emb[i], emb[3 + j], dim=0)
                              for i in range(3) for j in range(2)]).mean()
        txt = model.encode_text(tok(["a circle in the snow", "a circle on the beach", "a red circle"]))
        want_t = torch.nn.functional.cosine_similarity(emb[:3], txt, dim=-1).mean()
    assert got["dino"] == pytest.approx(float(want_dino), abs=1e-5)
    assert got["clip_i"] == pytest.approx(float(want_i), abs=1e-5)
    assert got["clip_t"] == pytest.approx(float(want_t), abs=1e-5)


def test_benchmark_resumes_finished_work(tiny_teacher_dir, subject_dir, tmp_path, dino_dir, metric_home):
    import shutil

    from bksdm.recipes.dreambooth import bench

    dataset = tmp_path / "dataset"
    shutil.copytree(subject_dir, dataset / "dog")
    kw = dict(images_per_prompt=1, steps=2, dino=str(dino_dir), clip_name="bksdm-tiny-clip",
              clip_pretrained=str(metric_home / "tiny-clip.pt"), max_steps=2, resolution=32, num_class_images=1,
              class_steps=2, gradient_checkpointing=False, mixed_precision="no")
    res = bench(str(tiny_teacher_dir), dataset, tmp_path / "bench", **kw)
    sub = tmp_path / "bench" / "dog"
    assert len(list((sub / "images").glob("*.png"))) == 25 and set(res["mean"]) >= {"dino", "clip_i", "clip_t"}
    stamps = {p.name: p.stat().st_mtime_ns for p in [sub / "finetune.json", *sub.glob("images/*.png")]}
    res2 = bench(str(tiny_teacher_dir), dataset, tmp_path / "bench", **kw)
    assert {p.name: p.stat().st_mtime_ns for p in [sub / "finetune.json", *sub.glob("images/*.png")]} == stamps
    assert res2["mean"] == pytest.approx(res["mean"])


def test_bad_input(tiny_teacher_dir, subject_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _ft(tiny_teacher_dir, empty, tmp_path / "o") == 2
    assert "holds no images" in one_line_error(capsys)
    assert main(["dreambooth", "--model", str(tiny_teacher_dir), "--instance-dir", str(subject_dir), "--instance-prompt",
                 "a sks triangle", "--out", str(tmp_path / "o")]) == 2
    assert "--class-prompt" in one_line_error(capsys)
    (subject_dir / "broken.jpg").write_bytes(b"\x00\x01 not an image")
    assert _ft(tiny_teacher_dir, subject_dir, tmp_path / "o") == 2
    assert "broken.jpg cannot be used: not an image" in one_line_error(capsys)


def test_data_order_walks_shuffled_epochs_like_the_official_script():
    """Each epoch is a permutation of range(max(instances, classes)): 200 class images are each used 4 times in
    800 steps, and each of 4 instance photos 200 times."""
    import random
    from collections import Counter

    from bksdm.recipes.dreambooth import epoch_order

    order = epoch_order(4, 200, random.Random(0))
    pairs = [next(order) for _ in range(800)]
    assert set(Counter(c for _, c in pairs).values()) == {4} and len({c for _, c in pairs}) == 200
    assert set(Counter(i for i, _ in pairs).values()) == {200}
    assert [c for _, c in pairs[:200]] != list(range(200))  # shuffled, not walked in order


@pytest.mark.parametrize("preset,unet_alpha,unet_targets,text_alpha,text_targets", [
    ("bk-sdm", 27, {"to_q", "to_v"}, 17, {"q_proj", "v_proj"}),
    ("diffusers", 16, {"to_k", "to_q", "to_v", "to_out.0"}, 16, {"q_proj", "k_proj", "v_proj", "out_proj"}),
])
def test_lora_presets_are_read_back_from_the_saved_file(tiny_teacher_dir, subject_dir, tmp_path, preset, unet_alpha,
                                                        unet_targets, text_alpha, text_targets):
    from safetensors import safe_open

    from bksdm.recipes.dreambooth import personalised_pipeline

    out = tmp_path / preset
    assert _ft(tiny_teacher_dir, subject_dir, out, "--lora", "--lora-preset", preset, "--max-steps", "1") == 0
    with safe_open(out / "final" / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    module = re.compile(r"\.(to_out\.0|[a-z_]+)\.lora[._]")  # the adapted layer's own name
    targets = {m: {module.search(k).group(1) for k in shapes if k.startswith(m + ".")} for m in ("unet", "text_encoder")}
    assert targets == {"unet": unet_targets, "text_encoder": text_targets}
    ranks = {shape[0] if ".down." in k else shape[1] for k, shape in shapes.items()}
    assert ranks == {16}  # rank 16 in every down (r, in) and up (out, r) matrix
    # alpha / rank is folded into the weights (bksdm.lora): the file says alpha = rank, which every loader reads
    assert meta["unet.lora_alpha"] == meta["text_encoder.lora_alpha"] == 16
    assert set(meta["unet.target_modules"]) == unet_targets and set(meta["text_encoder.target_modules"]) == text_targets
    assert meta["unet.r"] == meta["text_encoder.r"] == 16
    pipe = personalised_pipeline(str(tiny_teacher_dir), out, lora=True)
    assert {c.lora_alpha for c in pipe.unet.peft_config.values()} == {16}


def test_lora_file_applies_the_trained_strength_under_a_kohya_style_loader(tiny_teacher_dir, tmp_path):
    """A rank-16, alpha-27 adapter (the BK-SDM preset) saved by bksdm: a loader that knows alpha only from .alpha
    tensors (kohya's convention: none means alpha = rank) and diffusers' load_lora_weights both give the trained
    update, W + (alpha / r) B A, as peft's own merge computes it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from bksdm.dreambooth.config import lora_config
    from bksdm.lora import save_lora

    base = UNet2DConditionModel.from_pretrained(tiny_teacher_dir / "unet")
    trained = UNet2DConditionModel.from_pretrained(tiny_teacher_dir / "unet")
    trained.add_adapter(lora_config("bk-sdm", "unet", 16))
    torch.manual_seed(0)
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)  # as if trained (peft starts B at zero)
    save_lora(tmp_path, "StableDiffusionPipeline", trained)
    trained.fuse_lora()
    truth = {k: v for k, v in trained.state_dict().items() if "lora" not in k}
    # a kohya-style loader: W += up @ down * (alpha / r from an .alpha tensor, else 1)
    file = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    weights = dict(base.state_dict())
    downs = [k for k in file if k.endswith((".lora.down.weight", ".lora_A.weight"))]
    assert downs
    for down in downs:
        stem = down.rsplit(".lora", 1)[0]
        up = file[down.replace("lora.down", "lora.up").replace("lora_A", "lora_B")]
        alpha = file.get(stem + ".alpha")
        scale = float(alpha) / up.shape[1] if alpha is not None else 1.0
        key = stem.removeprefix("unet.") + ".weight"
        weights[key] = weights[key] + scale * up @ file[down]
    for k, v in truth.items():
        torch.testing.assert_close(weights[k.replace(".base_layer", "")], v, rtol=0, atol=1e-6, msg=k)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir, safety_checker=None)
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    for k, v in truth.items():
        torch.testing.assert_close(fused[k.replace(".base_layer", "")], v, rtol=0, atol=1e-6, msg=k)


def test_seed_alone_decides_the_lora_initialisation(tiny_teacher_dir, subject_dir, tmp_path):
    """Same seed, different random state before the run: the same adapters (the benchmark's subjects no longer
    depend on the subjects before them)."""
    from bksdm.dreambooth.config import DreamBoothConfig
    from bksdm.recipes.dreambooth import DreamBooth

    starts = []
    for k in range(2):
        torch.rand(100 + 37 * k)  # what ran before differs
        cfg = DreamBoothConfig(model=str(tiny_teacher_dir), instance_dir=str(subject_dir), instance_prompt="a sks triangle",
                               with_prior=False, lora=True, resolution=32, out=str(tmp_path / f"o{k}"),
                               mixed_precision="no", gradient_checkpointing=False)
        run = DreamBooth(cfg).setup()
        starts.append({n: p.detach().clone() for m in (run.unet, run.text_encoder) for n, p in m.named_parameters() if "lora" in n})
    assert starts[0] and starts[0].keys() == starts[1].keys()
    assert all(torch.equal(starts[0][n], starts[1][n]) for n in starts[0])


def test_single_models_and_pipelines_resolve_with_their_own_file_patterns(dino_dir, tiny_teacher_dir, tmp_path,
                                                                          monkeypatch):
    """The download patterns select what each repository layout holds (huggingface_hub's own filter, the one
    snapshot_download applies), and both load from a cache laid out as huggingface_hub lays it out."""
    import shutil

    import huggingface_hub.constants
    from huggingface_hub.utils import filter_repo_objects

    from bksdm.dreambooth.metrics import dino_model
    from bksdm.hub import MODEL_FILES, PIPELINE_FILES, resolve_model
    from bksdm.models import load_component

    dino_repo = ["config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json", "README.md"]
    assert list(filter_repo_objects(dino_repo, allow_patterns=PIPELINE_FILES)) == []  # the old single pattern set
    assert {"config.json", "model.safetensors"} <= set(filter_repo_objects(dino_repo, allow_patterns=MODEL_FILES))
    pipe_repo = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "unet/diffusion_pytorch_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt"]
    assert set(filter_repo_objects(pipe_repo, allow_patterns=PIPELINE_FILES)) == set(pipe_repo) - {"unet/diffusion_pytorch_model.bin"}

    cache = tmp_path / "hub"
    for repo, src in [("facebook/dino-vits16", dino_dir), ("someone/tiny-sd", tiny_teacher_dir)]:
        entry = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(src, entry / "snapshots" / "0123abcd")
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dino_model("facebook/dino-vits16").config.hidden_size == 384
    assert load_component(resolve_model("someone/tiny-sd"), "unet").config.cross_attention_dim == 16


def test_shipped_yaml_equals_defaults_and_a_cpu_fp16_request_is_refused(tiny_teacher_dir, subject_dir, tmp_path, capsys):
    import yaml

    from bksdm.dreambooth.config import DreamBoothConfig, load_dreambooth_config

    assert load_dreambooth_config("paper").to_dict() == DreamBoothConfig().to_dict()
    assert set(yaml.safe_load(open(Path(bksdm.__file__).parent / "configs" / "dreambooth_paper.yaml"))) == set(DreamBoothConfig.fields())
    assert load_dreambooth_config("paper", ["max_steps=7"], lora=True).max_steps == 7
    if not torch.cuda.is_available():  # the precision policy of every trainer: an error, never a silent change
        assert main(["dreambooth", "--model", str(tiny_teacher_dir), "--instance-dir", str(subject_dir), "--instance-prompt",
                     "a sks triangle", "--no-with-prior", "--out", str(tmp_path / "o"), "--mixed-precision", "fp16"]) == 2
        assert "fp16 needs a CUDA GPU" in one_line_error(capsys)
