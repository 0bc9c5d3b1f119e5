"""Unusable data, skipped and counted with its reason: the one mechanism every room that reads data shares.

A reader that cannot use an item raises :class:`Unusable` with a short, fixed ``reason`` (``"not an image"``,
``"too thin"``, ``"no caption"``, ...) and a ``detail`` naming the item; whoever skips it adds it to a
:class:`Skips` tally, which run summaries, cache indexes and model cards print per reason
(``3 skipped: 2 too thin (4000x2 px ...), 1 not an image (._a.png ...)``).
"""

from __future__ import annotations

from typing import Iterable


class Unusable(Exception):
    """An item that cannot be used. ``reason``: a short category that is counted; ``name``: which item; ``info``:
    what exactly (``4000x2 px``); ``detail``: ``name (info)``."""

    def __init__(self, reason: str, name: str = "", info: str = ""):
        self.reason, self.name, self.info = reason, name, info
        self.detail = f"{name} ({info})" if name and info else name or info
        super().__init__(f"{self.detail}: {reason}" if self.detail else reason)


class Skips(dict):
    """Counts of skipped items per reason (a plain ``{reason: count}`` dict, JSON as it is), with the first item
    skipped for each reason kept in :attr:`examples`."""

    def __init__(self, counts: dict[str, int] | None = None):
        super().__init__(counts or {})
        self.examples: dict[str, str] = {}

    def add(self, exc: Unusable | str, count: int = 1) -> None:
        reason = exc.reason if isinstance(exc, Unusable) else str(exc)
        self[reason] = self.get(reason, 0) + count
        if isinstance(exc, Unusable) and exc.detail:
            self.examples.setdefault(reason, exc.detail)

    def update_from(self, counts: dict[str, int] | Iterable[str]) -> None:
        """Add a ``{reason: count}`` dict (from another process, a checkpoint, a cache) or an iterable of reasons."""
        for reason, count in (counts.items() if isinstance(counts, dict) else ((r, 1) for r in counts)):
            self.add(reason, count)

    @property
    def total(self) -> int:
        return sum(self.values())

    def summary(self, examples: bool = True) -> str:
        """``"3 skipped: 2 too thin (first: a.jpg), 1 not an image"``, reasons by count; ``"none skipped"``."""
        if not self.total:
            return "none skipped"
        parts = [f"{n} {r}" + (f" (first: {self.examples[r]})" if examples and r in self.examples else "")
                 for r, n in sorted(self.items(), key=lambda kv: (-kv[1], kv[0]))]
        return f"{self.total} skipped: " + ", ".join(parts)
