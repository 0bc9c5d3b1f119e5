"""`bksdm ablate --family sd3`: which blocks of the SD3-layout (MMDiT, flow matching) mini teacher matter. Four
students without half of its 8 joint blocks (block 7 always kept) at equal size, output KD alone against output +
feature KD, every measure of every run (the held-out error is the flow-matching one), the report, and the faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bksdm.cli import main
from bksdm.errors import UserError
from tests.conftest import one_line_error

KEPT = {"sd3-first-half": [4, 5, 6, 7], "sd3-middle": [0, 1, 6, 7], "sd3-last-half": [0, 1, 2, 7],
        "sd3-alternate": [1, 3, 5, 7]}
MEASURES = ("heldout_mse", "teacher_mse", "fidelity", "mini_fid", "bg_noise")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A (barely trained) SD3-layout mini teacher of the real size: `bksdm mini-teacher --config sd3`, 3 steps."""
    out = tmp_path_factory.mktemp("sd3-teacher") / "run"
    assert main(["mini-teacher", "--config", "sd3", f"out={out}", "--steps", "3", "batch_size=4", "--log-every", "1",
                 "--save-every", "0"]) == 0
    return out / "final"


def test_sd3_students_remove_half_the_blocks_at_equal_size(tmp_path):
    """On the real mini SD3 architecture (meta device): each student keeps the blocks its name says, block 7 in all,
    the derivation's feature pairs end at the teacher block each kept block stands in for, every student has the
    same parameter count, and the spec file ``ablate`` writes loads back as the same transformer spec."""
    from bksdm.arch.dit import DiTSpec, derive, param_count
    from bksdm.arch.spec import load_spec
    from bksdm.mini.model import sd3_transformer_config
    from bksdm.mini.teacher import SD3_SPECS, SD3_TEACHER_TRANSFORMER
    from bksdm.recipes.mini import student_source
    from bksdm.recipes.mini_ablate import FAMILY_STUDENTS

    assert tuple(SD3_SPECS) == FAMILY_STUDENTS["sd3"] == tuple(KEPT)
    config = {"_class_name": "SD3Transformer2DModel", **sd3_transformer_config(**SD3_TEACHER_TRANSFORMER)}
    assert param_count(config) == 4_663_088
    counts = {}
    for name, spec in SD3_SPECS.items():
        der = derive(config, spec)
        assert spec.kept(config) == {"transformer_blocks": KEPT[name]} and der.student_config["num_layers"] == 4
        assert sorted({k.split(".")[1] for k in der.unused_teacher_keys}) == [str(i) for i in range(8) if i not in KEPT[name]]
        assert [t for t, _ in der.layer_pairs][-1] == "transformer_blocks.7#1"
        counts[name] = param_count({**der.student_config, "_class_name": config["_class_name"]})
        loaded = load_spec(student_source(tmp_path, name), config)
        assert isinstance(loaded, DiTSpec) and loaded == spec
    assert len(set(counts.values())) == 1 and counts["sd3-middle"] == 2_288_432, counts
    assert [t for t, _ in derive(config, SD3_SPECS["sd3-alternate"]).layer_pairs] == [
        f"transformer_blocks.{i}#1" for i in (2, 4, 6, 7)]  # kept block 1 stands in for 1 and 2, ...


def test_heldout_is_the_flow_matching_error(teacher):
    """The held-out error of an SD3 pipeline is the rectified-flow velocity error through SD3Family.denoise: zero
    to itself, equal to a direct computation from the objective's draws, and larger for a perturbed copy."""
    import copy

    from bksdm.arch.flow_families import family_for
    from bksdm.mini.metrics import HELDOUT_START
    from bksdm.mini.teacher import to_tensor
    from bksdm.mini.world import ShapesWorld
    from bksdm.objectives import FlowObjective, objective_for
    from bksdm.recipes.mini import denoiser, eval_parts, heldout

    parts = eval_parts(teacher)
    model = denoiser(parts)
    own = heldout(parts, model, count=6)
    assert own["teacher_mse"] == 0 and np.isfinite(own["heldout_mse"]) and own["heldout_mse"] > 0
    objective = objective_for(dict(parts["scheduler"].config))
    assert isinstance(objective, FlowObjective)
    samples = [ShapesWorld(seed=0).sample(HELDOUT_START + i) for i in range(6)]
    lat = parts["vae"].encode(to_tensor([s[0] for s in samples])).latent_dist.mode() * parts["vae"].config.scaling_factor
    x, t, target = objective.sample(lat, torch.Generator().manual_seed(HELDOUT_START))
    family = family_for(model.config, parts)
    with torch.no_grad():
        pred = family.denoise(model, x, t, family.encode_prompt(parts, [s[1] for s in samples], "cpu"))
    assert abs(float(((pred - target) ** 2).mean()) - own["heldout_mse"]) < 1e-6
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer_blocks[3].ff.net[2].weight.mul_(1.5)
    assert heldout(parts, other, count=6)["teacher_mse"] > 0


def test_ablate_family_sd3_end_to_end(teacher, tmp_path):
    """One student x both variants, 1 step, 1 seed, 4 images at 2 steps (each run's held-out error takes 256
    triples through two transformers: more students would double the time): every measure finite, the student's
    kept blocks in its pipeline, the recipe (no guided KD, uniform timesteps, feature KD only in its variant), the
    report naming the student, and a rerun resumes."""
    from bksdm.recipes.mini_ablate import SD3_VARIANTS, ablate

    out = tmp_path / "abl"
    students = ["sd3-last-half"]
    assert main(["ablate", "--family", "sd3", "--out", str(out), "--teacher", str(teacher), "--steps", "1",
                 "--seeds", "0", "--students", *students, "--images", "4", "--gen-steps", "2"]) == 0
    rows = json.loads((out / "ablation.json").read_text())
    assert [(r["student"], r["variant"]) for r in rows] == [(s, v) for s in students for v in SD3_VARIANTS]
    assert {r["family"] for r in rows} == {"sd3"}
    for r in rows:
        assert all(np.isfinite(r[m]) for m in MEASURES) and r["teacher_mse"] > 0, r
        recipe = json.loads(next((out / "runs").glob(f"{r['student']}-{r['variant'].replace(' ', '_').replace('&', 'and')}-0"))
                            .joinpath("config.json").read_text())
        assert recipe["lambda_cfg"] == 0 and recipe["timestep_bias"] == "none" and recipe["init"] == "teacher"
        assert (recipe["lambda_feat"] == 0) == (r["variant"] == "+ output KD")
    for s in students:
        record = json.loads((out / "init" / s / "bksdm.json").read_text())
        assert json.loads((out / "specs" / f"{s}.json").read_text())["keep"] == {"transformer_blocks": KEPT[s]}
        assert json.loads((out / "init" / s / "transformer" / "config.json").read_text())["num_layers"] == 4, record
    md = (out / "ablation.md").read_text()
    assert "which blocks matter" in md and all(f"| {s} |" in md for s in students)
    assert all(f"- {v}, heldout_mse: sd3-last-half (" in md for v in SD3_VARIANTS)
    assert "- sd3-last-half, heldout_mse: " in md
    assert ablate(out, steps=1, seeds=(0,), students=tuple(students), images=4, teacher=str(teacher), gen_steps=2,
                  family="sd3") == rows  # resumed: nothing rerun


def test_sd3_report_ranks_students_with_the_seed_spreads():
    from bksdm.recipes.mini_ablate import SD3_VARIANTS, ablation_markdown, student_ranking, summarise

    means = {"sd3-first-half": 0.30, "sd3-middle": 0.10, "sd3-last-half": 0.11, "sd3-alternate": 0.20}
    rows = [{"family": "sd3", "student": s, "variant": v, "seed": seed, "heldout_mse": m + 0.01 * seed - 0.02 * k,
             "teacher_mse": m, "fidelity": 1 - m, "mini_fid": 10 * m, "bg_noise": m, "seconds": 1}
            for s, m in means.items() for k, v in enumerate(SD3_VARIANTS) for seed in (0, 1)]
    summary = summarise(rows)
    assert student_ranking(summary, "+ output KD", "heldout_mse") == (
        "sd3-middle (0.1050) ~ sd3-last-half (0.1150) > sd3-alternate (0.2050) > sd3-first-half (0.3050)")
    assert student_ranking(summary, "+ output KD", "fidelity").startswith("sd3-middle (0.9000) > sd3-last-half")
    md = ablation_markdown(rows, 100)
    assert "which blocks matter" in md and "- + output & feature KD, mini_fid: sd3-middle (1.0000)" not in md
    assert "- + output & feature KD, mini_fid: sd3-middle (1.0) > sd3-last-half (1.1)" in md
    assert ("- sd3-first-half, heldout_mse: + output & feature KD vs + output KD: **+ output & feature KD** is better "
            "by 0.02 (beyond the seed spread)") in md
    assert "- sd3-first-half, teacher_mse: + output & feature KD vs + output KD: **no separation**" in md


def test_ablate_sd3_faults_are_one_line(teacher, tmp_path, capsys):
    from bksdm.mini.teacher import SD3_ASSET
    from bksdm.recipes.mini_ablate import ablate

    out = tmp_path / "abl"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps([{"family": "sdxl", "student": "koala-mini", "variant": "+ output KD",
                                                    "seed": 0}]))
    assert main(["ablate", "--family", "sd3", "--teacher", str(teacher), "--out", str(out)]) == 2
    assert "holds an ablation of family sdxl; choose another --out for --family sd3" in one_line_error(capsys)
    other = tmp_path / "other"
    assert main(["ablate", "--family", "sd3", "--teacher", str(teacher), "--out", str(other), "--students", "koala-mini",
                 "--steps", "1", "--seeds", "0"]) == 2
    assert "koala-mini.json is a U-Net spec (down, mid, up) but the teacher is a SD3Transformer2DModel" in one_line_error(capsys)
    assert main(["ablate", "--family", "sd3", "--teacher", str(teacher), "--out", str(other), "--students", "sd3-halves"]) == 2
    assert "sd3-halves" in one_line_error(capsys)
    assert main(["ablate", "--family", "sd3", "--guided", "--out", str(tmp_path / "g")]) == 2
    assert "--guided adds a row to the SD ablation" in one_line_error(capsys)
    assert main(["ablate", "--family", "sd3", "--auto", "--out", str(tmp_path / "a")]) == 2
    assert "--auto compares U-Net students (--family sd or sdxl); for --family sd3 drop --auto" in one_line_error(capsys)
    assert not (tmp_path / "g").exists() and not (tmp_path / "a").exists()
    assert not (other / "runs").exists()
    missing = tmp_path / "no-teacher"  # a --teacher without checksums says how to train one
    with pytest.raises(UserError, match="family=sd3"):
        ablate(tmp_path / "d", family="sd3", teacher=str(missing))
    assert SD3_ASSET.is_dir() and not (tmp_path / "d" / "runs").exists()
