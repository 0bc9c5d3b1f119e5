"""`bksdm compress`: a teacher pipeline in, a complete student pipeline folder out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bksdm.arch import derive, init_student_from_teacher, load_spec
from bksdm.errors import UserError, check_output
from bksdm.hub import read_unet_config, resolve_model
from bksdm.cards import write_model_card
from bksdm.pipelines import copy_pipeline, load_transformer, read_transformer_config, write_record
from bksdm.profile import count_params


def compress(teacher: str, student: str, out: str | Path, overwrite: bool = False, budget: str | None = None,
             ranking: str | Path | None = None) -> dict[str, Any]:
    """Write the student pipeline of ``student`` (a built-in name or spec file, or ``auto``) for ``teacher`` into
    ``out``.

    ``out`` receives the teacher's other components unchanged, the initialised student ``unet/`` (safetensors)
    and ``bksdm.json`` (spec, module and key maps, layer pairs, parameter counts). ``student="auto"``: the spec is
    chosen from ``ranking`` (a `bksdm rank` file of this teacher) to meet ``budget`` (:func:`bksdm.rank.choose`),
    written as ``out/spec.yaml`` and recorded with its choices. Returns the record.
    """
    import torch

    from bksdm.models import load_unet

    src = resolve_model(teacher, "teacher")
    if read_transformer_config(src) is not None:
        return compress_transformer(teacher, src, student, out, overwrite, budget, ranking)
    teacher_cfg, unet_dir = read_unet_config(src)
    spec, chosen = student_spec(teacher_cfg, student, budget, ranking)
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
        **({"chosen_by_measurement": chosen} if chosen else {}),
        "params": {"teacher_unet": count_params(teacher_unet), "student_unet": count_params(student_unet)},
        "student_config": derivation.student_config,
    }
    write_record(out, record)
    if chosen:
        write_spec_file(out, spec, budget, ranking)
    write_model_card(out, record, teacher_cfg, record["params"],
                     {"status": "initialised from the teacher's weights, not yet distilled (bksdm distill retrains it)"})
    del teacher_unet
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return record


def student_spec(teacher_cfg: dict[str, Any], student: str, budget: str | None, ranking: str | Path | None,
                 text_side: dict[str, Any] | None = None):
    """(spec, what the measured choice records or None): a built-in name or spec file, or ``auto`` chosen from
    ``ranking`` for ``budget`` (:func:`auto_spec`); ``--budget`` / ``--ranking`` without ``auto`` are refused."""
    if student == "auto":
        return auto_spec(teacher_cfg, budget, ranking, text_side)
    if budget or ranking:
        raise UserError("--budget and --ranking choose the student: use them with --student auto")
    return load_spec(student, teacher_cfg), None


def compress_transformer(teacher: str, src: Path, student: str, out: str | Path, overwrite: bool = False,
                         budget: str | None = None, ranking: str | Path | None = None) -> dict[str, Any]:
    """:func:`compress` for a pipeline whose denoiser is ``transformer/`` (SD3 / SD3.5, FLUX.1): the student
    transformer built from the derived config and filled from the teacher through the asserted key map, the other
    components copied unchanged, ``bksdm.json`` and the model card written; ``student="auto"`` as for a U-Net
    (:func:`auto_spec`, a ranking of this transformer), with ``spec.yaml`` written."""
    from bksdm.arch import dit
    from bksdm.models import pipeline_family

    teacher_cfg, folder = read_transformer_config(src)
    side = pipeline_family(src).cache_meta() if student == "auto" and (src / "model_index.json").is_file() else None
    spec, chosen = student_spec(teacher_cfg, student, budget, ranking, side)
    derivation = dit.derive(teacher_cfg, spec)  # fails on a bad spec before any weights
    if not (src / "model_index.json").is_file():
        raise UserError(f"{src} is a bare transformer; compress needs a whole pipeline folder (with model_index.json)")
    out = check_output(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; choose another or pass --overwrite")
    teacher_model = load_transformer(folder, teacher_cfg)
    student_model = init_student_from_teacher(teacher_model, derivation)
    copy_pipeline(src, out, skip=("transformer",))
    student_model.save_pretrained(out / "transformer", safe_serialization=True)
    record = {
        "teacher": teacher,
        "backbone": teacher_cfg["_class_name"],
        **derivation.record(),
        **({"chosen_by_measurement": chosen} if chosen else {}),
        "params": {"teacher_transformer": count_params(teacher_model), "student_transformer": count_params(student_model)},
        "student_config": derivation.student_config,
    }
    write_record(out, record)
    if chosen:
        write_spec_file(out, spec, budget, ranking)
    write_model_card(out, record, teacher_cfg, record["params"],
                     {"status": "initialised from the teacher's weights, not yet distilled (bksdm distill retrains it)"})
    return record


def write_spec_file(out: Path, spec: Any, budget: str | None, ranking: str | Path | None) -> None:
    """``OUT/spec.yaml``: the chosen spec as an ordinary spec file (edit it, or compress other teachers with it)."""
    import yaml

    (out / "spec.yaml").write_text(f"# chosen by bksdm compress --student auto --budget {budget} from {ranking}\n"
                                   + yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None))


def auto_spec(teacher_cfg: dict[str, Any], budget: str | None, ranking: str | Path | None,
              text_side: dict[str, Any] | None = None):
    """(spec, what to record) for ``--student auto``: the ranking must be of this teacher's architecture and, for a
    transformer, of its text side (``text_side``: the family's ``cache_meta``; SD3 with and without T5 share one
    transformer config but not its inputs)."""
    from bksdm.arch.dit import is_transformer
    from bksdm.rank import choose, load_ranking

    if not budget or not ranking:
        raise UserError("--student auto needs --budget (e.g. params=0.55) and --ranking (a file from bksdm rank)")
    rec = load_ranking(ranking)
    ranked, ours = ({k: v for k, v in c.items() if not k.startswith("_")} for c in (rec["teacher_config"], teacher_cfg))
    if ranked != ours:  # a U-Net's and a transformer's configs never match
        net = rec["teacher_config"].get("_class_name", "U-Net") if is_transformer(rec["teacher_config"]) else "U-Net"
        raise UserError(f"ranking {ranking} was measured on another {net} ({rec['teacher']}); rank this teacher first")
    if text_side is not None and rec.get("text_side", text_side) != text_side:
        raise UserError(f"ranking {ranking} was measured with another text side ({rec['text_side']}, this teacher: "
                        f"{text_side}; e.g. SD3 with and without T5); rank this teacher first")
    spec, trace = choose(rec, budget)
    return spec, {"budget": budget, "ranking": str(ranking), "ranked_on": f"{rec['samples']} pictures of {rec['data']}",
                  "steps": trace, "units": [{k: r[k] for k in ("name", "rel_mse", "params_saved")} for r in rec["units"]]}
