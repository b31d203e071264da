"""What every reward-training objective shares: its output type and the reward-function signature."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from ..backbones.base import Backbone

__all__ = ["RewardFn", "ObjectiveOutput", "Objective"]

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
"""``reward_fn(images, prompts) -> Tensor[B]``: images as the backbone decodes them (SD: ``[B, 3, H, W]``
in [0, 1]; toy: points ``[B, 2]``), differentiable with respect to the images. Higher is better."""


@dataclass
class ObjectiveOutput:
    """One objective evaluation: the scalar ``loss`` to minimise, the per-sample ``rewards`` ``[B]``
    (detached), and named scalar ``metrics`` for logging."""

    loss: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """A reward-training objective: a loss over one batch of prompts."""

    def __call__(
        self, backbone: Backbone, reward_fn: RewardFn, prompts: Sequence[str], seeds: Sequence[int]
    ) -> ObjectiveOutput: ...
