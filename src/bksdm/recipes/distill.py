"""The distillation recipe (paper sections C and E): one class, one GPU or many through accelerate.

loss = lambda_sd * MSE(student, target) + lambda_out * MSE(student, teacher) + lambda_feat * sum_k MSE(f_s_k, f_t_k)

``DistillRecipe(cfg).train()`` runs it; ``loss_step`` returns every term by name. The teacher is wrapped so it
stays frozen in eval mode; feature hooks sit on the unwrapped modules so DDP/compile names never matter; every
random draw of a step comes from a generator seeded by (seed, micro-batch, rank), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bksdm.distill.checkpoints import checkpoints
from bksdm.distill.config import DistillConfig
from bksdm.distill.hooks import FeatureHooks
from bksdm.errors import UserError, check_output, reading
from bksdm.training import FrozenTeacher, check_precision, fresh_accelerator_state, noisy_inputs, unwrap

TERMS = ("loss", "task", "out_kd", "feat_kd")
MAX_EMPTY_MICRO_BATCHES = 50
"""Consecutive micro-batches of only unreadable items after which a run stops (instead of reading forever)."""
RUN_OUTPUTS = ("checkpoints", "final", "logs", "samples", "config.json")
"""What a run writes into its folder: present means the folder holds a run."""


class DistillRecipe:
    def __init__(self, cfg: DistillConfig, source: Any = None):
        self.cfg = cfg.validate()
        self.source_override = source
        self.step = 0
        self.micro = 0  # micro-batches consumed (with fully unreadable ones, more than step x grad_accum)
        self.skipped = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> "DistillRecipe":
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers import DDPMScheduler

        from bksdm.arch.families import family_of
        from bksdm.pipelines import derivation_for
        from bksdm.hub import read_unet_config
        from bksdm.models import DTYPES, default_device, load_text_side, load_unet, pipeline_folder

        cfg = self.cfg
        check_precision(cfg.mixed_precision)
        self.out = check_output(cfg.out)
        self._claim_run_folder()
        log_with = None if cfg.report_to == "none" else cfg.report_to
        fresh_accelerator_state()
        self.acc = Accelerator(cpu=default_device() == "cpu", mixed_precision=cfg.mixed_precision,
                               gradient_accumulation_steps=cfg.grad_accum,
                               log_with=log_with, project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                                       logging_dir=str(self.out / "logs")))
        self.teacher_dir = pipeline_folder(cfg.teacher, "teacher")
        teacher_cfg, unet_dir = read_unet_config(self.teacher_dir)
        self.derivation = derivation_for(teacher_cfg, cfg.student)
        self.family = family_of(teacher_cfg)
        self.source = self._open_data()

        teacher_unet = load_unet(unet_dir)
        student = self._student(teacher_unet)
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.weight_dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # "no": fp32
        self.teacher = FrozenTeacher(teacher_unet).to(self.acc.device, self.weight_dtype)
        pairs = self.derivation.layer_pairs
        self.t_hooks = FeatureHooks(self.teacher.unet, [t for t, _ in pairs], "teacher")
        self.s_hooks = FeatureHooks(student, [s for _, s in pairs], "student")
        if not getattr(self.source, "is_cache", False):
            self.vae, self.tokenizer, self.text_encoder = load_text_side(self.teacher_dir, self.acc.device, self.weight_dtype)
        with reading(self.teacher_dir / "scheduler", "scheduler of"):
            self.noise_scheduler = DDPMScheduler.from_pretrained(self.teacher_dir, subfolder="scheduler")

        fused = cfg.fused_adam and self.acc.device.type in ("cpu", "cuda")
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=fused or None)
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(student.parameters(), decay=cfg.ema_decay, foreach=cfg.ema_foreach)
        self.student, self.opt = self.acc.prepare(student, opt)
        from diffusers.optimization import get_scheduler

        # stepped once per optimiser step by the recipe (not prepared: accelerate would step it once per process)
        # and saved with every checkpoint
        self.lr_sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                                      num_training_steps=cfg.max_steps)
        self.acc.register_for_checkpointing(self.lr_sched)
        self.empty_cond = self._empty_prompt() if cfg.caption_dropout > 0 else None
        if self.ema is not None:
            self.ema.to(self.acc.device)
        if cfg.resume:
            self._resume(cfg.resume)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if log_with:
            self.acc.init_trackers("distill", config={k: v for k, v in cfg.to_dict().items() if not isinstance(v, list)})
        return self

    def _empty_prompt(self) -> dict[str, torch.Tensor]:
        """The U-Net conditioning of the empty prompt (each tensor (1, ...)), for caption dropout; a cached run
        loads the text encoder once for it."""
        from bksdm.models import load_components

        parts = load_components(self.teacher_dir, self.family.text_components)
        with torch.no_grad():
            cond = self.family.encode_prompt(parts, [""], "cpu")
        return {k: v.float().to(self.acc.device) for k, v in cond.items()}

    def _claim_run_folder(self) -> None:
        """Refuse to mix two runs in one folder: an earlier run is continued (``resume``), replaced
        (``overwrite``: its outputs are removed first) or left alone (an error, before any work)."""
        cfg = self.cfg
        used = [n for n in RUN_OUTPUTS if (self.out / n).exists()]
        if not used or cfg.resume:
            return
        if not cfg.overwrite:
            raise UserError(f"{self.out} already holds a run ({', '.join(used)}); pass --resume latest to continue it, "
                            f"--overwrite to replace it, or choose another --out")
        if int(os.environ.get("RANK", "0")) == 0:  # before accelerate exists: the launcher's rank
            for n in used:
                target = self.out / n
                shutil.rmtree(target) if target.is_dir() else target.unlink()

    def _open_data(self):
        from bksdm.distill.cache import CacheSource
        from bksdm.distill.config import data_options
        from bksdm.distill.data import open_source

        if self.source_override is not None:
            return open_source(self.source_override)
        if self.cfg.cache:
            src = CacheSource(self.cfg.cache)
            if src.info["resolution"] != self.cfg.resolution:
                raise UserError(f"cache {self.cfg.cache} was built at {src.info['resolution']} px, not {self.cfg.resolution}")
            return src
        return open_source(self.cfg.data, **data_options(self.cfg))

    def _student(self, teacher_unet):
        """A new student initialised from the teacher (or at random), or a student folder checked against it."""
        from diffusers import UNet2DConditionModel

        from bksdm.arch import init_student_from_teacher
        from bksdm.models import load_unet

        cfg, der = self.cfg, self.derivation
        folder = Path(cfg.student)
        student = None
        if folder.is_dir():
            student = load_unet(folder / "unet")
            for key, want in der.student_config.items():
                have = student.config.get(key)
                if isinstance(want, (list, tuple)):
                    want, have = list(want), list(have) if isinstance(have, (list, tuple)) else have
                if have != want:
                    raise UserError(f"student {folder} does not match this teacher: its {key} is {have!r}, "
                                    f"the teacher's spec gives {want!r}; compress it from this teacher")
        if cfg.init == "random":  # the ablation's N1: the student's architecture, none of its weights
            torch.manual_seed(cfg.seed)
            return UNet2DConditionModel.from_config(der.student_config)
        return student if student is not None else init_student_from_teacher(teacher_unet, der)

    # ------------------------------------------------------------------ loss
    def encode(self, batch: dict[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(latents (B, C, h, w), the U-Net's conditioning keyword arguments) from pixels and captions through the
        teacher's VAE and the family's prompt encoding, or from the cache."""
        dev = self.acc.device
        if "mean" in batch:
            eps = torch.randn(batch["mean"].shape, generator=gen)
            latents = batch["mean"] + batch["std"] * eps
            latents = (latents * self.scaling_factor).to(dev)
            cond = {k: v.to(dev).float() for k, v in self.family.from_cache(batch).items()}
        else:
            with torch.no_grad():
                dist = self.vae.encode(batch["pixels"].to(dev, self.weight_dtype)).latent_dist
                eps = torch.randn(dist.mean.shape, generator=gen).to(dev, dist.mean.dtype)
                latents = (dist.mean + dist.std * eps).float() * self.vae.config.scaling_factor
                parts = {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}
                cond = {k: v.float() for k, v in self.family.encode_prompt(parts, batch["text"], dev).items()}
        if self.empty_cond is not None:  # drawn only when on, so runs without it keep their random stream
            drop = torch.rand(latents.shape[0], generator=gen) < self.cfg.caption_dropout
            for k, v in cond.items():
                v[drop.to(v.device)] = self.empty_cond[k].to(v.dtype)
        return latents, cond

    @property
    def scaling_factor(self) -> float:
        """The teacher VAE's latent scale (read once; the cached path has no VAE loaded)."""
        if not hasattr(self, "_scaling"):
            cfg = json.loads((self.teacher_dir / "vae" / "config.json").read_text())
            self._scaling = float(cfg.get("scaling_factor", 0.18215))
        return self._scaling

    def loss_step(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """All loss terms for one micro-batch: ``loss`` (weighted total), ``task``, ``out_kd``, ``feat_kd``."""
        cfg = self.cfg
        latents, cond = self.encode(batch, gen)
        noisy, t, target = noisy_inputs(self.noise_scheduler, latents, gen)
        t_cond = {k: v.to(self.weight_dtype) for k, v in cond.items()}
        t_pred = self.teacher(noisy.to(self.weight_dtype), t, **t_cond).sample.float()
        t_feats = [f.float() for f in self.t_hooks.pop()]
        s_pred = self.student(noisy, t, **cond).sample.float()
        s_feats = [f.float() for f in self.s_hooks.pop()]
        task = F.mse_loss(s_pred, target)
        out_kd = F.mse_loss(s_pred, t_pred)
        feat_kd = sum(F.mse_loss(s, tf) for s, tf in zip(s_feats, t_feats))
        loss = cfg.lambda_sd * task + cfg.lambda_out * out_kd + cfg.lambda_feat * feat_kd
        return {"loss": loss, "task": task, "out_kd": out_kd, "feat_kd": feat_kd}

    # ------------------------------------------------------------------ train
    def train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        from bksdm.distill.loader import micro_batches

        cfg, acc = self.cfg, self.acc
        if self.step >= cfg.max_steps:
            return self.finish({})
        batches = micro_batches(self.source, cfg.seed, cfg.random_flip, cfg.resolution, cfg.batch_size,
                                acc.process_index, acc.num_processes, self.micro, cfg.num_workers)
        bar = None  # drawn at the first step: a run that cannot read its data ends with one line, not a bar
        sums = {k: 0.0 for k in TERMS}
        t0, seen, last, empty = time.perf_counter(), 0, {}, 0
        self.student.train()
        for batch in batches:
            self.skipped += batch["skipped"]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.micro * acc.num_processes + acc.process_index)
            self.micro += 1
            if "pixels" not in batch and "mean" not in batch:  # every item of this micro-batch was unreadable
                empty += 1
                if empty >= MAX_EMPTY_MICRO_BATCHES:
                    raise UserError(f"the last {empty} micro-batches ({empty * cfg.batch_size} items) of {cfg.data or cfg.cache} "
                                    f"were all unreadable ({self.skipped} skipped in all); check the data")
                continue
            empty = 0
            with acc.accumulate(self.student):
                terms = self.loss_step(batch, gen)
                acc.backward(terms["loss"])
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    lr = self.lr_sched.get_last_lr()[0]  # the rate this step used
                    self.lr_sched.step()
            for k in TERMS:
                sums[k] += terms[k].item() / cfg.grad_accum
            seen += len(batch.get("text", batch.get("emb", [])))
            if not acc.sync_gradients:
                continue
            self.step += 1
            if self.ema is not None:
                self.ema.step(unwrap(self.student).parameters())
            rate = seen * acc.num_processes / (time.perf_counter() - t0)
            last = {**sums, "lr": lr, "samples_per_s": rate, "skipped": self.skipped}
            if self.step % cfg.log_every == 0:
                self._log(last)
            bar = bar or tqdm(total=cfg.max_steps, initial=self.step - 1, disable=not acc.is_main_process, desc="distill",
                              unit="step")
            bar.set_postfix({k: f"{sums[k]:.4f}" for k in TERMS} | {"samples/s": f"{rate:.2f}"})
            bar.update(1)
            sums = {k: 0.0 for k in TERMS}
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample_grid()
            if self.step >= cfg.max_steps:
                break
        if bar is not None:
            bar.close()
        return self.finish(last)

    def _log(self, values: dict[str, float]) -> None:
        self.acc.log(values, step=self.step)
        if not self.acc.is_main_process:
            return
        path = self.out / "logs" / "losses.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", *values])
            w.writerow([self.step, *[f"{v:.6g}" for v in values.values()]])

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Atomically write ``checkpoints/step-N`` (a temporary folder renamed into place); keep the last N."""
        ckdir = self.out / "checkpoints"
        final, tmp = ckdir / f"step-{self.step}", ckdir / f".tmp-step-{self.step}"
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.acc.is_main_process:
            state = {"step": self.step, "micro": self.micro, "skipped": self.skipped, "processes": self.acc.num_processes}
            if self.ema is not None:
                torch.save(self.ema.state_dict(), tmp / "ema.pt")
            unwrap(self.acc.unwrap_model(self.student)).save_pretrained(tmp / "unet", safe_serialization=True)
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = checkpoints(ckdir)
            for old in done[: max(0, len(done) - self.cfg.checkpoints_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _resume(self, which: str) -> None:
        """Continue from ``which`` (a checkpoint folder) or the newest complete checkpoint (``latest``); an
        unreadable newest one is reported and the one before it is used."""
        if which != "latest":
            path = Path(which)
            if not (path / "trainer_state.json").is_file():
                raise UserError(f"{which} is not a checkpoint folder (no trainer_state.json)")
            return self._load_checkpoint(path)
        done = checkpoints(self.out / "checkpoints")
        if not done:
            self.acc.print(f"no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            return
        for k, path in enumerate(reversed(done)):
            try:
                return self._load_checkpoint(path)
            except UserError as exc:
                if k == len(done) - 1:
                    raise UserError(f"no checkpoint in {self.out / 'checkpoints'} can be read; the newest: {exc}") from None
                self.acc.print(f"checkpoint {path.name} cannot be read ({exc}); resuming from {done[-2 - k].name}")

    def _load_checkpoint(self, path: Path) -> None:
        with reading(path / "trainer_state.json", "checkpoint state"):
            state = json.loads((path / "trainer_state.json").read_text())
            step, skipped = int(state["step"]), int(state["skipped"])
        if state.get("processes", 1) != self.acc.num_processes:
            raise UserError(f"{path} was written by {state['processes']} processes and this run has "
                            f"{self.acc.num_processes}; the data split depends on it: resume with "
                            f"{state['processes']} processes")
        with reading(path, "checkpoint"):
            self.acc.load_state(str(path))
            if self.ema is not None and (path / "ema.pt").is_file():
                self.ema.load_state_dict(torch.load(path / "ema.pt", weights_only=False))
                self.ema.to(self.acc.device)
        self.step, self.skipped = step, skipped
        self.micro = int(state.get("micro", step * self.cfg.grad_accum))  # older checkpoints: no skipped batches
        self.acc.print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ outputs
    def final_unet(self):
        """The student U-Net to ship: a copy holding the EMA weights when EMA is on."""
        import copy

        unet = copy.deepcopy(unwrap(self.acc.unwrap_model(self.student))).float()
        if self.ema is not None:
            self.ema.copy_to(unet.parameters())
        return unet

    def finish(self, last: dict[str, float]) -> dict[str, float]:
        """Write ``out/final``: the teacher's other components with the student U-Net, loadable by diffusers."""
        from bksdm.pipelines import copy_pipeline, write_record

        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            final = self.out / "final"
            copy_pipeline(self.teacher_dir, final)
            self.final_unet().save_pretrained(final / "unet", safe_serialization=True)
            record = {"teacher": self.cfg.teacher, **self.derivation.record(), "distill": {"steps": self.step}}
            record.pop("key_map")
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

        cfg = self.cfg
        params = {"teacher_unet": count_params(self.teacher.unet), "student_unet": count_params(unwrap(self.student))}
        training = {
            "recipe": "BK-SDM distillation: task + output-KD + feature-KD loss "
                      f"(weights {cfg.lambda_sd} / {cfg.lambda_out} / {cfg.lambda_feat})",
            "steps": f"{self.step} optimiser steps of {cfg.batch_size} x {cfg.grad_accum} x {self.acc.num_processes} "
                     f"images at {cfg.resolution} px",
            "data": cfg.cache or cfg.data, "optimizer": f"AdamW, lr {cfg.lr}, {cfg.lr_scheduler} schedule, {cfg.lr_warmup_steps} warm-up steps",
            "caption dropout": cfg.caption_dropout,
            "precision": cfg.mixed_precision, "ema": f"decay {cfg.ema_decay} (weights shipped)" if cfg.ema else "off",
            "init": "teacher weights" if cfg.init == "teacher" else "random",
            "skipped unreadable items": self.skipped,
        }
        final_losses = {f"final {k} loss": v for k, v in last.items() if k in TERMS}
        write_model_card(final, record, dict(self.teacher.unet.config), params, training, final_losses or None,
                         "samples.png" if (final / "samples.png").is_file() else None)

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Teacher (top row) vs student (bottom row) at fixed seeds, one column per sample prompt."""
        if not self.acc.is_main_process or not self.cfg.sample_prompts:
            return None
        from bksdm.generate import generate_images
        from bksdm.models import load_text_side, load_component
        from bksdm.report import image_grid

        vae, tok, te = load_text_side(self.teacher_dir)
        sched = load_component(self.teacher_dir, "scheduler")
        rows = []
        for unet in (self.teacher.unet, self.final_unet()):
            rows.append(generate_images(unet.float(), vae, tok, te, sched, self.cfg.sample_prompts,
                                        seeds=list(range(len(self.cfg.sample_prompts))), steps=self.cfg.sample_steps))
        self.teacher.unet.to(self.weight_dtype)
        path = self.out / "samples" / f"step-{self.step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(rows).save(path)
        return path
