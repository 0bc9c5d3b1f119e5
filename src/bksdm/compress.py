"""`bksdm compress`: a teacher pipeline in, a complete student pipeline folder out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bksdm.arch import derive, init_student_from_teacher, load_spec
from bksdm.arch.derive import Derivation
from bksdm.errors import UserError, check_output
from bksdm.hub import read_unet_config, resolve_model

RECORD = "bksdm.json"


def compress(teacher: str, student: str, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the student pipeline of ``student`` (a built-in name or spec file) for ``teacher`` into ``out``.

    ``out`` receives the teacher's other components unchanged, the initialised student ``unet/`` (safetensors)
    and ``bksdm.json`` (spec, module and key maps, layer pairs, parameter counts). Returns that record.
    """
    import torch

    from bksdm.models import load_unet

    src = resolve_model(teacher, "teacher")
    spec = load_spec(student)
    teacher_cfg, unet_dir = read_unet_config(src)
    derivation = derive(teacher_cfg, spec)  # fails on a bad spec before any weights are read
    if not (src / "model_index.json").is_file():
        raise UserError(f"{src} is a bare U-Net; compress needs a whole pipeline folder (with model_index.json)")
    out = check_output(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; choose another or pass --overwrite")

    teacher_unet = load_unet(unet_dir)
    student_unet = init_student_from_teacher(teacher_unet, derivation)
    _copy_pipeline(src, out)
    student_unet.save_pretrained(out / "unet", safe_serialization=True)
    record = {
        "teacher": teacher,
        **derivation.record(),
        "params": {"teacher_unet": _n(teacher_unet), "student_unet": _n(student_unet)},
        "student_config": derivation.student_config,
    }
    (out / RECORD).write_text(json.dumps(record, indent=1))
    del teacher_unet
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return record


def _n(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _copy_pipeline(src: Path, out: Path) -> None:
    """Copy model_index.json and every component folder except the U-Net."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "model_index.json", out / "model_index.json")
    for child in src.iterdir():
        if child.is_dir() and child.name != "unet" and not child.name.startswith("."):
            shutil.copytree(child, out / child.name, dirs_exist_ok=True)


def load_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def derivation_for(teacher_cfg: dict[str, Any], student: str) -> Derivation:
    """The derivation of a student given as a spec name/file or as a folder written by :func:`compress`."""
    record = load_record(student) if Path(student).is_dir() else None
    if record is not None:
        from bksdm.arch.spec import BlockSpec

        return derive(teacher_cfg, BlockSpec.from_dict(record["spec"], source=str(Path(student) / RECORD)))
    if Path(student).is_dir():
        raise UserError(f"{student} has no {RECORD}; pass a folder written by `bksdm compress`, a spec name or a spec file")
    return derive(teacher_cfg, load_spec(student))
