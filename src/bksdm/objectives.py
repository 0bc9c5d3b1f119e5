"""Training objectives: "latents, generator -> noisy input, timestep, target", built from the teacher's scheduler.

The scheduler config a pipeline ships is the teacher's training contract (as ``prediction_type`` already is for
SD-v2): a DDPM-family config (SD, SDXL, the mini world) gives :class:`DDPMObjective`, a
``FlowMatchEulerDiscreteScheduler`` config (SD3 / SD3.5, Flux.1) gives :class:`FlowObjective`. Both draw the noise
first and then the timestep, both from the caller's CPU generator, so a micro-batch's draws depend only on that
generator: exact resume holds for either.

An objective answers ``sample(latents, gen) -> (noisy, t, target)``, ``weight(t)`` (per-row loss weights) and
``x0(pred, noisy, t)`` (the clean latents a prediction implies). ``t`` is always in scheduler units (0-1000): the
U-Net and SD3 take it as is, Flux takes ``t / 1000`` (:meth:`bksdm.arch.flow_families.FluxFamily.denoise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch

from bksdm.errors import UserError

DENSITIES = ("logit_normal", "uniform", "mode")
"""Timestep densities of flow matching (diffusers ``training_utils.compute_density_for_timestep_sampling``)."""
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
"""Loss weightings of flow matching (diffusers ``training_utils.compute_loss_weighting_for_sd3``)."""


class Objective(Protocol):
    name: str  # "epsilon" | "v_prediction" | "sample" | "flow"

    def sample(self, latents: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def weight(self, t: torch.Tensor) -> torch.Tensor: ...

    def x0(self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) on ``like``'s device and dtype, to broadcast over (B, C, h, w)."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class DDPMObjective:
    """The denoising objective of DDPM-trained teachers (SD-v1/v2, SDXL, the mini world).

    ``scheduler``: a diffusers ``DDPMScheduler`` (its ``alphas_cumprod`` and ``prediction_type``); ``weights`` (T,):
    timestep sampling weights (:func:`bksdm.training.timestep_weights`), None for uniform (the paper).
    """

    scheduler: Any
    weights: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.scheduler.config.prediction_type

    def sample(self, latents: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy (B, C, h, w), t (B,) int64 in 0..T-1, target)``: noise ~ N(0, I) and then t (uniform, or by
        :attr:`weights`) from the CPU generator ``gen`` in that order (what resume and the reference checks rely
        on); ``noisy = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (``DDPMScheduler.add_noise``); target as
        :meth:`target`."""
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        if self.weights is None:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        else:
            t = torch.multinomial(self.weights, latents.shape[0], replacement=True, generator=gen)
        t = t.to(latents.device)
        return self.scheduler.add_noise(latents, noise, t), t, self.target(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns: ``eps`` (epsilon), ``sqrt(a_t) eps - sqrt(1 - a_t) x0`` (v_prediction,
        ``DDPMScheduler.get_velocity``) or ``x0`` (sample). Same shape as ``latents``."""
        if self.name == "epsilon":
            return noise
        if self.name == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        if self.name == "sample":
            return latents
        raise UserError(f"scheduler prediction_type {self.name!r} is not supported; use epsilon, v_prediction or sample")

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row loss weights (B,): ones (the papers' plain MSE)."""
        return torch.ones(t.shape[0], device=t.device)

    def x0(self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean latents implied by ``pred`` at ``t`` for ``noisy`` (:func:`x0_and_eps`)."""
        return x0_and_eps(pred, t, noisy, self.scheduler.alphas_cumprod, self.name)[0]


def x0_and_eps(output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, epsilon)`` implied by a DDPM-family network ``output`` (B, C, h, w) at integer timesteps ``t`` (B,)
    for the noisy ``sample``: DDPM eq. 15 for epsilon, Salimans & Ho 2022 (v = sqrt(a) eps - sqrt(1 - a) x0) for
    v_prediction, and the output itself for sample (diffusers' ``DDPMScheduler.step`` computes the same
    ``pred_original_sample``). Used by :class:`DDPMObjective` and LCM's solver (:mod:`bksdm.lcm.solver`)."""
    ac = alphas_cumprod.to(sample.device)[t]
    a, s = _rows(ac.sqrt(), sample), _rows((1 - ac).sqrt(), sample)
    if prediction_type == "epsilon":
        return (sample - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * sample - s * output, a * output + s * sample
    if prediction_type == "sample":
        return output, (sample - a * output) / s
    raise UserError(f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon, v_prediction or sample")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift ``mu``: linear in the image token count from ``base_shift`` at
    ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (diffusers ``pipelines/flux/pipeline_flux.py``,
    ``calculate_shift``; SD3's pipeline copies it)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


@dataclass
class FlowObjective:
    """Rectified flow (SD3 paper, Esser et al. 2024, arXiv 2403.03206, eq. 1-3 and section 3.1).

    ``x_t = (1 - sigma) x0 + sigma eps`` with sigma in (0, 1], target ``eps - x0`` (the velocity the network
    predicts), ``x0 = x_t - sigma pred``. sigma is drawn as diffusers' SD3 / Flux training scripts draw it
    (``examples/dreambooth/train_dreambooth_sd3.py``): ``u`` from :data:`density`
    (``training_utils.compute_density_for_timestep_sampling``), index ``floor(u T)`` into the scheduler's table of
    ``T`` sigmas (which holds SD3's static ``shift``, 3.0), then, for a scheduler with ``use_dynamic_shifting``
    (Flux) and ``dynamic_shift``, ``scheduler.time_shift(mu, 1, sigma)`` with ``mu`` from the image token count as
    the pipeline computes it (:func:`calculate_shift` of ``(h / patch) (w / patch)`` tokens and the scheduler's
    ``base/max_image_seq_len``, ``base/max_shift``). ``dynamic_shift=False`` draws Flux's sigmas unshifted, as
    diffusers' Flux DreamBooth script does.

    ``scheduler``: a ``FlowMatchEulerDiscreteScheduler`` built from the teacher's config (never stepped).
    """

    scheduler: Any
    density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # diffusers' scripts' default
    weighting: str = "none"
    dynamic_shift: bool = True
    patch_size: int = 2  # SD3 and Flux both patchify 2x2
    name: str = "flow"

    def __post_init__(self):
        if self.density not in DENSITIES:
            raise UserError(f"unknown timestep density {self.density!r}; choose one of: {', '.join(DENSITIES)}")
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"unknown loss weighting {self.weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def mu(self, height: int, width: int) -> float:
        """The dynamic shift for latents of ``height`` x ``width`` cells (Flux: ``(h/2)(w/2)`` packed tokens)."""
        c = self.scheduler.config
        tokens = (height // self.patch_size) * (width // self.patch_size)
        return calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)

    def sigmas(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """sigma (B,) in (0, 1] for density draws ``u`` (B,) in [0, 1] and latents of ``height`` x ``width``."""
        idx = (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)  # u == 1.0 can round up
        sigma = self.scheduler.sigmas[idx]
        if self.scheduler.config.use_dynamic_shifting and self.dynamic_shift:
            sigma = self.scheduler.time_shift(self.mu(height, width), 1.0, sigma)
        return sigma

    def sample(self, latents: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy (B, C, h, w), t (B,) float = sigma T, target eps - x0)``: the noise and then ``u`` from the CPU
        generator ``gen`` in that order."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        u = compute_density_for_timestep_sampling(self.density, latents.shape[0], self.logit_mean, self.logit_std,
                                                  self.mode_scale, device="cpu", generator=gen)
        if latents.ndim != 4:  # packed Flux latents (B, tokens, 64) would give a wrong mu, silently
            raise ValueError(f"FlowObjective.sample takes unpacked latents (B, C, h, w), not {tuple(latents.shape)}")
        sigma = self.sigmas(u, latents.shape[-2], latents.shape[-1])
        s = _rows(sigma, latents)
        noisy = (1 - s) * latents + s * noise
        return noisy, (sigma * self.num_timesteps).to(latents.device), noise - latents

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row loss weights (B,) for ``t`` in scheduler units (``compute_loss_weighting_for_sd3``: none = 1,
        sigma_sqrt = sigma^-2, cosmap = 2 / (pi (1 - 2 sigma + 2 sigma^2)))."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting, t.float() / self.num_timesteps)

    def x0(self, pred: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t - sigma pred`` with sigma = t / T (diffusers' ``--precondition_outputs``)."""
        return noisy - _rows(t.float() / self.num_timesteps, noisy) * pred


FLOW_PREFIX = "FlowMatch"
"""diffusers names every flow-matching scheduler ``FlowMatch...`` (Euler, Heun, LCM): all share the sigma table
and shift keys the objective reads, so any of them names a flow-matching teacher."""


def is_flow_config(scheduler_config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching one (by ``_class_name`` when saved; a live scheduler's config
    has no name, and a flow config has no betas)."""
    name = scheduler_config.get("_class_name")
    if name is not None:
        return str(name).startswith(FLOW_PREFIX)
    return "use_dynamic_shifting" in scheduler_config and "beta_schedule" not in scheduler_config


def objective_for(scheduler_config: Mapping[str, Any], weights: torch.Tensor | None = None,
                  **flow: Any) -> DDPMObjective | FlowObjective:
    """The objective a teacher was trained with, from its scheduler config (``scheduler/scheduler_config.json``):
    :class:`FlowObjective` for a flow-matching scheduler (``flow``: its options: density, logit_mean, logit_std,
    mode_scale, weighting, dynamic_shift, patch_size), else :class:`DDPMObjective` on a ``DDPMScheduler`` of the
    same config (what the trainers have always built; ``weights``: timestep sampling weights)."""
    import diffusers

    config = dict(scheduler_config)
    if is_flow_config(config):
        if weights is not None:
            raise UserError("timestep bias applies to DDPM teachers; flow-matching teachers draw sigma from a density")
        return FlowObjective(diffusers.FlowMatchEulerDiscreteScheduler.from_config(config), **flow)
    if flow:
        raise UserError(f"{', '.join(sorted(flow))} apply to flow-matching teachers; this one's scheduler is "
                        f"{config.get('_class_name', 'a DDPM-family scheduler')}")
    if "beta_schedule" not in config and config.get("trained_betas") is None:  # diffusers would assume linear betas
        raise UserError(f"scheduler config {config.get('_class_name', '')} has neither beta_schedule nor trained_betas "
                        f"nor a flow-matching class; bksdm cannot tell how this teacher was trained")
    return DDPMObjective(diffusers.DDPMScheduler.from_config(config), weights)


def load_objective(folder: str | Path, weights: torch.Tensor | None = None, **flow: Any) -> DDPMObjective | FlowObjective:
    """:func:`objective_for` of a pipeline folder's ``scheduler/scheduler_config.json`` (a one-line error naming an
    unreadable file)."""
    import json

    from bksdm.errors import reading

    path = Path(folder) / "scheduler" / "scheduler_config.json"
    with reading(path, "scheduler config", "restore the folder from its source (or run bksdm compress again)"):
        config = json.loads(path.read_text())
    return objective_for(config, weights, **flow)
