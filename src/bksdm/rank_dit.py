"""`bksdm rank` and `compress --student auto` for SD3 / FLUX transformer teachers (:mod:`bksdm.arch.dit`).

The units are single blocks, :func:`bksdm.arch.dit.removable_blocks` (SD3: every joint block but the last, which
diffusers builds differently; Flux: every double-stream and single-stream block), named ``transformer_blocks.3`` /
``single_transformer_blocks.12``. Each is bypassed with :func:`bksdm.arch.dit.bypass` (tested equal to the derived
student in ``tests/test_dit_arch.py``, and here against the built student) and measured on calibration pictures
noised by the teacher's flow-matching objective (:class:`bksdm.objectives.FlowObjective`) at stratified sigmas:

* ``rel_mse`` — sum ||v_teacher - v_bypassed||^2 / sum ||v_teacher||^2 (the output measure, LAPTOP-Diff,
  arXiv 2404.11098);
* ``cosine`` — mean over samples of 1 - cos(v_teacher, v_bypassed);
* ``input_change`` — mean of 1 - cos(block's image-stream input, its image-stream output) in the teacher
  (Flux.1-Lite's measure; blocks return ``(encoder_hidden_states, hidden_states)``, item 1 is taken).

All are one-shot: TinyFusion (arXiv 2412.01199) shows that the loss right after removal does not predict how well a
student recovers by distillation, so a ranking is a starting point, not a verdict. ``params_saved`` is exact
(:func:`bksdm.arch.dit.param_count` of the teacher minus that of the student without the block). GMACs are not
counted: :mod:`bksdm.profile` counts U-Net GMACs only, so ``gmacs_saved`` is None and a ``macs`` budget is refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bksdm.arch import dit
from bksdm.errors import UserError


def unit_name(name: str, index: int) -> str:
    """``transformer_blocks.3``: a unit row's name."""
    return f"{name}.{index}"


def calibration(folder: Path, data: str, samples: int, batch: int, seed: int, device: str,
                resolution: int | None = None) -> tuple[list[dict[str, Any]], Any, Any]:
    """Batches ``{"x": noisy latents (B, C, h, w), "t": (B,) sigma * T, "cond": the family's flat conditioning}``
    the skips and the family. Latents: the VAE mean in the denoiser's space (:func:`bksdm.training.to_latent_space`, SD3 /
    Flux shift and scale); sigma stratified (picture i of N at ``(i + u) / N`` of the density's range, mapped
    through the objective's sigma table and shift, :meth:`FlowObjective.sigmas`), ``x = (1 - sigma) x0 + sigma eps``
    as :meth:`FlowObjective.sample`; noise and ``u`` from a generator of ``seed``."""
    from bksdm.distill.data import open_source
    from bksdm.distill.loader import usable_pictures
    from bksdm.models import decoder_factor, encode_pixels, load_text_side, pipeline_family
    from bksdm.objectives import load_objective
    from bksdm.pipelines import read_transformer_config
    from bksdm.training import to_latent_space

    family = pipeline_family(folder)
    vae, text = load_text_side(folder, device)
    objective = load_objective(folder)
    cfg, _ = read_transformer_config(folder)
    res = resolution or family.resolution(cfg, decoder_factor(vae))
    family.latent_shape(cfg, res, decoder_factor(vae))  # a size the transformer cannot patch: one-line error
    items, skips = usable_pictures(open_source(data), seed, res, samples)
    if not items:
        raise UserError(f"no usable calibration pictures in {data} ({skips.summary()}); rank needs pictures with captions")
    gen = torch.Generator().manual_seed(seed)
    got = len(items)
    u = (torch.arange(got) + torch.rand(got, generator=gen)) / got
    u = u[torch.randperm(got, generator=gen)]
    out, start = [], 0
    for first in range(0, got, batch):
        chunk = items[first:first + batch]
        pixels = torch.cat([it["pixels"] for it in chunk]).to(device)
        texts = [t for it in chunk for t in it["text"]]
        with torch.no_grad():
            z = encode_pixels(vae, pixels).mean.float()
            lat = to_latent_space(z, vae.config)
            cond = {k: v.float() for k, v in family.encode_prompt(text, texts, device).items()}
        cond.update(family.added_conditioning(len(chunk), res, device))
        n = lat.shape[0]
        noise = torch.randn(lat.shape, generator=gen).to(device)
        sigma = objective.sigmas(u[start:start + n], lat.shape[-2], lat.shape[-1]).float().to(device)
        s = sigma.view(-1, 1, 1, 1)
        out.append({"x": (1 - s) * lat + s * noise, "t": sigma * objective.num_timesteps, "cond": cond})
        start += n
    return out, skips, family


class ImageStreamChange:
    """Forward hooks on every removable block: sum of 1 - cos(image-stream input, image-stream output) per sample."""

    def __init__(self, model: torch.nn.Module, blocks: list[tuple[str, int]]):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.handles = []
        for name, i in blocks:
            key = unit_name(name, i)
            self.handles.append(getattr(model, name)[i].register_forward_hook(self.hook(key), with_kwargs=True))

    def hook(self, key: str):
        def post(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states")
            y = output[1] if isinstance(output, tuple) else output
            if x is None or y is None or x.shape != y.shape:
                return
            cos = torch.nn.functional.cosine_similarity(x.flatten(1).float(), y.flatten(1).float(), dim=1)
            self.sums[key] = self.sums.get(key, 0.0) + float((1 - cos).sum())
            self.counts[key] = self.counts.get(key, 0) + cos.numel()
        return post

    def values(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def measure(teacher: torch.nn.Module, cfg: dict[str, Any], batches: list[dict[str, Any]], family: Any,
            progress: bool = True) -> list[dict[str, Any]]:
    """One row per removable block, most important first (by ``rel_mse``); see the module docstring."""
    from tqdm.auto import tqdm

    blocks = dit.removable_blocks(cfg)
    probe = ImageStreamChange(teacher, blocks)
    with torch.no_grad():
        ref = [family.denoise(teacher, b["x"], b["t"], b["cond"]).float() for b in batches]
    changes = probe.values()
    t_params = dit.param_count(cfg)
    rows = []
    for name, i in tqdm(blocks, desc="rank", unit="block", disable=not progress):
        num = den = cos = 0.0
        n = 0
        with torch.no_grad(), dit.bypass(teacher, name, i):
            for b, r in zip(batches, ref):
                out = family.denoise(teacher, b["x"], b["t"], b["cond"]).float()
                num += float(((out - r) ** 2).sum())
                den += float((r ** 2).sum())
                cos += float((1 - torch.nn.functional.cosine_similarity(out.flatten(1), r.flatten(1), dim=1)).sum())
                n += r.shape[0]
        key = unit_name(name, i)
        student = student_params(cfg, dit.spec_without(cfg, name, i))
        rows.append({"name": key, "kind": "block", "list": name, "index": i, "rel_mse": num / den, "cosine": cos / n,
                     "input_change": changes.get(key), "params_saved": t_params - student,
                     "gmacs_saved": None})
    return sorted(rows, key=lambda r: r["rel_mse"], reverse=True)


def rank(folder: Path, teacher: str, data: str, samples: int, batch: int, seed: int, device: str,
         resolution: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The ranking record of a transformer pipeline ``folder``, the same shape as a U-Net's
    (:func:`bksdm.rank.rank`); ``teacher_config`` keeps ``_class_name`` (it names the kind)."""
    from bksdm.pipelines import load_transformer, read_transformer_config

    cfg, tdir = read_transformer_config(folder)
    t0 = time.perf_counter()
    # calibration first: its text encoders and VAE are freed before the transformer loads (FLUX.1-dev: T5 ~19 GB,
    # the transformer ~48 GB in fp32)
    batches, skips, family = calibration(folder, data, samples, batch, seed, device, resolution)
    model = load_transformer(tdir, cfg).to(device).eval().requires_grad_(False)
    rows = measure(model, cfg, batches, family, progress=progress)
    cfg = {k: v for k, v in cfg.items() if k == "_class_name" or not k.startswith("_")}
    return {"teacher": str(teacher), "data": str(data), "samples": sum(b["x"].shape[0] for b in batches), "seed": seed,
            "timesteps": "flow sigmas stratified, one per picture", "skipped": dict(skips), "teacher_config": cfg,
            "backbone": cfg["_class_name"], "text_side": family.cache_meta(), "teacher_params": dit.param_count(cfg), "teacher_gmacs": None,
            "seconds": round(time.perf_counter() - t0, 1), "units": rows}


def without(cfg: dict[str, Any], removed: list[tuple[str, int]], name: str) -> dit.DiTSpec:
    """The spec of ``cfg`` keeping every block but ``removed`` (a list emptied is refused by :func:`dit.derive`)."""
    gone = set(removed)
    keep = tuple((n, tuple(i for i in range(c) if (n, i) not in gone)) for n, c in dit.block_counts(cfg).items())
    return dit.DiTSpec(name, keep)


def student_params(cfg: dict[str, Any], spec: dit.DiTSpec) -> int:
    """The exact parameter count of the student of ``spec`` (on the meta device)."""
    student = dit.derive(cfg, spec, with_keys=False).student_config
    return dit.param_count({**student, "_class_name": cfg["_class_name"]})


def params_of(cfg: dict[str, Any], removed: list[tuple[str, int]]) -> int | None:
    """The student's exact parameter count, or None when that student cannot be built (a block list left empty);
    any other failure to build it is raised."""
    gone = set(removed)
    if any(all((n, i) in gone for i in range(c)) for n, c in dit.block_counts(cfg).items()):
        return None
    return student_params(cfg, without(cfg, removed, "trial"))


def choose(ranking: dict[str, Any], kind: str, value: float, budget: str,
           progress: bool = True) -> tuple[dit.DiTSpec, list[dict[str, Any]]]:
    """:func:`bksdm.rank.choose` for a transformer ranking: remove blocks greedily (least ``rel_mse`` per parameter
    saved), then put back the most important removed blocks that still fit. ``params`` budgets only (``macs``: no
    transformer GMACs; ``latency``: not measured for transformers) — one-line :class:`UserError` otherwise, and for
    an unreachable budget."""
    if kind != "params":
        raise UserError(f"--budget {budget}: transformer rankings support params budgets only "
                        f"({'no transformer GMACs are counted' if kind == 'macs' else 'latency is not measured for transformers'})")
    cfg = ranking["teacher_config"]
    teacher = ranking["teacher_params"]
    target = value if value > 1 else value * teacher
    if target >= teacher:
        raise UserError(f"--budget {budget} is the whole teacher ({teacher:,} parameters) or more: nothing to remove; ask for less")
    rows = {r["name"]: r for r in ranking["units"]}
    blocks = [(r["list"], r["index"]) for r in ranking["units"]]
    removed: list[tuple[str, int]] = []
    cost, trace = teacher, []
    while cost > target:
        best = None
        for b in blocks:
            if b in removed:
                continue
            after = params_of(cfg, removed + [b])
            if after is None or after >= cost:
                continue
            score = max(rows[unit_name(*b)]["rel_mse"], 0.0) / (cost - after)
            if best is None or score < best[0]:
                best = (score, b, after)
        if best is None:
            raise UserError(f"--budget {budget} is not reachable: removing every block that can go leaves {cost:,} "
                            f"parameters ({cost / teacher:.4f} of the teacher); ask for at least that")
        _, b, cost = best
        removed.append(b)
        trace.append({"removed": unit_name(*b), "rel_mse": rows[unit_name(*b)]["rel_mse"], "params": round(cost / teacher, 6)})
        if progress:
            print(f"  removed {unit_name(*b)}: params {cost / teacher:.4f} of the teacher")
    changed = True
    while changed:  # the last removal may overshoot: give back the most important blocks that still fit
        changed = False
        for b in sorted(removed, key=lambda b: -rows[unit_name(*b)]["rel_mse"]):
            rest = [x for x in removed if x != b]
            after = params_of(cfg, rest)
            if after is not None and cost < after <= target:
                removed, cost, changed = rest, after, True
                trace.append({"restored": unit_name(*b), "rel_mse": rows[unit_name(*b)]["rel_mse"],
                              "params": round(cost / teacher, 6)})
                if progress:
                    print(f"  put back {unit_name(*b)}: params {cost / teacher:.4f} of the teacher")
                break
    label = f"{int(value)}" if value > 1 else f"{value:g}"
    return without(cfg, removed, f"auto-params-{label}"), trace
