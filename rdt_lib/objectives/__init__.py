"""Reward-training objectives: each a loss over one micro-batch (see :mod:`.base`).

- :class:`DraftK` / :class:`DraftLV` (:mod:`.draft`): DRaFT-K, DRaFT-LV; DRaFT+ = DRaFT-1 with ``kl_coeff > 0``.
- :class:`ReFL` (:mod:`.refl`), :class:`ImageReFL` (:mod:`.imagerefl`).
- Regularisers (:mod:`.regularizers`): KL to the base model, L2 to the initial weights, random DDIM eta,
  per-reward gradient normalisation.
"""

from .base import Batch, Objective, ObjectiveOutput, RewardFn, RewardTerm, reward_losses, reward_terms
from .common import SamplingObjective, diffusion_target, noise_to_sigma
from .draft import DraftK, DraftLV
from .imagerefl import ImageReFL
from .refl import ReFL
from .regularizers import KLToBase, l2_to_init, normalized_reward_gradients, random_eta

__all__ = [
    "Batch",
    "Objective",
    "ObjectiveOutput",
    "RewardFn",
    "RewardTerm",
    "reward_terms",
    "reward_losses",
    "SamplingObjective",
    "noise_to_sigma",
    "diffusion_target",
    "DraftK",
    "DraftLV",
    "ReFL",
    "ImageReFL",
    "KLToBase",
    "l2_to_init",
    "random_eta",
    "normalized_reward_gradients",
]
