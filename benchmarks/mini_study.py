"""What limits the distilled mini student? Distil variants of the demo's run and score each (issue: mini world).

    python benchmarks/mini_study.py --out /tmp/study --variants base,dropout --steps 400 --prompts 300
    python benchmarks/mini_study.py --out /tmp/study --score-only FOLDER --guidance 1,3,7.5

Every variant is ``key=value`` overrides of ``configs/distill_mini.yaml`` (see VARIANTS); the grain study's
``demo*`` variants start from the recipe they were measured against (``bksdm.recipes.mini_ablate.ABLATION_BASE``: batch
32, no EMA, uniform timesteps), so they mean the same after the demo's recipe moved on. Each run is scored as the
demo scores (``bksdm.recipes.mini.score``: fidelity, mini-FID, background noise with intervals, and which attribute
goes wrong), written to ``OUT/study.json`` (resumable: finished variants are kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

VARIANTS = {
    "base": {},
    "drop10": {"caption_dropout": 0.1},
    "drop10-cos": {"caption_dropout": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 20},
    "drop20": {"caption_dropout": 0.2},
    "drop10-cos-lr1e-3": {"caption_dropout": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 20, "lr": 1e-3},
    "drop10-cos-feat0.1": {"caption_dropout": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 20, "lambda_feat": 0.1},
    "drop10-cos-800": {"caption_dropout": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 20, "max_steps": 800},
    "drop10-cos-200": {"caption_dropout": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 20, "max_steps": 200},
    "drop10-feat0.1": {"caption_dropout": 0.1, "lambda_feat": 0.1},
    "drop30": {"caption_dropout": 0.3},
    "drop10-lr2e-4": {"caption_dropout": 0.1, "lr": 2e-4},
    "drop10-800": {"caption_dropout": 0.1, "max_steps": 800},
    "drop50": {"caption_dropout": 0.5},
    "drop30-600": {"caption_dropout": 0.3, "max_steps": 600},
    "cfgkd": {"lambda_cfg": 1.0},
    "cfgkd-quarter": {"lambda_cfg": 1.0, "cfg_fraction": 0.25},
    "cfgkd-250": {"lambda_cfg": 1.0, "max_steps": 250},
    "cfgkd-drop10": {"lambda_cfg": 1.0, "caption_dropout": 0.1},
    "cfgkd0.1-drop10": {"lambda_cfg": 0.1, "caption_dropout": 0.1},
    # the grain study (docs/mini-world.md): the demo's recipe (guided KD on a quarter of each batch), then one change
    "demo": {},
    "demo-ema0.99": {"ema": True, "ema_decay": 0.99},
    "demo-ema0.995": {"ema": True, "ema_decay": 0.995},
    "demo-cos": {"lr_scheduler": "cosine", "lr_warmup_steps": 20},
    "demo-cos-ema0.99": {"lr_scheduler": "cosine", "lr_warmup_steps": 20, "ema": True, "ema_decay": 0.99},
    "demo-600": {"max_steps": 600},
    "demo-ema0.99-early3": {"ema": True, "ema_decay": 0.99, "timestep_bias": "earlier", "timestep_bias_multiplier": 3.0},
    "demo-ema-b16-600": {"ema": True, "batch_size": 16, "max_steps": 600},
    "demo-ema-b16-600-early3": {"ema": True, "batch_size": 16, "max_steps": 600, "timestep_bias": "earlier",
                                "timestep_bias_multiplier": 3.0},
    "demo-ema-b16-600-early6": {"ema": True, "batch_size": 16, "max_steps": 600, "timestep_bias": "earlier",
                                "timestep_bias_multiplier": 6.0},
    "demo-ema-b8-1200-early3": {"ema": True, "batch_size": 8, "max_steps": 1200, "timestep_bias": "earlier",
                                "timestep_bias_multiplier": 3.0},
    "demo-ema0.99-early6": {"ema": True, "ema_decay": 0.99, "timestep_bias": "earlier", "timestep_bias_multiplier": 6.0},
}


def score(folder: Path, prompts: Path, out: Path, guidance: float, steps: int = 25) -> dict:
    """The demo's own scoring (`bksdm.recipes.mini.score`) at ``guidance``, from a fresh image folder."""
    from bksdm.recipes.mini import score as mini_score

    shutil.rmtree(out, ignore_errors=True)
    return mini_score(folder, prompts, out, steps=steps, guidance=guidance)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--guidance", default="7.5")
    ap.add_argument("--score-only", nargs="*", default=[])
    a = ap.parse_args()
    from bksdm.compress import compress
    from bksdm.mini.teacher import teacher_path
    from bksdm.mini.world import ShapesWorld
    from bksdm.recipes.mini import distill_run
    from bksdm.recipes.mini_ablate import ABLATION_BASE

    a.out.mkdir(parents=True, exist_ok=True)
    prompts = a.out / "prompts.txt"
    prompts.write_text("\n".join(ShapesWorld(seed=0).prompts(a.prompts)) + "\n")
    results_file = a.out / "study.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    guidances = [float(g) for g in a.guidance.split(",")]

    def record(name: str, folder: Path, extra: dict) -> None:
        for g in guidances:
            key = f"{name}@g{g}"
            if key in results:
                continue
            t = time.time()
            results[key] = {**extra, "guidance": g, **score(folder, prompts, a.out / "eval" / key, g),
                            "score_s": round(time.time() - t, 1)}
            results_file.write_text(json.dumps(results, indent=1))
            print(key, json.dumps(results[key]), flush=True)

    for folder in a.score_only:
        record(Path(folder).name if Path(folder).name != "final" else Path(folder).parent.parent.name, Path(folder), {})
    if a.score_only:
        return
    teacher = teacher_path(None)
    init = a.out / "init-bk-small"
    if not (init / "model_index.json").is_file():
        compress(str(teacher), "bk-small", init)
    for name in a.variants.split(","):
        overrides = {**(ABLATION_BASE if name.startswith("demo") else {}), **VARIANTS[name]}
        run = a.out / "runs" / name
        if not (run / "final" / "model_index.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            t = time.time()
            distill_run(teacher, init, run, overrides.pop("max_steps", a.steps), **overrides)
            (run / "seconds.txt").write_text(f"{time.time() - t:.1f}")
        extra = {"variant": name, "overrides": VARIANTS[name], "distill_s": float((run / "seconds.txt").read_text())}
        record(name, run / "final", extra)


if __name__ == "__main__":
    main()
