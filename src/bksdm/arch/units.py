"""Removable units of a teacher U-Net, and specs with units taken out.

A unit is the smallest change a :class:`BlockSpec` can express that leaves a buildable student:

* ``pairs`` — one (ResBlock, attention) pair of a down stage together with one pair of its mirrored up stage: an up
  stage must keep exactly one pair more than its down stage (skip connections), so pairs leave in twos;
* ``mid`` — the mid-block;
* ``stage`` — the innermost kept stage, down and up (BK-SDM-Tiny's cut);
* ``layer`` — one transformer layer of an attention block that stacks several (SDXL; KOALA's depth cut).

Units are named in the teacher's numbering, so a ranking measured on the teacher stays valid however many units
a student has already lost; :func:`remove` applies one to a spec and :func:`candidates` lists those that still
apply, each checked by :func:`bksdm.arch.derive.derive` with its key map (shapes included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from bksdm.arch.derive import derive, stage_layers, teacher_depths
from bksdm.arch.spec import BlockSpec
from bksdm.errors import UserError

KINDS = ("pairs", "mid", "stage", "layer")


@dataclass(frozen=True)
class Unit:
    """One removable unit in the teacher's numbering (``stage``: the down stage index; the mirrored up stage is
    ``n - 1 - stage``). ``modules``: the teacher modules it removes (the first takes the unit's input, the last
    gives its output when they are one path)."""

    kind: str
    stage: int | None = None
    down_pair: int | None = None
    up_pair: int | None = None
    path: str | None = None  # layer: "down" or "up"
    pair: int | None = None  # layer: the teacher pair index of its attention block
    layer: int | None = None
    modules: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.kind == "pairs":
            return f"stage {self.stage}: down pair {self.down_pair} + up pair {self.up_pair}"
        if self.kind == "mid":
            return "mid-block"
        if self.kind == "stage":
            return f"stage {self.stage} (innermost)"
        return f"{self.path}_blocks.{self.stage}.attentions.{self.pair} layer {self.layer}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in asdict(self).items() if v is not None and v != ()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Unit":
        """The unit of a :meth:`to_dict` record (other keys, such as a ranking's measures, are ignored)."""
        names = {"kind", "stage", "down_pair", "up_pair", "path", "pair", "layer"}
        return cls(**{k: v for k, v in d.items() if k in names}, modules=tuple(d.get("modules", ())))


def full_spec(cfg: dict[str, Any]) -> BlockSpec:
    """The spec that keeps everything of a teacher of config ``cfg``."""
    n, layers = len(cfg["down_block_types"]), stage_layers(cfg)
    return BlockSpec("teacher", tuple(tuple(range(layers[i])) for i in range(n)),
                     cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None,
                     tuple(tuple(range(layers[n - 1 - u] + 1)) for u in range(n)))


def _per_block(spec: BlockSpec, path: str, stage: int, kept: tuple[int, ...], teacher_counts: list[int]) -> list[tuple[int, ...]]:
    """The kept layers of each kept block of a stage, one tuple per kept block (``kept``: teacher pair indices)."""
    out = []
    for j, k in enumerate(kept):
        chosen = spec.stage_depth(path, stage, j)
        out.append(tuple(range(teacher_counts[k])) if chosen is None else tuple(chosen))
    return out


def _with_depth(spec: BlockSpec, path: str, stage: int, value: Any) -> dict[str, Any]:
    depth = dict(spec.depth) if spec.depth else {"down": (None,) * len(spec.down), "mid": None, "up": (None,) * len(spec.up)}
    entries = list(depth[path])
    entries[stage] = value
    depth[path] = tuple(entries)
    return depth


def remove(spec: BlockSpec, unit: Unit, cfg: dict[str, Any]) -> BlockSpec:
    """``spec`` without ``unit``; :class:`UserError` when the unit is not there any more or its removal leaves no
    buildable student (the derivation's own checks, shapes included)."""
    n = len(spec.down)
    t_down, _, t_up = teacher_depths(cfg)
    new = spec
    if unit.kind == "pairs":
        d, u = unit.stage, n - 1 - unit.stage
        down, up = spec.down[d], spec.up[u]
        if down is None or unit.down_pair not in down or unit.up_pair not in up or len(down) < 2:
            raise UserError(f"{unit.name} is not removable from this student")
        keep_d = tuple(i for i in down if i != unit.down_pair)
        keep_u = tuple(j for j in up if j != unit.up_pair)
        depth = spec.depth
        if depth is not None:  # per-block depth entries follow their blocks
            new_d = _per_block(spec, "down", d, down, t_down[d])
            new_u = _per_block(spec, "up", u, up, t_up[u])
            spec = replace(spec, depth=_with_depth(spec, "down", d, tuple(x for i, x in zip(down, new_d) if i != unit.down_pair)))
            depth = _with_depth(spec, "up", u, tuple(x for j, x in zip(up, new_u) if j != unit.up_pair))
        new = replace(spec, down=_set(spec.down, d, keep_d), up=_set(spec.up, u, keep_u), depth=depth)
    elif unit.kind == "mid":
        if not spec.mid:
            raise UserError("the mid-block is already removed")
        depth = dict(spec.depth, mid=None) if spec.depth else None
        new = replace(spec, mid=False, depth=depth)
    elif unit.kind == "stage":
        kept = [i for i, s in enumerate(spec.down) if s is not None]
        if kept[-1] != unit.stage or len(kept) < 2:
            raise UserError(f"{unit.name} is not the innermost kept stage of this student")
        depth = spec.depth
        if depth is not None:
            depth = _with_depth(replace(spec, depth=_with_depth(spec, "down", unit.stage, None)), "up", n - 1 - unit.stage, None)
        new = replace(spec, down=_set(spec.down, unit.stage, None), up=_set(spec.up, n - 1 - unit.stage, None), depth=depth)
    elif unit.kind == "layer":
        kept = (spec.down if unit.path == "down" else spec.up)[unit.stage]
        if kept is None or unit.pair not in kept:
            raise UserError(f"{unit.name}: its block is removed")
        counts = (t_down if unit.path == "down" else t_up)[unit.stage]
        blocks = _per_block(spec, unit.path, unit.stage, kept, counts)
        pos = kept.index(unit.pair)
        if unit.layer not in blocks[pos] or len(blocks[pos]) < 2:
            raise UserError(f"{unit.name} is not removable from this student")
        blocks[pos] = tuple(x for x in blocks[pos] if x != unit.layer)
        new = replace(spec, depth=_with_depth(spec, unit.path, unit.stage, tuple(blocks)))
    else:
        raise UserError(f"unknown unit kind {unit.kind!r}; one of {', '.join(KINDS)}")
    derive(cfg, new)  # raises UserError when no student of that shape can be built
    return new


def remove_all(cfg: dict[str, Any], units: list[Unit]) -> BlockSpec:
    """The teacher's spec with ``units`` removed in order (:func:`remove`; its errors)."""
    spec = full_spec(cfg)
    for unit in units:
        spec = remove(spec, unit, cfg)
    return spec


def _set(stages: tuple, i: int, value: Any) -> tuple:
    out = list(stages)
    out[i] = value
    return tuple(out)


def all_units(cfg: dict[str, Any]) -> list[Unit]:
    """Every unit of a teacher, whether or not its removal alone is buildable (see :func:`candidates`)."""
    n, layers = len(cfg["down_block_types"]), stage_layers(cfg)
    t_down, t_mid, t_up = teacher_depths(cfg)
    attn_d = ["CrossAttn" in t for t in cfg["down_block_types"]]
    attn_u = ["CrossAttn" in t for t in cfg["up_block_types"]]

    def pair_modules(path: str, stage: int, k: int, attn: bool) -> tuple[str, ...]:
        base = f"{path}_blocks.{stage}"
        return (f"{base}.resnets.{k}",) + ((f"{base}.attentions.{k}",) if attn else ())

    units = []
    for d in range(n):
        u = n - 1 - d
        for i in range(layers[d]):
            for j in range(layers[d] + 1):
                units.append(Unit("pairs", d, i, j, modules=pair_modules("down", d, i, attn_d[d]) + pair_modules("up", u, j, attn_u[u])))
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        units.append(Unit("mid", modules=("mid_block",)))
    for d in range(1, n):
        units.append(Unit("stage", d, modules=(f"down_blocks.{d}", f"up_blocks.{n - 1 - d}")))
    for path, depths in (("down", t_down), ("up", t_up)):
        for s, counts in enumerate(depths):
            for k, c in enumerate(counts):
                if c > 1:
                    units += [Unit("layer", s, path=path, pair=k, layer=l,
                                   modules=(f"{path}_blocks.{s}.attentions.{k}.transformer_blocks.{l}",)) for l in range(c)]
    return units


def candidates(spec: BlockSpec, cfg: dict[str, Any], units: list[Unit]) -> list[tuple[Unit, BlockSpec]]:
    """The units of ``units`` whose removal from ``spec`` leaves a buildable student, each with that student's spec."""
    out = []
    for unit in units:
        try:
            out.append((unit, remove(spec, unit, cfg)))
        except UserError:
            continue
    return out
