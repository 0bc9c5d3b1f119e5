"""Latent consistency distillation (LCM, arXiv 2310.04378; LCM-LoRA, arXiv 2311.05556) of a pipeline: few-step
students.

One step: a latent is noised to a solver timestep t_{n+k}; the frozen teacher (cond and uncond, guidance w drawn
from [w_min, w_max]) takes one DDIM step to t_n; the loss is the pseudo-Huber distance between the online
student's consistency function at (x_{n+k}, t_{n+k}) and the target network's at (x_n, t_n). The full variant
embeds w into the U-Net (``time_cond_proj_dim``) and keeps the target an EMA of the student; the LoRA variant
trains adapters, has no w input and uses the student itself as target. The loop, data, cache, checkpoints and exact
resume are :class:`bksdm.trainer.Trainer`'s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from bksdm.errors import UserError
from bksdm.lcm import solver as S
from bksdm.lcm.config import LORA_TARGETS, LCMConfig
from bksdm.trainer import Trainer
from bksdm.training import FrozenTeacher, unwrap

LORA_FILE = "pytorch_lora_weights.safetensors"


class LCMRecipe(Trainer):
    terms = ("loss", "mse")
    tracker_name = "lcm"
    transformer_note = "their flow-matching objective has no alphas_cumprod for LCM's DDIM solver"
    cfg: LCMConfig

    def pipeline_source(self) -> str:
        return self.cfg.model

    # ------------------------------------------------------------------ models
    def build_models(self) -> torch.nn.Module:
        from bksdm.hub import read_unet_config
        from bksdm.models import load_unet, pipeline_folder, refuse_transformer

        cfg = self.cfg
        model_cfg, unet_dir = read_unet_config(self.pipeline_dir)
        teacher_dir = pipeline_folder(cfg.teacher, "teacher") if cfg.teacher else self.pipeline_dir
        refuse_transformer(teacher_dir, "lcm", self.transformer_note)
        teacher_cfg, teacher_unet_dir = read_unet_config(teacher_dir)
        for key in ("in_channels", "cross_attention_dim", "sample_size"):
            if teacher_cfg.get(key) != model_cfg.get(key):
                raise UserError(f"teacher {teacher_dir} does not fit {cfg.model}: its {key} is {teacher_cfg.get(key)!r}, "
                                f"the model's {model_cfg.get(key)!r}; pass the pipeline the model was compressed from")
        self.teacher = FrozenTeacher(load_unet(teacher_unet_dir)).to(self.acc.device, self.weight_dtype)
        student = load_unet(unet_dir)
        self.target = None
        if cfg.lora:
            from peft import LoraConfig

            self.lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=list(LORA_TARGETS),
                                          init_lora_weights=True)
            student.requires_grad_(False)
            student.add_adapter(self.lora_config)
        else:
            student = self._with_guidance_input(student)
            self.target = copy.deepcopy(student).requires_grad_(False).eval()
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student

    def _with_guidance_input(self, unet):
        """``unet`` with a guidance-embedding input (``time_cond_proj_dim``), its new projection zero-initialised so
        the student starts as exactly the model (diffusers' example leaves it random)."""
        from diffusers import UNet2DConditionModel

        if unet.config.get("time_cond_proj_dim"):
            return unet
        config = {**unet.config, "time_cond_proj_dim": self.cfg.time_cond_proj_dim}
        new = UNet2DConditionModel.from_config(config)
        missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
        assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
        torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
        return new

    def on_prepared(self) -> None:
        sched = self.noise_scheduler
        self.alphas_cumprod = sched.alphas_cumprod.float().to(self.acc.device)
        self.prediction_type = self.family.prediction_type(sched.config)
        self.solver = S.DDIMSolver(sched.alphas_cumprod, self.cfg.num_ddim_timesteps).to(self.acc.device)
        if self.target is not None:
            self.target.to(self.acc.device)
            self.acc.register_for_checkpointing(self.target)  # exact resume: the target is state too

    def needs_empty_prompt(self) -> bool:
        return True  # the teacher's unconditional prediction, every step

    def after_step(self) -> None:
        """The target network follows the student: target <- decay * target + (1 - decay) * student."""
        if self.target is None:
            return
        with torch.no_grad():
            for t, s in zip(self.target.parameters(), unwrap(self.student).parameters()):
                t.lerp_(s.detach().to(t.dtype), 1 - self.cfg.ema_decay)

    # ------------------------------------------------------------------ loss
    def loss_step(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``loss`` (pseudo-Huber or MSE, as configured) and ``mse`` between the student's and the target's
        consistency outputs, for one micro-batch."""
        cfg, dev = self.cfg, self.acc.device
        latents, cond = self.encode(batch, gen)
        b = latents.shape[0]
        index = torch.randint(0, cfg.num_ddim_timesteps, (b,), generator=gen).to(dev)
        start = self.solver.timesteps[index]
        end = (start - self.solver.skip).clamp(min=0)
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=gen)).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, start)
        w_emb = S.guidance_embedding(w.cpu(), cfg.time_cond_proj_dim).to(dev) if self.target is not None else None

        skip0, out0 = S.boundary_scalings(start, scaling=cfg.timestep_scaling)
        kw = self.family.unet_kwargs
        raw = self.student(noisy, start, timestep_cond=w_emb, **kw(cond)).sample.float()
        x0 = S.x0_and_eps(raw, start, noisy, self.alphas_cumprod, self.prediction_type)[0]
        pred = _bc(skip0, noisy) * noisy + _bc(out0, noisy) * x0

        with torch.no_grad():
            # teacher, conditional and unconditional in one batch, then one guided DDIM step to the end timestep
            uncond = self.unconditional(cond)
            both = {k: torch.cat([v, uncond[k]]).to(self.weight_dtype) for k, v in cond.items()}
            t_out = self.teacher(torch.cat([noisy, noisy]).to(self.weight_dtype), torch.cat([start, start]), **kw(both)).sample.float()
            x0_c, eps_c = S.x0_and_eps(t_out[:b], start, noisy, self.alphas_cumprod, self.prediction_type)
            x0_u, eps_u = S.x0_and_eps(t_out[b:], start, noisy, self.alphas_cumprod, self.prediction_type)
            wb = _bc(w, noisy)
            x_prev = self.solver.step(x0_c + wb * (x0_c - x0_u), eps_c + wb * (eps_c - eps_u), index)
            net = self.target if self.target is not None else unwrap(self.student)
            with torch.autocast(dev.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
                t_raw = net(x_prev, end, timestep_cond=w_emb, **kw(cond)).sample.float()
            skip1, out1 = S.boundary_scalings(end, scaling=cfg.timestep_scaling)
            x0_t = S.x0_and_eps(t_raw, end, x_prev, self.alphas_cumprod, self.prediction_type)[0]
            target = _bc(skip1, x_prev) * x_prev + _bc(out1, x_prev) * x0_t
        loss = S.consistency_loss(pred, target, cfg.loss_type, cfg.huber_c)
        return {"loss": loss, "mse": torch.nn.functional.mse_loss(pred, target)}

    # ------------------------------------------------------------------ outputs
    def save_weights(self, folder: Path, gathered: torch.nn.Module | None = None) -> None:
        if self.cfg.lora:
            self._save_lora(folder)
        else:
            super().save_weights(folder, gathered)

    def _save_lora(self, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrap(self.acc.unwrap_model(self.student))))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=self.lora_config.to_dict())

    def final_unet(self):
        """The U-Net to ship (full variant): the target network, the student's EMA."""
        return copy.deepcopy(self.target).float()

    def finish(self, last: dict[str, float]) -> dict[str, float]:
        """``OUT/final``: the model's pipeline with the consistency U-Net and an LCM scheduler (full), or the
        LCM-LoRA file that ``load_lora_weights`` reads (``--lora``); each with a model card."""
        from bksdm.pipelines import copy_pipeline, load_record, write_record

        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            final = self.out / "final"
            final.mkdir(parents=True, exist_ok=True)
            if self.cfg.lora:
                self._save_lora(final)
                # beside the adapter: the LCMScheduler it trained for, which `generate --lora` uses with --scheduler lcm
                lcm_scheduler(self.noise_scheduler.config, self.cfg).save_pretrained(final / "scheduler")
            else:
                copy_pipeline(self.pipeline_dir, final, skip=("unet", "scheduler"))
                self.final_unet().save_pretrained(final / "unet", safe_serialization=True)
                lcm_scheduler(self.noise_scheduler.config, self.cfg).save_pretrained(final / "scheduler")
                index = json.loads((final / "model_index.json").read_text())
                index["scheduler"] = ["diffusers", "LCMScheduler"]
                (final / "model_index.json").write_text(json.dumps(index, indent=2))
                record = load_record(self.pipeline_dir) or {}
                write_record(final, {**record, "lcm": {"steps": self.step, "teacher": self.cfg.teacher or self.cfg.model,
                                               "skipped": dict(self.skips)}})
            if self.cfg.sample_prompts:
                self.sample_grid()
            self._card(final, last)
        self.acc.end_training()
        return last

    def _card(self, final: Path, last: dict[str, float]) -> None:
        from bksdm.cards import write_finetune_card
        from bksdm.pipelines import load_record

        cfg = self.cfg
        training = {
            "method": ("LCM-LoRA (rank {0}, alpha {0}, no guidance input)".format(cfg.lora_rank) if cfg.lora else
                       f"latent consistency distillation, guidance embedding width {cfg.time_cond_proj_dim}, "
                       f"target EMA {cfg.ema_decay} (shipped)"),
            "teacher (ODE solver)": cfg.teacher or cfg.model,
            "solver": f"DDIM over {cfg.num_ddim_timesteps} of {len(self.alphas_cumprod)} timesteps, "
                      f"guidance w in [{cfg.w_min}, {cfg.w_max}] (LCM convention)",
            "loss": f"{cfg.loss_type}" + (f" (c = {cfg.huber_c})" if cfg.loss_type == "huber" else ""),
            "steps": f"{self.step} optimiser steps of {cfg.batch_size} x {cfg.grad_accum} x {self.acc.num_processes} "
                     f"images at {cfg.resolution} px, lr {cfg.learning_rate}",
            "data": cfg.cache or cfg.data, "precision": cfg.mixed_precision,
            "unusable samples skipped": self.skips.summary(examples=False),
            "final loss": last.get("loss"),
            "generate": "bksdm generate --scheduler lcm --steps 4" + (" --lora FILE --guidance 1" if cfg.lora else ""),
        }
        write_finetune_card(final, cfg.model, training, load_record(self.pipeline_dir), kind="Latent consistency distillation")

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """One row: the few-step student at ``sample_steps`` LCM steps, fixed seeds."""
        if not self.acc.is_main_process or not self.cfg.sample_prompts:
            return None
        from bksdm.generate import generate_images
        from bksdm.models import load_text_side
        from bksdm.report import image_grid

        vae, text = load_text_side(self.pipeline_dir)
        unet = unwrap(self.acc.unwrap_model(self.student)) if self.cfg.lora else self.final_unet()
        dtype = next(unet.parameters()).dtype
        row = generate_images({"unet": unet.float(), "vae": vae, **text}, lcm_scheduler(self.noise_scheduler.config, self.cfg),
                              self.cfg.sample_prompts, seeds=list(range(len(self.cfg.sample_prompts))),
                              steps=self.cfg.sample_steps, guidance=1.0 if self.cfg.lora else 7.5)
        unet.to(dtype)
        path = self.out / "samples" / f"step-{self.step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid([row]).save(path)
        return path


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) on ``like``'s device and dtype."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def lcm_scheduler(config, cfg=None):
    """An ``LCMScheduler`` on the model's noise schedule (betas, prediction type) and, given the run's ``cfg``,
    on the skipping schedule and boundary scaling it trained for (``original_inference_steps`` =
    ``num_ddim_timesteps``, ``timestep_scaling``): the scheduler shipped is the one the consistency function
    learnt, not LCMScheduler's defaults (50, 10.0)."""
    from diffusers import LCMScheduler

    trained = {} if cfg is None else {"original_inference_steps": cfg.num_ddim_timesteps,
                                      "timestep_scaling": cfg.timestep_scaling}
    return LCMScheduler.from_config(config, **trained)
