"""The shipped mini teacher: its architecture constants, the checksummed loader and the asset format.

The recipe that trains it is ``bksdm.recipes.mini_teacher`` (``bksdm mini-teacher``); the
shipped weights' stages and commands are in ``assets/teacher/training.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from bksdm.arch.dit import DiTSpec
from bksdm.arch.spec import BlockSpec
from bksdm.images import pixels
from bksdm.mini.world import ShapesWorld
from bksdm.errors import UserError

ASSET = Path(__file__).parent / "assets" / "teacher"
SDXL_ASSET = Path(__file__).parent / "assets" / "teacher_sdxl"
SD3_ASSET = Path(__file__).parent / "assets" / "teacher_sd3"
ASSETS = {"sd": ASSET, "sdxl": SDXL_ASSET, "sd3": SD3_ASSET}
"""The shipped teachers by family: SD-v1 layout (the demo's), SDXL layout (``bksdm ablate --family sdxl``) and SD3
layout (MMDiT, flow matching; ``bksdm ablate --family sd3``; docs/mini-world.md, "SD3 layout")."""
CHECKSUMS = "checksums.json"
TEACHER_UNET = dict(channels=(32, 64, 64, 64), cross_attention_dim=64, groups=8, heads=4)
TEXT_LAYERS = 4
TEXT_EMBED_STD = 1.0  # the shipped text encoder's initial embedding scale (see bksdm.mini.model.text_encoder)
VAE_SHIFT = 0.75  # about the mean pixel value of world pictures in [-1, 1]: centres the latents
SDXL_TEACHER_UNET = dict(channels=(32, 64, 64), depth=(1, 2, 2), text_width=64, pooled_width=32, latent_channels=12,
                         sample_size=16, groups=8, heads=4)
"""An SDXL-layout mini teacher (``mini-teacher family=sdxl``): transformer depth 2 in both attention stages, two
32-wide text encoders, the same world and VAE as the shipped SD-layout one."""
SD3_TEACHER_TRANSFORMER = dict(layers=8, heads=4, head_dim=32, text_width=64, pooled_width=64, latent_channels=12,
                               sample_size=16)
"""An SD3-layout mini teacher (``mini-teacher family=sd3``): 8 joint (MMDiT) blocks 128 wide (4 heads of 32), 2x2
patches of the world's 16x16x12 latents (64 image tokens), two 4-layer 32-wide CLIP text encoders with 32-d pooled
projections (``joint_attention_dim`` and ``pooled_projection_dim`` 64), no T5; 4,663,088 transformer parameters.
Eight blocks so that removing half of them (first half, middle, last half, alternate) leaves four."""
KOALA_MINI = BlockSpec("koala-mini", down=((0,), (0,), (0,)), mid=False, up=((0, 2), (0, 2), (0, 2)),
                       depth={"down": (None, None, (0,)), "mid": None, "up": ((0,), None, None)})
"""KOALA-700M's rules on the SDXL-layout mini teacher: BK-style block removal (each down stage keeps its first
block, each up stage its first and last), the mid-block removed, and the innermost stage's transformer depth
halved (2 -> 1, as KOALA cuts SDXL's 10 -> 5) while the stage before keeps its depth 2."""
MEASURED_SMALL = BlockSpec("measured-small", down=((0, 1), (0,), (0,), None), mid=True,
                           up=(None, (1, 2), (1, 2), (0, 1, 2)))
"""The demo's student: the block choice ``bksdm compress --student auto --budget params=1923276`` makes from
``bksdm rank`` of the shipped teacher (mini-world:256, seed 0) — BK-Small's parameter count (1,875,372 against
1,923,276), spent differently. BK-Small removes one pair of every stage; the measurement keeps the outermost
(32-pixel) stage whole and removes the innermost stage, whose removal changes the teacher's output least. Tested
against a fresh ranking in the slow tier (``tests/test_mini.py``); docs/mini-world.md says why the demo uses it."""
SD3_FIRST_HALF = DiTSpec("sd3-first-half", (("transformer_blocks", (4, 5, 6, 7)),))
"""Removes the first half of the SD3-layout teacher's joint blocks (0-3), keeping 4-7."""
SD3_MIDDLE = DiTSpec("sd3-middle", (("transformer_blocks", (0, 1, 6, 7)),))
"""Removes the middle four joint blocks (2-5), keeping 0, 1, 6 and 7: BK-SDM's choice (the middle goes, the
ends stay) carried to depth."""
SD3_LAST_HALF = DiTSpec("sd3-last-half", (("transformer_blocks", (0, 1, 2, 7)),))
"""Removes the last half but one (blocks 3-6), keeping 0, 1, 2 and 7: block 7 stays because an SD3 student's last
block must be the teacher's last (diffusers builds it without a text-stream output, ``context_pre_only``, so no
other block has its shapes; :func:`bksdm.arch.dit.check_spec`), so the removed half is 3-6 rather than 4-7."""
SD3_ALTERNATE = DiTSpec("sd3-alternate", (("transformer_blocks", (1, 3, 5, 7)),))
"""Removes every other joint block (0, 2, 4, 6), keeping 1, 3, 5 and 7: depth thinned evenly."""
SD3_SPECS = {s.name: s for s in (SD3_FIRST_HALF, SD3_MIDDLE, SD3_LAST_HALF, SD3_ALTERNATE)}
"""``bksdm ablate --family sd3``'s students: four of the eight joint blocks of :data:`SD3_TEACHER_TRANSFORMER`
removed in four places, block 7 kept by all (SD3's rule above), so every student has three ordinary joint blocks
and the last one: the same parameter count (2,288,432 of 4,663,088) and the same compute; only which blocks remain
differs."""
MINI_SPECS = {"koala-mini": KOALA_MINI, "measured-small": MEASURED_SMALL, **SD3_SPECS}


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1]."""
    return torch.stack([pixels(im) for im in images])


def world_batch(world: ShapesWorld, start: int, batch: int, gen: torch.Generator, drop: float = 0.1):
    """A training batch: images in [-1, 1] (no flip: it would contradict "left"/"right" in the captions) and
    captions, each emptied with probability ``drop`` so classifier-free guidance has an unconditional model."""
    images, texts = [], []
    for i in range(start, start + batch):
        im, text, _ = world.sample(i)
        images.append(im)
        texts.append("" if torch.rand((), generator=gen) < drop else text)
    return to_tensor(images), texts


def save_teacher(pipe, out: Path, info: dict) -> None:
    """Save in fp16 safetensors with a checksum file (the shipped asset format)."""
    out = Path(out)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(dtype=torch.float32)
    (out / "training.json").write_text(json.dumps(info, indent=1))
    write_checksums(out)


def write_checksums(folder: Path) -> None:
    """sha256 of every weight file of the pipeline's components (not of checkpoints saved beside them)."""
    index = json.loads((folder / "model_index.json").read_text())
    files = [p for name in index if (folder / name).is_dir() for p in sorted((folder / name).glob("*.safetensors"))]
    (folder / CHECKSUMS).write_text(json.dumps({str(p.relative_to(folder)): _sha256(p) for p in files}, indent=1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher_path(path: Path | None = None, family: str = "sd") -> Path:
    """The shipped teacher folder of ``family`` ('sd', 'sdxl' or 'sd3'; or ``path``), after verifying every weight
    file's sha256."""
    path = Path(path) if path else ASSETS[family]
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        how = "--out DIR" if family == "sd" else f"--out DIR family={family}"
        raise UserError(f"no mini teacher at {path} (missing {CHECKSUMS}); train one with `bksdm mini-teacher {how}`")
    for rel, digest in json.loads(sums_file.read_text()).items():
        f = path / rel
        if not f.is_file() or _sha256(f) != digest:
            raise UserError(f"mini teacher file {f} is missing or corrupt (sha256 mismatch); reinstall bksdm or retrain it")
    return path


def load_teacher(path: Path | None = None, dtype: torch.dtype = torch.float32, family: str = "sd"):
    """A mini teacher as the pipeline its folder names (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
    ``StableDiffusion3Pipeline``; fp32 by default, weights ship in fp16)."""
    from diffusers import DiffusionPipeline

    import bksdm.mini.model  # noqa: F401  (diffusers loads the VAE class only from an imported module)
    from bksdm.models import absent_components

    folder = teacher_path(path, family)
    return DiffusionPipeline.from_pretrained(folder, dtype=dtype, **absent_components(folder))  # SD3: no T5
