"""Pieces the sampling-based objectives share: common settings, the per-batch setup, re-noising.

Conventions (sigma space, :mod:`rdt_lib.model_sampling`): a *step index* ``i`` counts sampling steps of an
``N``-step sigma list (0 = noisiest); step ``i`` runs from ``sigmas[i]`` to ``sigmas[i + 1]``. Latents at step
``i`` are the sampler's state at ``sigmas[i]`` (VP models: ``x0 + sigma * noise``; flow models: ``(1 - sigma) * x0 +
sigma * noise``). The x0 estimate is what the denoiser returns (:meth:`~rdt_lib.model_sampling.FlowMatch.
calculate_denoised`: ``x - sigma * eps`` for eps, ``x - sigma * v`` for flow); re-noising is :func:`noise_to_sigma`
and the diffusion-loss target :func:`diffusion_target`, one place each for VP and flow models. The default trajectory
(``scheduler="auto"``) is the family's (:func:`rdt_lib.sampling.family_sampler`: DDIM for SD, Euler on the SD3
pipeline's sigmas for flow models, its ancestral step when an eta is asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backbones.base import Backbone
from ..denoisers import GuidedDenoiser, ModelBranch, network_output
from ..model_sampling import ModelSampling
from ..samplers import RowNoise
from ..sampling import initial_noise, resolve_sampler, run_sampler, starting_latent
from ..sigma_schedules import sigmas_for
from .base import REWARD_LOSSES, Batch, ObjectiveOutput, RewardFn, reward_losses, reward_metrics, reward_terms, total_reward
from .regularizers import KLToBase, random_eta

__all__ = ["SamplingObjective", "ObjectiveRun", "noise_to_sigma", "diffusion_target"]


def noise_to_sigma(model_sampling: ModelSampling, x0: torch.Tensor, noise: torch.Tensor,
                   sigma: float | torch.Tensor) -> torch.Tensor:
    """Forward-diffuse clean latents to noise level ``sigma``: ``x0 + sigma * noise`` (VP) or
    ``(1 - sigma) * x0 + sigma * noise`` (flow)."""
    return model_sampling.noise_scaling(sigma, noise.float(), x0.float())


def diffusion_target(model_sampling: ModelSampling, x0: torch.Tensor, noise: torch.Tensor,
                     sigma: float | torch.Tensor) -> torch.Tensor:
    """The network's training target for ``noise_to_sigma(x0, noise, sigma)``: the noise (eps), the velocity
    ``(noise - sigma x0) / sqrt(sigma^2 + 1)`` (v), or ``noise - x0`` (flow)."""
    return model_sampling.network_target(x0.float(), noise.float(), sigma)


@dataclass
class SamplingObjective:
    """Settings every sampling-based objective shares.

    Args:
        num_steps: sampling steps of a training trajectory.
        adapter: the trained LoRA adapter's name.
        cfg_scale: classifier-free guidance scale of training samples (``None``: the backbone's default).
        scheduler: the sigma list (see :data:`rdt_lib.sampling.SCHEDULERS`); ``auto`` (the default): the model
            family's trajectory (:func:`rdt_lib.sampling.family_sampler`: SD: DDIM on its uniform timesteps; flow:
            Euler on the SD3 pipeline's sigma list, ``euler_ancestral`` when ``eta`` / ``eta_range`` asks for
            noise); a legacy combined name (``ddim``, ``ddpm``, ``dpmpp_2m_karras`` ...) also sets the sampler.
        sampler: the step rule (:data:`rdt_lib.sampling.SAMPLERS`); ``None``: from ``scheduler``, else ``ddim``.
        eta: eta of a stochastic sampler in [0, 1] (0 = deterministic): DDIM's eta on SD; on flow models the
            rectified-flow ancestral step's (``euler_ancestral`` / ``ddim`` on a flow model).
        eta_range: R0's random eta: ``(low, high)`` = an eta drawn uniformly per step (overrides ``eta``).
        kl_coeff: DRaFT+ KL weight: ``kl_coeff * mean((out_tuned - out_base)^2)`` over the gradient steps, ``out``
            the guided network output (eps for SD1.5, v for v-prediction models, the velocity for flow models).
        reward_loss: ``negative`` (``-reward``) or ``hinge`` (``relu(hinge_margin - reward)``).
        hinge_margin: margin of the hinge loss.
        loss_scale: multiplies the whole objective loss (ReFL / ImageReFL: 0.001).
        height, width: training image size in pixels (backbone default if None).
        negative_prompt: the unconditional prompt of classifier-free guidance.
    """

    num_steps: int = 25
    adapter: str = "tuned"
    cfg_scale: float | None = None
    scheduler: str = "auto"
    sampler: str | None = None
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
        resolve_sampler(self.sampler, self.scheduler)  # fails early on unknown names

    def start(self, backbone: Backbone, batch: Batch) -> "ObjectiveRun":
        """Encode the batch's prompts and prepare the scheduler, noise and eta for one evaluation."""
        return ObjectiveRun(self, backbone, batch)


class ObjectiveRun:
    """One objective evaluation's state: guided models (tuned and, for KL, base), sigma list, eta, noise.

    Attributes:
        denoiser: ``(x, sigma) -> guided x0`` of the tuned model, recording KL terms on gradient steps.
        model_sampling: the backbone's sigma-space conventions.
        sampler: the sampler name; ``sigmas``: its ``num_steps + 1`` sigmas.
        eta: float or per-step callable (R0's random eta).
    """

    def __init__(self, obj: SamplingObjective, backbone: Backbone, batch: Batch) -> None:
        self.obj = obj
        self.backbone = backbone
        self.batch = batch
        self.model_sampling = backbone.model_sampling
        branch = ModelBranch(backbone, adapter=obj.adapter, cfg_scale=obj.cfg_scale)
        self.guided = GuidedDenoiser.encode(branch, batch.prompts, [obj.negative_prompt] * len(batch))
        base = None
        if obj.kl_coeff > 0:
            base = self.guided.with_branch(ModelBranch(backbone, adapter=None, cfg_scale=obj.cfg_scale))
        self.denoiser = KLToBase(self.guided, base)
        stochastic = obj.eta_range is not None or bool(obj.eta)
        self.sampler, scheduler = resolve_sampler(obj.sampler, obj.scheduler, self.model_sampling,
                                                  stochastic=stochastic, kind=getattr(backbone, "kind", None))
        # the sigma list of this image size (Flux's shift depends on it); the denoiser's x0 does not
        self.sigmas = sigmas_for(scheduler, backbone.model_sampling_for(obj.height, obj.width), obj.num_steps,
                                 sampler=self.sampler)
        if obj.eta_range is not None:
            self.eta: float | Callable[[int], float] | None = random_eta(*obj.eta_range, obj.num_steps,
                                                                         batch.generator("eta"))
        else:
            self.eta = obj.eta if obj.eta else None

    def sigma(self, step: int) -> float:
        """The noise level at step index ``step``."""
        return float(self.sigmas[step])

    def noise(self) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per-row seeded standard-normal noise ``[B, *latent]`` (float32) and the row generators."""
        bb = self.backbone
        return initial_noise(bb.latent_shape(self.obj.height, self.obj.width), self.batch.seeds, device=bb.device)

    def start_latent(self, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's start from pure noise (:func:`rdt_lib.sampling.starting_latent`, ComfyUI's rule)."""
        return starting_latent(self.model_sampling, self.sigmas, noise)

    def denoise(self, x: torch.Tensor, generators: Sequence[torch.Generator], *, start_step: int = 0,
                end_step: int | None = None, grad_steps: Callable[[int], bool] | None = None,
                denoiser=None, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Sampler steps ``start_step .. end_step - 1`` from ``x`` (at ``sigmas[start_step]``), fresh noise per row
        from ``generators``; no gradient except on ``grad_steps``; ``callback`` as :func:`rdt_lib.sampling.run_sampler`."""
        return run_sampler(self.sampler, denoiser or self.denoiser, x, self.sigmas, start_step=start_step,
                           end_step=end_step, grad_steps=grad_steps, eta=self.eta,
                           noise_sampler=RowNoise(generators, x.shape[1:], device=x.device),
                           model_sampling=self.model_sampling, callback=callback)

    def conditional_prediction(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The tuned model's raw network output on the batch prompts without guidance (for the diffusion loss)."""
        return network_output(self.backbone, x, sigma, self.guided.cond, self.obj.adapter)

    def finish(self, images: torch.Tensor, prompts: Sequence[str], reward_fn: RewardFn,
               aux: dict[str, tuple[float, torch.Tensor]] | None = None, *, repeats: int = 1,
               extra_metrics: dict[str, float] | None = None, kl_from: KLToBase | None = None) -> ObjectiveOutput:
        """Score ``images`` and assemble the output.

        Args:
            images: decoded images (``repeats`` copies of the batch stacked, for DRaFT-LV).
            aux: non-reward terms, name -> (coefficient, differentiable scalar); ``kl`` is added automatically.
            repeats: copies of each sample in ``images``; the reward losses are summed over copies.
            kl_from: the denoiser whose recorded KL terms count (default :attr:`denoiser`).
        """
        obj = self.obj
        terms = reward_terms(reward_fn, images, list(prompts))
        losses = reward_losses(terms, obj.reward_loss, obj.hinge_margin)
        losses = {k: v * (obj.loss_scale * repeats) for k, v in losses.items()}
        aux = dict(aux or {})
        kl = (kl_from or self.denoiser).value
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
