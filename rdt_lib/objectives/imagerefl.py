"""ImageReFL: ReFL started from real images, plus the plain diffusion loss (SPEC.md section 2).

For each real image + caption: encode the image (a sample of the VAE posterior), noise it to step
``start_step`` of a ``num_steps`` schedule (30 of 40), denoise without gradient with the tuned model to a stop
step drawn from ``stop_range`` ([30, 39]), take one gradient step predicting x0, decode and score it against
the caption. The diffusion loss is the noise-prediction MSE (velocity for v-prediction models) of the tuned
model, without guidance, on the noised real latent at ``start_step`` with the noise that produced it.

    loss = loss_scale * (diffusion_loss_weight * mse - sum_i w_i * (reward_i + offset_i) * scale_i)

(the paper: ``loss_scale = 0.001``, ``diffusion_loss_weight = 0.01``). Every ``plain_refl_every``-th optimizer
step (1-based; 0 = never) is a plain ReFL step from noise on the same captions instead.

Bugs of the reference trainer that this avoids: it steps the optimizer twice per iteration (here the objective
never touches the optimizer; the trainer steps once), and ``start_step == stop step`` runs no denoising step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from ..rng import rng_stream
from ..sampling import initial_noise
from .base import Batch, ObjectiveOutput, RewardFn
from .common import SamplingObjective, diffusion_target, noise_to_sigma
from .refl import ReFL, check_stop_range, draw_stop_step, refl_step

__all__ = ["ImageReFL"]


def _encode(backbone: Backbone, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """VAE latents of ``images`` [B, 3, H, W] in [0, 1], one seeded posterior sample per row."""
    takes_generator = "generator" in inspect.signature(backbone.encode_images).parameters
    rows = []
    for b, seed in enumerate(seeds):
        img = images[b: b + 1].to(backbone.device)
        if takes_generator:
            rows.append(backbone.encode_images(img, generator=rng_stream(seed, "vae_posterior", device=img.device)))
        else:
            rows.append(backbone.encode_images(img))
    return torch.cat(rows)


@dataclass
class ImageReFL(SamplingObjective):
    """ImageReFL loss (shared settings: :class:`SamplingObjective`).

    Args:
        stop_range: ``(first, last)`` step indices of the gradient step (inclusive).
        start_step: step index the real latent is noised to, ``0 <= start_step <= stop_range[0]``.
        diffusion_loss_weight: weight of the diffusion MSE (>= 0).
        plain_refl_every: every N-th optimizer step is a plain ReFL step from noise (0 = never).
    """

    num_steps: int = 40
    stop_range: tuple[int, int] = (30, 39)
    start_step: int = 30
    diffusion_loss_weight: float = 0.01
    plain_refl_every: int = 0
    loss_scale: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stop_range(self.stop_range, self.num_steps)
        lo = self.stop_range[0]
        if not 0 <= self.start_step <= lo:
            raise ValueError(f"start_step = {self.start_step} must be in [0, stop_range[0] = {lo}]")
        if self.diffusion_loss_weight < 0:
            raise ValueError(f"diffusion_loss_weight must be >= 0, got {self.diffusion_loss_weight}")
        if self.plain_refl_every < 0:
            raise ValueError(f"plain_refl_every must be >= 0, got {self.plain_refl_every}")

    def is_plain_refl_step(self, step: int) -> bool:
        """Whether 0-based optimizer step ``step`` is a plain ReFL step."""
        return self.plain_refl_every > 0 and (step + 1) % self.plain_refl_every == 0

    def plain_refl(self) -> ReFL:
        """The ReFL objective used on plain-ReFL steps (same settings)."""
        return ReFL(num_steps=self.num_steps, stop_range=tuple(self.stop_range), adapter=self.adapter,
                    cfg_scale=self.cfg_scale, scheduler=self.scheduler, sampler=self.sampler, eta=self.eta,
                    eta_range=self.eta_range,
                    kl_coeff=self.kl_coeff, reward_loss=self.reward_loss, hinge_margin=self.hinge_margin,
                    loss_scale=self.loss_scale, height=self.height, width=self.width,
                    negative_prompt=self.negative_prompt)

    def __call__(self, backbone: Backbone, reward_fn: RewardFn, batch: Batch) -> ObjectiveOutput:
        if self.is_plain_refl_step(batch.step):
            out = self.plain_refl()(backbone, reward_fn, batch)
            out.metrics["plain_refl"] = 1.0
            return out
        if batch.images is None:
            raise ValueError("ImageReFL needs real images: the batch has none (data.dataset)")
        run = self.start(backbone, batch)
        with torch.no_grad():
            z0 = _encode(backbone, batch.images.float(), batch.seeds).float()
        noise, gens = initial_noise(tuple(z0.shape[1:]), batch.seeds, device=z0.device)
        sigma0 = run.sigma(self.start_step)
        x_start = noise_to_sigma(run.model_sampling, z0, noise, sigma0)

        aux = {}
        if self.diffusion_loss_weight > 0:
            with torch.enable_grad():
                pred = run.conditional_prediction(x_start, sigma0)
                target = diffusion_target(run.model_sampling, z0, noise, sigma0)
                mse = ((pred.float() - target.float()) ** 2).mean()
            aux["diffusion_mse"] = (self.diffusion_loss_weight, mse)

        stop = draw_stop_step(self.stop_range, batch)
        latents = run.denoise(x_start, gens, start_step=self.start_step, end_step=stop)
        x0 = refl_step(run, latents, stop)
        images = backbone.decode(x0.to(backbone.dtype))
        return run.finish(images, batch.prompts, reward_fn, aux, extra_metrics={"stop_step": float(stop)})
