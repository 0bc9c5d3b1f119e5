"""The ``bksdm`` command line: parses arguments and dispatches to the library and recipes.

Every subcommand is ``bksdm <command> ...``; ``main(argv)`` is what tests call in-process. A
:class:`~bksdm.errors.UserError` ends the command with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from bksdm.errors import USER_ERROR_EXIT, UserError

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``add_arguments`` / ``run`` pair for a subcommand (decorates the argument builder)."""

    def wrap(add_arguments):
        def bind(run):
            _COMMANDS[name] = (help, add_arguments, run)
            return run

        add_arguments.run = bind
        return add_arguments

    return wrap


# ---------------------------------------------------------------- compress
@command("compress", "remove blocks from a teacher U-Net and initialise the student from its weights")
def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher pipeline: a local diffusers folder or a hub id")
    p.add_argument("--student", required=True, help="bk-base, bk-small, bk-tiny, a spec file (.yaml/.json), or auto "
                   "(chosen from --ranking to meet --budget)")
    p.add_argument("--out", required=True, help="output folder: a complete diffusers pipeline with the student U-Net")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--budget", default=None, help="--student auto: params=F (a fraction of the teacher's U-Net or "
                   "transformer, or a count), macs=F, or latency=F (U-Net only; needs a ranking measured with --latency)")
    p.add_argument("--ranking", default=None, help="--student auto: a ranking of this teacher (bksdm rank --out FILE)")


@_compress_args.run
def _compress(a: argparse.Namespace) -> int:
    from bksdm.compress import compress

    rec = compress(a.teacher, a.student, a.out, overwrite=a.overwrite, budget=a.budget, ranking=a.ranking)
    p = rec["params"]
    part = "transformer" if "teacher_transformer" in p else "unet"  # the backbone compress wrote
    print(f"{rec['spec']['name']}: {'U-Net' if part == 'unet' else 'transformer'} {p['teacher_' + part]:,} -> "
          f"{p['student_' + part]:,} parameters "
          f"({len(rec['key_map'])} tensors from the teacher, {len(rec['unused_teacher_keys'])} left out); wrote {a.out}")
    return 0


# ---------------------------------------------------------------- rank
@command("rank", "measure how much each removable block of a teacher matters, with what removing it saves")
def _rank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher pipeline folder or hub id")
    p.add_argument("--data", required=True, help="calibration pictures with captions: any distill data source "
                   "(folder, tar shards, hf:NAME, mini-world:N)")
    p.add_argument("--samples", type=int, default=256, help="calibration pictures, one timestep each (stratified)")
    p.add_argument("--batch-size", type=int, default=16, help="pictures per denoiser call")
    p.add_argument("--resolution", type=int, default=None, help="picture size (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0, help="which pictures, noise and timesteps")
    p.add_argument("--latency", action="store_true", help="also time each bypassed U-Net (for latency budgets; U-Net teachers only)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="write the ranking here (JSON, for compress --student auto)")
    p.add_argument("--plot", default=None, help="also plot importance against parameters saved (.png)")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON instead of a table")


@_rank_args.run
def _rank(a: argparse.Namespace) -> int:
    from bksdm.errors import check_output
    from bksdm.rank import plot, rank, ranking_table

    from bksdm.rank import PLOT_SUFFIXES

    for path in (a.out, a.plot):
        if path:
            check_output(path, "file")
    if a.plot and Path(a.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {a.plot}: name a {', '.join(PLOT_SUFFIXES)} file")
    rec = rank(a.teacher, a.data, a.samples, a.batch_size, a.seed, a.device, a.latency, a.resolution)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_name(Path(a.out).name + ".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(a.out)
    if a.plot:
        plot(rec, a.plot)
    print(json.dumps(rec) if a.json else ranking_table(rec))
    return 0


# ---------------------------------------------------------------- inspect
@command("inspect", "which blocks a student kept and removed, stage by stage, with parameters and MACs per stage")
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a student pipeline folder (or bare U-Net folder) or hub id; SD3/FLUX students "
                   "(transformer/) show kept and removed blocks per block list")
    p.add_argument("--teacher", default=None, help="its teacher (default: the one named in bksdm.json)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON record")


@_inspect_args.run
def _inspect(a: argparse.Namespace) -> int:
    from bksdm.inspection import format_inspection, inspect_student

    info = inspect_student(a.model, a.teacher)
    print(json.dumps(info) if a.json else format_inspection(info))
    return 0


# ---------------------------------------------------------------- export
@command("export", "ship a pipeline: one .safetensors in the original SD key layout, or a half-precision folder")
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a pipeline folder or hub id (a student from compress, distill or dreambooth), or a "
                                 "LoRA .safetensors for --format kohya")
    p.add_argument("--out", required=True, help="the .safetensors file (single-file, kohya) or folder (diffusers-fp16)")
    p.add_argument("--format", default="single-file", choices=("single-file", "diffusers-fp16", "kohya"),
                   help="single-file: U-Net, VAE and text encoder(s) in one file, SD-v1/v2 or SDXL (see --layout); "
                        "diffusers-fp16: the same folder layout in half precision; kohya: a bksdm SD-v1/v2 LoRA file "
                        "in kohya's key names with .alpha tensors (ComfyUI, A1111, stable-diffusion.cpp)")
    p.add_argument("--layout", default="comfyui", choices=("comfyui", "sd-cpp"),
                   help="single-file block numbering: comfyui (default; ComfyUI, A1111, diffusers from_single_file, "
                        "every student) or sd-cpp (SD's gapped numbering that stable-diffusion.cpp reads: the full "
                        "SD-v1/v2 layout and bk-tiny only)")
    p.add_argument("--dtype", default="fp16", help="single-file weights: fp16 (default), bf16 or fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--decoder", default=None, help="diffusers-fp16: ship this AutoencoderTiny folder (TAESD, "
                   "TAESDXL) as the pipeline's vae")


@_export_args.run
def _export(a: argparse.Namespace) -> int:
    from bksdm.export import export

    rec = export(a.model, a.out, a.format, a.dtype, a.overwrite, a.layout, a.decoder)
    removed = rec.get("removed_blocks")
    print(f"wrote {rec['out']} ({rec['format']}, {rec['bytes'] / 2**20:.1f} MiB)"
          + (f"; removed blocks: {', '.join(removed) or 'none'}" if removed is not None and "removed_blocks" in rec else ""))
    return 0


# ---------------------------------------------------------------- profile
@command("profile", "parameters, MACs and latency per component and per image (paper Table 1)")
def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="teacher family built with random weights: sd-v1, sd-v2-base, sd-v2, sdxl; or a "
                   "transformer on the meta device (with --no-latency): flux-dev, flux-schnell, sd3-medium, "
                   "sd3.5-medium, sd3.5-large")
    p.add_argument("--student", nargs="*", default=[], help="specs applied to --arch (bk-base bk-small bk-tiny; SDXL: "
                   "bk-base bk-small koala-1b koala-700m ssd-1b; transformers: bk-base bk-small bk-tiny, FLUX also "
                   "flux-mini; or files)")
    p.add_argument("--model", nargs="*", default=[], help="pipeline folders or hub ids to profile (their real weights)")
    p.add_argument("--no-latency", action="store_true", help="count parameters and MACs only")
    p.add_argument("--dtypes", nargs="+", default=None, help="latency precisions (default: fp32 bf16 on CPU, fp32 fp16 on GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of a whole image (any sampler: LCM 4)")
    p.add_argument("--guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="classifier-free guidance doubles the U-Net batch and the text encoder calls (default: on, "
                        "off for an LCM U-Net that embeds the guidance scale; --no-guidance for LCM-LoRA at guidance 1)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--decoder", default=None, help="a tiny decoder in place of each VAE decoder: an AutoencoderTiny "
                   "folder, or taesd (its architecture with random weights)")
    p.add_argument("--cache-interval", type=int, default=1, help="feature caching: a whole U-Net call every N steps, "
                   "cached calls between (counted and timed as their own row)")
    p.add_argument("--cache-branch", type=int, default=0, help="stages a cached call recomputes (0: the outermost)")
    p.add_argument("--json", action="store_true", help="print one JSON record per model instead of a table")


@_profile_args.run
def _profile(a: argparse.Namespace) -> int:
    from bksdm.profile import profile_models

    if not a.arch and not a.model:
        raise UserError("profile needs --arch (sd-v1, sd-v2-base, sd-v2, sdxl, flux-dev, flux-schnell, sd3-medium, "
                        "sd3.5-medium, sd3.5-large) or --model FOLDER")
    records = profile_models(a.arch, a.student, a.model, latency=not a.no_latency, dtypes=a.dtypes,
                             device=a.device, steps=a.steps, runs=a.runs, guidance=a.guidance, decoder=a.decoder,
                             cache_interval=a.cache_interval, cache_branch=a.cache_branch)
    if a.json:
        for r in records:
            print(json.dumps(r))
    else:
        from bksdm.profile import format_table

        print(format_table(records))
    return 0


# ---------------------------------------------------------------- distill
def _add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (--max-steps, --batch-size, ...; booleans as --x / --no-x): the dataclass is the
    single source of names, defaults and help (each field's comment)."""
    docs = cls.field_docs()
    for name in (n for n in cls.fields() if n not in skip):
        default = getattr(cls(), name)
        flag = "--" + name.replace("_", "-")
        help_ = f"{docs.get(name, '')} (default: {default!r})".strip().replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            p.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_)
            continue
        kind = "list" if isinstance(default, list) else type(default).__name__
        p.add_argument(flag, dest=name, default=None, nargs="+" if kind == "list" else None, metavar=kind.upper(),
                       help=help_)


def _add_config_command(p: argparse.ArgumentParser, cls, shipped: str) -> None:
    """A trainer's arguments: ``--config`` (a YAML file or a shipped name), ``key=value`` overrides, a flag per key."""
    p.add_argument("--config", help=f"YAML file or shipped name (see configs/{shipped}_paper.yaml); flags and "
                   "key=value override it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of any config key, anywhere on the line")
    _add_config_flags(p, cls)


def _run_trainer(a: argparse.Namespace, cls, shipped: str, recipe) -> int:
    """Config from defaults, ``--config``, ``key=value`` and flags; then ``recipe(cfg).setup().train()``."""
    from bksdm.config import load_yaml_config

    cfg = load_yaml_config(cls, a.config, shipped, a.overrides, **{k: getattr(a, k) for k in cls.fields()})
    last = recipe(cfg).setup().train()
    print(json.dumps({"out": str(cfg.out), **{k: round(v, 6) for k, v in last.items()}}))
    return 0


@command("distill", "retrain a compressed student by knowledge distillation from its teacher (paper recipe)")
def _distill_args(p: argparse.ArgumentParser) -> None:
    from bksdm.distill.config import DistillConfig

    _add_config_command(p, DistillConfig, "distill")


@_distill_args.run
def _distill(a: argparse.Namespace) -> int:
    from bksdm.distill.config import DistillConfig
    from bksdm.recipes.distill import DistillRecipe

    return _run_trainer(a, DistillConfig, "distill", DistillRecipe)


# ---------------------------------------------------------------- lcm
@command("lcm", "latent consistency distillation of a pipeline (LCM or --lora LCM-LoRA): 4 steps instead of 25")
def _lcm_args(p: argparse.ArgumentParser) -> None:
    from bksdm.lcm.config import LCMConfig

    _add_config_command(p, LCMConfig, "lcm")


@_lcm_args.run
def _lcm(a: argparse.Namespace) -> int:
    from bksdm.lcm.config import LCMConfig
    from bksdm.recipes.lcm import LCMRecipe

    return _run_trainer(a, LCMConfig, "lcm", LCMRecipe)


# ---------------------------------------------------------------- cache
@command("cache", "precompute VAE latents (both flips) and text embeddings of a dataset for distill --cache")
def _cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="pipeline whose VAE and text encoder encode the data")
    p.add_argument("--data", required=True, help="image folder with metadata.csv/jsonl, hf:DATASET, or mini-world[:N]")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--image-column", default="image", help="hf: datasets: the image column")
    p.add_argument("--caption-column", default="text", help="the caption column of hf: datasets and of image folders' metadata")
    p.add_argument("--data-split", default="train", help="hf: datasets: the split")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (must match distill)")
    p.add_argument("--no-flip", action="store_true", help="cache only the unflipped view (for random_flip false)")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"], help="storage precision")
    p.add_argument("--batch-size", type=int, default=16, help="images encoded at once")
    p.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")


@_cache_args.run
def _cache(a: argparse.Namespace) -> int:
    from bksdm.distill.cache import build_cache

    rec = build_cache(a.teacher, a.data, a.out, a.resolution, not a.no_flip, a.dtype, a.batch_size, overwrite=a.overwrite,
                      data_options={"image_column": a.image_column, "caption_column": a.caption_column,
                                    "split": a.data_split})
    from bksdm.skips import Skips

    print(f"cached {rec['cached']} of {rec['items']} items ({Skips(rec['skipped']).summary()}) into {a.out}")
    return 0


# ---------------------------------------------------------------- generate
@command("generate", "generate images for a prompt file (MS-COCO protocol by default), batch-size invariant")
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pipeline folder or hub id")
    p.add_argument("--prompts", required=True, help="MS-COCO csv (file_name, caption) or a text file, one prompt a line")
    p.add_argument("--out", required=True, help="output folder (images/ and images_256/)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (paper: 25)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                   "pipeline's, SD 7.5 as the paper, SDXL 5.0)")
    p.add_argument("--scheduler", default=None, help="U-Net pipelines: pndm (default, the paper's), ddim, euler, dpm, "
                   "lcm (a `bksdm lcm` model: --steps 4; with a guidance-embedding U-Net there is no classifier-free "
                   "batch doubling); SD3 and Flux sample with their own flow-matching Euler scheduler")
    p.add_argument("--lora", default=None, help="a LoRA file fused into the model's U-Net or transformer (SD3, Flux) "
                   "first; a teacher's LoRA is moved onto its student (LCM-LoRA: --scheduler lcm --steps 4 --guidance 1)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's, 512 for SD-v1)")
    p.add_argument("--save-size", type=int, default=256, help="also save a bicubic copy at this size (0: none)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per call; images do not depend on it")
    p.add_argument("--seed", type=int, default=0, help="added to each prompt's own seed")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp16 on GPU, bf16 on CPUs with bf16)")
    p.add_argument("--device", default=None, help="default: this process's accelerate device")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--lossless", action="store_true", help="save PNG (NAME.png) instead of the official route "
                   "(JPEG quality 75 under the prompt file's names, the 256 px copy resized from that JPEG)")
    p.add_argument("--decoder", default=None, help="a diffusers AutoencoderTiny folder decoding instead of the VAE "
                   "(TAESD for SD-v1/v2, TAESDXL for SDXL: 1.2M parameters instead of 49.5M)")
    p.add_argument("--cache-interval", type=int, default=1, help="DeepCache-style feature caching: the U-Net runs "
                   "whole every N-th step and reuses its deep features in between (1: off)")
    p.add_argument("--cache-branch", type=int, default=0, help="stages recomputed on a cached step, counted from the "
                   "outermost: 0 recomputes only the outermost down- and up-block")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (channels-last); the one-off "
                   "compile time is reported apart from the image time")


@_generate_args.run
def _generate(a: argparse.Namespace) -> int:
    from bksdm.generate import generate

    res = generate(a.model, a.prompts, a.out, a.steps, a.guidance, a.scheduler, a.resolution, a.batch_size, a.seed,
                   a.save_size or None, a.dtype, a.device, a.limit, a.lossless, a.lora, a.decoder,
                   a.cache_interval, a.cache_branch, a.compile)
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------- evaluate
def _metric_weight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception-weights", help="local pytorch-fid Inception file (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--isc-weights", help="local torch-fidelity Inception file (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--clip-model", default="ViT-g-14", help="open_clip model name (paper: ViT-g-14)")
    p.add_argument("--clip-pretrained", default="laion2b_s34b_b88k", help="open_clip tag or a local checkpoint file")
    p.add_argument("--size", type=int, default=256, help="images are squashed to this size for FID/IS (paper: 256)")
    p.add_argument("--device", default=None, help="metric network device (default: cuda when available)")
    p.add_argument("--lossless", action="store_true", help="squash real images in memory (bicubic) instead of the "
                   "official route (PIL's default resize, then JPEG quality 75, as the official val2014_im256 files)")
    metric_option_args(p)


def metric_option_args(p: argparse.ArgumentParser) -> None:
    """The flags of CMMD, clean-FID/KID and the preference scores (evaluate, evaluate-progress, demo)."""
    from bksdm.evaluate.registry import EvalInputs as D  # the one source of the metric defaults (no heavy imports)

    p.add_argument("--cmmd-ref", help="CMMD reference: a folder of real images or a .npy of their embeddings (cmmd-stats)")
    p.add_argument("--cmmd-clip", default=D.cmmd_clip,
                   help="CMMD's CLIP ViT-L/14-336: transformers folder or hub id")
    p.add_argument("--clean-fid-ref", help="clean-FID/KID reference: a folder of real images or a .npz with feats")
    p.add_argument("--clean-fid-weights", help="local clean-fid Inception file (inception-2015-12-05.pt)")
    p.add_argument("--pickscore-model", default=D.pickscore_model, help="PickScore: folder or hub id")
    p.add_argument("--pickscore-processor", default=D.pickscore_processor,
                   help="PickScore's CLIP processor: folder or hub id")
    p.add_argument("--hpsv2-weights", help="local HPSv2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)")
    p.add_argument("--imagereward-weights", help="local ImageReward checkpoint (ImageReward.pt)")
    p.add_argument("--imagereward-tokenizer", default=D.imagereward_tokenizer,
                   help="ImageReward's BERT tokenizer: folder or hub id")


def metric_options(a: argparse.Namespace) -> dict:
    """The further EvalInputs fields (CMMD, clean-FID/KID, preference scores) from the shared metric flags."""
    return {"cmmd_ref": a.cmmd_ref, "cmmd_clip": a.cmmd_clip, "clean_ref": a.clean_fid_ref,
            "clean_weights": a.clean_fid_weights, "pickscore_model": a.pickscore_model,
            "pickscore_processor": a.pickscore_processor, "hpsv2_weights": a.hpsv2_weights,
            "imagereward_weights": a.imagereward_weights, "imagereward_tokenizer": a.imagereward_tokenizer}


@command("evaluate", "FID, IS and CLIP score of generated images (MS-COCO protocol), or mini-world metrics")
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of generated images named as in the prompt file")
    p.add_argument("--prompts", required=True, help="the prompt file used to generate them")
    p.add_argument("--metrics", nargs="+", default=["fid", "is", "clip"], help="any of: fid is clip cmmd clean_fid kid "
                   "pickscore hpsv2 imagereward fidelity mini_fid bg_noise (bksdm.evaluate.registry; mini-fid is accepted too)")
    p.add_argument("--per-image", help="write each image's preference scores (pickscore hpsv2 imagereward) to this CSV")
    p.add_argument("--card", help="a bksdm model folder: add the scores to the Measured table of its README.md card")
    p.add_argument("--fid-ref", help="pytorch-fid statistics (.npz with mu, sigma) or a folder of real images")
    p.add_argument("--name", default="model", help="row name in the Markdown table")
    p.add_argument("--out", help="write the results as JSON here")
    _metric_weight_args(p)


@_evaluate_args.run
def _evaluate(a: argparse.Namespace) -> int:
    from bksdm.recipes.evaluate import evaluate, markdown_row

    if a.card:
        from bksdm.cards import require_card

        require_card(a.card)  # before any image is scored
    res = evaluate(a.images, a.prompts, a.metrics, a.fid_ref, a.size, a.inception_weights, a.isc_weights,
                   a.clip_model, a.clip_pretrained, a.device, lossless=a.lossless, per_image=a.per_image,
                   **metric_options(a))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    if a.card:
        from bksdm.cards import add_measured
        from bksdm.evaluate.registry import METRICS

        keys = [k for m in METRICS.values() for k in m.keys if k in res]
        add_measured(a.card, {k: res[k] for k in keys}, f"{res['images']} images of {a.prompts}")
    print(json.dumps(res))
    print(markdown_row(a.name, res))
    return 0


@command("fid-stats", "pytorch-fid statistics (.npz) of a folder of real images, squashed to --size (paper: 256)")
def _fid_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of real images (MS-COCO val2014: all 40,504)")
    p.add_argument("--out", required=True, help="output .npz")
    _metric_weight_args(p)


@_fid_stats_args.run
def _fid_stats(a: argparse.Namespace) -> int:
    from bksdm.evaluate import metrics as M
    from bksdm.evaluate.registry import EvalInputs, real_statistics
    from bksdm.models import default_device

    inputs = EvalInputs([], [], size=a.size or None, lossless=a.lossless, inception_weights=a.inception_weights,
                        device=a.device or default_device())
    mu, sigma = real_statistics(a.images, inputs)
    M.save_stats(a.out, mu, sigma)
    print(f"wrote {a.out}: mu {mu.shape}, sigma {sigma.shape}")
    return 0


@command("cmmd-stats", "CMMD reference embeddings (.npy, CLIP ViT-L/14-336) of a folder of real images")
def _cmmd_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of real images")
    p.add_argument("--out", required=True, help="output .npy (N, 768), the reference's --ref_embed_file format")
    p.add_argument("--batch-size", type=int, default=32)
    _metric_weight_args(p)


@_cmmd_stats_args.run
def _cmmd_stats(a: argparse.Namespace) -> int:
    from bksdm.evaluate import cmmd
    from bksdm.evaluate.registry import EvalInputs
    from bksdm.models import default_device

    inputs = EvalInputs([], [], batch=a.batch_size, device=a.device or default_device(), cmmd_clip=a.cmmd_clip)
    emb = cmmd.folder_embeddings(a.images, inputs)
    cmmd.save_embeddings(a.out, emb)
    print(f"wrote {a.out}: embeddings {emb.shape}")
    return 0


@command("evaluate-progress", "generate and score with every checkpoint of a distill run: CSV and plot (Fig. 3)")
def _progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a `bksdm distill` output folder")
    p.add_argument("--prompts", required=True, help="prompt file (MS-COCO csv or text)")
    p.add_argument("--metrics", nargs="+", default=["fid", "is", "clip"])
    p.add_argument("--fid-ref", help="pytorch-fid .npz or a folder of real images")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: SD 7.5, SDXL 5.0)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", help="default: RUN/progress")
    _metric_weight_args(p)


@_progress_args.run
def _progress(a: argparse.Namespace) -> int:
    from bksdm.recipes.evaluate import progress

    rows = progress(a.run, a.prompts, a.metrics, a.out, gen_kwargs={"steps": a.steps, "guidance": a.guidance,
                    "batch_size": a.batch_size, "lossless": a.lossless}, fid_ref=a.fid_ref, size=a.size,
                    inception_weights=a.inception_weights, isc_weights=a.isc_weights, clip_name=a.clip_model,
                    clip_pretrained=a.clip_pretrained, device=a.device, lossless=a.lossless, **metric_options(a))
    for r in rows:
        print(json.dumps(r))
    return 0


# ---------------------------------------------------------------- mini world
@command("demo", "the whole BK-SDM method in the mini world, offline on a CPU in minutes: writes a report")
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bksdm-demo", help="output folder (report.md, pictures, models)")
    p.add_argument("--steps", type=int, default=750, help="distillation steps (of batch 16)")
    p.add_argument("--images", type=int, default=300, help="generated images per model for the metrics")
    p.add_argument("--curve-images", type=int, default=100, help="images per checkpoint for the fidelity-vs-step curve")
    p.add_argument("--student", default=None, help="spec to compress the mini teacher with (default: measured-small, "
                   "BK-Small's size with the blocks bksdm rank measures as least needed; with --paper-recipe: "
                   "bk-small)")
    p.add_argument("--gen-steps", type=int, default=25, help="denoising steps when generating")
    p.add_argument("--teacher", default=None, help="a mini teacher folder (default: the shipped one)")
    p.add_argument("--paper-recipe", action="store_true", help="undo the demo's departures from the paper (guided "
                   "output KD, low-noise timesteps, the measured student): BK-Small and the paper's loss, with only "
                   "the CPU-scale changes")
    p.add_argument("--lcm", action="store_true", help="then LCM-distil the student and score it at 1, 2, 4, 8 steps")
    p.add_argument("--lcm-steps", type=int, default=300, help="LCM distillation steps (with --lcm)")
    p.add_argument("--metrics", nargs="*", default=[], help="further registry metrics for the report's table (e.g. "
                   "kid cmmd pickscore, with their reference and weight flags below); the mini-world ones always run")
    metric_option_args(p)


@_demo_args.run
def _demo(a: argparse.Namespace) -> int:
    from bksdm.recipes.mini import demo

    res = demo(a.out, a.steps, a.images, a.student, a.teacher, a.gen_steps, a.curve_images, a.paper_recipe, a.lcm,
               a.lcm_steps, a.metrics, metric_options(a))
    from bksdm.report import markdown_table

    print(markdown_table(res["rows"]))
    print(f"report: {Path(a.out) / 'report.md'} ({res['minutes']:.1f} min)")
    return 0


@command("ablate", "mini-world ablations: appendix Table 3 (init and KD variants), KOALA's feature points "
                   "(--family sdxl), or which transformer blocks matter (--family sd3)")
def _ablate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bksdm-ablation", help="output folder (ablation.json, ablation.md); resumable")
    p.add_argument("--family", default="sd",
                   help="sd: Table 3's rows on the SD-layout teacher; sdxl: output KD vs + block vs + self-attention "
                        "feature KD on the SDXL-layout teacher; sd3: half of the SD3-layout teacher's 8 joint blocks "
                        "removed in four places (first half, middle, last half, alternate), output KD vs + feature KD")
    p.add_argument("--steps", type=int, default=50, help="distillation steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--students", nargs="+", default=None,
                   help="built-in names or spec files (default: bk-small bk-tiny; --family sdxl: koala-mini; "
                        "--family sd3: sd3-first-half sd3-middle sd3-last-half sd3-alternate)")
    p.add_argument("--images", type=int, default=100, help="generated images per run for fidelity and mini-FID")
    p.add_argument("--gen-steps", type=int, default=25, help="denoising steps when generating")
    p.add_argument("--teacher", default=None, help="a mini teacher folder (default: the shipped one of --family)")
    p.add_argument("--guided", action="store_true", help="a fifth row: + guided output KD (the demo's recipe)")
    p.add_argument("--auto", action="store_true", help="measured block choice (bksdm rank, compress --student auto) "
                   "at each student's parameter count against the hand choice, same recipe and seeds")
    p.add_argument("--samples", type=int, default=256, help="--auto: calibration pictures for the ranking")
    p.add_argument("--correlation-steps", type=int, default=0, help="--auto: also distil a student lacking each "
                   "single unit this many steps and correlate the ranking with the result (0: off)")


@_ablate_args.run
def _ablate(a: argparse.Namespace) -> int:
    from bksdm.config import check_value
    from bksdm.recipes.mini_ablate import FAMILY_STUDENTS

    check_value("family", a.family)
    if a.family not in FAMILY_STUDENTS:  # a family mini-teacher can train before its ablation exists
        raise UserError(f"--family {a.family}: no mini ablation of that family yet; ablations: {', '.join(FAMILY_STUDENTS)}")
    if a.auto and a.family == "sd3":
        raise UserError("--auto compares U-Net students (--family sd or sdxl); for --family sd3 drop --auto and run bksdm rank and "
                        "compress --student auto on the teacher (docs/mini-world.md, SD3 layout)")
    if a.auto:
        from bksdm.recipes.mini_auto import ablate_auto, auto_markdown

        if a.guided:
            raise UserError("--auto compares block choices with the paper's loss; drop --guided")
        state = ablate_auto(a.out, a.steps, tuple(a.seeds), a.students, a.images, a.teacher, a.gen_steps, a.samples,
                            a.correlation_steps, a.family)
        print(auto_markdown(state, a.steps, a.correlation_steps))
        return 0
    from bksdm.recipes.mini_ablate import ablate, ablation_markdown

    rows = ablate(a.out, a.steps, tuple(a.seeds), a.students, a.images, a.teacher, a.gen_steps, a.guided, a.family)
    print(ablation_markdown(rows, a.steps))
    return 0


@command("mini-teacher", "train a mini-world teacher (the recipe of the shipped one): a checksummed pipeline folder")
def _mini_teacher_args(p: argparse.ArgumentParser) -> None:
    from bksdm.mini.config import TeacherConfig

    p.add_argument("--config", help="YAML file or shipped name (configs/mini_teacher_default.yaml: --config default; "
                   "configs/mini_teacher_sd3.yaml: --config sd3); flags and key=value override it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of any config key, anywhere on the line")
    _add_config_flags(p, TeacherConfig)


@_mini_teacher_args.run
def _mini_teacher(a: argparse.Namespace) -> int:
    from bksdm.config import load_yaml_config
    from bksdm.mini.config import TeacherConfig
    from bksdm.recipes.mini_teacher import train_teacher

    cfg = load_yaml_config(TeacherConfig, a.config, "mini_teacher", a.overrides,
                           **{k: getattr(a, k) for k in TeacherConfig.fields()})
    print(json.dumps(train_teacher(cfg)))
    return 0


# ---------------------------------------------------------------- dreambooth
@command("dreambooth", "personalise a pipeline on one subject (DreamBooth, prior preservation, full or LoRA)")
def _dreambooth_args(p: argparse.ArgumentParser) -> None:
    from bksdm.dreambooth.config import DreamBoothConfig

    _add_config_command(p, DreamBoothConfig, "dreambooth")


@_dreambooth_args.run
def _dreambooth(a: argparse.Namespace) -> int:
    from bksdm.dreambooth.config import DreamBoothConfig, load_dreambooth_config
    from bksdm.recipes.dreambooth import finetune

    cfg = load_dreambooth_config(a.config, a.overrides, **{k: getattr(a, k) for k in DreamBoothConfig.fields()})
    res = finetune(cfg)
    print(json.dumps({"out": str(Path(cfg.out) / "final"), "seconds": round(res["seconds"], 1),
                      "peak_gb": round(res["memory"]["peak_gb"], 2), "final": res["history"][-1]}))
    return 0


BENCH_OWN = ("instance_dir", "instance_prompt", "class_prompt", "class_dir", "out")
"""DreamBooth keys the benchmark sets per subject itself (every other key is a flag of both commands)."""


@command("dreambooth-bench", "DreamBooth benchmark: every subject fine-tuned, 4 images x 25 prompts, DINO/CLIP-I/CLIP-T")
def _dbbench_args(p: argparse.ArgumentParser) -> None:
    from bksdm.dreambooth.config import DreamBoothConfig

    p.add_argument("--dataset", required=True, help="google/dreambooth dataset folder (one folder per subject)")
    p.add_argument("--out", required=True, help="output folder; rerunning skips finished subjects and images")
    p.add_argument("--subjects", nargs="*", default=None, help="only these subjects")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=25, help="denoising steps when generating")
    p.add_argument("--identifier", default=None, help="rare token naming the subject (default sks11df, official; paper: sks)")
    p.add_argument("--scheduler", default=None, help="sampler of the evaluation images (default dpm, 25 steps, official)")
    p.add_argument("--dino-model", default=None, help="DINO ViT-S/16 hub id or local folder (default facebook/dino-vits16)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model for CLIP-I and CLIP-T")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip tag or a local checkpoint file")
    p.add_argument("--config", help="DreamBooth YAML for every subject (see configs/dreambooth_paper.yaml)")
    _add_config_flags(p, DreamBoothConfig, skip=BENCH_OWN)


@_dbbench_args.run
def _dbbench(a: argparse.Namespace) -> int:
    from bksdm.dreambooth.config import DreamBoothConfig, load_dreambooth_config
    from bksdm.recipes.dreambooth import bench
    from bksdm.report import markdown_table

    base = load_dreambooth_config(a.config, None, **{k: getattr(a, k) for k in DreamBoothConfig.fields() if k not in BENCH_OWN})
    if not base.model:
        raise UserError("dreambooth-bench needs --model (the pipeline folder or hub id to personalise)")
    overrides = {k: v for k, v in base.to_dict().items() if k not in BENCH_OWN and k not in ("model", "lora")}
    res = bench(base.model, a.dataset, a.out, a.subjects, base.lora, a.images_per_prompt, a.steps, dino=a.dino_model,
                clip_name=a.clip_model, clip_pretrained=a.clip_pretrained,
                **{k: v for k, v in (("identifier", a.identifier), ("scheduler", a.scheduler)) if v}, **overrides)
    print(markdown_table(res["subjects"] + [{"subject": "mean", **res["mean"]}]))
    return 0


OUTPUT_FILES = {"evaluate", "fid-stats", "cmmd-stats", "rank"}
"""Commands whose ``--out`` is a file; every other ``--out`` is a folder."""


def check_args(args: argparse.Namespace) -> None:
    """Every parsed value against the one bounds table (:data:`bksdm.config.BOUNDS`), and ``--out`` against the
    file system: a one-line error before any model is loaded or any result computed."""
    from bksdm.config import check_value
    from bksdm.errors import check_output

    for key, value in vars(args).items():
        check_value(key, value)
    if getattr(args, "out", None):
        single_file = args.command == "export" and args.format != "diffusers-fp16"  # export's --out kind follows --format
        check_output(args.out, "file" if args.command in OUTPUT_FILES or single_file else "folder")


def _threads_set_by_caller() -> bool:
    """True when the caller already fixed torch's threads (OMP_NUM_THREADS, as torchrun and tests set it)."""
    return "OMP_NUM_THREADS" in os.environ


THREADS_HELP = ("CPU threads for torch: a number, or auto (default; also BKSDM_THREADS): the cores other processes "
                "leave free, so a busy machine causes no slowdown cliff")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bksdm", description="BK-SDM: block-removed, distilled Stable Diffusion")
    parser.add_argument("--threads", default=None, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_arguments, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        # also after the command name, where users type it; SUPPRESS keeps a value given before the name
        p.add_argument("--threads", default=argparse.SUPPRESS, help=THREADS_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # key=value overrides may sit between flags, which argparse positionals cannot express
        if not hasattr(args, "overrides") or any("=" not in r or r.startswith("-") for r in rest):  # trainers only
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    try:
        check_args(args)  # bounds, choices and output paths: before torch loads and before any work
        from bksdm.runtime import quiet_libraries, set_threads  # after parsing: `--help` needs no torch

        quiet_libraries()
        if not (args.threads is None and os.environ.get("BKSDM_THREADS") is None and _threads_set_by_caller()):
            set_threads(args.threads)
        return _COMMANDS[args.command][2](args) or 0
    except UserError as exc:
        print(f"bksdm {args.command}: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
