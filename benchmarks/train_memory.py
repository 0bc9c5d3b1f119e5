"""Training memory per GPU of FLUX.1-dev -> Flux-Mini and SD3.5-Large -> bk-small distillation, by part (issue 25).

    python benchmarks/train_memory.py [--resolution 1024] [--batch 1] [--shards 1 2 4 8]

Everything on the meta device (no weights, no GPU, about a second per column): weights, gradients and optimiser
states computed from the configs, activations measured with saved_tensors_hooks (``bksdm.memory``). bf16 mixed
precision, AdamW, feature KD at the derivation's segment ends, teacher sharded with the student. Not included in any
column: the CUDA context and NCCL buffers (about 0.5-1 GB per process), the allocator's fragmentation, transient
peaks of kernels and of the backward. Output: docs/sharding.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from bksdm.arch import dit
from bksdm.arch.dit_configs import DIT_CONFIGS, TEXT_TOKENS
from bksdm.arch.spec import load_spec
from bksdm.memory import TOTAL, gib, table, train_memory

RUNS = (("FLUX.1-dev -> Flux-Mini", "flux-dev", "flux-mini"), ("SD3.5-Large -> bk-small", "sd3.5-large", "bk-small"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=1024, help="image side in px")
    p.add_argument("--batch", type=int, default=1, help="samples per GPU")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8], help="FSDP / ZeRO-3 processes")
    a = p.parse_args(argv)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; meta device")
    for title, arch, spec in RUNS:
        teacher = DIT_CONFIGS[arch]
        der = dit.derive(teacher, load_spec(spec, teacher), with_keys=False)
        tokens = TEXT_TOKENS[arch]
        common = dict(resolution=a.resolution, text_tokens=tokens, batch=a.batch, feature_points=der.layer_pairs)
        args = (teacher, der.student_config)
        cols = [(f"{n} GPU{'s' if n > 1 else ''}", train_memory(*args, shards=n, **common)) for n in a.shards]
        print(f"\n## {title}: {a.resolution} px, batch {a.batch} per GPU, {tokens} text tokens, bf16, AdamW, "
              f"{len(der.layer_pairs)} feature points, flash attention\n")
        print(table(cols))
        print("\nVariants (total GiB per GPU, by shards " + ", ".join(map(str, a.shards)) + "):\n")
        variants = {
            "as above": {},
            "math attention (probabilities saved)": dict(attention="math"),
            "gradient checkpointing": dict(gradient_checkpointing=True),
            "+ fp32 EMA of the student": dict(ema=True),
            "8-bit AdamW (bitsandbytes layout)": dict(optimizer="adamw8bit"),
            "teacher replicated, not sharded": dict(shard_teacher=False),
            "gradient checkpointing + 8-bit AdamW": dict(gradient_checkpointing=True, optimizer="adamw8bit"),
        }
        print("| variant | " + " | ".join(map(str, a.shards)) + " |\n|---|" + "---:|" * len(a.shards))
        for name, kw in variants.items():
            totals = [gib(train_memory(*args, shards=n, **{**common, **kw})[TOTAL]) for n in a.shards]
            print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in totals) + " |")


if __name__ == "__main__":
    main()
