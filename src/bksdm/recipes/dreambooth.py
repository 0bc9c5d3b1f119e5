"""DreamBooth fine-tuning with prior preservation (full or LoRA) and the 30-subject benchmark runner.

``finetune(cfg)`` personalises one pipeline folder on one subject; its ``loss_step`` returns ``loss``,
``instance`` and ``prior`` by name. U-Net pipelines (SD, SDXL) train as diffusers' ``train_dreambooth_lora.py``
(and BK-SDM's scripts); SD3 / Flux pipelines train their transformer as ``train_dreambooth_lora_sd3.py`` /
``train_dreambooth_lora_flux.py`` (objective, loss and LoRA targets: ``dreambooth.config.FLOW_SCRIPTS`` and
``LORA_PRESETS``), text encoders frozen; the family's ``denoise`` calls either network. ``bench(...)`` runs
every subject of the public dataset layout (resumable; U-Net pipelines), generates 4 images per evaluation prompt
and scores DINO / CLIP-I / CLIP-T beside fine-tuning time and memory.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from bksdm.dreambooth.config import DreamBoothConfig, lora_config
from bksdm.dreambooth.dataset import IDENTIFIER
from bksdm.errors import UserError, check_output, note
from bksdm.images import IMAGE_EXTENSIONS, check_crop, open_image
from bksdm.skips import Skips, Unusable
from bksdm.models import default_device, encode_pixels
from bksdm.training import fresh_accelerator_state, task_loss, to_latent_space


def _crop(image: Image.Image, size: int, rng: random.Random) -> torch.Tensor:
    """Resize the short side to ``size``, random crop: (3, size, size) in [-1, 1]."""
    from bksdm.images import pixels, resize_short_side

    image = resize_short_side(image, size)
    w, h = image.size
    x, y = rng.randint(0, w - size), rng.randint(0, h - size)
    return pixels(image.crop((x, y, x + size, y + size)))


def class_images(cfg: DreamBoothConfig, device: str) -> tuple[list[Image.Image], Skips]:
    """The prior-preservation images: the usable pictures already in ``class_dir`` (any image file, the user's own
    included, in name order), and only the shortfall generated there (resumable; each file written whole, then
    renamed into place), or a dataset's (``hf:``). Returns them and what was skipped, by reason."""
    from bksdm.pipelines import load_record
    from bksdm.generate import default_dtype, generate_images
    from bksdm.models import generation_parts, load_components, pipeline_folder

    if cfg.class_dir.startswith("hf:"):
        return dataset_class_images(cfg)
    folder = Path(cfg.class_dir or Path(cfg.out) / "class_images")
    folder.mkdir(parents=True, exist_ok=True)
    images, skips = _usable_class_images(folder, cfg)
    missing = cfg.num_class_images - len(images)
    if missing > 0:
        source = cfg.class_model or (load_record(pipeline_folder(cfg.model)) or {}).get("teacher") or cfg.model
        src = pipeline_folder(source, "class model")
        parts = load_components(src, (*generation_parts(src), "scheduler"))
        dtype = default_dtype(device)  # fp16 on GPUs (the official run), bf16 on CPUs that have it
        free = (i for i in range(10**5) if not (folder / f"{i:05d}.png").exists())
        todo = [next(free) for _ in range(missing)]
        print(f"class images: {len(images)} usable in {folder}; generating {missing}")
        for start in range(0, len(todo), 4):
            idx = todo[start:start + 4]
            ims = generate_images(parts, parts["scheduler"], [cfg.class_prompt] * len(idx), seeds=[cfg.seed + i for i in idx],
                                  steps=cfg.class_steps, resolution=cfg.resolution, dtype=dtype, device=device)
            for i, im in zip(idx, ims):
                tmp = folder / f".tmp-{i:05d}.png"  # hidden: never read as a class image if the run stops here
                im.save(tmp)
                os.replace(tmp, folder / f"{i:05d}.png")
        images, skips = _usable_class_images(folder, cfg)  # in name order, as a rerun will read them
    if skips.total:
        note(f"class images in {folder}: {skips.summary()}")
    return images, skips


def _usable_class_images(folder: Path, cfg: DreamBoothConfig) -> tuple[list[Image.Image], Skips]:
    """Up to ``num_class_images`` usable pictures of ``folder`` by name; unusable ones are skipped and counted,
    never changed (generated ones are written whole and renamed into place, so a stopped run leaves none broken)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
             and p.is_file()]
    images, skips = [], Skips()
    for f in sorted(files):
        if len(images) == cfg.num_class_images:
            break
        try:
            im = open_image(f, f.name)
            check_crop(im.size, cfg.resolution, f.name)
            images.append(im)
        except Unusable as exc:
            skips.add(exc)
    return images, skips


def dataset_class_images(cfg: DreamBoothConfig) -> tuple[list[Image.Image], Skips]:
    """The first ``num_class_images`` usable images of a Hugging Face dataset (``class_dir: hf:...``); unusable
    rows are skipped and counted by reason (``class_skipped`` in the run record), as in distillation data."""
    from bksdm.distill.data import HFDatasetSource

    source = HFDatasetSource(cfg.class_dir[3:], image_column=cfg.class_image_column, caption_column=None,
                             streaming=True)  # in order, and only as many rows as needed are read
    images, skips = [], Skips()
    for n, row in enumerate(source.ds):
        try:
            im = source.decode(row, f"row {n}")[0]
            check_crop(im.size, cfg.resolution, f"row {n}")
            images.append(im)
        except Unusable as exc:
            skips.add(exc)
        if len(images) == cfg.num_class_images:
            break
    if not images:
        raise UserError(f"class dataset {cfg.class_dir} has no usable image in column {cfg.class_image_column!r} "
                        f"({skips.summary()})")
    if len(images) < cfg.num_class_images:
        print(f"class dataset {cfg.class_dir}: {len(images)} usable images of the {cfg.num_class_images} asked for; "
              f"using {len(images)}")
    return images, skips


def epoch_order(instances: int, classes: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    """(instance, class image) index pairs as diffusers' DreamBooth dataset yields them under a shuffling loader:
    an epoch is a fresh permutation of ``range(max(instances, classes))``, item ``k`` being instance
    ``k % instances`` and class image ``k % classes`` (so 200 class images are each used 4 times in 800 steps at
    batch 1). ``classes`` 0: no prior preservation (class index 0 is then unused)."""
    length = max(instances, classes)
    while True:
        perm = list(range(length))
        rng.shuffle(perm)
        for k in perm:
            yield k % instances, k % max(classes, 1)


class DreamBooth:
    """One subject's fine-tuning run."""

    def __init__(self, cfg: DreamBoothConfig):
        self.cfg = cfg.validate()
        check_output(cfg.out)

    @property
    def unet(self):
        """The denoiser being fine-tuned (a U-Net, or SD3's / Flux's transformer: ``family.backbone``)."""
        return self.denoiser

    def setup(self) -> "DreamBooth":
        import dataclasses

        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from bksdm.dreambooth.config import FLOW_SCRIPTS, check_family, denoiser_key
        from bksdm.dreambooth.dataset import load_subject_images
        from bksdm.models import DTYPES, load_component, pipeline_family, pipeline_folder
        from bksdm.objectives import load_objective

        cfg = self.cfg
        self.folder = pipeline_folder(cfg.model)
        family = pipeline_family(self.folder)
        check_family(cfg, family)  # before the subject's pictures are read
        script = FLOW_SCRIPTS.get(family.name, {})  # SD3 / Flux: what diffusers' script of the family fixes
        self.family = dataclasses.replace(family, **script.get("family", {}))
        self.objective = load_objective(self.folder, **script.get("objective", {}))  # SD, SDXL: their DDPM objective
        self.precondition = script.get("precondition", False)
        self.instances = load_subject_images(cfg.instance_dir, cfg.resolution)
        fresh_accelerator_state()
        self.acc = Accelerator(cpu=default_device() == "cpu", mixed_precision=cfg.mixed_precision)
        self.classes, self.class_skipped = class_images(cfg, str(self.acc.device)) if cfg.with_prior else ([], Skips())
        self.denoiser = load_component(self.folder, self.family.backbone)
        # the first text encoder is the one DreamBooth may train; an SDXL pipeline's second stays frozen
        self.text_parts = {n: load_component(self.folder, n) for n in self.family.text_components}
        for name, part in self.text_parts.items():
            if name != "text_encoder" and isinstance(part, torch.nn.Module):
                part.to(self.acc.device).float().eval().requires_grad_(False)
        self.text_encoder = self.text_parts["text_encoder"]
        self.vae = load_component(self.folder, "vae").to(self.acc.device).eval().requires_grad_(False)
        self.denoiser.float()
        self.text_encoder.float()
        # SD3 / Flux LoRA: the frozen networks in the autocast dtype, as their scripts hold them (FLUX.1-dev's 12B
        # transformer and T5-XXL take 67 GB in fp32); U-Nets stay fp32 (BK-SDM's runs)
        half = cfg.lora and script.get("frozen_in_half") and cfg.mixed_precision != "no"
        frozen = DTYPES[cfg.mixed_precision] if half else None
        for part in (self.denoiser, *self.text_parts.values()) if frozen else ():
            if isinstance(part, torch.nn.Module):
                part.to(frozen)
        set_seed(cfg.seed)  # the adapters' random init depends on the seed only, not on what ran before
        if cfg.lora:
            self.denoiser.requires_grad_(False)
            self.text_encoder.requires_grad_(False)
            self.denoiser.add_adapter(lora_config(cfg.lora_preset, denoiser_key(self.family), cfg.lora_rank))
            if frozen:
                from diffusers.training_utils import cast_training_params

                cast_training_params(self.denoiser, dtype=torch.float32)  # the adapters train in fp32, as the scripts
            if cfg.train_text_encoder:  # peft directly: transformers' add_adapter wants a newer peft than PyPI has
                from peft import inject_adapter_in_model

                inject_adapter_in_model(lora_config(cfg.lora_preset, "text_encoder", cfg.lora_rank), self.text_encoder)
        else:
            self.text_encoder.requires_grad_(cfg.train_text_encoder)
        if cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        params = [p for m in (self.denoiser, self.text_encoder) for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
        self.denoiser, self.text_encoder, self.opt = self.acc.prepare(self.denoiser, self.text_encoder, opt)
        self.params = params
        return self

    def _batch(self, order: Iterator[tuple[int, int]], rng: random.Random) -> tuple[torch.Tensor, list[str]]:
        cfg = self.cfg
        pairs = [next(order) for _ in range(cfg.batch_size)]
        pix = [_crop(self.instances[i], cfg.resolution, rng) for i, _ in pairs]
        texts = [cfg.instance_prompt] * cfg.batch_size
        if cfg.with_prior:
            pix += [_crop(self.classes[c], cfg.resolution, rng) for _, c in pairs]
            texts += [cfg.class_prompt] * cfg.batch_size
        return torch.stack(pix), texts

    def loss_step(self, pixels: torch.Tensor, texts: list[str], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``loss`` = instance term + prior_loss_weight * prior term (class half of the batch), each the objective's
        task loss (:func:`bksdm.training.task_loss`: MSE, per-row flow weights when a weighting is on). Draws from
        ``gen``: the VAE posterior sample, then the objective's noise and timestep. SD3 (``precondition``) compares
        ``x0 = x_t - sigma * pred`` with the clean latents, as its script's ``--precondition_outputs``."""
        dev = self.acc.device
        with torch.no_grad():
            dist = encode_pixels(self.vae, pixels.to(dev))  # outside autocast: SDXL's VAE is NaN in fp16
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dev)
            latents = to_latent_space(z, self.vae.config)  # SD3 / Flux: (z - shift) * scale
        noisy, t, target = self.objective.sample(latents, gen)
        cond = self.family.encode_prompt({**self.text_parts, "text_encoder": self.text_encoder}, texts, dev)
        cond.update(self.family.added_conditioning(len(texts), self.cfg.resolution, dev))
        pred = self.family.denoise(self.denoiser, noisy, t, cond).float()
        if self.precondition:
            pred, target = self.objective.x0(pred, noisy.float(), t), latents
        b = self.cfg.batch_size
        instance = task_loss(self.objective, pred[:b], target[:b], t[:b])
        terms = {"instance": instance}
        if self.cfg.with_prior:
            terms["prior"] = task_loss(self.objective, pred[b:], target[b:], t[b:])
            terms["loss"] = instance + self.cfg.prior_loss_weight * terms["prior"]
        else:
            terms["loss"] = instance
        return terms

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.denoiser.train()
        self.text_encoder.train()
        history = []
        t0 = time.perf_counter()
        order = epoch_order(len(self.instances), len(self.classes), rng)
        for step in tqdm(range(cfg.max_steps), desc="dreambooth", unit="step", disable=not self.acc.is_main_process):
            pixels, texts = self._batch(order, rng)
            with self.acc.autocast():
                terms = self.loss_step(pixels, texts, gen)
            self.acc.backward(terms["loss"])
            self.acc.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            history.append({k: round(v.item(), 6) for k, v in terms.items()})
        seconds = time.perf_counter() - t0
        if torch.cuda.is_available():
            memory = {"peak_gb": torch.cuda.max_memory_allocated() / 2**30, "kind": "CUDA peak allocated"}
        else:
            memory = {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "kind": "peak RSS of the process"}
        result = {"seconds": seconds, "memory": memory, "steps": cfg.max_steps, "lora": cfg.lora, "history": history,
                  "class_images": len(self.classes), "class_skipped": self.class_skipped.total,
                  "class_skip_reasons": dict(self.class_skipped)}
        self.save(result)
        return result

    def save(self, result: dict[str, Any]) -> None:
        """Into ``OUT/final``, as every trainer: full fine-tuning a complete pipeline folder, LoRA the adapter file
        ``pytorch_lora_weights.safetensors`` for the family pipeline's ``load_lora_weights``. ``OUT/finetune.json``
        records the run."""
        from bksdm.pipelines import copy_pipeline
        from bksdm.training import unwrap

        out = Path(self.cfg.out)
        final = out / "final"
        final.mkdir(parents=True, exist_ok=True)
        backbone = self.family.backbone
        net, text = unwrap(self.acc.unwrap_model(self.denoiser)), unwrap(self.acc.unwrap_model(self.text_encoder))
        if self.cfg.lora:
            from bksdm.lora import save_lora

            # alpha / rank folded into the weights, so kohya-style loaders apply the trained strength (bksdm.lora)
            save_lora(final, self.family.pipeline_class, net, text if self.cfg.train_text_encoder else None,
                      denoiser=backbone)
        else:
            copy_pipeline(self.folder, final, skip=(backbone, "text_encoder"))
            net.save_pretrained(final / backbone, safe_serialization=True)
            text.save_pretrained(final / "text_encoder", safe_serialization=True)
            self._card(final, result)
        (out / "finetune.json").write_text(json.dumps({k: v for k, v in result.items() if k != "history"} |
                                                      {"config": self.cfg.to_dict(), "final": result["history"][-1]}, indent=1))


    def _card(self, final: Path, result: dict[str, Any]) -> None:
        from bksdm.cards import write_finetune_card
        from bksdm.pipelines import load_record

        cfg = self.cfg
        training = {
            "steps": f"{cfg.max_steps} at batch {cfg.batch_size}, {cfg.resolution} px, lr {cfg.lr} (constant)",
            "text encoder": "fine-tuned jointly" if cfg.train_text_encoder else "frozen",
            "prior preservation": (f"on: {result['class_images']} images of \"{cfg.class_prompt}\" from "
                                   f"{cfg.class_dir or 'the class model'}, weight {cfg.prior_loss_weight}"
                                   if cfg.with_prior else "off"),
            "subject images": len(self.instances), "precision": cfg.mixed_precision, "seed": cfg.seed,
            "final loss": result["history"][-1]["loss"] if result["history"] else None,
        }
        write_finetune_card(final, cfg.model, training, load_record(self.folder), cfg.instance_prompt)
        if (self.folder / "bksdm.json").is_file():  # the student's record travels with it
            shutil.copy2(self.folder / "bksdm.json", final / "bksdm.json")


def finetune(cfg: DreamBoothConfig) -> dict[str, Any]:
    return DreamBooth(cfg).setup().train()


def personalised_pipeline(model: str, out: str | Path, lora: bool):
    """The fine-tuned pipeline a run wrote (a full pipeline, or the base with its LoRA weights loaded)."""
    import diffusers

    from bksdm.models import absent_components, import_own_components, pipeline_family, pipeline_folder

    final = Path(out) / "final"
    base = pipeline_folder(model) if lora else final
    import_own_components(base)
    family = pipeline_family(base)
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        base, **{**absent_components(base), **dict(family.pipeline_kwargs)})  # SD3 without T5
    if lora:
        pipe.load_lora_weights(final)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench(model: str, dataset: str | Path, out: str | Path, subjects_only: list[str] | None = None, lora: bool = False,
          images_per_prompt: int = 4, steps: int = 25, guidance: float | None = None, dino: str | None = None,
          clip_name: str = "ViT-B-32", clip_pretrained: str = "openai", device: str | None = None,
          identifier: str = IDENTIFIER, scheduler: str = "dpm", **overrides: Any) -> dict[str, Any]:
    """Fine-tune, generate (4 images x 25 prompts) and score every subject; finished work is skipped on rerun.

    Defaults follow the official BK-SDM runs: identifier ``sks11df`` in training and evaluation prompts, images
    drawn with DPM-Solver (multistep) at 25 steps, LoRA with the ``bk-sdm`` preset."""
    from bksdm.dreambooth import metrics as DM
    from bksdm.dreambooth.dataset import load_subject_images, prompts, subjects
    from bksdm.evaluate.weights import clip_model
    import diffusers

    from bksdm.config import SCHEDULERS, check_value
    from bksdm.generate import default_dtype, generate_images, image_complete, prompt_seed
    from bksdm.models import pipeline_folder, refuse_transformer

    check_value("scheduler", scheduler)
    refuse_transformer(pipeline_folder(model), "dreambooth-bench", "its samplers are U-Net ones; `bksdm dreambooth` "
                       "takes them")
    device = device or default_device()
    todo = subjects(dataset, subjects_only)
    dino_net = DM.dino_model(dino or DM.DINO_DEFAULT, device)  # fail on missing metric weights before any training
    clip = clip_model(clip_name, clip_pretrained, device)
    out = Path(out)
    rows = []
    for name, cls, live in todo:
        sub = out / name
        real = load_subject_images(Path(dataset) / name)
        if not (sub / "finetune.json").is_file():
            cfg = DreamBoothConfig(model=model, instance_dir=str(Path(dataset) / name), instance_prompt=f"a {identifier} {cls}",
                                   class_prompt=f"a {cls}", out=str(sub), lora=lora,
                                   class_dir=str(out / "class_images" / cls.replace(" ", "_"))).update(overrides, "bench")
            finetune(cfg)
        ft = json.loads((sub / "finetune.json").read_text())
        pipe = personalised_pipeline(model, sub, lora)
        sampler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
        gen_dir = sub / "images"
        gen_dir.mkdir(exist_ok=True)
        items = [(gen_dir / f"p{k:02d}_{j}.png", prompt) for k, prompt in enumerate(prompts(cls, live, identifier))
                 for j in range(images_per_prompt)]
        todo = [(path, prompt) for path, prompt in items if not image_complete(path)]
        for start in range(0, len(todo), 4):  # the shared sampling path: one seed and initial latent per image
            chunk = todo[start:start + 4]
            images = generate_images(pipe.components, sampler, [t for _, t in chunk],
                                     [prompt_seed(path.name, 0) for path, _ in chunk], steps, guidance,
                                     dtype=default_dtype(device), device=device)
            for (path, _), image in zip(chunk, images):
                image.save(path)
        paths, used = [path for path, _ in items], [prompt for _, prompt in items]
        scores = DM.subject_scores(DM.load_images(paths), used, real, dino_net, clip, identifier, device)
        row = {"subject": name, **scores, "ft_seconds": ft["seconds"], "ft_peak_gb": ft["memory"]["peak_gb"],
               "memory_kind": ft["memory"]["kind"]}
        (sub / "metrics.json").write_text(json.dumps(row, indent=1))
        rows.append(row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dino", "clip_i", "clip_t", "ft_seconds", "ft_peak_gb")}
    result = {"model": model, "lora": lora, "subjects": rows, "mean": mean}
    (out / "dreambooth.json").write_text(json.dumps(result, indent=1))
    return result
