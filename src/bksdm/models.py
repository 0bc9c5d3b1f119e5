"""Loading pipeline components by name from a pipeline folder (hub id or local), as model_index.json says."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from bksdm.errors import UserError, reading
from bksdm.hub import resolve_model


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names (flags, configs) -> torch dtypes: one table for every command."""


def pipeline_folder(name: str, what: str = "model") -> Path:
    path = resolve_model(name, what)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{name} is not a diffusers pipeline folder (no model_index.json)")
    model_index(path)  # a corrupt index fails here, naming the file
    return path


def model_index(folder: Path) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a pipeline folder (an error naming it when it is not valid JSON)."""
    path = folder / "model_index.json"
    with reading(path, "pipeline index", "restore the folder from its source (or run bksdm compress again)"):
        index = json.loads(path.read_text())
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    return index


def import_own_components(folder: Path) -> None:
    """Import bksdm modules that a pipeline's model_index.json names (the mini world's VAE), so that
    ``DiffusionPipeline.from_pretrained`` can load them; other libraries are never imported on a file's say-so."""
    for value in model_index(folder).values():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0].startswith("bksdm."):
            importlib.import_module(value[0])


def absent_components(folder: Path) -> dict[str, None]:
    """``{name: None}`` for every component ``model_index.json`` records as absent (``[null, null]``), to pass to
    ``from_pretrained``: diffusers 0.42 refuses a folder whose pipeline class requires a component it does not
    have unless it is passed (``pipeline_utils.py``, "expected ... but only ... were passed") — SD3 without T5
    (``text_encoder_3``, ``tokenizer_3``), as diffusers' SD3 docs load it."""
    return {k: None for k, v in model_index(folder).items() if isinstance(v, list) and v and all(x is None for x in v)}


GENERATION_PARTS = ("unet", "vae", "tokenizer", "text_encoder", "scheduler")
"""What an SD-family pipeline generates with (:func:`generation_parts` names a folder's, SDXL's included)."""


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``.

    Recipes pass ``cpu=True`` to accelerate when this is ``cpu``: only then does it join the processes of a
    ``torchrun`` launch into one multi-CPU (gloo) group; otherwise each process silently runs alone.
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_components(folder: Path, names: tuple[str, ...] = GENERATION_PARTS) -> dict[str, Any]:
    """Several components of a pipeline folder by name (default: what generation needs)."""
    return {n: load_component(folder, n) for n in names}


def load_component(folder: Path, name: str, **kwargs: Any):
    """Component ``name`` (unet, vae, text_encoder, tokenizer, scheduler, ...) of a pipeline folder; a missing,
    truncated or mismatched file (weights that do not fit the config) is a one-line error naming it."""
    index = model_index(folder)
    if name not in index or not isinstance(index[name], list) or index[name][0] is None:
        raise UserError(f"{folder} has no {name} component")
    library, cls_name = index[name]
    with reading(folder / name, f"{name} of", "restore the folder from its source (or run bksdm compress again)"):
        cls = getattr(importlib.import_module(library), cls_name)
        return cls.from_pretrained(folder / name, **kwargs)


def load_unet(unet_dir: Path):
    """A ``UNet2DConditionModel`` from a pipeline's ``unet/`` or a bare U-Net folder (one-line error if corrupt)."""
    from diffusers import UNet2DConditionModel

    with reading(unet_dir, "U-Net", "restore the folder from its source (or run bksdm compress again)"):
        return UNet2DConditionModel.from_pretrained(unet_dir)


def pipeline_family(folder: Path):
    """The :class:`~bksdm.arch.families.Family` of a pipeline folder, read from its denoiser's config: the U-Net's,
    or the transformer's (SD3, Flux; :func:`bksdm.arch.flow_families.family_for`, which also reads which text
    components ``model_index.json`` provides)."""
    from bksdm.arch.flow_families import family_for, pipeline_components
    from bksdm.hub import read_unet_config

    index = model_index(folder) if (folder / "model_index.json").is_file() else {}
    if "transformer" in pipeline_components(index):
        path = folder / "transformer" / "config.json"
        with reading(path, "transformer config", "restore the folder from its source"):
            config = json.loads(path.read_text())
        return family_for(config, pipeline_components(index))
    return family_for(read_unet_config(folder)[0])


def unsupported(command: str, why: str = "") -> UserError:
    """The one message of every command that does not support transformer pipelines yet."""
    return UserError(f"SD3/FLUX transformer pipelines are not supported by `bksdm {command}` yet" + (f" ({why})" if why else ""))


def refuse_transformer(folder: Path, command: str, why: str = "") -> None:
    """A one-line :func:`unsupported` error when the pipeline (or bare model) folder ``folder`` has an SD3 / FLUX
    transformer denoiser and ``command`` works on U-Nets only (before any misleading "no U-Net config")."""
    index = model_index(folder) if (folder / "model_index.json").is_file() else {}
    if "transformer" in index or (folder / "transformer" / "config.json").is_file():
        raise unsupported(command, why)
    path = folder / "config.json"  # a bare model folder
    if not index and path.is_file():
        from bksdm.arch.flow_families import transformer_kind

        with reading(path, "model config", "restore the folder from its source"):
            config = json.loads(path.read_text())
        if transformer_kind(config) is not None:
            raise unsupported(command, why)


def generation_parts(folder: Path) -> tuple[str, ...]:
    """What generation loads from a pipeline: the denoiser (U-Net or transformer), VAE and the family's tokenizers
    and text encoders."""
    family = pipeline_family(folder)
    return (family.backbone, "vae", *family.text_components)


def decoder_factor(vae) -> int:
    """How many pixels a latent cell spans for a VAE or tiny decoder (what diffusers pipelines compute from
    ``block_out_channels``): 8 for SD's VAE and TAESD, 2 for the mini world's. ``vae``: the model, or its config
    (a dict, e.g. ``vae/config.json`` read without loading the weights; a config without ``block_out_channels``
    counts as diffusers' default of 8)."""
    cfg = getattr(vae, "config", vae)
    if "upsampling_scaling_factor" in cfg:  # AutoencoderTiny: its own upsampling factor per level
        return int(cfg["upsampling_scaling_factor"]) ** (len(cfg["decoder_block_out_channels"]) - 1)
    return 2 ** (len(cfg.get("block_out_channels") or (0,) * 4) - 1)


def vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The precision a VAE encodes in for a run in ``dtype``: float32 instead of float16 where its config asks to
    upcast (``force_upcast``: SDXL's VAE overflows to NaN in float16, as reported against diffusers' and kohya's
    trainers; diffusers' SDXL training script keeps it in float32), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype


def encode_pixels(vae, pixels: torch.Tensor):
    """``vae.encode(pixels).latent_dist`` in the VAE's own precision, outside any autocast (which would run it in
    float16 again): pixels (B, 3, H, W) in [-1, 1]."""
    with torch.autocast(pixels.device.type, enabled=False):
        return vae.encode(pixels.to(vae.dtype)).latent_dist


def load_text_side(teacher: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(vae, text parts) of a pipeline: the VAE and the family's tokenizers and text encoders by name (SDXL: two
    of each), networks frozen in eval mode on ``device``; the VAE in :func:`vae_dtype`."""
    folder = pipeline_folder(str(teacher), "teacher")
    vae = load_component(folder, "vae")
    vae = vae.to(device, vae_dtype(vae, dtype)).eval().requires_grad_(False)
    parts = {}
    for name in pipeline_family(folder).text_components:
        part = load_component(folder, name)
        parts[name] = part.to(device, dtype).eval().requires_grad_(False) if isinstance(part, torch.nn.Module) else part
    return vae, parts
