"""Shipping a pipeline folder: one ``.safetensors`` in the original Stable Diffusion key layout, or a half-precision
diffusers folder.

The single file holds the U-Net under ``model.diffusion_model.`` (``input_blocks``, ``middle_block``,
``output_blocks``), the VAE under ``first_stage_model.`` and the text encoder under ``cond_stage_model.`` (OpenAI CLIP
layout for SD-v1, OpenCLIP for SD-v2; SDXL: ``conditioner.embedders.0/1``), the layout ComfyUI, A1111 and
diffusers' ``from_single_file`` read; ``layout="sd-cpp"`` numbers the blocks as stable-diffusion.cpp expects
(:data:`LAYOUTS`). A block-removed student has fewer ``input_blocks`` per stage and may have no
``middle_block``; the file's metadata names the removed blocks and the diffusers config, because runtimes that
assume SD-v1's block counts must be told (diffusers reads it back with ``config=`` the student's folder).

Every key map here is checked at export against diffusers' own single-file converters: each exported tensor must
come back under its diffusers name, unchanged, or the export fails before writing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from bksdm.errors import UserError, check_output

UNET, VAE, CLIP, OPENCLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
"""SDXL's two text encoders in its single file: CLIP ViT-L (OpenAI layout) and OpenCLIP ViT-bigG."""

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL


def _resnet(rest: str, table=_RESNET) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


LAYOUTS = ("comfyui", "sd-cpp")
"""Single-file block numberings. ``comfyui`` (default): blocks numbered densely with the U-Net's own
``layers_per_block``, which ComfyUI and diffusers' ``from_single_file`` read for every student. ``sd-cpp``: SD's
gapped numbering (stride 3 per stage, as diffusers' ``convert_diffusers_to_original_stable_diffusion.py`` writes
it), the only one stable-diffusion.cpp's U-Net variants accept; it builds the full SD-v1/v2 layout and BK-SDM-Tiny's
(its ``tiny_unet``: 3 attention stages, one block per down stage, no mid-block) and no other student."""


def sd_cpp_refusal(config: dict[str, Any]) -> str | None:
    """Why stable-diffusion.cpp cannot build a U-Net of ``config`` (None: it can, as SD or as its tiny variant)."""
    stages, lpb, mid = len(config["down_block_types"]), config["layers_per_block"], config.get("mid_block_type")
    if config.get("addition_embed_type"):
        return "the sd-cpp layout covers SD-v1/v2 U-Nets; export SDXL students with the default layout"
    if (stages, lpb) == (4, 2) and mid is not None:
        return None  # the full SD layout: both numberings coincide
    attn = all("CrossAttn" in t for t in (*config["down_block_types"], *config["up_block_types"]))
    if (stages, lpb, mid, attn) == (3, 1, None, True):
        return None  # BK-SDM-Tiny: sd.cpp's tiny_unet
    return (f"stable-diffusion.cpp builds SD U-Nets only as the full layout or BK-SDM-Tiny's (3 attention stages, 1 "
            f"block per down stage, no mid-block); this one has {stages} stages, {lpb} block(s) per down stage and "
            f"{'a' if mid else 'no'} mid-block. Use the default layout (ComfyUI, diffusers)")


def unet_key(key: str, config: dict[str, Any], layout: str = "comfyui") -> str:
    """The original-layout name (without prefix) of a diffusers U-Net tensor name.

    Block ``j`` of down stage ``b`` is ``input_blocks.{1 + b*(L+1) + j}`` (``.0`` the resnet, ``.1`` its attention),
    the stage's downsampler ``input_blocks.{(b+1)*(L+1)}.0.op``; up stage ``b`` holds ``L+1`` blocks from
    ``output_blocks.{b*(L+1)}``, its upsampler after the last block's attention; L = ``layers_per_block``, or SD's 2
    for ``layout="sd-cpp"`` (whose first upsampler sits at ``.1``, as sd.cpp's tiny U-Net expects)."""
    lpb = config["layers_per_block"] if layout == "comfyui" else 2
    top = key.rsplit(".", 1)
    if top[0] in _UNET_TOP:
        return f"{_UNET_TOP[top[0]]}.{top[1]}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{rest.removeprefix('conv.')}"
        i = 1 + b * (lpb + 1) + j
        return f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            has_attn = "CrossAttn" in config["up_block_types"][b] and not (layout == "sd-cpp" and b == 0)
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.{rest}"
        i = b * (lpb + 1) + j
        return f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    raise UserError(f"U-Net tensor {key} has no place in the Stable Diffusion single-file layout")


_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_key(key: str, config: dict[str, Any]) -> str:
    """The original-layout name of a diffusers ``AutoencoderKL`` tensor name (decoder stages in reverse order)."""
    m = re.match(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)", key)
    if m:
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}"
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key)
    if m:
        if m[3] is None:
            return f"encoder.down.{m[1]}.downsample.{m[4]}"
        return f"encoder.down.{m[1]}.block.{m[3]}.{_resnet(m[4], _VAE_RESNET)}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
    if m:
        stage = len(config["up_block_types"]) - 1 - int(m[1])
        if m[3] is None:
            return f"decoder.up.{stage}.upsample.{m[4]}"
        return f"decoder.up.{stage}.block.{m[3]}.{_resnet(m[4], _VAE_RESNET)}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets\.(\d+)|attentions\.0)\.(.+)", key)
    if m:
        if m[3] is not None:
            return f"{m[1]}.mid.block_{int(m[3]) + 1}.{_resnet(m[4], _VAE_RESNET)}"
        return f"{m[1]}.mid.attn_1.{_resnet(m[4], _VAE_ATTN)}"
    raise UserError(f"VAE tensor {key} has no place in the Stable Diffusion single-file layout")


def _unet_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, Any], layout: str = "comfyui") -> dict[str, torch.Tensor]:
    return {UNET + unet_key(k, config, layout): v for k, v in sd.items()}


def _vae_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        new = vae_key(k, config)
        if ".mid.attn_1." in new and new.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE + new] = v
    return out


def _text_to_ldm(sd: dict[str, torch.Tensor], text_config: Any, clip: str = CLIP,
                 openclip: str = OPENCLIP) -> dict[str, torch.Tensor]:
    """OpenAI CLIP layout (SD-v1, SDXL's first encoder; ``quick_gelu``) under ``clip``, or OpenCLIP layout (SD-v2,
    SDXL's second encoder; ``gelu``, fused q/k/v, the projection transposed) under ``openclip``."""
    sd = {k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k: v
          for k, v in sd.items() if not k.endswith("position_ids")}
    if text_config.hidden_act == "quick_gelu":
        return {clip + k: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    for k, v in sd.items():
        if k in fixed:
            out[openclip + fixed[k]] = v
        elif k == "text_projection.weight":
            out[openclip + "text_projection"] = v.T.contiguous()
    for i in range(text_config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{openclip}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for new, old in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{new}.{kind}"] = sd[f"{src}{old}.{kind}"]
    return out


def _check_round_trip(name: str, ours: dict[str, torch.Tensor], back: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``ours`` (diffusers names) must come back from diffusers' converter, unchanged."""
    missing = sorted(set(ours) - set(back))
    extra = sorted(set(back) - set(ours))
    changed = [k for k in ours if k in back and not torch.equal(ours[k], back[k].reshape(ours[k].shape))]
    if missing or extra or changed:
        raise UserError(f"the single-file layout of the {name} does not read back through diffusers' converter "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}, changed {changed[:3]}); please report it")


def _check_text(name: str, text, state: dict[str, torch.Tensor], clip: str, openclip: str) -> None:
    from diffusers.loaders import single_file_utils as sf

    if text.config.hidden_act == "quick_gelu":
        back = sf.convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(clip)})
    else:
        back = sf.convert_open_clip_checkpoint(text, state, prefix=openclip)
    if not hasattr(text, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
    _check_round_trip(name, {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")},
                      {k: v for k, v in back.items() if not k.endswith("position_ids")})


def single_file_state(parts: dict[str, Any], layout: str = "comfyui") -> dict[str, torch.Tensor]:
    """The original-layout state dict of loaded ``unet``, ``vae`` and ``text_encoder`` (SDXL: and
    ``text_encoder_2``, under ``conditioner.embedders.0/1``; the size conditioning as ``label_emb``), checked
    against diffusers' single-file converters; ``layout`` (:data:`LAYOUTS`) numbers the U-Net's blocks."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sf

    unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
    ucfg = dict(unet.config)
    if not isinstance(ucfg["layers_per_block"], int):
        raise UserError(f"this U-Net keeps different block counts per stage ({ucfg['layers_per_block']}); the "
                        "single-file layout (and every runtime reading it) assumes one count for all stages; "
                        "export --format diffusers-fp16 instead")
    if layout == "sd-cpp" and (why := sd_cpp_refusal(ucfg)):
        raise UserError(why)
    xl = ucfg.get("addition_embed_type") == "text_time"
    if (ucfg.get("addition_embed_type") and not xl) or ucfg.get("class_embed_type"):
        raise UserError("single-file export covers SD-v1/v2 and SDXL U-Nets; this one has other added conditioning")
    if xl and parts.get("text_encoder_2") is None:
        raise UserError("an SDXL single file needs the pipeline's text_encoder_2")
    if not isinstance(vae, AutoencoderKL):
        raise UserError(f"the VAE is a {type(vae).__name__}, which has no Stable Diffusion single-file layout (the "
                        "mini world's is parameter-free); export --format diffusers-fp16 instead")
    encoders = [("text encoder", text, XL_CLIP if xl else CLIP, OPENCLIP)]
    if xl:
        encoders.append(("second text encoder", parts["text_encoder_2"], XL_CLIP, XL_OPENCLIP))
        if text.config.hidden_act != "quick_gelu" or parts["text_encoder_2"].config.hidden_act != "gelu":
            raise UserError("SDXL's single file holds an OpenAI CLIP first and an OpenCLIP second text encoder; this "
                            "pipeline's differ")
    for _, enc, _, _ in encoders:
        if enc.config.hidden_act not in ("quick_gelu", "gelu"):
            raise UserError(f"text encoder with {enc.config.hidden_act} activations is neither OpenAI CLIP nor OpenCLIP")
    u_sd, v_sd = unet.state_dict(), vae.state_dict()
    state = {**_unet_to_ldm(u_sd, ucfg, layout), **_vae_to_ldm(v_sd, dict(vae.config))}
    for _, enc, clip, openclip in encoders:
        state.update(_text_to_ldm(enc.state_dict(), enc.config, clip, openclip))

    # diffusers' converter reads the dense numbering: the gapped one is renamed back to it first, name for name
    names = {UNET + unet_key(k, ucfg, layout): UNET + unet_key(k, ucfg) for k in u_sd}
    if len(names) != len(u_sd):
        raise UserError(f"the {layout} numbering gives two U-Net tensors one name; please report it")
    dense = {names.get(k, k): v for k, v in state.items()}
    _check_round_trip("U-Net", u_sd, sf.convert_ldm_unet_checkpoint(dense, ucfg))
    _check_round_trip("VAE", v_sd, sf.convert_ldm_vae_checkpoint(state, dict(vae.config)))
    for name, enc, clip, openclip in encoders:
        _check_text(name, enc, state, clip, openclip)
    return state


def export(model: str | Path, out: str | Path, fmt: str = "single-file", dtype: str = "fp16",
           overwrite: bool = False, layout: str = "comfyui", decoder: str | None = None) -> dict[str, Any]:
    """Write ``model`` (a pipeline folder or hub id) as a single ``.safetensors`` (``fmt="single-file"``, blocks
    numbered per ``layout``: :data:`LAYOUTS`) or as a diffusers folder in half precision
    (``fmt="diffusers-fp16"``; ``decoder``: an ``AutoencoderTiny`` folder shipped as its ``vae``). Returns what
    was written."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if decoder and fmt != "diffusers-fp16":
        raise UserError("--decoder ships a tiny decoder in a diffusers folder: use it with --format diffusers-fp16")
    from bksdm.models import DTYPES, import_own_components, load_components, pipeline_folder, refuse_transformer
    from bksdm.pipelines import load_record

    out = check_output(out, "folder" if fmt == "diffusers-fp16" else "file")
    folder = pipeline_folder(str(model)) if fmt != "kohya" else Path(model)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if fmt == "kohya":
        return _export_kohya(Path(model), out)
    refuse_transformer(folder, "export", "no round trip through the original layouts is tested")
    import_own_components(folder)
    if fmt == "diffusers-fp16":
        return _export_fp16(folder, out, decoder)
    if fmt != "single-file":
        raise UserError(f"--format {fmt!r} is not one of single-file, diffusers-fp16")
    from safetensors.torch import save_file

    from bksdm.models import pipeline_family

    parts = load_components(folder, ("unet", "vae", *pipeline_family(folder).text_components[1::2]))
    state = single_file_state(parts, layout)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    student = load_record(folder) is not None
    removed = _removed(folder) if student else []
    meta = {"format": "pt", "bksdm.source": str(model), "bksdm.layout": layout, "bksdm.unet_config": json.dumps({k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}),
            "bksdm.removed_blocks": json.dumps(removed),  # null: a student whose teacher is not readable here
            "bksdm.note": ("SD's gapped block numbering for stable-diffusion.cpp only; ComfyUI and diffusers read the "
                           "default layout" if layout == "sd-cpp" else
                           "block-removed U-Net: load with the diffusers config of its folder "
                           "(from_single_file(..., config=FOLDER)); runtimes that assume SD's block counts will not "
                           "find the removed blocks" if student else "a pipeline without a bksdm record")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)  # a killed export leaves no half-written file under the final name
    return {"out": str(out), "format": fmt, "layout": layout, "dtype": dtype, "tensors": len(state),
            "removed_blocks": removed, "bytes": out.stat().st_size}


def _export_kohya(lora: Path, out: Path) -> dict[str, Any]:
    """A bksdm (diffusers-format) SD-v1/v2 LoRA file rewritten in kohya's key names (:func:`bksdm.lora.to_kohya`)."""
    from safetensors.torch import load_file, save_file

    from bksdm.errors import reading
    from bksdm.lora import to_kohya

    lora = lora / "pytorch_lora_weights.safetensors" if lora.is_dir() else lora
    if not lora.is_file():
        raise UserError(f"LoRA file {lora} does not exist")
    with reading(lora, "LoRA file", "pass the pytorch_lora_weights.safetensors a bksdm dreambooth or lcm run wrote"):
        state = load_file(str(lora))
    kohya = to_kohya(state)
    tmp = out.with_name(out.name + ".tmp")
    save_file(kohya, str(tmp), metadata={"format": "pt", "bksdm.source": str(lora), "ss_network_module": "networks.lora"})
    tmp.replace(out)
    return {"out": str(out), "format": "kohya", "tensors": len(kohya), "bytes": out.stat().st_size}


def _removed(folder: Path) -> list[str] | None:
    """The teacher blocks a student lacks (``down_blocks.1.resnets.1``, ``mid_block``, a whole stage), from
    ``bksdm inspect``; None when unknown (no record, or its teacher cannot be read here)."""
    from bksdm.inspection import inspect_student

    try:
        info = inspect_student(str(folder))
    except UserError:
        return None
    out = []
    for row in info["stages"]:
        if row["student_stage"] is None or row["stage"] == "mid_block" and row["student_blocks"] == 0:
            out.append(row["stage"])
        elif row["removed"] is None:
            return None
        else:
            out += [f"{row['stage']}.{b}" for b in row["removed"]]
    return out


def _export_fp16(folder: Path, out: Path, decoder: str | None = None) -> dict[str, Any]:
    """Every component with floating-point weights saved in fp16; tokenizer, scheduler, record and card copied.
    ``decoder``: an ``AutoencoderTiny`` folder (:func:`bksdm.fast.load_decoder`) saved as the pipeline's ``vae``
    (diffusers pipelines load it in the VAE's place; the record and the card say so)."""
    from diffusers import DiffusionPipeline

    from bksdm.fast import load_decoder

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16, safety_checker=None)
    if decoder:
        pipe.vae = load_decoder(decoder, pipe.unet, pipe.vae).to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for extra in ("bksdm.json", "README.md", "samples.png"):
        if (folder / extra).is_file():
            shutil.copy2(folder / extra, tmp / extra)
    if decoder:
        said = (f"Its `vae` is the tiny decoder `{decoder}` (AutoencoderTiny, {sum(p.numel() for p in pipe.vae.decoder.parameters()):,} "
                f"decoder parameters) in place of the VAE of `{folder}`, which this folder does not hold.")
        if (tmp / "bksdm.json").is_file():
            rec = json.loads((tmp / "bksdm.json").read_text())
            (tmp / "bksdm.json").write_text(json.dumps({**rec, "decoder": {"class": "AutoencoderTiny", "source": str(decoder)}}, indent=1))
        card = tmp / "README.md"
        card.write_text((card.read_text() + "\n" if card.is_file() else "") + f"## Decoder\n\n{said}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "format": "diffusers-fp16", "bytes": size}
