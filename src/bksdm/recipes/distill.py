"""The distillation recipe (paper sections C and E): one class, one GPU or many through accelerate.

loss = lambda_sd * MSE(student, target) + lambda_out * MSE(student, teacher) + lambda_feat * sum_k MSE(f_s_k, f_t_k)

``DistillRecipe(cfg).setup().train()`` runs it; ``loss_step`` returns every term by name. The teacher is wrapped so
it stays frozen in eval mode; feature hooks sit on the unwrapped modules so DDP/compile names never matter. The
loop, data, checkpoints and exact resume are :class:`bksdm.trainer.Trainer`'s.

The same code distils a U-Net (SD, SDXL: DDPM objective) and a transformer (SD3 / SD3.5, Flux.1: flow matching):
``self.objective`` (from the teacher's scheduler) draws ``(noisy, t, target)`` and weights the task term,
``self.family.denoise`` calls either denoiser, ``self.family.backbone`` names its folder (``unet`` or
``transformer``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bksdm.distill.config import DistillConfig
from bksdm.distill.hooks import FeatureHooks
from bksdm.errors import UserError
from bksdm.trainer import Trainer
from bksdm.training import FrozenTeacher, task_loss, timestep_weights, unwrap

TERMS = ("loss", "task", "out_kd", "feat_kd", "cfg_kd")


def guided_kd(s_cond: torch.Tensor, s_unc: torch.Tensor, t_cond: torch.Tensor, t_unc: torch.Tensor, g: float) -> torch.Tensor:
    """MSE between the student's and the teacher's classifier-free guided predictions at scale ``g``, u + g (c - u),
    with c the prediction for the caption and u for the empty prompt (each (b, C, h, w)). Guidance multiplies the
    error of the difference c - u by g; this term (bksdm's, not the paper's: docs/mini-world.md) trains that
    difference directly."""
    return F.mse_loss(s_unc + g * (s_cond - s_unc), t_unc + g * (t_cond - t_unc))


class DistillRecipe(Trainer):
    terms = TERMS
    tracker_name = "distill"
    backbones = ("unet", "transformer")
    shardable = True
    cfg: DistillConfig

    def pipeline_source(self) -> str:
        return self.cfg.teacher

    def build_objective(self):
        """The teacher's objective with this run's options: timestep bias (DDPM teachers) or the flow density and
        weighting (flow teachers); an option the teacher's objective does not have is a one-line error."""
        from bksdm.objectives import load_objective

        cfg = self.cfg
        objective = load_objective(self.pipeline_dir, **cfg.flow_options())
        if cfg.timestep_bias != "none":
            if objective.name == "flow":
                raise UserError("timestep_bias applies to DDPM teachers; a flow-matching teacher (SD3, Flux) draws its "
                                "timesteps from density (logit_normal, uniform, mode)")
            objective.weights = timestep_weights(objective.scheduler.config.num_train_timesteps, cfg.timestep_bias,
                                                 cfg.timestep_bias_portion, cfg.timestep_bias_multiplier)
        return objective

    def build_models(self) -> torch.nn.Module:
        """The frozen teacher with its feature hooks, the student (from the teacher, a compressed folder or at
        random) with its hooks, and the student's EMA. The denoiser is the pipeline's ``unet/`` or
        ``transformer/`` (``family.backbone``)."""
        from bksdm.pipelines import derivation_for, load_backbone, read_backbone_config

        cfg = self.cfg
        if cfg.lambda_cfg > 0 and not self.family.classifier_free:
            raise UserError(f"lambda_cfg distils classifier-free guidance, and this {self.family.name} teacher is not "
                            f"guided with an unconditional pass (FLUX.1 is guidance-distilled); set lambda_cfg 0")
        self.teacher_config, teacher_dir = read_backbone_config(self.pipeline_dir)
        if cfg.feature_points != "blocks" and self.family.backbone != "unet":
            raise UserError("feature_points self_attn pairs U-Net self-attention layers; transformer students use blocks")
        self.derivation = derivation_for(self.teacher_config, cfg.student)
        teacher_model = load_backbone(teacher_dir, self.teacher_config)
        student = self._student(teacher_model)
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.teacher = FrozenTeacher(teacher_model).to(self.acc.device, self.weight_dtype)
        # block outputs (BK-SDM; transformers: segment ends, image stream) or the self-attention layers of the
        # kept transformer layers (KOALA)
        pairs = self.derivation.layer_pairs if cfg.feature_points == "blocks" else self.derivation.attn_pairs
        self.t_hooks = FeatureHooks(self.teacher.unet, [t for t, _ in pairs], "teacher")
        self.s_hooks = FeatureHooks(student, [s for _, s in pairs], "student")
        self.ema = None  # made in on_prepared, from the parameters training will update (sharded ones are new)
        return student

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.teacher.unet]

    def on_prepared(self) -> None:
        if self.cfg.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(unwrap(self.student).parameters(), decay=self.cfg.ema_decay, foreach=self.cfg.ema_foreach)
            self.ema.to(self.acc.device)

    def sharded_state(self) -> dict[str, torch.Tensor]:
        """The EMA's shadow shards (its step count goes to ``ema.pt`` with the other scalars)."""
        return {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)} if self.ema is not None else {}

    def needs_empty_prompt(self) -> bool:
        return super().needs_empty_prompt() or self.cfg.lambda_cfg > 0

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.step(unwrap(self.student).parameters())

    def save_extra(self, folder: Path) -> None:
        if self.ema is not None:
            state = self.ema.state_dict()
            if self.sharded:  # the shadow shards are in the sharded checkpoint
                state.pop("shadow_params")
            torch.save(state, folder / "ema.pt")

    def load_extra(self, folder: Path) -> None:
        if self.ema is not None and (folder / "ema.pt").is_file():
            state = torch.load(folder / "ema.pt", weights_only=False)
            if self.sharded:
                state["shadow_params"] = self.ema.shadow_params  # filled from the sharded checkpoint
            self.ema.load_state_dict(state)
            self.ema.to(self.acc.device)

    def _student(self, teacher_model):
        """A new student initialised from the teacher (or at random), or a student folder checked against it."""
        from bksdm.arch import init_student_from_teacher
        from bksdm.pipelines import load_backbone

        cfg, der = self.cfg, self.derivation
        folder = Path(cfg.student)
        student = None
        if folder.is_dir():
            student = load_backbone(folder / self.family.backbone, self.teacher_config)
            for key, want in der.student_config.items():
                have = student.config.get(key)
                if isinstance(want, (list, tuple)):
                    want, have = list(want), list(have) if isinstance(have, (list, tuple)) else have
                if have != want:
                    raise UserError(f"student {folder} does not match this teacher: its {key} is {have!r}, "
                                    f"the teacher's spec gives {want!r}; compress it from this teacher")
        if cfg.init == "random":  # the ablation's N1: the student's architecture, none of its weights
            torch.manual_seed(cfg.seed)
            return type(teacher_model).from_config(der.student_config)
        return student if student is not None else init_student_from_teacher(teacher_model, der)

    # ------------------------------------------------------------------ loss
    def loss_step(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """All loss terms for one micro-batch: ``loss`` (weighted total), ``task`` (the objective's target, weighted
        per row by ``objective.weight(t)``), ``out_kd``, ``feat_kd``, ``cfg_kd`` (zero unless ``lambda_cfg``)."""
        cfg = self.cfg
        latents, cond = self.encode(batch, gen)
        noisy, t, target = self.objective.sample(latents, gen)
        n, wd = noisy.shape[0], self.weight_dtype
        x, tt, c = noisy, t, cond
        if cfg.lambda_cfg > 0:  # guided KD's empty-prompt rows ride in the same calls: one batch of n + b, not two
            b = max(1, round(n * cfg.cfg_fraction))  # the first b rows: a cheaper, unbiased estimate
            uncond = self.unconditional({k: v[:b] for k, v in cond.items()})
            x, tt = torch.cat([noisy, noisy[:b]]), torch.cat([t, t[:b]])
            c = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()}
        denoise = self.family.denoise
        t_all = denoise(self.teacher, x.to(wd), tt, {k: v.to(wd) for k, v in c.items()}).float()
        t_feats = [f[:n].float() for f in self.t_hooks.pop()]  # the empty-prompt rows' features are not distilled
        s_all = denoise(self.student, x, tt, c).float()
        s_feats = [f[:n].float() for f in self.s_hooks.pop()]
        t_pred, s_pred = t_all[:n], s_all[:n]
        task = task_loss(self.objective, s_pred, target, t)
        out_kd = F.mse_loss(s_pred, t_pred)
        feat_kd = sum(F.mse_loss(s, tf) for s, tf in zip(s_feats, t_feats))
        cfg_kd = torch.zeros((), device=s_pred.device)
        if cfg.lambda_cfg > 0:
            cfg_kd = guided_kd(s_pred[: len(s_all) - n], s_all[n:], t_pred[: len(t_all) - n], t_all[n:], cfg.cfg_scale)
        loss = cfg.lambda_sd * task + cfg.lambda_out * out_kd + cfg.lambda_feat * feat_kd + cfg.lambda_cfg * cfg_kd
        return {"loss": loss, "task": task, "out_kd": out_kd, "feat_kd": feat_kd, "cfg_kd": cfg_kd}

    # ------------------------------------------------------------------ outputs
    def final_model(self):
        """The student denoiser (U-Net or transformer) to ship: a copy holding the EMA weights when EMA is on.
        Sharded: gathered whole on the first process (a collective: every process calls it; the others get None)."""
        import copy

        if self.sharded:  # the EMA swapped into the shards, gathered once on the first process, swapped back
            from bksdm.sharding import gather

            params = list(self.student.parameters())
            with torch.no_grad():  # one tensor at a time: DTensor has no foreach copy (EMAModel.store / copy_to)
                live = [p.detach().clone() for p in params] if self.ema is not None else []
                for p, shadow in zip(params, self.ema.shadow_params if self.ema is not None else []):
                    p.copy_(shadow)
                model = gather(self.student, self.acc.is_main_process)
                for p, kept in zip(params, live):
                    p.copy_(kept)
            return model
        model = copy.deepcopy(unwrap(self.acc.unwrap_model(self.student))).float()
        if self.ema is not None:
            self.ema.copy_to(model.parameters())
        return model

    final_unet = final_model  # the name U-Net callers know

    def finish(self, last: dict[str, float]) -> dict[str, float]:
        """Write ``out/final``: the teacher's other components with the student denoiser (``unet/`` or
        ``transformer/``), loadable by the family's diffusers pipeline class."""
        from bksdm.pipelines import copy_pipeline, load_record, write_record

        self.acc.wait_for_everyone()
        model = self.final_model() if self.sharded else None  # a collective when sharded
        if self.acc.is_main_process:
            final, backbone = self.out / "final", self.family.backbone
            copy_pipeline(self.pipeline_dir, final, skip=(backbone,))
            (model if model is not None else self.final_model()).save_pretrained(final / backbone, safe_serialization=True)
            student = Path(str(self.cfg.student))  # a compressed folder: how its spec was chosen goes on with it
            chosen = (load_record(student) or {}).get("chosen_by_measurement") if student.is_dir() else None
            kind = {"backbone": self.teacher_config["_class_name"]} if backbone != "unet" else {}
            record = {"teacher": self.cfg.teacher, **kind, **self.derivation.record(), **({"chosen_by_measurement": chosen} if chosen else {}),
                      "distill": {"steps": self.step, "skipped": dict(self.skips)}}
            # the key map stays: it is how a LoRA made for the teacher finds the student's weights (bksdm.lora.remap)
            write_record(final, record)
            grid = self.sample_grid() if self.cfg.sample_prompts else None
            if grid is not None:
                shutil.copy(grid, final / "samples.png")
            self._model_card(final, record, last)
        self.acc.end_training()
        return last

    def _model_card(self, final: Path, record: dict[str, Any], last: dict[str, float]) -> None:
        """``final/README.md``: what was removed, what it saved, how it was trained (huggingface_hub model card)."""
        from bksdm.cards import write_model_card
        from bksdm.profile import count_params

        cfg, backbone = self.cfg, self.family.backbone
        params = {f"teacher_{backbone}": count_params(self.teacher.unet), f"student_{backbone}": count_params(unwrap(self.student))}
        training = {
            "recipe": "BK-SDM distillation: task + output-KD + feature-KD loss "
                      f"(weights {cfg.lambda_sd} / {cfg.lambda_out} / {cfg.lambda_feat})",
            "steps": f"{self.step} optimiser steps of {cfg.batch_size} x {cfg.grad_accum} x {self.acc.num_processes} "
                     f"images at {cfg.resolution} px",
            "data": cfg.cache or cfg.data, "optimizer": f"AdamW, lr {cfg.lr}, {cfg.lr_scheduler} schedule, {cfg.lr_warmup_steps} warm-up steps",
            "caption dropout": cfg.caption_dropout,
            "precision": cfg.mixed_precision, "ema": f"decay {cfg.ema_decay} (weights shipped)" if cfg.ema else "off",
            "init": "teacher weights" if cfg.init == "teacher" else "random",
            "unusable samples skipped": self.skips.summary(examples=False),
        }
        final_losses = {f"final {k} loss": v for k, v in last.items() if k in TERMS}
        write_model_card(final, record, self.teacher_config, params, training, final_losses or None,
                         "samples.png" if (final / "samples.png").is_file() else None)

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Teacher (top row) vs student (bottom row) at fixed seeds, one column per sample prompt."""
        if not self.acc.is_main_process or not self.cfg.sample_prompts:
            return None
        from bksdm.generate import generate_images
        from bksdm.models import load_text_side, load_component
        from bksdm.report import image_grid

        vae, text = load_text_side(self.pipeline_dir)
        sched = load_component(self.pipeline_dir, "scheduler")
        rows = []
        for model in (self.teacher.unet, self.final_model()):
            rows.append(generate_images({self.family.backbone: model.float(), "vae": vae, **text}, sched, self.cfg.sample_prompts,
                                        seeds=list(range(len(self.cfg.sample_prompts))), steps=self.cfg.sample_steps))
        self.teacher.unet.to(self.weight_dtype)
        path = self.out / "samples" / f"step-{self.step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(rows).save(path)
        return path
