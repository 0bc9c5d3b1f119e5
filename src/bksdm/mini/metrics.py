"""Mini-world metrics: prompt fidelity, mini-FID, held-out denoising MSE and MSE to the teacher.

* prompt fidelity — the share of images in which the classifier reads exactly the prompted scene (every quadrant:
  the right kind, colour and size, or empty);
* mini-FID — Frechet distance between classifier features (128-d) of the images and of real world images drawn
  for the same prompts (from the same scenes' captions, the world's own jitter);
* held-out MSE / MSE to teacher — on a fixed set of (image, timestep, noise) triples from world indices never used
  in training: the model's error on its training target (epsilon or v), and its distance to the teacher's
  prediction.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from bksdm.evaluate import registry as R
from bksdm.mini import classifier as C
from bksdm.mini.world import ShapesWorld, parse_caption, render

HELDOUT_START = 5 * 10**6  # world indices of the held-out triples (training reads from 0 up)


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    from bksdm.mini.teacher import to_tensor

    return to_tensor([im.convert("RGB").resize((32, 32), Image.BICUBIC) if im.size != (32, 32) else im.convert("RGB")
                      for im in images])


@torch.no_grad()
def fidelity(images: list[Image.Image], prompts: list[str], net: C.QuadrantNet | None = None) -> float:
    net = net or C.load()
    read = C.predict(net, _tensor(images))
    hits = [set(r) == set(parse_caption(p)) for r, p in zip(read, prompts)]
    return float(np.mean(hits))


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
    return [render(parse_caption(p), 32, tuple((rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)) for _ in parse_caption(p)))
            for p in prompts]


@torch.no_grad()
def mini_fid(images: list[Image.Image], reference: list[Image.Image], net: C.QuadrantNet | None = None) -> float:
    from bksdm.evaluate.metrics import frechet_distance, stats

    net = net or C.load()
    f1 = net.features(_tensor(images)).double().numpy()
    f2 = net.features(_tensor(reference)).double().numpy()
    return frechet_distance(*stats(f1, "mini-FID"), *stats(f2, "mini-FID"))


@torch.no_grad()
def heldout_mse(unet, teacher_unet, text_parts: dict, vae, scheduler_config: dict, count: int = 256,
                batch: int = 64) -> dict[str, float]:
    """MSE to the training target (epsilon or v, as ``scheduler_config`` says) and MSE to the teacher's prediction
    on ``count`` fixed held-out (image, timestep, noise) triples. ``text_parts``: the family's text components by
    name (SD: tokenizer, text_encoder; SDXL: both pairs), as :attr:`Family.text_components`."""
    from diffusers import DDPMScheduler

    from bksdm.mini.teacher import to_tensor
    from bksdm.arch.families import family_of
    from bksdm.training import noisy_inputs

    sched = DDPMScheduler.from_config(scheduler_config)
    family = family_of(unet.config)
    world, gen = ShapesWorld(seed=0), torch.Generator().manual_seed(HELDOUT_START)
    err, dist = [], []
    for start in range(0, count, batch):
        n = min(batch, count - start)
        samples = [world.sample(HELDOUT_START + start + i) for i in range(n)]
        lat = vae.encode(to_tensor([s[0] for s in samples])).latent_dist.mode() * vae.config.scaling_factor
        x, t, target = noisy_inputs(sched, lat, gen)
        cond = family.encode_prompt(text_parts, [s[1] for s in samples], "cpu")
        cond.update(family.added_conditioning(n, samples[0][0].size[1], "cpu"))  # SDXL: size ids of 32 px pictures
        kwargs = family.unet_kwargs(cond)
        pred = unet(x, t, **kwargs).sample.float()
        err.append(((pred - target) ** 2).mean(dim=(1, 2, 3)))
        if teacher_unet is not None:
            dist.append(((pred - teacher_unet(x, t, **kwargs).sample.float()) ** 2).mean(dim=(1, 2, 3)))
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


@R.register("fidelity", (R.FIDELITY,), "mini world: share of images showing exactly the prompted scene")
def _fidelity(x: R.EvalInputs) -> dict[str, float]:
    images, net = _loaded(x)
    return {R.FIDELITY: fidelity(images, x.texts, net)}


@R.register("mini_fid", (R.MINI_FID,), "mini world: Frechet distance in the attribute classifier's features")
def _mini_fid(x: R.EvalInputs) -> dict[str, float]:
    images, net = _loaded(x)
    return {R.MINI_FID: mini_fid(images, reference_images(x.texts), net)}
