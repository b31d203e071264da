"""Error types raised by :mod:`rdt_lib.rewards`.

Every error says what was wrong and what is accepted. Input and checkpoint problems are ``ValueError``
subclasses, so ``except ValueError`` catches them; missing weights are a ``FileNotFoundError``.
"""

from __future__ import annotations


class RewardInputError(ValueError):
    """Images or prompts passed to ``RewardModel.score`` are not what the reward accepts."""


class RewardCheckpointError(ValueError):
    """A checkpoint cannot be used: keys or shapes do not match the architecture, or it is an unsafe pickle."""


class UnknownRewardError(ValueError):
    """``load_reward`` was given a name that is not a known reward."""


class RewardWeightsNotFoundError(FileNotFoundError):
    """Weights are neither at the given path nor in the Hugging Face cache, and could not be downloaded."""
