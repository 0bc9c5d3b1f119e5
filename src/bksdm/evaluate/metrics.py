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

from bksdm.errors import UserError, note
from bksdm.images import list_images, open_image
from bksdm.skips import Skips, Unusable


def opened(paths: Iterable[Path], skips: Skips | None = None, keep: tuple[str, ...] = ()) -> Iterable[Image.Image]:
    """Every picture of ``paths`` through :func:`bksdm.images.open_image`. An unusable one is skipped and counted in
    ``skips`` (a folder of real pictures), or, without ``skips`` (generated images being scored, where leaving one
    out would change the sample), refused in one line naming the file."""
    for p in paths:
        try:
            yield open_image(p, keep=keep)
        except Unusable as exc:
            if skips is None:
                raise UserError(f"image {p} cannot be used ({exc.reason}); delete it and generate it again "
                                f"(bksdm generate redraws missing images)") from None
            skips.add(exc)


def load_images(paths: Iterable[Path], size: int | None = None, skips: Skips | None = None) -> Iterable[Image.Image]:
    """RGB images, squashed to ``size`` x ``size`` (bicubic, PIL's default filter) when not that size already."""
    for im in opened(paths, skips):
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


def official_images(paths: Iterable[Path], size: int, skips: Skips | None = None) -> Iterable[Image.Image]:
    """:func:`official_resize` of every file (the route of the official real-image statistics); grayscale and CMYK
    pictures are resized in their own mode, as the reference script resized them."""
    for im in opened(paths, skips, keep=("L", "CMYK")):
        yield official_resize(im, size)


def reference_order(paths: Iterable[Path]) -> list[Path]:
    """The order in which torch-fidelity and pytorch-fid read a folder (sorted paths). IS shuffles and splits by
    position; FID's sums and the batches' composition change its last digits."""
    return sorted(paths, key=lambda p: os.path.realpath(p))


def _uint8_batches(images: Iterable[Image.Image], batch: int) -> Iterable[torch.Tensor]:
    """(B, 3, H, W) uint8 views (channels-last memory, as torch-fidelity's ``pil_to_tensor`` gives them). A batch
    holds pictures of one size: unsquashed pictures (``--size 0``) of another size start a new batch (the networks
    resize each picture to 299 px themselves)."""
    buf: list[np.ndarray] = []
    for im in images:
        a = np.asarray(im, dtype=np.uint8)
        if buf and a.shape != buf[0].shape:
            yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)
            buf = []
        buf.append(a)
        if len(buf) == batch:
            yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)
            buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)


@torch.no_grad()
def inception_features(images: Iterable[Image.Image], model, batch: int = 50, device: str = "cpu") -> np.ndarray:
    """(N, 2048) pytorch-fid pool features of PIL images."""
    feats = [np.zeros((0, 2048), dtype=np.float32)]  # no image: (0, 2048), refused by the statistics
    for x in _uint8_batches(images, batch):
        # contiguous, as torchvision's ToTensor in pytorch-fid's loader: a channels-last input picks other CPU
        # convolution kernels and moves FID in the 7th digit
        out = model(x.contiguous().to(device).float() / 255.0)[0]  # [0, 1]; pytorch-fid resizes to 299 itself
        feats.append(out.squeeze(-1).squeeze(-1).cpu().numpy())
    return np.concatenate(feats).astype(np.float64)


def stats(features: np.ndarray, what: str = "FID") -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of (N, D) features, as pytorch-fid computes them. A covariance needs N >= 2
    (one line otherwise, where NaN statistics would make the matrix square root hang); N <= D gives a singular
    covariance and a Frechet distance biased high, which a note says; non-finite features are refused."""
    n, d = features.shape
    require_covariance(n, what)
    if not np.isfinite(features).all():
        raise UserError(f"{what}: the feature network gave non-finite features for these images")
    if n <= d:
        note(f"{what} of {n} images: fewer than the {d} feature dimensions + 1, so the covariance is singular "
             f"and the distance is biased high (compare only runs with the same count"
             + ("; the protocol uses 30,000)" if what.startswith("FID") else ")"))
    return features.mean(axis=0), np.cov(features, rowvar=False)


def require_covariance(n: int, what: str = "FID") -> None:
    """A Frechet distance needs a covariance, so at least 2 images: one line otherwise (a covariance of one image is
    NaN, whose matrix square root does not return)."""
    if n < 2:
        raise UserError(f"{what} needs at least 2 images for a covariance (got {n})"
                        + ("; the protocol uses 30,000" if what.startswith("FID") else ""))


def require_is_images(n: int, splits: int) -> None:
    """IS needs 2 images per split: a split of one image scores exactly 1 by definition."""
    if n < 2 * splits:
        raise UserError(f"IS needs at least {2 * splits} images (2 per split of {splits}: a split of one image scores "
                        f"exactly 1); got {n}")


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    check_finite(mu, sigma, str(path))
    np.savez(path, mu=mu, sigma=sigma)


def check_finite(mu: np.ndarray, sigma: np.ndarray, what: str) -> None:
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"FID statistics {what} are not finite (NaN or inf); rebuild them from at least 2 images "
                        f"with `bksdm fid-stats`")


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
    check_finite(mu, sigma, str(p))
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians: pytorch-fid's
    ``calculate_frechet_distance`` (Dougal Sutherland's stable version) step for step, so the value is the same
    to the last bit, with scipy's ``sqrtm`` called the way SciPy >= 1.18 accepts (pytorch-fid passes ``disp=False``,
    which 1.18 removes). Non-finite statistics are refused first (``sqrtm`` of a NaN matrix does not return)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"FID statistics of different sizes: {mu1.shape[0]} and {mu2.shape[0]} features")
    check_finite(mu1, sigma1, "of the images")
    check_finite(mu2, sigma2, "of the reference")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # product almost singular: pytorch-fid's offset
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error may leave a small imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"FID is undefined for these images (imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                            f"in the covariance square root): use more images (the protocol uses 30,000; fewer than "
                            f"the feature dimensions make the covariance singular)")
        covmean = covmean.real
    fd = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    if not np.isfinite(fd):
        raise UserError("the Frechet distance of these statistics is not finite; use more images")
    return fd


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm(a)`` with no keyword: the same matrix before and after SciPy 1.18 (which drops ``disp``
    and, from 1.20, the error estimate); its ill-conditioning warning is the caller's business (the offset above)."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def folder_stats(folder: str | Path, model, size: int | None = 256, batch: int = 50, device: str = "cpu",
                 lossless: bool = False, skips: Skips | None = None):
    """pytorch-fid statistics of every usable image in ``folder`` at ``size`` (the paper: val2014 at 256); unusable
    files are skipped and counted in ``skips`` (a new tally when None; a note says what was skipped and why).

    Default: the official route (:func:`official_resize`); ``lossless``: a bicubic resize in memory, no JPEG."""
    files = list_images(folder)
    skips = Skips() if skips is None else skips
    images = load_images(files, size, skips) if lossless or not size else official_images(files, size, skips)
    features = inception_features(images, model, batch, device)
    if skips.total:
        note(f"{folder}: {len(features)} of {len(files)} images used; {skips.summary()}")
    return stats(features, f"FID statistics of {folder}")


@torch.no_grad()
def inception_score(images: Iterable[Image.Image], model, batch: int = 50, splits: int = 10, device: str = "cpu") -> dict:
    """torch-fidelity's IS: ``logits_unbiased`` of its Inception, ``isc_features_to_metric``."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.cat([model(x.to(device))[0].cpu() for x in _uint8_batches(images, batch)])
    require_is_images(len(logits), splits)
    res = isc_features_to_metric(logits, splits=splits)
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
