"""What every reward-training objective shares: the batch, the output type, reward evaluation and reward losses.

An objective turns one micro-batch (:class:`Batch`) into an :class:`ObjectiveOutput`. The loss is kept in parts:
one differentiable loss per reward (``reward_losses``) and the rest (``aux_loss``: KL to the base model,
ImageReFL's diffusion loss), so the trainer can normalise each reward's gradient separately (R0). The plain
total is ``loss = sum(reward_losses) + aux_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from ..backbones.base import Backbone
from ..rng import rng_stream

__all__ = [
    "RewardFn",
    "Batch",
    "ObjectiveOutput",
    "Objective",
    "RewardTerm",
    "reward_terms",
    "reward_losses",
    "REWARD_LOSSES",
]

RewardFn = Callable[[torch.Tensor, Sequence[str]], Any]
"""``reward_fn(images, prompts) -> Tensor[B]``: images as the backbone decodes them (SD: ``[B, 3, H, W]``
in [0, 1]; toy: points ``[B, 2]``), differentiable with respect to the images. Higher is better.

Several rewards: an :class:`rdt_lib.rewards.CombinedReward` (its ``score`` returns a ``CombinedScore`` with
``parts`` / ``normalized``, and it has ``weights``); each reward then gets its own loss term."""

REWARD_LOSSES = ("negative", "hinge")


@dataclass
class Batch:
    """One micro-batch for an objective.

    Attributes:
        prompts: one prompt (caption) per row.
        seeds: one noise seed per row (same seed = same initial noise whatever the batch around it).
        images: real images ``[B, 3, H, W]`` in [0, 1] (ImageReFL), else None.
        batch_seed: seeds the choices made once per micro-batch (ReFL stop step, random DDIM eta per step).
            The trainer derives it from the optimizer step and the micro-batch index only, so every process
            of a multi-process run makes the same choice for its share of the batch.
        step: 0-based optimizer step the batch belongs to (ImageReFL's periodic plain-ReFL step).
    """

    prompts: list[str]
    seeds: list[int]
    images: torch.Tensor | None = None
    batch_seed: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        self.prompts = list(self.prompts)
        self.seeds = [int(s) for s in self.seeds]
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"batch has {len(self.prompts)} prompts but {len(self.seeds)} seeds")
        if not self.prompts:
            raise ValueError("empty batch")
        if self.images is not None and self.images.shape[0] != len(self.prompts):
            raise ValueError(f"batch has {self.images.shape[0]} images for {len(self.prompts)} captions")

    def __len__(self) -> int:
        return len(self.prompts)

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator for one per-batch choice: the named stream ``(batch_seed, purpose)`` of
        :func:`rdt_lib.rng.rng_stream` (``purpose``: ``"eta"``, ``"stop_step"``)."""
        return rng_stream(self.batch_seed, purpose)


@dataclass
class ObjectiveOutput:
    """One objective evaluation.

    Attributes:
        loss: the scalar to minimise (``sum(reward_losses) + aux_loss``).
        rewards: per-sample total (weighted, normalised) reward ``[B]``, detached.
        metrics: named scalars for logging (``reward``, ``reward/<name>`` raw means, ``kl``, ``diffusion_mse`` ...).
        reward_losses: one differentiable scalar per reward (already weighted and scaled); empty for objectives
            that do not split their loss.
        aux_loss: the differentiable non-reward part of ``loss`` (KL, diffusion loss), or None.
    """

    loss: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    reward_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None


class Objective(Protocol):
    """A reward-training objective: a loss over one micro-batch."""

    adapter: str

    def __call__(self, backbone: Backbone, reward_fn: RewardFn, batch: Batch) -> ObjectiveOutput: ...


@dataclass
class RewardTerm:
    """One reward on a batch: ``raw`` scores, ``normalized = (raw + offset) * scale`` and its ``weight``."""

    raw: torch.Tensor
    normalized: torch.Tensor
    weight: float = 1.0


def reward_terms(reward_fn: RewardFn, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, RewardTerm]:
    """Evaluate ``reward_fn`` and split it into its rewards.

    A plain function returning a tensor ``[B]`` is one reward named ``"reward"``. A ``CombinedReward``-like object
    (``score`` returning something with ``parts`` and ``normalized`` dicts, and a ``weights`` dict) gives one term
    per reward label.
    """
    score = getattr(reward_fn, "score", None)
    out = score(images, list(prompts)) if callable(score) else reward_fn(images, list(prompts))
    if torch.is_tensor(out):
        if out.shape != (images.shape[0],):
            raise ValueError(f"reward_fn must return a tensor of shape [B] = [{images.shape[0]}], got {tuple(out.shape)}")
        return {"reward": RewardTerm(out, out, 1.0)}
    parts: Mapping[str, torch.Tensor] | None = getattr(out, "parts", None)
    normalized: Mapping[str, torch.Tensor] | None = getattr(out, "normalized", None)
    if parts is None or normalized is None:
        raise TypeError(f"reward_fn returned {type(out).__name__}; expected a tensor [B] or a CombinedScore")
    weights = getattr(reward_fn, "weights", {}) or {}
    return {label: RewardTerm(parts[label], normalized[label], float(weights.get(label, 1.0))) for label in parts}


def reward_losses(
    terms: Mapping[str, RewardTerm], kind: str = "negative", margin: float = 2.0
) -> dict[str, torch.Tensor]:
    """Per-reward losses: ``negative``: ``-weight * mean(normalized)``; ``hinge`` (ImageReward's ReFL loss):
    ``weight * mean(relu(margin - normalized))``."""
    if kind not in REWARD_LOSSES:
        raise ValueError(f"reward loss {kind!r} is not one of {', '.join(REWARD_LOSSES)}")
    out = {}
    for label, term in terms.items():
        r = term.normalized.float()
        out[label] = term.weight * (-r.mean() if kind == "negative" else torch.relu(margin - r).mean())
    return out


def total_reward(terms: Mapping[str, RewardTerm]) -> torch.Tensor:
    """Per-sample ``sum(weight * normalized)`` ``[B]``, detached."""
    total = None
    for term in terms.values():
        t = term.weight * term.normalized.detach().float()
        total = t if total is None else total + t.to(total.device)
    assert total is not None
    return total


def reward_metrics(terms: Mapping[str, RewardTerm]) -> dict[str, float]:
    """``reward`` (mean total) plus ``reward/<label>`` (mean raw score) when there are several rewards or names."""
    metrics = {"reward": float(total_reward(terms).mean())}
    if len(terms) > 1 or "reward" not in terms:
        for label, term in terms.items():
            metrics[f"reward/{label}"] = float(term.raw.detach().float().mean())
    return metrics
