"""Build a student U-Net and initialise it from the teacher's weights through the derived key map."""

from __future__ import annotations

from bksdm.arch.derive import Derivation, meta_unet


def init_student_from_teacher(teacher, derivation: Derivation):
    """A new ``UNet2DConditionModel`` of the student config whose every tensor is a copy of its teacher tensor.

    The key map was checked when it was derived; here we check again against the live teacher (shapes and
    coverage), so a teacher whose weights differ from its config cannot load silently.
    """
    teacher_sd = teacher.state_dict()
    student = meta_unet(derivation.student_config)  # filled below by assignment: no random init is computed
    student_keys = student.state_dict().keys()
    missing = [k for k in student_keys if k not in derivation.key_map]
    if missing:
        raise AssertionError(f"key map misses student tensors: {missing[:5]}")
    new_sd = {}
    for key in student_keys:
        src = teacher_sd[derivation.key_map[key]]
        new_sd[key] = src.detach().clone()
    student.load_state_dict(new_sd, strict=True, assign=True)
    meta = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if meta:
        raise AssertionError(f"student tensors left uninitialised: {meta[:5]}")
    return student.to(dtype=next(teacher.parameters()).dtype)
