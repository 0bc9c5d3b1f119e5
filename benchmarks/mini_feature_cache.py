"""Feature caching across steps (DeepCache-style, `generate --cache-interval N`) in the mini world: what it costs
in prompt fidelity, mini-FID and background noise, next to what it saves, for the shipped teacher and a student.

    python benchmarks/mini_feature_cache.py --student DEMO/distill/final [--prompts DEMO/prompts.txt]
        [--intervals 1 2 3] [--branches 0 1] [--out /tmp/bksdm-mini-cache]

Every model and setting generates the same held-out prompts (the demo's 300 by default) at 25 PNDM steps and is
scored by the mini world's metrics with their bootstrap intervals; the time is `generate`'s own, measured in one
run side by side, and the MAC share of a cached U-Net call comes from `bksdm.profile`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def main(argv=None) -> None:
    from bksdm.mini.teacher import teacher_path
    from bksdm.mini.world import ShapesWorld
    from bksdm.recipes.mini import score

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", type=Path, required=True, help="a distilled mini student (the demo's distill/final)")
    p.add_argument("--prompts", type=Path, default=None, help="held-out prompts (default: 300 new ones)")
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--branches", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/bksdm-mini-cache"))
    a = p.parse_args(argv)
    if 1 not in a.intervals:
        p.error("--intervals must include 1: the uncached run every row is compared with")
    a.out.mkdir(parents=True, exist_ok=True)
    prompts = a.prompts
    if prompts is None:
        prompts = a.out / "prompts.txt"
        prompts.write_text("\n".join(ShapesWorld(seed=1).prompts(300)) + "\n")
    rows = []
    for name, folder in (("teacher", teacher_path(None, "sd")), ("student", a.student)):
        for branch in a.branches:
            for k in a.intervals:
                if k == 1 and branch != a.branches[0]:
                    continue  # no caching: the branch does not matter
                res = score(folder, prompts, a.out / f"{name}-b{branch}-n{k}", cache_interval=k, cache_branch=branch)
                rows.append({"model": name, "branch": branch, "interval": k, **res})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {machine()}; 25 PNDM steps, 32 px, {len(prompts.read_text().splitlines())} prompts")
    print("| model | cache | prompt fidelity | mini-FID | background noise | generate s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["interval"] == 1)
        cache = "none" if r["interval"] == 1 else f"every {r['interval']}, branch {r['branch']}"
        print(f"| {r['model']} | {cache} | {r['fidelity']:.3f} [{r['fidelity_lo']:.3f}, {r['fidelity_hi']:.3f}] | "
              f"{r['mini_fid']:,.0f} [{r['mini_fid_lo']:,.0f}, {r['mini_fid_hi']:,.0f}] | {r['bg_noise']:.2f} "
              f"[{r['bg_noise_lo']:.2f}, {r['bg_noise_hi']:.2f}] | {r['generate_seconds']:.1f} | "
              f"{base['generate_seconds'] / r['generate_seconds']:.2f}x |")
    (a.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
