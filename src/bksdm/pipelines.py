"""Pipeline folders: copying a teacher's components around a new U-Net, and the ``bksdm.json`` record that says how
a student was made (spec, module and key maps, layer pairs, parameter counts, training).

Every command that writes a pipeline (compress, distill's ``final``, DreamBooth, evaluate-progress) goes through
:func:`copy_pipeline` and :func:`write_record`; every reader of a student's origin through :func:`load_record`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bksdm.arch import derive, load_spec
from bksdm.arch.derive import Derivation
from bksdm.errors import UserError, reading

RECORD = "bksdm.json"


def copy_pipeline(src: Path, out: Path, skip: tuple[str, ...] = ("unet",)) -> None:
    """Copy ``model_index.json`` and every component folder of ``src`` except those in ``skip`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "model_index.json", out / "model_index.json")
    for child in src.iterdir():
        if child.is_dir() and child.name not in skip and not child.name.startswith("."):
            shutil.copytree(child, out / child.name, dirs_exist_ok=True)


def load_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``bksdm.json`` of a pipeline folder, or None when it has none (a teacher, a foreign pipeline)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    with reading(path, "student record", "run bksdm compress again to rewrite it"):
        return json.loads(path.read_text())


def write_record(folder: str | Path, record: dict[str, Any]) -> None:
    (Path(folder) / RECORD).write_text(json.dumps(record, indent=1))


def derivation_for(teacher_cfg: dict[str, Any], student: str) -> Derivation:
    """The derivation of a student given as a spec name/file or as a folder written by ``bksdm compress``; a
    transformer teacher (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) gets its transformer derivation."""
    from bksdm.arch import dit

    record = load_record(student) if Path(student).is_dir() else None
    if record is not None:
        from bksdm.arch.spec import BlockSpec

        source = str(Path(student) / RECORD)
        if dit.is_transformer(teacher_cfg):
            return dit.derive(teacher_cfg, dit.DiTSpec.from_dict(record["spec"], source=source))
        return derive(teacher_cfg, BlockSpec.from_dict(record["spec"], source=source))
    if Path(student).is_dir():
        raise UserError(f"{student} has no {RECORD}; pass a folder written by `bksdm compress`, a spec name or a spec file")
    return dit.derive_backbone(teacher_cfg, load_spec(student, teacher_cfg))


def read_transformer_config(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """(config, folder) of a pipeline's ``transformer/`` (or of a bare transformer folder) when it is an SD3 or
    FLUX transformer; None when the folder has none (a U-Net pipeline)."""
    from bksdm.arch import dit

    for cand in (folder / "transformer", folder):
        path = cand / "config.json"
        if path.is_file():
            with reading(path, "transformer config", "restore it from the model's source"):
                data = json.loads(path.read_text())
            if dit.is_transformer(data):
                return data, cand
            if cand.name == "transformer":
                raise UserError(f"{path} is a {data.get('_class_name')}; supported transformers: "
                                f"{', '.join(dit.BLOCK_LISTS)}")
    return None


def load_transformer(folder: Path, config: dict[str, Any]):
    """The transformer of ``config`` from ``folder`` (one-line error when its weights are missing or corrupt)."""
    import diffusers

    with reading(folder, "transformer", "restore the folder from its source (or run bksdm compress again)"):
        return getattr(diffusers, config["_class_name"]).from_pretrained(folder)


def read_backbone_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """(config, folder) of a pipeline's denoiser: its SD3 / FLUX ``transformer/`` when it has one, else its
    ``unet/`` (:func:`bksdm.hub.read_unet_config`)."""
    from bksdm.hub import read_unet_config

    return read_transformer_config(folder) or read_unet_config(folder)


def load_backbone(folder: Path, teacher_config: dict[str, Any]):
    """The denoiser saved in ``folder`` (a ``unet/`` or ``transformer/`` folder) of the class of ``teacher_config``
    (a U-Net, or the teacher's transformer class): a one-line error when missing or corrupt."""
    from bksdm.arch import dit
    from bksdm.models import load_unet

    return load_transformer(folder, teacher_config) if dit.is_transformer(teacher_config) else load_unet(folder)
