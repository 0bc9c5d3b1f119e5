"""Evaluation recipes: score a folder of generated images; score every checkpoint of a distillation run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bksdm.errors import UserError
from bksdm.evaluate import registry as R
from bksdm.images import list_images


def matched_images(images: str | Path, prompts: str | Path) -> tuple[list[Path], list[str]]:
    """The image of every prompt, in prompt-file order: the file named as the prompt file says (an official
    ``im256/COCO_...jpg`` folder as it is), else the one file with that stem (``.png`` of a lossless run).
    An error if any is missing."""
    from bksdm.generate import read_prompts

    items = read_prompts(prompts)
    folder = Path(images)
    files = list_images(folder)
    names = {p.name for p in files}
    by_stem = {p.stem: p.name for p in files}
    found = [n if n in names else by_stem.get(Path(n).stem) for n, _ in items]
    if None in found:
        missing = [n for (n, _), f in zip(items, found) if f is None]
        raise UserError(f"image folder {folder} has {len(items) - len(missing)} of the {len(items)} images the prompt "
                        f"file names (first missing: {missing[0]}); generate them first")
    return [folder / f for f in found], [p for _, p in items]


def evaluate(images: str | Path, prompts: str | Path, metrics: list[str], fid_ref: str | None = None,
             size: int | None = 256, inception_weights: str | None = None, isc_weights: str | None = None,
             clip_name: str = "ViT-g-14", clip_pretrained: str = "laion2b_s34b_b88k", device: str | None = None,
             batch: int = 50, lossless: bool = False, per_image: str | Path | None = None,
             **options: Any) -> dict[str, Any]:
    """Scores of the images named by ``prompts`` in ``images`` for each metric of the registry named in
    ``metrics``; ``fid_ref`` is a pytorch-fid .npz or a folder of real images (squashed the official way, or in
    memory without JPEG when ``lossless``). ``options`` are further :class:`~bksdm.evaluate.registry.EvalInputs`
    fields (``cmmd_ref``, ``clean_ref``, ``hpsv2_weights``, ...; an unknown one is an error); ``per_image`` is a
    CSV written with every per-image score (the preference metrics), one row per image."""
    from dataclasses import fields

    from bksdm.models import default_device

    known = {f.name for f in fields(R.EvalInputs)} - {"paths", "texts", "cache"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown evaluation option {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    chosen = R.resolve(metrics)  # an unknown name fails before any image is read
    R.check_needs(chosen, {"fid_ref": fid_ref, **options})
    if per_image and not any(m.per_image for m in chosen):
        raise UserError(f"--per-image needs a per-image metric: "
                        f"{', '.join(m.name for m in R.METRICS.values() if m.per_image)}")
    if per_image:
        from bksdm.errors import check_output

        check_output(per_image, "file")
    paths, texts = matched_images(images, prompts)
    inputs = R.EvalInputs(paths, texts, size, fid_ref, lossless, inception_weights, isc_weights, clip_name,
                          clip_pretrained, device or default_device(), batch, **options)
    res: dict[str, Any] = {"images": len(paths)}
    for metric in chosen:
        res.update(metric.compute(inputs))
    if per_image:
        write_per_image(per_image, paths, texts, inputs.cache.get("per_image", {}))
    return res


def write_per_image(path: str | Path, paths: list[Path], texts: list[str], scores: dict[str, list[float]]) -> None:
    """CSV ``file_name, prompt, <metric>...`` with each image's score (prompt-file order)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "prompt", *scores])
        for i, (p, t) in enumerate(zip(paths, texts)):
            w.writerow([p.name, t, *(f"{v[i]:.9g}" for v in scores.values())])


def markdown_row(name: str, res: dict[str, Any]) -> str:
    cols = [m.keys[0] for m in R.load_providers().values() if m.keys[0] in res]
    head = "| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)
    return head + "\n| " + name + " | " + " | ".join(f"{res[c]:.4f}" for c in cols) + " |"


def progress(run: str | Path, prompts: str | Path, metrics: list[str], out: str | Path | None = None,
             gen_kwargs: dict[str, Any] | None = None, **eval_kwargs: Any) -> list[dict[str, Any]]:
    """Generate and score with every checkpoint of a distillation run (appendix Figure 3): CSV and PNG plot."""
    from bksdm.pipelines import copy_pipeline
    from bksdm.generate import generate

    R.check_needs(R.resolve(metrics), eval_kwargs)  # a missing reference fails before any checkpoint is generated
    run = Path(run)
    cfg_file = run / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{run} is not a distillation run folder (no config.json)")
    teacher = json.loads(cfg_file.read_text())["teacher"]
    from bksdm.models import pipeline_folder

    teacher_dir = pipeline_folder(teacher, "teacher")
    from bksdm.distill.checkpoints import checkpoints

    ckpts = checkpoints(run / "checkpoints")
    if not ckpts:
        raise UserError(f"{run}/checkpoints holds no step-N checkpoints")
    out = Path(out or run / "progress")
    rows = []
    for ck in ckpts:
        step = int(ck.name[5:])
        pipe_dir = out / "pipelines" / ck.name
        if not (pipe_dir / "model_index.json").is_file():
            copy_pipeline(teacher_dir, pipe_dir)
            import shutil

            shutil.copytree(ck / "unet", pipe_dir / "unet", dirs_exist_ok=True)
        gen_dir = out / "images" / ck.name
        gen_kwargs = {"save_size": 256, **(gen_kwargs or {})}
        generate(str(pipe_dir), prompts, gen_dir, **gen_kwargs)
        # every metric on the 256 px copies, as the protocol scores them (CLIP included)
        scored = gen_dir / f"images_{gen_kwargs['save_size']}" if gen_kwargs["save_size"] else gen_dir / "images"
        res = evaluate(scored, prompts, metrics, **eval_kwargs)
        rows.append({"step": step, **res})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "progress.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, out / "progress.png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k not in ("step", "images", "is_std") and not k.endswith(("_lo", "_hi"))]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], marker="o")
        ax.set_xlabel("iteration")
        ax.set_title(k)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
