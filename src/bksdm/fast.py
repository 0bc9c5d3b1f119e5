"""The fast path around a student: a tiny decoder, features cached across steps, a compiled U-Net.

* **Tiny decoder** (:func:`load_decoder`): a diffusers ``AutoencoderTiny`` folder (TAESD for SD-v1/v2, TAESDXL for
  SDXL; Bohan Ollin Boer Bohan, github.com/madebyollin/taesd) in place of the pipeline VAE's decoder: 1.2M
  parameters instead of 49.5M. It decodes the latents the U-Net makes (its ``scaling_factor`` is 1), so the
  pipelines use it as they use their VAE.
* **Feature caching** (:class:`FeatureCache`): DeepCache (Ma, Fang and Wang, CVPR 2024, arXiv 2312.00858) at
  block granularity. Every ``interval``-th U-Net call runs whole and keeps the input of up-block
  ``n - 1 - branch`` (the deep features); the calls between run only ``conv_in``, down-blocks ``0..branch``
  and up-blocks ``n - 1 - branch .. n - 1`` with the kept features, because high-level features change little
  between adjacent steps. ``interval=1`` is the uncached U-Net.
* **Compile** (:func:`compile_unet`): ``torch.compile`` of the U-Net's forward (inductor; on CPUs it needs a C++
  compiler), channels-last memory where convolutions prefer it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bksdm.errors import UserError, reading


def load_decoder(path: str | Path, unet, vae=None):
    """A diffusers ``AutoencoderTiny`` from ``path`` (a folder with ``config.json`` and weights) checked against the
    model it will decode for: its latent channels must equal the U-Net's ``out_channels`` and, when ``vae`` is
    given, its upsampling the VAE's. Errors: one line naming the mismatch."""
    from diffusers import AutoencoderTiny

    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise UserError(f"decoder {p} is not a diffusers AutoencoderTiny folder (config.json and weights); download "
                        "one first, e.g. hf download madebyollin/taesd --local-dir taesd (TAESDXL for SDXL), and pass "
                        "the folder")
    with reading(p, "tiny decoder", "download the AutoencoderTiny folder again"):
        cfg = AutoencoderTiny.load_config(p)
        if cfg.get("_class_name") not in (None, "AutoencoderTiny"):
            raise ValueError(f"it holds a {cfg['_class_name']}, not an AutoencoderTiny")
        decoder = AutoencoderTiny.from_pretrained(p)
    check_decoder(decoder, unet, vae, f"decoder {p}")
    return decoder.eval().requires_grad_(False)


def check_decoder(decoder, unet, vae=None, label: str = "decoder") -> None:
    """One line when ``decoder`` cannot decode what ``unet`` makes: other latent channels than its ``out_channels``,
    or (``vae`` given) another upsampling than the model's VAE."""
    from bksdm.models import decoder_factor

    channels = unet.config.out_channels
    if decoder.config.latent_channels != channels:
        raise UserError(f"{label} decodes {decoder.config.latent_channels}-channel latents but the U-Net makes "
                        f"{channels}: use the tiny decoder of this model's family (TAESD for SD-v1/v2, TAESDXL for "
                        "SDXL)")
    if vae is not None and decoder_factor(decoder) != decoder_factor(vae):
        raise UserError(f"{label} upsamples latents {decoder_factor(decoder)}x but this model's VAE "
                        f"{decoder_factor(vae)}x; it was made for another autoencoder")


def partial_blocks(unet, branch: int) -> tuple[int, int]:
    """(down-blocks run, first up-block run) on a cached step for skip branch ``branch``; errors in one line
    when the U-Net has no such branch (a branch must leave at least one block out)."""
    n = len(unet.up_blocks)
    if not 0 <= branch <= n - 2:
        raise UserError(f"cache branch {branch} does not exist in a U-Net of {n} stages; choose 0..{n - 2} "
                        "(0: recompute only the outermost stage)")
    return branch + 1, n - 1 - branch


def unet_forward(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                 timestep_cond: torch.Tensor | None = None, added_cond_kwargs: dict[str, Any] | None = None,
                 branch: int = 0, deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``UNet2DConditionModel.forward``'s computation in two parts: returns (noise prediction (B, C, h, w), deep
    features). ``deep`` None: the whole U-Net, the deep features being the input of up-block ``n - 1 - branch``;
    given: the cached step, where down-blocks ``branch + 1 ..``, the mid-block and the deeper up-blocks are not run
    and ``deep`` stands for their output. The steps, and their order, are diffusers' (0.42) so that a whole pass
    equals ``unet(...)`` exactly (tested); ControlNet, adapters and attention masks are not taken."""
    n_down, first_up = partial_blocks(unet, branch)
    forward_upsample_size = any(d % 2 ** unet.num_upsamplers for d in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                             added_cond_kwargs=added_cond_kwargs or {})
    sample = unet.conv_in(sample)
    res: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks[: n_down if deep is not None else None]:
        if getattr(block, "has_cross_attention", False):
            sample, more = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
        else:
            sample, more = block(hidden_states=sample, temb=emb)
        res += more
    if deep is None:
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=ehs)
            else:
                sample = unet.mid_block(sample, emb)
    else:  # the up-blocks still to run take the first residuals; a down-block's downsampled output is left over
        needed = sum(len(b.resnets) for b in unet.up_blocks[first_up:])
        res, sample = res[:needed], deep
    kept = sample
    for i, block in enumerate(unet.up_blocks):
        if deep is not None and i < first_up:
            continue
        if i == first_up:
            kept = sample
        final = i == len(unet.up_blocks) - 1
        skips, res = res[-len(block.resnets):], res[: -len(block.resnets)]
        size = res[-1].shape[2:] if not final and forward_upsample_size else None
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=ehs,
                           upsample_size=size)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, upsample_size=size)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), kept


class FeatureCache:
    """DeepCache for one sampling run: ``with FeatureCache(unet, interval, branch): pipe(...)``.

    Inside the block every ``interval``-th call of ``unet`` (the 1st, the ``interval + 1``-th, ...) runs whole and
    keeps its deep features; the others reuse them (:func:`unet_forward`). One pipeline call is one trajectory
    (classifier-free guidance runs prompt and empty prompt in one U-Net call), so the block must wrap exactly one
    pipeline call. ``interval=1`` leaves the U-Net untouched. ``forward``: the function that runs a part (a
    compiled :func:`unet_forward`, :func:`compile_unet`)."""

    def __init__(self, unet, interval: int = 1, branch: int = 0, forward=None):
        if interval < 1:
            raise UserError(f"cache interval must be 1 (no caching) or more, not {interval}")
        partial_blocks(unet, branch)
        self.unet, self.interval, self.branch = unet, interval, branch
        self.forward = forward or unet_forward
        self.calls, self.full_calls, self.deep = 0, 0, None

    def __call__(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, return_dict: bool = True, **extra):
        if extra or cross_attention_kwargs:
            raise UserError(f"feature caching and --compile do not take {sorted(extra) or ['cross_attention_kwargs']}; "
                            "run without --cache-interval and --compile")
        full = self.calls % self.interval == 0 or self.deep is None or self.deep.shape[0] != sample.shape[0]
        out, deep = self.forward(self.unet, sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs,
                                 self.branch, None if full else self.deep)
        if full:
            self.deep, self.full_calls = deep, self.full_calls + 1
        self.calls += 1
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def __enter__(self) -> "FeatureCache":
        self.calls, self.full_calls, self.deep = 0, 0, None  # a reused cache starts its trajectory afresh
        self.installed = self.interval > 1 or self.forward is not unet_forward
        if self.installed:
            self.previous = self.unet.__dict__.get("forward")
            self.unet.forward = self  # an instance attribute: nn.Module.__call__ (and its hooks) call it
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            self.unet.__dict__.pop("forward")
            if self.previous is not None:
                self.unet.forward = self.previous
        self.deep = None


def compile_unet(unet, channels_last: bool = True):
    """A compiled :func:`unet_forward` to give :class:`FeatureCache` (with ``interval=1`` too: the U-Net then runs
    whole at every call through the compiled function). Not ``unet.compile()``: the cache's Python bookkeeping
    would be traced into the graph and recompile it at every step. Compilation happens at the first call of each
    input shape and path (whole, cached): minutes on a small CPU, then cached on disk by torch.
    ``channels_last``: NHWC weights, which oneDNN's CPU convolutions and cuDNN's fp16 ones prefer."""
    import warnings

    # diffusers' resamplers call an lru_cache'd version check that dynamo traces through; it says so at every compile
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return torch.compile(unet_forward)
