"""The mini teacher's recipe settings: one source of defaults for the API, ``configs/mini_teacher_default.yaml``
and ``bksdm mini-teacher`` (importable without torch: the CLI builds its parser from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bksdm.config import Config
from bksdm.errors import UserError


@dataclass
class TeacherConfig(Config):
    out: str = ""  # run folder (required): the teacher in OUT/final, EMA checkpoints in OUT/step-N
    steps: int = 8000  # optimiser steps
    batch_size: int = 32  # freshly drawn world pictures per step
    lr: float = 5e-4  # AdamW, 200-step linear warm-up, then constant
    seed: int = 0  # decides the initial weights, the pictures' order, caption dropping and noise
    log_every: int = 100  # print the mean loss every N steps
    bf16: bool = True  # bf16 autocast (native on CPUs with AVX512-BF16/AMX); --no-bf16 trains in fp32
    save_every: int = 500  # an EMA checkpoint OUT/step-N every N steps (0: only the end)
    init_from: str = ""  # continue from this teacher folder (its VAE shift and scheduler are reset to the recipe's)
    ema_decay: float = 0.999  # EMA of U-Net and text encoder; what is saved
    start_index: int = 0  # first world index: continuations see new pictures (avoid 1,100,000+ and 5,000,000+)
    prediction: str = "v_prediction"  # v_prediction (SD-v2's target; the shipped teacher) or epsilon (SD-v1's)
    fresh_text: int = 0  # with init_from: replace the text encoder by a new one of this many layers
    family: str = "sd"  # sd (the shipped teacher's SD-v1 layout) or sdxl (two text encoders, size ids, transformer depth 2)
    overwrite: bool = False  # replace a teacher already in out (without it, one there is refused)

    def validate(self) -> "TeacherConfig":
        if not self.out:
            raise UserError("no output folder: pass --out DIR (the shipped teacher is never overwritten by default)")
        if (Path(self.out) / "final" / "model_index.json").exists() and not self.overwrite:
            raise UserError(f"{self.out} already holds a trained teacher (final/); pass --overwrite to replace it or "
                            f"choose another --out")
        return self
