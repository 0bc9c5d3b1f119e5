"""The public DreamBooth benchmark (google/dreambooth): subjects, classes, the 25 evaluation prompts per kind.

Layout: ``DATASET/<subject>/*.jpg`` (one folder per subject, 4-6 photos each). The identifier is ``sks11df``, as
in the official BK-SDM scripts (the DreamBooth paper's ``sks`` is one option away); a subject is "live" (animals: the prompts dress them up) or an object (the prompts change its material).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bksdm.errors import UserError
from bksdm.images import check_crop, list_images, open_image
from bksdm.skips import Unusable

IDENTIFIER = "sks11df"  # BK-SDM scripts/finetune_*.sh and generate_after_*_ft.sh
SUBJECT_CLASSES: dict[str, str] = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock", "colorful_sneaker": "sneaker",
    "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog",
    "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon", "robot_toy": "toy",
    "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase", "wolf_plushie": "stuffed animal",
}
LIVE_SUBJECTS = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
_COMMON = [
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
]
_TAIL = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
OBJECT_PROMPTS = _COMMON + [
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug",
] + _TAIL
LIVE_PROMPTS = _COMMON + [
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit", "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses", "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
] + _TAIL


def prompts(class_name: str, live: bool, identifier: str = IDENTIFIER) -> list[str]:
    """The 25 evaluation prompts of a subject, with the identifier (``a sks dog in the jungle``)."""
    return [p.format(identifier, class_name) for p in (LIVE_PROMPTS if live else OBJECT_PROMPTS)]


def load_subject_images(folder: str | Path, resolution: int | None = None) -> list[Image.Image]:
    """Every image of a subject folder through :func:`bksdm.images.open_image` (upright, RGB); with ``resolution``,
    each must also give a square training crop (:func:`bksdm.images.check_crop`). An error naming the folder if
    it is empty, or the picture and the reason if one cannot be used: a subject has few photos, each chosen."""
    files = list_images(folder, "subject folder")
    images = []
    for f in files:
        try:
            im = open_image(f)
            if resolution:
                check_crop(im.size, resolution, f.name)
        except Unusable as exc:
            raise UserError(f"subject image {f} cannot be used: {exc.reason}" + (f" ({exc.info})" if exc.info else "")
                            + "; remove or replace it") from None
        images.append(im)
    return images


def subjects(dataset: str | Path, only: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """(subject, class, live) of every subject folder in ``dataset`` that the benchmark knows."""
    root = Path(dataset)
    if not root.is_dir():
        raise UserError(f"DreamBooth dataset folder {root} does not exist")
    names = only or sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in SUBJECT_CLASSES)
    if not names:
        raise UserError(f"{root} holds none of the DreamBooth subjects ({', '.join(list(SUBJECT_CLASSES)[:3])}, ...)")
    unknown = [n for n in names if n not in SUBJECT_CLASSES]
    if unknown:
        raise UserError(f"unknown subject {unknown[0]!r}; the benchmark has {', '.join(SUBJECT_CLASSES)}")
    return [(n, SUBJECT_CLASSES[n], n in LIVE_SUBJECTS) for n in names]
