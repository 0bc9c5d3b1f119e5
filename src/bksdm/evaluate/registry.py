"""Every image metric by name: what it computes, the result keys it writes, and one function per metric.

``bksdm evaluate --metrics NAME ...`` looks names up here; adding a metric is one :func:`register` call (the
evaluation loop, the unknown-name message and the Markdown columns follow; add the name to the CLI's help line).
Result keys are the constants below: callers never spell them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bksdm.errors import UserError

FID, IS, IS_STD, CLIP, FIDELITY, MINI_FID, BG_NOISE = "fid", "is", "is_std", "clip", "fidelity", "mini_fid", "bg_noise"
IS_SPLITS = 10  # torch-fidelity's and the paper's


@dataclass
class EvalInputs:
    """What a metric may read: the images (prompt-file order) and their prompts, and the evaluation options."""

    paths: list[Path]
    texts: list[str]
    size: int | None = 256  # images squashed to size x size for FID and IS (the paper: 256)
    fid_ref: str | None = None  # pytorch-fid .npz or a folder of real images
    lossless: bool = False  # a reference folder squashed in memory instead of the official JPEG route
    inception_weights: str | None = None
    isc_weights: str | None = None
    clip_name: str = "ViT-g-14"
    clip_pretrained: str = "laion2b_s34b_b88k"
    device: str = "cpu"
    batch: int = 50
    cache: dict[str, Any] = field(default_factory=dict)  # networks shared between metrics of one call
    # CMMD, clean-FID/KID and the preference scores (bksdm.evaluate.cmmd, .clean, .preference, .imagereward)
    cmmd_ref: str | None = None  # folder of real images or a .npy/.npz of their CLIP embeddings
    cmmd_clip: str = "openai/clip-vit-large-patch14-336"  # transformers folder or hub id
    clean_ref: str | None = None  # folder of real images or a .npz with clean-fid feats (N, 2048)
    clean_weights: str | None = None  # clean-fid's inception-2015-12-05.pt
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    hpsv2_weights: str | None = None  # HPS_v2_compressed.pt (or v2.1)
    imagereward_weights: str | None = None  # ImageReward.pt
    imagereward_tokenizer: str = "bert-base-uncased"  # BERT tokenizer folder or hub id


@dataclass(frozen=True)
class Metric:
    name: str
    keys: tuple[str, ...]  # result keys it writes; the first is its headline column
    compute: Callable[[EvalInputs], dict[str, float]]
    help: str
    per_image: bool = False  # also leaves each image's score in ``cache["per_image"][name]`` (``--per-image``)
    needs: tuple[tuple[str, str, str], ...] = ()  # (EvalInputs field, its flag, what it takes): a reference


METRICS: dict[str, Metric] = {}
ALIASES = {"mini-fid": MINI_FID}  # the first version's spelling
PROVIDERS = ("bksdm.evaluate.cmmd", "bksdm.evaluate.clean", "bksdm.evaluate.preference",
             "bksdm.evaluate.imagereward", "bksdm.mini.metrics")
"""Modules that register further metrics (by name, so this library does not depend on them): loaded on first use."""


def register(name: str, keys: tuple[str, ...], help: str, per_image: bool = False,
             needs: tuple[tuple[str, str, str], ...] = ()):
    def wrap(fn: Callable[[EvalInputs], dict[str, float]]):
        METRICS[name] = Metric(name, keys, fn, help, per_image, needs)
        return fn

    return wrap


def check_needs(metrics: list[Metric], options: dict[str, Any]) -> None:
    """One line naming the first option a chosen metric needs and ``options`` (EvalInputs fields) lacks, or a
    reference path that does not exist: checked before any image is generated or scored (the one place: the metric
    functions rely on it)."""
    for metric in metrics:
        for fieldname, flag, what in metric.needs:
            value = options.get(fieldname)
            if not value:
                raise UserError(f"{metric.name} needs {flag}: {what}")
            if not Path(value).exists():
                raise UserError(f"{metric.name}: {flag} {value} does not exist")


def load_providers() -> dict[str, Metric]:
    """Every registered metric, the providers' included."""
    import importlib

    for module in PROVIDERS:
        importlib.import_module(module)
    return METRICS


def resolve(names: list[str]) -> list[Metric]:
    """The metrics of ``names`` (aliases allowed), or a one-line error naming the unknown one and the choices."""
    load_providers()
    out = []
    for n in names:
        metric = METRICS.get(ALIASES.get(n, n))
        if metric is None:
            raise UserError(f"unknown metric {n!r}; choose from {', '.join(METRICS)}")
        out.append(metric)
    return out


def real_statistics(folder: str | Path, inputs: EvalInputs):
    """pytorch-fid (mu, sigma) of a folder of real images (official 256 px route unless ``lossless``): the one
    assembly of FID's reference side, used by ``evaluate`` and ``fid-stats``."""
    from bksdm.evaluate import metrics as M

    return M.folder_stats(folder, _fid_net(inputs), inputs.size, inputs.batch, inputs.device, inputs.lossless)


def _fid_net(inputs: EvalInputs):
    from bksdm.evaluate.weights import fid_inception

    if "fid" not in inputs.cache:
        inputs.cache["fid"] = fid_inception(inputs.inception_weights, inputs.device)
    return inputs.cache["fid"]


@register("fid", (FID,), "FID (pytorch-fid) against --fid-ref",
          needs=(("fid_ref", "--fid-ref", "a pytorch-fid .npz (mu, sigma) or a folder of real images"),))
def _fid(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M

    M.require_covariance(len(x.paths))  # before any network loads
    ref = Path(x.fid_ref)
    stored = None if ref.is_dir() else M.load_stats(ref, 2048)  # a bad file fails before any network runs
    net = _fid_net(x)
    mu, sigma = M.stats(M.inception_features(M.load_images(M.reference_order(x.paths), x.size), net, x.batch, x.device))
    mu2, sigma2 = real_statistics(ref, x) if stored is None else stored
    return {FID: M.frechet_distance(mu, sigma, mu2, sigma2)}


@register("is", (IS, IS_STD), "Inception Score (torch-fidelity, 10 splits)")
def _is(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M
    from bksdm.evaluate.weights import isc_inception

    M.require_is_images(len(x.paths), IS_SPLITS)  # before the network loads
    res = M.inception_score(M.load_images(M.reference_order(x.paths), x.size), isc_inception(x.isc_weights, x.device),
                            x.batch, IS_SPLITS, device=x.device)
    return {IS: res["is"], IS_STD: res["is_std"]}


@register("clip", (CLIP,), "CLIP score (open_clip, mean raw cosine)")
def _clip(x: EvalInputs) -> dict[str, float]:
    from bksdm.evaluate import metrics as M
    from bksdm.evaluate.weights import clip_model

    model, preprocess, tok = clip_model(x.clip_name, x.clip_pretrained, x.device)
    sims = M.clip_similarities(list(M.load_images(x.paths)), x.texts, model, preprocess, tok, device=x.device)
    return {CLIP: float(sims.mean())}
