"""Few-step students in the mini world: the demo's distilled student through `bksdm lcm`, then prompt fidelity and
mini-FID at 1, 2, 4 and 8 LCM steps against the same student at 25 PNDM steps and the teacher (`bksdm demo --lcm`).

Everything runs through the ordinary recipes: ``LCMRecipe`` with ``configs/lcm_mini.yaml``, the real ``generate``
(``--scheduler lcm``) and ``evaluate``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

STEP_COUNTS = (1, 2, 4, 8)


def lcm_run(model: Path, out: Path, steps: int, lora: bool = False, teacher: Path | None = None, seed: int = 1234,
            **overrides: Any) -> Path:
    """``bksdm lcm --config mini`` of ``model`` into ``out``; returns the folder to generate with."""
    import torch

    from bksdm.generate import default_dtype
    from bksdm.lcm.config import load_lcm_config
    from bksdm.recipes.lcm import LCMRecipe

    precision = "bf16" if torch.cuda.is_available() or default_dtype("cpu") == torch.bfloat16 else "no"
    cfg = load_lcm_config("mini", model=str(model), out=str(out), max_steps=steps, seed=seed, lora=lora,
                          teacher=str(teacher or ""), mixed_precision=precision, checkpoint_every=max(steps, 1),
                          overwrite=True, **overrides)
    LCMRecipe(cfg).setup().train()
    return out / "final"


def score(model: Path, prompts: Path, out: Path, steps: int, scheduler: str, guidance: float,
          lora: Path | None = None) -> dict[str, float]:
    """Generate (lossless, 32 px) and evaluate fidelity, mini-FID and background noise; the seconds generation took."""
    from bksdm.generate import generate
    from bksdm.recipes.evaluate import evaluate

    shutil.rmtree(out, ignore_errors=True)
    res = generate(str(model), prompts, out, steps=steps, guidance=guidance, scheduler=scheduler, batch_size=125,
                   save_size=None, lossless=True, lora=str(lora) if lora else None)
    return {**evaluate(out / "images", prompts, ["fidelity", "mini_fid", "bg_noise"]), "gen_seconds": res["seconds"]}


def lcm_curve(student: str | Path, teacher: str | Path, out: str | Path, prompts: Path, steps: int = 300,
              lora: bool = False, step_counts: tuple[int, ...] = STEP_COUNTS, pndm_steps: int = 25) -> list[dict[str, Any]]:
    """LCM-distil ``student`` (its own ODE teacher) and score the curve; writes ``out/lcm.json`` and returns the rows:
    teacher and student at ``pndm_steps`` PNDM steps (guidance 7.5), the LCM student at each of ``step_counts``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    final = lcm_run(Path(student), out / "run", steps, lora=lora)
    train_s = time.time() - t0
    rows = []
    for name, folder in (("teacher", Path(teacher)), ("student", Path(student))):
        rows.append({"model": f"{name}, PNDM {pndm_steps}", "steps": pndm_steps,
                     **score(folder, prompts, out / "eval" / name, pndm_steps, "pndm", 7.5)})
    # the full LCM U-Net embeds the guidance scale (7.5: w = 6.5 inside the trained range); LCM-LoRA runs without
    # classifier-free guidance, as the LCM-LoRA paper samples
    model, lora_file, guidance = (Path(student), final, 1.0) if lora else (final, None, 7.5)
    for k in step_counts:
        rows.append({"model": f"student + {'LCM-LoRA' if lora else 'LCM'}, {k} step{'s' * (k > 1)}", "steps": k,
                     **score(model, prompts, out / "eval" / f"lcm-{k}", k, "lcm", guidance, lora_file)})
    result = {"rows": rows, "lcm_train_seconds": round(train_s, 1), "lcm_steps": steps, "lora": lora,
              "images": sum(1 for _ in open(prompts))}
    (out / "lcm.json").write_text(json.dumps(result, indent=1))
    return rows
