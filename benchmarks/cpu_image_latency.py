"""One 512 px image on this CPU: stock diffusers with SD-v1.4 in fp32 against `bksdm generate` with bk-small.

    python benchmarks/cpu_image_latency.py [--steps-a 2] [--steps-b 4] [--workdir /tmp/bksdm-bench]

Random weights of the real architectures (latency does not depend on values). Each side is timed at two step
counts; the difference gives the time per denoising step, the rest the fixed cost (text encoder, VAE decoder),
and the 25-step image time is extrapolated from them. bksdm runs in the fastest precision this CPU supports
(bf16 where AVX512-BF16 or AMX exists).
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
    a = p.parse_args(argv)
    teacher = random_sd_folder(a.workdir / "sd-v1-random")
    student = a.workdir / "bk-small-random"
    if not (student / "model_index.json").is_file():
        compress(str(teacher), "bk-small", student, overwrite=True)
    prompt = "a small red circle at the top left"
    res = {}

    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    run = lambda k: pipe(prompt, num_inference_steps=k, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))  # noqa: E731
    run(1)  # warm-up
    res["stock diffusers, SD-v1.4, fp32"] = (timed(lambda: run(a.steps_a)), timed(lambda: run(a.steps_b)))
    del pipe

    dtype = default_dtype("cpu")
    parts = load_components(student)
    gen = lambda k: generate_images(parts["unet"], parts["vae"], parts["tokenizer"], parts["text_encoder"],  # noqa: E731
                                    parts["scheduler"], [prompt], [0], steps=k, dtype=dtype)
    gen(1)
    res[f"bksdm generate, bk-small, {str(dtype).split('.')[-1]}"] = (timed(lambda: gen(a.steps_a)), timed(lambda: gen(a.steps_b)))

    print(f"machine: {machine()}; one 512x512 image, guidance 7.5 (U-Net batch 2), PNDM")
    print("| pipeline | s/step | fixed s (text encoder + decoder) | 25-step image s (extrapolated) |")
    print("|---|---|---|---|")
    base = None
    for name, (ta, tb) in res.items():
        per = (tb - ta) / (a.steps_b - a.steps_a)
        fixed = ta - a.steps_a * per
        total = fixed + 25 * per
        base = base or total
        print(f"| {name} | {per:.2f} | {fixed:.2f} | {total:.1f} ({base / total:.2f}x) |")


if __name__ == "__main__":
    main()
