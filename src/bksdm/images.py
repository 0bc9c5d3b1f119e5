"""The one way bksdm opens a picture, in every room that reads one (training data, DreamBooth, metrics).

Policy (README, "When things go wrong"):

* **orientation** — the EXIF orientation tag is applied (``ImageOps.exif_transpose``, as ``datasets`` and every
  photo viewer do): a phone picture is trained upright;
* **modes** — every Pillow mode becomes 8-bit RGB by its value range: 16-bit grayscale (``I;16*``, and 32-bit
  ``I`` holding 0..65535) is divided by 257, float (``F``) in 0..1 is multiplied by 255; palette, CMYK, YCbCr,
  1-bit and the rest through Pillow's conversion; values outside the mode's range are refused, not clipped;
* **transparency** — composited on one background, white (:data:`BACKGROUND`), never dropped (dropping alpha shows
  whatever colour the transparent pixels happen to store, often black);
* **size** — at most :data:`MAX_PIXELS` (Pillow's own decompression-bomb limit); for a square training crop, sides
  within :data:`MAX_ASPECT`:1 ("too thin") and at most :data:`MAX_UPSCALE` x upscaling ("too small"), checked
  before any resize, so no huge intermediate is made;
* **files** — a folder's images are its files with pytorch-fid's suffixes (:data:`IMAGE_EXTENSIONS`, any case),
  except hidden ones (``.DS_Store``, macOS ``._a.png`` AppleDouble files), which pytorch-fid reads and fails on.

Whatever cannot be used raises :class:`~bksdm.skips.Unusable` with its reason; readers skip and count it
(:class:`~bksdm.skips.Skips`), or refuse in one line where one picture matters (a DreamBooth subject photo, a
generated image being scored). An ordinary 8-bit RGB, grayscale or palette picture without an orientation tag is
read exactly as ``Image.open(p).convert("RGB")`` reads it, so the metrics stay equal to the reference tools.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from bksdm.skips import Unusable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
"""File suffixes read as images (any case), in the order webdataset members are looked up: pytorch-fid's list."""

BACKGROUND = (255, 255, 255)
"""What transparent pixels are composited on (white, as a page or a viewer shows them)."""

MAX_PIXELS = 2 * 89_478_485
"""Largest picture read (width x height): Pillow's decompression-bomb error limit, ``2 * Image.MAX_IMAGE_PIXELS``
(178.9 MP, 537 MB as 8-bit RGB). Larger files are skipped as "too large" before they are decoded."""

MAX_ASPECT = 4.0
"""A picture whose long side is more than this times its short side is "too thin" for a square training crop
(the crop would keep under a quarter of it, and the short-side resize would make a huge intermediate)."""

MAX_UPSCALE = 8.0
"""A picture whose short side must grow more than this many times to reach the training resolution is "too small"
(at 512 px: under 64 px)."""

_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa")


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """The image files of ``folder`` (by suffix, hidden files excluded), sorted by name; a one-line error when it is
    missing or holds none."""
    from bksdm.errors import UserError

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise UserError(f"{what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def open_image(source: str | Path | bytes | IO[bytes] | Image.Image, name: str | None = None,
               keep: tuple[str, ...] = ()) -> Image.Image:
    """A picture as 8-bit RGB under the module's policy (orientation applied, modes mapped by value range,
    transparency on :data:`BACKGROUND`, size limited). ``source``: a path, the file's bytes, a binary file object
    or an opened PIL image; ``name`` names it in reasons (default: the path); ``keep``: modes returned as they are
    (the official FID route resizes grayscale and CMYK pictures in their own mode, as the reference script did).

    Raises :class:`~bksdm.skips.Unusable` with reason ``missing file``, ``not an image``, ``too large``,
    ``truncated or corrupt``, ``broken EXIF``, ``unsupported pixels`` or ``cannot be read`` (permissions)."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, Image.Image):
        return _prepared(source, name, keep)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below is the check
            im = Image.open(source)
    except FileNotFoundError:
        raise Unusable("missing file", name) from None
    except (PermissionError, IsADirectoryError) as exc:
        raise Unusable("cannot be read", name, type(exc).__name__) from None
    except Image.DecompressionBombError:
        raise Unusable("too large", name, f"over {MAX_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise Unusable("not an image", name) from None
    except Exception as exc:
        raise Unusable("not an image", name, f"{type(exc).__name__}") from None
    with im:
        return _prepared(im, name, keep)


def _prepared(im: Image.Image, name: str, keep: tuple[str, ...] = ()) -> Image.Image:
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise Unusable("too large", name, f"{w}x{h} px, limit {MAX_PIXELS:,} pixels")
    try:
        im.load()
    except Exception as exc:
        raise Unusable("truncated or corrupt", name, f"{type(exc).__name__}") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as exc:
        raise Unusable("broken EXIF", name, f"{type(exc).__name__}") from None
    return im if im.mode in keep else to_rgb(im, name)


def to_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """``im`` as 8-bit RGB by its mode's value range (see the module docstring); raises ``Unusable``
    (``unsupported pixels``) for values outside the mode's range or a mode Pillow cannot convert."""
    mode = im.mode
    if mode in _16BIT or mode == "I" or mode == "F":
        a = np.asarray(im)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        top = 1.0 if mode == "F" else 65535.0
        if lo < 0 or hi > top or not np.isfinite([lo, hi]).all():
            raise Unusable("unsupported pixels", name, f"mode {mode} values {lo:g}..{hi:g}, expected 0..{top:g}")
        im = Image.fromarray(np.round(a.astype(np.float64) * (255.0 / top)).astype(np.uint8), "L")
        mode = "L"
    if mode in _ALPHA or "transparency" in im.info:
        try:
            rgba = im.convert("RGBA")
        except Exception as exc:
            raise Unusable("unsupported pixels", name, f"mode {mode}: {type(exc).__name__}") from None
        return Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND + (255,)), rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except Exception as exc:
        raise Unusable("unsupported pixels", name, f"mode {mode}: {type(exc).__name__}") from None


def check_crop(size: tuple[int, int], resolution: int, name: str = "image") -> None:
    """Raise ``Unusable`` (``too thin`` / ``too small``) when a picture of ``size`` (width, height) cannot give a
    square ``resolution`` crop under the policy (:data:`MAX_ASPECT`, :data:`MAX_UPSCALE`)."""
    w, h = size
    short, long = min(w, h), max(w, h)
    if long > MAX_ASPECT * short:
        raise Unusable("too thin", name, f"{w}x{h} px; sides must be within {MAX_ASPECT:g}:1")
    if resolution > MAX_UPSCALE * short:
        raise Unusable("too small", name, f"{w}x{h} px would be upscaled {resolution / short:.1f}x to {resolution} px; "
                                          f"limit {MAX_UPSCALE:g}x")


def short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) after :func:`resize_short_side` to ``size``."""
    scale = size / min(w, h)
    return (w, h) if scale == 1 else (max(size, round(w * scale)), max(size, round(h * scale)))


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear) so the shorter side is ``size``; the aspect ratio is kept. The picture is checked first
    (:func:`check_crop`), so the result is at most ``MAX_ASPECT * size`` long."""
    check_crop(image.size, size)
    new = short_side_size(*image.size, size)
    return image if new == image.size else image.resize(new, Image.BILINEAR)


def pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
