"""The one source of distillation defaults (the paper's recipe), shared by the API, the YAML and the CLI.

``DistillConfig()`` is the paper; ``configs/distill_paper.yaml`` restates it with comments (a test checks they
agree); ``bksdm distill --config FILE key=value ...`` overrides any field. Unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bksdm.config import TrainConfig, load_yaml_config
from bksdm.errors import UserError

FLOW_OPTIONS = ("density", "logit_mean", "logit_std", "mode_scale", "weighting")
"""The fields that configure the flow-matching objective (SD3, Flux teachers); a DDPM teacher refuses any that is
changed. Their defaults are :class:`bksdm.objectives.FlowObjective`'s (diffusers' SD3 / Flux scripts'), restated here
so that ``--help`` needs no torch (a test checks they agree)."""


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = ""  # teacher pipeline: hub id or local folder
    student: str = "bk-small"  # built-in spec, spec file, or a folder written by `bksdm compress`
    out: str = "distill-out"  # run folder: checkpoints, logs, samples and the final pipeline
    random_flip: bool = True  # paper: random horizontal flip
    batch_size: int = 64  # per process and micro-step; paper total 256 = 64 x accumulation 4
    lr: float = 5e-5  # peak learning rate (paper: 5e-5, constant)
    lambda_sd: float = 1.0  # task loss weight
    lambda_out: float = 1.0  # output-KD weight
    lambda_feat: float = 1.0  # feature-KD weight (summed over the spec's layer pairs)
    feature_points: str = "blocks"  # where feature KD matches: blocks (BK-SDM's stage outputs) or self_attn (KOALA: every kept self-attention layer)
    caption_dropout: float = 0.0  # share of captions replaced by "" (paper: 0); trains the unconditional branch that guidance uses
    lambda_cfg: float = 0.0  # output KD on the classifier-free guided prediction at cfg_scale (paper: 0; both nets also run on "")
    cfg_scale: float = 7.5  # the guidance scale of lambda_cfg's term (the scale images are generated with)
    cfg_fraction: float = 1.0  # share of each micro-batch (its first rows) that lambda_cfg's empty-prompt rows cover
    ema: bool = True  # keep an EMA of the student; the final pipeline holds the EMA weights
    ema_decay: float = 0.9999
    ema_foreach: bool = True  # one fused EMA update over all tensors (the public recipe loops tensor by tensor)
    gradient_checkpointing: bool = True  # paper: on (trades ~30% step time for memory)
    sample_every: int = 0  # teacher-vs-student image grid every N steps (0: only at the end, if sample_prompts)
    init: str = "teacher"  # teacher | random: how the student's weights start (ablation)
    timestep_bias: str = "none"  # none (paper: uniform) | earlier (low-noise steps, where grain is decided) | later
    timestep_bias_portion: float = 0.25  # share of the timesteps that timestep_bias weights (diffusers' SDXL script)
    timestep_bias_multiplier: float = 1.0  # how many times more often those timesteps are drawn (1: no bias)
    density: str = "logit_normal"  # flow-matching teachers (SD3, Flux): how sigma is drawn: logit_normal (SD3 paper) | uniform | mode
    logit_mean: float = 0.0  # flow teachers, density logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # flow teachers, density logit_normal: its standard deviation
    mode_scale: float = 1.29  # flow teachers, density mode: how strongly middle sigmas are favoured
    weighting: str = "none"  # flow teachers: task-loss weight per sigma: none | sigma_sqrt | cosmap (SD3 paper)

    def validate(self) -> "DistillConfig":
        self.validate_training()
        if self.init not in ("teacher", "random"):
            raise UserError(f"init {self.init!r}; choose teacher or random")
        if not self.teacher:
            raise UserError("no teacher: pass --teacher (a hub id or a local pipeline folder)")
        return self

    def flow_options(self) -> dict[str, Any]:
        """The flow-objective options changed from their defaults (``objectives.objective_for`` refuses them on a
        DDPM teacher)."""
        return {k: getattr(self, k) for k in FLOW_OPTIONS if getattr(self, k) != getattr(DistillConfig, k)}


def load_config(path: str | Path | None, overrides: list[str] | None = None, **flags: Any) -> DistillConfig:
    """Defaults, then the YAML file (or ``paper`` / ``mini``), then ``key=value`` overrides, then flags."""
    return load_yaml_config(DistillConfig, path, "distill", overrides, **flags)
