"""The training loop every data-driven recipe shares (``distill``, ``lcm``): accelerate set-up, data (image
sources, ``hf:`` datasets, the latent cache), prompt encoding through the family, the optimiser and learning-rate
schedule, gradient accumulation, atomic checkpoints and exact resume, per-term logging.

A recipe subclasses :class:`Trainer` and supplies its models (:meth:`build_models`), its loss
(:meth:`loss_step`, every term by name, listed in :attr:`terms`), what follows each optimiser step
(:meth:`after_step`, e.g. an EMA) and its outputs (:meth:`finish`, :meth:`sample_grid`). Every random draw of a
step comes from a generator seeded by (seed, micro-batch, rank), so a resumed run equals an uninterrupted one.
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

from bksdm.config import TrainConfig
from bksdm.distill.checkpoints import checkpoints
from bksdm.errors import UserError, check_output, reading
from bksdm.models import encode_pixels
from bksdm.skips import Skips, Unusable
from bksdm.training import check_precision, fresh_accelerator_state, unwrap

MAX_EMPTY_MICRO_BATCHES = 50
"""Consecutive micro-batches of only unreadable items after which a run stops (instead of reading forever)."""
RUN_OUTPUTS = ("checkpoints", "final", "logs", "samples", "config.json")
"""What a run writes into its folder: present means the folder holds a run."""


class Trainer:
    terms: tuple[str, ...] = ("loss",)
    """The names :meth:`loss_step` returns (``loss`` first): logged per step, shown in the progress bar."""
    tracker_name = "train"

    def __init__(self, cfg: TrainConfig, source: Any = None):
        self.cfg = cfg.validate()
        self.source_override = source
        self.step = 0
        self.micro = 0  # micro-batches consumed (with fully unreadable ones, more than step x grad_accum)
        self.skipped = 0
        self.skips = Skips()  # the same items by reason (bksdm.skips): in the summary, checkpoints and model card

    # ------------------------------------------------------------------ what a recipe supplies
    def pipeline_source(self) -> str:
        """The pipeline whose VAE, text encoder, tokenizer and noise schedule the run uses."""
        raise NotImplementedError

    def build_models(self) -> torch.nn.Module:
        """Load the recipe's models; return the module to train (before ``accelerate.prepare``)."""
        raise NotImplementedError

    def on_prepared(self) -> None:
        """After ``prepare``, before resume: register extra state for checkpoints, move helpers to the device."""

    def loss_step(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        """After each optimiser step (an EMA update)."""

    def caption_dropout(self) -> float:
        return float(getattr(self.cfg, "caption_dropout", 0.0))

    def needs_empty_prompt(self) -> bool:
        """Whether the run uses the empty prompt's conditioning (``self.empty_cond``, computed once at set-up)."""
        return self.caption_dropout() > 0

    def finish(self, last: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def sample_grid(self) -> Path | None:
        return None

    def save_weights(self, folder: Path) -> None:
        """The trained weights in a checkpoint, readable without accelerate (``folder/unet``)."""
        unwrap(self.acc.unwrap_model(self.student)).save_pretrained(folder / "unet", safe_serialization=True)

    def save_extra(self, folder: Path) -> None:
        """State beyond accelerate's that a checkpoint needs (main process)."""

    def load_extra(self, folder: Path) -> None:
        """Read back what :meth:`save_extra` wrote."""

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        from bksdm.arch.families import family_of
        from bksdm.hub import read_unet_config
        from bksdm.models import DTYPES, default_device, load_text_side, pipeline_folder

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
        self.weight_dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # "no": fp32
        self.pipeline_dir = pipeline_folder(self.pipeline_source(), "model")
        self.family = family_of(read_unet_config(self.pipeline_dir)[0])
        self.source = self._open_data()
        trainable = self.build_models()
        if not getattr(self.source, "is_cache", False):
            self.vae, self.text_parts = load_text_side(self.pipeline_dir, self.acc.device, self.weight_dtype)
        with reading(self.pipeline_dir / "scheduler", "scheduler of"):
            self.noise_scheduler = DDPMScheduler.from_pretrained(self.pipeline_dir, subfolder="scheduler")

        fused = cfg.fused_adam and self.acc.device.type in ("cpu", "cuda")
        params = [p for p in trainable.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=fused or None)
        self.student, self.opt = self.acc.prepare(trainable, opt)
        self.params = params
        # stepped once per optimiser step by the loop (not prepared: accelerate would step it once per process)
        # and saved with every checkpoint
        self.lr_sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps,
                                      num_training_steps=cfg.max_steps)
        self.acc.register_for_checkpointing(self.lr_sched)
        self.on_prepared()
        self.empty_cond = self._empty_prompt() if self.needs_empty_prompt() else None
        if cfg.resume:
            self._resume(cfg.resume)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        if log_with:
            self.acc.init_trackers(self.tracker_name, config={k: v for k, v in cfg.to_dict().items() if not isinstance(v, list)})
        return self

    def _empty_prompt(self) -> dict[str, torch.Tensor]:
        """The prompt conditioning the pipeline uses for "no prompt" (each tensor (1, ...); the empty prompt's
        encoding, zeros for SDXL), for caption dropout and guidance; a cached run loads the text encoders once for it."""
        from bksdm.models import load_components, model_index

        parts = load_components(self.pipeline_dir, self.family.text_components)
        with torch.no_grad():
            cond = self.family.unconditional(parts, "cpu", model_index(self.pipeline_dir))
        return {k: v.float().to(self.acc.device) for k, v in cond.items()}

    def unconditional(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``cond`` with its prompt part replaced by the empty prompt's (other conditioning, SDXL's sizes, kept)."""
        return {**cond, **{k: v.expand(len(cond[k]), *v.shape[1:]).to(cond[k].dtype) for k, v in self.empty_cond.items()}}

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
        from bksdm.distill.data import open_source

        if self.source_override is not None:
            return open_source(self.source_override)
        if self.cfg.cache:
            src = CacheSource(self.cfg.cache)
            if src.info["resolution"] != self.cfg.resolution:
                raise UserError(f"cache {self.cfg.cache} was built at {src.info['resolution']} px, not {self.cfg.resolution}")
            return src
        return open_source(self.cfg.data, **self.cfg.data_options())

    # ------------------------------------------------------------------ data
    def encode(self, batch: dict[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(latents (B, C, h, w), the conditioning dict) from pixels and captions through the pipeline's VAE and the
        family's prompt encoding, or from the cache; ``self.family.unet_kwargs(cond)`` are the U-Net's arguments."""
        dev = self.acc.device
        if "mean" in batch:
            eps = torch.randn(batch["mean"].shape, generator=gen)
            latents = batch["mean"] + batch["std"] * eps
            latents = (latents * self.scaling_factor).to(dev)
            cond = {k: v.to(dev).float() for k, v in self.family.from_cache(batch).items()}
        else:
            with torch.no_grad():
                dist = encode_pixels(self.vae, batch["pixels"].to(dev))  # fp32 where the VAE asks (SDXL)
                eps = torch.randn(dist.mean.shape, generator=gen).to(dev, dist.mean.dtype)
                latents = (dist.mean + dist.std * eps).float() * self.vae.config.scaling_factor
                cond = {k: v.float() for k, v in self.family.encode_prompt(self.text_parts, batch["text"], dev).items()}
        cond.update(self.family.added_conditioning(latents.shape[0], self.cfg.resolution, dev, batch.get("size_ids")))
        if self.caption_dropout() > 0:  # drawn only when on, so runs without it keep their random stream
            drop = torch.rand(latents.shape[0], generator=gen) < self.caption_dropout()
            cond = self.family.drop_rows(cond, drop.to(dev), self.empty_cond)
        return latents, cond

    @property
    def scaling_factor(self) -> float:
        """The VAE's latent scale (read once; the cached path has no VAE loaded)."""
        if not hasattr(self, "_scaling"):
            cfg = json.loads((self.pipeline_dir / "vae" / "config.json").read_text())
            self._scaling = float(cfg.get("scaling_factor", 0.18215))
        return self._scaling

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
        sums = {k: 0.0 for k in self.terms}
        t0, seen, last, empty = time.perf_counter(), 0, {}, 0
        self.student.train()
        for batch in batches:
            self.skipped += batch["skipped"]
            for reason, detail in batch["skip_reasons"]:
                self.skips.add(Unusable(reason, detail))
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.micro * acc.num_processes + acc.process_index)
            self.micro += 1
            if "pixels" not in batch and "mean" not in batch:  # every item of this micro-batch was unreadable
                empty += 1
                if empty >= MAX_EMPTY_MICRO_BATCHES:
                    raise UserError(f"the last {empty} micro-batches ({empty * cfg.batch_size} items) of {cfg.data or cfg.cache} "
                                    f"were all unusable ({self.skips.summary()}); check the data")
                continue
            empty = 0
            with acc.accumulate(self.student):
                terms = self.loss_step(batch, gen)
                acc.backward(terms["loss"])
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    lr = self.lr_sched.get_last_lr()[0]  # the rate this step used
                    self.lr_sched.step()
            for k in self.terms:
                sums[k] += terms[k].item() / cfg.grad_accum
            seen += len(batch.get("text", batch.get("emb", [])))
            if not acc.sync_gradients:
                continue
            self.step += 1
            self.after_step()
            rate = seen * acc.num_processes / (time.perf_counter() - t0)
            last = {**sums, "lr": lr, "samples_per_s": rate, "skipped": self.skipped}
            if self.step % cfg.log_every == 0:
                self._log(last)
            bar = bar or tqdm(total=cfg.max_steps, initial=self.step - 1, disable=not acc.is_main_process, desc=self.tracker_name,
                              unit="step")
            bar.set_postfix({k: f"{sums[k]:.4f}" for k in self.terms} | {"samples/s": f"{rate:.2f}"})
            bar.update(1)
            sums = {k: 0.0 for k in self.terms}
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample_grid()
            if self.step >= cfg.max_steps:
                break
        if bar is not None:
            bar.close()
        self.skips = self.all_skips()  # every process's, on every process: training has ended
        if self.skips.total:  # what was left out, and why, before the run's result
            self.acc.print(f"data: {self.skips.summary()} (samples: an item is counted each time it is drawn)")
        return self.finish(last)

    def all_skips(self) -> Skips:
        """The skipped items of every process, by reason (each process reads its own share of the data)."""
        if self.acc.num_processes == 1:
            return self.skips
        from accelerate.utils import gather_object

        total = Skips()
        for part in gather_object([dict(self.skips)]):
            total.update_from(part)
        total.examples = dict(self.skips.examples)
        return total

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

    def save_checkpoint(self) -> Path:
        """Atomically write ``checkpoints/step-N`` (a temporary folder renamed into place); keep the last N."""
        ckdir = self.out / "checkpoints"
        final, tmp = ckdir / f"step-{self.step}", ckdir / f".tmp-step-{self.step}"
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        skips = self.all_skips()  # collective: every process calls it
        if self.acc.is_main_process:
            state = {"step": self.step, "micro": self.micro, "skipped": self.skipped, "skip_reasons": dict(skips),
                     "processes": self.acc.num_processes}
            self.save_extra(tmp)
            self.save_weights(tmp)
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
            self.load_extra(path)
        self.step, self.skipped = step, skipped
        self.skips = Skips()  # run totals live on the main process; the others count from zero again
        if self.acc.is_main_process:
            self.skips.update_from(state.get("skip_reasons", {"reason not recorded (older checkpoint)": skipped}
                                             if skipped else {}))
        self.micro = int(state.get("micro", step * self.cfg.grad_accum))  # older checkpoints: no skipped batches
        self.acc.print(f"resumed from {path} at step {self.step}")

