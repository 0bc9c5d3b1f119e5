"""The mini-world recipes: `bksdm demo` (the whole method end to end in minutes) and `bksdm ablate` (Table 3).

Both drive the ordinary library and recipes — compress, DistillRecipe, generate, evaluate, profile — with the
shipped mini teacher and the procedural world as data; nothing here is special-cased for the mini world beyond
choosing its config (configs/distill_mini.yaml).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bksdm.report import markdown_table


def _prompt_file(path: Path, count: int, seed: int = 0) -> Path:
    from bksdm.mini.world import ShapesWorld

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ShapesWorld(seed=seed).prompts(count)) + "\n")
    return path


def _components(folder: Path):
    from bksdm.models import load_components

    return load_components(folder)


def _float(parts: dict) -> dict:
    for n in ("unet", "text_encoder"):
        parts[n] = parts[n].float().eval()
    return parts


def heldout(p: dict, teacher_unet, count: int = 256) -> dict[str, float]:
    """Held-out MSE and MSE to the teacher of loaded components ``p`` (see :func:`_components`)."""
    from bksdm.mini.metrics import heldout_mse

    return heldout_mse(p["unet"], teacher_unet, p["tokenizer"], p["text_encoder"], p["vae"], dict(p["scheduler"].config), count)


def score(folder: Path, prompts: Path, out: Path, batch: int = 125, steps: int = 25) -> dict[str, float]:
    """Generate with the real `generate` and evaluate with the real `evaluate` (fidelity, mini-FID)."""
    from bksdm.generate import generate
    from bksdm.recipes.evaluate import evaluate

    generate(str(folder), prompts, out, steps=steps, batch_size=batch, save_size=None, lossless=True)  # 32 px: no JPEG
    return evaluate(out / "images", prompts, ["fidelity", "mini-fid"])


def distill_run(teacher: Path, student: str | Path, out: Path, steps: int, seed: int = 1234, **overrides: Any):
    from bksdm.distill.config import load_config
    from bksdm.generate import default_dtype
    from bksdm.recipes.distill import DistillRecipe

    precision = "bf16" if torch.cuda.is_available() or default_dtype("cpu") == torch.bfloat16 else "no"
    cfg = load_config("mini", teacher=str(teacher), student=str(student), out=str(out), max_steps=steps, seed=seed,
                      mixed_precision=precision, checkpoint_every=max(steps, 1), **overrides)
    return DistillRecipe(cfg).setup().train()


def _loss_plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in ("loss", "task", "out_kd", "feat_kd"):
        ax.plot(steps, [float(r[k]) for r in rows], label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def demo(out: str | Path = "bksdm-demo", steps: int = 400, images: int = 1000, student: str = "bk-small",
         teacher: str | None = None, gen_steps: int = 25) -> dict[str, Any]:
    """Compress the mini teacher, distil the student, generate, evaluate, profile, and write ``out/report.md``."""
    from bksdm.compress import compress
    from bksdm.mini.teacher import teacher_path
    from bksdm.profile import Components, profile_components

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = teacher_path(Path(teacher) if teacher else None)
    init_dir = out / "student-init"
    shutil.rmtree(init_dir, ignore_errors=True)
    compress(str(teacher_dir), student, init_dir)
    prompts = _prompt_file(out / "prompts.txt", images)
    grid_prompts = prompts.read_text().splitlines()[:8]
    run = out / "distill"
    shutil.rmtree(run, ignore_errors=True)
    distill_run(teacher_dir, init_dir, run, steps, sample_prompts=grid_prompts, sample_steps=gen_steps)
    final = run / "final"

    t_parts = _float(_components(teacher_dir))
    rows = []
    for name, folder in (("teacher", teacher_dir), (f"{student} (teacher init, no KD)", init_dir), (f"{student} (distilled)", final)):
        rec: dict[str, Any] = {"model": name}
        parts = t_parts if folder == teacher_dir else _float(_components(folder))
        rec.update(heldout(parts, t_parts["unet"]))
        if folder != init_dir:
            rec.update(score(folder, prompts, out / "images" / folder.name, steps=gen_steps))
            prof = profile_components(Components(name, parts["unet"], parts["text_encoder"], parts["vae"]),
                                      latency=True, dtypes=("fp32",), runs=5, steps=gen_steps).record(gen_steps)
            rec.update({"unet_params": prof["unet_params"], "unet_mmacs": round(prof["unet_gmacs"] * 1e3, 1),
                        "unet_ms": round(prof["latency_s"]["fp32"]["unet"] * 1e3, 2)})
        rows.append(rec)
    _loss_plot(run / "logs" / "losses.csv", out / "losses.png")
    shutil.copy(sorted((run / "samples").glob("step-*.png"))[-1], out / "samples.png")
    minutes = (time.time() - t_start) / 60
    _write_demo_report(out, rows, grid_prompts, steps, images, minutes)
    (out / "metrics.json").write_text(json.dumps({"rows": rows, "minutes": minutes}, indent=1))
    return {"rows": rows, "minutes": minutes}


def _write_demo_report(out: Path, rows: list[dict], grid_prompts: list[str], steps: int, images: int, minutes: float) -> None:
    cols = ["model", "unet_params", "unet_mmacs", "unet_ms", "fidelity", "mini_fid", "heldout_mse", "teacher_mse"]
    text = [
        "# bksdm demo: BK-SDM in the mini world", "",
        f"The shipped mini teacher (SD-v1 block layout) was compressed to a student, distilled for {steps} steps with the "
        f"real recipe, and both generated {images} images for held-out prompts with the real `generate` "
        f"(PNDM, guidance 7.5). Whole run: {minutes:.1f} min.", "",
        markdown_table(rows, cols), "",
        "- fidelity: share of images whose every quadrant the attribute classifier reads as prompted (kind, colour, size)",
        "- mini_fid: Frechet distance in the classifier's feature space to real world pictures of the same prompts",
        "- heldout_mse / teacher_mse: error on the training target (epsilon or v, the teacher's) and distance to the teacher on 256 fixed held-out (image, t, noise)",
        "- unet_ms: one U-Net call at batch 2, fp32, median of 5 after a warm-up", "",
        "## Teacher (top) vs distilled student (bottom), same seeds", "", "![samples](samples.png)", "",
        *[f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)], "",
        "## Loss terms during distillation", "", "![losses](losses.png)", "",
    ]
    (out / "report.md").write_text("\n".join(text))


VARIANTS: dict[str, dict[str, Any]] = {  # appendix Table 3, rows N1-N4
    "random init": {"init": "random", "lambda_out": 0.0, "lambda_feat": 0.0},
    "teacher init": {"lambda_out": 0.0, "lambda_feat": 0.0},
    "+ output KD": {"lambda_feat": 0.0},
    "+ output & feature KD": {},
}
_METRICS = ("heldout_mse", "teacher_mse", "fidelity", "mini_fid")


def ablate(out: str | Path = "bksdm-ablation", steps: int = 50, seeds: tuple[int, ...] = (0, 1),
           students: tuple[str, ...] = ("bk-small", "bk-tiny"), images: int = 500, teacher: str | None = None,
           gen_steps: int = 25) -> list[dict[str, Any]]:
    """Every variant x student x seed at a fixed step budget; writes ``ablation.json`` and ``ablation.md``."""
    from bksdm.compress import compress
    from bksdm.mini.teacher import teacher_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = teacher_path(Path(teacher) if teacher else None)
    t_unet = _float(_components(teacher_dir))["unet"]
    prompts = _prompt_file(out / "prompts.txt", images)
    done_file = out / "ablation.json"
    rows: list[dict[str, Any]] = json.loads(done_file.read_text()) if done_file.is_file() else []
    done = {(r["student"], r["variant"], r["seed"]) for r in rows}
    for student in students:
        init = out / "init" / student
        if not (init / "model_index.json").is_file():
            shutil.rmtree(init, ignore_errors=True)
            compress(str(teacher_dir), student, init)
        for variant, overrides in VARIANTS.items():
            for seed in seeds:
                if (student, variant, seed) in done:
                    continue  # resumable: finished runs are kept
                run = out / "runs" / f"{student}-{variant.replace(' ', '_').replace('&', 'and')}-{seed}"
                shutil.rmtree(run, ignore_errors=True)
                distill_run(teacher_dir, init, run, steps, seed=seed, **overrides)
                rec = {"student": student, "variant": variant, "seed": seed, "steps": steps}
                rec.update(heldout(_float(_components(run / "final")), t_unet))
                rec.update(score(run / "final", prompts, run / "eval", steps=gen_steps))
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
            vals = np.array([r[m] for r in rs])
            rec[m] = float(vals.mean())
            rec[f"{m}_spread"] = float(vals.max() - vals.min())
        out.append(rec)
    return out


HIGHER_IS_BETTER = {"fidelity"}


def ordering_breaks(summary: list[dict[str, Any]], student: str, metric: str = "heldout_mse") -> list[tuple[str, str]]:
    """The consecutive variant pairs where the added ingredient does not improve ``metric`` (empty: the paper's
    ordering holds). Lower is better except for prompt fidelity."""
    vals = [next(s[metric] for s in summary if s["student"] == student and s["variant"] == v) for v in VARIANTS]
    sign = -1 if metric in HIGHER_IS_BETTER else 1
    names = list(VARIANTS)
    return [(names[i], names[i + 1]) for i in range(len(vals) - 1) if not sign * vals[i] > sign * vals[i + 1]]


def ordering_holds(summary: list[dict[str, Any]], student: str, metric: str = "heldout_mse") -> bool:
    """Does the paper's ordering (each added ingredient improves ``metric``) hold for ``student``?"""
    return not ordering_breaks(summary, student, metric)


def ablation_markdown(rows: list[dict[str, Any]], steps: int) -> str:
    summary = summarise(rows)
    lines = [f"# Ablation in the mini world (appendix Table 3 in miniature): {steps} distillation steps", "",
             "Mean over seeds, with the spread (max - min) in brackets.", "",
             "| student | variant | seeds | held-out MSE | MSE to teacher | prompt fidelity | mini-FID |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        cells = [f"{s[m]:.4f} ({s[m + '_spread']:.4f})" if m != "mini_fid" else f"{s[m]:.1f} ({s[m + '_spread']:.1f})" for m in _METRICS]
        lines.append(f"| {s['student']} | {s['variant']} | {s['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "The paper's ordering: random init, teacher init, + output KD, + output & feature KD, each better than "
              "the one before (lower errors and mini-FID, higher fidelity).", ""]
    for student in dict.fromkeys(s["student"] for s in summary):
        for metric in _METRICS:
            breaks = ordering_breaks(summary, student, metric)
            verdict = "**holds**" if not breaks else "**does not hold**: no gain from " + "; ".join(f"{a} to {b}" for a, b in breaks)
            lines.append(f"- {student}, {metric}: {verdict}.")
    return "\n".join(lines) + "\n"
