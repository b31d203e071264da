"""The dual-model mix in sigma space: one pure piece for the headless sampler and the ComfyUI guider.

A *denoiser* here is a callable ``(x, sigma) -> denoised`` (k-diffusion's and ComfyUI's convention): ``x`` is
the noisy latent ``[B, ...]``, ``sigma`` the model's noise level (a float or a ``[B]`` tensor, all rows equal),
and the result is the model's estimate of the clean latent x0, already after the model's own
classifier-free guidance. At sampling step ``i`` of ``N`` (``i = 0`` is the noisiest step) the tuned model
gets weight ``w = schedule.weight(i, N)`` and the mixed estimate is ``(1 - w) * base + w * tuned``
(SPEC.md section 1). At equal ``x`` and ``sigma`` this equals mixing noise, v or flow predictions, so the
mix does not depend on what the network predicts.

The step index comes from sigma and the sampler's sigma list (:func:`step_index`), never from counting calls,
so samplers that evaluate twice per step (Heun, DPM-2, SDE samplers) get the right weight.

This module imports torch and :mod:`rdt_lib.schedules` only, so a ComfyUI guider imports it cheaply.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .schedules import Schedule, parse_schedule

__all__ = [
    "Denoise",
    "JointDenoise",
    "step_index",
    "num_steps_of",
    "mix",
    "cfg_combine",
    "guided",
    "DualDenoiser",
]

#: ``(x, sigma) -> denoised x0``; sigma a float or a ``[B]`` tensor.
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(x, sigma) -> (base x0, tuned x0)`` from one batched forward pass.
JointDenoise = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

_REL_TOL = 1e-5


def _as_float_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    if torch.is_tensor(sigmas):
        return [float(s) for s in sigmas.detach().flatten().cpu().tolist()]
    return [float(s) for s in sigmas]


def _sigma_value(sigma: torch.Tensor | float) -> float:
    if torch.is_tensor(sigma):
        if sigma.numel() == 0:
            raise ValueError("sigma is an empty tensor")
        return float(sigma.detach().flatten()[0])
    return float(sigma)


def num_steps_of(sigmas: torch.Tensor | Sequence[float]) -> int:
    """Number of sampling steps a sigma list describes: ``len(sigmas) - 1`` (step ``i`` runs from
    ``sigmas[i]`` to ``sigmas[i + 1]``; the list usually ends in 0)."""
    n = len(_as_float_list(sigmas)) - 1
    if n < 1:
        raise ValueError(f"a sigma list needs at least 2 entries (one step), got {n + 1}")
    return n


def step_index(sigmas: torch.Tensor | Sequence[float], sigma: torch.Tensor | float) -> int:
    """The sampling step index (0 .. N-1) at which a model is evaluated at noise level ``sigma``.

    ``sigmas`` is the sampler's list, noisiest first (``N + 1`` entries for ``N`` steps, usually ending in 0).
    Rules, in order:

    - ``sigma`` equal (relative tolerance 1e-5) to ``sigmas[i]`` for some ``i < N``: the *first* such ``i``.
      This covers every first evaluation of a step, and the second evaluation of Heun-style samplers at
      ``sigmas[i + 1]``, which is the start of step ``i + 1`` and gets that step's weight. A list with
      repeated entries (a zero-length step) maps every evaluation at that sigma to the first of them.
    - ``sigma`` strictly between ``sigmas[i]`` and ``sigmas[i + 1]`` (DPM-2's midpoints, SDE sub-steps):
      that step ``i``.
    - above ``sigmas[0]`` (Euler's ``s_churn`` raises sigma a little): step 0; at or below the last entry
      (the final 0 is never evaluated by a sampler, but a caller may ask): step ``N - 1``.

    With ``denoise < 1`` a sampler runs only the last steps of a longer list; the list it is given (ComfyUI's
    ``sample_sigmas``) holds just those steps, so the index counts the steps actually run, 0 .. steps-1, and
    the schedule is spread over them.
    """
    values = _as_float_list(sigmas)
    n = num_steps_of(values)
    s = _sigma_value(sigma)
    for i in range(n):
        ref = values[i]
        if abs(s - ref) <= _REL_TOL * max(abs(ref), 1e-12):
            return i
    if s > values[0]:
        return 0
    for i in range(n):
        hi, lo = values[i], values[i + 1]
        if min(hi, lo) < s < max(hi, lo):
            return i
    return n - 1


def mix(base: torch.Tensor, tuned: torch.Tensor, w: float) -> torch.Tensor:
    """``(1 - w) * base + w * tuned``; ``w`` is the tuned model's weight in [0, 1]."""
    return (1.0 - w) * base + w * tuned


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (scale 1 gives ``cond``)."""
    return uncond + scale * (cond - uncond)


def guided(cond: Denoise, uncond: Denoise | None, scale: float) -> Denoise:
    """A guided denoiser from a conditional one and an unconditional one (two passes).

    ``scale == 1`` needs no unconditional model (it is not evaluated). Callers that can batch the two rows
    into one forward pass (every real model) build their own guided callable and use :func:`cfg_combine`.
    """
    if scale == 1.0:
        return cond
    if uncond is None:
        raise ValueError(f"a CFG scale of {scale} needs an unconditional (negative-prompt) denoiser")

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return cfg_combine(cond(x, sigma), uncond(x, sigma), scale)

    return denoise


class DualDenoiser:
    """A denoiser that mixes a base and a tuned denoiser by a schedule over the sampler's sigmas.

    Args:
        base: the base model's guided denoiser ``(x, sigma) -> x0``.
        tuned: the tuned model's guided denoiser; ``None`` allows only the ``base`` schedule.
        schedule: the tuned model's weight per step (a :class:`~rdt_lib.schedules.Schedule` or a spec).
        sigmas: the sampler's sigma list (noisiest first); may instead be given per call (ComfyUI passes it
            in ``transformer_options["sample_sigmas"]``).
        joint: optional ``(x, sigma) -> (base x0, tuned x0)`` that evaluates both models in one batched
            forward pass (both share one network, the tuned one through a LoRA); used at steps where both
            weights are non-zero.

    A model whose weight is 0 at a step is not evaluated. ``evaluations`` counts the calls made:
    ``base``, ``tuned`` (single-model calls) and ``joint``.
    """

    def __init__(
        self,
        base: Denoise,
        tuned: Denoise | None,
        schedule: Schedule | str,
        *,
        sigmas: torch.Tensor | Sequence[float] | None = None,
        joint: JointDenoise | None = None,
    ) -> None:
        self.base = base
        self.tuned = tuned
        self.schedule = parse_schedule(schedule)
        self.sigmas = sigmas
        self.joint = joint
        self.evaluations = {"base": 0, "tuned": 0, "joint": 0}
        if tuned is None and self.schedule.needs_tuned:
            raise ValueError(f"schedule {self.schedule} needs a tuned model; only 'base' runs without one")

    def weight(self, sigma: torch.Tensor | float, sigmas: torch.Tensor | Sequence[float] | None = None) -> float:
        """The tuned model's weight for an evaluation at ``sigma`` (step index found from ``sigmas``)."""
        table = self.sigmas if sigmas is None else sigmas
        if table is None:
            raise ValueError("DualDenoiser needs the sampler's sigma list (sigmas=) to find the step index")
        return self.schedule.weight(step_index(table, sigma), num_steps_of(table))

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        *,
        sigmas: torch.Tensor | Sequence[float] | None = None,
    ) -> torch.Tensor:
        w = self.weight(sigma, sigmas)
        if w == 0.0:
            self.evaluations["base"] += 1
            return self.base(x, sigma)
        assert self.tuned is not None
        if w == 1.0:
            self.evaluations["tuned"] += 1
            return self.tuned(x, sigma)
        if self.joint is not None:
            self.evaluations["joint"] += 1
            out_base, out_tuned = self.joint(x, sigma)
        else:
            self.evaluations["base"] += 1
            self.evaluations["tuned"] += 1
            out_base, out_tuned = self.base(x, sigma), self.tuned(x, sigma)
        return mix(out_base, out_tuned, w)
