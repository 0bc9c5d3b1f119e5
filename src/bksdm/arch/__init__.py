"""Architecture: teacher families, block-removal specs and everything derived from them."""

from bksdm.arch.families import FAMILIES, family_unet_config, detect_family
from bksdm.arch.spec import BlockSpec, BUILTIN_SPECS, SDXL_SPECS, builtin_specs, load_spec
from bksdm.arch.derive import Derivation, derive
from bksdm.arch.transfer import init_student_from_teacher
from bksdm.arch.dit import DiTSpec

__all__ = [
    "FAMILIES",
    "family_unet_config",
    "detect_family",
    "BlockSpec",
    "BUILTIN_SPECS",
    "SDXL_SPECS",
    "builtin_specs",
    "load_spec",
    "Derivation",
    "derive",
    "init_student_from_teacher",
    "DiTSpec",
]
