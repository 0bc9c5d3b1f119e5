"""Full-size transformer configs of the SD3 / SD3.5 and FLUX.1 teachers, for the meta device (profile, specs, tests).

Each is the public ``transformer/config.json`` of the model's diffusers repository (Hugging Face), without the
``_diffusers_version`` line; keys at diffusers' defaults are left as they are there. Parameter counts on the meta
device (``tests/test_dit_arch.py``): FLUX.1-dev 11,901,408,320 (schnell: 11,891,178,560, no guidance embedder),
SD3.5-Large 8,056,627,520, SD3.5-Medium 2,243,171,520, SD3-Medium 2,028,328,000 (parameters only; SD3's
``pos_embed.pos_embed`` is a persistent buffer on top, ``pos_embed_max_size``^2 x width values: 56,623,104 for
SD3-Medium (192, 1536), 89,653,248 for SD3.5-Large (192, 2432), 226,492,416 for SD3.5-Medium (384, 1536), which is
why that model is called "2.5B"). The FLUX.1 and SD3.5 values were checked against public copies of those files
(diffusers-based projects that vendor them); SD3.5-Large's ``pos_embed_max_size`` is 192 in the copies that name
diffusers 0.37 and 384 in one other: it changes the buffer, not the parameter count.
"""

from __future__ import annotations

from typing import Any

_FLUX = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
_SD3 = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

DIT_CONFIGS: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.1-dev, transformer/config.json (guidance-distilled: a guidance embedder)
    "flux-dev": {**_FLUX, "guidance_embeds": True},
    # black-forest-labs/FLUX.1-schnell, transformer/config.json
    "flux-schnell": {**_FLUX, "guidance_embeds": False},
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "sd3-medium": dict(_SD3),
    # stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in blocks 0-12)
    "sd3.5-medium": {**_SD3, "dual_attention_layers": list(range(13)), "pos_embed_max_size": 384, "qk_norm": "rms_norm"},
    # stabilityai/stable-diffusion-3.5-large, transformer/config.json
    "sd3.5-large": {**_SD3, "caption_projection_dim": 2432, "num_attention_heads": 38, "num_layers": 38,
                    "qk_norm": "rms_norm"},
}
"""Transformer configs by the name ``bksdm profile --arch`` takes."""

TEXT_TOKENS: dict[str, int] = {"flux-dev": 512, "flux-schnell": 512, "sd3-medium": 333, "sd3.5-medium": 333,
                               "sd3.5-large": 333}
"""Text tokens the diffusers pipelines feed the transformer by default: FLUX's T5 ``max_sequence_length`` 512 for
dev and schnell alike (``FluxPipeline``'s default, which ``bksdm generate`` uses too; BFL's reference code gives
schnell 256); SD3's 77 CLIP tokens followed by 256 T5 tokens."""
