"""Diversity and coverage of a set of feature vectors (embeddings of generated images, or 2-D toy samples).

Every function takes a float tensor ``[N, D]`` (one row per item, any dtype/device), works in float64 on the
CPU internally and returns a Python float.

- :func:`pairwise_cosine_diversity`: ImageReFL's diversity of one prompt's group, ``1 - mean pairwise cosine``.
- :func:`grouped_diversity`: that diversity averaged over prompts.
- :func:`vendi_score`: the Vendi score (effective number of distinct items) with a cosine kernel.
- :func:`spectral_distance`: the AIG paper's coverage metric, the distance between the sorted eigenvalue
  spectra of two feature covariance matrices (SPEC.md section 4).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from ..errors import InputError

__all__ = ["pairwise_cosine_diversity", "grouped_diversity", "vendi_score", "spectral_distance"]


def _as_matrix(x: torch.Tensor, name: str, *, min_rows: int) -> torch.Tensor:
    """``x`` as a finite float64 CPU ``[N, D]`` matrix with ``N >= min_rows``, or an :class:`InputError`."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape [N, D], got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] == 0:
        raise InputError(f"{name} must have shape [N, D] with D >= 1, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise InputError(f"{name} needs at least {min_rows} rows (items), got {x.shape[0]}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} holds non-finite values (NaN or inf)")
    return x


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm; a zero row has no direction, so it is an error."""
    norms = x.norm(dim=1, keepdim=True)
    zero = (norms.squeeze(1) == 0).nonzero().flatten()
    if zero.numel():
        raise InputError(f"{name} row {int(zero[0])} is all zeros: its cosine similarity is undefined")
    return x / norms


def _cosine_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    u = _unit_rows(x, name)
    return (u @ u.T).clamp(-1.0, 1.0)


def pairwise_cosine_diversity(embeddings: torch.Tensor) -> float:
    """ImageReFL's diversity of one group: ``1 - mean cosine similarity`` over the ``N(N-1)/2`` distinct pairs.

    Args:
        embeddings: ``[N, D]`` with ``N >= 2`` (e.g. DINO CLS embeddings of one prompt's N images); no zero rows.

    Returns:
        A float in ``[0, 2]``: 0 when all embeddings point the same way, 1 when they are pairwise orthogonal
        (for non-negative features such as post-ReLU activations the range is ``[0, 1]``).

    Raises:
        InputError: fewer than 2 items (diversity undefined), a zero row, non-finite values, a wrong shape.
    """
    x = _as_matrix(embeddings, "embeddings", min_rows=2)
    cos = _cosine_matrix(x, "embeddings")
    n = x.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    return float(1.0 - cos[iu[0], iu[1]].mean())


def grouped_diversity(embeddings: torch.Tensor, groups: Sequence[Hashable]) -> float:
    """Mean over groups (prompts) of :func:`pairwise_cosine_diversity` of each group's rows.

    Args:
        embeddings: ``[M, D]``, one row per image.
        groups: ``M`` hashable group keys (e.g. the prompt of each image), in row order; every group must hold
            at least 2 rows.

    Returns:
        A float in ``[0, 2]`` (see :func:`pairwise_cosine_diversity`); every group weighs the same.

    Raises:
        InputError: ``len(groups) != M``, a group with fewer than 2 rows (named), or bad embeddings.
    """
    x = _as_matrix(embeddings, "embeddings", min_rows=1)
    groups = list(groups)
    if len(groups) != x.shape[0]:
        raise InputError(f"groups has {len(groups)} keys but embeddings has {x.shape[0]} rows; give one key per row")
    rows: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    for g, idx in rows.items():
        if len(idx) < 2:
            raise InputError(f"group {g!r} has {len(idx)} item; diversity needs at least 2 items per group")
    values = [pairwise_cosine_diversity(x[idx]) for idx in rows.values()]
    return float(sum(values) / len(values))


def vendi_score(embeddings: torch.Tensor) -> float:
    """The Vendi score (Friedman & Dieng 2023) with the cosine-similarity kernel.

    ``K_ij = cos(e_i, e_j)``; with ``lambda_1..N`` the eigenvalues of ``K / N`` (a symmetric eigensolver;
    they are non-negative and sum to 1), the score is ``exp(-sum_i lambda_i log lambda_i)`` (``0 log 0 = 0``).
    Where ``N > D`` the non-zero eigenvalues come from the ``D x D`` matrix ``U^T U / N`` of the unit rows ``U``
    (the same spectrum, cheaper).

    Args:
        embeddings: ``[N, D]``, ``N >= 1``, no zero rows.

    Returns:
        A float in ``[1, N]``: the effective number of distinct items; 1 when all embeddings point the same way,
        N when they are pairwise orthogonal (so at most ``min(N, D)``).
    """
    x = _as_matrix(embeddings, "embeddings", min_rows=1)
    u = _unit_rows(x, "embeddings")
    n, d = u.shape
    # K / N = U U^T / N and U^T U / N share their non-zero eigenvalues: take the smaller matrix
    gram = u @ u.T if n <= d else u.T @ u
    lam = torch.linalg.eigvalsh(gram / n).clamp_min(0.0)
    lam = lam / lam.sum()
    nz = lam[lam > 0]
    entropy = float(-(nz * nz.log()).sum())
    return float(math.exp(max(entropy, 0.0)))


def _covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of the unbiased (``N - 1``) covariance of the rows of ``x`` [N, D] (float64)."""
    centred = x - x.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (x.shape[0] - 1)
    cov = (cov + cov.T) / 2
    return torch.linalg.eigvalsh(cov)


def spectral_distance(
    reference: torch.Tensor, features: torch.Tensor, *, log10: bool = False, floor: float = 1e-10
) -> float:
    """The AIG paper's coverage metric: how far the covariance spectrum of ``features`` is from ``reference``'s.

    With ``C_ref`` and ``C`` the unbiased feature covariances (divided by ``N - 1``) of ``reference [N, D]``
    and ``features [M, D]``, and ``lambda_ref``, ``lambda`` their eigenvalues from a symmetric eigensolver
    (``torch.linalg.eigvalsh``), both SORTED ascending so the i-th largest variance meets the i-th largest
    (the reference code's unsorted general ``eigvals`` pairs them arbitrarily; SPEC.md section 4):

    - ``log10=False``: ``|| lambda_ref - lambda ||_2``, in squared feature units (variance);
      0 for identical spectra, so invariant to rotations and permutations of the feature axes.
    - ``log10=True``: ``|| log10(max(lambda_ref, floor)) - log10(max(lambda, floor)) ||_2``, in decades
      (dimensionless). The AIG paper's text and code for its log10 variant could not be retrieved here, so this
      is our definition: the spectra compared on a log scale, where a direction that lost (or gained) a factor
      10 of its variance counts 1 whatever its size, instead of the linear distance that the few largest
      eigenvalues dominate. ``floor`` (default ``1e-10``, in variance units) keeps rank-deficient covariances
      (fewer samples than dimensions, collapsed directions) finite; such directions then count as ``floor``.

    The reference is the base model's samples; a reward-tuned model that collapses modes loses variance
    in some directions and moves away from it.

    Args:
        reference: ``[N, D]`` features, ``N >= 2``.
        features: ``[M, D]`` features, ``M >= 2``, same ``D``.
        log10: compare log10 eigenvalues (see above).
        floor: the smallest eigenvalue used by ``log10=True`` (> 0).

    Returns:
        A float ``>= 0``; 0 for a set compared with itself.
    """
    ref = _as_matrix(reference, "reference", min_rows=2)
    feat = _as_matrix(features, "features", min_rows=2)
    if ref.shape[1] != feat.shape[1]:
        raise InputError(f"reference has {ref.shape[1]} feature dimensions but features has {feat.shape[1]}; "
                         "both must come from the same feature extractor")
    if not floor > 0:
        raise InputError(f"floor must be > 0, got {floor}")
    a, b = _covariance_spectrum(ref), _covariance_spectrum(feat)
    if log10:
        a, b = a.clamp_min(floor).log10(), b.clamp_min(floor).log10()
    return float((a - b).norm())
