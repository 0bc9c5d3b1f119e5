"""`bksdm lcm` throughput with and without `bksdm cache`, on full-size models.

    python benchmarks/lcm_throughput.py [--steps 4] [--batch 2] [--resolution 256] [--workdir /tmp/bksdm-bench]

bk-small compressed from SD-v1.4 with random weights (latency does not depend on the values) is LCM-distilled
(full variant: guidance embedding, EMA target; the model is its own ODE teacher) on the same mini-world pictures
upscaled to --resolution, once encoding every batch with the VAE and text encoder, once reading a `bksdm cache`
(built once, its time reported apart). Same seed and settings (fp32, gradient checkpointing); the first step of each
run (warm-up) is excluded. The losses of the two runs must agree: the cache holds the same latent distribution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, random_sd_folder  # noqa: E402
from distill_throughput import rates, run, steady_rate  # noqa: E402


def main(argv=None) -> None:
    from bksdm.compress import compress

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bksdm-bench"))
    a = p.parse_args(argv)
    teacher = random_sd_folder(a.workdir / "sd-v1-random")
    student = a.workdir / "bk-small-random"
    if not (student / "model_index.json").is_file():
        compress(str(teacher), "bk-small", student, overwrite=True)
    data = f"mini-world:{a.steps * a.batch}"
    common = ["lcm", "--model", str(student), "--data", data, "--resolution", str(a.resolution), "--batch-size",
              str(a.batch), "--max-steps", str(a.steps), "--mixed-precision", "no", "--num-workers", "0",
              "--checkpoint-every", "100000", "report_to=none", "--overwrite"]
    cache = a.workdir / "lcm-cache"
    t_cache = run(["cache", "--teacher", str(student), "--data", data, "--out", str(cache), "--resolution",
                   str(a.resolution), "--no-flip", "--dtype", "fp32", "--batch-size", str(a.batch), "--overwrite"])
    run(common + ["--out", str(a.workdir / "lcm-plain")])
    run(common + ["--out", str(a.workdir / "lcm-cached"), "--cache", str(cache)])
    lp, rp = rates(a.workdir / "lcm-plain")
    lc, rc = rates(a.workdir / "lcm-cached")
    sp, sc = steady_rate(rp, a.batch), steady_rate(rc, a.batch)
    print(f"machine: {machine()}")
    print(f"bk-small (random weights, its own ODE teacher), LCM full variant, {a.resolution} px, batch {a.batch}, "
          f"{a.steps} steps, fp32, gradient checkpointing; first step excluded")
    print("| run | s/step | samples/s | losses per step |")
    print("|---|---|---|---|")
    print(f"| VAE + text encoder every step | {a.batch / sp:.1f} | {sp:.3f} | {', '.join(f'{x:.5f}' for x in lp)} |")
    print(f"| `--cache` | {a.batch / sc:.1f} | {sc:.3f} | {', '.join(f'{x:.5f}' for x in lc)} |")
    print(f"speed-up: {sc / sp:.2f}x; max loss difference {max(abs(x - y) for x, y in zip(lp, lc)):.2e}; "
          f"one-off cache build {t_cache:.0f} s for {a.steps * a.batch} images")


if __name__ == "__main__":
    main()
