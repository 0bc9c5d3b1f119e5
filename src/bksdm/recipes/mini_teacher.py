"""The recipe that trains the mini teacher (the asset in ``bksdm/mini/assets/teacher``).

The text encoder and the SD-v1-layout U-Net learn together on the shapes world: SD-v1's noise schedule with
SD-v2's v-prediction target, 10% empty captions so classifier-free guidance works, an EMA of both (diffusers'
``EMAModel``), bf16 autocast on CPUs.

    python -m bksdm.recipes.mini_teacher --out teacher --steps 8000      # a pipeline folder (fp16 safetensors)

The shipped weights were trained by this loop's earlier home, ``bksdm.mini.teacher``, whose EMA was written by hand
(same decay schedule but for a first-step offset); their stages are in ``assets/teacher/training.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bksdm.arch.families import family_of
from bksdm.errors import UserError
from bksdm.mini.model import SpaceToDepthVAE, build_pipeline, text_encoder, unet_config
from bksdm.mini.teacher import TEACHER_UNET, TEXT_EMBED_STD, TEXT_LAYERS, VAE_SHIFT, save_teacher, world_batch
from bksdm.mini.world import WORDS, ShapesWorld
from bksdm.runtime import quiet_libraries
from bksdm.training import noisy_inputs


def train_teacher(out: Path, steps: int = 8000, batch: int = 32, lr: float = 5e-4, seed: int = 0,
                  log_every: int = 100, bf16: bool = True, save_every: int = 500, init: Path | None = None,
                  ema_decay: float = 0.999, start_index: int = 0, prediction: str = "v_prediction",
                  fresh_text: int = 0) -> dict:
    """Train (or, with ``init``, continue training) the mini teacher.

    ``prediction`` is the U-Net's target, ``"v_prediction"`` (SD-v2's) or ``"epsilon"`` (SD-v1's); it is written
    into the scheduler config, which every recipe reads. Why v: the prompt decides the layout at noisy timesteps,
    where an epsilon model must output almost exactly its input and the picture is a tiny correction on top; with
    epsilon MSE the text's share of the loss there was ~1e-4 and 5,000 steps learnt an almost unconditional model.
    ``start_index`` offsets the world indices so a continuation sees new pictures; ``fresh_text`` (with ``init``)
    replaces the text encoder by a new one of that many layers.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel

    if prediction not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction must be 'epsilon' or 'v_prediction', not {prediction!r}")
    torch.manual_seed(seed)
    if init is not None:
        pipe = StableDiffusionPipeline.from_pretrained(init, dtype=torch.float32)
        vae_cfg = {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")}
        pipe.vae = SpaceToDepthVAE(**{**vae_cfg, "shift": VAE_SHIFT})
        if fresh_text:
            cfg = pipe.text_encoder.config
            pipe.text_encoder = text_encoder(cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, fresh_text,
                                             TEXT_EMBED_STD)
    else:
        pipe = build_pipeline(WORDS, seed=seed, unet=unet_config(**TEACHER_UNET), text_layers=TEXT_LAYERS,
                              vae_shift=VAE_SHIFT, text_embed_std=TEXT_EMBED_STD)
    pipe.scheduler.register_to_config(prediction_type=prediction)
    unet, text, tok, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    family = family_of(unet.config)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = EMAModel(params, decay=ema_decay)  # warm-up decay min(ema_decay, (1 + n) / (10 + n)), as distill's
    world, gen = ShapesWorld(seed=seed), torch.Generator().manual_seed(seed)
    t0, losses, history = time.time(), [], []
    for step in range(steps):
        images, texts = world_batch(world, start_index + step * batch, batch, gen)
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        noisy, t, target = noisy_inputs(noise_sched, latents, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(noisy, t, **family.encode_prompt({"tokenizer": tok, "text_encoder": text}, texts, "cpu")).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            rec = {"step": step + 1, "loss": float(np.mean(losses[-log_every:])), "seconds": round(time.time() - t0, 1)}
            history.append(rec)
            print(json.dumps(rec), flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save_ema(pipe, ema, params, out / f"step-{step + 1}", {"steps": step + 1, "history": history})
    _save_ema(pipe, ema, params, out, {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "bf16_autocast": bf16,
                             "prediction": prediction, "seconds": round(time.time() - t0, 1), "history": history})
    return {"seconds": time.time() - t0, "final_loss": float(np.mean(losses[-log_every:])) if losses else None}


def _save_ema(pipe, ema, params: list[torch.nn.Parameter], out: Path, info: dict) -> None:
    """Save the pipeline with its EMA weights swapped in, then swap the live weights back."""
    ema.store(params)
    ema.copy_to(params)
    save_teacher(pipe, out, info)
    ema.restore(params)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="train the mini-world teacher")
    p.add_argument("--out", type=Path, required=True, help="output pipeline folder (never the shipped asset by default)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--init", type=Path, default=None, help="continue from this teacher folder")
    p.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction")
    p.add_argument("--fresh-text", type=int, default=0, help="with --init: a new text encoder of this many layers")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--start-index", type=int, default=0,
                   help="first world index (continuations: new pictures; avoid 10**6 + 10**5 (evaluation prompts) and 5 * 10**6 + (held-out))")
    a = p.parse_args(argv)
    quiet_libraries()  # diffusers warns on every fp16 save of a checkpoint
    torch.set_num_threads(a.threads)
    print(train_teacher(a.out, a.steps, a.batch, a.lr, a.seed, bf16=not a.fp32, init=a.init, ema_decay=a.ema_decay,
                        start_index=a.start_index, prediction=a.prediction, fresh_text=a.fresh_text))


if __name__ == "__main__":
    main()
