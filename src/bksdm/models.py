"""Loading pipeline components by name from a pipeline folder (hub id or local), as model_index.json says."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from bksdm.errors import UserError, reading
from bksdm.hub import resolve_model


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


GENERATION_PARTS = ("unet", "vae", "tokenizer", "text_encoder", "scheduler")


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


def load_text_side(teacher: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(vae, tokenizer, text_encoder) of a pipeline, frozen in eval mode on ``device``."""
    folder = pipeline_folder(str(teacher), "teacher")
    vae = load_component(folder, "vae").to(device, dtype).eval().requires_grad_(False)
    tokenizer = load_component(folder, "tokenizer")
    text_encoder = load_component(folder, "text_encoder").to(device, dtype).eval().requires_grad_(False)
    return vae, tokenizer, text_encoder


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to predict for ``(latents, noise, t)``: the noise, or the velocity when the
    scheduler's config says ``v_prediction`` (SD-v2, the mini teacher). Same shape as ``latents``."""
    return noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)


class FrozenTeacher(torch.nn.Module):
    """Wraps the teacher so it stays frozen and in eval mode even when ``train()`` is called on a parent."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def fresh_accelerator_state() -> None:
    """Forget the mixed-precision choice of an earlier recipe in this process (accelerate keeps one per process).

    Recipes called in-process one after another (``main(argv)`` twice, the demo after a test) may ask for different
    precisions. The process-level state (ranks, device) is kept, so this is safe under ``accelerate launch``.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def quiet_libraries() -> None:
    """diffusers/transformers warn on every dtype cast and unexpected component type, and transformers draws a
    "Loading weights" bar per model; users see our messages and our progress bars."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
