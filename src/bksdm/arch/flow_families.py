"""Flow-matching transformer families: SD3 / SD3.5 (MMDiT, ``StableDiffusion3Pipeline``) and Flux.1
(``FluxPipeline``), behind the :class:`~bksdm.arch.families.Family` interface.

Their conditioning dict is flat and batch-first like the U-Net families': ``encoder_hidden_states`` (B, L, D) and
``pooled_projections`` (B, P), and for Flux-dev ``guidance`` (B,) (the guidance scale is an input, not a second
pass). :meth:`SD3Family.denoise` / :meth:`FluxFamily.denoise` call the transformer as the pipelines do, with
``(B, C, h, w)`` latents in and out and ``t`` in scheduler units (0-1000); Flux's packing, position ids and time
scaling stay inside. :func:`family_for` picks a family from a denoiser config (U-Nets included).

Every formula is diffusers 0.42's (``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``,
``pipelines/flux/pipeline_flux.py``); ``tests/test_flow.py`` checks each against the pipeline's own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from bksdm.arch.families import Family, family_of
from bksdm.arch.repeats import merge_repeats
from bksdm.errors import UserError


def _ids(tok, texts: list[str], length: int, device: Any) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids.to(device)


@dataclass(frozen=True)
class SD3Family(Family):
    """SD3 / SD3.5: two CLIP text encoders with projection (penultimate hidden states concatenated, zero-padded to
    T5's width; pooled outputs concatenated) and T5 (``max_sequence_length`` tokens), or zeros where the pipeline
    has no ``text_encoder_3`` (``joint_attention_dim`` wide), as ``StableDiffusion3Pipeline.encode_prompt``:
    ``encoder_hidden_states`` (B, 77 + T, D), ``pooled_projections`` (B, P1 + P2)."""

    name: str = "sd3"
    pipeline_class: str = "StableDiffusion3Pipeline"
    text_components: tuple[str, ...] = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2",
                                        "tokenizer_3", "text_encoder_3")
    cache_keys: tuple[str, ...] = ("emb", "pooled")
    pipeline_kwargs: tuple[tuple[str, Any], ...] = ()
    guidance: float = 7.0  # StableDiffusion3Pipeline's default
    backbone: str = "transformer"
    max_sequence_length: int = 256  # the pipeline's default T5 length
    joint_attention_dim: int = 4096  # T5's width, the zeros' width without it (transformer config)

    @property
    def t5(self) -> bool:
        return "text_encoder_3" in self.text_components

    def encode_prompt(self, parts: Mapping[str, Any], texts: list[str], device: Any) -> dict[str, Any]:
        clip_len = parts["tokenizer"].model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        hidden, pooled = [], []
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            out = parts[enc](_ids(parts[tok], texts, clip_len, device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(dtype=parts["text_encoder"].dtype, device=device))
        if self.t5:
            enc3 = parts["text_encoder_3"]
            t5 = enc3(_ids(parts["tokenizer_3"], texts, self.max_sequence_length, device))[0].to(enc3.dtype)
        else:
            t5 = torch.zeros(len(texts), self.max_sequence_length, self.joint_attention_dim, device=device,
                             dtype=parts["text_encoder"].dtype)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}

    def unet_kwargs(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"]}

    def denoise(self, model: Any, x: Any, t: Any, cond: Mapping[str, Any]) -> Any:
        """``model(hidden_states=x, timestep=t, ...)``: SD3 takes ``t`` in scheduler units (0-1000). Identical
        trailing context tokens (T5's zeros when it is absent) are computed once, an exact rewrite
        (:func:`bksdm.arch.repeats.merge_repeats`, installed on the model's transformer on first use)."""
        merge_repeats(model)
        return model(hidden_states=x, timestep=t, **self.unet_kwargs(cond)).sample

    def latent_shape(self, config: Mapping[str, Any], size: int, vae_scale_factor: int) -> tuple[int, int, int]:
        step = vae_scale_factor * int(config["patch_size"])
        if size % step:
            raise UserError(f"SD3 image sides must be multiples of {step} px (VAE factor x patch size), not {size}")
        return super().latent_shape(config, size, vae_scale_factor)

    def prediction_type(self, scheduler_config: Mapping[str, Any]) -> str:
        return "flow"

    def to_cache(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        """``emb`` (B, 77 + T, D) and ``pooled``; without T5 only the CLIP part (B, 77, D): the rest is zeros."""
        emb = cond["encoder_hidden_states"]
        return {"emb": emb if self.t5 else emb[:, : emb.shape[1] - self.max_sequence_length], "pooled": cond["pooled_projections"]}

    def from_cache(self, item: Mapping[str, Any]) -> dict[str, Any]:
        emb = item["emb"]
        if not self.t5:  # T5's zeros, as encode_prompt makes them (cache_meta records which it was)
            emb = torch.cat([emb, emb.new_zeros(*emb.shape[:-2], self.max_sequence_length, emb.shape[-1])], dim=-2)
        return {"encoder_hidden_states": emb, "pooled_projections": item["pooled"]}

    def cache_meta(self) -> dict[str, Any]:
        """What a cache of this family's embeddings must record and match (T5 length, T5 present or zeros)."""
        return {"max_sequence_length": self.max_sequence_length, "t5": self.t5}

    def dummy_conditioning(self, config: Mapping[str, Any], batch: int, device: Any, dtype: Any) -> dict[str, Any]:
        """Random inputs of the right shapes (CLIP's 77 tokens + T5's, the transformer's widths)."""
        shape = (batch, 77 + self.max_sequence_length, config["joint_attention_dim"])
        return {"encoder_hidden_states": torch.randn(*shape, device=device, dtype=dtype),
                "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype)}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): Flux's 2x2 patches, row-major (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, (h/2)(w/2), 4C) -> (B, C, h, w) for latents of ``height`` x ``width`` cells (``_unpack_latents``)."""
    b, _, c4 = x.shape
    return x.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, height, width)


def latent_image_ids(height: int, width: int, device: Any, dtype: Any) -> torch.Tensor:
    """Rotary position ids (h/2 * w/2, 3) of packed latents of ``height`` x ``width`` cells: (0, row, column)
    (``FluxPipeline._prepare_latent_image_ids`` on the halved grid, 2-D as diffusers >= 0.31 expects)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class FluxFamily(Family):
    """Flux.1: CLIP's pooled output (``pooled_projections``, (B, 768)) and T5's last hidden state
    (``encoder_hidden_states``, (B, T, 4096)), as ``FluxPipeline.encode_prompt``. Flux-dev
    (``guidance_embeds``) is guidance-distilled: no unconditional pass; the guidance scale is conditioning
    (``guidance`` (B,), :meth:`added_conditioning`). Latents are packed into 2x2 patches, so image sides are
    multiples of 16 px (VAE factor 8 x 2)."""

    name: str = "flux"
    pipeline_class: str = "FluxPipeline"
    text_components: tuple[str, ...] = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    cache_keys: tuple[str, ...] = ("emb", "pooled")
    pipeline_kwargs: tuple[tuple[str, Any], ...] = ()
    guidance: float = 3.5  # FluxPipeline's default (embedded guidance for dev; schnell ignores it)
    backbone: str = "transformer"
    classifier_free: bool = False
    max_sequence_length: int = 512  # the pipeline's default T5 length
    guidance_embeds: bool = True

    def encode_prompt(self, parts: Mapping[str, Any], texts: list[str], device: Any) -> dict[str, Any]:
        clip, t5 = parts["text_encoder"], parts["text_encoder_2"]
        ids = _ids(parts["tokenizer"], texts, parts["tokenizer"].model_max_length, device)
        pooled = clip(ids, output_hidden_states=False).pooler_output.to(dtype=clip.dtype, device=device)
        hidden = t5(_ids(parts["tokenizer_2"], texts, self.max_sequence_length, device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": hidden.to(dtype=t5.dtype, device=device), "pooled_projections": pooled}

    def unconditional(self, parts: Mapping[str, Any], device: Any, index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The empty prompt's encoding (caption dropout; FluxPipeline's true-CFG negative). Flux-dev is not
        guided with it (:attr:`classifier_free` is False)."""
        return self.encode_prompt(parts, [""], device)

    def added_conditioning(self, batch: int, resolution: int, device: Any, size_ids: Any = None) -> dict[str, Any]:
        """``guidance`` (B,) float32 at :attr:`guidance` when the transformer embeds guidance (Flux-dev; diffusers'
        Flux training scripts pass ``--guidance_scale``, 3.5), else nothing (schnell)."""
        if not self.guidance_embeds:
            return {}
        return {"guidance": torch.full((batch,), self.guidance, device=device, dtype=torch.float32)}

    def unet_kwargs(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        if self.guidance_embeds and "guidance" not in cond:
            raise UserError("this Flux transformer embeds guidance (Flux-dev): the conditioning needs 'guidance' (B,)")
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"],
                "guidance": cond.get("guidance") if self.guidance_embeds else None}

    def denoise(self, model: Any, x: Any, t: Any, cond: Mapping[str, Any]) -> Any:
        """Pack ``x`` (B, C, h, w) to (B, hw/4, 4C), build ``img_ids`` (hw/4, 3) and zero ``txt_ids`` (T, 3), call
        the transformer with ``timestep = t / 1000`` (Flux scales by 1000 inside) and unpack its output."""
        _, _, h, w = x.shape
        kw = self.unet_kwargs(cond)
        packed = pack_latents(x)
        img_ids = latent_image_ids(h, w, x.device, x.dtype)
        txt_ids = torch.zeros(kw["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        assert len(img_ids) == packed.shape[1] and len(txt_ids) == kw["encoder_hidden_states"].shape[1]
        out = model(hidden_states=packed, timestep=t.to(x.dtype) / 1000, img_ids=img_ids, txt_ids=txt_ids, **kw).sample
        return unpack_latents(out, h, w)

    def latent_shape(self, config: Mapping[str, Any], size: int, vae_scale_factor: int) -> tuple[int, int, int]:
        if size % (2 * vae_scale_factor):
            raise UserError(f"Flux image sides must be multiples of {2 * vae_scale_factor} px (2x2 packed latents), "
                            f"not {size}")
        return int(config["in_channels"]) // 4, size // vae_scale_factor, size // vae_scale_factor

    def pipeline_latents(self, latents: Any) -> Any:
        return pack_latents(latents)

    def resolution(self, config: Mapping[str, Any], vae_scale_factor: int = 8) -> int:
        """FluxPipeline's default: 128 latent cells a side (1024 px with Flux's VAE)."""
        return 128 * vae_scale_factor

    def prediction_type(self, scheduler_config: Mapping[str, Any]) -> str:
        return "flow"

    def to_cache(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        return {"emb": cond["encoder_hidden_states"], "pooled": cond["pooled_projections"]}

    def from_cache(self, item: Mapping[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": item["emb"], "pooled_projections": item["pooled"]}

    def cache_meta(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def dummy_conditioning(self, config: Mapping[str, Any], batch: int, device: Any, dtype: Any) -> dict[str, Any]:
        out = {"encoder_hidden_states": torch.randn(batch, self.max_sequence_length, config["joint_attention_dim"],
                                                    device=device, dtype=dtype),
               "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype)}
        return {**out, **{k: v.to(dtype) for k, v in self.added_conditioning(batch, 0, device).items()}}


TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def transformer_kind(config: Mapping[str, Any]) -> str | None:
    """``sd3`` / ``flux`` for a transformer config (by ``_class_name`` when saved, else by its keys), None for
    anything else (a U-Net)."""
    name = config.get("_class_name")
    if name is not None:
        return TRANSFORMER_CLASSES.get(name)
    if "axes_dims_rope" in config and "guidance_embeds" in config:
        return "flux"
    if "pos_embed_max_size" in config and "caption_projection_dim" in config:
        return "sd3"
    return None


def family_for(config: Mapping[str, Any], components: Iterable[str] | None = None) -> Family:
    """The family of a denoiser config: :class:`SD3Family` / :class:`FluxFamily` for their transformers (SD3
    without ``text_encoder_3`` when ``components``, the names a pipeline has, lack it), else
    :func:`~bksdm.arch.families.family_of` (U-Nets). Another transformer is a one-line error."""
    kind = transformer_kind(config)
    if kind == "flux":
        return FluxFamily(guidance_embeds=bool(config.get("guidance_embeds", False)))
    if kind == "sd3":
        names = SD3Family.text_components
        if components is not None and "text_encoder_3" not in set(components):
            names = names[:4]
        return SD3Family(text_components=names, joint_attention_dim=int(config["joint_attention_dim"]))
    name = config.get("_class_name", "")
    if name and "Transformer" in name:
        raise UserError(f"denoiser {name} is not supported; supported transformers: {', '.join(TRANSFORMER_CLASSES)}")
    return family_of(config)


def pipeline_components(index: Mapping[str, Any]) -> list[str]:
    """The components a ``model_index.json`` provides (entries ``[library, class]`` whose class is not null)."""
    return [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None and v[1] is not None]
