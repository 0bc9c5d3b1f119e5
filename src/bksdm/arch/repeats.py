"""Identical trailing text tokens in SD3's joint attention, computed once: an exact rewrite, not an approximation.

An SD3 pipeline without T5 (``text_encoder_3=None``, as diffusers allows and the mini SD3 teacher ships) appends
``max_sequence_length`` (256) zero tokens to the CLIP states. Every per-token operation of an MMDiT block (the
context embedder, adaLN, the projections, the MLP) maps identical tokens to identical tokens, and as queries they
attend identically, so the run stays identical through every block. As keys, ``m`` identical keys contribute
``m * exp(q.k)`` to each softmax sum, which is one key with logit ``q.k + ln m``; their values likewise. So the
transformer's output is unchanged (in exact arithmetic) when the run is replaced by one token whose key carries an
additive ``ln m`` bias. On the mini SD3 teacher (24 CLIP + 256 zero tokens, 64 image tokens) the zeros were 62% of a
training step.

The merged attention runs in fp32 whatever the model's precision (``ln m`` has no exact bf16 value): in fp32 the
merged and the plain transformer agree to ~1e-6 (one exp per key instead of a sum of 256 equal terms); under bf16
autocast both are as far from the fp64 model (RMS within 1%: the bf16 projections dominate). ``tests/test_repeats.py`` checks outputs and parameter
gradients against the unmerged model. Tokens that want a gradient of their own (``encoder_hidden_states`` with
``requires_grad``, as when the CLIP encoders are trained with the transformer) are merged too: the kept token's
gradient is the sum of the run's, and it is handed back spread evenly over the run, which is exact because the run's
tokens are interchangeable (SD3's context tokens carry no position embedding), so the plain model gives each of
them the same gradient.

:func:`merge_repeats` installs it on an ``SD3Transformer2DModel`` (found inside wrappers): a processor around each
block's attention that takes ``context_repeats`` and a forward pre-hook that shortens ``encoder_hidden_states``.
Idempotent; it does nothing when a joint attention already has a processor other than diffusers' default (an
IP-adapter's, a user's), so no other attention path is rewritten.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

_FLAG = "_bksdm_merges_repeats"
_JOINT_KWARGS_POSITION = 5  # hidden_states, encoder_hidden_states, pooled_projections, timestep, controlnet states


def trailing_repeats(encoder_hidden_states: torch.Tensor) -> int:
    """The length of the run of tokens equal to the last one at the end of every row of ``encoder_hidden_states``
    (B, L, D): the smallest such run over the batch (1 when the last token is unique)."""
    same = (encoder_hidden_states == encoder_hidden_states[:, -1:]).all(dim=-1)  # (B, L)
    run = same.flip(1).to(torch.int32).cumprod(dim=1).sum(dim=1)
    return int(run.min())


class RepeatMergingProcessor:
    """Joint attention (diffusers' ``JointAttnProcessor2_0``, whose computation this is) where the last context
    token stands for ``context_repeats`` identical ones: its key gets the additive logit ``ln context_repeats``.
    Without ``context_repeats`` (or for an image-only attention, SD3.5's ``attn2``) it calls the processor it wraps.
    Shapes: ``hidden_states`` (B, N, C) image tokens, ``encoder_hidden_states`` (B, L, C) context tokens; returns
    both, as the wrapped processor does."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, context_repeats: int | None = None, *args, **kwargs):
        if context_repeats is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n = hidden_states.shape[:2]

        def heads(x: torch.Tensor, norm: Any) -> torch.Tensor:
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                       heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                       heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        bias = torch.zeros(1, 1, 1, k.shape[2], device=k.device, dtype=torch.float32)
        bias[..., -1] = math.log(context_repeats)
        # in fp32 always: ln m has no exact bf16 / fp16 value (ln 256 -> 5.53125 in bf16: a 1.4% weight error), and
        # CUDA's memory-efficient kernel refuses a mask of another dtype than q's; autocast would cast both back
        dev = q.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
        with torch.autocast(dev, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(out_dtype)
        image, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, context


def _sd3_transformer(model: torch.nn.Module) -> torch.nn.Module | None:
    from diffusers import SD3Transformer2DModel

    return next((m for m in model.modules() if isinstance(m, SD3Transformer2DModel)), None)


def _processors_ours(transformer: torch.nn.Module) -> bool:
    # blocks without attention are skipped: a block bypassed by bksdm.arch.dit.bypass (bksdm rank) is a PassThrough
    return all(isinstance(b.attn.processor, RepeatMergingProcessor) for b in transformer.transformer_blocks
               if hasattr(b, "attn"))


class _FirstOfRun(torch.autograd.Function):
    """``x[:, :keep]`` whose backward spreads the last kept token's gradient evenly over the ``run`` positions it
    stands for (``keep - 1`` to the end): the gradient the plain model gives each of ``run`` interchangeable tokens."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: int, run: int) -> torch.Tensor:
        ctx.keep, ctx.run = keep, run
        return x[:, :keep].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        spread = (grad[:, -1:] / ctx.run).expand(-1, ctx.run, -1)
        return torch.cat([grad[:, :-1], spread], dim=1), None, None


def _shorten(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: replace the trailing run of identical context tokens by one, and say how many it was."""
    args = list(args)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if ehs is None or ehs.shape[1] < 2 or not _processors_ours(module):  # processors replaced since: the full sequence
        return tuple(args), kwargs
    run = trailing_repeats(ehs)
    if run < 2:
        return tuple(args), kwargs
    keep = ehs.shape[1] - run + 1
    ehs = _FirstOfRun.apply(ehs, keep, run) if ehs.requires_grad else ehs[:, :keep]
    if "encoder_hidden_states" in kwargs:
        kwargs["encoder_hidden_states"] = ehs
    else:
        args[1] = ehs
    if len(args) > _JOINT_KWARGS_POSITION:  # SD3Transformer2DModel.forward's sixth positional parameter
        args[_JOINT_KWARGS_POSITION] = {**(args[_JOINT_KWARGS_POSITION] or {}), "context_repeats": run}
    else:
        kwargs["joint_attention_kwargs"] = {**(kwargs.get("joint_attention_kwargs") or {}), "context_repeats": run}
    return tuple(args), kwargs


def merge_repeats(model: torch.nn.Module) -> bool:
    """Make ``model``'s SD3 transformer (``model`` itself or inside a wrapper) compute identical trailing context
    tokens once (module docstring). Returns whether it is on. Off, and nothing changed, when ``model`` holds no
    ``SD3Transformer2DModel`` or a joint attention has a processor other than ``JointAttnProcessor2_0``."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer = _sd3_transformer(model)
    if transformer is None:
        return False
    blocks = [b for b in transformer.transformer_blocks if hasattr(b, "attn")]
    if not _processors_ours(transformer):
        if any(type(b.attn.processor) not in (JointAttnProcessor2_0, RepeatMergingProcessor) for b in blocks):
            return False
        for block in blocks:  # a block restored after a bypass (bksdm rank) may still have the plain processor
            for name in ("attn", "attn2"):
                attn = getattr(block, name, None)
                if attn is not None and not isinstance(attn.processor, RepeatMergingProcessor):
                    attn.set_processor(RepeatMergingProcessor(attn.processor))
    if not getattr(transformer, _FLAG, False):
        transformer.register_forward_pre_hook(_shorten, with_kwargs=True)
        setattr(transformer, _FLAG, True)
    return True
