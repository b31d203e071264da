"""Diversity of samples from a known mixture: mode coverage, entropy over modes, off-distribution share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backbones.toy2d import GaussianMixture2D

__all__ = ["ModeStatistics", "mode_statistics"]


@dataclass(frozen=True)
class ModeStatistics:
    """Statistics of samples against the mixture they should come from.

    Attributes:
        counts: on-distribution samples assigned to each mode (nearest centre).
        modes_covered: modes holding at least ``min_share`` of the on-distribution samples.
        mode_entropy: entropy of the on-distribution mode histogram divided by ``log(n_modes)``, in [0, 1]
            (1 = all modes equally used, 0 = a single mode).
        off_distribution: share of samples farther than ``max_std`` standard deviations from every centre.
    """

    counts: tuple[int, ...]
    modes_covered: int
    mode_entropy: float
    off_distribution: float


def mode_statistics(
    points: torch.Tensor, mixture: GaussianMixture2D, *, max_std: float = 3.0, min_share: float = 0.02
) -> ModeStatistics:
    """Mode statistics of ``points [N, 2]`` (data units) under ``mixture``; see :class:`ModeStatistics`."""
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [N, 2] tensor, got shape {tuple(points.shape)}")
    idx, dist = mixture.nearest_mode(points.detach())
    on = dist <= max_std
    counts = torch.bincount(idx[on], minlength=mixture.n_modes)
    total = int(counts.sum())
    if total == 0:
        return ModeStatistics(tuple(counts.tolist()), 0, 0.0, 1.0)
    p = counts.double() / total
    nz = p[p > 0]
    entropy = max(0.0, float(-(nz * nz.log()).sum()) / math.log(mixture.n_modes))
    covered = int((p >= min_share).sum())
    return ModeStatistics(tuple(counts.tolist()), covered, entropy, float(1.0 - on.double().mean()))
