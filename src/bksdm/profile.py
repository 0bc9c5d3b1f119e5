"""Parameters, MACs and latency of each pipeline component and of a whole generated image (paper Table 1).

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on the meta device, so counting
a full-size U-Net costs no memory and well under a second. Two figures are reported for every component:

* ``gmacs`` — convolutions and linear layers, attention projections included: the paper's convention
  (SD-v1.4 U-Net 338.6 G, the "339G" of Table 1);
* ``gmacs_with_scores`` — the same plus the attention-score products QK^T and AV (SD-v1.4 U-Net 401.6 G),
  which the paper's profiler did not count.

Latency is real: random weights of the real architecture, one warm-up, then the median of ``runs`` calls.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from bksdm.arch.families import family_of
from bksdm.errors import UserError
from bksdm.models import DTYPES



def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (falls back to platform.processor())."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_gmacs(fn: Callable[[], Any]) -> tuple[float, float]:
    """(GMACs without attention scores, GMACs with them) of running ``fn`` (build its inputs on meta)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    counts = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    total = sum(counts.values()) / 2e9
    # On the meta device scaled_dot_product_attention decomposes into bmm: those are the score products.
    scores = counts.get("aten.bmm", 0) / 2e9
    return total - scores, total


def median_latency(fn: Callable[[], Any], runs: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn`` after ``warmup`` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class TextEncoders(torch.nn.Module):
    """Several text encoders run on the same token ids as one component (SDXL's two): parameters, MACs and latency
    are those of all of them."""

    def __init__(self, encoders: list[torch.nn.Module]):
        super().__init__()
        self.encoders = torch.nn.ModuleList(encoders)

    @property
    def config(self):
        return self.encoders[0].config

    def forward(self, ids: torch.Tensor) -> list[Any]:
        return [enc(ids, output_hidden_states=True) for enc in self.encoders]


def text_component(parts: dict[str, Any]) -> torch.nn.Module:
    """The pipeline's text encoder, or its text encoders as one :class:`TextEncoders` (SDXL)."""
    if "text_encoder_2" in parts:
        return TextEncoders([parts["text_encoder"], parts["text_encoder_2"]])
    return parts["text_encoder"]


@dataclass
class Components:
    """The three networks of a text-to-image pipeline that generation runs (the text side may be several
    encoders, :class:`TextEncoders`)."""

    name: str
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module  # needs ``decode(latents)`` and a ``config`` with latent channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return cfg.in_channels, size, size


def _vae_decoder_params(vae: torch.nn.Module) -> int:
    decoder = getattr(vae, "decoder", None)
    return count_params(decoder) if decoder is not None else count_params(vae)


def _calls(c: Components, device, dtype, unet_batch: int, cache_branch: int | None = None):
    """Closures running one text-encoder, U-Net and VAE-decoder call with inputs on ``device``; with a
    ``cache_branch``, also a cached U-Net call (``unet_cached``: :func:`bksdm.fast.unet_forward` with deep
    features)."""
    ch, h, w = c.latent_shape
    ids = torch.zeros(1, c.text_encoder.config.max_position_embeddings, dtype=torch.long, device=device)
    lat = torch.randn(unet_batch, ch, h, w, device=device, dtype=dtype)
    family = family_of(c.unet.config)
    cond = family.unet_kwargs(family.dummy_conditioning(c.unet.config, unet_batch, device, dtype))
    if c.unet.config.get("time_cond_proj_dim"):  # an LCM U-Net's guidance embedding
        cond["timestep_cond"] = torch.zeros(unet_batch, c.unet.config.time_cond_proj_dim, device=device, dtype=dtype)
    t = torch.full((unet_batch,), 500, device=device)
    vae_ch = getattr(c.vae.config, "latent_channels", ch)
    dec_in = torch.randn(1, vae_ch, h, w, device=device, dtype=dtype)
    calls = {
        "text_encoder": lambda: c.text_encoder(ids),
        "unet": lambda: c.unet(lat, t, **cond),
        "vae_decoder": lambda: c.vae.decode(dec_in),
    }
    if cache_branch is not None:
        from bksdm.fast import unet_forward

        with torch.no_grad():
            deep = unet_forward(c.unet, lat, t, branch=cache_branch, **cond)[1]
        calls["unet_cached"] = lambda: unet_forward(c.unet, lat, t, branch=cache_branch, deep=deep, **cond)
    return calls


@dataclass
class Profile:
    name: str
    params: dict[str, int]
    gmacs: dict[str, float]
    gmacs_with_scores: dict[str, float]
    latency_s: dict[str, dict[str, float]] = field(default_factory=dict)
    device: str = ""

    guidance: bool = True  # classifier-free guidance: prompt and empty prompt, U-Net at batch 2 per step
    decoder: str = "vae"  # the decoder row: the pipeline's VAE decoder, or a tiny decoder (AutoencoderTiny)
    cache_interval: int = 1  # feature caching: a whole U-Net call every N steps, cached calls between

    def unet_calls(self, steps: int) -> tuple[int, int]:
        """(whole, cached) U-Net calls of an image of ``steps`` calls (:class:`bksdm.fast.FeatureCache`)."""
        whole = -(-steps // self.cache_interval)
        return whole, steps - whole

    def record(self, steps: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"name": self.name}
        for comp in ("unet", "text_encoder", "vae_decoder"):
            rec[f"{comp}_params"] = self.params[comp]
            rec[f"{comp}_gmacs"] = round(self.gmacs[comp], 2)
            rec[f"{comp}_gmacs_with_scores"] = round(self.gmacs_with_scores[comp], 2)
        rec["decoder"] = self.decoder
        rec["whole_params"] = sum(self.params.values())
        rec["steps"] = steps
        rec["guidance_batch"] = g = 2 if self.guidance else 1
        whole, cached = self.unet_calls(steps)
        unet = whole * self.gmacs["unet"]
        if self.cache_interval > 1:
            rec["cache_interval"] = self.cache_interval
            rec["unet_cached_gmacs"] = round(self.gmacs["unet_cached"], 2)
            rec["unet_cached_share"] = round(self.gmacs["unet_cached"] / self.gmacs["unet"], 4)
            unet += cached * self.gmacs["unet_cached"]
        # one image: prompt (and empty prompt) encoded, a U-Net call per step at batch g, one decode
        rec["whole_gmacs"] = round(g * self.gmacs["text_encoder"] + g * unet + self.gmacs["vae_decoder"], 1)
        if self.latency_s:
            rec["device"] = self.device
            rec["latency_s"] = self.latency_s
        return rec


def profile_components(
    c: Components,
    latency: bool = True,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    device: str = "cpu",
    steps: int = 25,
    runs: int = 3,
    guidance: bool | None = None,
    cache_interval: int = 1,
    cache_branch: int = 0,
) -> Profile:
    """Profile ``c``. MACs are counted on meta copies; latency runs the real modules on ``device``.

    With classifier-free ``guidance`` the U-Net latency is one call at batch 2 and ``whole_s`` adds two
    text-encoder calls, ``steps`` U-Net calls and one decode; without it (a few-step LCM U-Net that embeds the
    guidance scale, the default for one with ``time_cond_proj_dim``; LCM-LoRA at guidance 1) batch 1 and one
    text-encoder call. The sampler itself costs nothing measurable next to these, so any scheduler's image time
    is this for its step count. ``cache_interval`` > 1: feature caching (:class:`bksdm.fast.FeatureCache`), the
    cached U-Net call (branch ``cache_branch``) counted and timed as ``unet_cached``.
    """
    from bksdm.fast import FeatureCache

    FeatureCache(c.unet, cache_interval, cache_branch)  # checks the interval and the branch
    branch = cache_branch if cache_interval > 1 else None
    if guidance is None:
        guidance = not c.unet.config.get("time_cond_proj_dim")
    g = 2 if guidance else 1
    params = {"unet": count_params(c.unet), "text_encoder": count_params(c.text_encoder), "vae_decoder": _vae_decoder_params(c.vae)}
    meta = Components(c.name, _to_meta(c.unet), _to_meta(c.text_encoder), _to_meta(c.vae))
    gmacs, with_scores = {}, {}
    for comp, fn in _calls(meta, "meta", torch.float32, unet_batch=1, cache_branch=branch).items():
        gmacs[comp], with_scores[comp] = count_gmacs(fn)
    decoder = "AutoencoderTiny" if type(c.vae).__name__ == "AutoencoderTiny" else "vae"
    prof = Profile(c.name, params, gmacs, with_scores, guidance=guidance, decoder=decoder, cache_interval=cache_interval)
    if latency:
        dev = torch.device(device)
        prof.device = device_name(dev)
        for dname in dtypes:
            dtype = DTYPES[dname]
            for m in (c.unet, c.text_encoder, c.vae):
                m.to(dev, dtype=dtype).eval()
            lat = {comp: median_latency(fn, runs=runs) for comp, fn in _calls(c, dev, dtype, g, branch).items()}
            whole, cached = prof.unet_calls(steps)
            lat["whole"] = g * lat["text_encoder"] + whole * lat["unet"] + cached * lat.get("unet_cached", 0) + lat["vae_decoder"]
            prof.latency_s[dname] = {k: round(v, 4) for k, v in lat.items()}
        for m in (c.unet, c.text_encoder, c.vae):
            m.to("cpu", dtype=torch.float32)
    return prof


def _to_meta(module: torch.nn.Module) -> torch.nn.Module:
    """A parameter-free copy of ``module`` on the meta device (rebuilt from its config)."""
    if isinstance(module, TextEncoders):
        return TextEncoders([_to_meta(m) for m in module.encoders])
    cls = type(module)
    with torch.device("meta"):
        if hasattr(cls, "from_config") and hasattr(module, "config") and not hasattr(module.config, "to_dict"):
            return cls.from_config(module.config)
        return cls(module.config)  # transformers models take their config object


def materialise(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Give a meta-device module real CPU storage filled with small random values.

    Latency does not depend on weight values; this is ~10x faster than the models' own initialisers
    for a full-size U-Net, and avoids uninitialised memory (denormals would distort CPU timings).
    """
    module.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, 0.02, generator=generator)
    return module


def random_components(name: str, unet_config: dict, text_config: dict, vae_config: dict, meta: bool = False,
                      text_config_2: dict | None = None) -> Components:
    """Components of the given configs with random weights (no download), fp32 on the CPU (or on meta);
    ``text_config_2``: a second text encoder with projection (SDXL)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        texts = [CLIPTextModel(CLIPTextConfig(**text_config))]
        if text_config_2:
            texts.append(CLIPTextModelWithProjection(CLIPTextConfig(**text_config_2)))
        vae = AutoencoderKL.from_config(vae_config)
    if not meta:
        gen = torch.Generator().manual_seed(0)
        unet, vae = materialise(unet, gen), materialise(vae, gen)
        for text in texts:
            materialise(text, gen)
            for key, buf in text.named_buffers():  # integer buffers (position ids) must hold their real values
                if key.endswith("position_ids"):
                    buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    text = texts[0] if len(texts) == 1 else TextEncoders(texts)
    return Components(name, unet, text, vae)


def tiny_decoder(decoder: str, c: Components):
    """The tiny decoder ``decoder`` names for ``c``: ``taesd`` (TAESD's architecture, diffusers' ``AutoencoderTiny``
    defaults, with random weights: TAESDXL has the same) or a folder (:func:`bksdm.fast.load_decoder`)."""
    from diffusers import AutoencoderTiny

    from bksdm.fast import check_decoder, load_decoder

    if decoder != "taesd":
        return load_decoder(decoder, c.unet, c.vae)
    tiny = AutoencoderTiny(latent_channels=c.unet.config.out_channels)
    check_decoder(tiny, c.unet, c.vae, f"TAESD for {c.name}")
    return materialise(tiny.to("meta"), torch.Generator().manual_seed(0)).eval()


TRANSFORMER_NOTE = ("transformer only: text encoders and VAE of SD3/FLUX families are not profiled yet; GMACs of one "
                    "call at batch 1")


def transformer_records(arch: str, students: list[str], resolution: int = 1024) -> list[dict[str, Any]]:
    """Records of the transformer of ``arch`` (:data:`bksdm.arch.dit_configs.DIT_CONFIGS`) and of its
    ``students`` (spec names or files): exact parameters and GMACs of one call at ``resolution`` px with the
    family's default text length, counted on the meta device."""
    from bksdm.arch import dit, load_spec
    from bksdm.arch.dit_configs import DIT_CONFIGS, TEXT_TOKENS

    teacher = DIT_CONFIGS[arch]
    configs = [(arch, teacher)] + [(s, {**dit.derive(teacher, load_spec(s, teacher), with_keys=False).student_config,
                                        "_class_name": teacher["_class_name"]}) for s in students]
    records = []
    for name, cfg in configs:
        model, inputs = dit.meta_model(cfg), dit.dummy_inputs(cfg, resolution, TEXT_TOKENS[arch])
        gmacs, with_scores = count_gmacs(lambda: model(**inputs))
        records.append({"name": name, "transformer_params": count_params(model), "transformer_gmacs": round(gmacs, 2),
                        "transformer_gmacs_with_scores": round(with_scores, 2), "resolution": resolution,
                        "text_tokens": TEXT_TOKENS[arch], "blocks": dit.block_counts({**cfg}), "note": TRANSFORMER_NOTE})
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of profile records (teacher first), latency columns when measured."""
    if records and "transformer_params" in records[0]:
        rows = ["| model | blocks | transformer params | GMACs | (+attn scores) |", "|---|---|---:|---:|---:|"]
        rows += [f"| {r['name']} | {' + '.join(str(n) for n in r['blocks'].values())} | {r['transformer_params']:,} | "
                 f"{r['transformer_gmacs']:.1f} | {r['transformer_gmacs_with_scores']:.1f} |" for r in records]
        r = records[0]
        return "\n".join(rows + [f"\nAt {r['resolution']} px with {r['text_tokens']} text tokens; {r['note']}."])
    head = ["model", "U-Net params", "U-Net GMACs", "(+attn scores)", "whole params", "whole GMACs"]
    dnames = sorted({d for r in records for d in r.get("latency_s", {})}, key=list(DTYPES).index)
    for d in dnames:
        head += [f"TE {d} ms", f"U-Net {d} s", f"VAE dec {d} s", f"image {d} s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        name = r["name"] + (" + tiny decoder" if r.get("decoder") == "AutoencoderTiny" else "") + (
            f" + cache every {r['cache_interval']} ({r['unet_cached_share']:.0%} of a U-Net call between)"
            if r.get("cache_interval") else "")
        row = [name, f"{r['unet_params'] / 1e6:.1f}M", f"{r['unet_gmacs']:.1f}", f"{r['unet_gmacs_with_scores']:.1f}",
               f"{r['whole_params'] / 1e9:.3f}B", f"{r['whole_gmacs'] / 1e3:.2f}T"]
        for d in dnames:
            lat = r.get("latency_s", {}).get(d)
            row += ["-"] * 4 if lat is None else [f"{lat['text_encoder'] * 1e3:.0f}", f"{lat['unet']:.2f}", f"{lat['vae_decoder']:.2f}", f"{lat['whole']:.1f}"]
        rows.append("| " + " | ".join(row) + " |")
    device = next((r["device"] for r in records if r.get("device")), None)
    if device:
        rows.append(f"\nLatency: median of runs after a warm-up on {device}; image = text-encoder calls + "
                    f"{records[0]['steps']} U-Net calls + 1 decode; with guidance (batch 2: "
                    f"{', '.join(r['name'] for r in records if r['guidance_batch'] == 2) or 'none'}) the U-Net runs at "
                    f"batch 2 and the text encoder twice, else batch 1 and once.")
    return "\n".join(rows)


def _pipeline_components(folder: str) -> Components:
    from bksdm.models import import_own_components, load_components, model_index, pipeline_folder

    path = pipeline_folder(folder)
    import_own_components(path)
    c = load_components(path, ("unet", "text_encoder", "vae") + (("text_encoder_2",) if "text_encoder_2" in model_index(path) else ()))
    return Components(str(folder), c["unet"].float(), text_component(c).float(), c["vae"].float())


def profile_models(
    arch: str | None,
    students: list[str],
    models: list[str],
    latency: bool = True,
    dtypes: list[str] | None = None,
    device: str | None = None,
    steps: int = 25,
    runs: int = 3,
    guidance: bool | None = None,
    decoder: str | None = None,
    cache_interval: int = 1,
    cache_branch: int = 0,
) -> list[dict[str, Any]]:
    """Profile records of ``arch`` (teacher first) and its ``students`` with random weights, then ``models``.
    ``decoder``: an ``AutoencoderTiny`` folder, or ``taesd`` for TAESD's architecture with random weights, in
    place of each VAE decoder; ``cache_interval`` / ``cache_branch``: feature caching (:func:`profile_components`)."""
    from bksdm.arch import derive, load_spec
    from bksdm.arch.families import FAMILIES, family_component_config

    from bksdm.models import default_device

    from bksdm.arch.dit_configs import DIT_CONFIGS

    if arch in DIT_CONFIGS:
        if latency:
            raise UserError(f"--arch {arch}: latency of transformer backbones is not measured yet; pass --no-latency")
        if models:
            raise UserError(f"--arch {arch} (a transformer) cannot be profiled with --model in one call yet")
        return transformer_records(arch, students)
    device = device or default_device()
    if dtypes is None:
        dtypes = ["fp32", "fp16"] if device.startswith("cuda") else ["fp32", "bf16"]
    if bad := [d for d in dtypes if d not in DTYPES]:
        raise UserError(f"unknown precision {bad[0]!r}; choose from {', '.join(DTYPES)}")
    if students and not arch:
        raise UserError("--student needs --arch (the teacher family the specs apply to)")
    todo: list[Callable[[], Components]] = []
    if arch:
        unet_cfg = family_component_config(arch, "unet")
        te, vae = family_component_config(arch, "text_encoder"), family_component_config(arch, "vae")
        te2 = family_component_config(arch, "text_encoder_2") if "text_encoder_2" in FAMILIES[arch] else None
        derived = [(s, derive(unet_cfg, load_spec(s, unet_cfg), with_keys=False).student_config) for s in students]
        for name, cfg in [(arch, unet_cfg)] + derived:
            todo.append(lambda name=name, cfg=cfg: random_components(name, cfg, te, vae, meta=not latency, text_config_2=te2))
    for m in models:
        todo.append(lambda m=m: _pipeline_components(m))
    records = []
    for build in todo:  # one model in memory at a time
        comps = build()
        if decoder:
            comps.vae = tiny_decoder(decoder, comps)
        records.append(profile_components(comps, latency, tuple(dtypes), device, steps, runs, guidance, cache_interval,
                                          cache_branch).record(steps))
        del comps
    return records


def unet_gmacs(config: dict[str, Any]) -> float:
    """GMACs of one call at batch 1 of a ``UNet2DConditionModel`` of ``config`` at its ``sample_size``, the paper's
    convention (no attention-score products), counted on the meta device (cached per config)."""
    import json

    key = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    if key not in _GMACS:
        _GMACS[key] = _count_unet_gmacs(config)
    return _GMACS[key]


_GMACS: dict[str, float] = {}


def _count_unet_gmacs(config: dict[str, Any]) -> float:
    from bksdm.arch.derive import meta_unet

    unet = meta_unet({k: v for k, v in config.items() if not k.startswith("_")})
    size = config["sample_size"] if isinstance(config["sample_size"], int) else config["sample_size"][0]
    family = family_of(config)
    with torch.device("meta"):
        x, t = torch.zeros(1, config["in_channels"], size, size), torch.full((1,), 500)
        cond = family.unet_kwargs(family.dummy_conditioning(config, 1, "meta", torch.float32))
    if config.get("time_cond_proj_dim"):
        cond["timestep_cond"] = torch.zeros(1, config["time_cond_proj_dim"], device="meta")
    return count_gmacs(lambda: unet(x, t, **cond))[0]
