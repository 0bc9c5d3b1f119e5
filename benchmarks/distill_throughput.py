"""`bksdm distill` throughput against a baseline that does per step what the public BK-SDM recipe does.

    python benchmarks/distill_throughput.py [--steps 3] [--batch 2] [--resolution 256] [--workdir /tmp/bksdm-bench]
    python benchmarks/distill_throughput.py --arch sdxl --student koala-700m --batch 1 --resolution 512 \
        --precision bf16 --no-ema

Both runs are the real recipe on the same full-size models (SD-v1.4 or --arch teacher with random weights -> bk-small
or --student),
the same data (mini-world pictures upscaled to --resolution), seed and settings (fp32, gradient checkpointing,
EMA). The baseline encodes every batch with the VAE and the text encoder and uses default AdamW and a per-tensor EMA
loop (diffusers' EMAModel default), as the public recipe does; bksdm reads a `bksdm cache` (built once, its time
reported apart) and uses fused AdamW and a foreach EMA update. The two runs go one after the other
(two full-size setups do not fit side by side in 24 GB); the first step of each (warm-up) is excluded.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, random_sd_folder  # noqa: E402


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bksdm.cli", *args], check=True)
    return time.perf_counter() - t0


def rates(out: Path) -> tuple[list[float], list[float]]:
    rows = list(csv.DictReader(open(out / "logs" / "losses.csv")))
    return [float(r["loss"]) for r in rows], [float(r["samples_per_s"]) for r in rows]


def steady_rate(cumulative: list[float], batch: int) -> float:
    """Samples/s after the first (warm-up) step, from the log's cumulative ``samples_per_s`` per step."""
    total = [batch * (i + 1) / x for i, x in enumerate(cumulative)]
    times = [t1 - t0 for t0, t1 in zip(total, total[1:])]
    return batch / (sum(times) / len(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--precision", default="no", help="mixed precision of both runs (no = fp32)")
    p.add_argument("--arch", default="sd-v1", help="teacher family, built with random weights (sd-v1, sdxl, ...)")
    p.add_argument("--student", default="bk-small", help="built-in spec of the student")
    p.add_argument("--no-ema", action="store_true", help="both runs without EMA (a full-size SDXL student's EMA "
                   "copy does not fit in 24 GB beside teacher, student and AdamW state)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bksdm-bench"))
    a = p.parse_args(argv)
    teacher = random_sd_folder(a.workdir / f"{a.arch}-random", a.arch)
    data = f"mini-world:{a.steps * a.batch}"
    common = ["distill", "--teacher", str(teacher), "--student", a.student, "--data", data, "--resolution",
              str(a.resolution), "--batch-size", str(a.batch), "--grad-accum", "1", "--max-steps", str(a.steps),
              "--mixed-precision", a.precision, "--num-workers", "0", "--checkpoint-every", "100000",
              "report_to=none", "random_flip=false"] + (["ema=false"] if a.no_ema else [])
    cache = a.workdir / f"cache-{a.arch}-{a.resolution}"
    t_cache = run(["cache", "--overwrite", "--teacher", str(teacher), "--data", data, "--out", str(cache), "--resolution",
                   str(a.resolution), "--no-flip", "--dtype", "fp32", "--batch-size", str(a.batch)])
    base, ours = a.workdir / f"baseline-{a.arch}", a.workdir / f"bksdm-{a.arch}"
    run(common + ["--out", str(base), "--overwrite", "fused_adam=false", "ema_foreach=false"])
    lb, rb = rates(base)
    shutil.rmtree(base)  # a full-size run's checkpoint and final pipeline: tens of GB that nothing reads again
    run(common + ["--out", str(ours), "--overwrite", "--cache", str(cache)])
    lo, ro = rates(ours)
    shutil.rmtree(ours)
    sb, so = steady_rate(rb, a.batch), steady_rate(ro, a.batch)
    print(f"machine: {machine()}")
    print(f"{a.arch} (random weights) -> {a.student}, {a.resolution} px, batch {a.batch}, {a.steps} steps, "
          f"precision {a.precision}, gradient checkpointing, {'no EMA' if a.no_ema else 'EMA'}; first step excluded")
    print("| run | s/step | samples/s | losses per step |")
    print("|---|---|---|---|")
    print(f"| baseline (VAE + text encoder(s) every step, default AdamW{'' if a.no_ema else ', looped EMA'}) | {a.batch / sb:.1f} | {sb:.3f} | {', '.join(f'{x:.5f}' for x in lb)} |")
    print(f"| bksdm (cache, fused AdamW{'' if a.no_ema else ', foreach EMA'}) | {a.batch / so:.1f} | {so:.3f} | {', '.join(f'{x:.5f}' for x in lo)} |")
    print(f"speed-up: {so / sb:.2f}x; max loss difference {max(abs(x - y) for x, y in zip(lb, lo)):.2e}; "
          f"one-off cache build {t_cache:.0f} s for {a.steps * a.batch} images")


if __name__ == "__main__":
    main()
