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


RUN_OUTPUTS = ("checkpoints", "final", "logs", "samples", "config.json")
"""What a run writes into its folder: present means the folder holds a run."""


def claim_run_folder(out: Path, resume: str, overwrite: bool, remove: bool = False) -> None:
    """Refuse to mix two runs in one folder: an earlier run is continued (``resume``), replaced (``overwrite``) or
    left alone (an error, before any work). Called twice: first to refuse (before the teacher is fetched), then with
    ``remove`` once every check of the run has passed, when ``overwrite`` removes the earlier run's outputs (the
    launcher's rank 0): a run refused for its settings leaves the earlier one as it was."""
    import os
    import shutil

    from bksdm.errors import UserError

    used = [n for n in RUN_OUTPUTS if (out / n).exists()]
    if not used or resume:
        return
    if not overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(used)}); pass --resume latest to continue it, "
                        f"--overwrite to replace it, or choose another --out")
    if remove and int(os.environ.get("RANK", "0")) == 0:  # the launcher's rank
        for n in used:
            target = out / n
            shutil.rmtree(target) if target.is_dir() else target.unlink()
