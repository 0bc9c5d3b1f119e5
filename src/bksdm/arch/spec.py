"""Block-removal specs: which (ResBlock, AttnBlock) pairs of each U-Net stage a student keeps.

A spec lists, for every down stage, the indices of the pairs the student keeps (``None`` drops the stage),
whether the mid-block stays, and the same for every up stage (diffusers order: innermost first). One spec
drives the student config, the weight map and the feature-KD pairs (:mod:`bksdm.arch.derive`).

File form (YAML or JSON), for example ``keep both pairs of the outermost down stage``::

    name: outer-heavy
    down: [[0, 1], [0], [0], [0]]    # per down stage: kept pair indices, or null to drop the stage
    mid: true                        # keep the mid-block (false: drop it; resnets: keep its ResBlocks only)
    up: [[0, 2], [0, 2], [0, 2], [0, 1, 2]]

SDXL-style teachers stack several transformer layers in one attention block (``transformer_layers_per_block``
[1, 2, 10]). The optional ``depth`` key says which of them each kept block keeps (KOALA-style depth removal);
per stage, ``null`` keeps all, a list of layer indices applies to every kept block of the stage, and a list of
lists names the layers per kept block::

    depth:
      down: [null, null, [0, 1, 2, 3, 4]]   # innermost down stage: the first five of ten layers
      mid: [0, 1, 2, 3, 4]                   # the mid-block's layers (null or absent: all)
      up: [[0, 1, 2, 3, 4], null, null]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bksdm.errors import UserError

Stage = tuple[int, ...] | None
Depth = tuple[int, ...] | tuple[tuple[int, ...], ...] | None
"""Kept transformer layers of a stage: None (all), one index tuple for every kept block, or one per kept block."""


@dataclass(frozen=True)
class BlockSpec:
    """Which blocks a student keeps. ``down``/``up`` have one entry per teacher stage."""

    name: str
    down: tuple[Stage, ...]
    mid: bool | str  # True, False, or "resnets": the ResBlocks without the attention block (SSD-1B)
    up: tuple[Stage, ...]
    depth: dict[str, Any] | None = None  # {"down": (Depth per stage), "mid": tuple | None, "up": (Depth per stage)}

    def __hash__(self) -> int:
        return hash((self.name, self.down, self.mid, self.up, repr(self.depth)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["down"] = [list(s) if s is not None else None for s in self.down]
        d["up"] = [list(s) if s is not None else None for s in self.up]
        if self.depth is None:
            d.pop("depth")
        else:
            d["depth"] = {"down": [_depth_list(x) for x in self.depth["down"]], "mid": _depth_list(self.depth["mid"]),
                          "up": [_depth_list(x) for x in self.depth["up"]]}
        return d

    def stage_depth(self, path: str, stage: int, block: int) -> tuple[int, ...] | None:
        """The teacher layer indices that kept block ``block`` (0-based among the kept) of ``path`` ('down'/'up')
        stage ``stage`` keeps, or None for all of them."""
        if self.depth is None:
            return None
        entry = self.depth[path][stage]
        if entry is None or not entry or isinstance(entry[0], int):
            return entry
        return entry[block]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "BlockSpec":
        allowed = {"name", "down", "mid", "up", "depth"}
        unknown = set(data) - allowed
        if unknown:
            raise UserError(f"{source}: unknown key(s) {sorted(unknown)}; a spec has keys {sorted(allowed)}")
        missing = {"down", "mid", "up"} - set(data)
        if missing:
            raise UserError(f"{source}: missing key(s) {sorted(missing)}; a spec has keys {sorted(allowed)}")

        def stages(key: str) -> tuple[Stage, ...]:
            value = data[key]
            if not isinstance(value, list) or not value:
                raise UserError(f"{source}: '{key}' must be a list with one entry per stage (a list of pair indices or null)")
            out: list[Stage] = []
            for i, st in enumerate(value):
                if st is None:
                    out.append(None)
                elif isinstance(st, list) and st and all(isinstance(x, int) and not isinstance(x, bool) for x in st):
                    out.append(tuple(st))
                else:
                    raise UserError(f"{source}: {key}[{i}] = {st!r}; write a non-empty list of pair indices, or null to drop the stage")
            return tuple(out)

        if not isinstance(data["mid"], bool) and data["mid"] != "resnets":
            raise UserError(f"{source}: 'mid' must be true, false or resnets (its ResBlocks without the attention)")
        down, up = stages("down"), stages("up")
        depth = _parse_depth(data.get("depth"), source, len(down), len(up))
        return cls(name=str(data.get("name", source)), down=down, mid=data["mid"], up=up, depth=depth)


def _indices(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _depth_list(entry: Any) -> Any:
    if entry is None:
        return None
    return [list(x) for x in entry] if entry and not isinstance(entry[0], int) else list(entry)


def _parse_depth(value: Any, source: str, n_down: int, n_up: int) -> dict[str, Any] | None:
    """The ``depth`` key of a spec file as tuples (None when absent); shapes checked, indices checked by derive."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"down", "mid", "up"}:
        raise UserError(f"{source}: 'depth' must be a mapping with keys down, mid, up")

    def entry(x: Any, where: str) -> Any:
        if x is None:
            return None
        if _indices(x):
            return tuple(x)
        if isinstance(x, list) and x and all(_indices(b) for b in x):
            return tuple(tuple(b) for b in x)
        raise UserError(f"{source}: depth {where} = {x!r}; write null (all layers), a list of layer indices, "
                        f"or one such list per kept block")

    out: dict[str, Any] = {"mid": entry(value.get("mid"), "mid")}
    if out["mid"] is not None and not isinstance(out["mid"][0], int):
        raise UserError(f"{source}: depth mid is one list of layer indices")
    for key, n in (("down", n_down), ("up", n_up)):
        stages = value.get(key)
        if stages is None:
            out[key] = (None,) * n
            continue
        if not isinstance(stages, list) or len(stages) != n:
            raise UserError(f"{source}: depth {key} needs one entry per stage ({n}), null for all layers")
        out[key] = tuple(entry(x, f"{key}[{i}]") for i, x in enumerate(stages))
    return out


# The paper's students of a 4-stage teacher with two pairs per down stage and three per up stage.
_BASE_DOWN: tuple[Stage, ...] = ((0,), (0,), (0,), (0,))
_BASE_UP: tuple[Stage, ...] = ((0, 2), (0, 2), (0, 2), (0, 2))

BUILTIN_SPECS: dict[str, BlockSpec] = {
    # every down stage keeps its first pair; every up stage keeps its first and last pair; mid-block stays
    "bk-base": BlockSpec("bk-base", _BASE_DOWN, True, _BASE_UP),
    # bk-base without the mid-block
    "bk-small": BlockSpec("bk-small", _BASE_DOWN, False, _BASE_UP),
    # bk-small without the innermost down stage and the innermost up stage
    "bk-tiny": BlockSpec("bk-tiny", ((0,), (0,), (0,), None), False, (None, (0, 2), (0, 2), (0, 2))),
}
"""Students of SD-v1.x / v2.x (four stages)."""


def _first(n: int) -> tuple[int, ...]:
    return tuple(range(n))


_XL_DOWN: tuple[Stage, ...] = ((0,), (0,), (0,))
_XL_UP: tuple[Stage, ...] = ((0, 2), (0, 2), (0, 2))


def _koala_depth(n: int, mid: bool) -> dict[str, Any]:
    """The first ``n`` of the ten transformer layers in the innermost stage's kept blocks (and the mid-block)."""
    return {"down": (None, None, _first(n)), "mid": _first(n) if mid else None, "up": (_first(n), None, None)}


SDXL_SPECS: dict[str, BlockSpec] = {
    # the BK-SDM rules on SDXL's three stages (transformer depth untouched)
    "bk-base": BlockSpec("bk-base", _XL_DOWN, True, _XL_UP),
    "bk-small": BlockSpec("bk-small", _XL_DOWN, False, _XL_UP),
    # no bk-tiny: SDXL's innermost stage is wider (1280) than the one before it (640), so without it the up path's
    # first block would take inputs of another width than any teacher block: nothing to initialise it from
    # KOALA (arXiv 2312.04005): BK-style block removal and the innermost stage's depth 10 -> 6 (1B) / 5 (700M,
    # mid-block removed); U-Net parameters 1,161M / 782M as published (docs/architecture.md)
    "koala-1b": BlockSpec("koala-1b", _XL_DOWN, True, _XL_UP, _koala_depth(6, True)),
    "koala-700m": BlockSpec("koala-700m", _XL_DOWN, False, _XL_UP, _koala_depth(5, False)),
    # SSD-1B (Segmind; Gupta et al., arXiv 2401.02677): every block kept, the innermost stage's depth 10 -> 4 in
    # the encoder and in the decoder's first two blocks, the next decoder stage 2/1/1, the mid-block's attention
    # removed; 1,331M U-Net parameters ("1.3B")
    "ssd-1b": BlockSpec("ssd-1b", ((0, 1),) * 3, "resnets", ((0, 1, 2),) * 3,
                        {"down": (None, None, _first(4)), "mid": None,
                         "up": ((_first(4), _first(4), _first(10)), (_first(2), _first(1), _first(1)), None)}),
}
"""Students of SDXL (three stages, transformer depth 1/2/10): built-in names resolve here for a 3-stage teacher."""


def builtin_specs(n_stages: int = 4) -> dict[str, BlockSpec]:
    """The built-in specs for a teacher with ``n_stages`` down stages (SDXL: 3, SD-v1/v2: 4)."""
    return SDXL_SPECS if n_stages == 3 else BUILTIN_SPECS


def load_spec(name_or_path: str | Path, teacher_config: dict[str, Any] | None = None):
    """A built-in spec by name or a spec file (.yaml/.yml/.json), for the kind of ``teacher_config``.

    A U-Net teacher (or none: four stages) gets a :class:`BlockSpec`: ``bk-base``, ``bk-small``, ``bk-tiny``, for
    SDXL also ``koala-1b``, ``koala-700m``, ``ssd-1b``. A transformer teacher (``_class_name``
    ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``) gets a :class:`bksdm.arch.dit.DiTSpec`, built-ins
    computed from its config (:func:`bksdm.arch.dit.builtin_specs`). A spec of the other kind is a one-line error."""
    from bksdm.arch import dit

    key = str(name_or_path)
    transformer = bool(teacher_config) and dit.is_transformer(teacher_config)
    if transformer:
        builtins: dict[str, Any] = dit.builtin_specs(teacher_config)
    else:
        builtins = builtin_specs(len(teacher_config["down_block_types"]) if teacher_config else 4)
    if key in builtins:
        if transformer:
            dit.check_spec(builtins[key], teacher_config)
        return builtins[key]
    path = Path(key)
    if path.suffix.lower() not in {".yaml", ".yml", ".json"}:
        known = ", ".join(builtins)
        if key in SDXL_SPECS:
            raise UserError(f"student {key!r} is a built-in spec for SDXL teachers; this teacher's are: {known}")
        if key in dit.TRANSFORMER_ONLY_SPECS:
            raise UserError(f"student {key!r} is a built-in spec for FLUX.1 (19 + 38 blocks) transformer teachers; "
                            f"this teacher's are: {known}")
        raise UserError(f"unknown student {key!r}; use a built-in spec ({known}) or a spec file (.yaml or .json)")
    if not path.is_file():
        raise UserError(f"spec file {key} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # the parser's message says where the syntax error is
        raise UserError(f"spec file {key} could not be parsed: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"spec file {key} must hold a mapping with keys name, down, mid, up (a U-Net spec) or "
                        f"name, keep (a transformer spec)")
    data.setdefault("name", path.stem)
    if transformer and "keep" not in data and {"down", "up"} & set(data):
        raise UserError(f"spec file {key} is a U-Net spec (down, mid, up) but the teacher is a "
                        f"{teacher_config['_class_name']}; a transformer spec has keys name and keep")
    if not transformer and "keep" in data:
        raise UserError(f"spec file {key} is a transformer spec (keep) but the teacher is a U-Net; a U-Net spec has "
                        f"keys name, down, mid, up")
    if transformer:
        spec = dit.DiTSpec.from_dict(data, source=str(path))
        dit.check_spec(spec, teacher_config)
        return spec
    return BlockSpec.from_dict(data, source=str(path))
