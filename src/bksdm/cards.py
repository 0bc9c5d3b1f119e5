"""Model cards for the pipelines bksdm writes (``README.md`` beside ``model_index.json``), through huggingface_hub's
model-card API as diffusers' training examples write theirs: metadata the hubs index (library, pipeline tag, base
model, tags) and a body that says which blocks were removed, what it saved and how the student was trained."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

BLOCK = re.compile(r"^(down_blocks|up_blocks)\.\d+\.(resnets|attentions)\.\d+$|^mid_block$")
"""The units block removal works on: one residual or attention block of a stage, or the whole mid-block."""


def removed_blocks(teacher_config: dict[str, Any], module_map: list[list[str]]) -> list[str]:
    """Teacher blocks (``down_blocks.1.resnets.1``, ``mid_block``, ...) that no student block was copied from;
    ``module_map`` holds the derivation's (student module, teacher module) pairs."""
    from bksdm.arch.derive import meta_unet

    teacher = meta_unet(teacher_config)
    kept = {t for _, t in module_map}  # (student module, teacher module) pairs
    return [name for name, _ in teacher.named_modules() if BLOCK.match(name) and name not in kept]


_MID = {True: "kept", False: "removed", "resnets": "kept without its attention"}


def write_model_card(folder: str | Path, record: dict[str, Any], teacher_config: dict[str, Any],
                     params: dict[str, int], training: dict[str, Any] | None = None,
                     metrics: dict[str, float] | None = None, samples: str | None = None) -> Path:
    """``folder/README.md`` for a student pipeline: ``record`` is its ``bksdm.json`` (spec, module map, teacher),
    ``teacher_config`` the teacher denoiser's ``config.json`` (a U-Net's, or an SD3 / FLUX transformer's with its
    ``_class_name``), ``params`` the denoiser parameter counts (``teacher_unet`` / ``student_unet``, or
    ``teacher_transformer`` / ``student_transformer``), ``training`` what the recipe ran (steps, data, loss weights,
    ...), ``metrics`` any measured scores, ``samples`` an image file in ``folder``."""
    from huggingface_hub import ModelCard, ModelCardData

    from bksdm.arch import dit

    spec = record["spec"]
    transformer = dit.is_transformer(teacher_config)
    teacher = str(record.get("teacher", ""))
    family_tags = ({"SD3Transformer2DModel": ["stable-diffusion-3"], "FluxTransformer2DModel": ["flux"]}
                   .get(teacher_config.get("_class_name", ""), [])
                   + (["stable-diffusion-xl"] if teacher_config.get("addition_embed_type") == "text_time" else []))
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license=None,
                         base_model=teacher if re.match(r"^[\w.-]+/[\w.-]+$", teacher) else None,
                         tags=["bk-sdm", "knowledge-distillation", "block-removal",
                               *([] if transformer else ["stable-diffusion"]), "text-to-image", "diffusers",
                               f"bksdm-{spec['name']}"] + family_tags)
    what = f"{teacher_config['_class_name']} transformer" if transformer else "Stable Diffusion U-Net"
    lines = [
        f"# {spec['name']} student of {teacher or 'its teacher'}",
        "",
        f"A block-removed, knowledge-distilled {what} (BK-SDM, \"On Architectural Compression of "
        "Text-to-Image Diffusion Models\"), made with bksdm. It loads in plain diffusers:",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_HUB_ID\")",
        "```",
        "",
        "## Architecture",
        "",
        *(transformer_lines(spec, teacher_config, params) if transformer else unet_lines(record, teacher_config, params)),
        "- Student initialised from the teacher's weights (every student tensor from one teacher tensor of the same "
        "shape); feature-distillation pairs (teacher -> student): " + ", ".join(f"`{a}` -> `{b}`" for a, b in record.get("layer_pairs", [])) + ".",
    ]
    if record.get("chosen_by_measurement"):
        lines += ["", "## Chosen by measurement", ""] + chosen_lines(record["chosen_by_measurement"])
    if training:
        lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in training.items()]
    if metrics:
        lines += ["", "## Measured", "", "| metric | value |", "|---|---:|"] + [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    if samples:
        lines += ["", "## Samples (teacher top row, student bottom row)", "", f"![samples]({samples})"]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def unet_lines(record: dict[str, Any], teacher_config: dict[str, Any], params: dict[str, int]) -> list[str]:
    """The architecture lines of a U-Net student: its spec, the removed teacher blocks, parameters."""
    spec, removed = record["spec"], removed_blocks(teacher_config, record["module_map"])
    t, s = params["teacher_unet"], params["student_unet"]
    return [
        f"- Block-removal spec `{spec['name']}`: down stages keep pairs {spec['down']}, mid-block "
        f"{_MID[spec['mid']]}, up stages keep {spec['up']}"
        + ("; transformer layers kept per stage (down, mid, up): "
           + ", ".join(json.dumps(spec["depth"][k]) for k in ("down", "mid", "up")) + " (null: all)" if spec.get("depth") else "")
        + ".",
        f"- Removed teacher blocks ({len(removed)}): " + (", ".join(f"`{b}`" for b in removed) or "none") + ".",
        f"- U-Net parameters: {s:,} (teacher {t:,}; {100 * (1 - s / t):.1f}% fewer).",
    ]


def transformer_lines(spec: dict[str, Any], teacher_config: dict[str, Any], params: dict[str, int]) -> list[str]:
    """The architecture lines of an SD3 / FLUX transformer student: kept and removed blocks of each block list (in
    the teacher's numbering), parameters."""
    from bksdm.arch import dit

    t, s = params["teacher_transformer"], params["student_transformer"]
    out = [f"- Depth-removal spec `{spec['name']}` (blocks in the teacher's numbering):"]
    for name, n in dit.block_counts(teacher_config).items():
        kept = spec["keep"].get(name, list(range(n)))
        gone = [i for i in range(n) if i not in kept]
        out.append(f"  - `{name}`: keeps {len(kept)} of {n} {kept}; removed: {gone or 'none'}.")
    out.append(f"- Transformer parameters: {s:,} (teacher {t:,}; {100 * (1 - s / t):.1f}% fewer).")
    return out


def chosen_lines(chosen: dict[str, Any]) -> list[str]:
    """What ``compress --student auto`` recorded, as Markdown lines: the budget, each removal in order, and the
    ranking it came from (most important unit first)."""
    steps = [f"{i + 1}. {'put back' if 'restored' in st else 'removed'} {st.get('removed') or st.get('restored')} "
             f"(rel. MSE {st['rel_mse']:.3g})" + (f", with what was left of it after {', '.join(st['includes'])}"
                                                  if st.get("includes") else "") for i, st in enumerate(chosen["steps"])]
    kind = chosen["budget"].split("=")[0]
    per = {"params": "parameter", "macs": "GMAC", "latency": "share of the U-Net's time"}.get(kind, kind)
    table = ["| unit | rel. MSE when bypassed | params saved |", "|---|---:|---:|"]
    table += [f"| {u['name']} | {u['rel_mse']:.3g} | {u['params_saved']:,} |" for u in chosen["units"]]
    return ([f"The spec was chosen by `bksdm compress --student auto --budget {chosen['budget']}` from the ranking "
             f"`{chosen['ranking']}` ({chosen['ranked_on']}): units removed greedily, least important per {per} saved "
             "first" + (", then the most important put back while the budget allows." if kind != "latency" else "."), ""] + steps
            + ["", "The ranking (`bksdm rank`: the teacher's prediction error with each unit bypassed, relative):", ""]
            + table)


def write_finetune_card(folder: str | Path, base: str, training: dict[str, Any], record: dict[str, Any] | None = None,
                        instance_prompt: str = "", kind: str = "DreamBooth fine-tune") -> Path:
    """``folder/README.md`` for a pipeline trained further from ``base`` (``kind``: a DreamBooth fine-tune, a
    latent consistency distillation): its base model, the subject's prompt if any, how it was trained and, for a
    bksdm student (``record``: its ``bksdm.json``), which spec it has."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["dreambooth" if instance_prompt else "latent-consistency", "stable-diffusion", "text-to-image", "diffusers"]
    if record:
        tags += ["bk-sdm", f"bksdm-{record['spec']['name']}"]
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
                         base_model=base if re.match(r"^[\w.-]+/[\w.-]+$", base) else None,
                         instance_prompt=instance_prompt or None)
    lines = [f"# {kind} of {base}", "",
             (f"Personalised with DreamBooth (made with bksdm); prompt the subject as \"{instance_prompt}\"."
              if instance_prompt else f"{kind} made with bksdm."), "",
             "```python", "from diffusers import DiffusionPipeline",
             "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_HUB_ID\")", "```"]
    if record:
        lines += ["", f"The base is a block-removed BK-SDM student (spec `{record['spec']['name']}`, teacher "
                      f"{record.get('teacher', 'unknown')}); `bksdm inspect` lists its removed blocks."]
    lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in training.items()]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def require_card(folder: str | Path) -> Path:
    """``folder/README.md``, or one line saying the folder has no model card."""
    from bksdm.errors import UserError

    path = Path(folder) / "README.md"
    if not path.is_file():
        raise UserError(f"{folder} has no model card (README.md) to add scores to; pass the folder of a bksdm "
                        f"student (distill, compress, dreambooth or lcm output)")
    return path


def add_measured(folder: str | Path, scores: dict[str, float], source: str = "") -> Path:
    """Put ``scores`` (metric key -> value, e.g. a ``bksdm evaluate`` result) into the ``## Measured`` table of
    ``folder/README.md`` (a card written by :func:`write_model_card` or :func:`write_finetune_card`): a metric
    already listed gets its new value, others are added; ``source`` (what was scored) becomes a note below."""
    path = require_card(folder)
    lines = path.read_text().rstrip("\n").split("\n")
    head = ["## Measured", "", "| metric | value |", "|---|---:|"]
    if "## Measured" in lines:
        start = lines.index("## Measured")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section, lines = lines[start:end], lines[:start] + lines[end:]
    else:
        start, section = len(lines), head
    rows = {m.group(1): m.group(0) for m in (re.match(r"^\| (.+?) \| .* \|$", ln) for ln in section) if m}
    rows.pop("metric", None)
    for k, v in scores.items():
        rows[k] = f"| {k} | {v:.4g} |"
    notes = [ln for ln in section if ln.startswith("Scored on ")] + ([f"Scored on {source}."] if source else [])
    block = head + list(rows.values()) + ([""] + list(dict.fromkeys(notes)) if notes else []) + [""]
    if start and lines[start - 1].strip():  # a heading needs a blank line above it
        block = [""] + block
    lines = lines[:start] + block + lines[start:]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path
