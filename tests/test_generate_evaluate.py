"""`bksdm generate` and `bksdm evaluate`: batch-size invariance, resume, and the real metric code paths offline."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from bksdm.cli import main
from tests.conftest import one_line_error
from bksdm.mini.world import ShapesWorld


@pytest.fixture
def prompts_csv(tmp_path):
    path = tmp_path / "prompts.csv"
    world = ShapesWorld(seed=3)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        for i in range(5):
            w.writerow([f"COCO_val2014_{i:012d}.jpg", world.sample(i)[1]])
    return path


def _gen(teacher, prompts, out, *extra):
    return main(["generate", "--model", str(teacher), "--prompts", str(prompts), "--out", str(out), "--steps", "3",
                 "--save-size", "16", "--dtype", "fp32", "--lossless", *extra])  # PNG: pixels compared exactly


def test_images_do_not_depend_on_batch_size(tiny_teacher_dir, prompts_csv, tmp_path):
    assert _gen(tiny_teacher_dir, prompts_csv, tmp_path / "b1", "--batch-size", "1") == 0
    assert _gen(tiny_teacher_dir, prompts_csv, tmp_path / "b3", "--batch-size", "3") == 0
    names = sorted(p.name for p in (tmp_path / "b1" / "images").iterdir())
    assert len(names) == 5 and names[0] == "COCO_val2014_000000000000.png"
    for n in names:
        a = np.asarray(Image.open(tmp_path / "b1" / "images" / n), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b3" / "images" / n), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, n  # fp rounding of batched kernels at most flips one 8-bit level
    assert Image.open(tmp_path / "b1" / "images_16" / names[0]).size == (16, 16)
    first = np.asarray(Image.open(tmp_path / "b1" / "images" / names[0]), dtype=np.int16)
    second = np.asarray(Image.open(tmp_path / "b1" / "images" / names[1]), dtype=np.int16)
    assert np.abs(first - second).max() > 10  # different prompts and seeds give different images


@pytest.mark.slow
def test_two_processes_share_the_prompts_and_draw_the_same_images(tiny_teacher_dir, prompts_csv, tmp_path):
    """Sharded generation (torchrun, 2 CPU processes) writes every image once, equal to a 1-process run."""
    import os
    import subprocess
    import sys

    assert _gen(tiny_teacher_dir, prompts_csv, tmp_path / "one", "--batch-size", "2") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "bksdm.cli", "generate", "--model",
           str(tiny_teacher_dir), "--prompts", str(prompts_csv), "--out", str(tmp_path / "two"), "--steps", "3",
           "--save-size", "16", "--dtype", "fp32", "--batch-size", "2", "--lossless"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(c["generated"] for c in counts) == [2, 3]  # each process drew its own share
    one = sorted((tmp_path / "one" / "images").iterdir())
    two = sorted((tmp_path / "two" / "images").iterdir())
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 5
    for a, b in zip(one, two):
        diff = np.abs(np.asarray(Image.open(a), dtype=np.int16) - np.asarray(Image.open(b), dtype=np.int16))
        assert diff.max() <= 1, a.name


def test_killed_generation_resumes_only_missing(tiny_teacher_dir, prompts_csv, tmp_path, capsys):
    assert _gen(tiny_teacher_dir, prompts_csv, tmp_path / "g", "--limit", "2") == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "g" / "images").iterdir()}
    assert _gen(tiny_teacher_dir, prompts_csv, tmp_path / "g") == 0
    out = capsys.readouterr().out
    assert '"generated": 3' in out and '"skipped": 2' in out
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "g" / "images").iterdir()}
    assert len(after) == 5 and all(after[n] == t for n, t in before.items())


def _write(images, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.png")


def _prompts_txt(tmp_path, n):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(ShapesWorld().sample(i)[1] for i in range(n)))
    return path


def test_fid_is_zero_on_itself_and_grows_with_shift(flat_metric_home, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(flat_metric_home))
    from bksdm.recipes.evaluate import evaluate

    world = ShapesWorld(seed=1)
    real = [world.sample(i)[0].resize((64, 64)) for i in range(12)]
    _write(real, tmp_path / "real")
    prompts = _prompts_txt(tmp_path, 12)
    fids = []
    for k, factor in enumerate([1.0, 0.8, 0.5]):
        _write([ImageEnhance.Brightness(im).enhance(factor) for im in real], tmp_path / f"s{k}")
        fids.append(evaluate(tmp_path / f"s{k}", prompts, ["fid"], str(tmp_path / "real"), size=64, lossless=True)["fid"])
    assert abs(fids[0]) < 1e-3 and fids[0] < fids[1] < fids[2]
    # the .npz route gives the FID of the folder route
    assert main(["fid-stats", "--images", str(tmp_path / "real"), "--out", str(tmp_path / "real.npz"), "--size", "64",
                 "--lossless"]) == 0
    via_npz = evaluate(tmp_path / "s2", prompts, ["fid"], str(tmp_path / "real.npz"), size=64)["fid"]
    assert via_npz == pytest.approx(fids[2], rel=1e-6)


def test_is_of_identical_predictions_is_one(metric_home, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    from bksdm.recipes.evaluate import evaluate

    _write([ShapesWorld().sample(0)[0]] * 20, tmp_path / "same")
    res = evaluate(tmp_path / "same", _prompts_txt(tmp_path, 20), ["is"], size=64)
    assert res["is"] == pytest.approx(1.0, abs=1e-9)


def test_clip_score_equals_direct_cosine(metric_home, tmp_path):
    import open_clip

    from bksdm.recipes.evaluate import evaluate

    world = ShapesWorld(seed=2)
    images = [world.sample(i)[0] for i in range(4)]
    _write(images, tmp_path / "c")
    prompts = _prompts_txt(tmp_path, 4)
    texts = prompts.read_text().splitlines()
    res = evaluate(tmp_path / "c", prompts, ["clip"], clip_name="bksdm-tiny-clip", clip_pretrained=str(metric_home / "tiny-clip.pt"))
    model, _, pre = open_clip.create_model_and_transforms("bksdm-tiny-clip", pretrained=str(metric_home / "tiny-clip.pt"))
    tok = open_clip.get_tokenizer("bksdm-tiny-clip")
    with torch.no_grad():
        cos = [torch.nn.functional.cosine_similarity(model.encode_image(pre(im)[None]), model.encode_text(tok([t])))[0]
               for im, t in zip(images, texts)]
    assert res["clip"] == pytest.approx(float(torch.stack(cos).mean()), abs=1e-5)


def test_bad_input(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    assert _gen(tiny_teacher_dir, tmp_path / "none.csv", tmp_path / "o") == 2
    assert "does not exist" in one_line_error(capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,caption\na.jpg,a red circle\nb.jpg,a blue square,extra\n")
    assert _gen(tiny_teacher_dir, bad, tmp_path / "o") == 2
    assert "line 3 is malformed" in one_line_error(capsys)
    _write([ShapesWorld().sample(0)[0]] * 2, tmp_path / "two")
    assert main(["evaluate", "--images", str(tmp_path / "two"), "--prompts", str(_prompts_txt(tmp_path, 3)),
                 "--metrics", "is"]) == 2
    assert "has 2 of the 3 images" in one_line_error(capsys)
    np.savez(tmp_path / "good.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["evaluate", "--images", str(tmp_path / "two"), "--prompts", str(_prompts_txt(tmp_path, 2)),
                 "--metrics", "fid", "--fid-ref", str(tmp_path / "good.npz"), "--inception-weights", "/nope.pth"]) == 2
    assert "/nope.pth do not exist" in one_line_error(capsys)


def test_offline_metric_weights_fail_fast(tmp_path, capsys, monkeypatch, metric_home):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write([ShapesWorld().sample(0)[0]] * 20, tmp_path / "two")  # IS needs 20 (2 per split)
    prompts = _prompts_txt(tmp_path, 20)
    for metric, needle in [("fid", "--inception-weights"), ("is", "--isc-weights"), ("clip", "--clip-pretrained")]:
        t0 = time.time()
        code = main(["evaluate", "--images", str(tmp_path / "two"), "--prompts", str(prompts), "--metrics", metric,
                     "--fid-ref", str(tmp_path / "two")])
        assert code == 2 and time.time() - t0 < 20
        assert needle in one_line_error(capsys)
    # statistics of the wrong size for the feature network
    monkeypatch.setenv("TORCH_HOME", str(metric_home))
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(64), sigma=np.zeros((64, 64)))
    assert main(["evaluate", "--images", str(tmp_path / "two"), "--prompts", str(prompts), "--metrics", "fid",
                 "--fid-ref", str(tmp_path / "wrong.npz"), "--size", "64"]) == 2
    assert "expected (2048,)" in one_line_error(capsys)


def test_training_progress_csv_and_plot(tiny_teacher_dir, tmp_path, metric_home):
    """Every checkpoint generated and scored; every metric (CLIP included) on the 256 px copies."""
    from bksdm.recipes.distill import DistillRecipe
    from bksdm.recipes.evaluate import evaluate
    from tests.conftest import distill_cfg

    run = tmp_path / "run"
    DistillRecipe(distill_cfg(tiny_teacher_dir, run, max_steps=2, checkpoint_every=1, checkpoints_total_limit=5)).setup().train()
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(ShapesWorld().prompts(6)))
    clip = ["--clip-model", "bksdm-tiny-clip", "--clip-pretrained", str(metric_home / "tiny-clip.pt")]
    assert main(["evaluate-progress", "--run", str(run), "--prompts", str(prompts), "--metrics", "fidelity", "mini-fid",
                 "clip", "--steps", "2", "--batch-size", "3", *clip]) == 0
    rows = list(csv.DictReader(open(run / "progress" / "progress.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and {"fidelity", "mini_fid", "clip"} <= set(rows[0])
    assert (run / "progress" / "progress.png").stat().st_size > 1000
    gen = run / "progress" / "images" / "step-2"
    kw = {"clip_name": "bksdm-tiny-clip", "clip_pretrained": str(metric_home / "tiny-clip.pt")}
    on_256 = evaluate(gen / "images_256", prompts, ["clip"], **kw)["clip"]
    on_full = evaluate(gen / "images", prompts, ["clip"], **kw)["clip"]
    assert float(rows[1]["clip"]) == pytest.approx(on_256, abs=1e-6) and on_256 != on_full
