"""`bksdm cache`: precompute the VAE latent distribution and the text embeddings of a dataset, once.

A cache folder holds ``index.json`` and shards ``shard-00000.safetensors`` with, for ``n`` items,
``mean`` and ``std`` (n, F, C, h, w) — F = 2 when flipping is on (unflipped, flipped), else 1 — and the family's
prompt tensors (:attr:`Family.cache_keys`): ``emb`` (n, L, D), the text encoder's hidden states (SD3: CLIP + T5,
Flux: T5), and ``pooled`` (SDXL, SD3, Flux). Distillation reading a cache draws ``latent = mean + std * eps``
exactly as ``AutoencoderKL.latent_dist.sample`` does and maps it into the denoiser's space as the live path does
(:func:`bksdm.training.to_latent_space`), so losses match the uncached path for the same seed.

``index.json`` records the family and its :meth:`Family.cache_meta` (SD3 / Flux: T5's ``max_sequence_length``, SD3:
whether ``text_encoder_3`` was present); a run whose teacher does not match is refused (:meth:`CacheSource.check`).

**What a cache costs per caption** (values at ``--dtype``, fp16: 2 bytes; ``emb`` dominates). T5 runs without an
attention mask in SD3 and Flux, so padded positions carry signal and are stored whole; SD3 without T5 stores only
the CLIP part (its T5 part is zeros, restored on reading). From the public configs (``text_encoder*/config.json``,
``transformer/config.json`` ``joint_attention_dim`` 4096, pipelines' default ``max_sequence_length``):

==================  ============================  ============  ==========================================
family              emb (tokens x width)          fp16 / item   one million captions (+ latents at 1024 px)
==================  ============================  ============  ==========================================
SD-v1               77 x 768                      118 KB        0.12 TB
SDXL                77 x 2048 + pooled 1280       318 KB        0.32 TB
SD3 / SD3.5         (77 + 256) x 4096 + 2048      2.73 MB       2.7 TB (+ 2.1 TB: 16 x 128 x 128, mean+std, 2 flips)
SD3 without T5      77 x 4096 + 2048              0.63 MB       0.63 TB (+ 2.1 TB)
Flux.1-dev          512 x 4096 + pooled 768       4.20 MB       4.2 TB (+ 2.1 TB)
Flux.1-schnell      512 x 4096 + pooled 768       4.20 MB       4.2 TB (+ 2.1 TB)
==================  ============================  ============  ==========================================

BK-SDM's 212,776 LAION-Aesthetics pairs are about 0.9 TB for Flux-dev's text alone (0.58 TB for SD3); a 2.3M-pair
LAION subset about 9.7 TB. Schnell's row is FluxPipeline's default of 512 T5 tokens, which bksdm encodes with
(BFL's reference code gives schnell 256: half the text). Pass ``--dtype bf16`` for T5's range at the same size;
fp32 doubles every figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bksdm.distill.data import BadSample, augment, open_source, size_ids
from bksdm.errors import UserError, reading
from bksdm.skips import Skips

SHARD = 1024


@torch.no_grad()
def build_cache(teacher: str, data: Any, out: str | Path, resolution: int, flip: bool = True, dtype: str = "fp16",
                batch: int = 16, device: str | None = None, overwrite: bool = False,
                data_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode every item of ``data`` once; returns the index record. Unusable items are skipped and counted by
    reason (``skipped``: {reason: count}; ``skipped_items``: {index: reason}).
    An existing cache in ``out`` is refused unless ``overwrite`` (then its shards and index are replaced)."""
    from safetensors.torch import save_file

    from bksdm.models import DTYPES, default_device, encode_pixels, load_text_side, pipeline_family, pipeline_folder

    out = Path(out)
    old = sorted(out.glob("shard-*.safetensors")) + ([out / "index.json"] if (out / "index.json").exists() else [])
    if old and not overwrite:
        raise UserError(f"{out} already holds a cache ({len(old)} files); pass --overwrite to rebuild it or choose another --out")
    source = open_source(data, **(data_options or {}))
    if getattr(source, "streamed", False):
        raise UserError("cache needs a map-style dataset (an image folder or mini-world), not streamed webdataset shards")
    device = device or default_device()
    family = pipeline_family(pipeline_folder(teacher, "teacher"))
    vae, text_parts = load_text_side(teacher, device)
    for f in old:  # only now, when the teacher has loaded: a failed start keeps the old cache
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    fields = ("mean", "std", *family.cache_keys, "size_ids", "index")
    n, skips, skipped, shard, buf = len(source), Skips(), {}, 0, {k: [] for k in fields}
    flips = (False, True) if flip else (False,)

    def flush():
        nonlocal shard, buf
        if buf["index"]:
            tensors = {k: torch.cat(v) if k != "index" else torch.tensor(v) for k, v in buf.items()}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"shard-{shard:05d}.safetensors"))
            shard, buf = shard + 1, {k: [] for k in fields}

    for start in tqdm(range(0, n, batch), desc="cache", unit="batch"):
        pix, texts, idx = [], [], []
        for i in range(start, min(n, start + batch)):
            try:
                image, text = source.get(i)
                pix.append(torch.stack([augment(image, resolution, f) for f in flips]))
            except BadSample as exc:
                skips.add(exc)
                skipped[i] = exc.reason
                continue
            texts.append(text)
            idx.append(i)
            buf["size_ids"].append(size_ids(image.size, resolution)[None])  # float32 whatever --dtype: sizes exact
        if not idx:
            continue
        x = torch.stack(pix).to(device)  # (b, F, 3, R, R)
        b, f = x.shape[:2]
        dist = encode_pixels(vae, x.flatten(0, 1))
        cond = family.to_cache(family.encode_prompt(text_parts, texts, device))
        cast = DTYPES[dtype]
        buf["mean"].append(dist.mean.unflatten(0, (b, f)).to("cpu", cast))
        buf["std"].append(dist.std.unflatten(0, (b, f)).to("cpu", cast))
        for key, value in cond.items():  # size_ids went in above, per readable item
            buf[key].append(value.to("cpu", cast))
        buf["index"].extend(idx)
        if len(buf["index"]) >= SHARD:
            flush()
    flush()
    if shard == 0:
        raise UserError(f"dataset {data} gave no usable items to cache ({skips.summary()})")
    record = {"items": n, "cached": n - len(skipped), "skipped": dict(skips), "skipped_items": skipped,
              "resolution": resolution, "flip": flip,
              "dtype": dtype, "teacher": str(teacher), "data": str(data), "shards": shard,
              "family": family.name, "family_meta": family.cache_meta()}
    (out / "index.json").write_text(json.dumps(record, indent=1))
    return record


class CacheSource:
    """A cache folder as a map-style source: ``item(i, flip)`` -> dict of ``mean``, ``std``, ``emb`` (fp32)."""

    is_cache = True

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "index.json").is_file():
            raise UserError(f"{folder} is not a bksdm cache (no index.json); build one with `bksdm cache`")
        with reading(self.folder / "index.json", "cache index", "rebuild the cache with `bksdm cache --overwrite`"):
            self.info = json.loads((self.folder / "index.json").read_text())
            shards, self.info["items"], self.info["resolution"] = int(self.info["shards"]), int(self.info["items"]), int(self.info["resolution"])
        self._where: dict[int, tuple[int, int]] = {}
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        from safetensors import safe_open

        for s in range(shards):
            shard = self.folder / f"shard-{s:05d}.safetensors"
            with reading(shard, "cache shard", "rebuild the cache with `bksdm cache --overwrite`"), safe_open(str(shard), "pt") as f:
                for row, i in enumerate(f.get_tensor("index").tolist()):
                    self._where[i] = (s, row)
        self._missing = sorted(set(range(self.info["items"])) - set(self._where))

    def __len__(self) -> int:
        return self.info["items"]

    def check(self, family, resolution: int) -> "CacheSource":
        """Itself when it was built for ``family`` (name and :meth:`Family.cache_meta`: T5 length, SD3's T5) at
        ``resolution`` px; else a one-line error. Caches from before the family was recorded are U-Net caches."""
        info = self.info
        if info["resolution"] != resolution:
            raise UserError(f"cache {self.folder} was built at {info['resolution']} px, not {resolution}")
        name, meta = info.get("family"), info.get("family_meta", {})
        if name is None and family.backbone == "unet":  # caches from before the family was recorded
            name = family.name
        if name != family.name:
            raise UserError(f"cache {self.folder} was built for a {name or 'unrecorded'} teacher, not this {family.name} "
                            f"teacher; build a cache of this teacher with bksdm cache")
        if meta != family.cache_meta():
            raise UserError(f"cache {self.folder} was built with {meta}, this {family.name} teacher needs "
                            f"{family.cache_meta()}; rebuild it with this teacher")
        return self

    def item(self, index: int, flip: bool) -> dict[str, torch.Tensor]:
        if index not in self._where:  # its reason, as the cache recorded it (older caches: none)
            reason = self.info.get("skipped_items", {}).get(str(index), "skipped when the cache was built")
            raise BadSample(reason, f"item {index} (cache)")
        s, row = self._where[index]
        if s not in self._shards:
            from safetensors.torch import load_file

            self._shards = {s: load_file(str(self.folder / f"shard-{s:05d}.safetensors"))}
        t = self._shards[s]
        f = 1 if (flip and self.info["flip"]) else 0
        # the latent distribution of the chosen view, and whatever conditioning the family cached (``emb``, ...)
        cond = {k: v[row].float() for k, v in t.items() if k not in ("mean", "std", "index")}
        return {"mean": t["mean"][row, f].float(), "std": t["std"][row, f].float(), **cond}
