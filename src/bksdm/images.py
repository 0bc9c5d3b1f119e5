"""Image helpers shared by every room: which files are images, the short-side resize and the [-1, 1] tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""File suffixes read as images (lower case), in the order webdataset members are looked up."""


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """The image files of ``folder``, sorted by name; a one-line error when it is missing or holds none."""
    from bksdm.errors import UserError

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) after :func:`resize_short_side` to ``size``."""
    scale = size / min(w, h)
    return (w, h) if scale == 1 else (max(size, round(w * scale)), max(size, round(h * scale)))


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear) so the shorter side is ``size``; the aspect ratio is kept."""
    new = short_side_size(*image.size, size)
    return image if new == image.size else image.resize(new, Image.BILINEAR)


def pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
