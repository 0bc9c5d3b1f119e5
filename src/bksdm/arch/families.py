"""Teacher families: how a family conditions its U-Net, and the standard configs of SD-v1.x and SD-v2.x.

:class:`Family` is the seam every recipe calls instead of assuming SD-v1's ``unet(x, t, emb)``: which text
components a pipeline has, how a prompt becomes the U-Net's conditioning keyword arguments, what a cache stores,
which diffusers pipeline class loads the result. :func:`family_of` picks it from a U-Net config. Adding a family
is a :class:`Family` subclass (as :class:`SDXLFamily`: two text encoders, pooled embeddings and size
conditioning), its entry in :data:`FAMILY_OBJECTS`, its configs and specs (``docs/architecture.md``).

The configs are those shipped in the official diffusers checkpoints (CompVis/stable-diffusion-v1-4,
stabilityai/stable-diffusion-2-1-base, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0). They let us build every
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

_OPENCLIP_BIGG: dict[str, Any] = {  # OpenCLIP ViT-bigG/14 text tower with projection (SDXL's text_encoder_2)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

_SDXL_UNET: dict[str, Any] = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    **_SD_UNET_COMMON,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
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
    "sdxl": {
        "description": "SDXL-base (1.0): CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text encoders, pooled text embedding and "
                       "size conditioning (text_time), transformer depth 1/2/10, epsilon prediction, 1024 px",
        "unet": _SDXL_UNET,
        "text_encoder": _CLIP_L14,
        "text_encoder_2": _OPENCLIP_BIGG,
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "prediction_type": "epsilon",
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
    """The config of ``component`` ('unet', 'text_encoder', 'text_encoder_2' (SDXL) or 'vae') of a teacher family."""
    if name not in FAMILIES:
        raise _unknown_family(name)
    return copy.deepcopy(FAMILIES[name][component])


def detect_family(unet_config: dict[str, Any]) -> str | None:
    """Name the family a U-Net config belongs to (by cross-attention width and sample size), or None."""
    cross = unet_config.get("cross_attention_dim")
    size = unet_config.get("sample_size")
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cross == 768:
        return "sd-v1"
    if cross == 1024:
        return "sd-v2" if size == 96 else "sd-v2-base"
    return None


@dataclass(frozen=True)
class Family:
    """SD-v1.x / v2.x (and the mini world, which has their layout): one CLIP tokenizer and text encoder whose last
    hidden state is the U-Net's only conditioning (``encoder_hidden_states``, (B, 77, D)).

    A conditioning dict is flat (tensor values with batch first), so recipes can slice, cast and concatenate it
    key by key; :meth:`unet_kwargs` turns it into the U-Net's keyword arguments.
    """

    name: str = "sd"
    pipeline_class: str = "StableDiffusionPipeline"
    text_components: tuple[str, ...] = ("tokenizer", "text_encoder")
    cache_keys: tuple[str, ...] = ("emb",)  # what `bksdm cache` stores per item besides the latent distribution
    pipeline_kwargs: tuple[tuple[str, Any], ...] = (("safety_checker", None), ("feature_extractor", None),
                                                    ("requires_safety_checker", False))
    """Constructor arguments besides the components (no safety checker: generation for evaluation)."""
    guidance: float = 7.5
    """The classifier-free guidance scale images are generated with unless one is given: the family's diffusers
    pipeline default (SD: 7.5, the paper's; SDXL: 5.0)."""
    backbone: str = "unet"  # the denoiser's component folder ("transformer" for SD3 and Flux)
    classifier_free: bool = True  # the pipeline guides with an unconditional pass (Flux-dev embeds guidance instead)

    def encode_prompt(self, parts: Mapping[str, Any], texts: list[str], device: Any) -> dict[str, Any]:
        """The prompt's conditioning: ``{"encoder_hidden_states": (B, L, D)}``. ``parts`` holds the loaded
        :attr:`text_components` by name."""
        tok = parts["tokenizer"]
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        return {"encoder_hidden_states": parts["text_encoder"](ids)[0]}

    def unconditional(self, parts: Mapping[str, Any], device: Any, index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The conditioning the pipeline uses for "no prompt" under classifier-free guidance (each tensor (1, ...)):
        the empty prompt's encoding."""
        return self.encode_prompt(parts, [""], device)

    def drop_rows(self, cond: Mapping[str, Any], rows: Any, unconditional: Mapping[str, Any]) -> dict[str, Any]:
        """``cond`` with the batch rows ``rows`` (a (B,) bool mask or an index list) replaced by ``unconditional``
        (:meth:`unconditional`, each tensor (1, ...)): caption dropout and dropped captions train what guidance
        will pass for "no prompt". Keys ``unconditional`` lacks (size ids) are kept; tensors are copied."""
        out = dict(cond)
        for key, value in unconditional.items():
            out[key] = cond[key].clone()
            out[key][rows] = value.to(device=cond[key].device, dtype=cond[key].dtype)
        return out

    def added_conditioning(self, batch: int, resolution: int, device: Any, size_ids: Any = None) -> dict[str, Any]:
        """Conditioning that does not come from the prompt (SDXL's size micro-conditioning from the data's
        ``size_ids`` (B, 6), :func:`bksdm.distill.data.size_ids`); none here."""
        return {}

    def unet_kwargs(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        """The U-Net's keyword arguments for a conditioning dict (LCM's ``timestep_cond`` passes through)."""
        return dict(cond)

    def denoise(self, model: Any, x: Any, t: Any, cond: Mapping[str, Any]) -> Any:
        """The denoiser's prediction (B, C, h, w) for latents ``x`` (B, C, h, w) at timesteps ``t`` (B,) in scheduler
        units (0-1000) under the conditioning dict ``cond``: ``model(x, t, **unet_kwargs(cond)).sample``."""
        return model(x, t, **self.unet_kwargs(cond)).sample

    def latent_shape(self, config: Mapping[str, Any], size: int, vae_scale_factor: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's initial latent at ``size`` px, as the pipeline's ``prepare_latents`` shapes it."""
        return int(config["in_channels"]), size // vae_scale_factor, size // vae_scale_factor

    def pipeline_latents(self, latents: Any) -> Any:
        """Latents (B, C, h, w) in the layout the pipeline's ``latents=`` argument takes (Flux: packed)."""
        return latents

    def resolution(self, unet_config: Mapping[str, Any], vae_scale_factor: int = 8) -> int:
        """Default image size in pixels: the U-Net's latent size times the VAE's factor (SD-v1/v2-base 512, v2 768,
        SDXL 1024)."""
        size = unet_config["sample_size"]
        return int(size if isinstance(size, int) else size[0]) * vae_scale_factor

    def prediction_type(self, scheduler_config: Mapping[str, Any]) -> str:
        """What the U-Net predicts, as the pipeline's scheduler says: ``epsilon`` (SD-v1) or ``v_prediction``."""
        return scheduler_config.get("prediction_type", "epsilon")

    def to_cache(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors of a prompt's conditioning that a cache stores, under :attr:`cache_keys`."""
        return {"emb": cond["encoder_hidden_states"]}

    def from_cache(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The prompt's conditioning of a cached item or batch (the inverse of :meth:`to_cache`)."""
        return {"encoder_hidden_states": item["emb"]}

    def cache_meta(self) -> dict[str, Any]:
        """What a cache of this family's embeddings must record and match besides the family (SD3/Flux: T5)."""
        return {}

    def dummy_conditioning(self, unet_config: Mapping[str, Any], batch: int, device: Any, dtype: Any) -> dict[str, Any]:
        """Random conditioning of the right shapes for a U-Net of ``unet_config`` (profiling, checks)."""
        import torch

        width = unet_config["cross_attention_dim"]
        return {"encoder_hidden_states": torch.randn(batch, 77, width, device=device, dtype=dtype)}


@dataclass(frozen=True)
class SDXLFamily(Family):
    """SDXL: two CLIP text encoders whose penultimate hidden states are concatenated (B, 77, 768 + 1280), the second
    one's projected pooled output (``text_embeds``, (B, 1280)) and the size micro-conditioning (``time_ids``, (B, 6):
    original size, crop top-left, target size) through ``added_cond_kwargs``.

    Training conditions on each picture's original size and crop offsets (``size_ids`` from the data or the
    cache), DreamBooth and size-less data on the resolution with no crop; the unconditional input is all zeros when
    the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL-base's default), as the pipeline does.
    """

    name: str = "sdxl"
    pipeline_class: str = "StableDiffusionXLPipeline"
    text_components: tuple[str, ...] = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    cache_keys: tuple[str, ...] = ("emb", "pooled")
    pipeline_kwargs: tuple[tuple[str, Any], ...] = (("add_watermarker", False),)  # the watermark would alter pixels
    guidance: float = 5.0  # StableDiffusionXLPipeline's default: SDXL's zeros unconditional input is farther away

    def encode_prompt(self, parts: Mapping[str, Any], texts: list[str], device: Any) -> dict[str, Any]:
        """``{"encoder_hidden_states": (B, 77, D1 + D2), "text_embeds": (B, P)}`` as ``StableDiffusionXLPipeline``
        encodes a prompt (penultimate layers, pooled projection of the second encoder)."""
        import torch

        hidden, pooled = [], None
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tok, enc = parts[tok_name], parts[enc_name]
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            pooled = out[0]  # the projected pooled output of the second encoder (overwritten by it)
            hidden.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def unconditional(self, parts: Mapping[str, Any], device: Any, index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        import torch

        cond = self.encode_prompt(parts, [""], device)
        if (index or {}).get("force_zeros_for_empty_prompt", True):
            cond = {k: torch.zeros_like(v) for k, v in cond.items()}
        return cond

    def added_conditioning(self, batch: int, resolution: int, device: Any, size_ids: Any = None) -> dict[str, Any]:
        """``time_ids`` (B, 6): the pictures' original size and crop when the data gives them (``size_ids``, as
        diffusers' SDXL training script), else the resolution and no crop (what the pipeline passes by default)."""
        import torch

        if size_ids is not None:
            return {"time_ids": size_ids.to(device=device, dtype=torch.float32)}
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32, device=device)
        return {"time_ids": ids.expand(batch, 6).clone()}

    def unet_kwargs(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = {k: v for k, v in cond.items() if k not in ("text_embeds", "time_ids")}
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return kwargs

    def to_cache(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        return {"emb": cond["encoder_hidden_states"], "pooled": cond["text_embeds"]}

    def from_cache(self, item: Mapping[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": item["emb"], "text_embeds": item["pooled"]}

    def dummy_conditioning(self, unet_config: Mapping[str, Any], batch: int, device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        time_dim = 6 * unet_config["addition_time_embed_dim"]
        pooled = unet_config["projection_class_embeddings_input_dim"] - time_dim
        size = self.resolution(unet_config)
        return {**super().dummy_conditioning(unet_config, batch, device, dtype),
                "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                **{k: v.to(dtype) for k, v in self.added_conditioning(batch, size, device).items()}}


FAMILY_OBJECTS: dict[str, Family] = {"sd": Family(), "sdxl": SDXLFamily()}


def family_of(unet_config: Mapping[str, Any]) -> Family:
    """The family whose calling convention a U-Net config uses: SDXL for ``text_time`` added conditioning, else SD."""
    kind = unet_config.get("addition_embed_type")
    if kind == "text_time":
        return FAMILY_OBJECTS["sdxl"]
    if kind is not None:
        raise UserError(f"U-Nets with addition_embed_type={kind!r} are not supported; supported: SD-v1.x, SD-v2.x, "
                        f"SDXL and the mini world ({', '.join(FAMILIES)})")
    return FAMILY_OBJECTS["sd"]
