"""clean-FID and KID through the ``clean-fid`` package (Parmar et al., "On Aliased Resizing and Surprising Subtleties
in GAN Evaluation", CVPR 2022): its "clean" resizing and its feature extractor, so the numbers are ``cleanfid``'s.

* Features: ``cleanfid.fid.get_files_features(..., mode="clean")``: each file ``Image.open(p).convert("RGB")``,
  resized to 299 x 299 per channel in float with PIL's bicubic filter (no uint8 rounding), fed as 0..255 floats to
  the StyleGAN2-ADA TorchScript port of the TF Inception (``inception-2015-12-05.pt``), (N, 2048) pool features.
* clean-FID: the Frechet distance of those features' mean and covariance (:func:`bksdm.evaluate.metrics.
  frechet_distance`, the same Sutherland algorithm as ``cleanfid.fid.frechet_distance``, usable with every SciPy).
* KID: ``cleanfid.fid.kernel_distance`` (Binkowski et al. 2018: the unbiased MMD^2 under the cubic polynomial kernel
  ``(x.y / 2048 + 1)^3``, averaged over 100 random subsets of ``min(n, m, 1000)`` images). clean-fid draws the
  subsets from NumPy's global generator unseeded; here it is seeded with :data:`KID_SEED` for that call only (and
  restored), so ``bksdm`` equals ``np.random.seed(0); cleanfid.fid.compute_kid(images, reference)``.

Generated images are the prompt file's, in sorted-path order (clean-fid's folder order; KID's subsets are drawn by
position); the reference is a folder, read by ``cleanfid.fid.get_folder_features`` itself, or a ``.npz`` with
``feats`` (N, 2048) (what ``cleanfid.fid.make_custom_stats(..., metric="KID")`` saves). Values are raw (papers often
print KID x 1000).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bksdm.errors import UserError, reading
from bksdm.evaluate.registry import EvalInputs, register

CLEAN_FID, KID = "clean_fid", "kid"
CLEAN_INCEPTION = "inception-2015-12-05.pt"  # clean-fid's (StyleGAN2-ADA's) TorchScript Inception
CLEANFID_DOWNLOAD_DIR = "/tmp"  # where clean-fid itself downloads it (and looks for it) on Linux and macOS
KID_SEED = 0
KID_SUBSETS, KID_MAX_SUBSET = 100, 1000  # clean-fid's defaults
CLEAN_REF = "a folder of real images or a .npz with feats (N, 2048)"


def weights_file(given: str | None) -> Path | None:
    """The local ``inception-2015-12-05.pt``: ``given`` (``--clean-fid-weights``), else the torch hub cache copy,
    else clean-fid's own download place; None when online (clean-fid then downloads it); one line when offline."""
    from bksdm.evaluate.weights import hub_checkpoint, require
    from bksdm.hub import offline

    if given:
        return require(CLEAN_INCEPTION, given, "--clean-fid-weights", "clean-FID/KID (clean-fid Inception)")
    for cand in (hub_checkpoint(CLEAN_INCEPTION), Path(CLEANFID_DOWNLOAD_DIR) / CLEAN_INCEPTION):
        if cand.is_file():
            return cand
    if offline():
        raise UserError(f"clean-FID/KID needs {CLEAN_INCEPTION}, not found in {hub_checkpoint(CLEAN_INCEPTION).parent} "
                        f"(TORCH_HOME) or {CLEANFID_DOWNLOAD_DIR}; download it once (https://nvlabs-fi-cdn.nvidia.com/"
                        f"stylegan2-ada-pytorch/pretrained/metrics/{CLEAN_INCEPTION}) and pass --clean-fid-weights FILE")
    return None


def feature_extractor(weights: str | None = None, device: str = "cpu"):
    """clean-fid's feature function (0..255 float (B, 3, 299, 299) -> (B, 2048)): its ``InceptionV3W`` wrapper of the
    TorchScript file from :func:`weights_file`."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = weights_file(weights)
    if path is None:  # online, no copy: clean-fid's own download
        model = InceptionV3W(CLEANFID_DOWNLOAD_DIR, download=True)
    else:
        with tempfile.TemporaryDirectory() as tmp, reading(path, "clean-fid Inception weights", "download the file again"):
            if path.name == CLEAN_INCEPTION:
                model = InceptionV3W(str(path.parent), download=False)
            else:  # InceptionV3W reads DIR/inception-2015-12-05.pt only
                os.symlink(path.resolve(), Path(tmp) / CLEAN_INCEPTION)
                model = InceptionV3W(tmp, download=False)
    model = model.to(device).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    return features


def files_features(files: list[Path], fn, batch: int = 32, device: str = "cpu") -> np.ndarray:
    """(N, 2048) clean-mode features of ``files`` in that order (``cleanfid.fid.get_files_features``)."""
    from cleanfid.fid import get_files_features

    return get_files_features([str(f) for f in files], fn, num_workers=0, batch_size=batch, device=torch.device(device),
                              mode="clean", verbose=False)


def reference_features(ref: str | Path, fn, batch: int = 32, device: str = "cpu") -> np.ndarray:
    """(N, 2048) features of a reference folder (``cleanfid.fid.get_folder_features``: every image file below it,
    sorted) or of a ``.npz`` holding ``feats``."""
    p = Path(ref)
    if p.is_dir():
        from cleanfid.fid import get_folder_features

        with reading(p, "clean-fid reference folder", "remove or repair the unreadable image"):
            return get_folder_features(str(p), fn, num_workers=0, batch_size=batch, device=torch.device(device),
                                       mode="clean", verbose=False)
    return load_features(p)


def load_features(path: Path) -> np.ndarray:
    """(N, 2048) clean-fid features from a ``.npz`` holding ``feats``; a missing or malformed file is one line."""
    if not path.is_file():
        raise UserError(f"clean-FID/KID reference {path} does not exist; pass a folder of real images or a .npz with "
                        f"feats (N, 2048)")
    with reading(path, "clean-FID/KID reference features", "save them again (a .npz with feats)"), np.load(path) as f:
        feats = f["feats"]
    if feats.ndim != 2 or feats.shape[1] != 2048 or not np.isfinite(feats).all():
        raise UserError(f"{path} holds feats {feats.shape}; expected finite (N, 2048) clean-fid Inception features")
    return feats


def require_kid_images(n: int, m: int) -> None:
    """KID's subsets hold ``min(n, m, 1000)`` images and its unbiased estimate divides by (size - 1): at least 2
    images on each side, one line otherwise."""
    if min(n, m) < 2:
        raise UserError(f"KID needs at least 2 images on each side for its subsets (got {n} generated, {m} reference)")


def kid(feats: np.ndarray, ref: np.ndarray, seed: int = KID_SEED) -> float:
    """clean-fid's KID of (n, 2048) generated and (m, 2048) reference features, its subsets drawn after
    ``np.random.seed(seed)``; NumPy's global generator is restored afterwards."""
    from cleanfid.fid import kernel_distance

    require_kid_images(len(feats), len(ref))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(feats, ref, num_subsets=KID_SUBSETS, max_subset_size=KID_MAX_SUBSET))
    finally:
        np.random.set_state(state)


def _features(x: EvalInputs) -> tuple[np.ndarray, np.ndarray]:
    """(generated, reference) features, computed once per evaluate call for both metrics."""
    from bksdm.evaluate import metrics as M

    if "clean_feats" not in x.cache:
        ref = Path(x.clean_ref)
        if ref.is_dir():
            from bksdm.images import list_images

            list_images(ref, "clean-FID/KID reference folder")  # an empty one fails before the network loads
        stored = None if ref.is_dir() else load_features(ref)  # a bad file fails before the network loads
        fn = feature_extractor(x.clean_weights, x.device)
        gen = files_features(M.reference_order(x.paths), fn, x.batch, x.device)
        x.cache["clean_feats"] = (gen, reference_features(ref, fn, x.batch, x.device) if stored is None else stored)
    return x.cache["clean_feats"]


@register(CLEAN_FID, (CLEAN_FID,), "clean-FID (clean-fid package, mode clean) against --clean-fid-ref",
          needs=(("clean_ref", "--clean-fid-ref", CLEAN_REF),))
def _clean_fid(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M

    M.require_covariance(len(x.paths), "clean-FID")  # before any network loads
    gen, ref = _features(x)
    # float32 means and float64 covariances, as clean-fid's compare_folders computes them
    mu, sigma = M.stats(gen, "clean-FID")
    mu2, sigma2 = M.stats(ref, "clean-FID reference")
    return {CLEAN_FID: M.frechet_distance(mu, sigma, mu2, sigma2)}


@register(KID, (KID,), "KID (clean-fid package, mode clean, 100 subsets, seed 0) against --clean-fid-ref",
          needs=(("clean_ref", "--clean-fid-ref", CLEAN_REF),))
def _kid(x: EvalInputs) -> dict[str, float]:
    if len(x.paths) < 2:  # before any network loads
        raise UserError(f"KID needs at least 2 generated images for its subsets (got {len(x.paths)})")
    gen, ref = _features(x)
    return {KID: kid(gen, ref)}
