"""What every trainer shares (distill, DreamBooth, the mini teacher): the objective's target, the frozen teacher
wrapper, and a fresh accelerate precision state per recipe."""

from __future__ import annotations

import torch


def check_precision(mixed_precision: str) -> None:
    """The one precision policy of every trainer: fp16 autocast needs a CUDA GPU (on a CPU it is an error that
    names the alternatives, never a silent change of what was asked for)."""
    from bksdm.errors import UserError

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision fp16 needs a CUDA GPU; on a CPU use --mixed-precision bf16 or no")


def noisy_inputs(scheduler, latents: torch.Tensor, gen: torch.Generator,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training example of the denoising objective: ``(noisy latents, timesteps (B,), target)``.

    ``latents`` (B, C, h, w); the noise and then the timesteps are drawn from the CPU generator ``gen`` in that
    order, which resumed runs and the reference checks rely on: uniformly (the paper), or in proportion to
    ``weights`` (T,) (:func:`timestep_weights`); the target is the scheduler's ``prediction_type``'s. A wrapper
    of :class:`bksdm.objectives.DDPMObjective` (same draws, bit for bit) for a DDPM ``scheduler``."""
    from bksdm.objectives import DDPMObjective

    return DDPMObjective(scheduler, weights).sample(latents, gen)


def to_latent_space(z: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents ``z`` (B, C, h, w) in the denoiser's space: ``(z - shift_factor) * scaling_factor``. SD and SDXL
    have no shift; SD3 and Flux do (0.0609 / 0.1159), and their pipelines decode ``latents / scaling_factor +
    shift_factor`` (diffusers ``pipeline_stable_diffusion_3.py``, ``pipeline_flux.py``)."""
    shift = vae_config.get("shift_factor", None) or 0.0
    return (z - shift) * vae_config.get("scaling_factor", 0.18215)


def task_loss(objective, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoising task term for predictions ``pred`` and ``target`` (B, C, h, w) at ``t`` (B,): plain MSE (the
    papers'; exactly ``F.mse_loss``) unless the objective weights rows (a flow objective's ``weighting``
    sigma_sqrt / cosmap), then ``mean_b w_b mean(pred_b - target_b)^2`` with ``w = objective.weight(t)``, as
    diffusers' ``train_dreambooth_sd3.py`` / ``train_dreambooth_flux.py`` compute it."""
    import torch.nn.functional as F

    if getattr(objective, "weighting", "none") == "none":
        return F.mse_loss(pred, target)
    w = objective.weight(t).to(pred.device, pred.dtype).reshape(-1, *([1] * (pred.ndim - 1)))
    return (w * (pred - target) ** 2).reshape(pred.shape[0], -1).mean(1).mean()


def timestep_weights(num_timesteps: int, strategy: str, portion: float = 0.25, multiplier: float = 1.0) -> torch.Tensor | None:
    """Sampling weights (T,) over the training timesteps, as diffusers' SDXL training script's
    ``--timestep_bias_strategy`` builds them: ``earlier`` multiplies the lowest ``portion`` of timesteps (little
    noise: fine detail, grain) by ``multiplier``, ``later`` the highest (much noise: layout); ``none``: None (uniform,
    the paper)."""
    if strategy == "none" or multiplier == 1:
        return None
    weights = torch.ones(num_timesteps)
    n = max(1, int(portion * num_timesteps))
    weights[:n] *= multiplier if strategy == "earlier" else 1
    weights[num_timesteps - n:] *= multiplier if strategy == "later" else 1
    return weights / weights.sum()


class FrozenTeacher(torch.nn.Module):
    """Wraps the teacher denoiser (a U-Net or an SD3 / FLUX transformer, kept as ``.unet``) so it stays frozen and in
    eval mode even when ``train()`` is called on a parent; calls pass through (``family.denoise(teacher, ...)``)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def fresh_accelerator_state() -> None:
    """Forget the mixed-precision choice of an earlier recipe in this process (accelerate keeps one per process).

    Recipes called in-process one after another (``main(argv)`` twice, the demo after a test) may ask for different
    precisions. The process-level state (ranks, device) is kept, so this is safe under ``accelerate launch``.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model
