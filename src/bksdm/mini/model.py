"""Tiny pipeline components: word-level tokenizer, CLIP text encoders, space-to-depth "VAE", U-Nets, MMDiT.

The U-Net has exactly the SD-v1 block layout (three cross-attention down stages and a plain one, two pairs per
down stage, a cross-attention mid-block, mirrored up stages), so the built-in ``bk-*`` specs apply unchanged;
:func:`build_sdxl_pipeline` and :func:`build_sd3_pipeline` give the SDXL and SD3 (MMDiT, flow matching) layouts.
The latent space is a lossless 2x2 space-to-depth of the RGB image (32x32x3 -> 16x16x12): the teacher's quality
is then the denoiser's alone, and no VAE has to be trained.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

from bksdm.errors import UserError


class SpaceToDepthVAE(ModelMixin, ConfigMixin):
    """An exact, parameter-free autoencoder: ``encode`` folds each 2x2 pixel block into channels.

    Speaks the ``AutoencoderKL`` interface that diffusers pipelines and our recipes use:
    ``encode(x).latent_dist`` (a :class:`DiagonalGaussianDistribution` with negligible variance) and
    ``decode(z).sample``; images are in [-1, 1], shape (B, 3, H, W) <-> latents (B, 3*f*f, H/f, W/f).
    """

    @register_to_config
    def __init__(self, factor: int = 2, in_channels: int = 3, sample_size: int = 32, scaling_factor: float = 1.0,
                 block_out_channels: tuple[int, ...] = (12, 12), shift: float = 0.0, shift_factor: float | None = None):
        super().__init__()
        # block_out_channels only tells pipelines the downscale factor: 2 ** (len - 1) == factor.
        # shift_factor is read only by SD3 / Flux pipelines, which decode `latents / scaling_factor + shift_factor`:
        # 0.0 for them (the centring is `shift`, inside encode / decode, as for the U-Net teachers), None otherwise
        # a saved buffer gives the module a device, a dtype and a weight file that from_pretrained expects
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor ** 2

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        # shift centres the latents: pictures on a light background have a large mean, which pure-noise sampling
        # (zero mean) cannot reproduce at the schedule's non-zero terminal SNR
        z = torch.nn.functional.pixel_unshuffle(x, self.config.factor) - self.config.shift
        # logvar at the distribution's floor (-30): sampling is the identity up to ~3e-7
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -30.0)], dim=1))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        x = torch.nn.functional.pixel_shuffle(z + self.config.shift, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode()).sample


def make_tokenizer(words: list[str], max_length: int):
    """A word-level fast tokenizer over ``words`` (lower-cased, whitespace split, <bos> ... <eos>, padded)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=max_length,
    )


def text_encoder_config(vocab_size: int, max_length: int, width: int = 64, layers: int = 2) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
        "num_attention_heads": 4, "max_position_embeddings": max_length, "hidden_act": "quick_gelu",
        "projection_dim": width, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
    }


def unet_config(channels: tuple[int, ...] = (32, 64, 128, 128), cross_attention_dim: int = 64, sample_size: int = 16,
                latent_channels: int = 12, groups: int = 8, heads: int = 4) -> dict[str, Any]:
    """An SD-v1-layout U-Net config scaled down (same stages, pairs and block types)."""
    return {
        "act_fn": "silu", "attention_head_dim": heads, "block_out_channels": list(channels),
        "center_input_sample": False, "cross_attention_dim": cross_attention_dim,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": latent_channels, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": groups, "out_channels": latent_channels,
        "sample_size": sample_size, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }


SCHEDULER_CONFIG: dict[str, Any] = {  # SD-v1's training schedule
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def text_encoder(vocab_size: int, max_length: int, width: int = 64, layers: int = 2, embed_std: float | None = None):
    """A randomly initialised CLIP text encoder; with ``embed_std`` its word and position embeddings start at that
    scale instead of CLIP's 0.02.

    The shipped teacher's text encoder started at unit scale, like the hidden states the embeddings feed (an early,
    epsilon-trained teacher had collapsed its text features to a near-constant sequence; the cure was
    v-prediction, see ``bksdm.mini.teacher``, not this init).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(**text_encoder_config(vocab_size, max_length, width, layers)))
    if embed_std is None:
        return text
    with torch.no_grad():
        emb = text.embeddings
        emb.token_embedding.weight.normal_(0.0, embed_std)
        emb.position_embedding.weight.normal_(0.0, embed_std)
    return text


def text_encoder_with_projection(vocab_size: int, max_length: int, width: int, layers: int, projection: int,
                                 embed_std: float | None = None):
    """A randomly initialised ``CLIPTextModelWithProjection`` (pooled output ``text_embeds`` (B, ``projection``):
    SDXL's second text encoder, both of SD3's); ``embed_std`` as :func:`text_encoder`'s."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = {**text_encoder_config(vocab_size, max_length, width, layers), "projection_dim": projection}
    text = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    if embed_std is not None:
        with torch.no_grad():
            for emb in (text.text_model.embeddings.token_embedding, text.text_model.embeddings.position_embedding):
                emb.weight.normal_(0.0, embed_std)
    return text


def build_pipeline(words: list[str], max_length: int = 24, image_size: int = 32, seed: int = 0,
                   unet: dict[str, Any] | None = None, text_width: int = 64, text_layers: int = 2, vae_shift: float = 0.0,
                   text_embed_std: float | None = None):
    """A randomly initialised tiny ``StableDiffusionPipeline`` (PNDM scheduler, no safety checker)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(words, max_length)
    text = text_encoder(len(tokenizer), max_length, text_width, text_layers, text_embed_std)
    vae = SpaceToDepthVAE(sample_size=image_size, shift=vae_shift)
    ucfg = unet or unet_config(cross_attention_dim=text_width, sample_size=image_size // 2)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=UNet2DConditionModel.from_config(ucfg),
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_unet_config(channels: tuple[int, ...] = (16, 32, 32), depth: tuple[int, ...] = (1, 2, 3), text_width: int = 32,
                     pooled_width: int = 16, time_dim: int = 8, sample_size: int = 16, latent_channels: int = 4,
                     groups: int = 4, heads: int = 2) -> dict[str, Any]:
    """An SDXL-layout U-Net config scaled down: a plain outer stage, two attention stages with transformer depth
    ``depth``, ``text_time`` added conditioning (pooled text embedding + six size ids)."""
    return {
        "act_fn": "silu", "attention_head_dim": heads, "block_out_channels": list(channels),
        "cross_attention_dim": text_width, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
        "transformer_layers_per_block": list(depth), "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim, "projection_class_embeddings_input_dim": pooled_width + 6 * time_dim,
        "in_channels": latent_channels, "out_channels": latent_channels, "norm_num_groups": groups,
        "sample_size": sample_size, "use_linear_projection": True,
    }


def build_sdxl_pipeline(words: list[str], max_length: int = 24, image_size: int = 32, seed: int = 0,
                        unet: dict[str, Any] | None = None, widths: tuple[int, int] = (16, 16), pooled_width: int = 16,
                        vae: Any = None, text_layers: int = 2, text_embed_std: float | None = None):
    """A randomly initialised tiny ``StableDiffusionXLPipeline``: two word-level tokenizers, a CLIP text encoder and a
    CLIP text encoder with projection (pooled output), an SDXL-layout U-Net and ``vae`` (default: a tiny
    ``AutoencoderKL``; the mini teacher's recipe passes the world's space-to-depth VAE)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok, tok2 = make_tokenizer(words, max_length), make_tokenizer(words, max_length)
    text = text_encoder(len(tok), max_length, widths[0], text_layers, text_embed_std)
    text2 = text_encoder_with_projection(len(tok2), max_length, widths[1], text_layers, pooled_width, text_embed_std)
    vae = vae or AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                               up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, sample_size=image_size)
    ucfg = unet or sdxl_unet_config(text_width=sum(widths), pooled_width=pooled_width, sample_size=image_size // 2)
    sched = PNDMScheduler.from_config(SCHEDULER_CONFIG)  # the mini world's sampler, as the SD-layout pipeline's
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=UNet2DConditionModel.from_config(ucfg), scheduler=sched, add_watermarker=False)


def sd3_transformer_config(layers: int = 8, heads: int = 4, head_dim: int = 16, text_width: int = 64,
                           pooled_width: int = 64, sample_size: int = 16, latent_channels: int = 12,
                           patch_size: int = 2, pos_embed_max_size: int = 16) -> dict[str, Any]:
    """An SD3-layout ``SD3Transformer2DModel`` config scaled down: ``layers`` joint (MMDiT) blocks of width
    ``heads * head_dim`` (the context stream as wide: ``caption_projection_dim``), 2x2 patches, SD3's plain attention
    (no QK norm, no dual-attention layers: SD3.5-Medium's). ``text_width``: ``joint_attention_dim``, the width of
    the text sequence (both CLIPs' hidden states concatenated; without T5 the pipeline appends zeros this wide);
    ``pooled_width``: both CLIPs' projections concatenated. ``pos_embed_max_size``: patches a side the position
    table covers (16: images up to 16 x 2 x 2 = 64 px)."""
    return {"sample_size": sample_size, "patch_size": patch_size, "in_channels": latent_channels,
            "out_channels": latent_channels, "num_layers": layers, "attention_head_dim": head_dim,
            "num_attention_heads": heads, "joint_attention_dim": text_width, "caption_projection_dim": heads * head_dim,
            "pooled_projection_dim": pooled_width, "pos_embed_max_size": pos_embed_max_size}


SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.6}
"""``FlowMatchEulerDiscreteScheduler`` for 16x16 latents (64 patches). SD3 uses shift 3.0 for 128x128 latents (4,096
patches; its 256 px pretraining, 256 patches, used none): more pixels carry the same picture more redundantly, so
noise must be stronger to hide it, and fewer need less. 1.6 is (a) Flux's resolution rule at 64 patches
(``exp(calculate_shift(64))`` = 1.596, :func:`bksdm.objectives.calculate_shift`), and (b) the shift whose
logit-normal training draws have the median log-SNR (-0.94) of the uniform DDPM timesteps the shipped U-Net
teachers learnt from on the same latents (-0.96). The sigma table holds it: training draws and sampling both use it."""


def build_sd3_pipeline(words: list[str], max_length: int = 24, image_size: int = 32, seed: int = 0,
                       transformer: dict[str, Any] | None = None, widths: tuple[int, int] = (32, 32),
                       vae: Any = None, text_layers: int = 2, text_embed_std: float | None = None,
                       scheduler: dict[str, Any] | None = None):
    """A randomly initialised tiny ``StableDiffusion3Pipeline``: two word-level tokenizers, two CLIP text encoders
    with projection (widths ``widths``, each pooled as wide as it is), no T5 (``text_encoder_3`` None: the pipeline
    feeds ``max_sequence_length`` zero tokens instead), an SD3-layout transformer (:func:`sd3_transformer_config`,
    ``joint_attention_dim`` = sum of ``widths``), ``vae`` (default: the world's space-to-depth VAE, unshifted) and
    :data:`SD3_SCHEDULER_CONFIG`. Images (B, 3, 32, 32) <-> latents (B, 12, 16, 16) <-> 64 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok, tok2 = make_tokenizer(words, max_length), make_tokenizer(words, max_length)
    text = text_encoder_with_projection(len(tok), max_length, widths[0], text_layers, widths[0], text_embed_std)
    text2 = text_encoder_with_projection(len(tok2), max_length, widths[1], text_layers, widths[1], text_embed_std)
    vae = vae or SpaceToDepthVAE(sample_size=image_size, shift_factor=0.0)
    tcfg = transformer or sd3_transformer_config(text_width=sum(widths), pooled_width=sum(widths),
                                                 sample_size=image_size // 2)
    if tcfg["joint_attention_dim"] < sum(widths) or tcfg["pooled_projection_dim"] != sum(widths):
        raise UserError(f"an SD3 transformer for text encoders {widths} needs joint_attention_dim >= {sum(widths)} and "
                        f"pooled_projection_dim == {sum(widths)}")
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler or SD3_SCHEDULER_CONFIG)
    return StableDiffusion3Pipeline(transformer=SD3Transformer2DModel.from_config(tcfg), scheduler=sched, vae=vae,
                                    text_encoder=text, tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok2,
                                    text_encoder_3=None, tokenizer_3=None)
