"""Samplers: plain functions over a denoiser and a sigma list (k-diffusion's and ComfyUI's form).

Every sampler is ``sample_<name>(denoiser, x, sigmas, *, callback=None, grad_steps=None, ...) -> x`` where

- ``denoiser(x, sigma) -> x0`` takes the latent ``[B, ...]`` and ``sigma`` as a ``[B]`` tensor (all rows equal)
  and returns the clean-latent estimate (:mod:`rdt_lib.denoisers`, :class:`rdt_lib.mix.DualDenoiser`);
- ``x`` is the starting latent at ``sigmas[0]`` (already noise-scaled: see
  :meth:`rdt_lib.model_sampling.DiscreteVP.noise_scaling`);
- ``sigmas`` is the sigma list, noisiest first, usually ending in 0; step ``i`` runs from ``sigmas[i]`` to
  ``sigmas[i + 1]``, so there are ``len(sigmas) - 1`` steps;
- ``callback(info)`` is called once per step, after the step's first model evaluation and before the update,
  with ``info = {"x", "i", "sigma", "sigma_hat", "denoised"}`` (k-diffusion's dict);
- ``grad_steps(i) -> bool`` chooses, per step index, whether the step runs with autograd on (DRaFT-K:
  ``lambda i: i >= n - K``); ``None`` leaves the caller's grad mode alone;
- stochastic samplers draw fresh noise from ``noise_sampler(sigma, sigma_next) -> Tensor`` shaped like ``x``
  (:class:`RowNoise`: one generator per batch row, so a seed gives the same image in any batch); ``eta`` may be a
  float or a per-step callable ``eta(i)`` (R0's random eta);
- ``model_sampling`` (or the denoiser's ``model_sampling`` attribute) tells VP from flow models where the step
  formula differs (the ancestral and SDE samplers).

The steps are those of ComfyUI's samplers of the same name (``comfy/k_diffusion/sampling.py``) on the same sigmas.
``ddim`` with ``eta = 0`` is ComfyUI's ``ddim`` (an Euler step); with ``eta > 0`` it is DDIM's stochastic step,
which in sigma space is the Euler-ancestral step with that eta.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Sequence

import torch

from .mix import Denoise

__all__ = [
    "SAMPLER_NAMES",
    "SAMPLERS",
    "RowNoise",
    "get_ancestral_step",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_ddim",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_ddpm",
    "get_sampler",
]

Callback = Callable[[dict], None]
NoiseSampler = Callable[[float, float], torch.Tensor]


class RowNoise:
    """A noise sampler drawing row ``b`` of every draw from ``generators[b]`` (CPU generators, standard normal).

    ``RowNoise(generators, shape, device, dtype)(sigma, sigma_next)`` -> ``[len(generators), *shape]``. Each draw
    advances every row's generator by the same amount, so a row's noise does not depend on the batch around it.
    """

    def __init__(self, generators: Sequence[torch.Generator], shape: Sequence[int],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.generators = list(generators)
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        rows = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)


def _global_noise(x: torch.Tensor) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn_like(x)


def _floats(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    vals = sigmas.detach().flatten().cpu().tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
    if len(vals) < 2:
        raise ValueError(f"a sigma list needs at least 2 entries (one step), got {len(vals)}")
    return vals


def _grad(grad_steps: Callable[[int], bool] | None, i: int):
    return nullcontext() if grad_steps is None else torch.set_grad_enabled(bool(grad_steps(i)))


def _eta_at(eta: Any, i: int) -> float:
    return float(eta(i)) if callable(eta) else float(eta)


def _model_sampling(denoiser: Any, model_sampling: Any) -> Any:
    return model_sampling if model_sampling is not None else getattr(denoiser, "model_sampling", None)


def _is_flow(denoiser: Any, model_sampling: Any) -> bool:
    return bool(getattr(_model_sampling(denoiser, model_sampling), "is_flow", False))


def _call(denoiser: Denoise, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device))


def _report(callback: Callback | None, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of an ancestral step: ``sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 *
    (sigma_from^2 - sigma_to^2) / sigma_from^2))``, ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def sample_euler(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                 grad_steps: Callable[[int], bool] | None = None, **_: Any) -> torch.Tensor:
    """Euler: ``x += (x - D(x, sigma)) / sigma * (sigma_next - sigma)`` (Karras et al. 2022, Algorithm 2, no churn)."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        with _grad(grad_steps, i):
            denoised = _call(denoiser, x, s[i])
            _report(callback, x, i, s[i], s[i], denoised)
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
    return x


def _ancestral(denoiser, x, s, callback, grad_steps, eta, s_noise, noise_sampler, flow):
    noise_sampler = noise_sampler or _global_noise(x)
    for i in range(len(s) - 1):
        with _grad(grad_steps, i):
            e = _eta_at(eta, i)
            denoised = _call(denoiser, x, s[i])
            _report(callback, x, i, s[i], s[i], denoised)
            if flow:  # ComfyUI's sample_euler_ancestral_RF
                if s[i + 1] == 0:
                    x = denoised
                    continue
                sigma_down = s[i + 1] * (1 + (s[i + 1] / s[i] - 1) * e)
                alpha_next, alpha_down = 1 - s[i + 1], 1 - sigma_down
                renoise = (s[i + 1] ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
                ratio = sigma_down / s[i]
                x = ratio * x + (1 - ratio) * denoised
                if e > 0:
                    x = (alpha_next / alpha_down) * x + noise_sampler(s[i], s[i + 1]) * s_noise * renoise
                continue
            sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], e)
            if sigma_down == 0:
                x = denoised
            else:
                x = x + (x - denoised) / s[i] * (sigma_down - s[i])
                if sigma_up > 0:  # ComfyUI adds noise * 0 here; drawing none keeps eta-0 steps free of draws
                    x = x + noise_sampler(s[i], s[i + 1]) * s_noise * sigma_up
    return x


def sample_euler_ancestral(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                           grad_steps: Callable[[int], bool] | None = None, eta: Any = 1.0, s_noise: float = 1.0,
                           noise_sampler: NoiseSampler | None = None, model_sampling: Any = None,
                           **_: Any) -> torch.Tensor:
    """Euler ancestral: an Euler step down to ``sigma_down``, then fresh noise of std ``sigma_up``
    (:func:`get_ancestral_step`); flow models use ComfyUI's rectified-flow variant. ``eta`` float or ``eta(i)``."""
    return _ancestral(denoiser, x, _floats(sigmas), callback, grad_steps, eta, s_noise, noise_sampler,
                      _is_flow(denoiser, model_sampling))


def sample_ddim(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                grad_steps: Callable[[int], bool] | None = None, eta: Any = 0.0, s_noise: float = 1.0,
                noise_sampler: NoiseSampler | None = None, model_sampling: Any = None, **_: Any) -> torch.Tensor:
    """DDIM with ``eta`` (float or per-step ``eta(i)``; 0 = deterministic, ComfyUI's ``ddim``, an Euler step).

    In sigma space DDIM's step ``x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z`` (with
    ``s = eta * sqrt((1-a')/(1-a)) * sqrt(1 - a/a')``) is exactly the Euler-ancestral step with that eta.
    """
    return _ancestral(denoiser, x, _floats(sigmas), callback, grad_steps, eta, s_noise, noise_sampler,
                      _is_flow(denoiser, model_sampling))


def sample_heun(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                grad_steps: Callable[[int], bool] | None = None, **_: Any) -> torch.Tensor:
    """Heun: an Euler step, a second evaluation at ``sigma_next`` and the averaged slope (plain Euler when
    ``sigma_next`` is 0). Two evaluations per step: the second one is at ``sigmas[i + 1]``."""
    s = _floats(sigmas)
    for i in range(len(s) - 1):
        with _grad(grad_steps, i):
            denoised = _call(denoiser, x, s[i])
            d = (x - denoised) / s[i]
            _report(callback, x, i, s[i], s[i], denoised)
            dt = s[i + 1] - s[i]
            if s[i + 1] == 0:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = (x_2 - _call(denoiser, x_2, s[i + 1])) / s[i + 1]
                x = x + (d + d_2) / 2 * dt
    return x


def sample_dpmpp_2m(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                    grad_steps: Callable[[int], bool] | None = None, **_: Any) -> torch.Tensor:
    """DPM-Solver++(2M) in ``t = -log(sigma)``: the second-order correction from the previous step's ``D``
    (first order on the first step and on the step to sigma 0)."""
    s = _floats(sigmas)
    old = None
    for i in range(len(s) - 1):
        with _grad(grad_steps, i):
            denoised = _call(denoiser, x, s[i])
            _report(callback, x, i, s[i], s[i], denoised)
            if s[i + 1] == 0:
                x = denoised  # (sigma_next / sigma) * x - expm1(-h) * D with h = inf
            else:
                h = math.log(s[i]) - math.log(s[i + 1])
                if old is None:
                    d = denoised
                else:
                    r = (math.log(s[i - 1]) - math.log(s[i])) / h
                    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
                x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            old = denoised
    return x


def _half_log_snr(sigma: float, flow: bool) -> float:
    """``log(alpha / sigma)``: ``-log(sigma)`` for VP models, ``log((1 - sigma) / sigma)`` for flow models."""
    return math.log((1 - sigma) / sigma) if flow else -math.log(sigma)


def _sigma_of_half_log_snr(lam: float, flow: bool) -> float:
    return 1 / (1 + math.exp(lam)) if flow else math.exp(-lam)


def _offset_first_sigma(s: list[float], ms: Any) -> list[float]:
    """Flow models: a first sigma of 1 has no log-SNR; ComfyUI moves it to the sigma at timestep ``1 - 1e-4``."""
    if getattr(ms, "is_flow", False) and s[0] >= 1:
        return [float(ms.sigma((1.0 - 1e-4) * ms.multiplier))] + s[1:]
    return s


def sample_dpmpp_2m_sde(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                        grad_steps: Callable[[int], bool] | None = None, eta: Any = 1.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None, model_sampling: Any = None,
                        solver_type: str = "midpoint", **_: Any) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (``solver_type`` ``midpoint`` or ``heun``) in half-log-SNR; fresh noise of std
    ``sigma_next * sqrt(1 - exp(-2 h eta))`` per step. ComfyUI draws that noise from a Brownian tree by default;
    here it comes from ``noise_sampler`` (per-row generators in :func:`rdt_lib.sampling.sample`)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    flow = _is_flow(denoiser, model_sampling)
    s = _offset_first_sigma(_floats(sigmas), _model_sampling(denoiser, model_sampling))
    noise_sampler = noise_sampler or _global_noise(x)
    old, h_last = None, None
    for i in range(len(s) - 1):
        with _grad(grad_steps, i):
            e = _eta_at(eta, i)
            denoised = _call(denoiser, x, s[i])
            _report(callback, x, i, s[i], s[i], denoised)
            h = None
            if s[i + 1] == 0:
                x = denoised
            else:
                lam_s, lam_t = _half_log_snr(s[i], flow), _half_log_snr(s[i + 1], flow)
                h = lam_t - lam_s
                h_eta = h * (e + 1)
                alpha_t = s[i + 1] * math.exp(lam_t)
                x = s[i + 1] / s[i] * math.exp(-h * e) * x + alpha_t * -math.expm1(-h_eta) * denoised
                if old is not None:
                    r = h_last / h
                    if solver_type == "heun":
                        x = x + alpha_t * (-math.expm1(-h_eta) / (-h_eta) + 1) * (1 / r) * (denoised - old)
                    else:
                        x = x + 0.5 * alpha_t * -math.expm1(-h_eta) * (1 / r) * (denoised - old)
                if e > 0 and s_noise > 0:
                    x = x + noise_sampler(s[i], s[i + 1]) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * e)) * s_noise
            old, h_last = denoised, h
    return x


def sample_dpmpp_sde(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                     grad_steps: Callable[[int], bool] | None = None, eta: Any = 1.0, s_noise: float = 1.0,
                     noise_sampler: NoiseSampler | None = None, model_sampling: Any = None, r: float = 0.5,
                     **_: Any) -> torch.Tensor:
    """DPM-Solver++ (stochastic, two evaluations per step: the second at an intermediate sigma inside the step).
    Noise from ``noise_sampler`` (ComfyUI's default is a Brownian tree)."""
    flow = _is_flow(denoiser, model_sampling)
    s = _offset_first_sigma(_floats(sigmas), _model_sampling(denoiser, model_sampling))
    noise_sampler = noise_sampler or _global_noise(x)
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        with _grad(grad_steps, i):
            e = _eta_at(eta, i)
            denoised = _call(denoiser, x, s[i])
            _report(callback, x, i, s[i], s[i], denoised)
            if s[i + 1] == 0:
                x = denoised
                continue
            lam_s, lam_t = _half_log_snr(s[i], flow), _half_log_snr(s[i + 1], flow)
            h = lam_t - lam_s
            lam_s1 = lam_s + r * h
            sigma_s1 = _sigma_of_half_log_snr(lam_s1, flow)
            alpha_s = s[i] * math.exp(lam_s)
            alpha_s1 = sigma_s1 * math.exp(lam_s1)
            alpha_t = s[i + 1] * math.exp(lam_t)
            sd, su = get_ancestral_step(math.exp(-lam_s), math.exp(-lam_s1), e)
            h_ = -math.log(sd) - lam_s
            x_2 = (alpha_s1 / alpha_s) * math.exp(-h_) * x - alpha_s1 * math.expm1(-h_) * denoised
            if e > 0 and s_noise > 0:
                x_2 = x_2 + alpha_s1 * noise_sampler(s[i], sigma_s1) * s_noise * su
            denoised_2 = _call(denoiser, x_2, sigma_s1)
            sd, su = get_ancestral_step(math.exp(-lam_s), math.exp(-lam_t), e)
            h_ = -math.log(sd) - lam_s
            d = (1 - fac) * denoised + fac * denoised_2
            x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * d
            if e > 0 and s_noise > 0:
                x = x + alpha_t * noise_sampler(s[i], s[i + 1]) * s_noise * su
    return x


def sample_ddpm(denoiser: Denoise, x: torch.Tensor, sigmas, *, callback: Callback | None = None,
                grad_steps: Callable[[int], bool] | None = None, noise_sampler: NoiseSampler | None = None,
                model_sampling: Any = None, **_: Any) -> torch.Tensor:
    """DDPM's ancestral step (the posterior mean plus its std times fresh noise), taken in the VP frame
    ``x / sqrt(1 + sigma^2)``; VP models only."""
    if _is_flow(denoiser, model_sampling):
        raise ValueError("the ddpm sampler is defined for VP (eps / v) models only, not flow models")
    s = _floats(sigmas)
    noise_sampler = noise_sampler or _global_noise(x)
    for i in range(len(s) - 1):
        with _grad(grad_steps, i):
            denoised = _call(denoiser, x, s[i])
            _report(callback, x, i, s[i], s[i], denoised)
            eps = (x - denoised) / s[i]
            a = 1 / (s[i] ** 2 + 1)
            a_prev = 1 / (s[i + 1] ** 2 + 1)
            alpha = a / a_prev
            mu = (1.0 / alpha) ** 0.5 * (x / (1.0 + s[i] ** 2) ** 0.5 - (1 - alpha) * eps / (1 - a) ** 0.5)
            if s[i + 1] > 0:
                mu = mu + ((1 - alpha) * (1.0 - a_prev) / (1.0 - a)) ** 0.5 * noise_sampler(s[i], s[i + 1])
                mu = mu * (1.0 + s[i + 1] ** 2) ** 0.5
            x = mu
    return x


SAMPLERS: Mapping[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
"""Sampler names (ComfyUI's names for the same steps)."""

#: samplers that take ``eta`` and ``noise_sampler``
STOCHASTIC = frozenset({"euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "ddpm", "ddim"})


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function called ``name`` (one of :data:`SAMPLER_NAMES`)."""
    fn = SAMPLERS.get(name)
    if fn is None:
        raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLER_NAMES)}")
    return fn
