"""`bksdm evaluate` beside the reference command lines on the same folders: `python -m pytorch_fid` (FID) and
`fidelity --isc` (IS), with random-weight Inception networks of the real architectures (no download).

    python benchmarks/reference_metrics.py [--images 60]

Prints each number from both tools and whether they are equal; the FID route is the lossless one (the folders
already hold 256 px images, so nothing is resized or re-encoded on either side).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bksdm.evaluate.weights import FID_INCEPTION, ISC_INCEPTION, random_inception
from bksdm.mini.world import ShapesWorld


def folder(root: Path, name: str, seed: int, n: int) -> tuple[Path, Path]:
    """``n`` 256 px mini-world images named like MS-COCO files (JPEG 75), and the prompt csv naming them."""
    out = root / name
    out.mkdir()
    world = ShapesWorld(seed=seed)
    rows = []
    for i in range(n):
        image, caption = world.sample(i)[:2]
        file = f"COCO_val2014_{i * 7 + seed:012d}.jpg"
        image.resize((256, 256)).save(out / file)
        rows.append((file, caption))
    prompts = root / f"{name}.csv"
    with open(prompts, "w", newline="") as f:
        csv.writer(f).writerows([("file_name", "caption"), *rows[::-1]])  # reversed rows: order must not matter
    return out, prompts


def run(cmd: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return res.stdout + res.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ck = root / "torch_home" / "hub" / "checkpoints"
        ck.mkdir(parents=True)
        state = random_inception(0).state_dict()
        torch.save(state, ck / FID_INCEPTION)
        torch.save(state, ck / ISC_INCEPTION)
        env = {**os.environ, "TORCH_HOME": str(root / "torch_home"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        gen, prompts = folder(root, "gen", 1, args.images)
        ref, _ = folder(root, "ref", 2, args.images)

        fid_ref = float(re.search(r"FID:\s+([0-9.eE+-]+)", run(
            [sys.executable, "-m", "pytorch_fid", "--device", "cpu", "--num-workers", "0", str(gen), str(ref)], env)).group(1))
        is_out = run(["fidelity", "--cpu", "--isc", "--no-cache", "--input1", str(gen),
                      "--feature-extractor-weights-path", str(ck / ISC_INCEPTION)], env)
        found = re.search(r"inception_score_mean:\s+([0-9.eE+-]+)", is_out)
        if not found:
            sys.exit(f"fidelity printed no inception_score_mean:\n{is_out[-2000:]}")
        is_ref = float(found.group(1))
        ours_out = run([sys.executable, "-m", "bksdm.cli", "evaluate", "--images", str(gen), "--prompts", str(prompts),
                        "--metrics", "fid", "is", "--fid-ref", str(ref), "--lossless", "--device", "cpu"], env)
        ours = json.loads(next(line for line in ours_out.splitlines() if line.startswith("{")))
    print(f"{args.images} images of 256 px, random-weight Inception networks, CPU, torch {torch.__version__}")
    print("| metric | reference command | value | bksdm evaluate | equal |")
    print("|---|---|---:|---:|---|")
    # pytorch_fid prints FID with Python's default float repr; torch-fidelity prints 7 significant digits
    print(f"| FID | python -m pytorch_fid gen ref | {fid_ref!r} | {ours['fid']!r} | {fid_ref == ours['fid']} |")
    is_ours = f"{ours['is']:.7g}"
    print(f"| IS | fidelity --isc --input1 gen | {is_ref:.7g} | {is_ours} | {f'{is_ref:.7g}' == is_ours} |")


if __name__ == "__main__":
    main()
