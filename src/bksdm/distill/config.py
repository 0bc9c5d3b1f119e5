"""The one source of distillation defaults (the paper's recipe), shared by the API, the YAML and the CLI.

``DistillConfig()`` is the paper; ``configs/distill_paper.yaml`` restates it with comments (a test checks they
agree); ``bksdm distill --config FILE key=value ...`` overrides any field. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bksdm.errors import UserError


@dataclass
class DistillConfig:
    teacher: str = ""  # teacher pipeline: hub id or local folder
    student: str = "bk-small"  # built-in spec, spec file, or a folder written by `bksdm compress`
    data: str = ""  # image folder with metadata, webdataset shards, a cache folder, or mini-world
    out: str = "distill-out"  # run folder: checkpoints, logs, samples and the final pipeline
    cache: str = ""  # a `bksdm cache` folder: skips the VAE and text encoder entirely
    resolution: int = 512  # training image size (short side resized, then center crop)
    random_flip: bool = True  # paper: random horizontal flip
    batch_size: int = 64  # per process and micro-step; paper total 256 = 64 x accumulation 4
    grad_accum: int = 4
    max_steps: int = 50_000  # optimiser steps
    lr: float = 5e-5  # constant, no warm-up
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    fused_adam: bool = True  # fused AdamW where the device supports it (CPU and CUDA here: ~3x faster step)
    max_grad_norm: float = 1.0
    lambda_sd: float = 1.0  # task loss weight
    lambda_out: float = 1.0  # output-KD weight
    lambda_feat: float = 1.0  # feature-KD weight (summed over the spec's layer pairs)
    mixed_precision: str = "fp16"  # no | fp16 | bf16 (fp16 needs a GPU; bf16 also runs on CPUs)
    ema: bool = True  # keep an EMA of the student; the final pipeline holds the EMA weights
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = True  # paper: on (trades ~30% step time for memory)
    seed: int = 1234
    checkpoint_every: int = 5_000
    checkpoints_total_limit: int = 2  # keep the last N checkpoints
    resume: str = ""  # "latest" or a checkpoint folder
    log_every: int = 1  # loss terms to CSV and TensorBoard every N steps
    sample_every: int = 0  # teacher-vs-student image grid every N steps (0: only at the end, if sample_prompts)
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 25
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    num_workers: int = 2  # image decoding workers
    init: str = "teacher"  # teacher | random: how the student's weights start (ablation)

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    def update(self, values: dict[str, Any], source: str) -> "DistillConfig":
        known = self.fields()
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in known:
                raise UserError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
            setattr(self, key, _coerce(key, value, getattr(self, key), source))
        return self

    def validate(self) -> "DistillConfig":
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision {self.mixed_precision!r}; choose no, fp16 or bf16")
        if self.init not in ("teacher", "random"):
            raise UserError(f"init {self.init!r}; choose teacher or random")
        for key in ("batch_size", "grad_accum", "max_steps", "resolution", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1 (got {getattr(self, key)})")
        if not self.teacher:
            raise UserError("no teacher: pass --teacher (a hub id or a local pipeline folder)")
        if not self.data and not self.cache:
            raise UserError("no data: pass --data (an image folder, webdataset shards or mini-world) or --cache")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, current: Any, source: str) -> Any:
    """Values from YAML or ``key=value`` strings, converted to the field's type."""
    if isinstance(value, str) and not isinstance(current, str):
        import yaml

        value = yaml.safe_load(value)
    try:
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key}={value!r} is not a {type(current).__name__}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, **flags: Any) -> DistillConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides, then explicit flags (None = not given)."""
    import yaml

    cfg = DistillConfig()
    if path:
        p = Path(path)
        shipped = Path(__file__).parent.parent / "configs" / f"distill_{path}.yaml"
        if not p.is_file() and shipped.is_file():
            p = shipped  # `--config paper` / `--config mini`: the shipped recipes
        if not p.is_file():
            raise UserError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must hold a mapping of keys to values")
        cfg.update(data, str(p))
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        cfg.update({k: v}, "override")
    cfg.update({k: v for k, v in flags.items() if v is not None}, "flag")
    return cfg
