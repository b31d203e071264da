"""Reward-training objectives: each a loss over a batch of prompts (see :mod:`.base`)."""

from .base import Objective, ObjectiveOutput, RewardFn
from .draft import DraftK

__all__ = ["Objective", "ObjectiveOutput", "RewardFn", "DraftK"]
