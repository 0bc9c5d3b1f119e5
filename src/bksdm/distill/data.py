"""Training data: (image, caption) sources, the paper's augmentation, and a deterministic, resumable order.

Sources (``open_source``):

* an image folder with ``metadata.csv`` or ``metadata.jsonl`` holding ``file_name`` and ``text`` columns (the
  layout of the public LAION-Aesthetics 212K subset and of Hugging Face ``imagefolder``);
* webdataset tar shards (``data/{00000..00099}.tar`` or a folder of ``.tar`` files): image + ``txt``, streamed;
* ``mini-world`` / ``mini-world:N`` — the procedural shapes world (:mod:`bksdm.mini.world`);
* ``hf:PATH_OR_NAME`` — a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, parquet files, or a hub
  name (the cache only when offline), with ``image_column`` / ``caption_column``; map-style, or streamed;
* any Python object with ``__len__`` and ``get(i) -> (PIL.Image, str)`` (:class:`PairSource`).

Order: sample position ``p`` of the run maps to item ``perm_e[p % n]`` with ``perm_e`` a seeded permutation for
epoch ``e = p // n``; process ``r`` of ``W`` takes positions ``m*B*W + r*B + j`` of micro-batch ``m``. Positions
depend only on the step, so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from PIL import Image

from bksdm.errors import UserError
from bksdm.images import IMAGE_EXTENSIONS, pixels, resize_short_side, short_side_size



class BadSample(Exception):
    """An unreadable or corrupt item: skipped and counted, never fatal."""


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def get(self, index: int) -> tuple[Image.Image, str]: ...


class ImageFolderSource:
    """``folder/metadata.{csv,jsonl}`` with ``file_name`` and ``text``; images relative to the folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        # undecodable bytes become surrogates instead of an exception, so one bad caption costs one row
        open_text = dict(encoding="utf-8", errors="surrogateescape")
        rows: list[tuple[str, str]] = []
        if (self.folder / "metadata.csv").is_file():
            with open(self.folder / "metadata.csv", newline="", **open_text) as f, _no_field_limit():
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
                    raise UserError(f"{self.folder}/metadata.csv needs columns file_name and text (has {reader.fieldnames})")
                rows = [(r["file_name"] or "", r["text"] or "") for r in reader]
        elif (self.folder / "metadata.jsonl").is_file():
            for n, line in enumerate(open(self.folder / "metadata.jsonl", **open_text), 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                        rows.append((r["file_name"], r.get("text") or ""))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{self.folder}/metadata.jsonl line {n} is not a JSON object with file_name and text") from None
        else:
            raise UserError(f"{self.folder} has no metadata.csv or metadata.jsonl (columns file_name, text)")
        if not rows:
            raise UserError(f"dataset {self.folder} is empty (its metadata lists no images)")
        if all(_bad_row(*r) == "not UTF-8" for r in rows):
            raise UserError(f"{self.folder}'s metadata is not UTF-8 text; re-save it as UTF-8")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> tuple[Image.Image, str]:
        name, text = self.rows[index]
        if why := _bad_row(name, text):
            raise BadSample(f"row {index}: {why}")
        try:
            with Image.open(self.folder / name) as im:
                return im.convert("RGB"), text
        except Exception as exc:
            raise BadSample(f"{name}: {type(exc).__name__}") from None


CSV_FIELD_LIMIT = 131_072
"""The csv module's default field limit: a longer caption is not a caption (a broken quote swallowed lines)."""


def _bad_row(name: str, text: str) -> str | None:
    """Why a metadata row cannot be used (undecodable bytes, an over-long caption), or None."""
    if any("\udc80" <= ch <= "\udcff" for ch in name + text):
        return "not UTF-8"
    if len(text) > CSV_FIELD_LIMIT:
        return f"caption of {len(text):,} characters (limit {CSV_FIELD_LIMIT:,})"
    return None


class _no_field_limit:
    """Read over-long fields instead of failing the whole file on them (they are skipped per row)."""

    def __enter__(self):
        self.old = csv.field_size_limit(2**31 - 1)

    def __exit__(self, *exc):
        csv.field_size_limit(self.old)


class MiniWorldSource:
    """``count`` scenes of the shapes world (training indices 0..count-1)."""

    def __init__(self, count: int = 100_000, seed: int = 0):
        from bksdm.mini.world import ShapesWorld

        self.world, self.count = ShapesWorld(seed=seed), count

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> tuple[Image.Image, str]:
        image, text, _ = self.world.sample(index)
        return image, text


class WebDatasetSource:
    """Tar shards of (image, ``txt``) streamed in shard order; only this process's positions are decoded."""

    streamed = True

    def __init__(self, urls: list[str]):
        self.urls = urls

    def samples(self) -> Iterator[dict[str, bytes]]:
        import webdataset as wds

        while True:  # epochs
            got = False
            for sample in wds.WebDataset(self.urls, shardshuffle=False, empty_check=False):
                got = True
                yield sample
            if not got:
                raise UserError(f"webdataset {self.urls[0]} ... holds no samples")

    @staticmethod
    def decode(sample: dict[str, Any]) -> tuple[Image.Image, str]:
        key = next((k[1:] for k in IMAGE_EXTENSIONS if k[1:] in sample), None)
        if key is None or "txt" not in sample:
            raise BadSample(f"{sample.get('__key__')}: needs an image and a txt member")
        try:
            image = Image.open(io.BytesIO(sample[key])).convert("RGB")
        except Exception as exc:
            raise BadSample(f"{sample.get('__key__')}: {type(exc).__name__}") from None
        text = sample["txt"].decode() if isinstance(sample["txt"], bytes) else str(sample["txt"])
        return image, text


class HFDatasetSource:
    """A Hugging Face ``datasets`` dataset of (image, caption) rows. Images are decoded here, not by ``datasets``,
    so an unreadable one is skipped and counted like everywhere else. ``streaming``: read in order, like tar shards."""

    def __init__(self, spec: str, image_column: str = "image", caption_column: str | None = "text", split: str = "train",
                 streaming: bool = False):
        import datasets

        from bksdm.errors import reading

        self.image_column, self.caption_column, self.streamed = image_column, caption_column, streaming
        path = Path(spec).expanduser()
        with reading(spec, "dataset", "pass a save_to_disk folder, parquet files or a hub dataset name (cached when offline)"):
            if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(str(path))
                ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
                ds = ds.to_iterable_dataset() if streaming else ds
            elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
                files = [str(path)] if path.is_file() else sorted(str(f) for f in path.glob("*.parquet"))
                ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
            elif path.exists():
                raise UserError(f"dataset {spec} is neither a save_to_disk folder nor parquet files")
            else:
                ds = datasets.load_dataset(spec, split=split, streaming=streaming)
        columns = list(ds.column_names or [])
        missing = [c for c in (image_column, caption_column) if c is not None and c not in columns]
        if missing:
            raise UserError(f"dataset {spec} has no column {missing[0]!r} (it has {', '.join(columns)}); "
                            f"set image_column= / caption_column=")
        if isinstance(ds.features.get(image_column), datasets.Image):  # keep the bytes: we decode (and skip) ourselves
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, index: int) -> tuple[Image.Image, str]:
        return self.decode(self.ds[index])

    def samples(self) -> Iterator[dict[str, Any]]:
        while True:  # epochs
            yield from self.ds

    def decode(self, row: dict[str, Any]) -> tuple[Image.Image, str]:
        value = row.get(self.image_column)
        text = row.get(self.caption_column) if self.caption_column is not None else ""  # None: images only
        if not isinstance(text, str):
            raise BadSample(f"caption {text!r} is not text")
        try:
            if isinstance(value, dict):  # datasets' undecoded Image: bytes, or a path
                value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
            elif isinstance(value, (bytes, bytearray)):
                value = Image.open(io.BytesIO(value))
            return value.convert("RGB"), text
        except Exception as exc:
            raise BadSample(f"image: {type(exc).__name__}") from None


def open_source(spec: str | Any, **options: Any) -> Any:
    """A source from a CLI string (see module docstring) or an object already implementing the interface;
    ``options`` (image_column, caption_column, split, streaming) apply to ``hf:`` datasets."""
    if not isinstance(spec, str):
        return spec
    if spec.startswith("hf:"):
        return HFDatasetSource(spec[3:], **options)
    if spec.startswith("mini-world"):
        count = spec.split(":", 1)[1] if ":" in spec else "100000"
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"data {spec!r}: the count after mini-world: must be a whole number of at least 1")
        return MiniWorldSource(int(count))
    path = Path(spec)
    if spec.endswith(".tar") or "{" in spec:
        import braceexpand

        return WebDatasetSource(list(braceexpand.braceexpand(spec)))
    if not path.exists():
        raise UserError(f"data folder {spec} does not exist")
    if path.is_dir() and not (path / "metadata.csv").exists() and not (path / "metadata.jsonl").exists():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if tars:
            return WebDatasetSource(tars)
    return ImageFolderSource(path)


def augment(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    """Paper augmentation: resize the short side to ``resolution``, center crop, optional horizontal flip.

    Returns (3, resolution, resolution) float in [-1, 1].
    """
    image = resize_short_side(image, resolution)
    left, top = _crop_origin(image.size, resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    return pixels(image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image)


def _crop_origin(resized: tuple[int, int], resolution: int) -> tuple[int, int]:
    return (resized[0] - resolution) // 2, (resized[1] - resolution) // 2


def size_ids(size: tuple[int, int], resolution: int) -> torch.Tensor:
    """SDXL's size micro-conditioning of a picture of ``size`` (width, height) under :func:`augment`: (original
    height, original width, crop top, crop left, target height, target width), float32 (6,), as diffusers' SDXL
    training script computes it (centre crop; a flip keeps the crop's offsets)."""
    w, h = size
    left, top = _crop_origin(short_side_size(w, h, resolution), resolution)
    return torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32)


class Order:
    """Which item and which flip each sample position gets (deterministic in seed and position)."""

    def __init__(self, n: int, seed: int, flip: bool):
        self.n, self.seed, self.flip = n, seed, flip
        self._perms: dict[int, torch.Tensor] = {}

    def item(self, position: int) -> tuple[int, bool]:
        epoch = position // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))}
        index = int(self._perms[epoch][position % self.n])
        flipped = self.flip and bool(torch.randint(2, (), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + position)))
        return index, flipped


def positions(micro: int, batch: int, rank: int, world: int) -> range:
    """Sample positions of micro-batch ``micro`` read by process ``rank`` of ``world``."""
    start = micro * batch * world + rank * batch
    return range(start, start + batch)
