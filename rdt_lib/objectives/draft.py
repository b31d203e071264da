"""DRaFT-K and DRaFT-LV (Clark et al.): backpropagate the reward through the end of the sampling chain.

DRaFT-K: sample ``num_steps`` steps (DDIM, eta 0, classifier-free guidance) from noise with the tuned LoRA
adapter; the first ``num_steps - K`` steps run without gradient, the last K with it; decode, score, minimise
``-reward``. K = 1 in the AIG paper's runs; K = ``None`` (all) is full backpropagation through sampling.
DRaFT+ is DRaFT-1 with ``kl_coeff > 0``.

DRaFT-LV: K = 1; after a no-gradient sample ``x0``, re-noise it ``n`` times to the last step and take one gradient
step from each; the reward losses of the ``n`` copies are summed (the gradients add up).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones.base import Backbone
from ..sampling import denoise, initial_noise
from .base import Batch, ObjectiveOutput, RewardFn
from .common import SamplingObjective, noise_to_step

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
    """

    k: int | None = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k is not None and not 1 <= self.k <= self.num_steps:
            raise ValueError(f"K must be in [1, num_steps={self.num_steps}] (or None for all steps), got {self.k}")

    @property
    def grad_from(self) -> int:
        """First step index that runs with gradient."""
        return 0 if self.k is None else self.num_steps - self.k

    def __call__(self, backbone: Backbone, reward_fn: RewardFn, batch: Batch | list[str],
                 seeds: list[int] | None = None) -> ObjectiveOutput:
        batch = _as_batch(batch, seeds)
        run = self.start(backbone, batch)
        noise, gens = run.noise()
        latents = denoise(
            run.denoiser,
            run.scheduler,
            noise * run.scheduler.init_noise_sigma,
            self.num_steps,
            generator=gens,
            eta=run.eta,
            grad_steps=lambda i: i >= self.grad_from,
            set_timesteps=False,
        )
        images = backbone.decode(latents)
        return run.finish(images, batch.prompts, reward_fn)


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
        x0 = denoise(run.denoiser, run.scheduler, noise * run.scheduler.init_noise_sigma, self.num_steps,
                     end_step=last + 1, generator=gens, eta=run.eta, set_timesteps=False)
        # fresh noise per copy, seeded per row and copy (the same row gets the same copies in any batch)
        renoise, regens = initial_noise(tuple(x0.shape[1:]), [s * 7919 + 104729 * (j + 1) for j in range(self.n)
                                                         for s in batch.seeds], device=x0.device, dtype=x0.dtype)
        x0s = x0.detach().repeat(self.n, *([1] * (x0.ndim - 1)))
        x_last = noise_to_step(run.scheduler, x0s, renoise, last)
        # one gradient step from the last step for all copies at once
        run_n = _repeat_run(run, self.n)
        latents = denoise(run_n.denoiser, run.scheduler, x_last, self.num_steps, start_step=last,
                          generator=regens,
                          eta=run.eta, grad_steps=lambda i: True, set_timesteps=False)
        images = backbone.decode(latents)
        return run_n.finish(images, batch.prompts * self.n, reward_fn, repeats=self.n)


def _repeat_run(run, n: int):
    """The same run with its prompts repeated ``n`` times (copy-major: rows ``j*B .. (j+1)*B-1`` are copy ``j``)."""
    if n == 1:
        return run
    from ..backbones.base import Conditioning
    from ..dual import GuidedModel
    from .regularizers import KLToBase

    def rep(c: Conditioning | None) -> Conditioning | None:
        return None if c is None else Conditioning.cat([c] * n)

    clone = object.__new__(type(run))
    clone.__dict__.update(run.__dict__)
    clone.guided = GuidedModel(run.guided.branch, rep(run.guided.cond), rep(run.guided.uncond))
    base = run.denoiser.base
    clone.denoiser = KLToBase(clone.guided, None if base is None else GuidedModel(base.branch, rep(base.cond),
                                                                                   rep(base.uncond)))
    return clone
