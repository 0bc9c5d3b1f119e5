"""Build a student backbone (U-Net or transformer) and initialise it from the teacher's weights through the derived
key map."""

from __future__ import annotations

from bksdm.arch import dit
from bksdm.arch.derive import Derivation, meta_unet


def meta_backbone(derivation: Derivation):
    """The student of ``derivation`` on the meta device: a ``UNet2DConditionModel``, or the teacher's transformer
    class (``SD3Transformer2DModel``, ``FluxTransformer2DModel``) for a transformer teacher."""
    if dit.is_transformer(derivation.teacher_config):
        return dit.meta_model({**derivation.student_config, "_class_name": derivation.teacher_config["_class_name"]})
    return meta_unet(derivation.student_config)


def init_student_from_teacher(teacher, derivation: Derivation):
    """A new student backbone of the derived config whose every tensor is a copy of its teacher tensor.

    The key map was checked when it was derived; here we check again against the live teacher (every student
    tensor mapped, the source present with the same shape, nothing left on meta), so a teacher whose weights
    differ from its config cannot load silently.
    """
    teacher_sd = teacher.state_dict()
    student = meta_backbone(derivation)  # filled below by assignment: no random init is computed
    student_sd = student.state_dict()
    missing = [k for k in student_sd if k not in derivation.key_map]
    if missing:
        raise AssertionError(f"key map misses student tensors: {missing[:5]}")
    new_sd = {}
    for key, target in student_sd.items():
        src = teacher_sd.get(derivation.key_map[key])
        if src is None or src.shape != target.shape:
            raise AssertionError(f"student tensor {key} {tuple(target.shape)} has no teacher tensor of that shape "
                                 f"({derivation.key_map[key]}: {None if src is None else tuple(src.shape)})")
        new_sd[key] = src.detach().clone()
    student.load_state_dict(new_sd, strict=True, assign=True)
    meta = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if meta:
        raise AssertionError(f"student tensors left uninitialised: {meta[:5]}")
    return student.to(dtype=next(teacher.parameters()).dtype)
