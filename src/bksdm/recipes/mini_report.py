"""The demo's report: the headline table with intervals, pictures side by side and up close, curves, recipe."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from bksdm.mini.teacher import MEASURED_SMALL
from bksdm.report import markdown_table


def loss_plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in ("loss", "task", "out_kd", "feat_kd", "cfg_kd"):
        values = [float(r.get(k) or 0) for r in rows]
        if any(values):
            ax.plot(steps, values, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)




def curve_plot(curve: list[dict[str, Any]], png: Path) -> None:
    """Prompt fidelity, mini-FID and background noise of every checkpoint, with their 95% bootstrap intervals: the
    mini version of appendix Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curve]
    panels = [("fidelity", "prompt fidelity", False), ("mini_fid", "mini-FID", True),
              ("bg_noise", "background noise (levels)", False)]
    panels = [p for p in panels if p[0] in curve[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (key, title, log) in zip(axes[0], panels):
        ax.plot(steps, [r[key] for r in curve], marker="o")
        if f"{key}_lo" in curve[0]:
            ax.fill_between(steps, [r[f"{key}_lo"] for r in curve], [r[f"{key}_hi"] for r in curve], alpha=0.25)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("distillation step")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def zoomed_pair(teacher_images: Path, student_images: Path, prompts: Path, png: Path, count: int = 4,
                zoom: int = 8) -> Path:
    """Teacher (top) and student (bottom) pictures of the first ``count`` prompts, enlarged ``zoom`` times with
    nearest-neighbour (pixels stay pixels), so a reader sees the grain the background-noise column measures."""
    from bksdm.evaluate.metrics import opened
    from bksdm.generate import read_prompts
    from bksdm.report import image_grid

    names = [Path(n).stem + ".png" for n, _ in read_prompts(prompts)[:count]]
    rows = [list(opened([folder / n for n in names])) for folder in (teacher_images, student_images)]
    w = rows[0][0].size[0]
    image_grid(rows, pad=4, min_size=w * zoom).save(png)
    return png


def _interval(r: dict[str, Any], key: str, fmt: str) -> str:
    value = fmt.format(r[key])
    if f"{key}_lo" not in r:
        return value
    return f"{value} [{fmt.format(r[key + '_lo'])}, {fmt.format(r[key + '_hi'])}]"


REPORT_COLUMNS = ["model", "unet_params", "unet_mmacs", "latency_ratio", "fidelity", "mini_fid", "bg_noise"]
"""The report's first table, teacher vs student (a test checks every column is there)."""


def write_demo_report(out: Path, rows: list[dict], curve: list[dict], grid_prompts: list[str], steps: int, images: int,
                       curve_images: int, minutes: float, distill_minutes: float, recipe: dict, paper_recipe: bool,
                       lcm_rows: list[dict] | None, extra: list[str] | None = None) -> None:
    """``extra``: result keys of further registry metrics, shown after :data:`REPORT_COLUMNS`."""
    from bksdm.report import markdown_to_html

    teacher, init, student = rows
    extra = list(extra or [])
    headline = [{"model": r["model"], "unet_params": f"{r['unet_params']:,}", "unet_mmacs": f"{r['unet_mmacs']:.0f}",
                 "latency_ratio": f"{r['latency_ratio']:.2f}", "fidelity": _interval(r, "fidelity", "{:.3f}"),
                 "mini_fid": _interval(r, "mini_fid", "{:.0f}"), "bg_noise": _interval(r, "bg_noise", "{:.1f}"),
                 **{k: f"{r[k]:.4g}" for k in extra}}
                for r in (teacher, student)]
    departures = [] if paper_recipe else [
        f"a fourth loss term, output KD on the classifier-free guided prediction (`lambda_cfg` {recipe['lambda_cfg']}, "
        f"scale {recipe['cfg_scale']}; the paper has none): student and teacher also run on the empty prompt and the "
        "student matches u + 7.5 (c - u). Images are generated with guidance 7.5, which multiplies the error of the "
        "student's c - u by 7.5; the paper's loss never shows the student an empty prompt. Without it this student "
        "draws the prompted scene in about 64% of images (mini-FID about 26,000); with it about 95% (docs/mini-world.md "
        f"has the study). That pass covers {100 * recipe.get('cfg_fraction', 1.0):.0f}% of each batch, which keeps "
        "most of the gain at a fraction of the cost.",
    ] + ([f"low-noise timesteps drawn {recipe['timestep_bias_multiplier']:g}x as often (`timestep_bias: earlier`, the "
          f"lowest {100 * recipe['timestep_bias_portion']:.0f}% of the schedule; the paper draws them uniformly): fine "
          "detail and grain are decided there, where the student is furthest from its teacher; it cuts the student's "
          "background noise by about 6% (docs/mini-world.md)."]
         if recipe.get("timestep_bias", "none") == "earlier" and not paper_recipe else [])
    if student["model"].split(" ")[0] == MEASURED_SMALL.name:
        departures.append(
            "the student: BK-Small's parameter count (1.88 M against 1.92 M) with the blocks bksdm's measurement "
            "chooses (`bksdm rank`, then `compress --student auto --budget params=1923276`) instead of BK-Small's "
            "hand choice: it keeps the outermost, 32-pixel stage whole and removes the innermost stage, where "
            "BK-Small removes one pair of every stage. With the same recipe BK-Small stays about 15% grainier than "
            "its teacher (background noise 10.8 against 9.4), a grain its missing 32-pixel pair causes "
            "(docs/mini-world.md: the grain study); `--student bk-small` distils it.")
    text = [
        "# bksdm demo: BK-SDM in the mini world", "",
        markdown_table(headline, REPORT_COLUMNS + extra), "",
        f"The shipped mini teacher was compressed to `{student['model'].split(' ')[0]}` (blocks removed, weights "
        f"copied), distilled for {steps} steps with the real recipe, and both generated {images} images for "
        f"held-out prompts with the real `generate` (PNDM {recipe.get('sample_steps', 25)} steps, guidance 7.5). "
        f"latency_ratio: one U-Net call of the student over the teacher's (batch 2, fp32, median of 5). fidelity: "
        f"share of images the attribute classifier reads exactly as prompted. mini_fid: Frechet distance in the "
        f"classifier's features to real pictures of the same prompts. bg_noise: RMS difference, in 8-bit levels, "
        f"between the pixels the prompt leaves empty and the world's flat background colour (real pictures: 0): "
        f"the grain a person sees, which the classifier measures were built to ignore. In brackets: 95% bootstrap "
        f"intervals over the {images} images; two models whose intervals overlap are not ranked by that measure. "
        f"Whole run: {minutes:.1f} min (distillation {distill_minutes:.1f} min).", "",
        "## Teacher (top) vs distilled student (bottom), same seeds", "", "![samples](samples.png)", "",
        "Up close (8x, nearest neighbour; teacher top, student bottom, the first four held-out prompts):", "",
        "![zoomed](zoom.png)", "",
        *[f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)], "",
        "## Loss terms during distillation", "", "![losses](losses.png)", "",
        f"## Image measures against distillation step ({curve_images} prompts per checkpoint)", "",
        "![fidelity against step](fidelity_vs_step.png)", "",
        markdown_table([{"step": r["step"], "fidelity": _interval(r, "fidelity", "{:.3f}"),
                         "mini_fid": _interval(r, "mini_fid", "{:.0f}"), "bg_noise": _interval(r, "bg_noise", "{:.1f}")}
                        for r in curve]), "",
        ("Checkpoints hold the student's raw weights (the EMA is saved beside them); the final pipeline, and the "
         "headline table, hold the EMA weights, so the last point of the curve is not the headline student."
         if recipe.get("ema") else ""), "",
        "## Where images go wrong", "",
        markdown_table([{"model": r["model"], **{k[6:]: f"{r[k]:.3f}" for k in r if k.startswith("wrong_")}}
                        for r in (teacher, student)]), "",
        "Share of images with a prompted shape missing, a shape where the prompt has none, or a drawn shape of the "
        "wrong kind, colour or size (an image can have several).", "",
        "## Denoising errors", "",
        markdown_table([{"model": r["model"], "heldout_mse": r["heldout_mse"], "teacher_mse": r["teacher_mse"]} for r in rows]), "",
        "held-out MSE: error on the training target (v) on 256 fixed held-out (image, t, noise); teacher MSE: distance "
        "to the teacher's prediction. Right after compression the student is far from its teacher; distillation "
        "closes most of the gap.", "",
        "## Recipe", "",
        "`configs/distill_mini.yaml`: the paper's loss (task + output KD + feature KD, weights "
        f"{recipe['lambda_sd']} / {recipe['lambda_out']} / {recipe['lambda_feat']}) with what a CPU run of minutes "
        f"needs: batch {recipe['batch_size']} x {recipe['grad_accum']} (paper 64 x 4), lr {recipe['lr']} (paper 5e-5), "
        + (f"EMA {recipe['ema_decay']} as the paper, " if recipe.get("ema") else "no EMA, ")
        + f"{recipe['mixed_precision']}.",
    ]
    if departures:
        text += ["", "Departures from the paper's method (`bksdm demo --paper-recipe` undoes them):", ""]
        text += [f"- {d}" for d in departures]
    if lcm_rows:
        text += ["", "## Fewer steps: the student after latent consistency distillation", "",
                 markdown_table([{"model": r["model"], "fidelity": _interval(r, "fidelity", "{:.3f}"),
                                  "mini_fid": _interval(r, "mini_fid", "{:.0f}"),
                                  "bg_noise": _interval(r, "bg_noise", "{:.1f}") if "bg_noise" in r else "",
                                  "gen_seconds": f"{r['gen_seconds']:.1f}"} for r in lcm_rows])]
    md = "\n".join(text) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(markdown_to_html(md, out, "bksdm demo"))
