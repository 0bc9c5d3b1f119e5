"""The mini-world recipes: `bksdm demo` (the whole method end to end in minutes) and `bksdm ablate` (Table 3).

Both drive the ordinary library and recipes — compress, DistillRecipe, generate, evaluate, profile — with the
shipped mini teacher and the procedural world as data; nothing here is special-cased for the mini world beyond
choosing its config (configs/distill_mini.yaml).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch



def prompt_file(path: Path, count: int, seed: int = 0) -> Path:
    """``count`` held-out prompts of the shapes world (seed ``seed``) written to ``path``."""
    from bksdm.mini.world import ShapesWorld

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ShapesWorld(seed=seed).prompts(count)) + "\n")
    return path


def _components(folder: Path):
    """The denoiser (U-Net, or SD3's transformer), VAE, scheduler and the family's text components of a pipeline
    folder."""
    from bksdm.models import generation_parts, load_components

    return load_components(folder, (*generation_parts(folder), "scheduler"))


def eval_parts(folder: Path) -> dict:
    """A pipeline folder's components for scoring: the denoiser and text encoders in float32, eval mode."""
    return _float(_components(folder))


def _float(parts: dict) -> dict:
    for n in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if n in parts:
            parts[n] = parts[n].float().eval()
    return parts


def denoiser(parts: dict):
    """The denoiser of loaded components (:func:`eval_parts`): the U-Net, or an SD3 pipeline's transformer."""
    return parts["unet"] if "unet" in parts else parts["transformer"]


def heldout(p: dict, teacher_model, count: int = 256) -> dict[str, float]:
    """Held-out MSE and MSE to the teacher's denoiser ``teacher_model`` of loaded components ``p`` (see
    :func:`_components`; SD3: the flow-matching error, :func:`bksdm.mini.metrics.heldout_mse`)."""
    from bksdm.arch.flow_families import family_for
    from bksdm.mini.metrics import heldout_mse

    model = denoiser(p)
    text = {n: p[n] for n in family_for(model.config, p).text_components}  # SD3: T5 only where the folder has it
    return heldout_mse(model, teacher_model, text, p["vae"], dict(p["scheduler"].config), count)


MINI_METRICS = ("fidelity", "mini_fid", "bg_noise")
"""The image measures every mini-world run is scored with (each with its 95% bootstrap interval)."""


def score(folder: Path, prompts: Path, out: Path, batch: int = 125, steps: int = 25,
          guidance: float | None = None, metrics: list[str] | tuple[str, ...] = (),
          metric_options: dict[str, Any] | None = None, **fast: Any) -> dict[str, float]:
    """Generate with the real `generate` (``guidance`` None: the pipeline's; ``fast``: its fast-path options,
    ``cache_interval`` ...) and evaluate with the real `evaluate` (:data:`MINI_METRICS`, with intervals, and any
    further registry ``metrics`` with their ``metric_options``), plus where images go wrong (``wrong_kind``, ...)
    and the generation time (``generate_seconds``)."""
    from bksdm.evaluate.metrics import opened
    from bksdm.generate import generate, read_prompts
    from bksdm.mini.metrics import fidelity_breakdown
    from bksdm.recipes.evaluate import evaluate

    made = generate(str(folder), prompts, out, steps=steps, guidance=guidance, batch_size=batch, save_size=None,
                    lossless=True, **fast)  # 32 px: no JPEG
    chosen = list(MINI_METRICS) + [m for m in metrics if m not in MINI_METRICS]
    res = {**evaluate(out / "images", prompts, chosen, **(metric_options or {})), "generate_seconds": made["seconds"]}
    items = read_prompts(prompts)
    images = list(opened([out / "images" / (Path(n).stem + ".png") for n, _ in items]))
    wrong = fidelity_breakdown(images, [p for _, p in items])
    return {**res, **{f"wrong_{k}": v for k, v in wrong.items() if k != "fidelity"}}


def distill_run(teacher: Path, student: str | Path, out: Path, steps: int, seed: int = 1234, **overrides: Any):
    from bksdm.distill.config import load_config
    from bksdm.generate import default_dtype
    from bksdm.recipes.distill import DistillRecipe

    precision = "bf16" if torch.cuda.is_available() or default_dtype("cpu") == torch.bfloat16 else "no"
    overrides = {"checkpoint_every": max(steps, 1), **overrides}
    cfg = load_config("mini", teacher=str(teacher), student=str(student), out=str(out), max_steps=steps, seed=seed,
                      mixed_precision=precision, **overrides)
    return DistillRecipe(cfg).setup().train()


PAPER_METHOD = {"lambda_cfg": 0.0, "timestep_bias": "none"}
"""The demo recipe's departure from the paper's method, undone (``--paper-recipe``): what remains of
``configs/distill_mini.yaml`` are only the changes a few-minute CPU run needs (batch, learning rate, bf16)."""


DEMO_STUDENT = "measured-small"
"""The demo's student (:data:`bksdm.mini.teacher.MEASURED_SMALL`): BK-Small's size with the blocks bksdm's
measurement chooses; ``--paper-recipe`` distils the paper's BK-Small instead."""


def demo(out: str | Path = "bksdm-demo", steps: int = 750, images: int = 300, student: str | None = None,
         teacher: str | None = None, gen_steps: int = 25, curve_images: int = 100, paper_recipe: bool = False,
         lcm: bool = False, lcm_steps: int = 300, metrics: list[str] | tuple[str, ...] = (),
         metric_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress the mini teacher, distil the student, generate, evaluate, profile, score every checkpoint, and write
    ``out/report.md`` and ``out/report.html`` (optionally LCM-distil the student too: ``lcm``; further registry
    ``metrics``, e.g. ``kid`` or ``cmmd`` with their ``metric_options``, become extra columns of the first table).
    ``student``: a built-in or mini spec name or a spec file; default :data:`DEMO_STUDENT`, or ``bk-small`` with
    ``paper_recipe`` (the paper's student and loss)."""
    from bksdm.compress import compress
    from bksdm.mini.teacher import teacher_path
    from bksdm.profile import Components, profile_components
    from bksdm.recipes import mini_report as R
    from bksdm.evaluate.registry import check_needs, resolve
    from bksdm.recipes.evaluate import progress

    further = [m for m in resolve(list(metrics)) if m.name not in MINI_METRICS]  # unknown names fail before work
    check_needs(further, metric_options or {})  # so does a missing reference
    extra = [m.name for m in further]
    student = student or ("bk-small" if paper_recipe else DEMO_STUDENT)
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = teacher_path(Path(teacher) if teacher else None)
    init_dir = out / "student-init"
    shutil.rmtree(init_dir, ignore_errors=True)
    compress(str(teacher_dir), student_source(out, student), init_dir)
    prompts = prompt_file(out / "prompts.txt", images)
    curve_prompts = out / "prompts-curve.txt"
    curve_prompts.write_text("\n".join(prompts.read_text().splitlines()[:curve_images]) + "\n")
    grid_prompts = prompts.read_text().splitlines()[:8]
    run = out / "distill"
    shutil.rmtree(run, ignore_errors=True)
    every = max(steps // 4, 1)
    distill_run(teacher_dir, init_dir, run, steps, sample_prompts=grid_prompts, sample_steps=gen_steps,
                checkpoint_every=every, checkpoints_total_limit=4, **(PAPER_METHOD if paper_recipe else {}))
    t_distill = time.time() - t_start
    final = run / "final"

    t_parts = eval_parts(teacher_dir)
    rows = []
    for name, folder in (("teacher", teacher_dir), (f"{student} (teacher init, no KD)", init_dir), (f"{student} (distilled)", final)):
        rec: dict[str, Any] = {"model": name}
        parts = t_parts if folder == teacher_dir else eval_parts(folder)
        rec.update(heldout(parts, t_parts["unet"]))
        if folder != init_dir:
            rec.update(score(folder, prompts, out / "images" / folder.name, steps=gen_steps, metrics=extra,
                             metric_options=metric_options))
            prof = profile_components(Components(name, parts["unet"], parts["text_encoder"], parts["vae"]),
                                      latency=True, dtypes=("fp32",), runs=5, steps=gen_steps).record(gen_steps)
            rec.update({"unet_params": prof["unet_params"], "unet_mmacs": round(prof["unet_gmacs"] * 1e3, 1),
                        "unet_ms": round(prof["latency_s"]["fp32"]["unet"] * 1e3, 2)})
        rows.append(rec)
    rows[2]["latency_ratio"] = round(rows[2]["unet_ms"] / rows[0]["unet_ms"], 2)
    rows[0]["latency_ratio"] = 1.0
    curve = progress(run, curve_prompts, list(MINI_METRICS), out=out / "progress",
                     gen_kwargs={"steps": gen_steps, "batch_size": 125, "save_size": None, "lossless": True})
    shutil.copy(out / "progress" / "progress.csv", out / "fidelity_vs_step.csv")
    R.curve_plot(curve, out / "fidelity_vs_step.png")
    R.loss_plot(run / "logs" / "losses.csv", out / "losses.png")
    shutil.copy(sorted((run / "samples").glob("step-*.png"), key=lambda p: int(p.stem[5:]))[-1], out / "samples.png")
    R.zoomed_pair(out / "images" / teacher_dir.name / "images", out / "images" / final.name / "images", prompts,
                  out / "zoom.png")
    lcm_rows = None
    if lcm:
        from bksdm.recipes.mini_lcm import lcm_curve

        lcm_rows = lcm_curve(final, teacher_dir, out / "lcm", curve_prompts, lcm_steps, pndm_steps=gen_steps)
    minutes = (time.time() - t_start) / 60
    recipe = json.loads((run / "config.json").read_text())
    R.write_demo_report(out, rows, curve, grid_prompts, steps, images, curve_images, minutes, t_distill / 60, recipe,
                        paper_recipe, lcm_rows, [k for m in resolve(extra) for k in m.keys[:1]])
    (out / "metrics.json").write_text(json.dumps({"rows": rows, "curve": curve, "lcm": lcm_rows, "minutes": minutes,
                                                  "distill_minutes": t_distill / 60}, indent=1))
    return {"rows": rows, "curve": curve, "lcm": lcm_rows, "minutes": minutes}


VARIANTS: dict[str, dict[str, Any]] = {  # appendix Table 3, rows N1-N4: the paper's loss (no guided KD)
    "random init": {"init": "random", "lambda_out": 0.0, "lambda_feat": 0.0, "lambda_cfg": 0.0},
    "teacher init": {"lambda_out": 0.0, "lambda_feat": 0.0, "lambda_cfg": 0.0},
    "+ output KD": {"lambda_feat": 0.0, "lambda_cfg": 0.0},
    "+ output & feature KD": {"lambda_cfg": 0.0},
}
GUIDED_VARIANT = {"+ guided output KD (demo recipe)": {"lambda_cfg": 1.0}}
"""An optional fifth row (``bksdm ablate --guided``): the demo's recipe, the paper's loss plus guided output KD."""
_METRICS = ("heldout_mse", "teacher_mse", "fidelity", "mini_fid", "bg_noise")
ABLATION_BASE = {"batch_size": 32, "ema": False, "timestep_bias": "none"}
"""The mini config as the recorded ablations ran it (docs/mini-world.md: batch 32, no EMA, uniform timesteps),
kept when the demo's recipe moved on (2026-12-02), so `--steps 200` still means what those tables mean. Every
family's runs start from it: for the flow-matching SD3 teacher ``timestep_bias none`` is also the only value that
applies (a flow objective draws sigma from the logit-normal density the teacher learnt with, the config's defaults,
and refuses a timestep bias), and every variant sets the mini config's guided KD (``lambda_cfg``) to 0."""


SDXL_VARIANTS: dict[str, dict[str, Any]] = {  # KOALA's question: which features to distil (all teacher-initialised)
    "+ output KD": {"lambda_feat": 0.0, "lambda_cfg": 0.0},
    "+ block feature KD": {"lambda_cfg": 0.0, "feature_points": "blocks"},
    "+ self-attention feature KD": {"lambda_cfg": 0.0, "feature_points": "self_attn"},
}
"""``bksdm ablate --family sdxl``: BK-SDM's feature points (every kept block's output) against KOALA's (every kept
self-attention layer's output), with output KD alone as the reference; the paper's loss (no guided KD)."""
SD3_VARIANTS: dict[str, dict[str, Any]] = {  # which blocks matter: each student with and without feature KD
    "+ output KD": {"lambda_feat": 0.0, "lambda_cfg": 0.0},
    "+ output & feature KD": {"lambda_cfg": 0.0},
}
"""``bksdm ablate --family sd3``: the paper's loss (no guided KD) on every SD3 student, with output KD alone and with
feature KD added at the derivation's feature points (each kept block's image-stream output against the output of
the last teacher block it stands in for); all teacher-initialised."""
FAMILY_VARIANTS = {"sdxl": SDXL_VARIANTS, "sd3": SD3_VARIANTS}
"""The variants of each family's ablation but SD's (:data:`VARIANTS`, with ``--guided``'s row)."""
FAMILY_STUDENTS = {"sd": ("bk-small", "bk-tiny"), "sdxl": ("koala-mini",),
                   "sd3": ("sd3-first-half", "sd3-middle", "sd3-last-half", "sd3-alternate")}
QUESTIONS = {"sd": "appendix Table 3 in miniature", "sdxl": "KOALA's feature points on the SDXL-layout teacher",
             "sd3": "which blocks matter: half of the SD3-layout teacher's 8 joint blocks removed in four places"}
"""What each family's ablation asks (the title of its ``ablation.md``)."""


def student_source(out: Path, student: str) -> str:
    """A student name or spec file for ``compress``: the mini specs (:data:`bksdm.mini.teacher.MINI_SPECS`) are
    written to ``out/specs/NAME.json`` first (a record of what was compressed)."""
    from bksdm.mini.teacher import MINI_SPECS

    if student not in MINI_SPECS:
        return student
    path = out / "specs" / f"{student}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(MINI_SPECS[student].to_dict(), indent=1))
    return str(path)


def ablate(out: str | Path = "bksdm-ablation", steps: int = 50, seeds: tuple[int, ...] = (0, 1, 2),
           students: tuple[str, ...] | None = None, images: int = 100, teacher: str | None = None,
           gen_steps: int = 25, guided: bool = False, family: str = "sd") -> list[dict[str, Any]]:
    """Every variant x student x seed at a fixed step budget; writes ``ablation.json`` and ``ablation.md``.

    ``family="sd"``: appendix Table 3's rows (:data:`VARIANTS`) on the shipped SD-layout teacher; ``"sdxl"``: the
    feature points (:data:`SDXL_VARIANTS`) on the shipped SDXL-layout teacher with a KOALA-style student; ``"sd3"``:
    which blocks matter, four students each without half of the SD3-layout teacher's joint blocks
    (:data:`bksdm.mini.teacher.SD3_SPECS`), with and without feature KD (:data:`SD3_VARIANTS`)."""
    from bksdm.compress import compress
    from bksdm.config import check_value
    from bksdm.errors import UserError
    from bksdm.mini.teacher import teacher_path

    check_value("family", family)  # the CLI checked it already; API callers get the same message
    if guided and family != "sd":
        raise UserError(f"--guided adds a row to the SD ablation (Table 3), not to --family {family}'s "
                        f"({QUESTIONS[family]})")
    students = tuple(students) if students else FAMILY_STUDENTS[family]
    variants = FAMILY_VARIANTS.get(family) or {**VARIANTS, **(GUIDED_VARIANT if guided else {})}
    teacher_dir = teacher_path(Path(teacher) if teacher else None, family)
    out = Path(out)
    done_file = out / "ablation.json"
    rows: list[dict[str, Any]] = json.loads(done_file.read_text()) if done_file.is_file() else []
    other = {r.get("family", "sd") for r in rows} - {family}
    if other:
        raise UserError(f"{out} holds an ablation of family {other.pop()}; choose another --out for --family {family}")
    out.mkdir(parents=True, exist_ok=True)
    t_model = denoiser(eval_parts(teacher_dir))
    prompts = prompt_file(out / "prompts.txt", images)
    done = {(r["student"], r["variant"], r["seed"]) for r in rows}
    for student in students:
        init = out / "init" / Path(student).stem
        if not (init / "model_index.json").is_file():
            shutil.rmtree(init, ignore_errors=True)
            compress(str(teacher_dir), student_source(out, student), init)
        for variant, overrides in variants.items():
            for seed in seeds:
                if (student, variant, seed) in done:
                    continue  # resumable: finished runs are kept
                run = out / "runs" / f"{Path(student).stem}-{variant.replace(' ', '_').replace('&', 'and')}-{seed}"
                shutil.rmtree(run, ignore_errors=True)
                t0 = time.time()
                distill_run(teacher_dir, init, run, steps, seed=seed, **{**ABLATION_BASE, **overrides})
                rec = {"family": family, "student": student, "variant": variant, "seed": seed, "steps": steps}
                rec.update(heldout(eval_parts(run / "final"), t_model))
                rec.update(score(run / "final", prompts, run / "eval", steps=gen_steps))
                rec["seconds"] = round(time.time() - t0, 1)
                rows.append(rec)
                done_file.write_text(json.dumps(rows, indent=1))
                shutil.rmtree(run / "checkpoints", ignore_errors=True)
    (out / "ablation.md").write_text(ablation_markdown(rows, steps))
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (max - min over seeds) of each metric per (student, variant)."""
    import numpy as np

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["student"], r["variant"]), []).append(r)
    out = []
    for (student, variant), rs in groups.items():
        rec: dict[str, Any] = {"student": student, "variant": variant, "seeds": len(rs)}
        for m in _METRICS:
            if not all(m in r for r in rs):  # rows scored before a measure existed (bg_noise) lack it
                continue
            vals = np.array([r[m] for r in rs])
            rec[m] = float(vals.mean())
            rec[f"{m}_spread"] = float(vals.max() - vals.min())
        out.append(rec)
    return out


HIGHER_IS_BETTER = {"fidelity"}


def ordering_breaks(summary: list[dict[str, Any]], student: str, metric: str = "heldout_mse") -> list[tuple[str, str]]:
    """The consecutive variant pairs where the added ingredient does not improve ``metric`` (empty: the paper's
    ordering holds). Lower is better except for prompt fidelity."""
    names = [v for v in {**VARIANTS, **GUIDED_VARIANT} if any(s["student"] == student and s["variant"] == v for s in summary)]
    vals = [next(s[metric] for s in summary if s["student"] == student and s["variant"] == v) for v in names]
    sign = -1 if metric in HIGHER_IS_BETTER else 1
    return [(names[i], names[i + 1]) for i in range(len(vals) - 1) if not sign * vals[i] > sign * vals[i + 1]]


def ordering_holds(summary: list[dict[str, Any]], student: str, metric: str = "heldout_mse") -> bool:
    """Does the paper's ordering (each added ingredient improves ``metric``) hold for ``student``?"""
    return not ordering_breaks(summary, student, metric)


def compare(summary: list[dict[str, Any]], student: str, metric: str, a: str, b: str) -> dict[str, Any]:
    """Variant ``a`` against ``b`` on ``metric``: the gain of ``a`` (positive: ``a`` is better; lower is better
    except for prompt fidelity) and whether it exceeds both variants' seed spreads (max - min over seeds)."""
    sa, sb = (next(s for s in summary if s["student"] == student and s["variant"] == v) for v in (a, b))
    sign = 1 if metric in HIGHER_IS_BETTER else -1
    gain = sign * (sa[metric] - sb[metric])
    return {"gain": gain, "separated": abs(gain) > max(sa[metric + "_spread"], sb[metric + "_spread"])}


def _compare_line(summary: list[dict[str, Any]], student: str, metric: str, a: str, b: str) -> str:
    c = compare(summary, student, metric, a, b)
    head = f"- {student}, {metric}: {a} vs {b}:"
    if not c["separated"]:
        return f"{head} **no separation** (difference {abs(c['gain']):.4g}, inside the seed spread)."
    return f"{head} **{a if c['gain'] > 0 else b}** is better by {abs(c['gain']):.4g} (beyond the seed spread)."


def _fmt(m: str) -> str:
    return "{:.1f}" if m == "mini_fid" else "{:.2f}" if m == "bg_noise" else "{:.4f}"


def _cell(s: dict[str, Any], m: str) -> str:
    if m not in s:
        return "-"
    fmt = _fmt(m)
    return f"{fmt.format(s[m])} ({fmt.format(s[m + '_spread'])})"


def student_ranking(summary: list[dict[str, Any]], variant: str, metric: str) -> str:
    """The students of ``variant`` best first on ``metric`` (lower is better except for prompt fidelity) with their
    means; ``>`` between two whose difference exceeds both seed spreads, ``~`` where it lies inside them."""
    rows = sorted((s for s in summary if s["variant"] == variant and metric in s), key=lambda s: s[metric],
                  reverse=metric in HIGHER_IS_BETTER)
    text = ""
    for i, s in enumerate(rows):
        if i:
            a = rows[i - 1]
            text += " > " if abs(a[metric] - s[metric]) > max(a[metric + "_spread"], s[metric + "_spread"]) else " ~ "
        text += f"{s['student']} ({_fmt(metric).format(s[metric])})"
    return text


def ablation_markdown(rows: list[dict[str, Any]], steps: int) -> str:
    summary = summarise(rows)
    minutes = sum(r.get("seconds", 0) for r in rows) / 60
    family = next((r.get("family", "sd") for r in rows), "sd")
    lines = [f"# Ablation in the mini world ({QUESTIONS[family]}): {steps} distillation steps", "",
             f"Mean over seeds, with the spread (max - min) in brackets. {len(rows)} runs, {minutes:.1f} min of "
             "distillation and scoring in all.", "",
             "| student | variant | seeds | held-out MSE | MSE to teacher | prompt fidelity | mini-FID | background noise |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = [_cell(s, m) for m in _METRICS]
        lines.append(f"| {s['student']} | {s['variant']} | {s['seeds']} | " + " | ".join(cells) + " |")
    metrics = [m for m in _METRICS if all(m in s for s in summary)]
    students = list(dict.fromkeys(s["student"] for s in summary))
    if family == "sd3":
        out_kd, feat = SD3_VARIANTS
        lines += ["", "Which blocks matter: every student keeps four of the teacher's eight joint blocks, always block 7 "
                  "(an SD3 student's last block must be the teacher's last). Per variant and measure the students "
                  "are listed best first with their means: `>` where the difference exceeds both students' seed "
                  "spreads, `~` where it lies inside them (no ranking). Then what feature KD adds to each student.", ""]
        variants = [v for v in SD3_VARIANTS if any(s["variant"] == v for s in summary)]
        for variant in variants:
            for metric in metrics:
                lines.append(f"- {variant}, {metric}: {student_ranking(summary, variant, metric)}.")
        for student in students:
            if {out_kd, feat} <= {s["variant"] for s in summary if s["student"] == student}:
                lines += [_compare_line(summary, student, metric, feat, out_kd) for metric in metrics]
        return "\n".join(lines) + "\n"
    if family == "sdxl":
        out_kd, blocks, attn = SDXL_VARIANTS
        lines += ["", "KOALA's finding: distilling the self-attention layers' outputs beats distilling the blocks' "
                  "outputs. A difference counts only when it exceeds both rows' seed spreads.", ""]
        for student in students:
            for metric in metrics:
                lines.append(_compare_line(summary, student, metric, attn, blocks))
            for metric in metrics:
                for variant in (attn, blocks):
                    lines.append(_compare_line(summary, student, metric, variant, out_kd))
        return "\n".join(lines) + "\n"
    lines += ["", "The paper's ordering: random init, teacher init, + output KD, + output & feature KD, each better than "
              "the one before (lower errors and mini-FID, higher fidelity). A step counts as a gain only when it "
              "exceeds both rows' seed spreads (max - min over seeds); a difference inside them is no ranking.", ""]
    for student in students:
        for metric in metrics:
            lines.append(f"- {student}, {metric}: {ordering_verdict(summary, student, metric)}.")
    return "\n".join(lines) + "\n"


def ordering_verdict(summary: list[dict[str, Any]], student: str, metric: str) -> str:
    """The paper's ordering on ``metric``, read with the seed spreads: **holds** when every added ingredient gains
    beyond both rows' spreads; **holds in the mean only** when no step loses but some gain lies inside the spreads
    (named); **does not hold** when a step gains nothing in the mean (named, with the steps inside the spreads)."""
    breaks = ordering_breaks(summary, student, metric)
    names = [v for v in {**VARIANTS, **GUIDED_VARIANT} if any(s["student"] == student and s["variant"] == v for s in summary)]
    steps = list(zip(names, names[1:]))
    noisy = [(a, b) for a, b in steps if (a, b) not in breaks and not compare(summary, student, metric, b, a)["separated"]]
    inside = "; ".join(f"{a} to {b}" for a, b in noisy)
    if breaks:
        verdict = "**does not hold**: no gain from " + "; ".join(f"{a} to {b}" for a, b in breaks)
        return verdict + (f" (and inside the seed spread: {inside})" if noisy else "")
    return f"**holds in the mean only**: inside the seed spread from {inside}" if noisy else "**holds**"
