"""Finding models: a local diffusers folder or a Hugging Face hub id, failing fast when offline."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from bksdm.errors import UserError, reading

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

PIPELINE_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors")
"""What a diffusers pipeline repository needs: the index and each component's config, vocabulary and weights."""
MODEL_FILES = ("*.json", "*.txt", "*.safetensors")
"""What a single-model repository (``facebook/dino-vits16``) needs: config and weights at its root."""


def offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for no network: every download is refused at once with a message instead."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model(name: str, what: str = "model", files: tuple[str, ...] = PIPELINE_FILES) -> Path:
    """The local folder of ``name``: a folder path as is, or a hub id's snapshot (cache first, then download of
    the ``files`` patterns: :data:`PIPELINE_FILES` or :data:`MODEL_FILES`).

    Raises :class:`UserError` (never a long retry loop) when neither is available.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise UserError(f"{what} folder {name} does not exist; pass a diffusers folder or a Hugging Face hub id")
    from huggingface_hub import snapshot_download

    patterns = list(files)
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    how = (f"download it where the hub is reachable (`hf download {name} --local-dir DIR`) and pass DIR instead, "
           f"or point HF_HOME at a cache that holds it")
    if offline():
        raise UserError(f"{what} {name!r} is not a local folder and is not in the Hugging Face cache (HF_HUB_OFFLINE is set); {how}")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:
        raise UserError(f"{what} {name!r} could not be fetched from the hub ({type(exc).__name__}); {how}") from None


def resolve_weights_folder(name: str, what: str = "model") -> Path:
    """:func:`resolve_model` for a single-model repository (:data:`MODEL_FILES`), falling back to ``*.bin`` weights
    for older repositories that hold no safetensors file (only then is the ``.bin`` fetched)."""
    folder = resolve_model(name, what, MODEL_FILES)
    if not any(folder.glob("*.safetensors")):
        folder = resolve_model(name, what, ("*.json", "*.txt", "*.bin"))
    return folder


def read_unet_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """The U-Net config of a pipeline folder (``unet/config.json``) or of a bare U-Net folder, and its folder."""
    for cand in (folder / "unet", folder):
        cfg = cand / "config.json"
        if cfg.is_file():
            with reading(cfg, "U-Net config", "restore it from the model's source"):
                data = json.loads(cfg.read_text())
            if data.get("_class_name") in (None, "UNet2DConditionModel") or "down_block_types" in data:
                return data, cand
    raise UserError(f"{folder} holds no U-Net config (expected unet/config.json of a diffusers pipeline folder)")
