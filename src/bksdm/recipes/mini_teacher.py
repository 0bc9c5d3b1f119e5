"""The recipe that trains the mini teachers (the assets in ``bksdm/mini/assets/teacher*``).

The text encoders and the denoiser learn together on the shapes world, 10% empty captions so classifier-free
guidance works, an EMA of all of them (diffusers' ``EMAModel``), bf16 autocast on CPUs. What differs between the
layouts lives in the teacher's own parts, not here: the family (``bksdm.arch.families`` / ``flow_families``: prompt
encoding, the unconditional input, how the denoiser is called) and the objective its scheduler config names
(``bksdm.objectives``: SD-v1's noise schedule with SD-v2's v-prediction for the U-Nets, rectified flow for SD3).

    bksdm mini-teacher --out teacher --steps 8000      # teacher/final: a pipeline folder (fp16 safetensors)
    bksdm mini-teacher --config default out=teacher    # the same from configs/mini_teacher_default.yaml
    bksdm mini-teacher --config sd3 out=teacher_sd3    # the SD3 layout (MMDiT, flow matching)

The shipped SD weights were trained by this loop's earlier home, ``bksdm.mini.teacher``, whose EMA was written by
hand (same decay schedule but for a first-step offset); their stages are in ``assets/teacher/training.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bksdm.arch.flow_families import family_for
from bksdm.errors import UserError, note
from bksdm.generate import default_dtype
from bksdm.mini.model import (SpaceToDepthVAE, build_pipeline, build_sd3_pipeline, build_sdxl_pipeline,
                              sd3_transformer_config, sdxl_unet_config, text_encoder, unet_config)
from bksdm.mini.config import TeacherConfig
from bksdm.mini.teacher import (SD3_TEACHER_TRANSFORMER, SDXL_TEACHER_UNET, TEACHER_UNET, TEXT_EMBED_STD, TEXT_LAYERS,
                                VAE_SHIFT, save_teacher, world_batch)
from bksdm.mini.world import WORDS, ShapesWorld
from bksdm.objectives import objective_for
from bksdm.training import task_loss, to_latent_space


def train_teacher(cfg: TeacherConfig) -> dict:
    """Train (or, with ``init_from``, continue training) the mini teacher of ``cfg.family``: ``OUT/final`` (as every
    trainer's result), EMA checkpoints ``OUT/step-N`` on the way.

    ``prediction`` is the U-Nets' target, ``"v_prediction"`` (SD-v2's; ``auto`` for sd and sdxl) or ``"epsilon"``
    (SD-v1's); it is written into the scheduler config, which every recipe reads. Why v: the prompt decides the
    layout at noisy timesteps, where an epsilon model must output almost exactly its input and the picture is a
    tiny correction on top; with epsilon MSE the text's share of the loss there was ~1e-4 and 5,000 steps learnt an
    almost unconditional model. SD3 (``auto`` only) learns the rectified-flow velocity ``eps - x0``, which carries
    the picture at every noise level, with SD3's logit-normal timestep draws (:class:`bksdm.objectives.FlowObjective`).
    ``start_index`` offsets the world indices so a continuation sees new pictures; ``fresh_text`` (with ``init``)
    replaces the one text encoder of an SD-layout teacher by a new one of that many layers.
    """
    from diffusers import DiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg.validate()
    out, steps, batch, lr, seed, log_every = Path(cfg.out), cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, cfg.log_every
    bf16, save_every, ema_decay, start_index = cfg.bf16, cfg.save_every, cfg.ema_decay, cfg.start_index
    init, fresh_text = (Path(cfg.init_from) if cfg.init_from else None), cfg.fresh_text
    torch.manual_seed(seed)
    if init is not None:
        from bksdm.models import absent_components, import_own_components, pipeline_family, pipeline_folder

        if pipeline_family(pipeline_folder(str(init), "teacher")).name != cfg.family:
            raise UserError(f"init_from {init} is not a {cfg.family}-layout teacher; pass family= to match it")
        import_own_components(init)  # the world's VAE class, named in the folder's model_index.json
        pipe = DiffusionPipeline.from_pretrained(init, dtype=torch.float32, **absent_components(init))
        vae_cfg = {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")}
        pipe.vae = SpaceToDepthVAE(**{**vae_cfg, "shift": VAE_SHIFT})
        if fresh_text:
            tc = pipe.text_encoder.config
            pipe.text_encoder = text_encoder(tc.vocab_size, tc.max_position_embeddings, tc.hidden_size, fresh_text,
                                             TEXT_EMBED_STD)
    else:
        pipe = new_teacher(cfg.family, seed)
    if cfg.target() != "flow":  # a DDPM scheduler's target is a setting; a flow scheduler's is always eps - x0
        pipe.scheduler.register_to_config(prediction_type=cfg.target())
    family = family_for(pipe.components.get("transformer", pipe.components.get("unet")).config,
                        [n for n, c in pipe.components.items() if c is not None])
    denoiser, vae = getattr(pipe, family.backbone), pipe.vae
    objective = objective_for(pipe.scheduler.config)  # DDPM (sd, sdxl) or flow (sd3): what the pipeline samples
    parts = {n: getattr(pipe, n) for n in family.text_components}
    texts_nets = [p for n, p in parts.items() if n.startswith("text_encoder")]
    params = list(denoiser.parameters()) + [p for net in texts_nets for p in net.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    # cosine: a tenth of a short run warms up, so its decay is not spent inside the constant recipe's 200 steps
    warmup = 200 if cfg.lr_schedule == "constant" else min(200, steps // 10)
    sched = get_scheduler("constant_with_warmup" if cfg.lr_schedule == "constant" else "cosine", opt,
                          num_warmup_steps=warmup, num_training_steps=steps)
    ema = EMAModel(params, decay=ema_decay)  # warm-up decay min(ema_decay, (1 + n) / (10 + n)), as distill's
    if bf16 and default_dtype("cpu") != torch.bfloat16:  # a setting, not silently changed: said, with the way out
        note("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 autocast is emulated, about 4x slower than fp32 "
             "(the SD3 teacher: 15.8 against 3.7 s per step on a 2-core AMD EPYC); pass --no-bf16 to train in fp32")
    world, gen = ShapesWorld(seed=seed), torch.Generator().manual_seed(seed)
    t0, losses, history = time.time(), [], []
    for step in range(steps):
        images, texts = world_batch(world, start_index + step * batch, batch, gen)
        latents = to_latent_space(vae.encode(images).latent_dist.sample(), vae.config)  # (B, 12, 16, 16)
        noisy, t, target = objective.sample(latents, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = family.denoise(denoiser, noisy, t, teacher_conditioning(family, parts, texts, latents.shape[0]))
        loss = task_loss(objective, pred.float(), target, t)
        step_lr = opt.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            rec = {"step": step + 1, "loss": float(np.mean(losses[-log_every:])), "lr": step_lr,
                   "seconds": round(time.time() - t0, 1)}
            history.append(rec)
            print(json.dumps(rec), flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save_ema(pipe, ema, params, out / f"step-{step + 1}", {"steps": step + 1, "history": history})
    _save_ema(pipe, ema, params, out / "final", {"steps": steps, "batch": batch, "lr": lr, "lr_schedule": cfg.lr_schedule, "seed": seed, "bf16_autocast": bf16,
                             "family": cfg.family, "prediction": objective.name, "seconds": round(time.time() - t0, 1),
                             "history": history})
    return {"seconds": time.time() - t0, "final_loss": float(np.mean(losses[-log_every:])) if losses else None}


def new_teacher(family: str, seed: int):
    """A randomly initialised mini teacher of ``family`` with the shipped teachers' settings: the world's 18-word
    tokenizers, 4-layer text encoders with unit-scale embeddings, the centring space-to-depth VAE, and
    :data:`~bksdm.mini.teacher.TEACHER_UNET` (sd), :data:`~bksdm.mini.teacher.SDXL_TEACHER_UNET` (sdxl) or
    :data:`~bksdm.mini.teacher.SD3_TEACHER_TRANSFORMER` (sd3)."""
    builders = {"sd": _sd_teacher, "sdxl": _sdxl_teacher, "sd3": _sd3_teacher}
    if family not in builders:
        raise UserError(f"family {family!r} is not one of {', '.join(builders)}")
    return builders[family](seed)


def _sd_teacher(seed: int):
    return build_pipeline(WORDS, seed=seed, unet=unet_config(**TEACHER_UNET), text_layers=TEXT_LAYERS,
                          vae_shift=VAE_SHIFT, text_embed_std=TEXT_EMBED_STD)


def _sdxl_teacher(seed: int):
    """A new SDXL-layout mini teacher: :data:`SDXL_TEACHER_UNET`, the world's VAE, two text encoders."""
    u = SDXL_TEACHER_UNET
    half = u["text_width"] // 2
    return build_sdxl_pipeline(WORDS, seed=seed, unet=sdxl_unet_config(**u), widths=(half, half), pooled_width=u["pooled_width"],
                               vae=SpaceToDepthVAE(sample_size=32, shift=VAE_SHIFT), text_layers=TEXT_LAYERS,
                               text_embed_std=TEXT_EMBED_STD)


def _sd3_teacher(seed: int):
    """A new SD3-layout mini teacher: :data:`SD3_TEACHER_TRANSFORMER`, the world's VAE (centred by its ``shift``;
    ``shift_factor`` 0), two text encoders, no T5."""
    u = SD3_TEACHER_TRANSFORMER
    half = u["text_width"] // 2
    return build_sd3_pipeline(WORDS, seed=seed, transformer=sd3_transformer_config(**u), widths=(half, half),
                              vae=SpaceToDepthVAE(sample_size=32, shift=VAE_SHIFT, shift_factor=0.0),
                              text_layers=TEXT_LAYERS, text_embed_std=TEXT_EMBED_STD)


def teacher_conditioning(family, parts: dict, texts: list[str], batch: int) -> dict:
    """The prompts' conditioning for training. A dropped caption ("") becomes what the pipeline will pass for
    "no prompt" under guidance: the empty prompt's encoding (SD; SD3, whose negative prompt is "" through both CLIPs
    and T5's zeros), all zeros (SDXL's force_zeros_for_empty_prompt)."""
    cond = family.encode_prompt(parts, texts, "cpu")
    empty = [i for i, text in enumerate(texts) if text == ""]
    if empty:
        cond = family.drop_rows(cond, empty, family.unconditional(parts, "cpu", {"force_zeros_for_empty_prompt": True}))
    cond.update(family.added_conditioning(batch, 32, "cpu"))
    return cond


def _save_ema(pipe, ema, params: list[torch.nn.Parameter], out: Path, info: dict) -> None:
    """Save the pipeline with its EMA weights swapped in, then swap the live weights back."""
    ema.store(params)
    ema.copy_to(params)
    save_teacher(pipe, out, info)
    ema.restore(params)
