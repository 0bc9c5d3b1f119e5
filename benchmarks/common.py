"""Helpers shared by the benchmarks: a full-size SD pipeline folder with random weights (no download)."""

from __future__ import annotations

from pathlib import Path

import torch


def random_sd_folder(path: Path, family: str = "sd-v1", text_length: int = 77) -> Path:
    """Save an SD pipeline of ``family`` with random weights: real U-Net, VAE and text-encoder architectures.

    The CLIP BPE vocabulary cannot be downloaded here, so the tokenizer is the mini world's word-level one padded
    to 77 tokens: the text encoder does exactly the work it does on real prompts.
    """
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from bksdm.arch.families import FAMILIES, family_component_config
    from bksdm.mini.model import SCHEDULER_CONFIG, make_tokenizer
    from bksdm.mini.world import WORDS
    from bksdm.profile import random_components

    if (path / "model_index.json").is_file():
        return path
    te2 = family_component_config(family, "text_encoder_2") if "text_encoder_2" in FAMILIES[family] else None
    c = random_components(family, family_component_config(family, "unet"), family_component_config(family, "text_encoder"),
                          family_component_config(family, "vae"), text_config_2=te2)
    if te2:  # SDXL: both encoders, one word-level tokenizer each
        tok = make_tokenizer(WORDS, text_length)
        sched = EulerDiscreteScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})
        first, second = c.text_encoder.encoders
        StableDiffusionXLPipeline(vae=c.vae, text_encoder=first, text_encoder_2=second, tokenizer=tok, tokenizer_2=tok,
                                  unet=c.unet, scheduler=sched, add_watermarker=False).save_pretrained(path, safe_serialization=True)
        return path
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=make_tokenizer(WORDS, text_length),
                                   unet=c.unet, scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def machine() -> str:
    from bksdm.profile import device_name

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"{device_name(dev)}, torch {torch.__version__}"
