"""SD3 without T5: the mini SD3 teacher's training step and sampling with T5's 256 zero tokens computed once
(``bksdm.arch.repeats``) against the plain transformer, side by side in one process.

    python benchmarks/repeats_step.py [--steps 6] [--threads 1] [--bf16]

Training: the recipe's step (``bksdm mini-teacher --config sd3``: batch 32 world pictures, both text encoders, the
flow objective, forward + backward + AdamW) on a freshly initialised teacher of the shipped size, alternating the
two variants step by step so load changes hit both alike; the median of ``--steps`` steps each after one warm-up
step. Sampling: 4 images at 25 steps with guidance (the pipeline's 7.0), per image. Also prints the largest
difference of the two variants' transformer outputs on one batch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def main(argv=None) -> None:
    import torch

    from bksdm.arch import flow_families
    from bksdm.arch.flow_families import family_for
    from bksdm.arch.repeats import merge_repeats
    from bksdm.generate import generate_images
    from bksdm.mini.world import ShapesWorld
    from bksdm.objectives import objective_for
    from bksdm.recipes.mini_teacher import new_teacher, teacher_conditioning, world_batch
    from bksdm.training import task_loss, to_latent_space

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (only where the CPU has native bf16)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = new_teacher("sd3", 0)
    family = family_for(pipe.transformer.config, [n for n, c in pipe.components.items() if c is not None])
    parts = {n: getattr(pipe, n) for n in family.text_components}
    objective = objective_for(pipe.scheduler.config)
    models = {"merged": copy.deepcopy(pipe.transformer), "plain": copy.deepcopy(pipe.transformer)}
    merge_repeats(models["merged"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    world, gen = ShapesWorld(seed=0), torch.Generator().manual_seed(0)
    times = {k: [] for k in models}
    real_merge = flow_families.merge_repeats
    for step in range(a.steps + 1):
        images, texts = world_batch(world, step * 32, 32, gen)
        latents = to_latent_space(pipe.vae.encode(images).latent_dist.sample(), pipe.vae.config)
        noisy, t, target = objective.sample(latents, gen)
        for name, model in models.items():
            flow_families.merge_repeats = real_merge if name == "merged" else (lambda m: False)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                pred = family.denoise(model, noisy, t, teacher_conditioning(family, parts, texts, 32))
            loss = task_loss(objective, pred.float(), target, t)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            if step:
                times[name].append(time.perf_counter() - t0)
    flow_families.merge_repeats = real_merge
    with torch.no_grad():
        models["plain"].load_state_dict(models["merged"].state_dict())
        cond = teacher_conditioning(family, parts, texts, 32)
        flow_families.merge_repeats = lambda m: False
        plain = family.denoise(models["plain"], noisy, t, cond)
        flow_families.merge_repeats = real_merge
        merged = family.denoise(models["merged"], noisy, t, cond)
    sample = {}
    prompts = ["a large red circle at the top left"] * 4
    for name in ("plain", "merged"):
        model = copy.deepcopy(pipe.transformer)
        if name == "merged":
            merge_repeats(model)
        else:  # generate_images merges on its own: a processor of another class (the same computation) keeps it off
            from diffusers.models.attention_processor import JointAttnProcessor2_0

            model.set_attn_processor(type("Unmerged", (JointAttnProcessor2_0,), {})())
        parts_g = {"transformer": model, "vae": pipe.vae, **parts}
        t0 = time.perf_counter()
        generate_images(parts_g, pipe.scheduler, prompts, seeds=list(range(4)), steps=25)
        sample[name] = (time.perf_counter() - t0) / 4
    print(f"# {machine()}; {a.threads} thread(s), {'bf16 autocast' if a.bf16 else 'fp32'}")
    print(f"# mini SD3 teacher ({sum(p.numel() for p in pipe.transformer.parameters()):,} transformer parameters), "
          f"24 CLIP + 256 zero text tokens, 64 image tokens")
    print("| | plain | merged | plain / merged |")
    print("|---|---:|---:|---:|")
    tp, tm = statistics.median(times["plain"]), statistics.median(times["merged"])
    print(f"| training step, batch 32 (s, median of {a.steps}) | {tp:.3f} | {tm:.3f} | {tp / tm:.2f} |")
    print(f"| sampling, 25 steps with guidance (s per image) | {sample['plain']:.3f} | {sample['merged']:.3f} | "
          f"{sample['plain'] / sample['merged']:.2f} |")
    print(f"max |merged - plain| transformer output on one batch: {(merged - plain).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
