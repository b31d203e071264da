"""Sigma lists: the ``scheduler`` names ComfyUI users know, computed as ComfyUI computes them.

Each function returns a float32 tensor of ``steps + 1`` sigmas, noisiest first, ending in 0 (``normal`` and
``ddim_uniform`` on a model whose smallest sigma is 0 return the same length without an appended 0). Step ``i``
of a sampler runs from ``sigmas[i]`` to ``sigmas[i + 1]``. :func:`sigmas_for` adds KSampler's ``denoise < 1``
rule. Source of the rules: ComfyUI ``comfy/samplers.py`` and ``comfy/k_diffusion/sampling.py`` (SPEC.md 6).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .model_sampling import ModelSampling

__all__ = ["SCHEDULER_NAMES", "calculate_sigmas", "sigmas_for", "karras", "exponential", "normal", "sgm_uniform",
           "simple", "ddim_uniform", "beta"]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(ms: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """``(max^(1/rho) + r * (min^(1/rho) - max^(1/rho)))^rho`` for ``r`` evenly spaced in [0, 1], then 0."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    """Evenly spaced in log-sigma from ``sigma_max`` to ``sigma_min``, then 0."""
    return _append_zero(torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps).exp())


def normal(ms: ModelSampling, steps: int, *, sgm: bool = False) -> torch.Tensor:
    """``steps`` timesteps evenly spaced from ``timestep(sigma_max)`` to ``timestep(sigma_min)`` mapped back with
    ``sigma(t)``, then 0 (``sgm``: ``steps + 1`` points without the last, then 0)."""
    start = ms.timestep(torch.tensor(ms.sigma_max))
    end = ms.timestep(torch.tensor(ms.sigma_min))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0.0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(float(start), float(end), steps)
    sigs = [float(ms.sigma(t)) for t in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.tensor(sigs, dtype=torch.float32)


def sgm_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    """``normal`` over ``steps + 1`` points without the last, then 0."""
    return normal(ms, steps, sgm=True)


def simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    """Every ``T / steps``-th entry of the model's sigma table from the top, then 0."""
    table = ms.sigmas
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(k * stride))]) for k in range(steps)] + [0.0], dtype=torch.float32)


def ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    """DDIM's uniform timesteps ``1, 1 + T // steps, ...`` (the table's sigmas there), reversed, with 0 at the end."""
    table = ms.sigmas
    x = 1
    if math.isclose(float(table[x]), 0.0, abs_tol=1e-5):
        steps += 1
        sigs: list[float] = []
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    while x < len(table):
        sigs.append(float(table[x]))
        x += stride
    return torch.tensor(sigs[::-1], dtype=torch.float32)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` (continued fraction, Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution (bisection on :func:`_betainc`, to double precision)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Timesteps at the Beta(alpha, beta) quantiles ``1, 1 - 1/steps, ...`` of ``[0, T-1]`` (rounded; repeats
    dropped), the table's sigmas there, then 0 (Lee et al. 2024, arXiv:2407.12173)."""
    total = len(ms.sigmas) - 1
    sigs: list[float] = []
    last = -1
    for k in range(steps):
        t = round(_beta_ppf(1.0 - k / steps, alpha, beta_) * total)  # numpy.rint: round half to even, like round()
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


_SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)
"""The sigma-list (``scheduler``) names, as in ComfyUI's KSampler."""

#: samplers for which ComfyUI's KSampler computes one sigma more and drops the penultimate one
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    """The sigma list ``scheduler`` (one of :data:`SCHEDULER_NAMES`) for ``steps`` steps."""
    fn = _SCHEDULERS.get(scheduler)
    if fn is None:
        raise ValueError(f"unknown scheduler {scheduler!r}; accepted: {', '.join(SCHEDULER_NAMES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return fn(ms, steps)


def sigmas_for(scheduler: str, ms: ModelSampling, steps: int, denoise: float = 1.0,
               sampler: str | None = None) -> torch.Tensor:
    """KSampler's sigmas: ``calculate_sigmas`` for ``steps``; with ``0 < denoise < 1`` (at most 0.9999) the list for
    ``int(steps / denoise)`` steps, keeping its last ``steps + 1`` entries (an img2img run from a partly noised
    latent). For ``sampler`` in :data:`DISCARD_PENULTIMATE_SIGMA_SAMPLERS` one sigma more, the penultimate dropped."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")

    def compute(n: int) -> torch.Tensor:
        if sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            s = calculate_sigmas(ms, scheduler, n + 1)
            return torch.cat([s[:-2], s[-1:]])
        return calculate_sigmas(ms, scheduler, n)

    if denoise > 0.9999:
        return compute(steps)
    return compute(int(steps / denoise))[-(steps + 1):]
