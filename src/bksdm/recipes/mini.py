"""The mini-world demo (`bksdm demo`: the whole method end to end in minutes) and the scoring all mini runs share.

The demo drives the ordinary library and recipes — compress, DistillRecipe, generate, evaluate, profile — with the
shipped mini teacher and the procedural world as data; nothing here is special-cased for the mini world beyond
choosing its config (configs/distill_mini.yaml). The ablations (`bksdm ablate`) live in
:mod:`bksdm.recipes.mini_ablate` and :mod:`bksdm.recipes.mini_auto`.
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
