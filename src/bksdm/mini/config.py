"""The mini teacher's recipe settings: one source of defaults for the API, ``configs/mini_teacher_default.yaml``
and ``bksdm mini-teacher`` (importable without torch: the CLI builds its parser from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bksdm.config import Config
from bksdm.errors import UserError


FAMILY_TARGETS = {"sd": "v_prediction", "sdxl": "v_prediction", "sd3": "flow"}
"""What each mini teacher family learns by default (``prediction: auto``): v for the U-Nets (SD-v2's target; the
shipped teachers), the rectified-flow velocity for SD3 (its scheduler's objective, not a setting)."""


@dataclass
class TeacherConfig(Config):
    out: str = ""  # run folder (required): the teacher in OUT/final, EMA checkpoints in OUT/step-N
    steps: int = 8000  # optimiser steps
    batch_size: int = 32  # freshly drawn world pictures per step
    lr: float = 5e-4  # AdamW, 200-step linear warm-up, then as lr_schedule says
    lr_schedule: str = "constant"  # constant, or cosine: from lr after the warm-up (200 steps, a tenth of shorter runs) to 0 at the last step
    seed: int = 0  # decides the initial weights, the pictures' order, caption dropping and noise
    log_every: int = 100  # print the mean loss every N steps
    bf16: bool = True  # bf16 autocast (native on CPUs with AVX512-BF16/AMX); --no-bf16 trains in fp32
    save_every: int = 500  # an EMA checkpoint OUT/step-N every N steps (0: only the end)
    init_from: str = ""  # continue from this teacher folder (its VAE shift and scheduler are reset to the recipe's)
    ema_decay: float = 0.999  # EMA of the denoiser and the text encoders; what is saved
    start_index: int = 0  # first world index: continuations see new pictures (avoid 1,100,000+ and 5,000,000+)
    prediction: str = "auto"  # auto: the family's (v_prediction for sd, sdxl; eps - x0 for sd3); v_prediction or epsilon: U-Nets only
    fresh_text: int = 0  # with init_from: replace the text encoder by a new one of this many layers
    family: str = "sd"  # sd (SD-v1 layout), sdxl (two text encoders, size ids, transformer depth 2), sd3 (MMDiT, flow matching)
    overwrite: bool = False  # replace a teacher already in out (without it, one there is refused)

    def target(self) -> str:
        """What the denoiser learns: ``prediction``, or with ``auto`` the family's (:data:`FAMILY_TARGETS`)."""
        return FAMILY_TARGETS.get(self.family, "v_prediction") if self.prediction == "auto" else self.prediction

    def validate(self) -> "TeacherConfig":
        if not self.out:
            raise UserError("no output folder: pass --out DIR (the shipped teacher is never overwritten by default)")
        if (Path(self.out) / "final" / "model_index.json").exists() and not self.overwrite:
            raise UserError(f"{self.out} already holds a trained teacher (final/); pass --overwrite to replace it or "
                            f"choose another --out")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule {self.lr_schedule!r}: choose constant or cosine")
        if self.fresh_text and self.family != "sd":
            raise UserError(f"fresh_text replaces the SD layout's one text encoder; a {self.family} teacher has two")
        if self.prediction != "auto" and FAMILY_TARGETS.get(self.family) == "flow":
            raise UserError(f"prediction {self.prediction!r} sets a U-Net teacher's target; family {self.family} learns "
                            f"flow matching's eps - x0: leave prediction at auto")
        return self
