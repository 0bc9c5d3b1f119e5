"""One 512 px image on this CPU: stock diffusers with SD-v1.4 in fp32 against `bksdm generate` with bk-small,
and with bk-small after `bksdm lcm` (4 LCM steps, the guidance scale embedded: no classifier-free batch doubling).

    python benchmarks/cpu_image_latency.py [--steps-a 2] [--steps-b 4] [--workdir /tmp/bksdm-bench] [--no-stock]

Random weights of the real architectures (latency does not depend on values). Each side is timed at two step
counts; the difference gives the time per denoising step, the rest the fixed cost (text encoder, VAE decoder),
and the 25-step image time is extrapolated from them. bksdm runs in the fastest precision this CPU supports
(bf16 where AVX512-BF16 or AMX exists). The LCM row is timed directly at 4 steps, split into text encoder, U-Net
and VAE decoder by timing each module's calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, random_sd_folder  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    from diffusers import StableDiffusionPipeline

    from bksdm.compress import compress
    from bksdm.generate import default_dtype, generate_images
    from bksdm.models import load_components

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-a", type=int, default=2)
    p.add_argument("--steps-b", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bksdm-bench"))
    p.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                   help="time stock diffusers (slow); without it the first bksdm row is the 1.00x base")
    a = p.parse_args(argv)
    teacher = random_sd_folder(a.workdir / "sd-v1-random")
    student = a.workdir / "bk-small-random"
    if not (student / "model_index.json").is_file():
        compress(str(teacher), "bk-small", student, overwrite=True)
    prompt = "a small red circle at the top left"
    res = {}

    if a.stock:
        pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        run = lambda k: pipe(prompt, num_inference_steps=k, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))  # noqa: E731
        run(1)  # warm-up
        res["stock diffusers, SD-v1.4, fp32"] = (timed(lambda: run(a.steps_a)), timed(lambda: run(a.steps_b)))
        del pipe

    dtype = default_dtype("cpu")
    parts = load_components(student)
    gen = lambda k: generate_images(parts, parts["scheduler"], [prompt], [0], steps=k, dtype=dtype)  # noqa: E731
    gen(1)
    res[f"bksdm generate, bk-small, {str(dtype).split('.')[-1]}"] = (timed(lambda: gen(a.steps_a)), timed(lambda: gen(a.steps_b)))

    lcm_dir = a.workdir / "bk-small-lcm-random"
    if not (lcm_dir / "model_index.json").is_file():
        lcm_pipeline(student, lcm_dir)
    lparts = load_components(lcm_dir)
    spent = time_modules(lparts, ("text_encoder", "unet", "vae"))
    lcm = lambda: generate_images(lparts, lparts["scheduler"], [prompt], [0], steps=4, guidance=8.5, dtype=dtype)  # noqa: E731
    lcm()
    spent.clear()
    total = timed(lcm)
    lcm_row = (f"bksdm generate, bk-small + LCM, {str(dtype).split('.')[-1]}, 4 steps", total, dict(spent))

    print(f"machine: {machine()}; one 512x512 image, guidance 7.5 (U-Net batch 2), PNDM; LCM: guidance embedded (batch 1)")
    print("| pipeline | s/step | fixed s (text encoder + decoder) | 25-step image s (extrapolated) |")
    print("|---|---|---|---|")
    base = None
    for name, (ta, tb) in res.items():
        per = (tb - ta) / (a.steps_b - a.steps_a)
        fixed = ta - a.steps_a * per
        total = fixed + 25 * per
        base = base or total
        print(f"| {name} | {per:.2f} | {fixed:.2f} | {total:.1f} ({base / total:.2f}x) |")
    name, total, parts = lcm_row
    print(f"| {name} | {parts['unet'] / 4:.2f} | {total - parts['unet']:.2f} | {total:.1f} measured ({base / total:.2f}x) |")
    print(f"\nLCM image, where the time goes: text encoder {parts['text_encoder']:.2f} s, U-Net {parts['unet']:.2f} s "
          f"(4 calls), VAE decoder {parts['vae']:.2f} s, rest {total - sum(parts.values()):.2f} s")


def lcm_pipeline(student: Path, out: Path) -> None:
    """``student`` as `bksdm lcm` writes it (a guidance-embedding U-Net, LCMScheduler); random weights suffice."""
    import json
    import shutil

    from diffusers import LCMScheduler, UNet2DConditionModel

    shutil.copytree(student, out, dirs_exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(student / "unet")
    UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": 256}).save_pretrained(out / "unet")
    LCMScheduler.from_pretrained(student, subfolder="scheduler").save_pretrained(out / "scheduler")
    index = json.loads((out / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index))


def time_modules(parts: dict, names: tuple[str, ...]) -> dict[str, float]:
    """Seconds spent in each named module's forward (text encoder, U-Net) or ``decode`` (VAE), accumulated."""
    spent: dict[str, float] = {}
    for n in names:
        mod = parts[n]
        attr = "decode" if n == "vae" else "forward"
        orig = getattr(mod, attr)

        def wrapped(*args, _orig=orig, _n=n, **kw):
            t0 = time.perf_counter()
            out = _orig(*args, **kw)
            spent[_n] = spent.get(_n, 0.0) + time.perf_counter() - t0
            return out

        setattr(mod, attr, wrapped)
    return spent


if __name__ == "__main__":
    main()
