"""CMMD: the maximum mean discrepancy between CLIP image embeddings (Jayasumana et al., "Rethinking FID: Towards a
Better Evaluation Metric for Image Generation", CVPR 2024), as its reference implementation computes it.

Reference: google-research ``cmmd`` (JAX) and its PyTorch port ``sayakpaul/cmmd-pytorch`` (the one whose numbers the
docs cite). Pipeline, step for step:

* image -> RGB, centre crop to a square (side ``min(w, h)``, offsets ``(w - side) // 2``, ``(h - side) // 2``), PIL
  bicubic resize to the CLIP input size (336 px), float32 ``/ 255``;
* CLIP ViT-L/14 at 336 px (``openai/clip-vit-large-patch14-336``, ``CLIPVisionModelWithProjection``): the image
  processor's mean/std normalisation only, ``image_embeds`` (N, 768), each divided by its L2 norm;
* MMD with the Gaussian RBF kernel ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``, sigma = 10, times 1000:
  ``1000 (mean K_xx + mean K_yy - 2 mean K_xy)``, means over all pairs, the diagonal included: the reference's
  minimum-variance (biased, V-statistic) form of Gretton et al. 2012, Eq. (5) (their Lemma 6: within O(1/n) of the
  unbiased one). Computed in float32 with the reference's expansion ``||x||^2 + ||y||^2 - 2 x.y``, so the value is
  the reference's to its last digits. That float32 rounding is itself up to about 1e-4 absolute on CMMD (4e-5
  measured on 13 images against a float64 evaluation): print CMMD to 3 decimals, as the paper does.

Differences, on purpose: every image is used (the JAX original drops ``N mod batch`` images after batching; the
PyTorch port keeps them: use a batch size dividing N to compare with the JAX one), and images open through
:func:`bksdm.images.open_image` (EXIF orientation, alpha on white; an ordinary RGB file reads the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from bksdm.errors import UserError, reading
from bksdm.evaluate.registry import EvalInputs, register

CMMD = "cmmd"
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
SIGMA = 10.0  # the reference's RBF bandwidth
SCALE = 1000.0  # the reference's display scale
EMBEDDINGS_KEY = "embeddings"


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """The centred ``min(w, h)`` square of ``image``, resized to ``size`` x ``size`` with PIL's bicubic filter
    (which antialiases), as the reference reads every image."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)


def clip_embedder(model: str = CLIP_L14_336, device: str = "cpu"):
    """(vision model, image processor) of a transformers CLIP folder or hub id (``--cmmd-clip``); offline without
    it, one line naming the repository and the flag."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from bksdm.hub import resolve_weights_folder

    folder = resolve_weights_folder(model, "CMMD's CLIP (pass --cmmd-clip DIR)")
    with reading(folder, "CMMD CLIP model", f"download {CLIP_L14_336} again and pass --cmmd-clip DIR"):
        net = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(folder)
    return net, processor


@torch.no_grad()
def embeddings(images: Iterable[Image.Image], net, processor, batch: int = 32, device: str = "cpu") -> np.ndarray:
    """(N, D) float32 L2-normalised CLIP image embeddings of PIL RGB images (D = 768 for ViT-L/14)."""
    size = int(processor.crop_size["height"])
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    out = [np.zeros((0, net.config.projection_dim), dtype=np.float32)]
    buf: list[np.ndarray] = []

    def flush() -> None:
        x = torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2)  # (B, 3, S, S) in [0, 1]
        x = ((x - mean) / std).contiguous().to(device)
        e = net(pixel_values=x).image_embeds.float().cpu()
        out.append((e / torch.linalg.norm(e, dim=-1, keepdim=True)).numpy())
        buf.clear()

    for im in images:
        buf.append(np.asarray(centre_square(im, size), dtype=np.float32) / np.float32(255.0))
        if len(buf) == batch:
            flush()
    if buf:
        flush()
    return np.concatenate(out).astype(np.float32)


def mmd(x: np.ndarray, y: np.ndarray, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """``scale`` x the minimum-variance MMD^2 estimate between (n, D) and (m, D) embeddings under the Gaussian RBF
    kernel of bandwidth ``sigma`` (Gretton et al. 2012, Eq. 5; CMMD's reference definition), in float32 as the
    reference computes it. Needs n, m >= 1 and equal D."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise UserError(f"CMMD embeddings of different shapes: {x.shape} and {y.shape}")
    if len(x) == 0 or len(y) == 0:
        raise UserError("CMMD needs at least 1 image on each side")
    a, b = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(y, np.float32))
    gamma = 1.0 / (2.0 * sigma ** 2)

    def mean_kernel(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        uu, vv = torch.diag(u @ u.T), torch.diag(v @ v.T)
        return torch.mean(torch.exp(-gamma * (-2 * (u @ v.T) + uu[:, None] + vv[None, :])))

    return float(scale * (mean_kernel(a, a) + mean_kernel(b, b) - 2 * mean_kernel(a, b)))


def save_embeddings(path: str | Path, emb: np.ndarray) -> None:
    """Write (N, D) reference embeddings as ``.npy`` (what the reference's ``--ref_embed_file`` reads) or ``.npz``
    (array ``embeddings``)."""
    if not np.isfinite(emb).all():
        raise UserError(f"CMMD embeddings for {path} are not finite")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".npz"):
        np.savez(path, **{EMBEDDINGS_KEY: emb})
    else:
        np.save(path, emb)


def load_embeddings(path: str | Path) -> np.ndarray:
    """(N, D) float32 embeddings from a ``.npy`` or a ``.npz`` holding ``embeddings``; one line when it is not."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"CMMD reference {p} does not exist; pass a folder of real images or build the file with "
                        f"`bksdm cmmd-stats --images DIR --out {p.name}`")
    with reading(p, "CMMD reference embeddings", "build it again with `bksdm cmmd-stats`"):
        data = np.load(p)
        emb = data[EMBEDDINGS_KEY] if isinstance(data, np.lib.npyio.NpzFile) else data
    if emb.ndim != 2 or not np.isfinite(emb).all():
        raise UserError(f"{p} holds {emb.shape} {'finite' if np.isfinite(emb).all() else 'non-finite'} values; "
                        f"expected finite (N, D) CLIP embeddings")
    return emb.astype(np.float32)


def folder_embeddings(folder: str | Path, x: EvalInputs) -> np.ndarray:
    """Embeddings of every usable image of ``folder`` (sorted by name, as the reference reads it); unusable files
    are skipped with a note."""
    from bksdm.evaluate import metrics as M
    from bksdm.images import list_images
    from bksdm.skips import Skips

    files = list_images(folder)  # a missing or empty folder fails before CLIP loads
    net, processor = _net(x)
    skips = Skips()
    emb = embeddings(M.opened(files, skips), net, processor, x.batch, x.device)
    if skips.total:
        from bksdm.errors import note

        note(f"{folder}: {len(emb)} of {len(files)} images used for CMMD; {skips.summary()}")
    return emb


def _net(x: EvalInputs):
    if "cmmd" not in x.cache:
        x.cache["cmmd"] = clip_embedder(x.cmmd_clip, x.device)
    return x.cache["cmmd"]


@register(CMMD, (CMMD,), "CMMD (CLIP ViT-L/14-336 RBF MMD x1000, google-research cmmd) against --cmmd-ref",
          needs=(("cmmd_ref", "--cmmd-ref", "a folder of real images or a .npy of their CLIP embeddings "
                                            "(bksdm cmmd-stats)"),))
def _cmmd(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M

    ref = Path(x.cmmd_ref)
    stored = None if ref.is_dir() else load_embeddings(ref)  # a bad file fails before any network loads
    net, processor = _net(x)
    emb = embeddings(M.opened(M.reference_order(x.paths)), net, processor, x.batch, x.device)
    ref_emb = folder_embeddings(ref, x) if stored is None else stored
    return {CMMD: mmd(ref_emb, emb)}
