"""Micro-batches for one process, from an image source or a latent/text cache, resumable at any step."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from bksdm.distill.data import BadSample, Order, augment, positions, size_ids


class _Positions(torch.utils.data.Dataset):
    """Item ``k`` of this process's stream = sample position ``positions(start + k // B, ...)[k % B]``."""

    def __init__(self, source, order: Order, resolution: int, batch: int, rank: int, world: int, start_micro: int):
        self.source, self.order, self.resolution = source, order, resolution
        self.batch, self.rank, self.world, self.start = batch, rank, world, start_micro

    def __len__(self) -> int:
        return 10**12  # endless: the recipe stops at max_steps

    def __getitem__(self, k: int) -> dict[str, Any] | None:
        pos = positions(self.start + k // self.batch, self.batch, self.rank, self.world)[k % self.batch]
        index, flip = self.order.item(pos)
        try:
            return _item(self.source, index, flip, self.resolution)
        except BadSample:
            return None


def _item(source, index: int, flip: bool, resolution: int) -> dict[str, Any]:
    if getattr(source, "is_cache", False):
        return source.item(index, flip)
    image, text = source.get(index)
    return {"pixels": augment(image, resolution, flip), "text": text, "size_ids": size_ids(image.size, resolution)}


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    good = [it for it in items if it is not None]
    out: dict[str, Any] = {"skipped": len(items) - len(good)}
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
    the cache has them; plus ``skipped``, the count of unreadable items left out.
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
    items: list[dict[str, Any] | None] = []
    micro = start_micro
    wanted = positions(micro, batch, rank, world)
    for pos, raw in enumerate(source.samples()):
        if pos < wanted.start:
            continue
        if pos in wanted:
            try:
                image, text = source.decode(raw)
                items.append({"pixels": augment(image, resolution, order.item(pos)[1]), "text": text,
                              "size_ids": size_ids(image.size, resolution)})
            except BadSample:
                items.append(None)
        if pos == wanted.stop - 1:
            yield collate(items)
            items, micro = [], micro + 1
            wanted = positions(micro, batch, rank, world)
