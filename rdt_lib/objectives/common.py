"""Pieces the sampling-based objectives share: common settings, the per-batch setup, x0 prediction, re-noising.

Conventions: a *step index* ``i`` counts sampling steps of an ``N``-step schedule (0 = noisiest); a *timestep* ``t``
is in training units (0 .. num_train_timesteps - 1), ``t = scheduler.timesteps[i]``. Latents at step ``i`` are the
sampler's state before step ``i`` runs (for ``i = 0``: noise times ``init_noise_sigma``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backbones.base import Backbone
from ..dual import GuidedModel, ModelBranch
from ..sampling import initial_noise, make_scheduler
from .base import REWARD_LOSSES, Batch, ObjectiveOutput, RewardFn, reward_losses, reward_metrics, reward_terms, total_reward
from .regularizers import KLToBase, random_eta

__all__ = ["SamplingObjective", "ObjectiveRun", "predict_x0", "noise_to_step", "is_variance_exploding"]


def is_variance_exploding(scheduler) -> bool:
    """True for Karras-sigma samplers whose latents are ``x0 + sigma * noise`` (Euler): ``init_noise_sigma > 1``."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 + 1e-6


def _alpha(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod.to(device=like.device)[int(t)]
    return a.to(torch.float32)


def predict_x0(scheduler, latents: torch.Tensor, pred: torch.Tensor, step: int, prediction_type: str) -> torch.Tensor:
    """The clean-sample estimate from a model output at step index ``step`` (differentiable, no clipping).

    Variance-preserving samplers (DDIM, DDPM, DPM++), with ``a = alphas_cumprod[t]``: epsilon
    ``(x - sqrt(1-a) eps) / sqrt(a)``; v_prediction ``sqrt(a) x - sqrt(1-a) v``; sample ``pred``.
    Euler-style (``x = x0 + sigma * noise``, model input ``x / sqrt(sigma^2+1)``): epsilon ``x - sigma eps``;
    v_prediction ``v * (-sigma / sqrt(sigma^2+1)) + x / (sigma^2+1)``.
    """
    x = latents.float()
    p = pred.float()
    if prediction_type == "sample":
        out = p
    elif is_variance_exploding(scheduler):
        sigma = float(scheduler.sigmas[step])
        if prediction_type == "epsilon":
            out = x - sigma * p
        elif prediction_type == "v_prediction":
            out = p * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            raise ValueError(f"unsupported prediction type {prediction_type!r}")
    else:
        a = _alpha(scheduler, scheduler.timesteps[step], x)
        if prediction_type == "epsilon":
            out = (x - (1 - a).sqrt() * p) / a.sqrt()
        elif prediction_type == "v_prediction":
            out = a.sqrt() * x - (1 - a).sqrt() * p
        else:
            raise ValueError(f"unsupported prediction type {prediction_type!r}")
    return out.to(latents.dtype)


def noise_to_step(scheduler, x0: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
    """Forward-diffuse clean latents ``x0`` to the sampler state at step index ``step``.

    Variance-preserving: ``sqrt(a) x0 + sqrt(1-a) noise`` with ``a = alphas_cumprod[timesteps[step]]``;
    Euler-style: ``x0 + sigmas[step] * noise``.
    """
    if is_variance_exploding(scheduler):
        return (x0.float() + float(scheduler.sigmas[step]) * noise.float()).to(x0.dtype)
    a = _alpha(scheduler, scheduler.timesteps[step], x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The network's training target at timestep ``t``: the noise (epsilon), the velocity
    ``sqrt(a) noise - sqrt(1-a) x0`` (v_prediction) or ``x0`` (sample)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a = _alpha(scheduler, t, x0)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(noise.dtype)


@dataclass
class SamplingObjective:
    """Settings every sampling-based objective shares.

    Args:
        num_steps: sampling steps of a training trajectory.
        adapter: the trained LoRA adapter's name.
        cfg_scale: classifier-free guidance scale of training samples (``None``: the backbone's default).
        scheduler: sampler name (see :data:`rdt_lib.sampling.SCHEDULERS`).
        eta: DDIM eta in [0, 1] (0 = deterministic).
        eta_range: R0's random eta: ``(low, high)`` = a DDIM eta drawn uniformly per step (overrides ``eta``).
        kl_coeff: DRaFT+ KL weight (``kl_coeff * mean((eps_tuned - eps_base)^2)`` over the gradient steps).
        reward_loss: ``negative`` (``-reward``) or ``hinge`` (``relu(hinge_margin - reward)``).
        hinge_margin: margin of the hinge loss.
        loss_scale: multiplies the whole objective loss (ReFL / ImageReFL: 0.001).
        height, width: training image size in pixels (backbone default if None).
        negative_prompt: the unconditional prompt of classifier-free guidance.
    """

    num_steps: int = 25
    adapter: str = "tuned"
    cfg_scale: float | None = None
    scheduler: str = "ddim"
    eta: float = 0.0
    eta_range: tuple[float, float] | None = None
    kl_coeff: float = 0.0
    reward_loss: str = "negative"
    hinge_margin: float = 2.0
    loss_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.reward_loss not in REWARD_LOSSES:
            raise ValueError(f"reward_loss must be one of {', '.join(REWARD_LOSSES)}, got {self.reward_loss!r}")
        if self.kl_coeff < 0:
            raise ValueError(f"kl_coeff must be >= 0, got {self.kl_coeff}")
        if not self.loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {self.loss_scale}")
        if self.eta_range is not None:
            lo, hi = self.eta_range
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"eta_range must satisfy 0 <= low <= high <= 1, got {self.eta_range}")

    def start(self, backbone: Backbone, batch: Batch) -> "ObjectiveRun":
        """Encode the batch's prompts and prepare the scheduler, noise and eta for one evaluation."""
        return ObjectiveRun(self, backbone, batch)


class ObjectiveRun:
    """One objective evaluation's state: guided models (tuned and, for KL, base), scheduler, eta, noise.

    Attributes:
        denoiser: ``(x, t, i, n) -> guided prediction`` of the tuned model, recording KL terms on gradient steps.
        scheduler: a fresh scheduler with ``num_steps`` timesteps set.
        eta: float or per-step callable for :func:`rdt_lib.sampling.denoise`.
    """

    def __init__(self, obj: SamplingObjective, backbone: Backbone, batch: Batch) -> None:
        self.obj = obj
        self.backbone = backbone
        self.batch = batch
        branch = ModelBranch(backbone, adapter=obj.adapter, cfg_scale=obj.cfg_scale)
        self.guided = GuidedModel.encode(branch, batch.prompts, [obj.negative_prompt] * len(batch))
        base = None
        if obj.kl_coeff > 0:
            base = GuidedModel(ModelBranch(backbone, adapter=None, cfg_scale=obj.cfg_scale), self.guided.cond,
                               self.guided.uncond)
        self.denoiser = KLToBase(self.guided, base)
        self.scheduler = make_scheduler(obj.scheduler, backbone.scheduler_config)
        self.scheduler.set_timesteps(obj.num_steps, device=backbone.device)
        if obj.eta_range is not None:
            self.eta: float | Callable[[int], float] = random_eta(*obj.eta_range, obj.num_steps, batch.generator(1))
        else:
            self.eta = obj.eta

    def noise(self) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per-row seeded standard-normal noise ``[B, *latent]`` and the row generators (continued by the sampler)."""
        bb = self.backbone
        return initial_noise(bb.latent_shape(self.obj.height, self.obj.width), self.batch.seeds,
                             device=bb.device, dtype=bb.dtype)

    def conditional_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The tuned model's prediction on the batch prompts without guidance (for the diffusion loss)."""
        return self.backbone.predict(x, t, self.guided.cond, self.obj.adapter)

    def finish(self, images: torch.Tensor, prompts: Sequence[str], reward_fn: RewardFn,
               aux: dict[str, tuple[float, torch.Tensor]] | None = None, *, repeats: int = 1,
               extra_metrics: dict[str, float] | None = None) -> ObjectiveOutput:
        """Score ``images`` and assemble the output.

        Args:
            images: decoded images (``repeats`` copies of the batch stacked, for DRaFT-LV).
            aux: non-reward terms, name -> (coefficient, differentiable scalar); ``kl`` is added automatically.
            repeats: copies of each sample in ``images``; the reward losses are summed over copies.
        """
        obj = self.obj
        terms = reward_terms(reward_fn, images, list(prompts))
        losses = reward_losses(terms, obj.reward_loss, obj.hinge_margin)
        losses = {k: v * (obj.loss_scale * repeats) for k, v in losses.items()}
        aux = dict(aux or {})
        kl = self.denoiser.value
        if kl is not None:
            aux["kl"] = (obj.kl_coeff, kl)
        metrics = reward_metrics(terms)
        aux_loss = None
        for name, (coeff, value) in aux.items():
            metrics[name] = float(value.detach())
            term = obj.loss_scale * coeff * value
            aux_loss = term if aux_loss is None else aux_loss + term
        metrics.update(extra_metrics or {})
        loss = sum(losses.values()) + (aux_loss if aux_loss is not None else 0.0)
        rewards = total_reward(terms)
        if repeats > 1:
            rewards = rewards.reshape(repeats, -1).mean(0)
        return ObjectiveOutput(loss=loss, rewards=rewards, metrics=metrics, reward_losses=losses, aux_loss=aux_loss)
