"""Differentiable human-preference reward models on transformers + kornia.

>>> from rdt_lib.rewards import load_reward
>>> reward = load_reward("hpsv2.1")                      # doctest: +SKIP
>>> scores = reward.score(images, prompts)               # doctest: +SKIP  (images [B,3,H,W] in [0,1])

Rewards and units (float32 ``[B]``, differentiable with respect to the images):

- ``pickscore``: ``logit_scale.exp() * cos``, about 18..23 on SD images.
- ``hpsv2`` / ``hpsv2.1``: ``100 * cos`` (HPS benchmark units), v2.1 about 25..32; v2 and v2.1 not comparable.
- ``imagereward``: normalised ImageReward ``(mlp - 0.167) / 1.033``, about -2..2.
- ``aesthetic``: LAION aesthetic v2, about 1..10.
- ``clipscore``: ``max(100 * cos, 0)`` with CLIP ViT-L/14.
"""

from .base import RewardModel, validate_images, validate_prompts
from .clip_rewards import AestheticReward, ClipSimilarityReward, clipscore_reward, pickscore_reward
from .combined import (
    IMAGEREFL_NORMALIZATION,
    CombinedReward,
    CombinedScore,
    Normalization,
    Standardize,
    combine_parts,
    make_normalizer,
)
from .errors import RewardCheckpointError, RewardInputError, RewardWeightsNotFoundError, UnknownRewardError
from .heads import LinearMLPHead
from .identify import check_reward_path, identify_reward_file
from .hps import clip_model_from_open_clip, hps_reward_from_state_dict, open_clip_to_transformers
from .imagereward import ImageRewardModel, imagereward_from_state_dict
from .preprocess import ImagePreprocess
from .registry import RewardInfo, available, clear_cache, load_reward

__all__ = [
    "load_reward",
    "identify_reward_file",
    "check_reward_path",
    "available",
    "clear_cache",
    "RewardInfo",
    "RewardModel",
    "ClipSimilarityReward",
    "AestheticReward",
    "LinearMLPHead",
    "pickscore_reward",
    "clipscore_reward",
    "hps_reward_from_state_dict",
    "ImageRewardModel",
    "CombinedReward",
    "CombinedScore",
    "Normalization",
    "Standardize",
    "IMAGEREFL_NORMALIZATION",
    "combine_parts",
    "make_normalizer",
    "ImagePreprocess",
    "RewardInputError",
    "RewardCheckpointError",
    "RewardWeightsNotFoundError",
    "UnknownRewardError",
    "validate_images",
    "validate_prompts",
    "clip_model_from_open_clip",
    "open_clip_to_transformers",
    "imagereward_from_state_dict",
]
