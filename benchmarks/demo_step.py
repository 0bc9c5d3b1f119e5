"""The demo's distillation step, measured side by side: its recipe against the same recipe without guided KD, for
the demo's student (measured-small) and BK-Small.

    python benchmarks/demo_step.py [--steps 30] [--threads 2]

Each variant distils the shipped mini teacher's student for ``--steps`` steps of batch 16 with
``configs/distill_mini.yaml`` (the demo's recipe) in one process, one after the other; the figure is the median
seconds per step over the steps after the fifth (the trainer's own ``samples_per_s``). Guided KD's empty-prompt rows
ride in the batch's teacher and student calls (one call of n + n/4 rows), so the difference of the two columns is
what the term costs.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def main(argv=None) -> None:
    import torch

    from bksdm.compress import compress
    from bksdm.mini.teacher import teacher_path
    from bksdm.recipes.mini import distill_run, student_source

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    teacher = teacher_path()
    root = Path(tempfile.mkdtemp(prefix="bksdm-demo-step-"))
    print(f"# {machine()}, {a.threads} threads, {a.steps} steps of batch 16 per variant")
    print("| student | demo recipe (s/step) | without guided KD (s/step) | guided KD's share |")
    print("|---|---:|---:|---:|")
    for student in ("measured-small", "bk-small"):
        init = root / student
        compress(str(teacher), student_source(root, student), init)
        times = []
        for overrides in ({}, {"lambda_cfg": 0.0}):
            out = root / f"{student}-{len(times)}"
            distill_run(teacher, init, out, a.steps, checkpoint_every=10 ** 6, **overrides)
            rows = list(csv.DictReader(open(out / "logs" / "losses.csv")))[5:]
            times.append(16 / statistics.median(float(r["samples_per_s"]) for r in rows))
        print(f"| {student} | {times[0]:.3f} | {times[1]:.3f} | {1 - times[1] / times[0]:.0%} |", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
