"""LoRA files that every runtime reads at the strength they were trained at.

diffusers applies ``alpha / rank`` from a file's adapter metadata; kohya-style loaders (ComfyUI, A1111,
stable-diffusion.cpp) read ``alpha`` only from ``.alpha`` tensors and otherwise take alpha = rank. A LoRA trained
with alpha != rank (the BK-SDM DreamBooth preset: rank 16, alpha 27 / 17) and saved with metadata only therefore
loses strength outside diffusers (16/27 = 59% of the U-Net's). We fold the scale into the up-projection instead
(``B' = B * alpha / rank``, alpha = rank afterwards): the product ``B' A`` is the trained update under every
loader's convention.
"""

from __future__ import annotations

import re
from typing import Any

import torch


def fold_alpha(state: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """A peft LoRA state dict (``...lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r)) with ``alpha / rank``
    folded into every ``lora_B`` weight, so that it means the same update at alpha = rank."""
    scale = alpha / rank
    if scale == 1:
        return dict(state)
    return {k: (v * scale if ".lora_B." in k else v) for k, v in state.items()}


def folded_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter metadata of a folded LoRA: its peft config with ``lora_alpha`` = ``r`` (and no per-module
    alpha pattern), which every loader reads as scale 1."""
    return {**config, "lora_alpha": config["r"], "alpha_pattern": {}}


def save_lora(folder, pipeline_class: str, unet, text_encoder=None) -> None:
    """``folder/pytorch_lora_weights.safetensors`` from peft-wrapped ``unet`` (and ``text_encoder``), each adapter's
    ``alpha / rank`` folded into its weights (:func:`fold_alpha`), through the pipeline class's
    ``save_lora_weights`` (diffusers' key names and adapter metadata, which ``load_lora_weights`` reads)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers, meta = {}, {}
    for name, net in (("unet", unet), ("text_encoder", text_encoder)):
        if net is None:
            continue
        config = net.peft_config["default"]
        state = fold_alpha(get_peft_model_state_dict(net), config.lora_alpha, config.r)
        layers[name] = convert_state_dict_to_diffusers(state)
        meta[name] = folded_metadata(config.to_dict())
    getattr(diffusers, pipeline_class).save_lora_weights(
        folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta.get("text_encoder"))


LORA_KEY = re.compile(r"^unet\.(.+?)\.(lora[._].+|alpha)$")
"""A U-Net tensor of a diffusers-format LoRA state dict: ``unet.<module>.lora.down.weight`` / ``.lora_A.weight``."""


def unet_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The U-Net modules a LoRA adapts (``down_blocks.0.attentions.0...to_q``) with their tensors by suffix."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = LORA_KEY.match(k)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = v
    return out


def misfits(modules: dict[str, dict[str, torch.Tensor]], unet) -> list[str]:
    """The LoRA modules ``unet`` lacks, or whose weight's shape the LoRA's down (in) / up (out) sides do not fit."""
    have = dict(unet.named_modules())
    bad = []
    for name, tensors in modules.items():
        layer = have.get(name)
        weight = getattr(layer, "weight", None)
        down = next((v for k, v in tensors.items() if k.startswith(("lora.down", "lora_A"))), None)
        up = next((v for k, v in tensors.items() if k.startswith(("lora.up", "lora_B"))), None)
        if weight is None or down is None or up is None or down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0]:
            bad.append(name)
    return bad


def remap(state: dict[str, torch.Tensor], module_map: list[list[str]]) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """A teacher's LoRA moved onto its student through the student's module map (``bksdm.json``: [student module,
    teacher module] pairs): each U-Net tensor goes where the teacher weights of its module went (longest matching
    teacher prefix); modules of removed blocks are dropped. Returns the new state, the dropped modules and how many
    modules were renumbered. Text-encoder tensors pass unchanged."""
    pairs = sorted(((t, s) for s, t in module_map), key=lambda p: -len(p[0]))
    out, dropped, moved = {}, set(), set()
    for k, v in state.items():
        m = LORA_KEY.match(k)
        if not m:
            out[k] = v
            continue
        module = m.group(1)
        hit = next(((t, s) for t, s in pairs if module == t or module.startswith(t + ".")), None)
        if hit is None:
            dropped.add(module)
            continue
        new = hit[1] + module[len(hit[0]):]
        if new != module:
            moved.add(module)
        out[f"unet.{new}.{m.group(2)}"] = v
    return out, sorted(dropped), len(moved)


def fold_loaded_alphas(state: dict[str, torch.Tensor], alphas: dict[str, float] | None,
                       metadata: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """A loaded LoRA (``lora_state_dict``'s state, kohya-style network alphas, adapter metadata) with every alpha
    folded into its up weights, so that it means the same with alpha = rank and no metadata (a remapped state dict
    carries neither). Per-module alpha or rank patterns are refused: they would need their own mapping."""
    from bksdm.errors import UserError

    out = dict(state)
    for key, alpha in (alphas or {}).items():
        module = key[: -len(".alpha")]
        for up in (f"{module}.lora.up.weight", f"{module}.lora_B.weight"):
            if up in out:
                out[up] = out[up] * (float(alpha) / out[up].shape[1])
    for part in ("unet", "text_encoder", "text_encoder_2"):
        meta = {k[len(part) + 1:]: v for k, v in (metadata or {}).items() if k.startswith(part + ".")}
        if meta.get("alpha_pattern") or meta.get("rank_pattern"):
            raise UserError("this LoRA sets alpha or rank per module (alpha_pattern / rank_pattern); it cannot be "
                            "remapped onto a student")
        if meta.get("lora_alpha") and meta.get("r") and meta["lora_alpha"] != meta["r"]:
            scale = meta["lora_alpha"] / meta["r"]
            out = {k: (v * scale if k.startswith(part + ".") and (".lora.up." in k or ".lora_B." in k) else v)
                   for k, v in out.items()}
    return out
