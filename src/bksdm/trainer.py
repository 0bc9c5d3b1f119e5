"""The training loop every data-driven recipe shares (``distill``, ``lcm``): accelerate set-up, data (image
sources, ``hf:`` datasets, the latent cache), prompt encoding through the family, the objective from the teacher's
scheduler (:mod:`bksdm.objectives`: DDPM or flow matching), the optimiser and learning-rate schedule, gradient
accumulation, atomic checkpoints and exact resume, per-term logging.

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
from bksdm.distill.checkpoints import checkpoints, claim_run_folder
from bksdm.errors import UserError, check_output, reading
from bksdm.models import encode_pixels
from bksdm.skips import Skips, Unusable
from bksdm.training import check_precision, fresh_accelerator_state, to_latent_space, unwrap

MAX_EMPTY_MICRO_BATCHES = 50
"""Consecutive micro-batches of only unreadable items after which a run stops (instead of reading forever)."""


class Trainer:
    terms: tuple[str, ...] = ("loss",)
    """The names :meth:`loss_step` returns (``loss`` first): logged per step, shown in the progress bar."""
    tracker_name = "train"
    backbones: tuple[str, ...] = ("unet",)
    """The denoiser folders (``Family.backbone``) the recipe trains; another is refused in one line at set-up."""
    transformer_note = ""  # why a recipe refuses transformer pipelines, said with the refusal
    shardable = False
    """Whether the recipe runs with ``shard: fsdp2`` (:mod:`bksdm.sharding`; it lists :meth:`frozen_modules`)."""

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

    def build_objective(self):
        """The training objective (:mod:`bksdm.objectives`) from the teacher's scheduler config: ``sample(latents,
        gen) -> (noisy, t, target)``, ``weight(t)``, ``x0``; ``self.noise_scheduler`` is its scheduler."""
        from bksdm.objectives import load_objective

        return load_objective(self.pipeline_dir)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The frozen models called on every process (a teacher): sharded with the student under ``shard: fsdp2``."""
        return []

    def sharded_state(self) -> dict[str, torch.Tensor]:
        """Sharded tensors beyond the model and optimiser that a ``shard: fsdp2`` checkpoint holds (an EMA's)."""
        return {}

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

    @property
    def sharded(self) -> bool:
        return self.cfg.shard == "fsdp2"

    def save_weights(self, folder: Path, gathered: torch.nn.Module | None = None) -> None:
        """The trained weights in a checkpoint, readable without accelerate (``folder/unet`` or ``transformer``);
        ``gathered``: the sharded student gathered whole (:func:`bksdm.sharding.gather`)."""
        model = gathered if gathered is not None else unwrap(self.acc.unwrap_model(self.student))
        model.save_pretrained(folder / self.family.backbone, safe_serialization=True)

    def save_extra(self, folder: Path) -> None:
        """State beyond accelerate's that a checkpoint needs (main process)."""

    def load_extra(self, folder: Path) -> None:
        """Read back what :meth:`save_extra` wrote."""

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers.optimization import get_scheduler

        from bksdm.models import (DTYPES, decoder_factor, default_device, load_text_side, pipeline_family,
                                  pipeline_folder, unsupported)
        from bksdm.pipelines import read_backbone_config

        cfg = self.cfg
        check_precision(cfg.mixed_precision)
        self.out = check_output(cfg.out)
        claim_run_folder(self.out, cfg.resume, cfg.overwrite)  # refuse a used folder before fetching the teacher
        self.pipeline_dir = pipeline_folder(self.pipeline_source(), "model")
        self.family = pipeline_family(self.pipeline_dir)  # SD, SDXL (unet/), SD3, Flux (transformer/)
        if self.family.backbone not in self.backbones:
            raise unsupported(self.tracker_name, self.transformer_note)
        if self.sharded and not self.shardable:
            raise UserError(f"shard {cfg.shard}: `bksdm {self.tracker_name}` does not shard; bksdm distill does")
        if self.sharded and (cfg.sample_every or cfg.sample_prompts):
            raise UserError("sample grids run the whole teacher in one process, which a sharded run does not hold; "
                            "with shard fsdp2 leave sample_every 0 and sample_prompts empty (bksdm generate OUT/final)")
        self.family.latent_shape(read_backbone_config(self.pipeline_dir)[0], cfg.resolution,
                                 decoder_factor(self.vae_config))  # sides SD3 / Flux cannot take, before any work
        log_with = None if cfg.report_to == "none" else cfg.report_to
        fresh_accelerator_state()
        self.acc = Accelerator(cpu=default_device() == "cpu", mixed_precision=cfg.mixed_precision,
                               gradient_accumulation_steps=cfg.grad_accum,
                               log_with=log_with, project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                                       logging_dir=str(self.out / "logs")))
        if self.sharded:
            from bksdm.sharding import check_launch

            check_launch(self.acc, cfg.mixed_precision)  # before anything in out is replaced
        self.weight_dtype = DTYPES.get(cfg.mixed_precision, torch.float32)  # "no": fp32
        self.objective = self.build_objective()
        self.noise_scheduler = self.objective.scheduler  # DDPM users: LCM's solver, timestep weights, sample grids
        self.source = self._open_data()
        trainable = self.build_models()
        claim_run_folder(self.out, cfg.resume, cfg.overwrite, remove=True)  # every setting checked: now replace
        self.acc.wait_for_everyone()
        if not getattr(self.source, "is_cache", False):
            self.vae, self.text_parts = load_text_side(self.pipeline_dir, self.acc.device, self.weight_dtype)

        fused = cfg.fused_adam and self.acc.device.type in ("cpu", "cuda") and not self.sharded
        if self.sharded:  # before the optimiser: FSDP2 replaces the parameter objects (bksdm.sharding)
            from bksdm.sharding import fully_shard_model

            for frozen in self.frozen_modules():
                fully_shard_model(frozen)
            trainable.to(self.acc.device)  # prepare would have moved it; unprepared, it moves here
            fully_shard_model(trainable, self.weight_dtype if cfg.mixed_precision != "no" else None)
        params = [p for p in trainable.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay, eps=cfg.adam_eps, fused=fused or None)
        # sharded: FSDP2 reduces the gradients and its policy casts; accelerate's DDP and autocast stay out
        self.student, self.opt = (trainable, opt) if self.sharded else self.acc.prepare(trainable, opt)
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

    def _open_data(self):
        from bksdm.distill.cache import CacheSource
        from bksdm.distill.data import open_source

        if self.source_override is not None:
            return open_source(self.source_override)
        if self.cfg.cache:
            return CacheSource(self.cfg.cache).check(self.family, self.cfg.resolution)
        return open_source(self.cfg.data, **self.cfg.data_options())

    # ------------------------------------------------------------------ data
    def encode(self, batch: dict[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(latents (B, C, h, w), the conditioning dict) from pixels and captions through the pipeline's VAE and the
        family's prompt encoding, or from the cache; latents in the denoiser's space (:func:`bksdm.training.to_latent_space`:
        ``(z - shift_factor) * scaling_factor``, SD3 / Flux shift); ``self.family.denoise(model, x, t, cond)`` calls the
        denoiser with them."""
        dev = self.acc.device
        if "mean" in batch:
            eps = torch.randn(batch["mean"].shape, generator=gen)
            latents = batch["mean"] + batch["std"] * eps
            latents = to_latent_space(latents, self.vae_config).to(dev)
            cond = {k: v.to(dev).float() for k, v in self.family.from_cache(batch).items()}
        else:
            with torch.no_grad():
                dist = encode_pixels(self.vae, batch["pixels"].to(dev))  # fp32 where the VAE asks (SDXL)
                eps = torch.randn(dist.mean.shape, generator=gen).to(dev, dist.mean.dtype)
                latents = to_latent_space((dist.mean + dist.std * eps).float(), self.vae.config)
                cond = {k: v.float() for k, v in self.family.encode_prompt(self.text_parts, batch["text"], dev).items()}
        cond.update(self.family.added_conditioning(latents.shape[0], self.cfg.resolution, dev, batch.get("size_ids")))
        if self.caption_dropout() > 0:  # drawn only when on, so runs without it keep their random stream
            drop = torch.rand(latents.shape[0], generator=gen) < self.caption_dropout()
            cond = self.family.drop_rows(cond, drop.to(dev), self.empty_cond)
        return latents, cond

    @property
    def vae_config(self) -> dict[str, Any]:
        """The VAE's config (its ``scaling_factor`` and ``shift_factor``; read once: the cached path has no VAE)."""
        if not hasattr(self, "_vae_config"):
            path = self.pipeline_dir / "vae" / "config.json"
            with reading(path, "VAE config", "restore the folder from its source"):
                self._vae_config = json.loads(path.read_text())
        return self._vae_config

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
                    if self.sharded:  # the norm over every shard (DTensor gradients)
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    else:
                        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                if acc.sync_gradients or not self.sharded:  # a prepared optimiser skips accumulation steps itself
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
        self.acc.save_state(str(tmp))  # sharded: the schedule and random states; the shards below
        gathered = None
        if self.sharded:  # collectives: every process takes part
            from bksdm.sharding import gather, save

            save(tmp / "sharded", self.student, self.opt, self.sharded_state())
            gathered = gather(self.student, self.acc.is_main_process)
        skips = self.all_skips()  # collective: every process calls it
        if self.acc.is_main_process:
            state = {"step": self.step, "micro": self.micro, "skipped": self.skipped, "skip_reasons": dict(skips),
                     "processes": self.acc.num_processes, "shard": self.cfg.shard}
            self.save_extra(tmp)
            self.save_weights(tmp, gathered)
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
        if state.get("shard", "none") != self.cfg.shard:
            raise UserError(f"{path} was written with shard {state.get('shard', 'none')} and this run has shard "
                            f"{self.cfg.shard}: resume with shard {state.get('shard', 'none')}")
        with reading(path, "checkpoint"):
            self.acc.load_state(str(path))
            if self.sharded:
                from bksdm.sharding import load

                load(path / "sharded", self.student, self.opt, self.sharded_state())
            self.load_extra(path)
        self.step, self.skipped = step, skipped
        self.skips = Skips()  # run totals live on the main process; the others count from zero again
        if self.acc.is_main_process:
            self.skips.update_from(state.get("skip_reasons", {"reason not recorded (older checkpoint)": skipped}
                                             if skipped else {}))
        self.micro = int(state.get("micro", step * self.cfg.grad_accum))  # older checkpoints: no skipped batches
        self.acc.print(f"resumed from {path} at step {self.step}")

