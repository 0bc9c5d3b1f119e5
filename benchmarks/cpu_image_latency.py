"""One 512 px image on this CPU: stock diffusers with SD-v1.4 in fp32 against `bksdm generate` with bk-small,
with bk-small after `bksdm lcm` (4 LCM steps, the guidance scale embedded: no classifier-free batch doubling), and
the fast path on top (a tiny decoder, a compiled U-Net, feature caching; bk-tiny at 2 steps, EdgeFusion's setting).

    python benchmarks/cpu_image_latency.py [--steps-a 2] [--steps-b 4] [--workdir /tmp/bksdm-bench] [--no-stock]
        [--no-fast]

Random weights of the real architectures (latency does not depend on values; the tiny decoder is TAESD's
architecture). Stock and 25-step rows are timed at two step counts; the difference gives the time per denoising
step, the rest the fixed cost (text encoder, VAE decoder), and the 25-step image time is extrapolated from them.
bksdm runs in the fastest precision this CPU supports (bf16 where AVX512-BF16 or AMX exists). LCM rows are timed
directly (one warm-up image, then the median of three), split into text encoder, U-Net and decoder by timing each
module's calls; a compiled row's one-off compile time is its warm-up's excess, printed apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, random_sd_folder  # noqa: E402


def now() -> float:
    """Wall-clock seconds, after the GPU's queued work (when there is a GPU) has finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn) -> float:
    t0 = now()
    fn()
    return now() - t0


def main(argv=None) -> None:
    from diffusers import StableDiffusionPipeline

    from bksdm.compress import compress
    from bksdm.generate import default_dtype, generate_images
    from bksdm.models import load_components

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-a", type=int, default=2)
    p.add_argument("--steps-b", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bksdm-bench"))
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="the fast-path rows (tiny decoder, compile, caching, bk-tiny at 2 steps)")
    p.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                   help="time stock diffusers (slow); without it the first bksdm row is the 1.00x base")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU rows (fp16; benchmarks/gpu_check.sh)")
    p.add_argument("--sdxl", action="store_true", help="also KOALA-700M-style SDXL students + LCM at 1024 px")
    a = p.parse_args(argv)
    teacher = random_sd_folder(a.workdir / "sd-v1-random")
    student = a.workdir / "bk-small-random"
    if not (student / "model_index.json").is_file():
        compress(str(teacher), "bk-small", student, overwrite=True)
    prompt = "a small red circle at the top left"
    res = {}

    if a.stock:
        pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False).to(a.device)
        pipe.set_progress_bar_config(disable=True)
        run = lambda k: pipe(prompt, num_inference_steps=k, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))  # noqa: E731
        run(1)  # warm-up
        res["stock diffusers, SD-v1.4, fp32"] = (timed(lambda: run(a.steps_a)), timed(lambda: run(a.steps_b)))
        del pipe

    dtype = default_dtype(a.device)
    parts = load_components(student)
    gen = lambda k: generate_images(parts, parts["scheduler"], [prompt], [0], steps=k, dtype=dtype, device=a.device)  # noqa: E731
    gen(1)
    res[f"bksdm generate, bk-small, {str(dtype).split('.')[-1]}"] = (timed(lambda: gen(a.steps_a)), timed(lambda: gen(a.steps_b)))

    lcm_dir = a.workdir / "bk-small-lcm-random"
    if not (lcm_dir / "model_index.json").is_file():
        lcm_pipeline(student, lcm_dir)
    row = lambda *args, **kw: lcm_row(*args, device=a.device, **kw)  # noqa: E731
    rows = [row(f"bk-small + LCM, {str(dtype).split('.')[-1]}, 4 steps", lcm_dir, 4, dtype)]
    if a.fast:
        tiny_dir = a.workdir / "bk-tiny-lcm-random"
        if not (tiny_dir / "model_index.json").is_file():
            compress(str(teacher), "bk-tiny", a.workdir / "bk-tiny-random", overwrite=True)
            lcm_pipeline(a.workdir / "bk-tiny-random", tiny_dir)
        rows.append(row("  + tiny decoder (TAESD)", lcm_dir, 4, dtype, tiny=True))
        rows.append(row("  + tiny decoder, cache every 2 steps", lcm_dir, 4, dtype, tiny=True, cache=2))
        rows.append(row("  + tiny decoder, compiled", lcm_dir, 4, dtype, tiny=True, compiled=True))
        rows.append(row("  + tiny decoder, compiled, cache every 2", lcm_dir, 4, dtype, tiny=True, compiled=True, cache=2))
        rows.append(row(f"bk-tiny + LCM, {str(dtype).split('.')[-1]}, 2 steps, tiny decoder, compiled", tiny_dir, 2,
                            dtype, tiny=True, compiled=True))
    if a.sdxl:
        xl_dir = a.workdir / "koala-700m-lcm-random"
        if not (xl_dir / "model_index.json").is_file():
            xl = random_sd_folder(a.workdir / "sdxl-random", family="sdxl")
            compress(str(xl), "koala-700m", a.workdir / "koala-700m-random", overwrite=True)
            lcm_pipeline(a.workdir / "koala-700m-random", xl_dir)
        rows.append(row("koala-700m (SDXL) + LCM, 4 steps, 1024 px", xl_dir, 4, dtype))
        rows.append(row("  + tiny decoder (TAESDXL)", xl_dir, 4, dtype, tiny=True))
        rows.append(row("  + tiny decoder, compiled", xl_dir, 4, dtype, tiny=True, compiled=True))

    print(f"machine: {machine()}; one 512x512 image (SDXL 1024x1024), guidance 7.5 (U-Net batch 2), PNDM; LCM: guidance "
          "embedded (batch 1)")
    print("| pipeline | s/step | fixed s (text encoder + decoder) | 25-step image s (extrapolated) |")
    print("|---|---|---|---|")
    base = None
    for name, (ta, tb) in res.items():
        per = (tb - ta) / (a.steps_b - a.steps_a)
        fixed = ta - a.steps_a * per
        total = fixed + 25 * per
        base = base or total
        print(f"| {name} | {per:.2f} | {fixed:.2f} | {total:.1f} ({base / total:.2f}x) |")
    print("\n| few-step pipeline (bksdm generate) | image s | speed-up | text encoder s | U-Net s | decoder s | compile s (once) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['total']:.2f} | {base / r['total']:.1f}x | {r['text_encoder']:.2f} | {r['unet']:.2f} | "
              f"{r['vae']:.2f} | {'-' if r['compile'] is None else round(r['compile'], 1)} |")


def lcm_row(name: str, folder: Path, steps: int, dtype, tiny: bool = False, compiled: bool = False, cache: int = 1,
            device: str = "cpu"):
    """One few-step image of ``folder``'s LCM pipeline: a warm-up, then the median of three, per component."""
    import statistics

    from bksdm.fast import compile_unet
    from bksdm.generate import generate_images
    from bksdm.models import load_components
    from bksdm.profile import materialise

    parts = load_components(folder)
    if tiny:
        from diffusers import AutoencoderTiny

        parts["vae"] = materialise(AutoencoderTiny().to("meta"), torch.Generator().manual_seed(0)).eval()
    forward = compile_unet(parts["unet"]) if compiled else None
    spent = time_modules(parts, ("text_encoder", "unet", "vae"))
    gen = lambda: generate_images(parts, parts["scheduler"], ["a small red circle at the top left"], [0], steps=steps,  # noqa: E731
                                  guidance=8.5, dtype=dtype, device=device, cache_interval=cache, forward=forward)
    warm = timed(gen)
    runs = []
    for _ in range(3):
        spent.clear()
        runs.append((timed(gen), dict(spent)))
    total, split = sorted(runs, key=lambda r: r[0])[1]
    split = {k: split.get(k, 0.0) for k in ("text_encoder", "unet", "vae")}
    return {"name": name, "total": total, **split, "compile": warm - total if compiled else None}


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
    """Seconds spent in each named module's calls (text encoder, U-Net: forward hooks, which fire whatever runs as
    its forward, a compiled or cached one too) or in ``decode`` (VAE, tiny decoder), accumulated."""
    spent: dict[str, float] = {}
    for n in names:
        mod = parts[n]
        if n == "vae":
            orig = mod.decode

            def wrapped(*args, _orig=orig, _n=n, **kw):
                t0 = now()
                out = _orig(*args, **kw)
                spent[_n] = spent.get(_n, 0.0) + now() - t0
                return out

            mod.decode = wrapped
            continue
        start: list[float] = []
        mod.register_forward_pre_hook(lambda *_, _s=start: _s.append(now()))
        mod.register_forward_hook(lambda *_, _s=start, _n=n: spent.__setitem__(_n, spent.get(_n, 0.0) + now() - _s.pop()))
    return spent


if __name__ == "__main__":
    main()
