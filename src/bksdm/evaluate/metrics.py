"""FID, IS and CLIP score on folders of images, through the reference libraries.

* FID — pytorch-fid: 2048-d pool features of its FID Inception, Frechet distance to statistics saved as a
  pytorch-fid ``.npz`` (``mu``, ``sigma``). Images are squashed to ``size`` x ``size`` (the paper's 256 px).
  Real-image statistics follow the official route by default (:func:`official_resize`: PIL's default resize,
  then a JPEG quality-75 round trip, as the official ``val2014_im256`` files were made); the features are those of
  ``python -m pytorch_fid`` bit for bit (same tensor layout, so the same CPU kernels).
* IS — torch-fidelity: its Inception's ``logits_unbiased`` and its ``isc_features_to_metric`` (10 splits).
* Both are fed in the reference tools' own order (sorted paths), not the prompt file's: IS shuffles and splits by
  position, and the order of FID's sums moves its last digits.
* CLIP score — open_clip: mean raw cosine similarity of image and prompt embeddings (no x100, no clamp).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from bksdm.errors import UserError
from bksdm.images import list_images





def load_images(paths: Iterable[Path], size: int | None = None) -> Iterable[Image.Image]:
    """RGB images, squashed to ``size`` x ``size`` (bicubic, PIL's default filter) when not that size already."""
    for p in paths:
        im = Image.open(p).convert("RGB")
        yield im.resize((size, size), Image.BICUBIC) if size and im.size != (size, size) else im


def official_resize(image: Image.Image, size: int) -> Image.Image:
    """The official 256 px copy of an image: ``image.resize((size, size))`` with PIL's default filter, saved as
    JPEG at PIL's default quality (75) and read back, as BK-SDM's ``change_img_size`` writes ``im256/*.jpg``."""
    if image.mode not in ("RGB", "L", "CMYK"):  # JPEG cannot hold alpha or a palette
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.resize((size, size)).save(buf, format="JPEG")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def official_images(paths: Iterable[Path], size: int) -> Iterable[Image.Image]:
    """:func:`official_resize` of every file (the route of the official real-image statistics)."""
    for p in paths:
        with Image.open(p) as im:
            yield official_resize(im, size)


def reference_order(paths: Iterable[Path]) -> list[Path]:
    """The order in which torch-fidelity and pytorch-fid read a folder (sorted paths). IS shuffles and splits by
    position; FID's sums and the batches' composition change its last digits."""
    return sorted(paths, key=lambda p: os.path.realpath(p))


def _uint8_batches(images: Iterable[Image.Image], batch: int) -> Iterable[torch.Tensor]:
    """(B, 3, H, W) uint8 views (channels-last memory, as torch-fidelity's ``pil_to_tensor`` gives them)."""
    buf: list[np.ndarray] = []
    for im in images:
        buf.append(np.asarray(im, dtype=np.uint8))
        if len(buf) == batch:
            yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)
            buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)


@torch.no_grad()
def inception_features(images: Iterable[Image.Image], model, batch: int = 50, device: str = "cpu") -> np.ndarray:
    """(N, 2048) pytorch-fid pool features of PIL images."""
    feats = []
    for x in _uint8_batches(images, batch):
        # contiguous, as torchvision's ToTensor in pytorch-fid's loader: a channels-last input picks other CPU
        # convolution kernels and moves FID in the 7th digit
        out = model(x.contiguous().to(device).float() / 255.0)[0]  # [0, 1]; pytorch-fid resizes to 299 itself
        feats.append(out.squeeze(-1).squeeze(-1).cpu().numpy())
    return np.concatenate(feats).astype(np.float64)


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path: str | Path, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"FID statistics {p} do not exist; build them with `bksdm fid-stats --images DIR --out {p.name}`")
    with np.load(p) as f:
        if "mu" not in f or "sigma" not in f:
            raise UserError(f"{p} is not a pytorch-fid statistics file (needs arrays mu and sigma)")
        mu, sigma = f["mu"], f["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or (dim and mu.shape[0] != dim):
        raise UserError(f"{p} has mu {mu.shape} and sigma {sigma.shape}; expected ({dim or 'D'},) and "
                        f"({dim or 'D'}, {dim or 'D'}) for this feature network")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    try:
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    except ValueError as exc:  # pytorch-fid's "Imaginary component": covariances too singular for sqrtm
        raise UserError(f"FID is undefined for these images ({exc}): use more images (the protocol uses 30,000; "
                        f"fewer than the 2,048 feature dimensions make the covariance singular)") from None


def folder_stats(folder: str | Path, model, size: int | None = 256, batch: int = 50, device: str = "cpu",
                 lossless: bool = False):
    """pytorch-fid statistics of every image in ``folder`` at ``size`` (the paper: val2014 at 256).

    Default: the official route (:func:`official_resize`); ``lossless``: a bicubic resize in memory, no JPEG."""
    files = list_images(folder)
    images = load_images(files, size) if lossless or not size else official_images(files, size)
    return stats(inception_features(images, model, batch, device))


@torch.no_grad()
def inception_score(images: Iterable[Image.Image], model, batch: int = 50, splits: int = 10, device: str = "cpu") -> dict:
    """torch-fidelity's IS: ``logits_unbiased`` of its Inception, ``isc_features_to_metric``."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.cat([model(x.to(device))[0].cpu() for x in _uint8_batches(images, batch)])
    res = isc_features_to_metric(logits, splits=min(splits, len(logits)))
    return {"is": res["inception_score_mean"], "is_std": res["inception_score_std"]}


@torch.no_grad()
def clip_similarities(images: list[Image.Image], prompts: list[str], model, preprocess, tokenizer,
                      batch: int = 32, device: str = "cpu") -> torch.Tensor:
    """(N,) raw cosine similarities between each image and its prompt."""
    sims = []
    for i in range(0, len(images), batch):
        x = torch.stack([preprocess(im) for im in images[i:i + batch]]).to(device)
        t = tokenizer(prompts[i:i + batch]).to(device)
        fi = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(t).float(), dim=-1)
        sims.append((fi * ft).sum(-1).cpu())
    return torch.cat(sims)
