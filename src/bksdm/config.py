"""Recipe configs: a dataclass is the one source of defaults for the API, the YAML files and the CLI flags.

Values from YAML or ``key=value`` strings are converted to each field's type; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from bksdm.errors import UserError

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for recipe dataclasses: ``fields``, ``update`` (typed, strict) and ``to_dict``."""

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    def update(self: C, values: dict[str, Any], source: str) -> C:
        known = self.fields()
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in known:
                raise UserError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
            setattr(self, key, _coerce(key, value, getattr(self, key), source))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, current: Any, source: str) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        import yaml

        value = yaml.safe_load(value)
    try:
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key}={value!r} is not a {type(current).__name__}") from None


def load_yaml_config(cls: type[C], path: str | Path | None, shipped_prefix: str, overrides: list[str] | None = None,
                     **flags: Any) -> C:
    """Defaults, then the YAML file (a path, or a shipped ``configs/{prefix}_{name}.yaml``), then ``key=value``
    overrides, then explicit flags (None = not given)."""
    import yaml

    cfg = cls()
    if path:
        p = Path(path)
        shipped = Path(__file__).parent / "configs" / f"{shipped_prefix}_{path}.yaml"
        if not p.is_file() and shipped.is_file():
            p = shipped
        if not p.is_file():
            raise UserError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must hold a mapping of keys to values")
        cfg.update(data, str(p))
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        cfg.update({k: v}, "override")
    cfg.update({k: v for k, v in flags.items() if v is not None}, "flag")
    return cfg
