"""Several rewards at once, each normalised and weighted: ``total = sum_i w_i * norm_i(reward_i)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import RewardModel, validate_images, validate_prompts


@dataclass(frozen=True)
class Normalization:
    """Affine normalisation ``(reward + offset) * scale`` (ImageReFL's convention)."""

    offset: float = 0.0
    scale: float = 1.0

    def __call__(self, reward: torch.Tensor) -> torch.Tensor:
        return (reward + self.offset) * self.scale


#: ImageReFL's per-reward normalisation, in this library's units. ImageReFL uses HPS as a cosine (scale 1); our
#: HPS scores are 100 * cosine, hence scale 0.01 here. PickScore: offset -20, scale 0.1. ImageReward: offset
#: -0.167, scale 1.0333.
IMAGEREFL_NORMALIZATION: dict[str, Normalization] = {
    "hpsv2": Normalization(offset=0.0, scale=0.01),
    "hpsv2.1": Normalization(offset=0.0, scale=0.01),
    "pickscore": Normalization(offset=-20.0, scale=0.1),
    "imagereward": Normalization(offset=-0.167, scale=1.0333),
}


class Standardize(nn.Module):
    """``(reward - mean) / std``.

    With ``mean`` and ``std`` given the statistics are fixed. Otherwise they are running estimates: the first batch
    initialises them, each later batch (no gradient) moves them by ``momentum``. Running statistics make the
    normalised reward depend on the history of batches; give fixed values for reproducible scores.
    """

    def __init__(self, mean: float | None = None, std: float | None = None, momentum: float = 0.01,
                 eps: float = 1e-6) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("Standardize needs both mean and std, or neither (running estimates)")
        if std is not None and std <= 0:
            raise ValueError(f"Standardize std must be > 0, got {std}")
        self.fixed = mean is not None
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.tensor(float(mean) if self.fixed else 0.0))
        self.register_buffer("var", torch.tensor(float(std) ** 2 if self.fixed else 1.0))
        self.register_buffer("initialised", torch.tensor(self.fixed))

    def forward(self, reward: torch.Tensor) -> torch.Tensor:
        if not self.fixed:
            with torch.no_grad():
                r = reward.detach().float()
                mean = r.mean()
                var = r.var(unbiased=False) if r.numel() > 1 else self.var.to(r.device)
                if not bool(self.initialised):
                    self.mean.copy_(mean)
                    self.var.copy_(var)
                    self.initialised.fill_(True)
                else:
                    self.mean.lerp_(mean.to(self.mean.device), self.momentum)
                    self.var.lerp_(var.to(self.var.device), self.momentum)
        mean = self.mean.to(reward.device)
        std = (self.var.to(reward.device) + self.eps).sqrt()
        return (reward - mean) / std


def make_normalizer(reward_name: str, spec: object, *, label: str | None = None) -> Normalization | Standardize | None:
    """The normaliser for one reward: ``spec`` is a :class:`Normalization`, a :class:`Standardize`, ``"imagerefl"``
    (ImageReFL's offsets and scales for ``reward_name``), ``"standardize"`` (a fresh :class:`Standardize` with running
    statistics: the first batch it sees sets them, so on a single batch it standardises over that batch) or None."""
    if spec == "imagerefl":
        if reward_name not in IMAGEREFL_NORMALIZATION:
            raise ValueError(
                f"no ImageReFL normalisation for reward {reward_name!r}; known: {sorted(IMAGEREFL_NORMALIZATION)}"
            )
        spec = IMAGEREFL_NORMALIZATION[reward_name]
    elif spec == "standardize":
        spec = Standardize()
    if spec is None or isinstance(spec, (Normalization, Standardize)):
        return spec
    raise ValueError(
        f"normalization for {label or reward_name!r} must be a Normalization, a Standardize, 'imagerefl', "
        f"'standardize' or None; got {spec!r}"
    )


def combine_parts(parts: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                  normalizers: Mapping[str, Normalization | Standardize | None]) -> "CombinedScore":
    """``total = sum_label weights[label] * normalizers[label](parts[label])`` over rewards already scored.

    ``parts``: ``{label: float32 [B]}`` raw scores; a missing weight is 1.0, a missing normaliser the identity.
    """
    if not parts:
        raise ValueError("combine_parts needs at least one reward's scores")
    normalized: dict[str, torch.Tensor] = {}
    total = None
    for label, raw in parts.items():
        normalizer = normalizers.get(label)
        norm = raw if normalizer is None else normalizer(raw)
        normalized[label] = norm
        term = float(weights.get(label, 1.0)) * norm
        total = term if total is None else total + term.to(total.device)
    return CombinedScore(total=total, parts=dict(parts), normalized=normalized)


@dataclass
class CombinedScore:
    """Result of :meth:`CombinedReward.score`: all tensors are float32 ``[B]``."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    normalized: dict[str, torch.Tensor]


class CombinedReward(nn.Module):
    """Weighted sum of normalised rewards.

    Args:
        rewards: ``{label: RewardModel}``; the label names the part in the result.
        weights: ``{label: weight}``; missing labels get 1.0.
        normalization: per label a :class:`Normalization`, a :class:`Standardize`, ``"imagerefl"`` (the
            ImageReFL values for that reward's name), ``"standardize"`` (running statistics) or None (identity).
            A single value applies to every reward.
    """

    def __init__(
        self,
        rewards: Mapping[str, RewardModel],
        weights: Mapping[str, float] | None = None,
        normalization: Mapping[str, object] | object = None,
    ) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(f"weights given for unknown rewards {sorted(unknown)}; rewards are {sorted(rewards)}")
        # Plain dicts keyed by label (labels such as "hpsv2.1" are not valid module names); the ModuleLists
        # register the modules for .to() and state_dict().
        self.rewards: dict[str, RewardModel] = dict(rewards)
        self._reward_modules = nn.ModuleList(self.rewards.values())
        self.weights = {label: float(weights.get(label, 1.0)) for label in rewards}
        if isinstance(normalization, Mapping):
            unknown = set(normalization) - set(rewards)
            if unknown:
                raise ValueError(f"normalization given for unknown rewards {sorted(unknown)}")
            norm_spec = {label: normalization.get(label) for label in rewards}
        else:
            norm_spec = {label: normalization for label in rewards}
        self.normalizers: dict[str, Normalization | Standardize | None] = {
            label: self._normalizer(label, spec) for label, spec in norm_spec.items()
        }
        self._standardizers = nn.ModuleList(n for n in self.normalizers.values() if isinstance(n, Standardize))
        self.needs_prompts = any(r.needs_prompts for r in self.rewards.values())

    def _normalizer(self, label: str, spec: object) -> Normalization | Standardize | None:
        return make_normalizer(self.rewards[label].name, spec, label=label)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> CombinedScore:
        """Score ``[B, 3, H, W]`` images in [0, 1]; returns the weighted total and each raw and normalised part."""
        images = validate_images(images)
        prompts = validate_prompts(prompts, images.shape[0], required=self.needs_prompts)
        parts = {label: reward.score(images, prompts) for label, reward in self.rewards.items()}
        return combine_parts(parts, self.weights, self.normalizers)

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> CombinedScore:  # noqa: D102
        return self.score(images, prompts)
