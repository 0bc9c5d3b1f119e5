"""`bksdm rank`: how much each removable unit of a teacher matters, and `compress --student auto`: the student a
budget allows, chosen from that ranking.

Every unit (:mod:`bksdm.arch.units`) is measured on calibration data (pictures and captions, any `distill` data
source): the pictures are encoded by the teacher's VAE and noised at timesteps spread evenly over the schedule
(one per picture, stratified), and the teacher's noise prediction is compared with that of the teacher with the unit
bypassed. The bypassed teacher is the student that lacks the unit, built from the teacher's own tensors through the
derived key map (no copy): what a student initialised by `compress` computes before any training.

* ``rel_mse`` — sum ||eps_teacher - eps_bypassed||^2 / sum ||eps_teacher||^2 over the calibration set: the output
  measure (LAPTOP-Diff, arXiv 2404.11098, picks blocks by their one-shot effect on the output);
* ``cosine`` — mean over samples of 1 - cos(eps_teacher, eps_bypassed);
* ``input_change`` — mean of 1 - cos(unit input, unit output) in the teacher (Flux.1-Lite's measure: a block that
  barely changes its input can go), where the unit's input and output have one shape (down pairs after a stage's
  first, the mid-block, transformer layers); up pairs take their skip input concatenated, so for a ``pairs`` unit
  it is its down pair's.

Each unit also carries what removing it alone saves: U-Net parameters, GMACs (paper convention) and, with
``latency``, the measured share of a U-Net call. The measurement is deterministic for a seed and cheap (one teacher
pass and one pass per unit over the calibration batches), so it is not resumable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from bksdm import rank_dit
from bksdm.arch.dit import is_transformer
from bksdm.arch.spec import BlockSpec
from bksdm.arch.units import Unit, all_units, candidates, full_spec, remove_all
from bksdm.errors import UserError

BUDGET_KINDS = ("params", "macs", "latency")


def bypassed(teacher, cfg: dict[str, Any], spec: BlockSpec):
    """The student of ``spec`` whose tensors are the teacher's own (``load_state_dict(assign=True)``): the teacher
    with the removed blocks bypassed, sharing its memory."""
    from bksdm.arch import derive
    from bksdm.arch.derive import meta_unet

    der = derive(cfg, spec)
    unet = meta_unet(der.student_config)
    state = teacher.state_dict()
    unet.load_state_dict({k: state[v] for k, v in der.key_map.items()}, strict=True, assign=True)
    return unet.eval()


def calibration(folder: Path, data: str, samples: int, batch: int, seed: int, device: str,
                resolution: int | None = None) -> tuple[list[dict[str, Any]], Any]:
    """Calibration batches: ``{"x": noisy latents (B, C, h, w), "t": (B,), "cond": the U-Net's conditioning}``, and
    the :class:`bksdm.skips.Skips` of unusable items. Timesteps are stratified over the schedule (picture i of N at
    ``(i + u) / N`` of it, ``u`` uniform), noise and ``u`` drawn from a generator of ``seed``."""
    from diffusers import DDPMScheduler

    from bksdm.distill.data import open_source
    from bksdm.distill.loader import usable_pictures
    from bksdm.models import decoder_factor, encode_pixels, load_text_side, pipeline_family

    family = pipeline_family(folder)
    vae, text = load_text_side(folder, device)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    source = open_source(data)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    res = resolution or family.resolution(cfg, decoder_factor(vae))
    gen = torch.Generator().manual_seed(seed)
    items, skips = usable_pictures(source, seed, res, samples)
    if not items:
        raise UserError(f"no usable calibration pictures in {data} ({skips.summary()}); rank needs pictures with captions")
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        pixels = torch.cat([it["pixels"] for it in chunk])
        texts = [t for it in chunk for t in it["text"]]
        with torch.no_grad():
            lat = encode_pixels(vae, pixels.to(device)).mean.float() * vae.config.scaling_factor
            cond = {k: v.float() for k, v in family.encode_prompt(text, texts, device).items()}
        sizes = torch.cat([it["size_ids"] for it in chunk]) if "size_ids" in chunk[0] else None
        cond.update(family.added_conditioning(len(chunk), res, device, sizes))
        out.append({"latents": lat, "cond": family.unet_kwargs(cond)})
    got = len(items)
    T = sched.config.num_train_timesteps
    u = (torch.arange(got) + torch.rand(got, generator=gen)) / got  # stratified over [0, 1)
    order = torch.randperm(got, generator=gen)  # which picture gets which stratum
    ts = (u[order] * T).long().clamp(0, T - 1)
    start = 0
    for b in out:
        n = b["latents"].shape[0]
        noise = torch.randn(b["latents"].shape, generator=gen).to(device)
        b["t"] = ts[start:start + n].to(device)
        b["x"] = sched.add_noise(b.pop("latents"), noise, b["t"])
        start += n
    return out, skips


class _InputChange:
    """Forward hooks measuring 1 - cos(input of ``first``, output of ``last``) per sample, summed."""

    def __init__(self, model, first: str, last: str):
        self.sum, self.count, self.x = 0.0, 0, None
        mods = dict(model.named_modules())
        self.handles = [mods[first].register_forward_pre_hook(self._pre, with_kwargs=True),
                        mods[last].register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        self.x = args[0] if args else kwargs.get("hidden_states")

    def _post(self, module, args, output):
        y = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if self.x is not None and self.x.shape == y.shape:
            cos = torch.nn.functional.cosine_similarity(self.x.flatten(1).float(), y.flatten(1).float(), dim=1)
            self.sum += float((1 - cos).sum())
            self.count += cos.numel()
        self.x = None

    def value(self) -> float | None:
        for h in self.handles:
            h.remove()
        return self.sum / self.count if self.count else None


def _path_ends(unit: Unit) -> tuple[str, str] | None:
    """The teacher modules whose input and output bound the unit's one path (a pairs unit: its down pair)."""
    if unit.kind in ("mid", "layer"):
        return unit.modules[0], unit.modules[0]
    if unit.kind == "pairs":
        down = [m for m in unit.modules if m.startswith("down_blocks")]
        return down[0], down[-1]
    return None


def _latency(model, batches: list[dict[str, Any]], runs: int = 3) -> float:
    from bksdm.profile import median_latency

    b = batches[0]
    return median_latency(lambda: model(b["x"], b["t"], **b["cond"]), runs=runs)


def measure(teacher, cfg: dict[str, Any], batches: list[dict[str, Any]], units: list[Unit] | None = None,
            latency: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """One row per unit whose removal alone is buildable (:func:`bksdm.arch.units.candidates`), most important
    first (by ``rel_mse``); see the module docstring for the measures."""
    from tqdm.auto import tqdm

    from bksdm.profile import count_params, unet_gmacs

    full = full_spec(cfg)
    units = candidates(full, cfg, units if units is not None else all_units(cfg))
    ends = {u: _path_ends(u) for u, _ in units}
    probes = {u: _InputChange(teacher, *e) for u, e in ends.items() if e}
    with torch.no_grad():
        ref = [teacher(b["x"], b["t"], **b["cond"]).sample.float() for b in batches]
    changes = {u: p.value() for u, p in probes.items()}
    t_params, t_gmacs = count_params(teacher), unet_gmacs(cfg)
    t_lat = _latency(teacher, batches) if latency else None
    rows = []
    for unit, spec in tqdm(units, desc="rank", unit="unit", disable=not progress):
        model = bypassed(teacher, cfg, spec)
        num = den = cos = 0.0
        n = 0
        with torch.no_grad():
            for b, r in zip(batches, ref):
                out = model(b["x"], b["t"], **b["cond"]).sample.float()
                num += float(((out - r) ** 2).sum())
                den += float((r ** 2).sum())
                cos += float((1 - torch.nn.functional.cosine_similarity(out.flatten(1), r.flatten(1), dim=1)).sum())
                n += r.shape[0]
        row = {**unit.to_dict(), "rel_mse": num / den, "cosine": cos / n, "input_change": changes.get(unit),
               "params_saved": t_params - count_params(model), "gmacs_saved": round(t_gmacs - unet_gmacs(model.config), 4)}
        if t_lat:
            row["latency_share"] = round(1 - _latency(model, batches) / t_lat, 4)
        rows.append(row)
        del model
    return sorted(rows, key=lambda r: r["rel_mse"], reverse=True)


def rank(teacher: str, data: str, samples: int = 256, batch: int = 16, seed: int = 0, device: str | None = None,
         latency: bool = False, resolution: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The ranking record of ``teacher`` (a pipeline folder): calibration, per-unit rows, and the teacher's totals.
    Errors (:class:`UserError`): counts below 1, a teacher that is not a pipeline, data with no usable picture."""
    from bksdm.hub import read_unet_config
    from bksdm.models import default_device, load_unet, pipeline_folder, refuse_transformer
    from bksdm.pipelines import read_transformer_config
    from bksdm.profile import count_params, unet_gmacs

    if samples < 1 or batch < 1:
        raise UserError("--samples and --batch-size must be at least 1")
    folder = pipeline_folder(teacher, "teacher")
    device = device or default_device()
    if read_transformer_config(folder) is not None:  # SD3 / FLUX: single blocks (bksdm.rank_dit)
        if latency:
            raise UserError("--latency is measured for U-Net teachers only; rank this transformer without it")
        return rank_dit.rank(folder, teacher, data, samples, batch, seed, device, resolution, progress)
    refuse_transformer(folder, "rank", "it measures U-Net units")
    cfg = {k: v for k, v in read_unet_config(folder)[0].items() if not k.startswith("_")}  # as compress reads it
    unet = load_unet(folder / "unet").to(device).eval().requires_grad_(False)
    t0 = time.perf_counter()
    batches, skips = calibration(folder, data, samples, batch, seed, device, resolution)
    rows = measure(unet, cfg, batches, latency=latency, progress=progress)
    return {"teacher": str(teacher), "data": str(data), "samples": sum(b["x"].shape[0] for b in batches), "seed": seed,
            "timesteps": "stratified, one per picture", "skipped": dict(skips), "teacher_config": cfg,
            "teacher_params": count_params(unet), "teacher_gmacs": round(unet_gmacs(cfg), 4),
            "seconds": round(time.perf_counter() - t0, 1), "units": rows}


def load_ranking(path: str | Path) -> dict[str, Any]:
    """A ranking written by `bksdm rank --out`; a missing or foreign file is a one-line :class:`UserError`."""
    from bksdm.errors import reading

    p = Path(path)
    if not p.is_file():
        raise UserError(f"ranking {p} does not exist; make it with bksdm rank --teacher T --data D --out {p}")
    with reading(p, "ranking", "make it again with bksdm rank"):
        rec = json.loads(p.read_text())
        if not isinstance(rec, dict) or "units" not in rec or "teacher_config" not in rec:
            raise ValueError("not a bksdm rank file")
    return rec


def parse_budget(text: str) -> tuple[str, float]:
    """``params=0.55`` (a fraction of the teacher's U-Net, or a count above 1), ``macs=0.6``, ``latency=0.5``."""
    kind, _, value = str(text).partition("=")
    if kind not in BUDGET_KINDS:
        raise UserError(f"--budget {text!r}: write KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)} (e.g. params=0.55)")
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"--budget {text!r}: {value!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise UserError(f"--budget {text!r}: write a finite number")
    if not v > 0 or (kind != "params" and v >= 1) or (kind == "params" and 1 <= v < 2):
        raise UserError(f"--budget {text!r} is out of range: a fraction in (0, 1) of the teacher"
                        + (", or a parameter count" if kind == "params" else ""))
    return kind, v


def _cost(kind: str, spec: BlockSpec, cfg: dict[str, Any], teacher: float) -> float:
    """The student's parameters or GMACs as a fraction of the teacher's."""
    from bksdm.arch import derive
    from bksdm.arch.derive import param_count
    from bksdm.profile import unet_gmacs

    student = derive(cfg, spec, with_keys=False).student_config
    if kind == "params":
        return param_count(student) / teacher
    if kind == "macs":
        return unet_gmacs(student) / teacher
    raise AssertionError(kind)


def choose(ranking: dict[str, Any], budget: str, progress: bool = True) -> tuple[Any, list[dict[str, Any]]]:
    """The spec that meets ``budget`` (:func:`parse_budget`), removing units greedily: at each step, among the units
    still removable, the one with the least ``rel_mse`` per unit of cost it saves now. Returns the spec and the
    trace (one entry per removal: unit, its importance, the cost after). Greedy by importance per cost: the
    measurements are one-shot (each unit alone), so their sum is only an estimate for several; a knapsack over
    estimates would not be better founded, and the trace shows every choice. Errors (:class:`UserError`): a
    malformed budget, one of the whole teacher or more, a latency budget on a ranking without latencies, and a budget
    no sequence of removals reaches (with the smallest cost reached). Latency shares are taken as additive (a stage
    holds the shares of its own pairs); params and MACs are counted on each candidate student exactly. A transformer
    ranking (SD3 / FLUX) goes to :func:`bksdm.rank_dit.choose` (a :class:`bksdm.arch.dit.DiTSpec`)."""
    kind, value = parse_budget(budget)
    cfg = ranking["teacher_config"]
    if is_transformer(cfg):  # SD3 / FLUX: blocks, params budgets (bksdm.rank_dit.choose)
        return rank_dit.choose(ranking, kind, value, budget, progress)
    rows = {r["name"]: r for r in ranking["units"]}
    if kind == "latency" and not all("latency_share" in r for r in rows.values()):
        raise UserError("a latency budget needs a ranking measured with --latency (bksdm rank --latency)")
    teacher = {"params": ranking["teacher_params"], "macs": ranking["teacher_gmacs"]}.get(kind, 1.0)
    target = value / teacher if kind == "params" and value > 1 else value
    if target >= 1:
        raise UserError(f"--budget {budget} is the whole teacher ({ranking['teacher_params']:,} parameters) or more: "
                        "nothing to remove; ask for less")
    units = [Unit.from_dict(r) for r in ranking["units"]]
    spec, removed = full_spec(cfg), []
    cost = 1.0
    trace: list[dict[str, Any]] = []
    while cost > target + 1e-12:
        best = None
        for unit, new in candidates(spec, cfg, [u for u in units if u not in removed]):
            if kind == "latency":
                after = 1.0 - _latency_saved(removed + [unit], rows, len(cfg["down_block_types"]))
            else:
                after = _cost(kind, new, cfg, teacher)
            saved = cost - after
            if saved <= 0:
                continue
            score = max(rows[unit.name]["rel_mse"], 0.0) / saved
            if best is None or score < best[0]:
                best = (score, unit, new, after)
        if best is None:
            reach = f"{cost * teacher:,.0f} parameters ({cost:.4f})" if kind == "params" else f"{cost:.4f}"
            raise UserError(f"--budget {budget} is not reachable: removing every unit that can go leaves {kind} = "
                            f"{reach} of the teacher; ask for at least that")
        _, unit, spec, cost = best
        n = len(cfg["down_block_types"])
        inside = [u.name for u in removed if unit.kind == "stage" and _down_stage(u, n) == unit.stage]
        removed.append(unit)
        trace.append({"removed": unit.name, "rel_mse": rows[unit.name]["rel_mse"], kind: round(cost, 6),
                      **({"includes": inside} if inside else {})})
        if progress:
            print(f"  removed {unit.name} (rel_mse {rows[unit.name]['rel_mse']:.4g}): {kind} {cost:.4f} of the teacher")
    if kind != "latency":  # the last removal may overshoot: give back the most important units that still fit
        spec, cost = _give_back(spec, cost, removed, rows, kind, cfg, teacher, target, trace, progress)
    label = f"{int(value)}" if value > 1 else f"{value:g}"
    return BlockSpec(f"auto-{kind}-{label}", spec.down, spec.mid, spec.up, spec.depth), trace


def _down_stage(u: Unit, n: int) -> int | None:
    """The down stage (of ``n``) whose removal takes ``u`` with it: a pair's, or a layer's (an up-path layer's mirror)."""
    if u.kind == "pairs":
        return u.stage
    if u.kind == "layer":
        return u.stage if u.path == "down" else n - 1 - u.stage
    return None


def _latency_saved(removed: list[Unit], rows: dict[str, dict], n: int) -> float:
    """The measured latency shares of ``removed``, summed, where a removed stage's share already holds those of its
    own pairs and layers removed before it (so they are not counted twice)."""
    gone = {u.stage for u in removed if u.kind == "stage"}
    return sum(rows[u.name]["latency_share"] for u in removed if u.kind == "stage" or _down_stage(u, n) not in gone)


def _give_back(spec, cost, removed, rows, kind, cfg, teacher, target, trace, progress):
    """Put back removed units, most important first, while the student stays within ``target``."""
    changed = True
    while changed:
        changed = False
        for unit in sorted(removed, key=lambda u: -rows[u.name]["rel_mse"]):
            rest = [u for u in removed if u != unit]
            try:
                trial = remove_all(cfg, rest)
            except UserError:
                continue
            after = _cost(kind, trial, cfg, teacher)
            if cost < after <= target + 1e-12:
                spec, cost, removed[:] = trial, after, rest
                trace.append({"restored": unit.name, "rel_mse": rows[unit.name]["rel_mse"], kind: round(cost, 6)})
                if progress:
                    print(f"  put back {unit.name}: {kind} {cost:.4f} of the teacher")
                changed = True
                break
    return spec, cost


def ranking_table(ranking: dict[str, Any]) -> str:
    """A Markdown table of the ranking, most important unit first."""
    lat = any("latency_share" in r for r in ranking["units"])
    head = "| unit | rel. MSE | 1 - cos | input change | params saved | GMACs saved |" + (" latency share |" if lat else "")
    rows = [head, "|" + "---|" * (6 + lat)]
    for r in ranking["units"]:
        ic = "-" if r["input_change"] is None else f"{r['input_change']:.4f}"
        gm = "-" if r["gmacs_saved"] is None else f"{r['gmacs_saved']:.3f}"
        rows.append(f"| {r['name']} | {r['rel_mse']:.4g} | {r['cosine']:.4g} | {ic} | {r['params_saved']:,} | "
                    f"{gm} |" + (f" {r['latency_share']:.1%} |" if lat else ""))
    if not ranking["units"]:
        rows.append("| (nothing: no unit can be removed from this teacher and leave a buildable student) | | | | | |")
    gmacs = "" if ranking["teacher_gmacs"] is None else f", {ranking['teacher_gmacs']:.3f} GMACs"
    net = ranking.get("backbone", "U-Net")
    rows.append(f"\n{ranking['samples']} calibration pictures of {ranking['data']}, seed {ranking['seed']}, "
                f"{ranking['timesteps']}; teacher {net} {ranking['teacher_params']:,} parameters{gmacs}; "
                f"{ranking['seconds']} s.")
    return "\n".join(rows)


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")


def plot(ranking: dict[str, Any], path: str | Path) -> None:
    """Importance (rel. MSE, log scale) against the parameters each unit saves, saved to ``path``
    (:data:`PLOT_SUFFIXES`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ranking["units"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("pairs", "o"), ("mid", "s"), ("stage", "D"), ("layer", "^"), ("block", "v")):
        pts = [(r["params_saved"] / 1e6, max(r["rel_mse"], 1e-12)) for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel(f"{ranking.get('backbone', 'U-Net')} parameters saved (M)")
    ax.set_ylabel("relative MSE of the prediction when bypassed")
    ax.set_title(f"Units of {Path(ranking['teacher']).name}: cost and importance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
