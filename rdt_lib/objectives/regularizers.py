"""Regularisers that combine with any objective (SPEC.md section 2: DRaFT+ and R0).

- :class:`KLToBase` (DRaFT+): a denoiser wrapper that, on every step that runs with gradient, also evaluates the
  base model (adapter disabled, no gradient) on the same input and accumulates ``mean((eps_tuned - eps_base)^2)``
  over the guided network outputs (eps, v or, for flow models, the velocity); the KL term is the mean over those
  steps.
- :func:`l2_to_init` (R0): ``sum((w - w_init)^2)`` over the trainable weights.
- :func:`random_eta` (R0): an eta drawn uniformly per sampling step, as the ``eta`` callable of
  :func:`rdt_lib.sampling.run_sampler`: DDIM's eta on SD; on a flow model the eta of the rectified-flow ancestral
  step (:func:`rdt_lib.sampling.family_sampler`), which at 0 is the deterministic Euler step.
- :func:`normalized_reward_gradients` (R0): each reward's gradient divided by its own norm before summing.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from ..denoisers import GuidedDenoiser

__all__ = ["KLToBase", "l2_to_init", "random_eta", "normalized_reward_gradients"]


class KLToBase:
    """Denoiser ``(x, sigma) -> guided tuned x0`` that records the squared distance to the base model.

    Args:
        tuned: the trained model (LoRA adapter on) bound to its prompts, with its CFG.
        base: the same prompts and CFG with the adapter disabled (``adapter=None``); None = no KL (plain wrapper).

    On a step evaluated with autograd on (a DRaFT gradient step, a ReFL prediction step) the base model's guided
    network output is computed under ``torch.no_grad`` and ``mean((out_tuned - out_base)^2)`` (the eps, or v,
    predictions, or a flow model's velocity; over every element, float32) is stored; :attr:`value` is the mean over the recorded steps.
    """

    def __init__(self, tuned: GuidedDenoiser, base: GuidedDenoiser | None) -> None:
        self.tuned = tuned
        self.base = base
        self.terms: list[torch.Tensor] = []

    @property
    def model_sampling(self):
        return self.tuned.model_sampling

    def repeat(self, n: int) -> "KLToBase":
        """A fresh wrapper (no recorded terms) with the prompts repeated ``n`` times (copy-major rows)."""
        return KLToBase(self.tuned.repeat(n), None if self.base is None else self.base.repeat(n))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.tuned.guided_output(x, sigma)
        if self.base is not None and torch.is_grad_enabled():
            with torch.no_grad():
                ref = self.base.guided_output(x.detach(), sigma)
            self.terms.append(((out.float() - ref.float()) ** 2).mean())
        return self.tuned.denoised(x, sigma, out)

    @property
    def value(self) -> torch.Tensor | None:
        """Mean recorded KL term (differentiable), or None when no gradient step was recorded."""
        if not self.terms:
            return None
        return torch.stack(self.terms).mean()


def l2_to_init(params: Mapping[str, torch.Tensor], init: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum over params of sum((p - p_init)^2)`` in float32 (differentiable in ``params``)."""
    total = None
    for name, p in params.items():
        d = ((p.float() - init[name].to(p.device, torch.float32)) ** 2).sum()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("no parameters given")
    return total


def random_eta(low: float, high: float, num_steps: int, generator: torch.Generator) -> Callable[[int], float]:
    """A per-step eta (DDIM's, or the flow ancestral step's): ``num_steps`` values drawn uniformly from ``[low, high]`` with ``generator``.

    Returns ``eta(i)`` for step index ``i`` (0 = noisiest), as :func:`rdt_lib.sampling.run_sampler` takes it.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"random eta range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    values = (low + (high - low) * torch.rand(num_steps, generator=generator, dtype=torch.float64)).tolist()

    def eta(i: int) -> float:
        return float(values[i])

    eta.values = values  # type: ignore[attr-defined]
    return eta


def normalized_reward_gradients(
    losses: Mapping[str, torch.Tensor],
    params: Sequence[torch.Tensor],
    weights: Mapping[str, float] | None = None,
    *,
    eps: float = 1e-12,
) -> tuple[list[torch.Tensor | None], dict[str, float]]:
    """R0's per-reward gradient normalisation: ``sum_i |w_i| * g_i / ||g_i||``.

    Args:
        losses: one differentiable scalar per reward (its graph is kept for the next reward: ``retain_graph``).
        params: the trainable tensors.
        weights: per-reward magnitude ``|w_i|`` of the normalised gradient (default 1 each; the loss's own sign
            and scale are normalised away).
        eps: added to each norm.

    Returns:
        The summed gradient per parameter (None where no reward reaches it) and each reward's gradient norm
        before normalisation (``grad_norm/<label>``).
    """
    weights = dict(weights or {})
    total: list[torch.Tensor | None] = [None] * len(params)
    norms: dict[str, float] = {}
    labels = list(losses)
    for label in labels:
        if not losses[label].requires_grad:
            norms[label] = 0.0
            continue
        grads = torch.autograd.grad(losses[label], list(params), retain_graph=True, allow_unused=True)
        sq = sum(float((g.float() ** 2).sum()) for g in grads if g is not None)
        norm = sq**0.5
        norms[label] = norm
        if norm == 0.0 or norm != norm or norm == float("inf"):
            if norm != 0.0:  # NaN / inf: pass it on so the caller sees a non-finite gradient
                factor = float("nan")
            else:
                continue
        else:
            factor = abs(float(weights.get(label, 1.0))) / (norm + eps)
        for j, g in enumerate(grads):
            if g is None:
                continue
            g = g * factor
            total[j] = g if total[j] is None else total[j] + g
    return total, norms
