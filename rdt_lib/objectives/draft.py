"""DRaFT-K and DRaFT-LV (Clark et al.): backpropagate the reward through the end of the sampling chain.

DRaFT-K: sample ``num_steps`` steps (DDIM, eta 0, classifier-free guidance) from noise with the tuned LoRA
adapter; the first ``num_steps - K`` steps run without gradient, the last K with it; decode, score, minimise
``-reward``. K = 1 in the AIG paper's runs; K = ``None`` (all) is full backpropagation through sampling.
DRaFT+ is DRaFT-1 with ``kl_coeff > 0``.

DRaFT-LV: K = 1; after a no-gradient sample ``x0``, re-noise it ``n`` times to the last step and take one gradient
step from each; the reward losses of the ``n`` copies are summed (the gradients add up).

R0+'s intermediate supervision (``DraftK(intermediate_weight=w)``, any model family): besides the final image's
reward, a step index ``j`` is drawn uniformly from ``[0, num_steps - 2]`` once per micro-batch (stream
``"intermediate_step"`` of the batch seed), the trajectory's latent at step ``j`` is taken *detached* (the steps
before ``j`` pass no gradient), the tuned model predicts x0 from it with gradient (one extra evaluation), and the
reward of the decoded prediction is added with weight ``w`` to each reward's loss. The last step is excluded: with
a sigma list ending in 0 its x0 prediction is the final sample itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from ..rng import rng_stream
from .base import Batch, ObjectiveOutput, RewardFn
from .common import SamplingObjective, noise_to_sigma
from .refl import draw_stop_step, refl_step
from .regularizers import KLToBase

__all__ = ["DraftK", "DraftLV"]


def _as_batch(batch_or_prompts, seeds) -> Batch:
    if isinstance(batch_or_prompts, Batch):
        return batch_or_prompts
    if seeds is None:
        raise TypeError("call an objective as objective(backbone, reward_fn, batch) or (..., prompts, seeds)")
    return Batch(list(batch_or_prompts), list(seeds))


@dataclass
class DraftK(SamplingObjective):
    """DRaFT-K loss (see the module docstring and :class:`SamplingObjective` for the shared settings).

    Args:
        k: steps with gradient at the end of the trajectory, 1 <= k <= num_steps (``None`` = all).
        intermediate_weight: R0+'s intermediate supervision (module docstring): weight of the reward on the x0
            prediction at a random intermediate step (0 = off; needs ``num_steps >= 2``).
    """

    k: int | None = 1
    intermediate_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k is not None and not 1 <= self.k <= self.num_steps:
            raise ValueError(f"K must be in [1, num_steps={self.num_steps}] (or None for all steps), got {self.k}")
        if self.intermediate_weight < 0:
            raise ValueError(f"intermediate_weight must be >= 0, got {self.intermediate_weight}")
        if self.intermediate_weight > 0 and self.num_steps < 2:
            raise ValueError("intermediate supervision needs an intermediate step: num_steps >= 2, got "
                             f"{self.num_steps}")

    @property
    def grad_from(self) -> int:
        """First step index that runs with gradient."""
        return 0 if self.k is None else self.num_steps - self.k

    def __call__(self, backbone: Backbone, reward_fn: RewardFn, batch: Batch | list[str],
                 seeds: list[int] | None = None) -> ObjectiveOutput:
        batch = _as_batch(batch, seeds)
        run = self.start(backbone, batch)
        noise, gens = run.noise()
        supervised = self.intermediate_step(batch) if self.intermediate_weight > 0 else None
        seen: dict[str, torch.Tensor] = {}

        def keep(info: dict) -> None:
            if info["i"] == supervised:
                seen["x"] = info["x"].detach()  # detached: the steps before j pass no gradient

        latents = run.denoise(run.start_latent(noise), gens, grad_steps=lambda i: i >= self.grad_from,
                              callback=keep if supervised is not None else None)
        images = backbone.decode(latents.to(backbone.dtype))
        out = run.finish(images, batch.prompts, reward_fn)
        if supervised is None:
            return out
        x0 = refl_step(run, seen["x"], supervised)
        inter = run.finish(backbone.decode(x0.to(backbone.dtype)), batch.prompts, reward_fn,
                           kl_from=KLToBase(run.guided, None))
        w = self.intermediate_weight
        for label, value in inter.reward_losses.items():
            out.reward_losses[label] = out.reward_losses[label] + w * value
        out.loss = out.loss + w * sum(inter.reward_losses.values())
        out.metrics.update({f"intermediate/{k}": v for k, v in inter.metrics.items()})
        out.metrics["intermediate_step"] = float(supervised)
        return out

    def intermediate_step(self, batch: Batch) -> int:
        """R0+'s supervised step index for ``batch``: uniform in ``[0, num_steps - 2]`` (stream
        ``"intermediate_step"`` of the batch seed)."""
        return draw_stop_step((0, self.num_steps - 2), batch, "intermediate_step")


@dataclass
class DraftLV(SamplingObjective):
    """DRaFT-LV loss.

    Args:
        n: re-noised copies of each no-gradient sample (one gradient step each; the paper uses 2).
    """

    n: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ValueError(f"DRaFT-LV needs n >= 1 re-noised copies, got {self.n}")

    def __call__(self, backbone: Backbone, reward_fn: RewardFn, batch: Batch | list[str],
                 seeds: list[int] | None = None) -> ObjectiveOutput:
        batch = _as_batch(batch, seeds)
        run = self.start(backbone, batch)
        noise, gens = run.noise()
        last = self.num_steps - 1
        x0 = run.denoise(run.start_latent(noise), gens)
        # fresh noise per copy j and row: the named stream (row seed, "renoise", j), the same in any batch
        regens = [rng_stream(seed, "renoise", j) for j in range(self.n) for seed in batch.seeds]
        shape = tuple(x0.shape[1:])
        renoise = torch.stack([torch.randn(shape, generator=g) for g in regens]).to(x0.device)
        x0s = x0.detach().repeat(self.n, *([1] * (x0.ndim - 1)))
        x_last = noise_to_sigma(run.model_sampling, x0s, renoise, run.sigma(last))
        # one gradient step from the last step for all copies at once
        denoiser_n = run.denoiser.repeat(self.n)
        latents = run.denoise(x_last, regens, start_step=last, grad_steps=lambda i: True, denoiser=denoiser_n)
        images = backbone.decode(latents.to(backbone.dtype))
        return run.finish(images, batch.prompts * self.n, reward_fn, repeats=self.n, kl_from=denoiser_n)
