"""Mini-world metrics: prompt fidelity, mini-FID, held-out denoising MSE and MSE to the teacher.

* prompt fidelity — the share of images in which the classifier reads exactly the prompted scene (every quadrant:
  the right kind, colour and size, or empty);
* mini-FID — Frechet distance between classifier features (128-d) of the images and of real world images drawn
  for the same prompts (from the same scenes' captions, the world's own jitter);
* background noise — the pixel-level measure: RMS difference, in 8-bit levels, between the pixels the prompt
  leaves empty and the world's flat background colour (real pictures: 0). The renderer knows, for every prompt,
  which pixels no jittered drawing of its shapes can touch (:func:`background_mask`); grain, tint and smeared
  edges there are what a person sees as a noisy picture, and what the classifier measures were built to ignore;
* held-out MSE / MSE to teacher — on a fixed set of (image, timestep, noise) triples from world indices never used
  in training: the model's error on its training target (epsilon or v; SD3: the flow velocity), and its distance
  to the teacher's prediction.

Fidelity, mini-FID and background noise come with a 95% bootstrap interval over the images
(:func:`bootstrap_interval`: ``KEY_lo``, ``KEY_hi``), so a difference inside the sampling noise is not read as a
ranking.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from bksdm.evaluate import registry as R
from bksdm.mini import classifier as C
from bksdm.mini.world import BACKGROUND, JITTER, SIZES, ShapesWorld, centre, parse_caption, render, shape_mask

HELDOUT_START = 5 * 10**6  # world indices of the held-out triples (training reads from 0 up)


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    from bksdm.mini.teacher import to_tensor

    return to_tensor([im.convert("RGB").resize((32, 32), Image.BICUBIC) if im.size != (32, 32) else im.convert("RGB")
                      for im in images])


@torch.no_grad()
def fidelity_hits(images: list[Image.Image], prompts: list[str], net: C.QuadrantNet | None = None) -> np.ndarray:
    """(N,) bool: whether the classifier reads exactly the prompted scene in each image."""
    net = net or C.load()
    read = C.predict(net, _tensor(images))
    return np.array([set(r) == set(parse_caption(p)) for r, p in zip(read, prompts)], dtype=bool)


def fidelity(images: list[Image.Image], prompts: list[str], net: C.QuadrantNet | None = None) -> float:
    return float(np.mean(fidelity_hits(images, prompts, net)))


ERRORS = ("missing", "extra", "kind", "colour", "size")


@torch.no_grad()
def fidelity_breakdown(images: list[Image.Image], prompts: list[str], net: C.QuadrantNet | None = None) -> dict[str, float]:
    """Where images go wrong, quadrant by quadrant: the share of images with at least one prompted shape not drawn
    (``missing``), a shape where the quadrant should be empty (``extra``), or a drawn shape of the wrong ``kind``,
    ``colour`` or ``size``; ``fidelity`` is the share with none of these."""
    net = net or C.load()
    read = C.predict(net, _tensor(images))
    counts = dict.fromkeys(ERRORS, 0)
    hits = 0
    for got, prompt in zip(read, prompts):
        want = {s.position: s for s in parse_caption(prompt)}
        have = {s.position: s for s in got}
        wrong = {"missing": any(q not in have for q in want), "extra": any(q not in want for q in have)}
        both = [(want[q], have[q]) for q in want if q in have]
        for attr in ("kind", "colour", "size"):
            wrong[attr] = any(getattr(a, attr) != getattr(b, attr) for a, b in both)
        for k, v in wrong.items():
            counts[k] += v
        hits += not any(wrong.values())
    n = max(len(prompts), 1)
    return {"fidelity": hits / n, **{k: v / n for k, v in counts.items()}}


def reference_images(prompts: list[str], seed: int = 0) -> list[Image.Image]:
    """Real world pictures of the prompts' scenes, jittered as the world jitters."""
    rng = np.random.default_rng(seed)
    return [render(parse_caption(p), 32, tuple((rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER))
                                               for _ in parse_caption(p)))
            for p in prompts]


@torch.no_grad()
def mini_fid_features(images: list[Image.Image], reference: list[Image.Image],
                      net: C.QuadrantNet | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 128) classifier features of the images and of their reference pictures (float64)."""
    net = net or C.load()
    return net.features(_tensor(images)).double().numpy(), net.features(_tensor(reference)).double().numpy()


def mini_fid(images: list[Image.Image], reference: list[Image.Image], net: C.QuadrantNet | None = None) -> float:
    f1, f2 = mini_fid_features(images, reference, net)
    return frechet_features(f1, f2)


def trace_sqrt_eig(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) as the sum of the square roots of the eigenvalues of S1 S2 (similar to the PSD matrix
    S1^1/2 S2 S1^1/2, so they are real and non-negative up to rounding): the same quantity sqrtm's trace is, stable
    where S1 S2 is singular, and 10x faster at 128 dimensions."""
    return float(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum())


def frechet_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """mini-FID of two (N, 128) feature sets: the FID formula (:func:`bksdm.evaluate.metrics.frechet_distance`,
    pytorch-fid's steps). With fewer images than 129 the covariances are singular and sqrtm can leave an imaginary
    part that FID refuses (a few images of the demo's smallest runs did); mini-FID then takes Tr sqrt(S1 S2) from the
    eigenvalues (:func:`trace_sqrt_eig`), which is the same quantity, and the note about singular covariances stands."""
    from bksdm.errors import UserError
    from bksdm.evaluate.metrics import frechet_distance, stats

    (m1, s1), (m2, s2) = stats(f1, "mini-FID"), stats(f2, "mini-FID")
    try:
        return frechet_distance(m1, s1, m2, s2)
    except UserError:
        if len(f1) > f1.shape[1] and len(f2) > f2.shape[1]:
            raise  # full-rank covariances: a real numerical problem, refused as FID refuses it
        d = m1 - m2
        return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_eig(s1, s2))


MARGIN = 1  # pixels kept clear around every place a shape may be drawn


def background_mask(prompt: str, size: int = 32) -> np.ndarray:
    """(size, size) bool: the pixels that no drawing of ``prompt``'s shapes touches, whatever the world's jitter
    (every centre within +-1.5 px at 32 px, on a 0.25 px grid), with :data:`MARGIN` px to spare. Empty quadrants
    are wholly background."""
    touched = np.zeros((size, size), dtype=bool)
    for s in parse_caption(prompt):
        touched |= _reach(s.kind, s.size, s.position, size)
    return ~touched


@functools.lru_cache(maxsize=None)
def _reach(kind: str, size_name: str, position: str, size: int) -> np.ndarray:
    """Every pixel one shape can cover under the world's jitter, dilated by :data:`MARGIN` (24 shapes x sizes)."""
    scale = size / 32
    cy0, cx0 = centre(position, size)
    offsets = np.arange(-JITTER, JITTER + 1e-9, 0.25) * scale
    touched = np.zeros((size, size), dtype=bool)
    for dy in offsets:
        for dx in offsets:
            touched |= shape_mask(kind, cy0 + dy, cx0 + dx, SIZES[size_name] * scale, size)
    m = max(1, round(MARGIN * scale))
    padded = np.pad(touched, m)  # dilation by a (2m+1)^2 square
    out = np.any([padded[m + dy:m + dy + size, m + dx:m + dx + size] for dy in range(-m, m + 1)
                  for dx in range(-m, m + 1)], axis=0)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def background_errors(images: list[Image.Image], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the sum of squared differences (8-bit levels, over the 3 channels) between its background pixels
    (:func:`background_mask`) and the world's background colour, and how many values were summed."""
    sse, count = np.zeros(len(images)), np.zeros(len(images))
    for i, (im, p) in enumerate(zip(images, prompts)):
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
        d = a[background_mask(p, a.shape[0])] - np.array(BACKGROUND, dtype=np.float64)
        sse[i], count[i] = float((d ** 2).sum()), d.size
    return sse, count


def background_noise(images: list[Image.Image], prompts: list[str]) -> float:
    """RMS difference (8-bit levels) between the background pixels of the images and the background colour."""
    sse, count = background_errors(images, prompts)
    return float(np.sqrt(sse.sum() / count.sum()))


def bootstrap_interval(statistic, n: int, estimate: float, resamples: int = 1000, seed: int = 0,
                       bounds: tuple[float, float] = (0.0, float("inf"))) -> tuple[float, float]:
    """95% normal bootstrap interval ``estimate +- 1.96 se`` of ``statistic(indices)`` over ``n`` images resampled
    with replacement (Efron and Tibshirani, 1993, ch. 13.3; ``se``: the replicates' standard deviation), clipped to
    the statistic's ``bounds``; ``resamples`` draws from a fixed seed, so it is reproducible. Normal rather than
    percentile: a Frechet distance grows when a resample repeats images, so its replicates sit above the estimate
    and their percentiles can miss it; their spread is still the sampling noise."""
    rng = np.random.default_rng(seed)
    se = float(np.std([statistic(rng.integers(0, n, n)) for _ in range(resamples)], ddof=1))
    return max(bounds[0], estimate - 1.96 * se), min(bounds[1], estimate + 1.96 * se)


@torch.no_grad()
def heldout_mse(model, teacher_model, text_parts: dict, vae, scheduler_config: dict, count: int = 256,
                batch: int = 64) -> dict[str, float]:
    """MSE to the training target and MSE to the teacher's prediction on ``count`` fixed held-out (image, timestep,
    noise) triples. ``model`` / ``teacher_model``: U-Nets or (SD3) transformers, called through their family's
    ``denoise``; the target is the objective ``scheduler_config`` names (:func:`bksdm.objectives.objective_for`):
    epsilon or v for the DDPM-trained U-Nets, the rectified-flow velocity ``eps - x0`` at SD3's logit-normal sigmas
    for a flow-matching teacher. ``text_parts``: the family's text components by name (SD: tokenizer,
    text_encoder; SDXL: both pairs; SD3: both CLIP pairs, and T5's when present), as
    :attr:`Family.text_components`."""
    from bksdm.arch.flow_families import family_for
    from bksdm.mini.teacher import to_tensor
    from bksdm.objectives import objective_for
    from bksdm.training import to_latent_space

    objective = objective_for(scheduler_config)  # DDPM: the draws of training.noisy_inputs, bit for bit
    family = family_for(model.config, text_parts)  # SD3: without T5 unless text_parts holds it
    world, gen = ShapesWorld(seed=0), torch.Generator().manual_seed(HELDOUT_START)
    err, dist = [], []
    for start in range(0, count, batch):
        n = min(batch, count - start)
        samples = [world.sample(HELDOUT_START + start + i) for i in range(n)]
        lat = to_latent_space(vae.encode(to_tensor([s[0] for s in samples])).latent_dist.mode(), vae.config)
        x, t, target = objective.sample(lat, gen)
        cond = family.encode_prompt(text_parts, [s[1] for s in samples], "cpu")
        cond.update(family.added_conditioning(n, samples[0][0].size[1], "cpu"))  # SDXL: size ids of 32 px pictures
        pred = family.denoise(model, x, t, cond).float()
        err.append(((pred - target) ** 2).mean(dim=(1, 2, 3)))
        if teacher_model is not None:
            dist.append(((pred - family.denoise(teacher_model, x, t, cond).float()) ** 2).mean(dim=(1, 2, 3)))
    out = {"heldout_mse": float(torch.cat(err).mean())}
    if dist:
        out["teacher_mse"] = float(torch.cat(dist).mean())
    return out


# the mini world's image metrics in `bksdm evaluate --metrics ...` (the registry loads this module by name)
def _loaded(x: R.EvalInputs) -> tuple[list[Image.Image], C.QuadrantNet]:
    """The generated images and the classifier, read once per evaluation however many mini metrics ask."""
    if "mini" not in x.cache:
        from bksdm.evaluate.metrics import opened

        x.cache["mini"] = (list(opened(x.paths)), C.load())
    return x.cache["mini"]


def _with_interval(key: str, value: float, statistic, n: int, resamples: int = 1000,
                   bounds: tuple[float, float] = (0.0, float("inf"))) -> dict[str, float]:
    lo, hi = bootstrap_interval(statistic, n, value, resamples, bounds=bounds)
    return {key: value, f"{key}_lo": lo, f"{key}_hi": hi}


def _keys(key: str) -> tuple[str, str, str]:
    return key, f"{key}_lo", f"{key}_hi"


@R.register("fidelity", _keys(R.FIDELITY), "mini world: share of images showing exactly the prompted scene")
def _fidelity(x: R.EvalInputs) -> dict[str, float]:
    images, net = _loaded(x)
    hits = fidelity_hits(images, x.texts, net).astype(np.float64)
    return _with_interval(R.FIDELITY, float(hits.mean()), lambda i: hits[i].mean(), len(hits), bounds=(0.0, 1.0))


@R.register("mini_fid", _keys(R.MINI_FID), "mini world: Frechet distance in the attribute classifier's features")
def _mini_fid(x: R.EvalInputs) -> dict[str, float]:
    images, net = _loaded(x)
    f1, f2 = mini_fid_features(images, reference_images(x.texts), net)
    value = frechet_features(f1, f2)

    def resampled(i):  # the same prompts on both sides: images and their reference pictures resampled together
        s1, s2 = np.cov(f1[i], rowvar=False), np.cov(f2[i], rowvar=False)
        d = f1[i].mean(0) - f2[i].mean(0)
        return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_eig(s1, s2))  # a replicate feeds the spread

    return _with_interval(R.MINI_FID, value, resampled, len(f1), resamples=200)


@R.register("bg_noise", _keys(R.BG_NOISE), "mini world: RMS difference (8-bit levels) of the pixels the prompt leaves "
            "empty from the flat background colour (real pictures: 0)")
def _bg_noise(x: R.EvalInputs) -> dict[str, float]:
    images, _ = _loaded(x)
    sse, count = background_errors(images, x.texts)
    return _with_interval(R.BG_NOISE, float(np.sqrt(sse.sum() / count.sum())),
                          lambda i: np.sqrt(sse[i].sum() / count[i].sum()), len(sse))
