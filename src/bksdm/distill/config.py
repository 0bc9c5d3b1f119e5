"""The one source of distillation defaults (the paper's recipe), shared by the API, the YAML and the CLI.

``DistillConfig()`` is the paper; ``configs/distill_paper.yaml`` restates it with comments (a test checks they
agree); ``bksdm distill --config FILE key=value ...`` overrides any field. Unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bksdm.config import Config, load_yaml_config
from bksdm.errors import UserError


@dataclass
class DistillConfig(Config):
    teacher: str = ""  # teacher pipeline: hub id or local folder
    student: str = "bk-small"  # built-in spec, spec file, or a folder written by `bksdm compress`
    data: str = ""  # image folder with metadata, webdataset shards, hf:DATASET (Hugging Face datasets), or mini-world
    out: str = "distill-out"  # run folder: checkpoints, logs, samples and the final pipeline
    cache: str = ""  # a `bksdm cache` folder: skips the VAE and text encoder entirely
    image_column: str = "image"  # hf: datasets: the image column
    caption_column: str = "text"  # hf: datasets: the caption column
    data_split: str = "train"  # hf: datasets: the split of a hub dataset or DatasetDict
    streaming: bool = False  # hf: datasets: read in order without random access (like tar shards)
    resolution: int = 512  # training image size (short side resized, then center crop)
    random_flip: bool = True  # paper: random horizontal flip
    batch_size: int = 64  # per process and micro-step; paper total 256 = 64 x accumulation 4
    grad_accum: int = 4
    max_steps: int = 50_000  # optimiser steps
    lr: float = 5e-5  # peak learning rate (paper: 5e-5, constant)
    lr_scheduler: str = "constant"  # constant | cosine | linear (decay to 0 at max_steps after the warm-up)
    lr_warmup_steps: int = 0  # linear warm-up from 0 over this many optimiser steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    fused_adam: bool = True  # fused AdamW where the device supports it (CPU and CUDA here: ~3x faster step)
    max_grad_norm: float = 1.0
    lambda_sd: float = 1.0  # task loss weight
    lambda_out: float = 1.0  # output-KD weight
    lambda_feat: float = 1.0  # feature-KD weight (summed over the spec's layer pairs)
    caption_dropout: float = 0.0  # share of captions replaced by "" (paper: 0); trains the unconditional branch that guidance uses
    mixed_precision: str = "fp16"  # no | fp16 | bf16 (fp16 needs a GPU; bf16 also runs on CPUs)
    ema: bool = True  # keep an EMA of the student; the final pipeline holds the EMA weights
    ema_decay: float = 0.9999
    ema_foreach: bool = True  # one fused EMA update over all tensors (the public recipe loops tensor by tensor)
    gradient_checkpointing: bool = True  # paper: on (trades ~30% step time for memory)
    seed: int = 1234
    checkpoint_every: int = 5_000
    checkpoints_total_limit: int = 2  # keep the last N checkpoints
    resume: str = ""  # "latest" or a checkpoint folder
    overwrite: bool = False  # replace an earlier run in `out` (without it, a used run folder is refused)
    log_every: int = 1  # loss terms to CSV and TensorBoard every N steps
    sample_every: int = 0  # teacher-vs-student image grid every N steps (0: only at the end, if sample_prompts)
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 25
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    num_workers: int = 2  # image decoding workers
    init: str = "teacher"  # teacher | random: how the student's weights start (ablation)

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


def data_options(cfg: DistillConfig) -> dict[str, Any]:
    """The options ``open_source`` passes to ``hf:`` datasets."""
    return {"image_column": cfg.image_column, "caption_column": cfg.caption_column, "split": cfg.data_split,
            "streaming": cfg.streaming}


def load_config(path: str | Path | None, overrides: list[str] | None = None, **flags: Any) -> DistillConfig:
    """Defaults, then the YAML file (or ``paper`` / ``mini``), then ``key=value`` overrides, then flags."""
    return load_yaml_config(DistillConfig, path, "distill", overrides, **flags)
