"""The consistency-distillation maths of latent consistency models (LCM, arXiv 2310.04378), written against a
diffusers noise schedule: the DDIM ODE solver over a skipping schedule, the boundary-condition scalings, the
guidance-scale embedding, and the conversions between a U-Net's output and (x0, epsilon).

Shapes: latents ``(B, C, h, w)``; timesteps and solver indices ``(B,)`` long; guidance ``(B,)``.
"""

from __future__ import annotations

import math

import torch

from bksdm.objectives import x0_and_eps  # noqa: F401 (the solver's users call S.x0_and_eps)


class DDIMSolver:
    """A DDIM solver over ``steps`` of the ``T`` training timesteps: ``timesteps[i] = (i + 1) * (T // steps) - 1``;
    one :meth:`step` goes from ``timesteps[i]`` to the previous solver timestep (``timesteps[i] - T // steps``)."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int = 50):
        T = len(alphas_cumprod)
        self.skip = T // steps
        self.timesteps = torch.arange(1, steps + 1) * self.skip - 1
        ac = alphas_cumprod.double()
        self.alpha_prev = torch.cat([ac[:1], ac[self.timesteps[:-1]]]).float()  # the step's target alpha-bar

    def to(self, device) -> "DDIMSolver":
        self.timesteps, self.alpha_prev = self.timesteps.to(device), self.alpha_prev.to(device)
        return self

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The latent at the previous solver timestep from the estimates ``x0`` and ``eps`` at ``timesteps[index]``."""
        a = _expand(self.alpha_prev[index], x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the consistency function f(x, t) = c_skip x + c_out x0(x, t) (LCMScheduler's
    discrete form): c_skip -> 1 and c_out -> 0 at t = 0, so f is the identity on clean data."""
    st = scaling * t.double()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of guidance scales ``w`` (B,), as diffusers' pipelines compute it for a
    U-Net with ``time_cond_proj_dim`` (they pass ``guidance_scale - 1``)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber ``mean(sqrt((pred - target)^2 + c^2) - c)`` (LCM's choice) or plain MSE (``l2``)."""
    if kind == "l2":
        return torch.nn.functional.mse_loss(pred, target)
    return (((pred - target) ** 2 + c * c).sqrt() - c).mean()
