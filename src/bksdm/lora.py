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


def save_lora(folder, pipeline_class: str, unet, text_encoder=None, denoiser: str = "unet") -> None:
    """``folder/pytorch_lora_weights.safetensors`` from a peft-wrapped denoiser ``unet`` (and ``text_encoder``), each
    adapter's ``alpha / rank`` folded into its weights (:func:`fold_alpha`), through the pipeline class's
    ``save_lora_weights`` (diffusers' key names and adapter metadata, which ``load_lora_weights`` reads).
    ``denoiser``: ``unet``, or ``transformer`` (SD3 / Flux pipelines; saved with peft's key names, as diffusers'
    SD3 / Flux DreamBooth scripts save them)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers, meta = {}, {}
    for name, net in ((denoiser, unet), ("text_encoder", text_encoder)):
        if net is None:
            continue
        config = net.peft_config["default"]
        state = fold_alpha(get_peft_model_state_dict(net), config.lora_alpha, config.r)
        layers[name] = state if name == "transformer" else convert_state_dict_to_diffusers(state)
        meta[name] = folded_metadata(config.to_dict())
    getattr(diffusers, pipeline_class).save_lora_weights(
        folder, text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_lora_adapter_metadata=meta.get("text_encoder"),
        **{f"{denoiser}_lora_layers": layers[denoiser], f"{denoiser}_lora_adapter_metadata": meta[denoiser]})


def lora_key(backbone: str = "unet") -> re.Pattern[str]:
    """A denoiser tensor of a normalised LoRA state dict (:func:`normalise`): ``<backbone>.<module>.lora_A.weight``
    (down, (r, in)) / ``.lora_B.weight`` (up, (out, r)); ``backbone``: ``unet`` or ``transformer`` (SD3, Flux)."""
    return re.compile(rf"^{backbone}\.(.+?)\.(lora_[AB]\.weight|lora_magnitude_vector.*)$")


LORA_KEY = lora_key("unet")
"""A U-Net tensor of a normalised LoRA state dict: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``."""
_UP = (("lora.down", "lora.up"), ("lora_down", "lora_up"), ("lora_A", "lora_B"), ("_layer.down", "_layer.up"))


def normalise(state: dict[str, torch.Tensor], alphas: dict[str, float] | None = None,
              metadata: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A LoRA as the pipeline's ``lora_state_dict`` returns it (diffusers, old attention-processor or kohya-converted
    names; kohya's network alphas; diffusers' adapter metadata) with every alpha folded into its up weights
    (:func:`fold_alpha`'s rule: the same update at alpha = rank, no alphas or metadata needed) and the U-Net's keys in
    peft's names (``unet.<module>.lora_A.weight``, diffusers' ``convert_unet_state_dict_to_peft``). Text-encoder keys
    keep their names; a transformer's (SD3, Flux: ``transformer.<module>.lora_A.weight``, as their pipelines'
    ``lora_state_dict`` return them) are checked to be in peft's names. Per-module alpha or rank patterns are
    refused (they would need a mapping of their own)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from bksdm.errors import UserError

    out = dict(state)
    for key, alpha in (alphas or {}).items():  # kohya: "<down key>.alpha" or "<module>.alpha"
        down = key[: -len(".alpha")]
        downs = [down] if down in out else [k for k in out if k.startswith(down + ".") and _is_down(k)]
        for d in downs:
            up = _up_of(d)
            if up in out:
                out[up] = out[up] * (float(alpha) / out[d].shape[0])
    for part in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        meta = {k[len(part) + 1:]: v for k, v in (metadata or {}).items() if k.startswith(part + ".")}
        if meta.get("alpha_pattern") or meta.get("rank_pattern"):
            raise UserError("this LoRA sets alpha or rank per module (alpha_pattern / rank_pattern); it cannot be "
                            "moved onto a student")
        if meta.get("lora_alpha") and meta.get("r") and meta["lora_alpha"] != meta["r"]:
            scale = meta["lora_alpha"] / meta["r"]
            out = {k: (v * scale if k.startswith(part + ".") and not _is_down(k) and _up_of_any(k) else v)
                   for k, v in out.items()}
    unet = convert_unet_state_dict_to_peft({k[5:]: v for k, v in out.items() if k.startswith("unet.")})
    odd = [k for k in unet if not LORA_KEY.match("unet." + k)]
    if odd:
        raise UserError(f"LoRA tensor unet.{odd[0]} has a name bksdm cannot place; load this LoRA on the model it "
                        "was made for")
    odd = [k for k in out if k.startswith("transformer.") and not lora_key("transformer").match(k)]
    if odd:
        raise UserError(f"LoRA tensor {odd[0]} has a name bksdm cannot place; load this LoRA on the model it was "
                        "made for")
    return {**{k: v for k, v in out.items() if not k.startswith("unet.")}, **{"unet." + k: v for k, v in unet.items()}}


def _is_down(key: str) -> bool:
    return any(d in key for d, _ in _UP)


def _up_of(down: str) -> str:
    for d, u in _UP:
        if d in down:
            return down.replace(d, u)
    return down


def _up_of_any(key: str) -> bool:
    return any(u in key for _, u in _UP)


def lora_modules(state: dict[str, torch.Tensor], backbone: str = "unet") -> dict[str, dict[str, torch.Tensor]]:
    """The modules of the denoiser ``backbone`` (``unet`` or ``transformer``) a normalised LoRA adapts
    (``down_blocks.0.attentions.0...to_q``, ``transformer_blocks.0.attn.to_q``) with their tensors."""
    key = lora_key(backbone)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = key.match(k)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = v
    return out


def misfits(modules: dict[str, dict[str, torch.Tensor]], model) -> list[str]:
    """The LoRA modules (:func:`lora_modules`) the denoiser ``model`` (U-Net or transformer) lacks, or whose weight's
    shape the LoRA's down (in) / up (out) sides do not fit."""
    have = dict(model.named_modules())
    bad = []
    for name, tensors in modules.items():
        weight = getattr(have.get(name), "weight", None)
        down, up = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if weight is None or down is None or up is None or down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0]:
            bad.append(name)
    return bad


def remap(state: dict[str, torch.Tensor], record: dict[str, Any],
          backbone: str = "unet") -> tuple[dict[str, torch.Tensor], list[str], int]:
    """A teacher's normalised LoRA moved onto its student: each module of the denoiser ``backbone`` (``unet`` or
    ``transformer``) goes where the teacher's weight of that
    module went, by the student's tensor key map (``bksdm.json`` ``key_map``: student tensor -> teacher tensor; exact
    for every kept block, transformer layer and top-level layer), or, in records without one, by the longest
    matching block of its ``module_map``; DiT students' records hold the key map too (``bksdm.arch.dit``: every kept
    block renumbered, top-level layers as they are). Modules whose weights no student tensor took are dropped. Returns the new
    state, the dropped modules and how many were renumbered. Text-encoder tensors pass unchanged."""
    if record.get("key_map"):
        moves = {t[: -len(".weight")]: s[: -len(".weight")] for s, t in record["key_map"].items()
                 if t.endswith(".weight")}

        def place(module: str) -> str | None:
            return moves.get(module)
    else:
        pairs = sorted(((t, s) for s, t in record.get("module_map", [])), key=lambda p: -len(p[0]))

        def place(module: str) -> str | None:
            hit = next(((t, s) for t, s in pairs if module == t or module.startswith(t + ".")), None)
            return None if hit is None else hit[1] + module[len(hit[0]):]
    out, dropped, moved, key = {}, set(), set(), lora_key(backbone)
    for k, v in state.items():
        m = key.match(k)
        if not m:
            out[k] = v
            continue
        new = place(m.group(1))
        if new is None:
            dropped.add(m.group(1))
            continue
        if new != m.group(1):
            moved.add(m.group(1))
        out[f"{backbone}.{new}.{m.group(2)}"] = v
    return out, sorted(dropped), len(moved)


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
"""kohya's names for SD-v1/v2 LoRAs: the diffusers module path with ``_`` for ``.``, under these prefixes."""


def to_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-format SD-v1/v2 LoRA (``unet.<module>.lora.down.weight`` / ``lora_A``, ``text_encoder....``) in
    kohya's layout, which ComfyUI, A1111 and stable-diffusion.cpp read: ``lora_unet_<module>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha``. Alphas are written as the rank: bksdm's files hold alpha / rank folded in
    (:func:`fold_alpha`), so the update is the trained one under kohya's alpha / rank rule."""
    from bksdm.errors import UserError

    out: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        m = re.match(r"^(unet|text_encoder)\.(.+?)\.(lora\.down|lora\.up|lora_A|lora_B)\.weight$", key)
        if not m:
            raise UserError(f"LoRA tensor {key} is not a diffusers SD-v1/v2 LoRA tensor (SDXL LoRAs: kohya names "
                            "them by SDXL's original blocks, which this export does not write)")
        part, module, side = m.groups()
        name = KOHYA_PREFIX[part] + module.replace(".", "_")
        down = side in ("lora.down", "lora_A")
        out[f"{name}.lora_{'down' if down else 'up'}.weight"] = v.contiguous()
        if down:
            out[f"{name}.alpha"] = torch.tensor(float(v.shape[0]))
    return out
