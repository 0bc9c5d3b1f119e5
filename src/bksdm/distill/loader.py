"""Micro-batches for one process, from an image source or a latent/text cache, resumable at any step."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from bksdm.distill.data import BadSample, Order, augment, positions, size_ids
from bksdm.images import to_rgb


SKIP = "skip"
"""The key that marks a skipped item in a micro-batch (its value: the reason)."""


class _Positions(torch.utils.data.Dataset):
    """Item ``k`` of this process's stream = sample position ``positions(start + k // B, ...)[k % B]``."""

    def __init__(self, source, order: Order, resolution: int, batch: int, rank: int, world: int, start_micro: int):
        self.source, self.order, self.resolution = source, order, resolution
        self.batch, self.rank, self.world, self.start = batch, rank, world, start_micro

    def __len__(self) -> int:
        return 10**12  # endless: the recipe stops at max_steps

    def __getitem__(self, k: int) -> dict[str, Any]:
        pos = positions(self.start + k // self.batch, self.batch, self.rank, self.world)[k % self.batch]
        index, flip = self.order.item(pos)
        try:
            return _item(self.source, index, flip, self.resolution)
        except BadSample as exc:
            return _skip(exc, f"item {index}")


def _skip(exc: BadSample, where: str) -> dict[str, Any]:
    """A skipped item's place in a micro-batch: its reason travels with it (from loader workers too)."""
    return {SKIP: exc.reason, "detail": exc.detail or where}


def _item(source, index: int, flip: bool, resolution: int) -> dict[str, Any]:
    if getattr(source, "is_cache", False):
        return source.item(index, flip)
    image, text = source.get(index)
    return _pixels_item(image, text, flip, resolution, f"item {index}")


def _pixels_item(image, text: str, flip: bool, resolution: int, where: str) -> dict[str, Any]:
    if image.mode != "RGB":  # a Python source (PairSource) may hand any mode: the same policy as files
        image = to_rgb(image, where)
    try:
        pixels = augment(image, resolution, flip)
    except BadSample as exc:  # too thin or too small for the crop: name the item, the picture cannot
        raise BadSample(exc.reason, where, exc.info) from None
    return {"pixels": pixels, "text": text, "size_ids": size_ids(image.size, resolution)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable items; ``skipped`` counts the others and ``skip_reasons`` lists (reason, detail) pairs."""
    good = [it for it in items if SKIP not in it]
    out: dict[str, Any] = {"skipped": len(items) - len(good),
                           "skip_reasons": [(it[SKIP], it["detail"]) for it in items if SKIP in it]}
    if good:
        for key in good[0]:
            vals = [it[key] for it in good]
            out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def micro_batches(source, seed: int, flip: bool, resolution: int, batch: int, rank: int, world: int,
                  start_micro: int, num_workers: int = 0) -> Iterator[dict[str, Any]]:
    """Endless micro-batches for process ``rank`` starting at micro-batch ``start_micro``.

    Each batch is a dict with ``pixels`` (B, 3, R, R), ``text`` (list) and ``size_ids`` (B, 6), or, from a cache,
    ``mean``/``std`` (B, C, h, w), the family's cached conditioning (``emb`` (B, L, D), ...) and ``size_ids`` when
    the cache has them; plus ``skipped``, the count of unusable items left out, and ``skip_reasons``, their
    (reason, detail) pairs.
    """
    if getattr(source, "streamed", False):
        yield from _streamed(source, seed, flip, resolution, batch, rank, world, start_micro)
        return
    ds = _Positions(source, Order(len(source), seed, flip), resolution, batch, rank, world, start_micro)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=num_workers, collate_fn=collate,
                                         persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers else None)
    yield from loader


def _streamed(source, seed, flip, resolution, batch, rank, world, start_micro):
    """Webdataset: walk the stream in order, decode only this process's positions from ``start_micro`` on."""
    order = Order(1, seed, flip)  # only the flip part is used: a stream has no permutation
    items: list[dict[str, Any]] = []
    micro = start_micro
    wanted = positions(micro, batch, rank, world)
    for pos, raw in enumerate(source.samples()):
        if pos < wanted.start:
            continue
        if pos in wanted:
            try:
                image, text = source.decode(raw)
                items.append(_pixels_item(image, text, order.item(pos)[1], resolution, str(raw.get("__key__", pos))))
            except BadSample as exc:
                items.append(_skip(exc, f"sample {pos}"))
        if pos == wanted.stop - 1:
            yield collate(items)
            items, micro = [], micro + 1
            wanted = positions(micro, batch, rank, world)


def usable_pictures(source, seed: int, resolution: int, samples: int) -> tuple[list[dict[str, Any]], Any]:
    """Up to ``samples`` usable micro-batches of one picture each, in the loader's order for ``seed`` (each picture
    read at most once; a finite source stops at its end), and the :class:`bksdm.skips.Skips` of unusable items:
    the calibration pictures of `bksdm rank`."""
    from bksdm.skips import Skips

    limit = len(source) if not getattr(source, "streamed", False) else None
    skips, items, seen = Skips(), [], 0
    for mb in micro_batches(source, seed, False, resolution, 1, 0, 1, 0):
        seen += 1
        skips.update_from([r for r, _ in mb["skip_reasons"]])
        if "pixels" in mb:
            items.append(mb)
        if len(items) >= samples or (limit is not None and seen >= limit):
            break
    return items, skips
