"""Faults and bad input, command by command: each ends in one line on stderr naming the offending path or value,
exit code 2 and no traceback; each fault has its documented recovery; nothing written earlier changes."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from bksdm.cli import main
from bksdm.mini.world import ShapesWorld
from bksdm.recipes.distill import DistillRecipe
from tests.conftest import one_line_error
from tests.conftest import FAST, distill_cfg


def _sums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to prove that nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()  # only this command's output counts
    assert main(argv) == 2, argv
    err = one_line_error(capsys)
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture
def broken_teachers(tiny_teacher_dir, tmp_path):
    """Copies of the tiny teacher, each with one broken model file."""
    cases = {}
    for name in ("truncated", "bad_json", "mismatch", "deleted"):
        folder = tmp_path / name
        shutil.copytree(tiny_teacher_dir, folder)
        cases[name] = folder
    weights = cases["truncated"] / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (cases["bad_json"] / "unet" / "config.json").write_text('{"sample_size": 16, ')
    cfg = json.loads((cases["mismatch"] / "unet" / "config.json").read_text())
    (cases["mismatch"] / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 24}))
    (cases["deleted"] / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return cases


def test_corrupt_model_files_name_the_file(broken_teachers, tmp_path, capsys):
    for case, folder in broken_teachers.items():
        before = _sums(folder)
        commands = {
            "compress": ["compress", "--teacher", str(folder), "--student", "bk-small", "--out", str(tmp_path / f"c-{case}")],
            "distill": ["distill", "--teacher", str(folder), "--data", "mini-world:8", "--out", str(tmp_path / f"d-{case}"),
                        "--max-steps", "1", *FAST],
            "generate": ["generate", "--model", str(folder), "--prompts", str(_prompts(tmp_path)), "--out",
                         str(tmp_path / f"g-{case}"), "--steps", "1"],
            "profile": ["profile", "--model", str(folder), "--no-latency"],
        }
        for command, argv in commands.items():
            err = _fails(capsys, argv, str(folder / "unet"))
            assert "cannot be read" in err, (case, command, err)
        assert _sums(folder) == before
        assert not (tmp_path / f"c-{case}" / "unet").exists()  # compress wrote no student


def test_corrupt_metric_weights_and_pipeline_index(tiny_teacher_dir, tmp_path, capsys):
    bad = tmp_path / "pt_inception.pth"
    bad.write_bytes(b"\x80\x02 truncated")
    real = tmp_path / "real"
    real.mkdir()
    ShapesWorld().sample(0)[0].save(real / "0.png")
    _fails(capsys, ["fid-stats", "--images", str(real), "--out", str(tmp_path / "s.npz"), "--inception-weights", str(bad)],
           str(bad))
    folder = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, folder)
    (folder / "model_index.json").write_text("{not json")
    _fails(capsys, ["generate", "--model", str(folder), "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "g")],
           str(folder / "model_index.json"))


def _prompts(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(ShapesWorld(seed=4).prompts(n)))
    return path


def test_output_paths_are_checked_before_any_work(tiny_teacher_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    under_file = a_file / "sub"
    prompts = _prompts(tmp_path)
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("00000.png", "00001.png", "00002.png"):
        ShapesWorld().sample(0)[0].save(images / name)
    for out in (a_file, under_file):
        runs = [
            ["compress", "--teacher", str(tiny_teacher_dir), "--student", "bk-small", "--out", str(out)],
            ["generate", "--model", str(tiny_teacher_dir), "--prompts", str(prompts), "--out", str(out)],
            ["distill", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:8", "--out", str(out), *FAST],
            ["cache", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:8", "--out", str(out)],
            ["dreambooth", "--model", str(tiny_teacher_dir), "--instance-dir", str(images), "--instance-prompt", "a sks",
             "--class-prompt", "a", "--out", str(out)],
            ["demo", "--out", str(out)],
            ["evaluate-progress", "--run", str(tmp_path), "--prompts", str(prompts), "--out", str(out)],
        ]
        for argv in runs:
            _fails(capsys, argv, str(out))
    # file outputs: an existing folder, or below a file; evaluate fails before computing anything
    for out in (images, under_file):
        _fails(capsys, ["evaluate", "--images", str(images), "--prompts", str(prompts), "--metrics", "fidelity",
                        "--out", str(out)], str(out))
        _fails(capsys, ["fid-stats", "--images", str(images), "--out", str(out)], str(out))
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--steps", "0"], "--steps 0"),
    (["generate", "--batch-size", "0"], "--batch-size 0"),
    (["generate", "--resolution", "63"], "multiple of 8"),
    (["generate", "--dtype", "fp8"], "'fp8' is not one of fp32, fp16, bf16"),
    (["generate", "--limit", "-1"], "--limit -1"),
    (["generate", "--scheduler", "heun"], "'heun' is not one of"),
    (["profile", "--arch", "sd-v1", "--runs", "0"], "--runs 0"),
    (["profile", "--arch", "sd-v1", "--dtypes", "fp32", "int4"], "'int4'"),
    (["distill", "--data", "mini-world:8", "lr=-1"], "lr -1.0 must be greater than 0"),
    (["distill", "--data", "mini-world:0", "--max-steps", "1"], "mini-world:0"),
    (["distill", "--data", "mini-world:x", "--max-steps", "1"], "mini-world:x"),
    (["distill", "--data", "mini-world:8", "--resolution", "63"], "multiple of 8"),
    (["distill", "--data", "mini-world:8", "--batch-size", "0"], "--batch-size 0"),
    (["distill", "--data", "mini-world:8", "batch_size=0"], "batch_size 0"),
    (["cache", "--data", "mini-world:8", "--resolution", "0"], "--resolution 0"),
    (["dreambooth", "--instance-dir", "x", "--instance-prompt", "a", "--max-steps", "0"], "--max-steps 0"),
    (["dreambooth", "--instance-dir", "x", "--instance-prompt", "a", "--lora-preset", "kohya"], "'kohya'"),
    (["dreambooth-bench", "--dataset", "d", "--out", "o"], "needs --model"),
    (["dreambooth-bench", "--dataset", "d", "--out", "o", "--model", "m", "--lora-preset", "kohya"], "'kohya'"),
    (["dreambooth-bench", "--dataset", "d", "--out", "o", "--model", "m", "--max-steps", "0"], "--max-steps 0"),
    (["inspect", "/no/such/student"], "does not exist"),
    (["mini-teacher", "--steps", "0", "--out", "o"], "--steps 0"),
    (["demo", "--steps", "0"], "--steps 0"),
    (["ablate", "--images", "0"], "--images 0"),
    (["--threads", "0", "profile", "--arch", "sd-v1"], "--threads '0'"),
])
def test_bounds_and_choices_are_rejected_up_front(tiny_teacher_dir, tmp_path, capsys, argv, needle):
    if argv[0] == "--threads":
        full = argv
    else:
        model = {"generate": ["--model", str(tiny_teacher_dir), "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "o")],
                 "distill": ["--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "o"), *FAST],
                 "cache": ["--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "o")],
                 "dreambooth": ["--model", str(tiny_teacher_dir), "--out", str(tmp_path / "o"), "--no-with-prior"],
                 }.get(argv[0], [])
        full = [argv[0], *model, *argv[1:]]
    _fails(capsys, full, needle)


def _folder(tmp_path: Path, n: int, broken: set[int] = frozenset(), rows_extra: list | None = None) -> Path:
    """An image folder of ``n`` mini-world pictures; ``broken`` indices are unreadable files."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        image, text, _ = ShapesWorld().sample(i)
        if i in broken:
            (data / f"{i}.png").write_bytes(b"not a png")
        else:
            image.save(data / f"{i}.png")
        rows.append((f"{i}.png", text))
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("file_name", "text"), *rows, *(rows_extra or [])])
    return data


def test_bad_captions_are_skipped_and_counted(tiny_teacher_dir, tmp_path, capsys):
    """A non-UTF-8 caption and one longer than the csv module's field limit cost one row each."""
    data = _folder(tmp_path, 6)
    with open(data / "metadata.csv", "ab") as f:
        f.write(b"0.png,caf\xe9 au lait\n")
        f.write(b'1.png,"' + b"a" * 200_000 + b'"\n')
    from bksdm.distill.data import BadSample, ImageFolderSource

    src = ImageFolderSource(data)
    assert len(src) == 8
    for i in (6, 7):
        with pytest.raises(BadSample):
            src.get(i)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--grad-accum", "1", *FAST, "--batch-size", "8"]) == 0
    rows = list(csv.DictReader(open(out / "logs" / "losses.csv")))
    assert int(rows[-1]["skipped"]) >= 2
    (data / "metadata.csv").write_bytes("file_name,text\n0.png,café\n".encode("latin-1"))
    _fails(capsys, ["distill", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "r2"),
                    *FAST], "not UTF-8")


def test_all_unreadable_data_stops_instead_of_hanging(tiny_teacher_dir, tmp_path, capsys):
    data = _folder(tmp_path, 4, broken={0, 1, 2, 3})
    _fails(capsys, ["distill", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                    "--max-steps", "2", *FAST], "micro-batches", "all unusable")


def test_resume_is_exact_when_whole_micro_batches_were_unreadable(tiny_teacher_dir, tmp_path):
    """Items 0-3 unreadable: some micro-batches of 2 carry nothing, advancing the data but not the step."""
    data = _folder(tmp_path, 8, broken={0, 1, 2, 3})
    kw = dict(data=str(data), batch_size=2, grad_accum=1, checkpoint_every=2, random_flip=False)
    full = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=6, **kw)).setup()
    full.train()
    DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=2, **kw)).setup().train()
    resumed = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=6, resume="latest", **kw)).setup()
    assert resumed.micro > resumed.step  # skipped micro-batches were counted in the checkpoint
    resumed.train()
    a, b = full.final_unet().state_dict(), resumed.final_unet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_falls_back_from_a_broken_checkpoint_and_ignores_strays(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    kw = dict(checkpoint_every=1, checkpoints_total_limit=5, max_steps=2)
    DistillRecipe(distill_cfg(tiny_teacher_dir, out, **kw)).setup().train()
    ck = out / "checkpoints"
    (ck / "step-old").mkdir()  # a user's stray folder
    shutil.copytree(ck / "step-2", ck / "step-9")
    (ck / "step-9" / "trainer_state.json").unlink()  # a save cut short before its state was written
    weights = next((ck / "step-2").glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # the newest complete checkpoint is truncated
    capsys.readouterr()
    resumed = DistillRecipe(distill_cfg(tiny_teacher_dir, out, **{**kw, "max_steps": 3}, resume="latest")).setup()
    assert resumed.step == 1
    said = capsys.readouterr().out
    assert "step-2 cannot be read" in said and "resuming from step-1" in said
    state = json.loads((ck / "step-1" / "trainer_state.json").read_text())
    (ck / "step-1" / "trainer_state.json").write_text(json.dumps({**state, "processes": 2}))
    (ck / "step-2" / "trainer_state.json").unlink()
    with pytest.raises(Exception, match="written by 2 processes"):
        DistillRecipe(distill_cfg(tiny_teacher_dir, out, **kw, resume="latest")).setup()


def test_a_used_run_or_cache_folder_is_refused_unless_resume_or_overwrite(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:8", "--out", str(out), "--max-steps",
            "1", *FAST]
    assert main(argv) == 0
    before = _sums(out)
    capsys.readouterr()
    _fails(capsys, argv, str(out), "--resume latest", "--overwrite")
    assert _sums(out) == before
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "final" / "model_index.json").is_file()
    cache = ["cache", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:4", "--out", str(tmp_path / "c"),
             "--resolution", "32"]
    assert main(cache) == 0
    before = _sums(tmp_path / "c")
    capsys.readouterr()
    _fails(capsys, cache, str(tmp_path / "c"), "--overwrite")
    assert _sums(tmp_path / "c") == before
    assert main([*cache, "--overwrite"]) == 0


def test_broken_images_are_redrawn_and_duplicate_names_refused(tiny_teacher_dir, tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    world = ShapesWorld(seed=2)
    rows = [(f"COCO_{i}.jpg", world.sample(i)[1]) for i in range(3)]
    with open(prompts, "w", newline="") as f:
        csv.writer(f).writerows([("file_name", "caption"), *rows])
    out = tmp_path / "g"
    argv = ["generate", "--model", str(tiny_teacher_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
            "--save-size", "16", "--dtype", "fp32"]
    assert main(argv) == 0
    good = (out / "images" / "COCO_2.jpg").read_bytes()
    (out / "images" / "COCO_0.jpg").write_bytes(b"")  # zero bytes
    data = (out / "images_16" / "COCO_1.jpg").read_bytes()
    (out / "images_16" / "COCO_1.jpg").write_bytes(data[: len(data) // 2])  # truncated
    capsys.readouterr()
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["generated"] == 2 and res["redrawn"] == 2 and res["skipped"] == 1
    for name in ("COCO_0.jpg", "COCO_1.jpg"):
        with Image.open(out / "images" / name) as im:
            im.load()
    assert (out / "images" / "COCO_2.jpg").read_bytes() == good  # a good image is kept as it was
    with open(prompts, "a", newline="") as f:
        csv.writer(f).writerow(("COCO_1.png", "a red circle at the top left"))
    _fails(capsys, argv, "lines 3 and 5", "COCO_1")


def test_killed_distillation_resumes_to_the_uninterrupted_result(tiny_teacher_dir, tmp_path):
    """kill -9 of a real `bksdm distill` process after a checkpoint; `--resume latest` ends with the weights of a
    run that was never interrupted, and the checkpoint written before the kill is read, not rewritten."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "bksdm.cli", "distill", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:64",
            "--out", str(out), "--checkpoint-every", "2", "--checkpoints-total-limit", "5", "--grad-accum", "1", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*argv, "--max-steps", "1000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-2" / "trainer_state.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file(), "no checkpoint before the deadline"
    before = _sums(out / "checkpoints" / "step-2")
    res = subprocess.run([*argv, "--max-steps", "4", "--resume", "latest"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _sums(out / "checkpoints" / "step-2") == before
    full = DistillRecipe(distill_cfg(tiny_teacher_dir, tmp_path / "full", data="mini-world:64", max_steps=4)).setup()
    full.train()
    want = full.final_unet().state_dict()
    got = load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
