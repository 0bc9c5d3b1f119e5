"""Block-removal specs: which (ResBlock, AttnBlock) pairs of each U-Net stage a student keeps.

A spec lists, for every down stage, the indices of the pairs the student keeps (``None`` drops the stage),
whether the mid-block stays, and the same for every up stage (diffusers order: innermost first). One spec
drives the student config, the weight map and the feature-KD pairs (:mod:`bksdm.arch.derive`).

File form (YAML or JSON), for example ``keep both pairs of the outermost down stage``::

    name: outer-heavy
    down: [[0, 1], [0], [0], [0]]    # per down stage: kept pair indices, or null to drop the stage
    mid: true                        # keep the mid-block
    up: [[0, 2], [0, 2], [0, 2], [0, 1, 2]]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bksdm.errors import UserError

Stage = tuple[int, ...] | None


@dataclass(frozen=True)
class BlockSpec:
    """Which blocks a student keeps. ``down``/``up`` have one entry per teacher stage."""

    name: str
    down: tuple[Stage, ...]
    mid: bool
    up: tuple[Stage, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["down"] = [list(s) if s is not None else None for s in self.down]
        d["up"] = [list(s) if s is not None else None for s in self.up]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "BlockSpec":
        allowed = {"name", "down", "mid", "up"}
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

        if not isinstance(data["mid"], bool):
            raise UserError(f"{source}: 'mid' must be true or false")
        return cls(name=str(data.get("name", source)), down=stages("down"), mid=data["mid"], up=stages("up"))


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


def load_spec(name_or_path: str | Path) -> BlockSpec:
    """A built-in spec by name (``bk-base``, ``bk-small``, ``bk-tiny``) or a spec file (.yaml/.yml/.json)."""
    key = str(name_or_path)
    if key in BUILTIN_SPECS:
        return BUILTIN_SPECS[key]
    path = Path(key)
    if path.suffix.lower() not in {".yaml", ".yml", ".json"}:
        raise UserError(
            f"unknown student {key!r}; use a built-in spec ({', '.join(BUILTIN_SPECS)}) or a spec file (.yaml or .json)"
        )
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
        raise UserError(f"spec file {key} must hold a mapping with keys name, down, mid, up")
    data.setdefault("name", path.stem)
    return BlockSpec.from_dict(data, source=str(path))
