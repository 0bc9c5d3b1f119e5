"""`bksdm ablate --auto`: the measured block choice against the paper's hand choice, in the mini world.

The shipped SD-layout teacher is ranked (`bksdm rank` on the world's own pictures); for each hand-made student
(BK-Small, BK-Tiny) `compress --student auto` chooses a student at the hand student's U-Net parameter count; both
are distilled with the same recipe (the ablation's: paper loss with output and feature KD,
:data:`bksdm.recipes.mini_ablate.ABLATION_BASE`) for the same steps and seeds, and scored by held-out MSE, prompt fidelity,
mini-FID and background noise. With ``correlation_steps``, a student lacking each single unit is distilled too (one
seed), and the one-shot ranking is compared with the distilled students' error to the teacher (Spearman's rho).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from bksdm.recipes.mini import distill_run, eval_parts, heldout, prompt_file, score, student_source
from bksdm.recipes.mini_ablate import ABLATION_BASE, FAMILY_STUDENTS, VARIANTS, summarise

RECIPE = {**ABLATION_BASE, **VARIANTS["+ output & feature KD"]}
HAND, MEASURED = "hand (paper)", "measured (auto)"


def ablate_auto(out: str | Path = "bksdm-auto", steps: int = 200, seeds: tuple[int, ...] = (0, 1, 2),
                students: tuple[str, ...] | None = None, images: int = 100, teacher: str | None = None,
                gen_steps: int = 25, samples: int = 256, correlation_steps: int = 0, family: str = "sd") -> dict[str, Any]:
    """Every (student, choice, seed) run, resumable (``OUT/auto.json``); the report in ``OUT/auto.md``. ``family``:
    the shipped teacher of that layout (``sdxl``: koala-mini against the measured choice at its size)."""
    from bksdm.compress import compress
    from bksdm.errors import UserError
    from bksdm.mini.teacher import teacher_path
    from bksdm.rank import rank

    teacher_dir = teacher_path(Path(teacher) if teacher else None, family)
    students = tuple(students) if students else FAMILY_STUDENTS[family]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranking = out / "rank.json"
    if not ranking.is_file():
        rec = rank(str(teacher_dir), f"mini-world:{samples}", samples=samples, batch=32, seed=0, device="cpu")
        ranking.write_text(json.dumps(rec, indent=1))
    done_file = out / "auto.json"
    settings = {"steps": steps, "samples": samples, "images": images, "gen_steps": gen_steps, "family": family}
    state = json.loads(done_file.read_text()) if done_file.is_file() else {"settings": settings, "runs": [], "units": []}
    if state.get("settings", settings) != settings:  # resuming another comparison would mix its runs into this one
        raise UserError(f"{out} holds a comparison run with {state['settings']}; choose another --out for {settings}")
    if correlation_steps and {u["steps"] for u in state["units"]} - {correlation_steps}:
        raise UserError(f"{out} holds single-unit runs of another --correlation-steps; choose another --out")
    t_unet = eval_parts(teacher_dir)["unet"]
    prompts = prompt_file(out / "prompts.txt", images)
    inits = {}
    for student in students:
        hand = out / "init" / student
        if not (hand / "model_index.json").is_file():
            shutil.rmtree(hand, ignore_errors=True)
            compress(str(teacher_dir), student_source(out, student), hand)
        count = json.loads((hand / "bksdm.json").read_text())["params"]["student_unet"]
        auto = out / "init" / f"auto-{student}"
        if not (auto / "model_index.json").is_file():
            shutil.rmtree(auto, ignore_errors=True)
            compress(str(teacher_dir), "auto", auto, budget=f"params={count}", ranking=str(ranking))
        inits[(student, HAND)], inits[(student, MEASURED)] = hand, auto
    done = {(r["student"], r["variant"], r["seed"]) for r in state["runs"]}
    for (student, choice), init in inits.items():
        for seed in seeds:
            if (student, choice, seed) in done:
                continue
            run = out / "runs" / f"{student}-{'auto' if choice == MEASURED else 'hand'}-{seed}"
            rec = _distil_and_score(teacher_dir, init, run, steps, seed, t_unet, prompts, gen_steps)
            state["runs"].append({"student": student, "variant": choice, "seed": seed, "steps": steps,
                                  "unet_params": json.loads((init / "bksdm.json").read_text())["params"]["student_unet"], **rec})
            done_file.write_text(json.dumps(state, indent=1))
    if correlation_steps:
        _correlation(out, teacher_dir, ranking, correlation_steps, t_unet, state, done_file)
    (out / "auto.md").write_text(auto_markdown(state, steps, correlation_steps))
    return state


def _distil_and_score(teacher_dir: Path, init: Path, run: Path, steps: int, seed: int, t_unet, prompts: Path | None,
                      gen_steps: int) -> dict[str, Any]:
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    distill_run(teacher_dir, init, run, steps, seed=seed, **RECIPE)
    rec = dict(heldout(eval_parts(run / "final"), t_unet))
    if prompts is not None:
        rec.update(score(run / "final", prompts, run / "eval", steps=gen_steps))
    rec["seconds"] = round(time.time() - t0, 1)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return rec


def _correlation(out: Path, teacher_dir: Path, ranking: Path, steps: int, t_unet, state: dict, done_file: Path) -> None:
    """A student lacking each single unit, distilled ``steps`` steps (seed 0), scored by its error to the teacher."""
    from bksdm.arch.units import Unit, full_spec, remove
    from bksdm.compress import compress

    rec = json.loads(ranking.read_text())
    cfg = rec["teacher_config"]
    done = {u["unit"] for u in state["units"]}
    for row in rec["units"]:
        if row["name"] in done:
            continue
        spec = remove(full_spec(cfg), Unit.from_dict(row), cfg)
        path = out / "unit-specs" / f"unit-{len(done)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**spec.to_dict(), "name": row["name"]}))
        init = out / "unit-init"
        shutil.rmtree(init, ignore_errors=True)
        compress(str(teacher_dir), str(path), init)
        res = _distil_and_score(teacher_dir, init, out / "unit-run", steps, 0, t_unet, None, 0)
        state["units"].append({"unit": row["name"], "rel_mse": row["rel_mse"], "input_change": row["input_change"],
                               "params_saved": row["params_saved"], "steps": steps, **res})
        done.add(row["name"])
        done_file.write_text(json.dumps(state, indent=1))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (scipy.stats.spearmanr; ties get their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def auto_markdown(state: dict[str, Any], steps: int, correlation_steps: int = 0) -> str:
    """The report of :func:`ablate_auto`'s state: mean and spread per (size, choice), and the ranking's correlation."""
    summary = summarise(state["runs"])
    cells = ("heldout_mse", "teacher_mse", "fidelity", "mini_fid", "bg_noise")
    lines = [f"# Measured vs hand-chosen blocks in the mini world: {steps} distillation steps", "",
             "Mean over seeds, spread (max - min) in brackets; both choices at the hand student's U-Net parameter count "
             "or just under it, the same recipe (paper loss, output and feature KD) and seeds.", "",
             "| student size | choice | U-Net params | seeds | held-out MSE | MSE to teacher | prompt fidelity | mini-FID | "
             "background noise |", "|---|---|---|---|---|---|---|---|---|"]
    params = {(r["student"], r["variant"]): r["unet_params"] for r in state["runs"]}
    for s in summary:
        vals = []
        for m in cells:
            fmt = "{:.1f}" if m == "mini_fid" else "{:.2f}" if m == "bg_noise" else "{:.4f}"
            vals.append(f"{fmt.format(s[m])} ({fmt.format(s[m + '_spread'])})" if m in s else "-")
        lines.append(f"| {s['student']} | {s['variant']} | {params[(s['student'], s['variant'])]:,} | {s['seeds']} | "
                     + " | ".join(vals) + " |")
    units = [u for u in state["units"] if u.get("steps") == correlation_steps] if correlation_steps else []
    if len(units) >= 3:
        rho = spearman([u["rel_mse"] for u in units], [u["teacher_mse"] for u in units])
        rho_in = [u for u in units if u["input_change"] is not None]
        lines += ["", f"One-shot ranking against the distilled result ({len(units)} single-unit students, "
                  f"{correlation_steps} steps, seed 0): Spearman's rho between a unit's bypass error (rel. MSE) and the "
                  f"distilled student's MSE to the teacher = **{rho:.2f}**"
                  + (f"; for the input-change measure ({len(rho_in)} units where it is defined) "
                     f"**{spearman([u['input_change'] for u in rho_in], [u['teacher_mse'] for u in rho_in]):.2f}**"
                     if len(rho_in) >= 3 else "") + "."]
    return "\n".join(lines) + "\n"
