"""`bksdm rank` and `compress --student auto` on tiny random SD3 / FLUX transformer teachers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bksdm.cli import main
from bksdm.errors import UserError
from tests.conftest import one_line_error
from tests.test_distill_dit import dit_teacher

DATA = "mini-world:6"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Saved teacher folders by kind (SD3 with and without T5: 3 joint blocks; Flux: 2 double + 3 single blocks)."""
    root = tmp_path_factory.mktemp("rank_dit")
    out = {}
    for kind in ("sd3", "sd3-no-t5", "flux"):
        dit_teacher(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def rankings(teachers):
    from bksdm.rank import rank

    return {k: rank(str(f), DATA, samples=4, batch=2, seed=3, device="cpu", progress=False) for k, f in teachers.items()}


@pytest.mark.parametrize("kind", ["sd3", "sd3-no-t5", "flux"])
def test_one_row_per_removable_block_deterministic(kind, teachers, rankings):
    from bksdm.arch import dit
    from bksdm.rank import rank, ranking_table

    rec = rankings[kind]
    cfg = rec["teacher_config"]
    names = sorted(r["name"] for r in rec["units"])
    assert names == sorted(f"{n}.{i}" for n, i in dit.removable_blocks(cfg))
    if kind.startswith("sd3"):
        assert f"transformer_blocks.{cfg['num_layers'] - 1}" not in names
    else:
        assert "single_transformer_blocks.2" in names and "transformer_blocks.1" in names
    for r in rec["units"]:
        assert r["rel_mse"] > 0 and math.isfinite(r["rel_mse"]) and math.isfinite(r["cosine"])
        assert r["input_change"] is not None and math.isfinite(r["input_change"])
        student = dit.derive(cfg, dit.spec_without(cfg, r["list"], r["index"]), with_keys=False).student_config
        assert r["params_saved"] == dit.param_count(cfg) - dit.param_count({**student, "_class_name": cfg["_class_name"]}) > 0
    assert rec["samples"] == 4 and rec["teacher_params"] == dit.param_count(cfg)
    again = rank(str(teachers[kind]), DATA, samples=4, batch=2, seed=3, device="cpu", progress=False)
    assert [(r["name"], r["rel_mse"], r["input_change"]) for r in again["units"]] == \
        [(r["name"], r["rel_mse"], r["input_change"]) for r in rec["units"]]
    assert "| unit |" in ranking_table(rec)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_rel_mse_is_the_built_students(kind, teachers, rankings):
    """The bypass is checked against the real student: derived, filled from the teacher's tensors, run."""
    from bksdm.arch import dit
    from bksdm.pipelines import load_transformer, read_transformer_config
    from bksdm.rank_dit import calibration
    from bksdm.arch.transfer import init_student_from_teacher

    cfg, tdir = read_transformer_config(teachers[kind])
    teacher = load_transformer(tdir, cfg).eval()
    batches, _, family = calibration(teachers[kind], DATA, 4, 2, 3, "cpu")
    row = rankings[kind]["units"][-1]  # the least important
    student = init_student_from_teacher(teacher, dit.derive(cfg, dit.spec_without(cfg, row["list"], row["index"]))).eval()
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            ref = family.denoise(teacher, b["x"], b["t"], b["cond"]).float()
            out = family.denoise(student, b["x"], b["t"], b["cond"]).float()
            num += float(((out - ref) ** 2).sum())
            den += float((ref ** 2).sum())
    assert row["rel_mse"] == pytest.approx(num / den, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_compress_auto_through_the_cli(kind, teachers, tmp_path, capsys):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from bksdm.arch import dit
    from bksdm.rank import choose

    ranking = tmp_path / "r.json"
    assert main(["rank", "--teacher", str(teachers[kind]), "--data", DATA, "--samples", "4", "--batch-size", "2",
                 "--device", "cpu", "--out", str(ranking)]) == 0
    rec = json.loads(ranking.read_text())
    cfg = rec["teacher_config"]
    # a budget that allows exactly one block: the least important one by rel_mse per parameter goes
    least = min(rec["units"], key=lambda r: r["rel_mse"] / r["params_saved"])
    budget = rec["teacher_params"] - least["params_saved"]
    spec, _ = choose(rec, f"params={budget}", progress=False)
    out = tmp_path / "s"
    assert main(["compress", "--teacher", str(teachers[kind]), "--student", "auto", "--budget", f"params={budget}",
                 "--ranking", str(ranking), "--out", str(out)]) == 0
    assert spec.name == f"auto-params-{budget}" and dict(spec.keep)[least["list"]] == tuple(
        i for i in range(dit.block_counts(cfg)[least["list"]]) if i != least["index"])
    again = tmp_path / "from-spec"  # the written spec.yaml is an ordinary spec file: compress takes it back
    assert main(["compress", "--teacher", str(teachers[kind]), "--student", str(out / "spec.yaml"), "--out", str(again)]) == 0
    assert json.loads((again / "bksdm.json").read_text())["key_map"] == json.loads((out / "bksdm.json").read_text())["key_map"]
    record = json.loads((out / "bksdm.json").read_text())
    assert record["chosen_by_measurement"]["budget"] == f"params={budget}"
    pipe = (StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline).from_pretrained(out)
    assert sum(p.numel() for p in pipe.transformer.parameters()) == budget
    # a fraction: within budget, SD3's last block kept
    spec, trace = choose(rec, "params=0.7", progress=False)
    student = {**dit.derive(cfg, spec, with_keys=False).student_config, "_class_name": cfg["_class_name"]}
    assert dit.param_count(student) <= 0.7 * rec["teacher_params"] and spec.name == "auto-params-0.7"
    if kind == "sd3":
        assert dict(spec.keep)["transformer_blocks"][-1] == cfg["num_layers"] - 1


def test_faults_are_one_line(teachers, rankings, tiny_teacher_dir, tmp_path, capsys):
    from bksdm.rank import choose

    sd3 = rankings["sd3"]
    with pytest.raises(UserError, match="not reachable"):
        choose(sd3, "params=0.01", progress=False)
    with pytest.raises(UserError, match="params budgets only"):
        choose(sd3, "latency=0.5", progress=False)
    with pytest.raises(UserError, match="params budgets only"):
        choose(sd3, "macs=0.5", progress=False)
    dit_file, unet_file = tmp_path / "dit.json", tmp_path / "unet.json"
    dit_file.write_text(json.dumps(sd3))
    assert main(["rank", "--teacher", str(tiny_teacher_dir), "--data", DATA, "--samples", "2", "--device", "cpu",
                 "--out", str(unet_file)]) == 0
    capsys.readouterr()
    cases = [
        (["compress", "--teacher", str(teachers["sd3"]), "--student", "auto", "--budget", "params=0.5",
          "--ranking", str(unet_file), "--out", str(tmp_path / "a")], "measured on another U-Net"),
        (["compress", "--teacher", str(tiny_teacher_dir), "--student", "auto", "--budget", "params=0.5",
          "--ranking", str(dit_file), "--out", str(tmp_path / "b")], "measured on another SD3Transformer2DModel"),
        (["compress", "--teacher", str(teachers["flux"]), "--student", "auto", "--budget", "params=0.5",
          "--ranking", str(dit_file), "--out", str(tmp_path / "c")], "measured on another"),
        (["compress", "--teacher", str(teachers["sd3"]), "--student", "auto", "--budget", "latency=0.5",
          "--ranking", str(dit_file), "--out", str(tmp_path / "d")], "params budgets only"),
        (["compress", "--teacher", str(teachers["sd3"]), "--student", "auto", "--budget", "params=0.01",
          "--ranking", str(dit_file), "--out", str(tmp_path / "e")], "not reachable"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_line_error(capsys), argv
    no_t5_file = tmp_path / "no_t5.json"
    no_t5_file.write_text(json.dumps(rankings["sd3-no-t5"]))
    more = [  # the same transformer config, another text side: SD3 without T5 feeds zeros where T5 was
        (["compress", "--teacher", str(teachers["sd3"]), "--student", "auto", "--budget", "params=0.7",
          "--ranking", str(no_t5_file), "--out", str(tmp_path / "f")], "measured with another text side"),
    ]
    for argv, message in more:
        assert main(argv) == 2, argv
        assert message in one_line_error(capsys), argv
    assert not any((tmp_path / n).exists() for n in "abcdef")
    from bksdm.rank import rank

    with pytest.raises(UserError, match="multiples of 4 px"):  # Flux packs 2x2 latents (VAE factor 2 here): 42 cannot
        rank(str(teachers["flux"]), DATA, samples=2, batch=2, seed=0, device="cpu", resolution=42, progress=False)


def test_inspect_shows_the_measured_choice_and_give_back_is_reported(teachers, rankings, tmp_path, capsys):
    """A transformer student chosen by `compress --student auto`: `bksdm inspect` prints how (as for a U-Net); and a
    greedy removal that overshoots puts blocks back. The Flux ranking's importances are set so that two cheap single
    blocks go first, then a double block (cheaper per parameter than the third single) overshoots the budget of one
    double block, and both singles come back: the student lacks exactly that double block."""
    import copy

    from bksdm.rank import choose

    rec = copy.deepcopy(rankings["flux"])
    importance = {"single_transformer_blocks.0": 1e-6, "single_transformer_blocks.1": 1e-6,
                  "single_transformer_blocks.2": 1.0, "transformer_blocks.0": 0.01, "transformer_blocks.1": 0.02}
    for r in rec["units"]:
        r["rel_mse"] = importance[r["name"]]
    ranking = tmp_path / "rank.json"
    ranking.write_text(json.dumps(rec))
    double = next(r["params_saved"] for r in rec["units"] if r["name"] == "transformer_blocks.0")
    budget = rec["teacher_params"] - double
    spec, trace = choose(rec, f"params={budget}", progress=False)
    assert [t.get("removed") or "+" + t["restored"] for t in trace] == [
        "single_transformer_blocks.0", "single_transformer_blocks.1", "transformer_blocks.0",
        "+single_transformer_blocks.0", "+single_transformer_blocks.1"]
    assert dict(spec.keep) == {"transformer_blocks": (1,), "single_transformer_blocks": (0, 1, 2)}
    out = tmp_path / "s"
    assert main(["compress", "--teacher", str(teachers["flux"]), "--student", "auto", "--budget", f"params={budget}",
                 "--ranking", str(ranking), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chosen by `bksdm compress --student auto" in text and "| unit | rel. MSE when bypassed | params saved |" in text
