"""DRaFT-K (Clark et al.): backpropagate the reward through the last K sampling steps.

Sample ``num_steps`` steps (DDIM, eta 0, with classifier-free guidance) from noise with the tuned LoRA
adapter active; the first ``num_steps - K`` steps run without gradient, the last K with it; decode,
score, and minimise ``-mean(reward)``. K = 1 in the AIG paper's runs; K = num_steps is full
backpropagation through sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..backbones.base import Backbone
from ..dual import GuidedModel, ModelBranch
from ..sampling import denoise, initial_noise, make_scheduler
from .base import ObjectiveOutput, RewardFn

__all__ = ["DraftK"]


@dataclass
class DraftK:
    """DRaFT-K loss.

    Args:
        num_steps: sampling steps per training sample.
        k: steps with gradient at the end of the trajectory, 1 <= k <= num_steps (``None`` = all).
        adapter: the trained LoRA adapter's name.
        cfg_scale: classifier-free guidance scale during training samples (``None``: backbone default).
        scheduler: sampler name (DRaFT uses ``ddim``).
        eta: DDIM eta (0 = deterministic).
        height, width: training image size in pixels (backbone default if omitted).
    """

    num_steps: int = 25
    k: int | None = 1
    adapter: str = "tuned"
    cfg_scale: float | None = None
    scheduler: str = "ddim"
    eta: float = 0.0
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.k is not None and not 1 <= self.k <= self.num_steps:
            raise ValueError(f"K must be in [1, num_steps={self.num_steps}] (or None for all steps), got {self.k}")

    @property
    def grad_from(self) -> int:
        """First step index that runs with gradient."""
        return 0 if self.k is None else self.num_steps - self.k

    def __call__(
        self, backbone: Backbone, reward_fn: RewardFn, prompts: Sequence[str], seeds: Sequence[int]
    ) -> ObjectiveOutput:
        prompts = list(prompts)
        branch = ModelBranch(backbone, adapter=self.adapter, cfg_scale=self.cfg_scale)
        guided = GuidedModel.encode(branch, prompts, [""] * len(prompts))
        scheduler = make_scheduler(self.scheduler, backbone.scheduler_config)
        scheduler.set_timesteps(self.num_steps, device=backbone.device)
        noise, gens = initial_noise(
            backbone.latent_shape(self.height, self.width), seeds, device=backbone.device, dtype=backbone.dtype
        )
        latents = denoise(
            lambda x, t, i, n: guided.predict(x, t),
            scheduler,
            noise * scheduler.init_noise_sigma,
            self.num_steps,
            generator=gens,
            eta=self.eta,
            grad_steps=lambda i: i >= self.grad_from,
            set_timesteps=False,
        )
        images = backbone.decode(latents)
        rewards = reward_fn(images, prompts)
        loss = -rewards.mean()
        return ObjectiveOutput(loss=loss, rewards=rewards.detach(), metrics={"reward": rewards.detach().mean().item()})
