"""The checkpoints of a distillation run folder: which ones are complete, in step order."""

from __future__ import annotations

from pathlib import Path


def checkpoints(folder: Path) -> list[Path]:
    """Complete ``step-N`` checkpoints of a run, oldest first: stray folders (``step-old``) and ones without their
    ``trainer_state.json`` (written last, so missing when a save was cut short) are ignored."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]))
