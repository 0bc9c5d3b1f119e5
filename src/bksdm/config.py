"""Recipe configs: a dataclass is the one source of defaults for the API, the YAML files and the CLI flags.

Values from YAML or ``key=value`` strings are converted to each field's type; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from bksdm.errors import UserError

C = TypeVar("C", bound="Config")

PRECISIONS = ("fp32", "fp16", "bf16")
SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "dpm": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler"}
"""Sampler names (``--scheduler``) -> diffusers scheduler classes."""

BOUNDS: dict[str, dict[str, Any]] = {
    # counts: at least one (steps, batches, runs, images, prompts, checkpoints)
    **{k: {"min": 1} for k in ("steps", "gen_steps", "batch_size", "runs", "limit", "images", "max_steps", "grad_accum",
                               "checkpoint_every", "checkpoints_total_limit", "log_every", "images_per_prompt",
                               "num_class_images", "class_steps", "sample_steps", "lora_rank", "curve_images",
                               "lcm_steps", "samples", "cache_interval")},
    "cache_branch": {"min": 0},
    **{k: {"min": 0} for k in ("save_size", "size", "num_workers", "sample_every", "lr_warmup_steps")},
    "caption_dropout": {"min": 0, "max": 1},
    "cfg_fraction": {"above": 0, "max": 1},
    **{k: {"min": 0} for k in ("w_min", "w_max")},
    **{k: {"above": 0} for k in ("huber_c", "timestep_scaling", "lora_lr")},
    **{k: {"min": 1} for k in ("num_ddim_timesteps", "time_cond_proj_dim")},
    "loss_type": {"choices": ("huber", "l2")},
    "lr_scheduler": {"choices": ("constant", "cosine", "linear")},
    "resolution": {"min": 8, "multiple": 8},  # the VAE's 8x downsampling
    **{k: {"above": 0} for k in ("lr", "max_grad_norm", "adam_eps")},
    "ema_decay": {"above": 0, "max": 1},
    **{k: {"min": 0} for k in ("lambda_sd", "lambda_out", "lambda_feat", "lambda_cfg", "cfg_scale", "prior_loss_weight",
                               "guidance", "weight_decay")},
    "dtype": {"choices": PRECISIONS}, "dtypes": {"choices": PRECISIONS},
    "scheduler": {"choices": tuple(SCHEDULERS)},
    "feature_points": {"choices": ("blocks", "self_attn")},
    "family": {"choices": ("sd", "sdxl", "sd3")},
    "mixed_precision": {"choices": ("no", "fp16", "bf16")},
    "shard": {"choices": ("none", "fsdp2")},
    "init": {"choices": ("teacher", "random")},
    "timestep_bias": {"choices": ("none", "earlier", "later")},
    "timestep_bias_portion": {"above": 0, "max": 1},
    "timestep_bias_multiplier": {"above": 0},
    "density": {"choices": ("logit_normal", "uniform", "mode")},  # bksdm.objectives.DENSITIES
    "weighting": {"choices": ("none", "sigma_sqrt", "cosmap")},  # bksdm.objectives.WEIGHTINGS
    **{k: {"above": 0} for k in ("logit_std", "mode_scale")},
    "report_to": {"choices": ("tensorboard", "wandb", "none")},
    "lora_preset": {"choices": ("bk-sdm", "diffusers")},
    "prediction": {"choices": ("auto", "v_prediction", "epsilon")},
}
"""The allowed range or choices of every numeric and named setting, by name: one table for flags, YAML keys and
``key=value`` overrides of every command."""


def check_value(key: str, value: Any, source: str = "flag") -> None:
    """A :class:`UserError` naming ``key``, ``value`` and the allowed range or choices when ``value`` is outside.
    ``None`` (not given) and unknown keys pass; lists are checked item by item."""
    rule = BOUNDS.get(key)
    if rule is None or value is None:
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        flag = f"--{key.replace('_', '-')}" if source == "flag" else f"{source}: {key}"
        if "choices" in rule and v not in rule["choices"]:
            raise UserError(f"{flag} {v!r} is not one of {', '.join(rule['choices'])}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if "min" in rule and v < rule["min"]:
            raise UserError(f"{flag} {v} is too small: it must be at least {rule['min']}")
        if "max" in rule and v > rule["max"]:
            raise UserError(f"{flag} {v} is too large: it must be at most {rule['max']}")
        if "above" in rule and not v > rule["above"]:
            raise UserError(f"{flag} {v} must be greater than {rule['above']}")
        if "multiple" in rule and v % rule["multiple"]:
            raise UserError(f"{flag} {v} must be a multiple of {rule['multiple']} (e.g. {v - v % rule['multiple'] or rule['multiple']})")


class Config:
    """Mixin for recipe dataclasses: ``fields``, ``update`` (typed, strict) and ``to_dict``."""

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's trailing ``# comment`` in the class source: the one text behind ``--help`` and the YAML."""
        import inspect
        import re

        docs = {}
        for klass in reversed(cls.__mro__):  # base classes first: a subclass's comment replaces its base's
            if not dataclasses.is_dataclass(klass):
                continue
            for line in inspect.getsource(klass).splitlines():
                m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
                if m and m.group(1) in cls.fields():
                    docs[m.group(1)] = m.group(2).strip()
        return docs

    def update(self: C, values: dict[str, Any], source: str) -> C:
        known = self.fields()
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in known:
                raise UserError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
            value = _coerce(key, value, getattr(self, key), source)
            check_value(key, value, source)
            setattr(self, key, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainConfig(Config):
    """What every data-driven trainer shares (``distill``, ``lcm``): data, optimiser and schedule, precision,
    checkpoints, logging. Subclasses add their models and loss, and may restate a default with their own comment."""

    data: str = ""  # image folder with metadata, webdataset shards, hf:DATASET (Hugging Face datasets), or mini-world
    out: str = "run-out"  # run folder: checkpoints, logs, samples and the final result
    cache: str = ""  # a `bksdm cache` folder: skips the VAE and text encoder entirely
    image_column: str = "image"  # hf: datasets: the image column
    caption_column: str = "text"  # the caption column of hf: datasets and image folders' metadata
    data_split: str = "train"  # hf: datasets: the split of a hub dataset or DatasetDict
    streaming: bool = False  # hf: datasets: read in order without random access (like tar shards)
    resolution: int = 512  # training image size (short side resized, then center crop)
    random_flip: bool = True  # random horizontal flip
    batch_size: int = 64  # per process and micro-step
    grad_accum: int = 4
    max_steps: int = 50_000  # optimiser steps
    lr: float = 5e-5  # peak learning rate
    lr_scheduler: str = "constant"  # constant | cosine | linear (decay to 0 at max_steps after the warm-up)
    lr_warmup_steps: int = 0  # linear warm-up from 0 over this many optimiser steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    fused_adam: bool = True  # fused AdamW where the device supports it (CPU and CUDA here: ~3x faster step)
    max_grad_norm: float = 1.0
    mixed_precision: str = "fp16"  # no | fp16 | bf16 (fp16 needs a GPU; bf16 also runs on CPUs)
    gradient_checkpointing: bool = True  # trades ~30% step time for memory
    seed: int = 1234
    checkpoint_every: int = 5_000
    checkpoints_total_limit: int = 2  # keep the last N checkpoints
    resume: str = ""  # "latest" or a checkpoint folder
    overwrite: bool = False  # replace an earlier run in `out` (without it, a used run folder is refused)
    log_every: int = 1  # loss terms to CSV and TensorBoard every N steps
    sample_every: int = 0  # sample image grid every N steps (0: only at the end, if sample_prompts)
    sample_prompts: list[str] = dataclasses.field(default_factory=list)
    sample_steps: int = 25
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    num_workers: int = 2  # image decoding workers
    shard: str = "none"  # none | fsdp2: student and teacher sharded over the processes (torchrun; docs/sharding.md)

    def validate_training(self) -> None:
        """The checks every trainer needs (counts, precision name, some data)."""
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision {self.mixed_precision!r}; choose no, fp16 or bf16")
        for key in ("batch_size", "grad_accum", "max_steps", "resolution", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1 (got {getattr(self, key)})")
        if not self.data and not self.cache:
            raise UserError("no data: pass --data (an image folder, webdataset shards or mini-world) or --cache")

    def data_options(self) -> dict[str, Any]:
        """The options ``open_source`` passes to ``hf:`` datasets."""
        return {"image_column": self.image_column, "caption_column": self.caption_column, "split": self.data_split,
                "streaming": self.streaming}


def _coerce(key: str, value: Any, current: Any, source: str) -> Any:
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


def load_yaml_config(cls: type[C], path: str | Path | None, shipped_prefix: str, overrides: list[str] | None = None,
                     **flags: Any) -> C:
    """Defaults, then the YAML file (a path, or a shipped ``configs/{prefix}_{name}.yaml``), then ``key=value``
    overrides, then explicit flags (None = not given)."""
    import yaml

    cfg = cls()
    if path:
        p = Path(path)
        name = str(path).removeprefix(f"{shipped_prefix}-")  # "lcm-paper" names the shipped lcm_paper.yaml too
        shipped = Path(__file__).parent / "configs" / f"{shipped_prefix}_{name}.yaml"
        if not p.is_file() and shipped.is_file():
            p = shipped
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
