"""ReFL (ImageReward, Xu et al.): one gradient step at a random late step, reward on the predicted x0.

Sample a ``num_steps`` schedule (40 in the paper) from noise without gradient up to a stop step ``s`` drawn
uniformly from ``stop_range`` (inclusive, default [30, 39]); at step ``s`` evaluate the tuned model with gradient,
take its x0 estimate (the denoiser's output, :mod:`rdt_lib.model_sampling`), decode and score.
ImageReward's loss is ``relu(2 - reward) * 1e-3`` (``reward_loss="hinge"``, ``loss_scale=0.001``).
The stop step is drawn once per micro-batch from ``Batch.batch_seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from .base import Batch, ObjectiveOutput, RewardFn
from .common import ObjectiveRun, SamplingObjective

__all__ = ["ReFL", "refl_step", "draw_stop_step"]


def check_stop_range(stop_range: tuple[int, int], num_steps: int) -> None:
    """``stop_range = (first, last)`` step indices must satisfy ``0 <= first <= last < num_steps``."""
    lo, hi = stop_range
    if not 0 <= lo <= hi < num_steps:
        raise ValueError(f"stop_range {tuple(stop_range)} must satisfy 0 <= first <= last < num_steps = {num_steps}")


def draw_stop_step(stop_range: tuple[int, int], batch: Batch, purpose: str = "stop_step") -> int:
    """A step index drawn uniformly from ``[first, last]`` with the batch's per-batch generator ``purpose``."""
    lo, hi = int(stop_range[0]), int(stop_range[1])
    return int(torch.randint(lo, hi + 1, (1,), generator=batch.generator(purpose)).item())


def refl_step(run: ObjectiveRun, latents: torch.Tensor, step: int) -> torch.Tensor:
    """With gradient: the tuned model's guided x0 estimate for ``latents`` at step index ``step``'s sigma."""
    sigma = torch.full((latents.shape[0],), run.sigma(step), device=latents.device)
    with torch.enable_grad():
        return run.denoiser(latents, sigma)


@dataclass
class ReFL(SamplingObjective):
    """ReFL loss (shared settings: :class:`SamplingObjective`).

    Args:
        stop_range: ``(first, last)`` step indices (inclusive) of the gradient step, ``0 <= first <= last <
            num_steps``; the paper: (30, 39) of 40.
    """

    num_steps: int = 40
    stop_range: tuple[int, int] = (30, 39)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_stop_range(self.stop_range, self.num_steps)

    def __call__(self, backbone: Backbone, reward_fn: RewardFn, batch: Batch) -> ObjectiveOutput:
        run = self.start(backbone, batch)
        noise, gens = run.noise()
        stop = draw_stop_step(self.stop_range, batch)
        latents = run.denoise(run.start_latent(noise), gens, end_step=stop)
        x0 = refl_step(run, latents, stop)
        images = backbone.decode(x0.to(backbone.dtype))
        return run.finish(images, batch.prompts, reward_fn, extra_metrics={"stop_step": float(stop)})
