"""`bksdm distill` with ``shard: fsdp2`` (bksdm.sharding) on two CPU processes (gloo, torchrun): the sharded run
equals the same run unsharded (DDP) on the same two processes, a sharded run killed after one step and resumed
equals an uninterrupted one (model, optimiser and EMA shards), and OUT/final is a plain diffusers folder; the frozen
teacher is sharded too. Settings that need the whole teacher in one process are refused in one line.

Run as a script (``python -m torch.distributed.run --nproc_per_node 2 tests/test_sharded_distill.py ROOT``) this
file is one rank of the two-process run; the slow test below starts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KINDS = ("flux", "sd3-no-t5")


RUNS = {"ddp": ({}, 2), "fsdp2": ({"shard": "fsdp2"}, 2), "half": ({"shard": "fsdp2"}, 1),
        "resumed": ({"shard": "fsdp2", "resume": "latest"}, 2)}
MISMATCH = {"mismatch": ({"resume": "latest"}, 2)}  # the sharded checkpoints resumed unsharded: refused
"""One torchrun launch each (accelerate's end_training ends the process group: one run per process): the DDP run,
the sharded run, and the sharded run "killed" after step 1 ("half") then resumed in the same folder."""


def _worker(root: Path, kind: str, run: str) -> None:
    """One rank of one run; the first rank records what the sharded state looked like."""
    from bksdm.recipes.distill import DistillRecipe
    from tests.conftest import distill_cfg

    extra, steps = {**RUNS, **MISMATCH}[run]
    folder = root / f"{kind}-{'half' if run in ('resumed', 'mismatch') else run}"
    kw = dict(student=str(root / f"{kind}-s"), max_steps=2, checkpoint_every=1, caption_dropout=0.5, lr=1e-3, batch_size=2)
    recipe = DistillRecipe(distill_cfg(root / kind, folder, **kw, **extra)).setup()
    recipe.cfg.max_steps = steps  # "half": killed after step 1 (the schedule was built for 2)
    p, t = next(iter(recipe.student.parameters())), next(iter(recipe.teacher.unet.parameters()))
    state = {"student": type(p).__name__, "teacher": type(t).__name__, "full": p.numel(),
             "local": p.to_local().numel() if hasattr(p, "to_local") else p.numel(), "start": recipe.step}
    recipe.train()
    if int(os.environ.get("RANK", 0)) == 0:
        (root / f"{kind}-{run}.json").write_text(json.dumps(state))


def _launch(root: Path, kind: str, run: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(root), kind, run]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])


def _run(root: Path, kind: str, run: str) -> dict:
    res = _launch(root, kind, run)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((root / f"{kind}-{run}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_distill_equals_ddp_and_resumes_exactly(kind, tmp_path):
    from safetensors.torch import load_file

    from bksdm.cli import main
    from bksdm.models import absent_components
    from tests.test_distill_dit import dit_teacher

    dit_teacher(kind).save_pretrained(tmp_path / kind)
    assert main(["compress", "--teacher", str(tmp_path / kind), "--student", "bk-small", "--out", str(tmp_path / f"{kind}-s")]) == 0
    state = {run: _run(tmp_path, kind, run) for run in RUNS}
    assert state["ddp"]["student"] == "Parameter"
    assert state["fsdp2"]["student"] == state["fsdp2"]["teacher"] == "DTensor"  # the frozen teacher sharded too
    assert state["fsdp2"]["full"] > state["fsdp2"]["local"]
    assert state["resumed"]["start"] == 1
    weights = {n: load_file(next((tmp_path / f"{kind}-{n}" / "final" / "transformer").glob("*.safetensors")))
               for n in ("ddp", "fsdp2", "half")}
    start = load_file(next((tmp_path / f"{kind}-s" / "transformer").glob("*.safetensors")))
    assert sorted(weights["ddp"]) == sorted(weights["fsdp2"]) == sorted(start)

    def diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert diff(weights["fsdp2"], start) > 1e-4  # it trained
    assert diff(weights["ddp"], weights["fsdp2"]) < 1e-5  # summation order only: reduce-scatter, not all-reduce
    assert diff(weights["fsdp2"], weights["half"]) < 1e-6  # exact resume: model, optimiser and EMA shards
    shards = [p.name for p in (tmp_path / f"{kind}-half" / "checkpoints" / "step-2" / "sharded").iterdir()]
    assert sum(name.endswith(".distcp") for name in shards) == 2, shards  # one file per process
    import diffusers

    if kind == "flux":  # the sharded checkpoints resumed without sharding: one message, not a missing-file hunt
        res = _launch(tmp_path, kind, "mismatch")
        assert res.returncode != 0 and "was written with shard fsdp2 and this run has shard none" in res.stderr
    final = tmp_path / f"{kind}-fsdp2" / "final"  # a plain diffusers folder
    cls = getattr(diffusers, json.loads((final / "model_index.json").read_text())["_class_name"])
    cls.from_pretrained(final, **absent_components(final))


def test_sharded_run_refuses_sample_grids_unknown_modes_and_recipes_that_do_not_shard(tmp_path, tiny_teacher_dir, capsys):
    from bksdm.cli import main
    from tests.conftest import one_line_error
    from tests.test_distill_dit import dit_teacher

    dit_teacher("sd3-no-t5").save_pretrained(tmp_path / "t")
    capsys.readouterr()  # diffusers' own output while saving
    base = ["distill", "--teacher", str(tmp_path / "t"), "--data", "mini-world:8", "--resolution", "32",
            "--mixed-precision", "no", "--report-to", "none"]
    assert main([*base, "--out", str(tmp_path / "a"), "shard=fsdp2", "sample_prompts=[a red circle]"]) == 2
    assert "sample grids run the whole teacher" in one_line_error(capsys)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    assert main([*base, "--out", str(tmp_path / "b"), "shard=zero3"]) == 2
    assert "fsdp2" in one_line_error(capsys)
    (tmp_path / "b" / "final").mkdir(parents=True)  # an earlier run the refusal must leave alone
    (tmp_path / "b" / "final" / "keep.txt").write_text("mine")
    assert main([*base, "--out", str(tmp_path / "b"), "--overwrite", "shard=fsdp2"]) == 2
    assert "launch it with torchrun --nproc_per_node N" in one_line_error(capsys)
    assert (tmp_path / "b" / "final" / "keep.txt").read_text() == "mine"
    assert main(["lcm", "--model", str(tiny_teacher_dir), "--data", "mini-world:8", "--resolution", "32",
                 "--out", str(tmp_path / "c"), "--mixed-precision", "no", "--report-to", "none", "shard=fsdp2"]) == 2
    assert "does not shard" in one_line_error(capsys)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1]))
    torch.manual_seed(0)
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
