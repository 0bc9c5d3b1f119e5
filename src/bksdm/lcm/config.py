"""Latent consistency distillation settings: one source of defaults for the API, the YAML and the CLI.

``LCMConfig()`` is the published recipe as diffusers' ``examples/consistency_distillation`` runs it for SD-v1.5
(full: lr 1e-6, batch 12, 1,000 steps, Huber loss c = 0.001, target EMA 0.95, w in [5, 15], 50 DDIM solver steps
of 1,000, guidance embedding of width 256; LoRA: rank 64, lr 1e-4); ``configs/lcm_paper.yaml`` restates it with
comments, ``configs/lcm_mini.yaml`` is the mini world's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bksdm.config import TrainConfig, load_yaml_config
from bksdm.errors import UserError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
"""LCM-LoRA's adapted U-Net modules (every attention, feed-forward, residual and resampling layer)."""


@dataclass
class LCMConfig(TrainConfig):
    model: str = ""  # the pipeline to make few-step: a BK student (distill's final) or any SD-v1/v2 pipeline
    teacher: str = ""  # the ODE solver's teacher (default: the model itself), e.g. the SD the student came from
    out: str = "lcm-out"  # run folder: checkpoints, logs, samples and the final pipeline (or LoRA file)
    lora: bool = False  # LCM-LoRA: train adapters (no guidance embedding) instead of the whole U-Net
    lora_rank: int = 64  # LCM-LoRA rank (alpha = rank)
    lora_lr: float = 1e-4  # learning rate with --lora
    random_flip: bool = False  # diffusers' LCM scripts: no flip
    batch_size: int = 12  # per process and micro-step (diffusers' SD-v1.5 run: 12)
    grad_accum: int = 1
    max_steps: int = 1_000  # optimiser steps
    lr: float = 1e-6  # learning rate of the full U-Net (constant)
    weight_decay: float = 0.0
    checkpoint_every: int = 200
    sample_steps: int = 4  # LCM steps of the sample grid
    w_min: float = 5.0  # guidance scales drawn from [w_min, w_max] (LCM's convention: a pipeline's scale minus 1)
    w_max: float = 15.0
    num_ddim_timesteps: int = 50  # the solver's skipping schedule: 50 of the 1,000 training timesteps
    loss_type: str = "huber"  # huber | l2
    huber_c: float = 0.001  # pseudo-Huber constant
    ema_decay: float = 0.95  # the target network: an EMA of the student (full variant; LoRA uses the student itself)
    time_cond_proj_dim: int = 256  # guidance-embedding width added to the U-Net (full variant; zero-initialised)
    timestep_scaling: float = 10.0  # boundary-condition time scaling (LCMScheduler's default)

    def validate(self) -> "LCMConfig":
        self.validate_training()
        if not self.model:
            raise UserError("no model: pass --model (a pipeline folder or hub id, e.g. a distilled student)")
        if self.w_min > self.w_max:
            raise UserError(f"w_min {self.w_min} is above w_max {self.w_max}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lora_lr if self.lora else self.lr


def load_lcm_config(path: str | Path | None, overrides: list[str] | None = None, **flags: Any) -> LCMConfig:
    """Defaults, then the YAML file (or ``paper`` / ``mini``), then ``key=value`` overrides, then flags."""
    return load_yaml_config(LCMConfig, path, "lcm", overrides, **flags)
