"""The mini-world ablations (`bksdm ablate`), each family's question at a fixed step budget over seeds.

- ``--family sd``: appendix Table 3 in miniature — random init, teacher init, + output KD, + output & feature KD.
- ``--family sdxl``: KOALA's feature points on the SDXL-layout teacher — block outputs against self-attention outputs.
- ``--family sd3``: which blocks matter — half of the SD3-layout teacher's 8 joint blocks removed in four places.

Every run goes through the demo's distillation and scoring (:mod:`bksdm.recipes.mini`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from bksdm.recipes.mini import denoiser, distill_run, eval_parts, heldout, prompt_file, score, student_source


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
