"""The mini world: determinism and captions, the shipped teacher and classifier, metrics, demo and ablation."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import shutil

import numpy as np
import pytest

from bksdm.errors import UserError
from bksdm.mini.world import COLOURS, KINDS, POSITIONS, Shape, ShapesWorld, caption, parse_caption


def test_world_is_deterministic_and_captions_describe_the_scene():
    a, b = ShapesWorld(seed=4), ShapesWorld(seed=4)
    for i in range(20):
        ia, ca, sa = a.sample(i)
        ib, cb, sb = b.sample(i)
        assert ca == cb and sa == sb and np.array_equal(np.asarray(ia), np.asarray(ib))
        assert parse_caption(ca) == sa and 1 <= len(sa) <= 2
        assert len({s.position for s in sa}) == len(sa)  # distinct quadrants
    assert ShapesWorld(seed=5).sample(0)[1] != ShapesWorld(seed=4).sample(0)[1] or \
        not np.array_equal(np.asarray(ShapesWorld(seed=5).sample(0)[0]), np.asarray(ShapesWorld(seed=4).sample(0)[0]))
    assert caption((Shape("circle", "red", "small", "top left"),)) == "a small red circle at the top left"
    with pytest.raises(ValueError):
        parse_caption("a huge red circle at the top left")


def test_rendered_shape_has_prompted_colour_in_prompted_quadrant():
    from bksdm.mini.world import render

    for kind in KINDS:
        for pos in POSITIONS:
            img = np.asarray(render((Shape(kind, "blue", "large", pos),)))
            row, col = pos.split()
            quad = img[:16] if row == "top" else img[16:]
            quad = quad[:, :16] if col == "left" else quad[:, 16:]
            assert (np.abs(quad.astype(int) - COLOURS["blue"]).sum(-1) == 0).sum() > 40


def test_classifier_reads_real_images_and_mini_fid_is_zero_on_itself():
    from bksdm.mini.metrics import fidelity, mini_fid, reference_images

    world = ShapesWorld(seed=11)
    samples = [world.sample(10**6 + i) for i in range(300)]
    images, prompts = [s[0] for s in samples], [s[1] for s in samples]
    assert fidelity(images, prompts) >= 0.97
    assert abs(mini_fid(images, images)) < 1e-6
    # real pictures of the same prompts are close; a uniform grey set is far
    close = mini_fid(images, reference_images(prompts))
    from PIL import Image

    far = mini_fid([Image.new("RGB", (32, 32), (128, 128, 128))] * 300, images)
    assert close < far / 10


def test_shipped_teacher_loads_and_checks_its_checksum(tmp_path):
    from bksdm.mini.teacher import ASSET, load_teacher, teacher_path

    pipe = load_teacher()
    assert pipe.unet.config.down_block_types[-1] == "DownBlock2D" and pipe.unet.config.layers_per_block == 2
    assert sum(f.stat().st_size for f in ASSET.rglob("*.safetensors")) < 10 * 2**20
    broken = tmp_path / "teacher"
    shutil.copytree(teacher_path(), broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 mismatch"):
        teacher_path(broken)


def test_teacher_recipe_trains_a_checksummed_v_prediction_pipeline(tmp_path):
    from bksdm.mini.metrics import heldout_mse
    from bksdm.mini.config import TeacherConfig
    from bksdm.mini.teacher import load_teacher
    from bksdm.recipes.mini_teacher import train_teacher

    result = train_teacher(TeacherConfig(out=str(tmp_path / "t"), steps=3, batch_size=4, log_every=1, save_every=0))
    assert result["final_loss"] is not None and result["final_loss"] == result["final_loss"]  # not NaN
    pipe = load_teacher(tmp_path / "t" / "final")  # every trainer's result in OUT/final; verifies its checksums
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert json.loads((tmp_path / "t" / "final" / "training.json").read_text())["prediction"] == "v_prediction"
    own = heldout_mse(pipe.unet, pipe.unet, {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}, pipe.vae, dict(pipe.scheduler.config), 8)
    assert own["teacher_mse"] == 0 and own["heldout_mse"] > 0


def test_ablation_summary_and_ordering():
    from bksdm.recipes.mini_ablate import VARIANTS, ablation_markdown, ordering_holds, summarise

    rows = []
    for k, v in enumerate(VARIANTS):
        for seed in (0, 1):
            rows.append({"student": "bk-small", "variant": v, "seed": seed, "heldout_mse": 1.0 - 0.1 * k + 0.01 * seed,
                         "teacher_mse": 0.5 - 0.1 * k + 0.3 * (k == 3), "fidelity": 0.5, "mini_fid": 10.0})
    s = summarise(rows)
    assert ordering_holds(s, "bk-small", "heldout_mse") and not ordering_holds(s, "bk-small", "teacher_mse")
    md = ablation_markdown(rows, 50)
    assert "- bk-small, heldout_mse: **holds**." in md
    assert "- bk-small, teacher_mse: **does not hold**: no gain from + output KD to + output & feature KD." in md
    assert "- bk-small, fidelity: **does not hold**: no gain from random init to teacher init;" in md  # all equal
    assert "0.7050 (0.0100)" in md  # + output & feature KD: mean of 0.70 and 0.71, spread 0.01


def test_ablation_verdict_reads_the_seed_spread():
    """A gain in the mean that lies inside the seeds' spread is not reported as the paper's ordering holding."""
    from bksdm.recipes.mini_ablate import VARIANTS, ablation_markdown, ordering_verdict, summarise

    fid = {0: (0.0, 0.02), 1: (0.20, 0.30), 2: (0.22, 0.32), 3: (0.60, 0.62)}  # output KD: +0.02, spreads 0.10
    rows = [{"student": "bk-tiny", "variant": v, "seed": seed, "heldout_mse": 0.1, "teacher_mse": 0.1,
             "fidelity": fid[k][seed], "mini_fid": 100.0 - 10 * k - seed, "bg_noise": 20.0 - 2 * k + (3 * seed + 1) * (k == 2)}
            for k, v in enumerate(VARIANTS) for seed in (0, 1)]
    s = summarise(rows)
    assert ordering_verdict(s, "bk-tiny", "fidelity") == ("**holds in the mean only**: inside the seed spread from "
                                                         "teacher init to + output KD")
    assert ordering_verdict(s, "bk-tiny", "mini_fid") == "**holds**"  # 10 per step against spreads of 1
    assert ordering_verdict(s, "bk-tiny", "bg_noise").startswith("**does not hold**: no gain from teacher init to + output KD")
    md = ablation_markdown(rows, 200)
    assert "- bk-tiny, fidelity: **holds in the mean only**" in md and "| background noise |" in md


def test_sdxl_ablation_verdicts_need_a_gap_beyond_the_seed_spread():
    from bksdm.recipes.mini_ablate import SDXL_VARIANTS, ablation_markdown, compare, summarise

    fid = {"+ output KD": (0.50, 0.52), "+ block feature KD": (0.60, 0.64), "+ self-attention feature KD": (0.70, 0.71)}
    rows = [{"family": "sdxl", "student": "koala-mini", "variant": v, "seed": seed, "heldout_mse": 0.04 + 0.001 * seed,
             "teacher_mse": 0.02, "fidelity": fid[v][seed], "mini_fid": 100.0 - 10 * k}
            for k, v in enumerate(SDXL_VARIANTS) for seed in (0, 1)]
    s = summarise(rows)
    c = compare(s, "koala-mini", "fidelity", "+ self-attention feature KD", "+ block feature KD")
    assert c["gain"] == pytest.approx(0.085) and c["separated"]  # 0.085 > both spreads (0.04, 0.01)
    c = compare(s, "koala-mini", "mini_fid", "+ self-attention feature KD", "+ block feature KD")
    assert c["gain"] == pytest.approx(10.0) and c["separated"]  # lower mini-FID is better
    assert not compare(s, "koala-mini", "heldout_mse", "+ block feature KD", "+ output KD")["separated"]  # equal means
    md = ablation_markdown(rows, 200)
    assert ("- koala-mini, fidelity: + self-attention feature KD vs + block feature KD: **+ self-attention feature KD** "
            "is better by 0.085 (beyond the seed spread).") in md
    assert "- koala-mini, heldout_mse: + self-attention feature KD vs + block feature KD: **no separation**" in md
    assert "paper's ordering" not in md


@pytest.mark.slow
def test_fast_demo_runs_end_to_end(tmp_path):
    from bksdm.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--images", "8", "--gen-steps", "2", "--lcm",
                 "--lcm-steps", "2"]) == 0
    report = (out / "report.md").read_text()
    assert "Teacher (top) vs distilled student" in report and (out / "samples.png").is_file()
    from bksdm.recipes.mini_report import REPORT_COLUMNS

    first_table = next(line for line in report.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in first_table.strip("|").split("|")] == REPORT_COLUMNS
    teacher_row = report.splitlines()[report.splitlines().index(first_table) + 2]
    assert teacher_row.count("[") == 3  # fidelity, mini-FID and background noise, each with its interval
    assert (out / "zoom.png").is_file() and "![zoomed](zoom.png)" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<table>" in html  # pictures inlined: one file to share
    curve = list(csv.DictReader(open(out / "fidelity_vs_step.csv")))
    checkpoints = sorted(int(p.name[5:]) for p in (out / "distill" / "checkpoints").iterdir())
    assert [int(r["step"]) for r in curve] == checkpoints == [1, 2]  # one row per checkpoint
    lcm = json.loads((out / "lcm" / "lcm.json").read_text())["rows"]
    assert [r["steps"] for r in lcm] == [2, 2, 1, 2, 4, 8] and all(0 <= r["fidelity"] <= 1 for r in lcm)
    assert "Fewer steps" in report
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "measured-small (teacher init, no KD)", "measured-small (distilled)"]
    assert rows[0]["teacher_mse"] == 0 and rows[2]["unet_params"] == 1_875_372  # the measured choice at BK-Small's size
    assert "the student: BK-Small's parameter count" in report  # the departure is named
    fidelities = [r["fidelity"] for r in rows if "fidelity" in r]
    assert len(fidelities) == 2 and all((f * 8).is_integer() and 0 <= f <= 1 for f in fidelities)  # teacher, student: k of 8


@pytest.mark.slow
def test_the_demos_measured_student_is_what_rank_chooses_today():
    """MEASURED_SMALL is not a hand-written spec: a fresh `bksdm rank` of the shipped teacher (mini-world:256, seed 0,
    as `ablate --auto` runs it) and `compress --student auto --budget params=1923276` choose exactly its blocks."""
    from bksdm.mini.teacher import MEASURED_SMALL, teacher_path
    from bksdm.rank import choose, rank

    ranking = rank(str(teacher_path()), "mini-world:256", samples=256, batch=32, seed=0, device="cpu", progress=False)
    spec, _ = choose(ranking, "params=1923276", progress=False)
    assert (spec.down, spec.mid, spec.up, spec.depth) == (MEASURED_SMALL.down, MEASURED_SMALL.mid, MEASURED_SMALL.up,
                                                           MEASURED_SMALL.depth)


def test_teacher_recipe_runs_from_the_cli_with_its_shipped_config(tmp_path, capsys):
    """The mini teacher's recipe is on the one config path: shipped YAML = dataclass defaults, flags, key=value."""
    import yaml

    from bksdm.cli import main
    from bksdm.config import load_yaml_config
    from bksdm.mini.config import TeacherConfig
    from tests.conftest import one_line_error

    assert load_yaml_config(TeacherConfig, "default", "mini_teacher").to_dict() == TeacherConfig().to_dict()
    shipped = Path(__file__).parent.parent / "src" / "bksdm" / "configs" / "mini_teacher_default.yaml"
    assert set(yaml.safe_load(shipped.read_text())) == set(TeacherConfig.fields())
    out = tmp_path / "cli"
    assert main(["mini-teacher", "--config", "default", f"out={out}", "--steps", "2", "batch_size=2", "--log-every", "1",
                 "--save-every", "0", "--no-bf16"]) == 0
    info = json.loads((out / "final" / "training.json").read_text())
    assert info["steps"] == 2 and info["batch"] == 2 and info["bf16_autocast"] is False
    capsys.readouterr()
    assert main(["mini-teacher", "--steps", "2"]) == 2
    assert "--out" in one_line_error(capsys)
    before = (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["mini-teacher", "--out", str(out), "--steps", "1"]) == 2  # nothing already there is replaced unasked
    assert "--overwrite" in one_line_error(capsys)
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert main(["mini-teacher", "--out", str(tmp_path / "x"), "--prediction", "x0"]) == 2
    assert "'x0' is not one of" in one_line_error(capsys)


def test_background_noise_orders_controlled_degradations_and_classifier_measures_do_not():
    """The pixel measure agrees with what a person sees: clean < noise sigma 2 < 4 < 8, and clean < blur 0.5 < 1 <
    2 px; on noise, prompt fidelity stays flat (the classifier was built to ignore grain)."""
    import importlib.util

    from bksdm.mini import classifier as C
    from bksdm.mini import metrics as M

    spec = importlib.util.spec_from_file_location("mpm", Path(__file__).parent.parent / "benchmarks" / "mini_pixel_measure.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    world = ShapesWorld(seed=0)
    samples = [world.sample(10**6 + i) for i in range(120)]
    real, prompts = [s[0] for s in samples], [s[1] for s in samples]
    net = C.load()
    ladder = dict(bench.LADDERS)
    noise = [M.background_noise(bench.degrade(real, ladder[n]), prompts)
             for n in ("clean", "noise sigma 2", "noise sigma 4", "noise sigma 8")]
    blur = [M.background_noise(bench.degrade(real, ladder[n]), prompts)
            for n in ("clean", "blur radius 0.5", "blur radius 1", "blur radius 2")]
    assert noise[0] == 0 and all(a < b for a, b in zip(noise, noise[1:])), noise
    assert all(a < b for a, b in zip(blur, blur[1:])), blur
    assert abs(noise[3] - 8) < 0.2  # RMS of added Gaussian noise is its sigma
    fid = [M.fidelity(bench.degrade(real, ladder[n]), prompts, net) for n in ("clean", "noise sigma 8")]
    assert abs(fid[1] - fid[0]) <= 0.02
    r = bench.measure(bench.degrade(real, ladder["noise sigma 4"]), prompts, net)  # as the registry reports it
    for k in ("fidelity", "mini_fid", "bg_noise"):  # every value sits inside its interval
        assert r[f"{k}_lo"] <= r[k] <= r[f"{k}_hi"], (k, r)


def test_background_mask_leaves_out_every_place_a_shape_may_be_drawn():
    from bksdm.mini.metrics import background_mask
    from bksdm.mini.world import BACKGROUND

    world = ShapesWorld(seed=7)
    for i in range(200):  # any jitter the world draws: the mask only ever sees background
        image, text, _ = world.sample(i)
        a = np.asarray(image)[background_mask(text)]
        assert (a == BACKGROUND).all()
    mask = background_mask("a large red circle at the top left")
    # a large shape's reach (half-extent 6.5 + jitter 1.5 + margin 1 around centre 8) ends at pixel 17
    assert mask[18:, :].all() and mask[:, 18:].all() and not mask[1:15, 1:15].any()


def test_bootstrap_interval_is_reproducible_and_narrows_with_more_images():
    from bksdm.mini.metrics import bootstrap_interval

    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.8, rng.random(2000) < 0.8
    a = bootstrap_interval(lambda i: small[i].mean(), 50, small.mean(), bounds=(0, 1))
    assert a == bootstrap_interval(lambda i: small[i].mean(), 50, small.mean(), bounds=(0, 1))
    b = bootstrap_interval(lambda i: large[i].mean(), 2000, large.mean(), bounds=(0, 1))
    assert a[0] < small.mean() < a[1] and b[0] < large.mean() < b[1]
    assert (b[1] - b[0]) < (a[1] - a[0]) / 4  # about 1 / sqrt(40) as wide
    # a binomial share: the bootstrap standard error is sqrt(p (1 - p) / n)
    se = np.sqrt(0.8 * 0.2 / 2000)
    assert abs((b[1] - b[0]) / (2 * 1.96) - se) < 0.15 * se


def test_mini_fid_of_few_images_takes_the_eigenvalue_trace_where_sqrtm_fails():
    """Fewer images than 129 make both covariances singular: where sqrtm leaves an imaginary part (which FID refuses,
    as pytorch-fid does), mini-FID is the same quantity through the eigenvalues; with enough images it is FID's
    formula to the bit."""
    import numpy as np

    from bksdm.errors import UserError
    from bksdm.evaluate.metrics import frechet_distance, stats
    from bksdm.mini.metrics import frechet_features, trace_sqrt_eig

    rng = np.random.default_rng(0)
    big1, big2 = rng.normal(size=(400, 128)), rng.normal(0.3, 1.2, size=(400, 128))
    assert frechet_features(big1, big2) == frechet_distance(*stats(big1, "x"), *stats(big2, "x"))
    r = np.random.default_rng(351)  # 4 images a side, one of the few draws where sqrtm's result is refused
    f1, f2 = r.normal(size=(4, 128)) * 10, r.normal(size=(4, 128))
    with pytest.raises(UserError, match="imaginary component"):
        frechet_distance(*stats(f1, "x"), *stats(f2, "x"))
    (m1, s1), (m2, s2) = stats(f1, "x"), stats(f2, "x")
    want = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_eig(s1, s2))
    assert frechet_features(f1, f2) == want and want > 0
    # the eigenvalue trace is the sqrtm trace where sqrtm is well defined
    import scipy.linalg

    a, b = np.cov(big1, rowvar=False), np.cov(big2, rowvar=False)
    assert trace_sqrt_eig(a, b) == pytest.approx(np.trace(scipy.linalg.sqrtm(a @ b)).real, rel=1e-9)
