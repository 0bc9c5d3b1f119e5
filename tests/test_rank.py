"""Measured compression: `bksdm rank` and `compress --student auto --budget` on tiny teachers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from bksdm.arch import derive, load_spec
from bksdm.arch.units import Unit, all_units, candidates, full_spec, remove, remove_all
from bksdm.cli import main
from bksdm.errors import UserError
from bksdm.rank import bypassed, calibration, choose, rank
from tests.conftest import one_line_error


@pytest.fixture(scope="module")
def ranking(tiny_teacher_dir, tmp_path_factory):
    """A ranking of the tiny SD-layout teacher on 12 pictures of the shapes world, saved as `bksdm rank` writes it."""
    path = tmp_path_factory.mktemp("rank") / "rank.json"
    assert main(["rank", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:12", "--samples", "12",
                 "--batch-size", "6", "--out", str(path)]) == 0
    return json.loads(path.read_text())


def _inputs(cfg, batch=2, size=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, cfg["in_channels"], size, size, generator=g), torch.tensor([10, 900]),
            {"encoder_hidden_states": torch.randn(batch, 6, cfg["cross_attention_dim"], generator=g)})


def test_every_unit_appears_and_is_measured(ranking, tiny_teacher_dir):
    cfg = ranking["teacher_config"]
    expected = {u.name for u, _ in candidates(full_spec(cfg), cfg, all_units(cfg))}
    assert {r["name"] for r in ranking["units"]} == expected
    assert {r["kind"] for r in ranking["units"]} == {"pairs", "mid", "stage"}
    for r in ranking["units"]:
        assert r["rel_mse"] >= 0 and r["params_saved"] > 0 and r["gmacs_saved"] >= 0
    assert [r["rel_mse"] for r in ranking["units"]] == sorted((r["rel_mse"] for r in ranking["units"]), reverse=True)
    assert ranking["samples"] == 12 and ranking["skipped"] == {}


def test_rank_is_deterministic_for_a_seed(ranking, tiny_teacher_dir):
    again = rank(str(tiny_teacher_dir), "mini-world:12", samples=12, batch=4, seed=0, device="cpu", progress=False)
    # another batch size, the same pictures, noise and timesteps: the same measures (to float rounding)
    for a, b in zip(ranking["units"], again["units"]):
        assert a["name"] == b["name"] and a["rel_mse"] == pytest.approx(b["rel_mse"], rel=1e-4, abs=1e-9)


def test_bypassing_a_unit_is_the_student_without_it(tiny_teacher_dir, tmp_path):
    """The bypassed teacher computes what a compressed student lacking the unit computes, for every unit; and, by
    another route, what the teacher computes with its mid-block taken out."""
    from bksdm.compress import compress

    teacher = UNet2DConditionModel.from_pretrained(tiny_teacher_dir / "unet").eval()
    cfg = json.loads((tiny_teacher_dir / "unet" / "config.json").read_text())
    x, t, kw = _inputs(cfg)
    found = candidates(full_spec(cfg), cfg, all_units(cfg))
    chosen = [next((u, s) for u, s in found if u.kind == k) for k in ("mid", "stage")] + [p for p in found if p[0].kind == "pairs"][::5]
    for i, (unit, spec) in enumerate(chosen):  # every kind, and pairs of every stage
        path = tmp_path / f"u{i}.json"
        path.write_text(json.dumps(spec.to_dict()))
        compress(str(tiny_teacher_dir), str(path), tmp_path / f"s{i}")
        student = UNet2DConditionModel.from_pretrained(tmp_path / f"s{i}" / "unet").eval()
        with torch.no_grad():  # the same function; bit-equal on a Xeon, a kernel's summation order apart on an AMD EPYC
            torch.testing.assert_close(bypassed(teacher, cfg, spec)(x, t, **kw).sample, student(x, t, **kw).sample,
                                       rtol=1e-5, atol=1e-5, msg=unit.name)
    mid_less = copy.deepcopy(teacher)
    mid_less.mid_block = None
    spec = remove(full_spec(cfg), Unit("mid"), cfg)
    with torch.no_grad():
        torch.testing.assert_close(bypassed(teacher, cfg, spec)(x, t, **kw).sample, mid_less(x, t, **kw).sample,
                                   rtol=1e-5, atol=1e-5)
        assert (teacher(x, t, **kw).sample - mid_less(x, t, **kw).sample).abs().max() > 1e-3


def test_transformer_layer_units_on_sdxl(tiny_sdxl_dir):
    """SDXL stacks: each transformer layer of a multi-layer block is a unit, and bypassing one equals the teacher
    with that layer deleted from its block."""
    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet").eval()
    cfg = json.loads((tiny_sdxl_dir / "unet" / "config.json").read_text())
    layers = [u for u, _ in candidates(full_spec(cfg), cfg, all_units(cfg)) if u.kind == "layer"]
    assert layers
    unit = next(u for u in layers if u.path == "up" and u.layer == 0)
    spec = remove(full_spec(cfg), unit, cfg)
    cut = copy.deepcopy(teacher)
    del cut.up_blocks[unit.stage].attentions[unit.pair].transformer_blocks[unit.layer]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    kw = {"encoder_hidden_states": torch.randn(2, 5, cfg["cross_attention_dim"], generator=g),
          "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.ones(2, 6) * 64}}
    with torch.no_grad():
        assert torch.allclose(bypassed(teacher, cfg, spec)(x, torch.tensor([5, 500]), **kw).sample,
                              cut(x, torch.tensor([5, 500]), **kw).sample, atol=1e-6)


def test_budget_met_and_the_spec_file_derives_the_same_student(ranking, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    (tmp_path / "rank.json").write_text(json.dumps(ranking))
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", "auto", "--budget", "params=0.6",
                 "--ranking", str(tmp_path / "rank.json"), "--out", str(out)]) == 0
    rec = json.loads((out / "bksdm.json").read_text())
    assert rec["params"]["student_unet"] <= 0.6 * rec["params"]["teacher_unet"]
    assert rec["chosen_by_measurement"]["budget"] == "params=0.6" and rec["chosen_by_measurement"]["steps"]
    cfg = json.loads((tiny_teacher_dir / "unet" / "config.json").read_text())
    spec = load_spec(out / "spec.yaml", cfg)
    assert derive(cfg, spec).student_config == rec["student_config"]
    assert main(["compress", "--teacher", str(tiny_teacher_dir), "--student", str(out / "spec.yaml"), "--out", str(tmp_path / "again")]) == 0
    a = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(tmp_path / "again" / "unet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "Chosen by measurement" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "chosen by `bksdm compress --student auto --budget params=0.6`" in capsys.readouterr().out
    # an absolute count is a cap too; the MAC budget counts MACs
    count = rec["params"]["student_unet"]
    spec2, _ = choose(ranking, f"params={count}", progress=False)
    assert derive(cfg, spec2).student_config == rec["student_config"]
    spec3, trace = choose(ranking, "macs=0.7", progress=False)
    from bksdm.profile import unet_gmacs

    assert unet_gmacs(derive(cfg, spec3, with_keys=False).student_config) <= 0.7 * ranking["teacher_gmacs"] + 1e-9


def test_unreachable_budget_is_refused_with_the_nearest_value(ranking):
    with pytest.raises(UserError, match=r"params=0.05 is not reachable: removing every unit that can go leaves "
                                        r"params = [\d,]+ parameters \(0\.\d+\) of the teacher"):
        choose(ranking, "params=0.05", progress=False)


def test_rank_and_auto_faults(ranking, tiny_teacher_dir, tiny_sdxl_dir, tmp_path, capsys):
    (tmp_path / "rank.json").write_text(json.dumps(ranking))
    base = ["compress", "--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "o")]
    cases = [
        (["--student", "auto", "--budget", "params=0", "--ranking", str(tmp_path / "rank.json")], "is out of range"),
        (["--student", "auto", "--budget", "macs=1.5", "--ranking", str(tmp_path / "rank.json")], "is out of range"),
        (["--student", "auto", "--budget", "memory=0.5", "--ranking", str(tmp_path / "rank.json")], "KIND one of params, macs, latency"),
        (["--student", "auto", "--budget", "params=half", "--ranking", str(tmp_path / "rank.json")], "is not a number"),
        (["--student", "auto", "--budget", "latency=0.5", "--ranking", str(tmp_path / "rank.json")], "needs a ranking measured with --latency"),
        (["--student", "auto", "--ranking", str(tmp_path / "rank.json")], "--student auto needs --budget"),
        (["--student", "auto", "--budget", "params=0.5", "--ranking", str(tmp_path / "none.json")], "does not exist"),
        (["--student", "bk-small", "--budget", "params=0.5"], "use them with --student auto"),
    ]
    for args, message in cases:
        assert main(base + args) == 2, args
        assert message in one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    sdxl = ["compress", "--teacher", str(tiny_sdxl_dir), "--out", str(tmp_path / "x"), "--student", "auto",
            "--budget", "params=0.5", "--ranking", str(tmp_path / "rank.json")]
    assert main(sdxl) == 2 and "was measured on another U-Net" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.csv").write_text("file_name,text\n")
    assert main(["rank", "--teacher", str(tiny_teacher_dir), "--data", str(tmp_path / "empty"), "--samples", "4"]) == 2
    assert "is empty" in one_line_error(capsys)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken" / "metadata.csv").write_text("file_name,text\na.png,a red circle\n")
    assert main(["rank", "--teacher", str(tiny_teacher_dir), "--data", str(tmp_path / "broken"), "--samples", "4"]) == 2
    assert "no usable calibration pictures" in one_line_error(capsys)
    # a plot file of a kind matplotlib cannot write, and --auto with --guided: refused before any work
    assert main(["rank", "--teacher", str(tiny_teacher_dir), "--data", "mini-world:4", "--plot", str(tmp_path / "r.txt")]) == 2
    assert "--plot" in one_line_error(capsys) and not (tmp_path / "r.txt").exists()
    assert main(["ablate", "--auto", "--guided", "--out", str(tmp_path / "ab")]) == 2
    assert "drop --guided" in one_line_error(capsys) and not (tmp_path / "ab").exists()
    (tmp_path / "bad.json").write_text("{\"units\": 3}")
    assert main(base + ["--student", "auto", "--budget", "params=0.5", "--ranking", str(tmp_path / "bad.json")]) == 2
    assert "not a bksdm rank file" in one_line_error(capsys)


def test_calibration_counts_unusable_pictures(tiny_teacher_dir, tmp_path):
    """A folder with one truncated picture: skipped and counted with its reason, the rest calibrates."""
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    rows = ["file_name,text"]
    for i in range(5):
        Image.new("RGB", (32, 32), (200, 30 * i, 40)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,a red circle")
    (folder / "4.png").write_bytes((folder / "4.png").read_bytes()[:40])
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    batches, skips = calibration(tiny_teacher_dir, str(folder), 8, 2, 0, "cpu")
    assert sum(b["x"].shape[0] for b in batches) == 4 and skips.total == 1
    ts = torch.cat([b["t"] for b in batches])
    assert len(set(ts.tolist())) == 4  # one stratum of the schedule each


def test_greedy_choice_latency_shares_and_give_back(ranking):
    """With latency shares proportional to parameters, the latency the greedy predicts is the student's true
    parameter fraction (a stage removed after its own pairs is not counted twice); and no removed unit could be put
    back within the budget."""
    from bksdm.arch.derive import param_count

    cfg = ranking["teacher_config"]
    total = ranking["teacher_params"]
    synthetic = copy.deepcopy(ranking)
    for r in synthetic["units"]:
        r["latency_share"] = r["params_saved"] / total
    for budget in (0.9, 0.75, 0.6):
        spec, trace = choose(synthetic, f"latency={budget}", progress=False)
        true = param_count(derive(cfg, spec, with_keys=False).student_config) / total
        assert trace[-1]["latency"] == pytest.approx(true, abs=1e-6) and true <= budget
        spec, trace = choose(ranking, f"params={budget}", progress=False)
        cost = param_count(derive(cfg, spec, with_keys=False).student_config) / total
        assert cost <= budget
        removed = [Unit.from_dict({**ranking["units"][[u["name"] for u in ranking["units"]].index(t["removed"])]})
                   for t in trace if "removed" in t]
        restored = {t["restored"] for t in trace if "restored" in t}
        kept_out = [u for u in removed if u.name not in restored]
        for unit in kept_out:  # putting any of them back breaks the budget or the student
            try:
                trial = remove_all(cfg, [u for u in kept_out if u != unit])
            except UserError:
                continue
            after = param_count(derive(cfg, trial, with_keys=False).student_config) / total
            assert after > budget or after == cost  # equal: a pair its removed stage holds anyway


@pytest.mark.slow
def test_ablate_auto_runs_and_refuses_other_settings(tmp_path, capsys):
    """`ablate --auto` on the shipped teacher: the hand and the measured student side by side (tiny budget), and a
    resumed run with other settings refused instead of mixed in."""
    out = tmp_path / "auto"
    args = ["ablate", "--auto", "--out", str(out), "--seeds", "0", "--students", "bk-tiny", "--images", "4",
            "--samples", "8", "--gen-steps", "2"]
    assert main(args + ["--steps", "1"]) == 0
    md = (out / "auto.md").read_text()
    assert "| bk-tiny | hand (paper) | 1,511,820 | 1 |" in md and "| bk-tiny | measured (auto) |" in md
    assert (out / "init" / "auto-bk-tiny" / "spec.yaml").is_file()
    capsys.readouterr()
    assert main(args + ["--steps", "2"]) == 2
    assert "holds a comparison run with" in one_line_error(capsys)
