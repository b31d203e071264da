"""Model sampling: how a network's noise level, inputs and outputs map to sigma space (ComfyUI's conventions).

A *sigma* is the model's noise level. Two families (SPEC.md section 6, ComfyUI ``comfy/model_sampling.py``):

- :class:`DiscreteVP` -- SD1.x / SD2.x / SDXL: a noisy latent is ``x = x0 + sigma * noise`` (the
  variance-exploding view of a variance-preserving model); ``sigmas[t] = sqrt((1 - a_t) / a_t)`` for training
  timesteps ``t = 0 .. T-1`` with ``a = alphas_cumprod``. The network sees ``x / sqrt(sigma^2 + 1)`` and the
  integer timestep nearest to ``sigma`` in log-sigma; it predicts the noise (``eps``) or the velocity (``v``).
- :class:`FlowMatch` -- SD3 / Flux (rectified flow): ``x = (1 - sigma) * x0 + sigma * noise``, sigma in
  [0, 1]; the network sees ``x`` unscaled and the timestep ``sigma * multiplier`` and predicts
  ``noise - x0``.

Both expose ``timestep(sigma)``, ``sigma(timestep)``, ``calculate_input``, ``calculate_denoised``,
``noise_scaling``, ``inverse_noise_scaling`` with ComfyUI's names and meaning, plus ``network_target`` (what the
network is trained to output, for the plain diffusion loss). ``sigma`` arguments are floats or tensors with one
value per batch row. This module imports torch only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Union

import torch

__all__ = ["DiscreteVP", "FlowMatch", "ModelSampling", "betas_for", "flow_shift_for_size", "model_sampling_from_config"]

PREDICTIONS_VP = ("eps", "v")
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "eps": "eps", "v": "v"}


def _per_row(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a float32 tensor that broadcasts over ``like`` (``[B, 1, 1, ...]`` or a scalar)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.numel() == 1:
        return s.reshape(())
    return s.reshape(s.shape[:1] + (1,) * (like.ndim - 1))


def betas_for(beta_schedule: str, num_timesteps: int = 1000, beta_start: float = 0.00085,
              beta_end: float = 0.012) -> torch.Tensor:
    """Training betas ``[T]`` in float64 for a diffusers ``beta_schedule`` name.

    ``scaled_linear`` (SD's; ComfyUI calls it ``linear``): ``linspace(sqrt(start), sqrt(end), T) ** 2``;
    ``linear``: ``linspace(start, end, T)``; ``squaredcos_cap_v2``: the cosine schedule (betas capped at 0.999).
    """
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                             for i in range(num_timesteps)], dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; accepted: scaled_linear, linear, squaredcos_cap_v2")


class _SigmaTable:
    """The model's sigma table ``sigmas`` (ascending, one per training timestep) and its ends."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


class DiscreteVP(_SigmaTable):
    """Discrete-time variance-preserving model sampling (ComfyUI ``ModelSamplingDiscrete`` + ``EPS`` / ``V_PREDICTION``).

    Args:
        alphas_cumprod: ``[T]`` cumulative products of ``1 - beta`` (training timestep ``t`` = index).
        prediction: ``"eps"`` (noise) or ``"v"`` (velocity) -- what the network outputs.

    Attributes:
        sigmas: ``[T]`` float32, ``sigmas[t] = sqrt((1 - a_t) / a_t)``, increasing in ``t``.
        sigma_min, sigma_max: ``sigmas[0]`` and ``sigmas[T - 1]`` (floats).
    """

    is_flow = False

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "eps") -> None:
        if prediction not in PREDICTIONS_VP:
            raise ValueError(f"prediction must be one of {PREDICTIONS_VP}, got {prediction!r}")
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.prediction = prediction
        self.sigmas = (((1 - ac) / ac) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction: str = "eps") -> "DiscreteVP":
        return cls(torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), dim=0), prediction)

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The training timestep nearest to ``sigma`` in log-sigma (an argmin; float tensor of integers)."""
        s = torch.as_tensor(sigma, dtype=torch.float32)
        table = self._log_sigmas_on(s.device)  # no host round trip on a GPU
        dists = s.log().reshape(-1)[None, :] - table[:, None]
        return dists.abs().argmin(dim=0).reshape(s.shape).to(torch.float32)

    def _log_sigmas_on(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_log_sigmas_by_device", {})
        if device not in cache:
            cache[device] = self.log_sigmas.to(device)
        return cache[device]

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Sigma at a (fractional) timestep: log-sigma interpolated linearly between integer timesteps."""
        t = torch.as_tensor(timestep, dtype=torch.float32).cpu().clamp(0, len(self.sigmas) - 1)
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def calculate_input(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """The network's input for latent ``x`` at ``sigma``: ``x / sqrt(sigma^2 + 1)``."""
        return x / (_per_row(sigma, x) ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor | float, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0 from the network output: eps ``x - sigma * eps``; v ``x / (sigma^2+1) - v * sigma / sqrt(sigma^2+1)``."""
        s = _per_row(sigma, x)
        if self.prediction == "eps":
            return x - output * s
        return x / (s ** 2 + 1.0) - output * s / (s ** 2 + 1.0) ** 0.5

    def noise_scaling(self, sigma: torch.Tensor | float, noise: torch.Tensor, latent: torch.Tensor | None = None,
                      max_denoise: bool = False) -> torch.Tensor:
        """The sampler's starting latent (ComfyUI's rule): ``latent + noise * sigma``, or, for a full denoise from
        the top of the schedule (``max_denoise``), ``latent + noise * sqrt(1 + sigma^2)``. Also re-noising:
        ``noise_scaling(sigma, noise, x0)`` is ``x0 + sigma * noise``."""
        s = _per_row(sigma, noise)
        out = noise * ((1.0 + s ** 2) ** 0.5 if max_denoise else s)
        return out if latent is None else out + latent

    def inverse_noise_scaling(self, sigma: torch.Tensor | float, latent: torch.Tensor) -> torch.Tensor:
        """The final latent as the VAE takes it: unchanged for VP models."""
        return latent

    def network_target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """What the network should output for ``x = x0 + sigma * noise``: eps ``noise``;
        v ``(noise - sigma * x0) / sqrt(sigma^2 + 1)`` (= ``sqrt(a) noise - sqrt(1-a) x0``)."""
        if self.prediction == "eps":
            return noise
        s = _per_row(sigma, x0)
        return (noise - s * x0) / (s ** 2 + 1.0) ** 0.5

    def __repr__(self) -> str:
        return f"DiscreteVP(prediction={self.prediction!r}, sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"


class FlowMatch(_SigmaTable):
    """Rectified-flow model sampling (ComfyUI ``ModelSamplingDiscreteFlow`` + ``CONST``).

    ``sigma(t) = shift * u / (1 + (shift - 1) * u)`` with ``u = t / multiplier``; the network's timestep is
    ``sigma * multiplier``; the table ``sigmas`` holds ``sigma(k / T * multiplier)`` for ``k = 1 .. T``.
    """

    is_flow = True
    prediction = "flow"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, num_timesteps: int = 1000) -> None:
        if not shift > 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.sigmas = self.sigma(torch.arange(1, num_timesteps + 1, dtype=torch.float32) / num_timesteps * self.multiplier)
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.multiplier

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        u = torch.as_tensor(timestep, dtype=torch.float32) / self.multiplier
        if self.shift == 1.0:
            return u
        return self.shift * u / (1 + (self.shift - 1) * u)

    def calculate_input(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_denoised(self, sigma: torch.Tensor | float, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0 = ``x - sigma * v`` (the network predicts ``v = noise - x0``)."""
        return x - output * _per_row(sigma, x)

    def noise_scaling(self, sigma: torch.Tensor | float, noise: torch.Tensor, latent: torch.Tensor | None = None,
                      max_denoise: bool = False) -> torch.Tensor:
        """``sigma * noise + (1 - sigma) * latent`` (``max_denoise`` changes nothing for flow models)."""
        s = _per_row(sigma, noise)
        return s * noise if latent is None else s * noise + (1.0 - s) * latent

    def inverse_noise_scaling(self, sigma: torch.Tensor | float, latent: torch.Tensor) -> torch.Tensor:
        """``latent / (1 - sigma)`` (ComfyUI's final step for flow models; sigma is 0 at the end of a full run)."""
        return latent / (1.0 - _per_row(sigma, latent))

    def network_target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``noise - x0``."""
        return noise - x0

    def __repr__(self) -> str:
        return f"FlowMatch(shift={self.shift:g}, multiplier={self.multiplier:g})"


ModelSampling = Union[DiscreteVP, FlowMatch]


def flow_shift_for_size(config: Mapping[str, Any], image_seq_len: int | None = None) -> float:
    """The flow shift of a diffusers ``FlowMatch*`` scheduler config for an image of ``image_seq_len`` tokens.

    Fixed shift (SD3: 3.0): ``config["shift"]``. Resolution-dependent shift (``use_dynamic_shifting``, Flux):
    ``mu`` interpolated linearly in the token count between ``(base_image_seq_len, base_shift)`` and
    ``(max_image_seq_len, max_shift)`` (diffusers' ``calculate_shift``), then ``shift = exp(mu)`` for
    ``time_shift_type="exponential"`` (the default) or ``shift = mu`` for ``"linear"``: diffusers' time shift
    ``exp(mu) / (exp(mu) + (1/t - 1))`` is the same function of ``t`` as ``shift * t / (1 + (shift - 1) * t)``.
    ``image_seq_len`` ``None`` (size unknown) takes ``max_image_seq_len`` (1024x1024 for Flux: ``mu = max_shift``,
    ComfyUI's default ``ModelSamplingFlux`` shift). The token count of Flux is ``(H / 16) * (W / 16)`` for an
    ``H x W`` pixel image (8x VAE, 2x2 patches).
    """
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base_shift = float(config.get("base_shift", 0.5) if config.get("base_shift") is not None else 0.5)
    max_shift = float(config.get("max_shift", 1.15) if config.get("max_shift") is not None else 1.15)
    seq = max_len if image_seq_len is None else float(image_seq_len)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = seq * slope + (base_shift - slope * base_len)
    kind = str(config.get("time_shift_type", "exponential"))
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        return mu
    raise ValueError(f"unsupported time_shift_type {kind!r}; accepted: exponential, linear")


def model_sampling_from_config(config: Mapping[str, Any], *, image_seq_len: int | None = None) -> ModelSampling:
    """Model sampling from a diffusers scheduler config.

    VP models: ``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps``, ``prediction_type``.
    Flow models (a ``FlowMatch*`` ``_class_name``): :class:`FlowMatch` with the config's ``shift``, or, with
    ``use_dynamic_shifting`` (Flux), the shift for ``image_seq_len`` image tokens (:func:`flow_shift_for_size`;
    ``image_seq_len`` is ignored by fixed-shift and VP configs). The scheduler's options that only pick a sigma
    list (``use_karras_sigmas`` ...) do not change the model sampling; ``shift_terminal`` and ``invert_sigmas``
    (other time conventions) are refused.
    """
    name = str(config.get("_class_name", ""))
    if name.startswith("FlowMatch"):
        for option in ("shift_terminal", "invert_sigmas"):
            if config.get(option):
                raise ValueError(f"flow scheduler configs with {option} are not supported")
        return FlowMatch(shift=flow_shift_for_size(config, image_seq_len),
                         num_timesteps=int(config.get("num_train_timesteps", 1000)))
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported")
    pred = str(config.get("prediction_type", "epsilon"))
    if pred not in _DIFFUSERS_PREDICTION:
        raise ValueError(f"unsupported prediction_type {pred!r}; accepted: epsilon, v_prediction")
    if config.get("trained_betas") is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    else:
        betas = betas_for(str(config.get("beta_schedule", "scaled_linear")), int(config.get("num_train_timesteps", 1000)),
                          float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012)))
    return DiscreteVP.from_betas(betas, _DIFFUSERS_PREDICTION[pred])
