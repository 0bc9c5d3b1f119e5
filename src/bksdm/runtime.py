"""Process settings applied once per command: how many CPU threads torch uses, and quiet libraries.

Threads: all free cores, never more.

torch's OpenMP threads spin while they wait for each other. On a 2-core machine with one other busy process, two
threads ran the mini world's distillation 13x slower than alone (3.3 vs 42.4 samples/s) while one thread kept
30.7: a thread that is descheduled holds every other one up. So ``auto`` (the default) counts the cores other
processes keep busy, over a quarter of a second at start, and takes the rest (at least one). On a quiet machine
that is every core: the quiet speed is unchanged. A program that starts later is not seen; ``--threads N`` (or
``BKSDM_THREADS``) fixes the count.
"""

from __future__ import annotations

import os
import time

from bksdm.errors import UserError


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window: float = 0.25) -> float:
    """Cores kept busy by other processes (this one sleeps meanwhile), measured over ``window`` seconds."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
        return 0.0
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def choose_threads(requested: str | int | None = None) -> int:
    """The thread count for ``requested``: a number, or ``auto`` (free cores of this process's CPU set)."""
    requested = requested or os.environ.get("BKSDM_THREADS") or "auto"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if str(requested) == "auto":
        return max(1, min(cores, cores - round(busy_cores())))
    if not str(requested).isdigit() or int(requested) < 1:
        raise UserError(f"--threads {requested!r}: a whole number of at least 1, or auto")
    return int(requested)


def set_threads(requested: str | int | None = None) -> int:
    """Apply :func:`choose_threads` to torch (intra-op threads) and return the count."""
    import torch

    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n


def quiet_libraries() -> None:
    """diffusers/transformers warn on every dtype cast and unexpected component type, and transformers draws a
    "Loading weights" bar per model; users see our messages and our progress bars."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
