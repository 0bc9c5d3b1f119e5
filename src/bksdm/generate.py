"""`bksdm generate`: images for a prompt list, the MS-COCO protocol by default, independent of batch size.

Every prompt gets its own seed, ``crc32(name) + seed``, and its own initial latent drawn from a generator of
that seed; the official code seeded one generator per run, so an image depended on the batch size (FID 16.98 at
batch 1 vs 17.16 at batch 4). Here an image depends only on its prompt, name and the seed: not on the batch size,
the order or the sharding across processes. Existing images are skipped, so a killed run resumes; an existing
file that does not decode completely (zero bytes, truncated) is drawn again.

Files follow the official BK-SDM route by default: each image is saved under the prompt file's name (``.jpg``,
JPEG at PIL's default quality 75), and its ``save_size`` copy is that file read back, resized with PIL's default
filter and saved as JPEG again (``im256``). ``lossless=True`` saves both as PNG (``NAME.png``) instead.
"""

from __future__ import annotations

import csv
import json
import re
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bksdm.config import SCHEDULERS, check_value
from bksdm.errors import UserError, reading



def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(image name, prompt) pairs from an MS-COCO-style csv (``file_name`` and ``caption`` or ``text``; names as
    given) or a plain text file (one prompt a line, named ``00000.jpg``, ...). Two prompts whose names differ only
    in the extension would write one file: an error naming both lines."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {p} does not exist")
    try:
        if p.suffix.lower() != ".csv":
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
            out = [(f"{i:05d}.jpg", ln, i + 1) for i, ln in enumerate(lines)]
        else:
            out = _read_prompt_csv(p)
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {p} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    if not out:
        raise UserError(f"prompt file {p} holds no prompts")
    seen: dict[str, int] = {}
    for name, _, line in out:
        if (first := seen.setdefault(Path(name).stem, line)) != line:
            raise UserError(f"{p}: lines {first} and {line} both name image {Path(name).stem!r}; names must be unique")
    return [(name, prompt) for name, prompt, _ in out]


def _read_prompt_csv(p: Path) -> list[tuple[str, str, int]]:
    out = []
    with open(p, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (Excel's "CSV UTF-8") is not a name
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        text_col = "caption" if "caption" in cols else "text" if "text" in cols else None
        if "file_name" not in cols or text_col is None:
            raise UserError(f"{p}: a prompt csv needs columns file_name and caption (or text); it has {cols}")
        try:
            for row in reader:
                if not row.get("file_name") or row.get(text_col) is None or None in row:
                    raise UserError(f"{p} line {reader.line_num} is malformed (expected file_name,{text_col})")
                out.append((Path(row["file_name"]).name, row[text_col], reader.line_num))
        except csv.Error as exc:
            raise UserError(f"{p} line {reader.line_num}: {exc}") from None
    return out


def image_name(name: str, lossless: bool) -> str:
    """The file an image of prompt-file name ``name`` is saved as: the name as given when it is a JPEG name (the
    official route), else its stem with ``.jpg``; ``NAME.png`` when ``lossless``."""
    if lossless:
        return Path(name).stem + ".png"
    return name if Path(name).suffix.lower() in (".jpg", ".jpeg") else Path(name).stem + ".jpg"


def image_complete(path: Path) -> bool:
    """Whether ``path`` is an image a resumed run may keep: it opens, a PNG passes its CRC check, a JPEG ends
    with its end-of-image marker (a truncated or zero-byte file fails). Reads the header and the tail only."""
    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt == "PNG":
                im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, 2)
                return f.read(2) == b"\xff\xd9"
        return True
    except Exception:
        return False


def prompt_seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed) % (2**63)


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One latent per seed, each from its own CPU generator: (B, C, h, w) float32."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def family_pipeline(parts: dict[str, Any], scheduler):
    """The family's diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline``, ``FluxPipeline``) around ``parts`` (the denoiser, ``unet`` or ``transformer``,
    ``vae`` and the family's text components by name; SD3 without ``text_encoder_3`` gets T5 zeros, as diffusers)."""
    import diffusers

    from bksdm.arch.flow_families import family_for

    backbone = "transformer" if parts.get("transformer") is not None else "unet"
    family = family_for(parts[backbone].config, [n for n, v in parts.items() if v is not None])
    missing = [n for n in (backbone, "vae", *family.text_components) if n not in parts]
    if missing:
        raise UserError(f"a {family.pipeline_class} needs components {missing} as well")
    comps = {n: parts[n] for n in (backbone, "vae", *family.text_components)}
    if family.name == "sd3" and "text_encoder_3" not in comps:
        comps.update(tokenizer_3=None, text_encoder_3=None)
    return getattr(diffusers, family.pipeline_class)(scheduler=scheduler, **comps, **dict(family.pipeline_kwargs)), family


@torch.no_grad()
def generate_images(parts: dict[str, Any], scheduler, prompts: list[str], seeds: list[int],
                    steps: int = 25, guidance: float | None = None, resolution: int | None = None,
                    dtype: torch.dtype = torch.float32, device: str = "cpu", cache_interval: int = 1,
                    cache_branch: int = 0, forward=None) -> list[Image.Image]:
    """Generate one image per (prompt, seed) with the family's diffusers pipeline assembled from ``parts`` (``unet``
    or ``transformer``, ``vae`` or a tiny decoder, the family's tokenizers and text encoders by name, as
    :func:`bksdm.models.load_components` gives them); ``guidance`` None: the family's default
    (:attr:`Family.guidance`: SD 7.5, SDXL 5.0, SD3 7.0, Flux 3.5 (embedded for Flux-dev)). ``cache_interval`` > 1:
    DeepCache-style feature caching (:class:`bksdm.fast.FeatureCache`, U-Nets); ``forward``: a compiled U-Net
    forward (:func:`bksdm.fast.compile_unet`). Each image's initial latent comes from its own seed
    (:func:`initial_latents`, in the family's layout: Flux packs it), so an image does not depend on its batch."""
    from contextlib import nullcontext

    from bksdm.arch.repeats import merge_repeats
    from bksdm.fast import FeatureCache

    pipe, family = family_pipeline(parts, scheduler)
    model = parts[family.backbone]
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    factor = pipe.vae_scale_factor
    size = resolution or family.resolution(model.config, factor)
    latents = family.pipeline_latents(initial_latents(seeds, family.latent_shape(model.config, size, factor)))
    # per-image generators for samplers that draw noise while stepping (LCM): an image never depends on its batch
    gens = [torch.Generator().manual_seed(s + 1) for s in seeds]
    kw = {"max_sequence_length": family.max_sequence_length} if family.backbone == "transformer" else {}
    cache = FeatureCache(model, cache_interval, cache_branch, forward) if family.backbone == "unet" else nullcontext()
    if family.name == "sd3":
        merge_repeats(model)  # T5's zeros (when absent) computed once: exact (bksdm.arch.repeats)
    with cache:  # one pipeline call: one trajectory
        out = pipe(prompts, height=size, width=size, num_inference_steps=steps,
                   guidance_scale=family.guidance if guidance is None else guidance,
                   latents=latents.to(device, dtype), output_type="pil", generator=gens, **kw)
    return out.images


def fuse_lora(parts: dict[str, Any], scheduler, path: str | Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a LoRA file (diffusers, peft or kohya keys; ``pytorch_lora_weights.safetensors`` or its folder) into
    ``parts``' denoiser (the family's backbone: U-Net, or SD3's / Flux's transformer) and text encoder and fuse it,
    through the family's pipeline class as ``load_lora_weights`` does.

    Every denoiser module of the LoRA must fit the denoiser (exist, with matching shapes). When some do not and the
    model is a bksdm student (``record``: its ``bksdm.json``), the LoRA is taken as one made for the teacher and moved
    onto the student through the key or module map (:func:`bksdm.lora.remap`: modules of removed blocks dropped,
    renumbered ones moved where the teacher's weights went), with a note; otherwise it is refused in one line with
    the counts. Returns what was done (``modules``, ``remapped``, ``dropped``)."""
    import inspect

    from bksdm.errors import note
    from bksdm.lora import lora_modules, misfits, normalise, remap

    path = Path(path)
    if not path.exists():
        raise UserError(f"LoRA file {path} does not exist")
    pipe, family = family_pipeline(parts, scheduler)
    backbone, model = family.backbone, parts[family.backbone]
    what = "U-Net" if backbone == "unet" else "transformer"
    where = (str(path),) if path.is_dir() else (str(path.parent),)
    kw = {} if path.is_dir() else {"weight_name": path.name}
    if family.name == "sdxl":  # as StableDiffusionXLPipeline.load_lora_weights passes it
        kw["unet_config"] = parts["unet"].config  # kohya's SGM block names are numbered by the U-Net's layout (SDXL)
        if record and _sgm_names(path):  # decoded with the student's layout they would name the wrong teacher blocks
            raise UserError(f"LoRA {path.name} names SDXL's original blocks (kohya); on a student bksdm cannot tell which "
                            "model's numbering it uses: load it on the model it was made for")
    extra = {"return_alphas": True} if "return_alphas" in inspect.signature(pipe.lora_state_dict).parameters else {}
    with reading(path, "LoRA file", "pass a LoRA .safetensors (diffusers, peft or kohya keys)"):
        got = pipe.lora_state_dict(*where, return_lora_metadata=True, **extra, **kw)  # SD3: no alphas
        state, alphas, metadata = got if len(got) == 3 else (got[0], None, got[1])
        state = normalise(state, alphas, metadata)
    kw.pop("unet_config", None)
    modules = lora_modules(state, backbone)
    bad = misfits(modules, model)
    done: dict[str, Any] = {"modules": len(modules), "remapped": 0, "dropped": []}
    if bad and record and (record.get("key_map") or record.get("module_map")):
        moved, dropped, renumbered = remap(state, record, backbone)
        still = misfits(lora_modules(moved, backbone), model)
        if not still:
            note(f"LoRA {path.name} is for the teacher ({record.get('teacher', 'unknown')}): {len(modules) - len(dropped)} "
                 f"of its {len(modules)} {what} modules moved onto the student ({renumbered} renumbered), "
                 f"{len(dropped)} of removed blocks dropped (first: {dropped[0] if dropped else 'none'})")
            state, where, kw = moved, (moved,), {}
            done.update(remapped=len(modules) - len(dropped), dropped=dropped)
            bad = []
    if not modules and backbone == "transformer":  # e.g. a U-Net LoRA: its unet. keys would be skipped silently
        raise UserError(f"LoRA {path} adapts no transformer module (first tensor: {next(iter(state), 'none')}); it was "
                        "made for another architecture")
    if bad:
        raise UserError(f"LoRA {path} does not fit this {what}: {len(modules) - len(bad)} of its {len(modules)} {what} "
                        f"modules fit (first that does not: {bad[0]}); it was made for another architecture")
    with reading(path, "LoRA file", "pass a LoRA .safetensors (diffusers, peft or kohya keys)"):
        pipe.load_lora_weights(*where, **kw)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    return done


def _sgm_names(path: Path) -> bool:
    """Whether a LoRA file names U-Net blocks the original (SGM / kohya) way: ``input_blocks``, ``middle_block``..."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    try:
        with safe_open(str(files[0]), "pt") as f:
            keys = list(f.keys())
    except Exception:
        return False  # not a safetensors file: lora_state_dict says what it is
    return any(re.search(r"(input_blocks|middle_block|output_blocks)", k) for k in keys)


def default_dtype(device: str) -> torch.dtype:
    """fp16 on GPUs; bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32."""
    if device.startswith("cuda"):
        return torch.float16
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def generate(model: str, prompts: str | Path, out: str | Path, steps: int = 25, guidance: float | None = None,
             scheduler: str | None = None, resolution: int | None = None, batch_size: int = 4, seed: int = 0,
             save_size: int | None = 256, dtype: str | None = None, device: str | None = None,
             limit: int | None = None, lossless: bool = False, lora: str | None = None, decoder: str | None = None,
             cache_interval: int = 1, cache_branch: int = 0, compile: bool = False) -> dict[str, Any]:
    """Generate every missing image of ``prompts`` into ``out/images`` (and a ``save_size`` copy in
    ``out/images_{save_size}``), sharded over the accelerate processes; ``lora``: a LoRA file (LCM-LoRA, DreamBooth)
    fused into the model first. The fast path (:mod:`bksdm.fast`): ``decoder`` an ``AutoencoderTiny`` folder
    decoding instead of the VAE, ``cache_interval`` / ``cache_branch`` feature caching across steps, ``compile``
    the U-Net compiled (the first batch is run once untimed to compile; ``compile_seconds`` is that run's excess
    over the timed one). Returns counts (``redrawn``: existing files that were incomplete and were generated
    again). ``scheduler``: the sampler of a U-Net pipeline (default ``pndm``, the paper's); a flow-matching
    pipeline (SD3, Flux) samples with its own ``FlowMatchEulerDiscreteScheduler`` and refuses any."""
    from bksdm.fast import FeatureCache, compile_unet, load_decoder

    from accelerate import PartialState
    from tqdm.auto import tqdm

    from bksdm.models import DTYPES, default_device, generation_parts, load_components, pipeline_folder

    items = [(image_name(n, lossless), p) for n, p in read_prompts(prompts)[:limit]]
    if scheduler is not None:
        check_value("scheduler", scheduler)  # the CLI checked it already; API callers get the same message
    state = PartialState(cpu=(device or default_device()) == "cpu")
    device = device or str(state.device)
    torch_dtype = DTYPES[dtype] if dtype else default_dtype(device)
    folder = pipeline_folder(model)
    import diffusers

    # an LCM-LoRA folder ships the LCMScheduler it trained for (its skipping schedule and scaling): use that one
    source = folder
    if lora and scheduler == "lcm":
        lora_dir = Path(lora).parent if Path(lora).is_file() else Path(lora)
        if (lora_dir / "scheduler" / "scheduler_config.json").is_file():
            source = lora_dir
    names = generation_parts(folder)
    if names[0] == "transformer":  # flow matching: the pipeline's own FlowMatchEulerDiscreteScheduler, nothing else yet
        _check_flow_options(folder, scheduler, decoder, cache_interval, cache_branch, compile)
    scheduler = scheduler or "pndm"
    with reading(source / "scheduler", "scheduler of"):
        cls = diffusers.FlowMatchEulerDiscreteScheduler if names[0] == "transformer" else getattr(diffusers, SCHEDULERS[scheduler])
        sched = cls.from_pretrained(source, subfolder="scheduler")
    parts = load_components(folder, names)
    if "unet" in parts:
        FeatureCache(parts["unet"], cache_interval, cache_branch)  # a branch the U-Net lacks fails before any work
    if decoder:
        parts["vae"] = load_decoder(decoder, parts["unet"], parts["vae"])
    lora_done = None
    if lora:
        from bksdm.pipelines import load_record

        lora_done = fuse_lora(parts, sched, lora, load_record(folder))
    out = Path(out)
    big = out / "images"
    small = out / f"images_{save_size}" if save_size else None
    for d in (big, small):
        if d:
            d.mkdir(parents=True, exist_ok=True)
    mine = [it for i, it in enumerate(items) if i % state.num_processes == state.process_index]
    todo = [(n, p) for n, p in mine if not image_complete(big / n) or (small and not image_complete(small / n))]
    redrawn = sum((big / n).exists() for n, _ in todo)
    forward = compile_unet(parts["unet"]) if compile and todo else None
    run = lambda chunk: generate_images(parts, sched, [p for _, p in chunk], [prompt_seed(n, seed) for n, _ in chunk],  # noqa: E731
                                        steps, guidance, resolution, torch_dtype, device, cache_interval, cache_branch, forward)
    compile_s = None
    if forward is not None:
        t0 = time.perf_counter()
        run(todo[:batch_size])  # compiles every path (whole and cached steps) for this batch's shapes
        compile_s = time.perf_counter() - t0
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not state.is_local_main_process)
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        t_batch = time.perf_counter()
        images = run(chunk)
        if compile_s is not None and start == 0:
            compile_s -= time.perf_counter() - t_batch
        for (name, _), im in zip(chunk, images):
            _save(im, big / name)
            if small:  # from the saved file, as the official im256 copies (a JPEG read back, then resized)
                with Image.open(big / name) as saved:
                    _save(saved.resize((save_size, save_size), Image.BICUBIC), small / name)
        bar.update(len(chunk))
    bar.close()
    return {"prompts": len(items), "this_process": len(mine), "generated": len(todo), "skipped": len(mine) - len(todo),
            "redrawn": redrawn, "seconds": round(time.perf_counter() - t0, 3), "threads": torch.get_num_threads(),
            "decoder": decoder or "vae", "cache_interval": cache_interval, "cache_branch": cache_branch, "compile": compile,
            **({"compile_seconds": round(compile_s, 3)} if compile_s is not None else {}),
            **({"lora": {k: v if k != "dropped" else len(v) for k, v in lora_done.items()}} if lora_done else {})}


def _check_flow_options(folder: Path, scheduler: str | None, decoder, cache_interval: int, cache_branch: int,
                        compile: bool) -> None:
    """One-line refusals of what transformer (flow-matching) pipelines do not support in ``generate`` yet: every
    U-Net-only option asked for (``--lora`` applies: :func:`fuse_lora`), and a folder whose scheduler is another
    flow sampler (diffusers would only warn)."""
    asked = [f for f, on in ((f"--scheduler {scheduler}", scheduler is not None),
                             ("--decoder", decoder), ("--cache-interval", cache_interval != 1),
                             ("--cache-branch", cache_branch != 0), ("--compile", compile)) if on]
    if asked:
        raise UserError(f"{asked[0]} does not apply to flow-matching transformer pipelines (SD3, Flux): they sample "
                        "with their own FlowMatchEulerDiscreteScheduler and the full transformer")
    config = folder / "scheduler" / "scheduler_config.json"
    with reading(config, "scheduler config of"):
        name = json.loads(config.read_text()).get("_class_name")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise UserError(f"{folder} ships the scheduler {name}; bksdm generate samples flow-matching pipelines with "
                        "FlowMatchEulerDiscreteScheduler only")


def _save(image: Image.Image, path: Path) -> None:
    """Save by the name's extension (JPEG: PIL's defaults, quality 75) through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    image.save(tmp)
    tmp.replace(path)  # a killed run never leaves a half-written image under the final name
