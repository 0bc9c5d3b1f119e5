"""`bksdm inspect`: which blocks a student kept and removed relative to its teacher, stage by stage, with parameters
and MACs per stage (paper convention: convolutions and linear layers, attention-score products excluded).

From ``bksdm.json`` when the folder has one (the spec names every removed block), else by matching the two U-Net
configs (then only the block counts per stage are known, not which of a stage's blocks were kept).
"""

from __future__ import annotations

from typing import Any

import torch

from bksdm.arch.derive import meta_unet
from bksdm.errors import UserError

STAGE_PARTS = ("resnets", "attentions")


def _stage_gmacs(unet, config: dict[str, Any]) -> dict[str, float]:
    """GMACs per top-level stage (``down_blocks.0``, ``mid_block``, ...) of one U-Net call at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    from bksdm.arch.families import family_of

    size = config["sample_size"]
    family = family_of(config)
    with torch.device("meta"):
        x, t = torch.zeros(1, config["in_channels"], size, size), torch.full((1,), 500)
        cond = family.unet_kwargs(family.dummy_conditioning(config, 1, "meta", torch.float32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, **cond)
    out = {}
    for name, ops in counter.get_flop_counts().items():
        stage = name.split(".", 1)[1] if "." in name else name
        counts = {str(k): v for k, v in ops.items()}
        out[stage] = (sum(counts.values()) - counts.get("aten.bmm", 0)) / 2e9  # bmm on meta: the score products
    return out


def _stages(unet) -> list[tuple[str, Any]]:
    stages = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        stages.append(("mid_block", unet.mid_block))
    return stages + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]


def _layers(stage) -> int:
    """Transformer layers in a stage's attention blocks (SDXL stacks up to ten per block)."""
    return sum(len(a.transformer_blocks) for a in (getattr(stage, "attentions", None) or []))


def _blocks(stage) -> list[str]:
    return [f"{part}.{j}" for part in STAGE_PARTS for j in range(len(getattr(stage, part, None) or []))]


def inspect_student(model: str, teacher: str | None = None) -> dict[str, Any]:
    """The stage table of ``model`` against its teacher: one row per teacher stage (kept, removed, params, GMACs)."""
    from bksdm.hub import read_unet_config, resolve_model
    from bksdm.pipelines import derivation_for, load_record
    from bksdm.profile import count_params

    folder = resolve_model(model, "model")
    from bksdm.pipelines import read_transformer_config

    if read_transformer_config(folder) is not None:
        return inspect_transformer(folder, str(model), teacher)
    student_cfg, _ = read_unet_config(folder)
    record = load_record(folder)
    source = teacher or (record or {}).get("teacher")
    if not source:
        raise UserError(f"{model} has no bksdm.json naming its teacher; pass --teacher (the pipeline it came from)")
    try:
        teacher_cfg, _ = read_unet_config(resolve_model(str(source), "teacher"))
    except UserError as exc:
        raise UserError(f"{exc} (the teacher named in {folder / 'bksdm.json'}; pass --teacher to use another)") from None
    t_unet, s_unet = meta_unet(teacher_cfg), meta_unet(student_cfg)
    t_macs, s_macs = _stage_gmacs(t_unet, teacher_cfg), _stage_gmacs(s_unet, student_cfg)
    # teacher stage -> student stage: the down path keeps its outer stages, the up path loses its innermost ones
    dropped = len(t_unet.up_blocks) - len(s_unet.up_blocks)
    match = {f"down_blocks.{i}": f"down_blocks.{i}" for i in range(len(s_unet.down_blocks))}
    match |= {f"up_blocks.{i + dropped}": f"up_blocks.{i}" for i in range(len(s_unet.up_blocks))}
    if s_unet.mid_block is not None:
        match["mid_block"] = "mid_block"
    mapped: dict[str, str] | None = None
    if record is not None:
        mapped = {t: s for s, t in derivation_for(teacher_cfg, str(folder)).module_map}
    student_stages = dict(_stages(s_unet))
    rows = []
    for name, stage in _stages(t_unet):
        s_name = match.get(name)
        t_blocks = _blocks(stage)
        s_blocks = _blocks(student_stages[s_name]) if s_name else []
        if mapped is not None:
            kept = [b for b in t_blocks if f"{name}.{b}" in mapped] if name != "mid_block" else (t_blocks if name in mapped else [])
            removed = [b for b in t_blocks if b not in kept]
        else:
            kept, removed = None, None
        rows.append({
            "stage": name, "student_stage": s_name, "teacher_blocks": len(t_blocks), "student_blocks": len(s_blocks),
            "kept": kept, "removed": removed,
            "teacher_layers": _layers(stage), "student_layers": _layers(student_stages[s_name]) if s_name else 0,
            "attention_blocks": (sum(b.startswith("attentions") for b in t_blocks), sum(b.startswith("attentions") for b in s_blocks)),
            "teacher_params": count_params(stage), "student_params": count_params(student_stages[s_name]) if s_name else 0,
            "teacher_gmacs": t_macs.get(name, 0.0), "student_gmacs": s_macs.get(s_name, 0.0) if s_name else 0.0,
        })
    return {"model": str(model), "teacher": str(source), "from_record": record is not None,
            "spec": (record or {}).get("spec", {}).get("name"), "stages": rows,
            "chosen_by_measurement": (record or {}).get("chosen_by_measurement"),
            "unet_params": {"teacher": count_params(t_unet), "student": count_params(s_unet)},
            "unet_gmacs": {"teacher": t_macs["Global"], "student": s_macs["Global"]}}


def format_inspection(info: dict[str, Any]) -> str:
    """The stage table in Markdown, with totals and where the names came from (a transformer's block-list table:
    :func:`format_transformer`)."""
    if "block_lists" in info:
        return format_transformer(info)
    lines = [f"{info['model']} vs teacher {info['teacher']}" + (f" (spec {info['spec']})" if info["spec"] else ""),
             "", "| stage | blocks (teacher -> student) | removed | params (teacher -> student) | GMACs |",
             "|---|---|---|---:|---:|"]
    for r in info["stages"]:
        removed = ("all" if r["student_stage"] is None else ", ".join(r["removed"]) or "-") if r["removed"] is not None \
            else (f"{r['teacher_blocks'] - r['student_blocks']} of {r['teacher_blocks']}" if r["student_stage"] else "all")
        deep = (r["teacher_layers"], r["student_layers"]) != tuple(r["attention_blocks"])  # more than one layer per block
        layers = f" (transformer layers {r['teacher_layers']} -> {r['student_layers']})" if deep else ""
        lines.append(f"| {r['stage']} | {r['teacher_blocks']} -> {r['student_blocks']}{layers} | {removed} | "
                     f"{r['teacher_params']:,} -> {r['student_params']:,} | {r['teacher_gmacs']:.3f} -> {r['student_gmacs']:.3f} |")
    p, g = info["unet_params"], info["unet_gmacs"]
    lines += ["", f"U-Net: {p['teacher']:,} -> {p['student']:,} parameters, {g['teacher']:.3f} -> {g['student']:.3f} "
              f"GMACs per call at batch 1 (attention-score products excluded)."]
    if not info["from_record"]:
        lines.append("No bksdm.json: matched by config, so only how many blocks each stage lost is known.")
    if info.get("chosen_by_measurement"):
        from bksdm.cards import chosen_lines

        lines += [""] + chosen_lines(info["chosen_by_measurement"])
    return "\n".join(lines)


def _block_gmacs(config: dict[str, Any]) -> dict[str, float]:
    """GMACs of each block (``transformer_blocks.3``) and of the whole call (``Global``) of a transformer at its
    default size (SD3: ``sample_size`` latents; FLUX: 1024 px), 256 text tokens, batch 1, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from bksdm.arch import dit

    model = dit.meta_model(config)
    inputs = dit.dummy_inputs(config, 8 * config.get("sample_size", 128), TEXT_TOKENS)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    out = {}
    for name, ops in counter.get_flop_counts().items():
        counts = {str(k): v for k, v in ops.items()}
        out[name.split(".", 1)[1] if "." in name else name] = (sum(counts.values()) - counts.get("aten.bmm", 0)) / 2e9
    return out


TEXT_TOKENS = 256
"""Text tokens of the transformer calls whose MACs inspect counts."""


def inspect_transformer(folder, model: str, teacher: str | None = None) -> dict[str, Any]:
    """The block-list table of a transformer student (``transformer/``) against its teacher: per list the kept and
    removed teacher blocks (from ``bksdm.json``), parameters and GMACs."""
    from bksdm.arch import dit
    from bksdm.hub import resolve_model
    from bksdm.pipelines import derivation_for, load_record, read_transformer_config

    student_cfg, _ = read_transformer_config(folder)
    record = load_record(folder)
    source = teacher or (record or {}).get("teacher")
    if not source or record is None:
        raise UserError(f"{model} has no bksdm.json naming its teacher and its kept blocks; inspect needs a transformer "
                        f"student written by bksdm compress")
    found = read_transformer_config(resolve_model(str(source), "teacher"))
    if found is None:
        raise UserError(f"teacher {source} has no SD3/FLUX transformer; pass --teacher (the pipeline it came from)")
    teacher_cfg = found[0]
    kept = dict(dit.DiTSpec.from_dict(record["spec"]).kept(teacher_cfg))
    derivation_for(teacher_cfg, str(folder))  # the record still derives on this teacher (key map asserted)
    t_model, s_model = dit.meta_model(teacher_cfg), dit.meta_model(student_cfg)
    t_macs, s_macs = _block_gmacs(teacher_cfg), _block_gmacs(student_cfg)
    from bksdm.profile import count_params

    rows = []
    for name, n in dit.block_counts(teacher_cfg).items():
        idx = kept[name]
        rows.append({"list": name, "teacher_blocks": n, "student_blocks": len(idx), "kept": idx,
                     "removed": [i for i in range(n) if i not in idx],
                     "teacher_params": count_params(getattr(t_model, name)),
                     "student_params": count_params(getattr(s_model, name)),
                     "teacher_gmacs": sum(t_macs.get(f"{name}.{i}", 0.0) for i in range(n)),
                     "student_gmacs": sum(s_macs.get(f"{name}.{j}", 0.0) for j in range(len(idx)))})
    return {"model": model, "teacher": str(source), "from_record": True, "spec": record["spec"].get("name"),
            "backbone": teacher_cfg["_class_name"], "block_lists": rows,
            "chosen_by_measurement": record.get("chosen_by_measurement"),
            "transformer_params": {"teacher": count_params(t_model), "student": count_params(s_model)},
            "transformer_gmacs": {"teacher": t_macs["Global"], "student": s_macs["Global"]}}


def format_transformer(info: dict[str, Any]) -> str:
    """The block-list table of :func:`inspect_transformer` in Markdown."""
    lines = [f"{info['model']} vs teacher {info['teacher']} ({info['backbone']}, spec {info['spec']})", "",
             "| block list | blocks (teacher -> student) | kept | removed | params (teacher -> student) | GMACs |",
             "|---|---|---|---|---:|---:|"]
    for r in info["block_lists"]:
        lines.append(f"| {r['list']} | {r['teacher_blocks']} -> {r['student_blocks']} | {', '.join(map(str, r['kept']))} | "
                     f"{', '.join(map(str, r['removed'])) or '-'} | {r['teacher_params']:,} -> {r['student_params']:,} | "
                     f"{r['teacher_gmacs']:.3f} -> {r['student_gmacs']:.3f} |")
    p, g = info["transformer_params"], info["transformer_gmacs"]
    lines += ["", f"Transformer: {p['teacher']:,} -> {p['student']:,} parameters, {g['teacher']:.3f} -> "
              f"{g['student']:.3f} GMACs per call at batch 1 with {TEXT_TOKENS} text tokens (attention-score products "
              f"excluded)."]
    if info.get("chosen_by_measurement"):
        from bksdm.cards import chosen_lines

        lines += [""] + chosen_lines(info["chosen_by_measurement"])
    return "\n".join(lines)
