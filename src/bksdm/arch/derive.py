"""Everything a block-removal spec implies for one teacher, derived in one place.

From a teacher U-Net config and a :class:`BlockSpec` we derive

* the student's diffusers config (``UNet2DConditionModel.from_config`` builds it, any pipeline loads it),
* the module map (student module <- teacher module) and from it the state-dict key map, checked so that every
  student tensor receives exactly one teacher tensor of identical shape,
* the feature-KD layer pairs (teacher module name, student module name) that distillation hooks: block outputs
  (BK-SDM) and the self-attention layers of the kept transformer layers (KOALA).

Because all three come from the same stage/pair bookkeeping, they cannot drift apart.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from bksdm.arch.spec import BlockSpec
from bksdm.errors import UserError

SUPPORTED = ("SD-v1.x, SD-v2.x-base, SD-v2.x, SDXL and U-Nets of the same block layout (CrossAttn/plain down and up "
             "stages, any transformer depth)")
_DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}
_MID_TYPES = {"UNetMidBlock2DCrossAttn", None}
# Config keys holding one value per stage, in down-stage order (diffusers reverses them for the up path).
_PER_STAGE_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
)


@dataclass
class Derivation:
    """The student a spec yields for one teacher: config, weight map and feature-KD pairs."""

    spec: BlockSpec  # a bksdm.arch.dit.DiTSpec for a transformer teacher (same to_dict / record contract)
    teacher_config: dict[str, Any]
    student_config: dict[str, Any]
    module_map: list[tuple[str, str]]  # (student module, teacher module), block-level
    layer_pairs: list[tuple[str, str]]  # (teacher module, student module) whose outputs feature-KD matches
    attn_pairs: list[tuple[str, str]] = field(default_factory=list)  # self-attention (attn1) of kept layers
    key_map: dict[str, str] = field(default_factory=dict)  # student tensor key -> teacher tensor key
    unused_teacher_keys: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """A JSON-serialisable account of the derivation (written next to a compressed model)."""
        return {
            "spec": self.spec.to_dict(),
            "module_map": [list(p) for p in self.module_map],
            "layer_pairs": [list(p) for p in self.layer_pairs],
            "attn_pairs": [list(p) for p in self.attn_pairs],
            "key_map": self.key_map,
            "unused_teacher_keys": self.unused_teacher_keys,
        }


def check_teacher_config(cfg: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless ``cfg`` is an SD-v1/v2-style ``UNet2DConditionModel`` config."""
    problems = []
    cls = cfg.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        problems.append(f"class {cls}")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg['addition_embed_type']!r}")
    down, up = cfg.get("down_block_types", []), cfg.get("up_block_types", [])
    if bad := [t for t in down if t not in _DOWN_TYPES]:
        problems.append(f"down blocks {bad}")
    if bad := [t for t in up if t not in _UP_TYPES]:
        problems.append(f"up blocks {bad}")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in _MID_TYPES:
        problems.append(f"mid block {cfg.get('mid_block_type')}")
    if not down or len(down) != len(up):
        problems.append("unequal numbers of down and up stages")
    for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        value = cfg.get(key)
        if isinstance(value, (list, tuple)) and len(value) != len(down):
            problems.append(f"{key} has {len(value)} entries for {len(down)} stages")
    if problems:
        raise UserError(f"teacher U-Net is not SD-v1/v2/XL style ({'; '.join(problems)}); supported: {SUPPORTED}")


def teacher_depths(cfg: dict[str, Any]) -> tuple[list[list[int]], int, list[list[int]]]:
    """Transformer layers per attention block of a teacher, as diffusers builds it: (per down stage, one count per
    block), the mid-block's count, (per up stage, one count per block). Plain stages hold zeros."""
    n, layers = len(cfg["down_block_types"]), stage_layers(cfg)
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    rev = cfg.get("reverse_transformer_layers_per_block") or list(reversed(tl))

    def expand(entry: Any, count: int) -> list[int]:
        return [entry] * count if isinstance(entry, int) else list(entry)

    down = [expand(tl[i], layers[i]) if "CrossAttn" in cfg["down_block_types"][i] else [0] * layers[i] for i in range(n)]
    up = [expand(rev[u], layers[n - 1 - u] + 1) if "CrossAttn" in cfg["up_block_types"][u] else [0] * (layers[n - 1 - u] + 1)
          for u in range(n)]
    mid = tl[-1] if isinstance(tl[-1], int) else tl[-1][0]  # diffusers gives the mid-block the innermost stage's depth
    return down, mid, up


def stage_layers(cfg: dict[str, Any]) -> list[int]:
    """(ResBlock, attention) pairs per down stage of a teacher config (``layers_per_block``, one value or one per stage)."""
    lpb = cfg.get("layers_per_block", 2)
    n = len(cfg["down_block_types"])
    return list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n


def _validate(spec: BlockSpec, cfg: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Check the spec against the teacher; return the kept down-stage and up-stage indices."""
    n = len(cfg["down_block_types"])
    layers = stage_layers(cfg)
    where = f"spec {spec.name!r}"
    if len(spec.down) != n or len(spec.up) != n:
        raise UserError(f"{where} lists {len(spec.down)} down and {len(spec.up)} up stages; the teacher has {n} of each")
    for kind, stages, limit in (("down", spec.down, lambda i: layers[i]), ("up", spec.up, lambda i: layers[n - 1 - i] + 1)):
        for i, st in enumerate(stages):
            if st is None:
                continue
            if list(st) != sorted(set(st)):
                raise UserError(f"{where}: {kind}[{i}] = {list(st)}; list each kept pair once, in increasing order")
            if st[0] < 0 or st[-1] >= limit(i):
                raise UserError(
                    f"{where}: {kind}[{i}] keeps pair {st[-1] if st[-1] >= limit(i) else st[0]} but teacher {kind} stage {i} "
                    f"has pairs 0..{limit(i) - 1}"
                )
    kept_down = [i for i, st in enumerate(spec.down) if st is not None]
    kept_up = [i for i, st in enumerate(spec.up) if st is not None]
    n_drop = n - len(kept_down)
    if not kept_down:
        raise UserError(f"{where} drops every stage; keep at least the outermost one")
    if kept_down != list(range(n - n_drop)) or kept_up != list(range(n_drop, n)):
        raise UserError(
            f"{where}: only the innermost stages can be dropped, the same number on both paths "
            f"(down stages {n - n_drop}..{n - 1} and up stages 0..{n_drop - 1}); skip connections need the others"
        )
    for d in kept_down:
        u = n - 1 - d
        if len(spec.up[u]) != len(spec.down[d]) + 1:
            raise UserError(
                f"{where}: up stage {u} keeps {len(spec.up[u])} pairs but its mirrored down stage {d} keeps "
                f"{len(spec.down[d])}; skip connections need exactly one more pair in the up stage"
            )
    if spec.mid and cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise UserError(f"{where} keeps the mid-block but the teacher has none; set mid: false")
    if spec.mid == "resnets" and cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise UserError(f"{where} keeps the mid-block's ResBlocks only; that needs a teacher mid-block with attention")
    return kept_down, kept_up


def _kept_layers(spec: BlockSpec, cfg: dict[str, Any], kept_down: list[int], kept_up: list[int]):
    """Teacher transformer-layer indices each kept attention block keeps: ``{(path, student stage, block): [k, ...]}``
    for 'down_blocks'/'up_blocks', and the mid-block's list. Checked against the teacher's depths."""
    t_down, t_mid, t_up = teacher_depths(cfg)
    where = f"spec {spec.name!r}"
    out: dict[tuple[str, int, int], list[int]] = {}
    for path, kept, stages, depths, types in (("down", kept_down, spec.down, t_down, cfg["down_block_types"]),
                                                ("up", kept_up, spec.up, t_up, cfg["up_block_types"])):
        for s, t in enumerate(kept):
            for j, k in enumerate(stages[t]):
                chosen = spec.stage_depth(path, t, j)
                if "CrossAttn" not in types[t]:
                    if chosen is not None:
                        raise UserError(f"{where}: depth {path}[{t}] names layers but stage {t} has no attention blocks")
                    continue
                out[(f"{path}_blocks", s, j)] = _check_layers(chosen, depths[t][k], f"{where}: depth {path}[{t}] block {j}")
    mid = None
    if spec.mid is True:
        mid = _check_layers(spec.depth["mid"] if spec.depth else None, t_mid, f"{where}: depth mid")
    elif spec.depth and spec.depth["mid"] is not None:
        raise UserError(f"{where} names mid-block layers but drops the mid-block or its attention")
    return out, mid


def _check_layers(chosen: tuple[int, ...] | None, depth: int, where: str) -> list[int]:
    if chosen is None:
        return list(range(depth))
    if list(chosen) != sorted(set(chosen)) or chosen[0] < 0 or chosen[-1] >= depth:
        raise UserError(f"{where} = {list(chosen)}; list layers of 0..{depth - 1} once each, in increasing order")
    return list(chosen)


def _student_config(spec: BlockSpec, cfg: dict[str, Any], kept_down: list[int], kept_up: list[int]) -> dict[str, Any]:
    n = len(cfg["down_block_types"])
    out = {k: copy.deepcopy(v) for k, v in cfg.items() if not k.startswith("_")}
    for key in _PER_STAGE_KEYS:
        if isinstance(out.get(key), (list, tuple)) and len(out[key]) == n:
            out[key] = [out[key][i] for i in kept_down]
    out["down_block_types"] = [cfg["down_block_types"][i] for i in kept_down]
    out["up_block_types"] = [cfg["up_block_types"][i] for i in kept_up]
    counts = [len(spec.down[i]) for i in kept_down]
    out["layers_per_block"] = counts[0] if len(set(counts)) == 1 else counts
    if not spec.mid:
        out["mid_block_type"] = None
    elif spec.mid == "resnets":
        out["mid_block_type"] = "UNetMidBlock2D"  # diffusers builds it without attention inside this U-Net
    else:
        out["mid_block_type"] = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if isinstance(cfg.get("transformer_layers_per_block", 1), int) and spec.depth is None:
        return out  # one depth everywhere (SD-v1/v2): the teacher's value stands
    _student_depths(spec, cfg, kept_down, kept_up, out)
    return out


def _student_depths(spec: BlockSpec, cfg: dict[str, Any], kept_down: list[int], kept_up: list[int], out: dict[str, Any]) -> None:
    """Write ``transformer_layers_per_block`` (and ``reverse_transformer_layers_per_block`` when the up path is not
    the mirror of the down path) for the kept layers; the mid-block's depth is the innermost down stage's first
    block's in diffusers, so a spec must keep that many."""
    layers, mid = _kept_layers(spec, cfg, kept_down, kept_up)
    t_down, _, _ = teacher_depths(cfg)

    def compact(counts: list[int]) -> int | list[int]:
        return counts[0] if len(set(counts)) == 1 else counts

    down = []
    for s, t in enumerate(kept_down):
        if "CrossAttn" in cfg["down_block_types"][t]:
            down.append(compact([len(layers[("down_blocks", s, j)]) for j in range(len(spec.down[t]))]))
        else:
            down.append(max(1, t_down[t][0]))  # plain stage: diffusers ignores the value; keep a valid one
    up = []
    for s, t in enumerate(kept_up):
        if "CrossAttn" in cfg["up_block_types"][t]:
            up.append(compact([len(layers[("up_blocks", s, j)]) for j in range(len(spec.up[t]))]))
        else:
            up.append(down[len(kept_down) - 1 - s])
    out["transformer_layers_per_block"] = down
    mirrored = list(reversed(down))
    out["reverse_transformer_layers_per_block"] = None
    if up != mirrored or any(isinstance(x, list) for x in down):
        out["reverse_transformer_layers_per_block"] = up
    if mid is not None:
        have = down[-1] if isinstance(down[-1], int) else down[-1][0]
        if len(mid) != have:
            raise UserError(f"spec {spec.name!r} keeps {len(mid)} mid-block layers but diffusers gives the mid-block the "
                            f"depth of the innermost down stage's first block ({have}); keep {have}, or drop the mid-block")


def _last_layer(block_type: str, stage: str, n_pairs: int) -> str:
    """The module whose output is a stage's output before its down/up-sampler."""
    if "CrossAttn" in block_type:
        return f"{stage}.attentions.{n_pairs - 1}.proj_out"
    return f"{stage}.resnets.{n_pairs - 1}"


def _maps(spec: BlockSpec, cfg: dict[str, Any], kept_down: list[int], kept_up: list[int]):
    """(module map, block-output pairs, self-attention pairs). A transformer layer that moved (the student's layer
    j was the teacher's layer k != j) gets its own module-map entry, which outranks its block's."""
    n, ns = len(cfg["down_block_types"]), len(kept_down)
    layers = stage_layers(cfg)
    kept_layers, mid_layers = _kept_layers(spec, cfg, kept_down, kept_up)
    modules: list[tuple[str, str]] = []
    attn: list[tuple[str, str]] = []

    def transformer(student: str, teacher: str, chosen: list[int]) -> None:
        for j, k in enumerate(chosen):
            if j != k:
                modules.append((f"{student}.transformer_blocks.{j}", f"{teacher}.transformer_blocks.{k}"))
            attn.append((f"{teacher}.transformer_blocks.{k}.attn1", f"{student}.transformer_blocks.{j}.attn1"))
    pairs_down: list[tuple[str, str]] = []
    pairs_up: list[tuple[str, str]] = []
    for path, kept, types in (("down_blocks", kept_down, cfg["down_block_types"]), ("up_blocks", kept_up, cfg["up_block_types"])):
        sampler = "downsamplers" if path == "down_blocks" else "upsamplers"
        stages = spec.down if path == "down_blocks" else spec.up
        for s, t in enumerate(kept):
            keep = stages[t]
            has_attn = "CrossAttn" in types[t]
            for j, k in enumerate(keep):
                modules.append((f"{path}.{s}.resnets.{j}", f"{path}.{t}.resnets.{k}"))
                if has_attn:
                    modules.append((f"{path}.{s}.attentions.{j}", f"{path}.{t}.attentions.{k}"))
                    transformer(f"{path}.{s}.attentions.{j}", f"{path}.{t}.attentions.{k}", kept_layers[(path, s, j)])
            student_has, teacher_has = s < ns - 1, t < n - 1
            if student_has:
                modules.append((f"{path}.{s}.{sampler}.0", f"{path}.{t}.{sampler}.0"))
            if student_has == teacher_has:
                pair = (f"{path}.{t}", f"{path}.{s}")
            else:  # the student stage lost its sampler: match the stage output before the teacher's sampler
                n_teacher = layers[t] if path == "down_blocks" else layers[n - 1 - t] + 1
                pair = (_last_layer(types[t], f"{path}.{t}", n_teacher), _last_layer(types[t], f"{path}.{s}", len(keep)))
            (pairs_down if path == "down_blocks" else pairs_up).append(pair)
    if spec.mid:
        modules.append(("mid_block", "mid_block"))
    if spec.mid is True:
        transformer("mid_block.attentions.0", "mid_block.attentions.0", mid_layers)
    down_attn = [p for p in attn if p[1].startswith("down_blocks")]
    mid_attn = [p for p in attn if p[1].startswith("mid_block")]
    up_attn = [p for p in attn if p[1].startswith("up_blocks")]
    return modules, pairs_down + pairs_up, down_attn + mid_attn + up_attn


NEEDS = {("addition_embed_type", "text_time"): ("addition_time_embed_dim", "projection_class_embeddings_input_dim"),
         ("addition_embed_type", "text_image"): ("encoder_hid_dim",),
         ("class_embed_type", "projection"): ("projection_class_embeddings_input_dim",),
         ("class_embed_type", "simple_projection"): ("projection_class_embeddings_input_dim",),
         ("encoder_hid_dim_type", "text_proj"): ("encoder_hid_dim",),
         ("encoder_hid_dim_type", "text_image_proj"): ("encoder_hid_dim",)}
"""Keys a ``UNet2DConditionModel`` config needs because of another key's value (diffusers' constructor fails deep
inside torch without them)."""


def meta_unet(config: dict[str, Any]):
    """A ``UNet2DConditionModel`` of ``config`` on the meta device: shapes, names and MACs without memory. A config
    diffusers cannot build is a one-line :class:`UserError` naming the key (:data:`NEEDS`) or the cause."""
    from diffusers import UNet2DConditionModel

    from bksdm.errors import short

    for (key, value), needed in NEEDS.items():
        missing = [k for k in needed if config.get(key) == value and config.get(k) is None]
        if missing:
            raise UserError(f"U-Net config has {key} {value!r} but no {missing[0]}; diffusers cannot build it "
                            f"(set {', '.join(missing)} or remove {key})")
    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except Exception as exc:
        raise UserError(f"diffusers cannot build a UNet2DConditionModel from this U-Net config ({short(exc)}); "
                        f"check it against the model's source") from None


def _meta_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _SHAPES:  # a ranking derives many students of one teacher: build each U-Net once
        if len(_SHAPES) > 64:
            _SHAPES.clear()
        _SHAPES[key] = {k: v.shape for k, v in meta_unet(config).state_dict().items()}
    return _SHAPES[key]


_SHAPES: dict[str, dict[str, torch.Size]] = {}


def param_count(config: dict[str, Any]) -> int:
    """Parameters (and buffers) of a ``UNet2DConditionModel`` of ``config``, from its shapes on the meta device
    (cached per config: a ranking's budget search counts many students)."""
    import math

    return sum(math.prod(shape) for shape in _meta_shapes({k: v for k, v in config.items() if not k.startswith("_")}).values())


UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block")
"""Top-level modules of a U-Net whose every tensor must be covered by a module-map entry."""

FEATURE_PICK = "#"
"""Separator of a feature point's tuple pick: ``transformer_blocks.3#1`` is item 1 of that module's tuple output
(:func:`feature_point`); a name without it keeps today's rule (first item of a tuple, ``.sample`` of an output)."""


def feature_point(module: str, item: int | None = None) -> str:
    """The name feature hooks capture: ``module`` itself, or ``module#item`` for item ``item`` of its tuple output
    (MMDiT blocks return ``(encoder_hidden_states, hidden_states)``: the image stream is item 1)."""
    return module if item is None else f"{module}{FEATURE_PICK}{item}"


def split_feature_point(name: str) -> tuple[str, int | None]:
    """(module name, tuple item or None) of a feature-point name written by :func:`feature_point`."""
    module, sep, item = name.partition(FEATURE_PICK)
    return (module, int(item)) if sep else (module, None)


def map_keys(modules: list[tuple[str, str]], student: dict[str, torch.Size], teacher: dict[str, torch.Size],
             roots: tuple[str, ...] = UNET_ROOTS) -> tuple[dict[str, str], list[str]]:
    """The tensor key map (student key -> teacher key) of a module map, and the unused teacher keys (sorted).

    Each student key takes its longest mapped module prefix (a moved layer's entry outranks its block's); a key
    with no mapped prefix keeps its name, except under ``roots`` (the backbone's block lists), where that is an
    :class:`AssertionError`: a depth-pruned block must never take the same-numbered teacher block silently.
    Checked: the source exists with the identical shape (:class:`UserError` naming both), and no teacher tensor
    is used twice (:class:`AssertionError`). ``student``/``teacher``: key -> shape (buffers included).
    """
    prefixes = dict(modules)
    key_map: dict[str, str] = {}
    for key, shape in student.items():
        parts = key.split(".")
        src = key
        for depth in range(len(parts) - 1, 0, -1):  # the longest mapped prefix wins (a moved layer over its block)
            head = ".".join(parts[:depth])
            if head in prefixes:
                src = prefixes[head] + key[len(head):]
                break
        else:
            if parts[0] in roots:
                raise AssertionError(f"student tensor {key} is not covered by the module map")
        if src not in teacher:
            raise UserError(f"student tensor {key} maps to {src}, which the teacher does not have")
        if teacher[src] != shape:
            raise UserError(f"student tensor {key} {tuple(shape)} maps to {src} of shape {tuple(teacher[src])}")
        key_map[key] = src
    used = set(key_map.values())
    if len(used) != len(key_map):
        raise AssertionError("two student tensors map to the same teacher tensor")
    return key_map, sorted(k for k in teacher if k not in used)


def derive(teacher_config: dict[str, Any], spec: BlockSpec, with_keys: bool = True) -> Derivation:
    """Derive the student of ``spec`` for ``teacher_config``.

    Args:
        teacher_config: the teacher's ``UNet2DConditionModel`` config (as in its ``config.json``).
        spec: which blocks to keep.
        with_keys: also build the tensor-level key map (instantiates both U-Nets on the meta device; cheap).
    """
    check_teacher_config(teacher_config)
    kept_down, kept_up = _validate(spec, teacher_config)
    student_cfg = _student_config(spec, teacher_config, kept_down, kept_up)
    modules, pairs, attn = _maps(spec, teacher_config, kept_down, kept_up)
    der = Derivation(spec, copy.deepcopy(teacher_config), student_cfg, modules, pairs, attn)
    if with_keys:
        teacher_cfg = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
        der.key_map, der.unused_teacher_keys = map_keys(modules, _meta_shapes(student_cfg), _meta_shapes(teacher_cfg))
    return der
