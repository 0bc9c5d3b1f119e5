"""Where each metric network's weights come from, and a fast, explicit failure when they are not there.

Nothing here retries a download for a minute: a missing file is reported at once with the file name, where it was
looked for, and the flag that takes a local copy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from bksdm.errors import UserError, reading
from bksdm.hub import offline

FID_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID Inception
ISC_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception (IS)


def hub_checkpoint(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def require(name: str, given: str | None, flag: str, what: str) -> Path:
    """The local weight file for ``what``: ``given`` if passed, else the torch hub cache copy.

    Downloading is left to the metric library only when online (HF_HUB_OFFLINE unset) and returns None there.
    """
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"{what} weights {path} do not exist")
        return path
    cached = hub_checkpoint(name)
    if cached.is_file():
        return cached
    raise UserError(f"{what} needs {name}, not found in {cached.parent} (TORCH_HOME); download it once and pass "
                    f"{flag} FILE or put it there")


def checkpoint_file(given: str | None, own: Path, repo: str, filename: str, what: str, flag: str) -> Path:
    """A metric checkpoint: ``given`` (the option's value), else ``own`` (where the metric's own package downloads
    it), else the Hugging Face cache copy of ``repo``/``filename``; otherwise one line naming the file, where it was
    looked for and ``flag``."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"{what} weights {path} do not exist")
        return path
    if own.is_file():
        return own
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:
        pass
    raise UserError(f"{what} needs {filename} (hub {repo}), not found in {own.parent} or the Hugging Face cache; "
                    f"download it once and pass {flag} FILE")


def fid_inception(weights: str | None = None, device: str = "cpu"):
    """pytorch-fid's InceptionV3 (2048-d pool features), from ``weights`` or the torch hub cache."""
    from pytorch_fid.inception import InceptionV3

    path = require(FID_INCEPTION, weights, "--inception-weights", "FID (pytorch-fid Inception)") if (weights or offline()) else None
    if path is None or path == hub_checkpoint(FID_INCEPTION):
        with reading(path or hub_checkpoint(FID_INCEPTION), "FID Inception weights", "download the file again"):
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    else:  # pytorch-fid only reads its hub cache: expose the given file there under a temporary TORCH_HOME
        # (not torch.hub.set_dir: once set, it would pin the hub dir for the rest of the process)
        old = os.environ.get("TORCH_HOME")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "hub" / "checkpoints").mkdir(parents=True)
            (Path(tmp) / "hub" / "checkpoints" / FID_INCEPTION).symlink_to(path.resolve())
            os.environ["TORCH_HOME"] = tmp
            try:
                with reading(path, "FID Inception weights", "download the file again"):
                    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
            finally:
                os.environ.pop("TORCH_HOME") if old is None else os.environ.__setitem__("TORCH_HOME", old)
    return model.to(device).eval()


def isc_inception(weights: str | None = None, device: str = "cpu"):
    """torch-fidelity's InceptionV3 producing ``logits_unbiased`` (what its IS uses)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = require(ISC_INCEPTION, weights, "--isc-weights", "IS (torch-fidelity Inception)") if (weights or offline()) else None
    with reading(path or "(torch-fidelity's download)", "IS Inception weights", "download the file again"):
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                            feature_extractor_weights_path=str(path) if path else None)
    return model.to(device).eval()


def clip_model(name: str = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k", device: str = "cpu"):
    """(model, preprocess, tokenizer) from open_clip; ``pretrained`` is a tag or a local checkpoint file."""
    import open_clip

    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r}")
    local = Path(pretrained).is_file()
    if not local and offline():
        tags = [t for m, t in open_clip.list_pretrained() if m == name]
        if pretrained not in tags:
            raise UserError(f"open_clip {name} has no pretrained tag {pretrained!r} and no such file exists")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    except Exception as exc:
        raise UserError(f"CLIP score needs open_clip {name} weights {pretrained!r}, which could not be loaded "
                        f"({type(exc).__name__}; offline={offline()}); download the checkpoint once and pass "
                        f"--clip-pretrained FILE") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def random_inception(seed: int = 0, calibrate: bool = True) -> torch.nn.Module:
    """pytorch-fid's FID Inception architecture (1008 classes) with random weights, for offline checks of the metric
    code paths; torch-fidelity's IS Inception reads the same state dict keys.

    Freshly initialised, its batch-norm statistics (mean 0, variance 1) shrink every feature to nearly the same
    value (FID ~1e-15, IS exactly 1); so the statistics are taken from 16 noise images, which makes features and
    class probabilities differ between images as a trained network's do, and the classifier is scaled down so that
    torch-fidelity's softmax is not one-hot (IS would be NaN). ``calibrate=False`` keeps the fresh network, whose
    near-constant features keep FID of a dozen images well-conditioned."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2, _inception_v3

    torch.manual_seed(seed)
    m = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
    m.Mixed_5b, m.Mixed_5c, m.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    m.Mixed_6b, m.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    m.Mixed_6d, m.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    m.Mixed_7b, m.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    if not calibrate:
        return m.eval()
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        m.train()(torch.rand(16, 3, 299, 299, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
        m.fc.weight.mul_(0.1)
    return m.eval()
