"""`bksdm compress`: a teacher pipeline in, a complete student pipeline folder out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bksdm.arch import derive, init_student_from_teacher, load_spec
from bksdm.errors import UserError, check_output
from bksdm.hub import read_unet_config, resolve_model
from bksdm.cards import write_model_card
from bksdm.pipelines import copy_pipeline, write_record
from bksdm.profile import count_params


def compress(teacher: str, student: str, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the student pipeline of ``student`` (a built-in name or spec file) for ``teacher`` into ``out``.

    ``out`` receives the teacher's other components unchanged, the initialised student ``unet/`` (safetensors)
    and ``bksdm.json`` (spec, module and key maps, layer pairs, parameter counts). Returns that record.
    """
    import torch

    from bksdm.models import load_unet

    src = resolve_model(teacher, "teacher")
    teacher_cfg, unet_dir = read_unet_config(src)
    spec = load_spec(student, teacher_cfg)
    derivation = derive(teacher_cfg, spec)  # fails on a bad spec before any weights are read
    if not (src / "model_index.json").is_file():
        raise UserError(f"{src} is a bare U-Net; compress needs a whole pipeline folder (with model_index.json)")
    out = check_output(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; choose another or pass --overwrite")

    teacher_unet = load_unet(unet_dir)
    student_unet = init_student_from_teacher(teacher_unet, derivation)
    copy_pipeline(src, out)
    student_unet.save_pretrained(out / "unet", safe_serialization=True)
    record = {
        "teacher": teacher,
        **derivation.record(),
        "params": {"teacher_unet": count_params(teacher_unet), "student_unet": count_params(student_unet)},
        "student_config": derivation.student_config,
    }
    write_record(out, record)
    write_model_card(out, record, teacher_cfg, record["params"],
                     {"status": "initialised from the teacher's weights, not yet distilled (bksdm distill retrains it)"})
    del teacher_unet
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return record
