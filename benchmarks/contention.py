"""Mini-world distillation and generation speed alone and beside one busy process, side by side in one run.

    python benchmarks/contention.py [--steps 12] [--images 50]

Four conditions for each job: quiet or beside a pure-Python busy loop (one core), and torch's default thread count
(`--threads 2` here, what every run used before) or bksdm's default (`--threads auto`: the cores other processes
leave free, measured at start). Distillation: `bksdm distill --config mini` on the shipped teacher -> bk-small,
samples/s averaged over the steps after the first two. Generation: `bksdm generate` of the teacher, images/s of
its generation loop (model loading excluded). Target: beside a busy process at least 50% of the quiet speed, and
the quiet speed of `auto` within 5% of the old default.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def bksdm(threads: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "BKSDM_THREADS")}
    return subprocess.run([sys.executable, "-m", "bksdm.cli", "--threads", threads, *args], check=True, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout


def distill_rate(threads: str, teacher: Path, student: Path, out: Path, steps: int) -> float:
    bksdm(threads, "distill", "--config", "mini", f"teacher={teacher}", f"student={student}", f"out={out}",
          f"max_steps={steps}", "checkpoint_every=100000", "log_every=1")
    rows = list(csv.DictReader(open(out / "logs" / "losses.csv")))
    # samples_per_s is cumulative from the run's start: rate over steps 3..N from two readings
    (s2, r2), (sn, rn) = [(int(rows[i]["step"]), float(rows[i]["samples_per_s"])) for i in (1, -1)]
    t2, tn = s2 / r2, sn / rn  # seconds until those steps, divided by the batch size
    return (sn - s2) / (tn - t2)  # samples/s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--images", type=int, default=50)
    args = ap.parse_args()
    from bksdm.compress import compress
    from bksdm.mini.teacher import teacher_path
    from bksdm.mini.world import ShapesWorld

    teacher = teacher_path(None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        compress(str(teacher), "bk-small", root / "student")
        prompts = root / "prompts.txt"
        prompts.write_text("\n".join(ShapesWorld(seed=7).prompts(args.images)))
        results = {}
        for load in ("quiet", "busy"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            time.sleep(1.0 if hog else 0)
            try:
                for policy, threads in (("torch default (2 threads)", "2"), ("bksdm auto", "auto")):
                    tag = f"{load}-{threads}"
                    d = distill_rate(threads, teacher, root / "student", root / f"run-{tag}", args.steps)
                    res = json.loads(bksdm(threads, "generate", "--model", str(teacher), "--prompts", str(prompts),
                                           "--out", str(root / f"gen-{tag}"), "--save-size", "0", "--lossless",
                                           "--batch-size", "25").strip().splitlines()[-1])
                    g = res["generated"] / res["seconds"]
                    print(f"{load:5s} {policy:26s} generate ran on {res['threads']} thread(s)", flush=True)
                    results[(load, policy)] = (d, g)
                    print(f"{load:5s} {policy:26s} distill {d:6.1f} samples/s  generate {g:5.2f} images/s", flush=True)
            finally:
                if hog:
                    hog.kill()
    print(f"\nmachine: {machine()}, {os.cpu_count()} cores; distillation {args.steps} steps of batch 32 "
          f"(rate after step 2), generation {args.images} images at 25 PNDM steps, batch 25 (generation loop)")
    print("| threads | quiet distill samples/s | busy distill samples/s | busy/quiet | quiet generate img/s | "
          "busy generate img/s | busy/quiet |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for policy in ("torch default (2 threads)", "bksdm auto"):
        (qd, qg), (bd, bg) = results[("quiet", policy)], results[("busy", policy)]
        print(f"| {policy} | {qd:.1f} | {bd:.1f} | {bd / qd:.2f} | {qg:.2f} | {bg:.2f} | {bg / qg:.2f} |")
    (od, og), (ad, ag) = results[("quiet", "torch default (2 threads)")], results[("quiet", "bksdm auto")]
    print(f"\nquiet speed of auto vs the old default: distill {ad / od:.2f}x, generate {ag / og:.2f}x")


if __name__ == "__main__":
    main()
