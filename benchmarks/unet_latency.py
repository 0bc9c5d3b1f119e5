"""U-Net latency of each BK student against its teacher, side by side, in fp32 and bf16 (issue: core).

    python benchmarks/unet_latency.py [--arch sd-v1] [--batch 2] [--runs 3] [--device cpu] [--dtypes fp32 bf16]

Random weights of the real architectures (latency does not depend on values); one U-Net call at batch 2
(classifier-free guidance) on the family's latent size; median of --runs after a warm-up.
"""

from __future__ import annotations

import argparse

import torch

from bksdm.arch import BUILTIN_SPECS, derive
from bksdm.arch.families import family_component_config
from bksdm.models import DTYPES
from bksdm.profile import device_name, materialise, median_latency


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd-v1")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=None)
    a = p.parse_args(argv)
    dtypes = a.dtypes or (["fp32", "fp16"] if a.device == "cuda" else ["fp32", "bf16"])
    from diffusers import UNet2DConditionModel

    teacher_cfg = family_component_config(a.arch, "unet")
    te = family_component_config(a.arch, "text_encoder")
    cfgs = {a.arch: teacher_cfg} | {s: derive(teacher_cfg, BUILTIN_SPECS[s], with_keys=False).student_config for s in BUILTIN_SPECS}
    size = teacher_cfg["sample_size"]
    print(f"device: {device_name(torch.device(a.device))}; torch {torch.__version__}; U-Net call at batch {a.batch}, "
          f"{size}x{size} latent; median of {a.runs} after a warm-up")
    times: dict[str, dict[str, float]] = {}
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg)
        unet = materialise(unet, torch.Generator().manual_seed(0)).eval()
        for d in dtypes:
            unet.to(a.device, dtype=DTYPES[d])
            x = torch.randn(a.batch, 4, size, size, device=a.device, dtype=DTYPES[d])
            e = torch.randn(a.batch, 77, te["hidden_size"], device=a.device, dtype=DTYPES[d])
            t = torch.full((a.batch,), 500, device=a.device)
            times.setdefault(name, {})[d] = median_latency(lambda: unet(x, t, e), runs=a.runs)
        del unet
    base = times[a.arch]
    print("| U-Net | " + " | ".join(f"{d} s | {d} speed-up" for d in dtypes) + f" | {dtypes[-1]} vs teacher {dtypes[0]} |")
    print("|---" * (2 * len(dtypes) + 2) + "|")
    for name, t in times.items():
        cells = " | ".join(f"{t[d]:.3f} | {base[d] / t[d]:.2f}x" for d in dtypes)
        print(f"| {name} | {cells} | {base[dtypes[0]] / t[dtypes[-1]]:.2f}x |")


if __name__ == "__main__":
    main()
