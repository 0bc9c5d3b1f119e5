"""Images/s of `bksdm generate` at batch 1 against larger batches, with the outputs shown identical.

    python benchmarks/generate_batch.py [--model MINI_TEACHER] [--prompts 24] [--batches 1 4 12 24] [--steps 25]

Default model: the shipped mini-world teacher (32 px). Every batch size generates the same prompts into its own
folder; the largest pixel difference to the batch-1 images is printed beside the throughput.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def main(argv=None) -> None:
    from bksdm.generate import generate
    from bksdm.mini.teacher import teacher_path
    from bksdm.mini.world import ShapesWorld

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 12, 24])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--dtype", default=None)
    a = p.parse_args(argv)
    model = a.model or str(teacher_path())
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(ShapesWorld(seed=1).prompts(a.prompts)))
        generate(model, prompts, Path(tmp) / "warm", steps=2, batch_size=4, save_size=None, dtype=a.dtype, limit=4, lossless=True)
        rows = []
        for b in a.batches:
            t0 = time.perf_counter()
            generate(model, prompts, Path(tmp) / f"b{b}", steps=a.steps, batch_size=b, save_size=None, dtype=a.dtype,
                     lossless=True)  # PNG: the pixel comparison sees the model, not JPEG
            rows.append((b, a.prompts / (time.perf_counter() - t0)))
        ref = Path(tmp) / f"b{a.batches[0]}" / "images"
        diffs = {}
        for b, _ in rows:
            d = 0
            for f in ref.iterdir():
                x = np.asarray(Image.open(f), dtype=np.int16)
                y = np.asarray(Image.open(Path(tmp) / f"b{b}" / "images" / f.name), dtype=np.int16)
                d = max(d, int(np.abs(x - y).max()))
            diffs[b] = d
    print(f"machine: {machine()}; model {model}; {a.prompts} prompts, {a.steps} PNDM steps, guidance 7.5")
    print("| batch | images/s | speed-up vs batch 1 | max pixel difference to batch 1 (0-255) |")
    print("|---|---|---|---|")
    for b, r in rows:
        print(f"| {b} | {r:.2f} | {r / rows[0][1]:.2f}x | {diffs[b]} |")


if __name__ == "__main__":
    main()
