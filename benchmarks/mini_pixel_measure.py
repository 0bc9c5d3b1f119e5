"""Validate the mini world's pixel measure: real pictures degraded in known ways, every mini metric side by side.

    python benchmarks/mini_pixel_measure.py --images 1000

Real world pictures of held-out prompts, clean, with added Gaussian noise (sigma 2, 4, 8 levels; rounded and
clipped to 8 bits, as a decoder's output is) and with a Gaussian blur (radius 0.5, 1, 2 px). A measure a person
would agree with must worsen monotonically along each ladder; the classifier measures were built to read shapes and
are expected to stay nearly flat. Prints a Markdown table with 95% bootstrap intervals (docs/mini-world.md).
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageFilter

from bksdm.mini import metrics as M
from bksdm.mini.world import ShapesWorld

LADDERS = [("clean", None), ("noise sigma 2", ("noise", 2)), ("noise sigma 4", ("noise", 4)),
           ("noise sigma 8", ("noise", 8)), ("blur radius 0.5", ("blur", 0.5)), ("blur radius 1", ("blur", 1.0)),
           ("blur radius 2", ("blur", 2.0))]


def degrade(images: list[Image.Image], how: tuple[str, float] | None, seed: int = 0) -> list[Image.Image]:
    """The pictures with Gaussian noise of ``sigma`` levels or a Gaussian blur of ``radius`` px (None: as they are)."""
    if how is None:
        return images
    kind, amount = how
    if kind == "blur":
        return [im.filter(ImageFilter.GaussianBlur(amount)) for im in images]
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(np.round(np.asarray(im, dtype=np.float64) + rng.normal(0, amount, (*im.size[::-1], 3))),
                                    0, 255).astype(np.uint8)) for im in images]


def measure(images: list[Image.Image], prompts: list[str], net) -> dict[str, float]:
    """fidelity, mini-FID and background noise of ``images`` (with their bootstrap intervals)."""
    from bksdm.evaluate.registry import EvalInputs

    x = EvalInputs([], prompts)
    x.cache["mini"] = (images, net)  # the registry's own functions, on pictures in memory
    res = {}
    for name in ("fidelity", "mini_fid", "bg_noise"):
        res.update(M.R.METRICS[name].compute(x))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    a = ap.parse_args()
    from bksdm.mini import classifier as C

    world = ShapesWorld(seed=0)
    samples = [world.sample(10**6 + i) for i in range(a.images)]  # the demo's held-out prompt range
    real, prompts = [s[0] for s in samples], [s[1] for s in samples]
    net = C.load()
    print(f"{a.images} real world pictures of held-out prompts\n")
    print("| pictures | prompt fidelity | mini-FID | background noise (levels) |\n|---|---|---|---|")
    for name, how in LADDERS:
        r = measure(degrade(real, how), prompts, net)
        cells = [f"{r[k]:.3f} [{r[k + '_lo']:.3f}, {r[k + '_hi']:.3f}]" if k == "fidelity" else
                 f"{r[k]:.1f} [{r[k + '_lo']:.1f}, {r[k + '_hi']:.1f}]" if k == "mini_fid" else
                 f"{r[k]:.2f} [{r[k + '_lo']:.2f}, {r[k + '_hi']:.2f}]" for k in ("fidelity", "mini_fid", "bg_noise")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
