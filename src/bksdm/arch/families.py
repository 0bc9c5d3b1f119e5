"""Teacher families: how a family conditions its U-Net, and the standard configs of SD-v1.x and SD-v2.x.

:class:`Family` is the seam every recipe calls instead of assuming SD-v1's ``unet(x, t, emb)``: which text
components a pipeline has, how a prompt becomes the U-Net's conditioning keyword arguments, what a cache stores,
which diffusers pipeline class loads the result. :func:`family_of` picks it from a U-Net config. Adding a family
(SDXL: two text encoders, pooled embeddings and size conditioning) is a new :class:`Family` subclass, its
entry in :data:`FAMILY_OBJECTS`, its configs and specs (``docs/architecture.md``).

The configs are those shipped in the official diffusers checkpoints (CompVis/stable-diffusion-v1-4,
stabilityai/stable-diffusion-2-1-base, stabilityai/stable-diffusion-2-1). They let us build every
architecture with random weights, so parameter counts, MACs and latency need no download.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from bksdm.errors import UserError

_SD_UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}

_CLIP_L14: dict[str, Any] = {  # openai/clip-vit-large-patch14 text tower (SD-v1)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

_OPENCLIP_H: dict[str, Any] = {  # OpenCLIP ViT-H/14 text tower, penultimate layer (SD-v2: 23 layers)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

_SD_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "sd-v1": {
        "description": "SD-v1.x (v1.4, v1.5): CLIP ViT-L/14 text encoder, epsilon prediction, 512 px",
        "unet": {**_SD_UNET_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        "text_encoder": _CLIP_L14,
        "vae": {**_SD_VAE, "sample_size": 512},
        "prediction_type": "epsilon",
    },
    "sd-v2-base": {
        "description": "SD-v2.x-base (v2.1-base): OpenCLIP-H text encoder, epsilon prediction, 512 px",
        "unet": {
            **_SD_UNET_COMMON,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "sample_size": 64,
        },
        "text_encoder": _OPENCLIP_H,
        "vae": {**_SD_VAE, "sample_size": 512},
        "prediction_type": "epsilon",
    },
    "sd-v2": {
        "description": "SD-v2.x (v2.1, 768 px): OpenCLIP-H text encoder, v-prediction, upcast attention",
        "unet": {
            **_SD_UNET_COMMON,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "upcast_attention": True,
            "sample_size": 96,
        },
        "text_encoder": _OPENCLIP_H,
        "vae": {**_SD_VAE, "sample_size": 768},
        "prediction_type": "v_prediction",
    },
}


def _unknown_family(name: str) -> UserError:
    return UserError(f"unknown architecture {name!r}; choose one of: {', '.join(FAMILIES)}")


def family_unet_config(name: str) -> dict[str, Any]:
    """The U-Net config (diffusers ``UNet2DConditionModel`` keyword arguments) of a teacher family."""
    if name not in FAMILIES:
        raise _unknown_family(name)
    return copy.deepcopy(FAMILIES[name]["unet"])


def family_component_config(name: str, component: str) -> dict[str, Any]:
    """The config of ``component`` ('unet', 'text_encoder' or 'vae') of a teacher family."""
    if name not in FAMILIES:
        raise _unknown_family(name)
    return copy.deepcopy(FAMILIES[name][component])


def detect_family(unet_config: dict[str, Any]) -> str | None:
    """Name the family a U-Net config belongs to (by cross-attention width and sample size), or None."""
    cross = unet_config.get("cross_attention_dim")
    size = unet_config.get("sample_size")
    if cross == 768:
        return "sd-v1"
    if cross == 1024:
        return "sd-v2" if size == 96 else "sd-v2-base"
    return None


@dataclass(frozen=True)
class Family:
    """SD-v1.x / v2.x (and the mini world, which has their layout): one CLIP tokenizer and text encoder whose last
    hidden state is the U-Net's only conditioning (``encoder_hidden_states``, (B, 77, D))."""

    name: str = "sd"
    pipeline_class: str = "StableDiffusionPipeline"
    text_components: tuple[str, ...] = ("tokenizer", "text_encoder")
    cache_keys: tuple[str, ...] = ("emb",)  # what `bksdm cache` stores per item besides the latent distribution

    def encode_prompt(self, parts: Mapping[str, Any], texts: list[str], device: Any) -> dict[str, Any]:
        """U-Net conditioning keyword arguments for ``texts``: ``{"encoder_hidden_states": (B, L, D)}``.
        ``parts`` holds the loaded :attr:`text_components` by name."""
        tok = parts["tokenizer"]
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        return {"encoder_hidden_states": parts["text_encoder"](ids)[0]}

    def resolution(self, unet_config: Mapping[str, Any], vae_scale_factor: int = 8) -> int:
        """Default image size in pixels: the U-Net's latent size times the VAE's factor (SD-v1/v2-base 512, v2 768)."""
        return int(unet_config["sample_size"]) * vae_scale_factor

    def prediction_type(self, scheduler_config: Mapping[str, Any]) -> str:
        """What the U-Net predicts, as the pipeline's scheduler says: ``epsilon`` (SD-v1) or ``v_prediction``."""
        return scheduler_config.get("prediction_type", "epsilon")

    def to_cache(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors of a conditioning dict that a cache stores, under :attr:`cache_keys`."""
        return {"emb": cond["encoder_hidden_states"]}

    def from_cache(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The conditioning dict of a cached item or batch (the inverse of :meth:`to_cache`)."""
        return {"encoder_hidden_states": item["emb"]}


FAMILY_OBJECTS: dict[str, Family] = {"sd": Family()}


def family_of(unet_config: Mapping[str, Any]) -> Family:
    """The family whose calling convention a U-Net config uses; SDXL-style (``text_time``) U-Nets are refused
    until their family lands."""
    if unet_config.get("addition_embed_type") == "text_time":
        raise UserError("SDXL-style U-Nets (two text encoders, text_time conditioning) are not supported yet; "
                        f"supported: SD-v1.x, SD-v2.x and the mini world ({', '.join(FAMILIES)})")
    return FAMILY_OBJECTS["sd"]
