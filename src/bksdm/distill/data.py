"""Training data: (image, caption) sources, the paper's augmentation, and a deterministic, resumable order.

Sources (``open_source``):

* an image folder with ``metadata.csv`` or ``metadata.jsonl`` holding ``file_name`` and ``text`` columns (the
  layout of the public LAION-Aesthetics 212K subset and of Hugging Face ``imagefolder``; a byte-order mark is
  fine; ``caption`` or ``prompt`` is read, with a note, when ``text`` is absent; ``caption_column`` names another);
* webdataset tar shards (``data/{00000..00099}.tar`` or a folder of ``.tar`` files): image + ``txt``, streamed
  (sample names with dots, ``img.001.jpg``, are grouped by the name up to the last dot, with a note);
* ``mini-world`` / ``mini-world:N`` — the procedural shapes world (:mod:`bksdm.mini.world`);
* ``hf:PATH_OR_NAME`` — a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, parquet files, or a hub
  name (the cache only when offline), with ``image_column`` / ``caption_column``; map-style, or streamed;
* any Python object with ``__len__`` and ``get(i) -> (PIL.Image, str)`` (:class:`PairSource`).

Pictures are opened by :func:`bksdm.images.open_image` (orientation, modes, transparency, size limits); an item
that cannot be used raises :class:`BadSample` (:class:`bksdm.skips.Unusable`) with its reason, and the loader
skips it and counts it by reason.

Order: sample position ``p`` of the run maps to item ``perm_e[p % n]`` with ``perm_e`` a seeded permutation for
epoch ``e = p // n``; process ``r`` of ``W`` takes positions ``m*B*W + r*B + j`` of micro-batch ``m``. Positions
depend only on the step, so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from PIL import Image

from bksdm.errors import UserError, note
from bksdm.images import IMAGE_EXTENSIONS, open_image, pixels, resize_short_side, short_side_size
from bksdm.skips import Unusable

BadSample = Unusable
"""An unusable item (a bad picture, a missing or undecodable caption): skipped and counted with its reason."""

CAPTION_KEYS = ("text", "caption", "prompt")
"""Caption column names a metadata file may use: ``text`` (Hugging Face ``imagefolder``) is the default; when it is
absent and exactly one of the others is there, that one is read and a one-line note says so."""


def caption_key(columns: list[str], wanted: str, where: str) -> str:
    """The caption column of ``where`` among ``columns``: ``wanted`` when present; else, when ``wanted`` is the
    default (``text``) and exactly one other of :data:`CAPTION_KEYS` is present, that one (with a note); else a
    one-line error naming the columns found and ``option``."""
    if wanted in columns:
        return wanted
    others = [k for k in CAPTION_KEYS if k in columns]
    if wanted == CAPTION_KEYS[0] and len(others) == 1:
        note(f"{where} has no {wanted!r} column; reading captions from {others[0]!r}")
        return others[0]
    raise UserError(f"{where} has no caption column {wanted!r} (it has {', '.join(map(str, columns)) or 'none'}); "
                    f"rename it or pass --caption-column NAME (caption_column=NAME in a config)")


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def get(self, index: int) -> tuple[Image.Image, str]: ...


def read_metadata(folder: Path) -> tuple[list[dict[str, Any]], list[str], str]:
    """Rows, columns and file name of ``folder/metadata.csv`` or ``metadata.jsonl`` (UTF-8, a byte-order mark
    allowed, as Excel writes "CSV UTF-8"); undecodable bytes become surrogates, so one bad row costs one row."""
    open_text = dict(encoding="utf-8-sig", errors="surrogateescape")
    for name in ("metadata.csv", "metadata.jsonl"):
        if (folder / name).is_file():
            with open(folder / name, "rb") as f:
                if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
                    raise UserError(f"{folder}/{name} is UTF-16 text; re-save it as UTF-8")
    if (folder / "metadata.csv").is_file():
        with open(folder / "metadata.csv", newline="", **open_text) as f, _no_field_limit():
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            twice = sorted({c for c in columns if columns.count(c) > 1})
            if twice:  # DictReader would silently keep the last of them
                raise UserError(f"{folder}/metadata.csv has the column {twice[0]!r} more than once; keep one")
            return list(reader), columns, "metadata.csv"
    if (folder / "metadata.jsonl").is_file():
        rows, columns = [], {}
        with open(folder / "metadata.jsonl", **open_text) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or "file_name" not in row:
                    raise UserError(f"{folder}/metadata.jsonl line {n} is not a JSON object with file_name") from None
                rows.append(row)
                columns.update(dict.fromkeys(row))
        return rows, list(columns), "metadata.jsonl"
    raise UserError(f"{folder} has no metadata.csv or metadata.jsonl (columns file_name, text)")


class ImageFolderSource:
    """``folder/metadata.{csv,jsonl}`` with ``file_name`` and a caption column (``text``, see :func:`caption_key`);
    images relative to the folder, opened by :func:`bksdm.images.open_image`."""

    def __init__(self, folder: str | Path, caption_column: str = "text"):
        self.folder = Path(folder)
        rows, columns, fname = read_metadata(self.folder)
        if "file_name" not in columns:
            raise UserError(f"{self.folder}/{fname} needs a file_name column (it has {', '.join(columns) or 'none'})")
        key = caption_key(columns, caption_column, f"{self.folder}/{fname}")
        # a caption that is absent from its row (jsonl) or not text is that row's fault, skipped with its reason
        self.rows = [(str(r.get("file_name") or ""), r.get(key)) for r in rows]
        if not self.rows:
            raise UserError(f"dataset {self.folder} is empty (its metadata lists no images)")
        if all(_bad_row(*r) == "not UTF-8" for r in self.rows):
            raise UserError(f"{self.folder}'s metadata is not UTF-8 text; re-save it as UTF-8")

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> tuple[Image.Image, str]:
        name, text = self.rows[index]
        if not name:
            raise BadSample("no file name", f"row {index}")
        if why := _bad_row(name, text):
            raise BadSample(why, f"row {index}", name)
        return open_image(self.folder / name, name), text


CSV_FIELD_LIMIT = 131_072
"""The csv module's default field limit: a longer caption is not a caption (a broken quote swallowed lines)."""


def _bad_row(name: str, text: Any) -> str | None:
    """Why a metadata row cannot be used (no caption, undecodable bytes, an over-long caption), or None."""
    if text is None:
        return "no caption"
    if not isinstance(text, str):
        return "caption is not text"
    if any("\udc80" <= ch <= "\udcff" for ch in name + text):
        return "not UTF-8"
    if len(text) > CSV_FIELD_LIMIT:
        return "caption too long"
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


CAPTION_MEMBERS = ("txt", "caption", "text")
"""Tar members read as the caption, by extension, in this order (webdataset's convention is ``txt``)."""
IMAGE_KEYS = {e[1:] for e in IMAGE_EXTENSIONS}


class WebDatasetSource:
    """Tar shards of (image, ``txt``) streamed in shard order; only this process's positions are decoded.

    Members are grouped into samples as webdataset groups them: consecutive members sharing the name up to the
    first dot of the file name, each stored under the rest (``000001.jpg``, ``000001.seg.png``, ``000001.txt`` ->
    ``jpg``, ``seg.png``, ``txt``); hidden members (macOS ``._000001.jpg``) are left out, as webdataset leaves them.
    One exception, where that grouping is plainly wrong: when sample names themselves hold dots (``img.001.jpg``,
    ``img.001.txt``, ``img.002.jpg``, ...), webdataset makes one sample without any plain image or caption member;
    if grouping such a run by the name up to the last dot gives samples that each have an image and a caption,
    those samples are read, and a one-line note says so."""

    streamed = True

    def __init__(self, urls: list[str]):
        self.urls, self._noted = urls, False

    def samples(self) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tar_file_expander, url_opener

        while True:  # epochs
            got = False
            members = tar_file_expander(url_opener({"url": u} for u in self.urls), eof_value=None)
            for sample in self._grouped(members):
                got = True
                yield sample
            if not got:
                raise UserError(f"webdataset {self.urls[0]} ... holds no samples")

    def _grouped(self, members: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        group: list[tuple[str, str, bytes]] = []  # (member name, suffix after the first dot, bytes)
        key = None
        for m in members:
            name = m["fname"]
            folder, _, base = name.rpartition("/")
            if base.startswith(".") or "." not in base:
                continue  # hidden (AppleDouble) or no extension: not a sample member (webdataset drops both)
            stem, suffix = base.split(".", 1)
            first = f"{folder}/{stem}" if folder else stem
            if first != key and group:
                yield from self._split(key, group)
                group = []
            key = first
            group.append((name, suffix.lower(), m["data"]))
        if group:
            yield from self._split(key, group)

    def _split(self, key: str, group: list[tuple[str, str, bytes]]) -> Iterator[dict[str, Any]]:
        plain = {sfx for _, sfx, _ in group}
        if plain & IMAGE_KEYS or plain & set(CAPTION_MEMBERS):  # webdataset's own grouping reads this sample
            yield {"__key__": key, **{sfx: d for _, sfx, d in group}}
            return
        stems: dict[str, dict[str, Any]] = {}
        for name, _, data in group:
            stem, _, ext = name.rpartition(".")
            stems.setdefault(stem, {"__key__": stem})[ext.lower()] = data
        complete = all(set(v) & IMAGE_KEYS and set(v) & set(CAPTION_MEMBERS) for v in stems.values())
        if not complete:  # not dotted sample names: keep webdataset's sample (decode says what it lacks)
            yield {"__key__": key, **{sfx: d for _, sfx, d in group}}
            return
        if not self._noted:
            self._noted = True
            note(f"webdataset {self.urls[0]}: sample names contain dots ({group[0][0]}); "
                 "grouping members by the name up to the last dot")
        yield from stems.values()

    @staticmethod
    def decode(sample: dict[str, Any]) -> tuple[Image.Image, str]:
        key = sample.get("__key__")
        ext = next((k[1:] for k in IMAGE_EXTENSIONS if k[1:] in sample), None)
        caption = next((k for k in CAPTION_MEMBERS if k in sample), None)
        if ext is None:
            raise BadSample("no image member", str(key))
        if caption is None:
            raise BadSample("no caption", str(key))
        text = sample[caption]
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise BadSample("not UTF-8", f"{key}.{caption}") from None
        return open_image(sample[ext], f"{key}.{ext}"), str(text)


class HFDatasetSource:
    """A Hugging Face ``datasets`` dataset of (image, caption) rows. Images are decoded here, not by ``datasets``,
    so an unreadable one is skipped and counted like everywhere else; a cell that holds only a remote or chained
    path (``zip://...::hf://...``) is fetched by ``datasets``' own ``Image.decode_example``, as ``datasets`` would.
    ``streaming``: read in order, like tar shards."""

    def __init__(self, spec: str, image_column: str = "image", caption_column: str | None = "text", split: str = "train",
                 streaming: bool = False):
        import datasets

        from bksdm.errors import reading

        self.image_column, self.streamed = image_column, streaming
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
        if image_column not in columns:
            raise UserError(f"dataset {spec} has no column {image_column!r} (it has {', '.join(columns)}); "
                            f"pass --image-column NAME (image_column=NAME in a config)")
        self.caption_column = None if caption_column is None else caption_key(columns, caption_column, f"dataset {spec}")
        if isinstance(ds.features.get(image_column), datasets.Image):  # keep the bytes: we decode (and skip) ourselves
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, index: int) -> tuple[Image.Image, str]:
        return self.decode(self.ds[index], f"row {index}")

    def samples(self) -> Iterator[dict[str, Any]]:
        while True:  # epochs
            yield from self.ds

    def decode(self, row: dict[str, Any], name: str = "row") -> tuple[Image.Image, str]:
        value = row.get(self.image_column)
        text = row.get(self.caption_column) if self.caption_column is not None else ""  # None: images only
        if why := _bad_row("", text):
            raise BadSample(why, name)
        if isinstance(value, str):  # a column of paths
            value = {"path": value, "bytes": None}
        if isinstance(value, dict):  # datasets' undecoded Image: bytes, a local path, or a remote / chained one
            path = value.get("path")
            if value.get("bytes"):
                value = value["bytes"]
            elif path and Path(path).is_file():
                value = Path(path)
            elif path:
                value = _fetched(value, f"{name} ({path})")
            else:
                raise BadSample("no image", name)
        if value is None:
            raise BadSample("no image", name)
        return open_image(value, name), text


def _fetched(value: dict[str, Any], name: str) -> Image.Image:
    """A remote or chained image path opened by ``datasets`` itself (its ``xopen``, tokens and URL chains)."""
    import datasets

    try:
        return datasets.Image().decode_example(value)
    except FileNotFoundError:
        raise BadSample("missing file", name) from None
    except Exception as exc:
        from bksdm.errors import short

        raise BadSample("cannot be fetched", name, short(exc, 80)) from None


def open_source(spec: str | Any, **options: Any) -> Any:
    """A source from a CLI string (see module docstring) or an object already implementing the interface;
    ``options`` (image_column, caption_column, split, streaming) apply to ``hf:`` datasets, ``caption_column`` to
    image folders too."""
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
    return ImageFolderSource(path, options.get("caption_column") or "text")


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
