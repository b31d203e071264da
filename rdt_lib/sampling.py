"""Sampling for users: prompts in, latents and images out, with one model or a base + tuned pair.

:func:`sample` encodes the prompts, builds each model's guided denoiser (:mod:`rdt_lib.denoisers`), mixes them
by a schedule over the sampler's sigmas (:class:`rdt_lib.mix.DualDenoiser`, both models in one batched pass
where they share a network), draws seeded noise, runs a sampler (:mod:`rdt_lib.samplers`) over a sigma list
(:mod:`rdt_lib.sigma_schedules`) and decodes. :func:`run_sampler` is the loop the trainer shares: a sampler over a
slice of a sigma list with gradients switched on for chosen steps.

Names are ComfyUI's: ``sampler`` is the step rule (:data:`SAMPLERS`), ``scheduler`` the sigma list
(:data:`SCHEDULERS`). The older combined names ``ddim``, ``ddpm``, ``euler``, ``euler_a``, ``dpmpp_2m``,
``dpmpp_2m_karras`` are still accepted as ``scheduler`` (see :data:`LEGACY_SCHEDULER_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .backbones.base import Backbone
from .denoisers import GuidedDenoiser, ModelBranch, joint_denoiser
from .mix import DualDenoiser
from .model_sampling import ModelSampling
from .samplers import SAMPLER_NAMES, STOCHASTIC, RowNoise, get_sampler
from .schedules import Schedule, parse_schedule
from .sigma_schedules import SCHEDULER_NAMES, sigmas_for

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "LEGACY_SCHEDULER_NAMES",
    "resolve_sampler",
    "family_sampler",
    "initial_noise",
    "starting_latent",
    "run_sampler",
    "sample",
    "SampleResult",
]

SAMPLERS: tuple[str, ...] = SAMPLER_NAMES
"""Sampler names: euler, euler_ancestral, heun, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde, ddpm, ddim."""

#: the older combined sampler+schedule names -> (sampler, scheduler); ``ddim``/``ddpm`` keep DDIM's uniform timesteps
LEGACY_SCHEDULER_NAMES: dict[str, tuple[str, str]] = {
    "ddim": ("ddim", "ddim_uniform"),
    "ddpm": ("ddpm", "ddim_uniform"),
    "euler": ("euler", "normal"),
    "euler_a": ("euler_ancestral", "normal"),
    "dpmpp_2m": ("dpmpp_2m", "normal"),
    "dpmpp_2m_karras": ("dpmpp_2m", "karras"),
}

AUTO = "auto"
"""The ``scheduler`` name for the model family's own trajectory (:func:`family_sampler`)."""

SCHEDULERS: tuple[str, ...] = (AUTO,) + SCHEDULER_NAMES + tuple(LEGACY_SCHEDULER_NAMES)
"""Every name the ``scheduler`` argument accepts: ``auto`` (the model family's default, :func:`family_sampler`), the
sigma lists (normal, karras, exponential, sgm_uniform, simple, ddim_uniform, beta) and the legacy combined names of
:data:`LEGACY_SCHEDULER_NAMES`."""


def family_sampler(model_sampling: ModelSampling, *, stochastic: bool = False, kind: str | None = None
                   ) -> tuple[str, str]:
    """``(sampler, scheduler)`` of the model family's default trajectory (``scheduler="auto"``).

    - VP models (SD1.5 / SDXL, eps or v): ``ddim`` on ``ddim_uniform``, DDIM on its uniform timesteps as DRaFT and
      ReFL train (at eta 0 an Euler step; its ``eta`` is DDIM's eta).
    - Flow models (SD3, Flux): ``euler`` on ``normal``. On :class:`~rdt_lib.model_sampling.FlowMatch` model
      sampling ``normal`` is ``shift(linspace(1, sigma_min, N))`` then 0, the sigma list diffusers'
      ``FlowMatchEulerDiscreteScheduler`` gives ``StableDiffusion3Pipeline`` (both take ``sigma_min`` = the
      shifted ``1 / T``), and ``x += (x - x0) / sigma * (sigma_next - sigma)`` with ``x0 = x - sigma * v`` is its
      Euler step. With ``stochastic`` (an eta is asked for): ``euler_ancestral``, which on a flow model is
      ComfyUI's rectified-flow ancestral step (``sample_euler_ancestral_RF``): at eta 0 exactly the Euler step,
      at eta > 0 it steps to a lower sigma and re-noises to ``sigma_next`` with fresh noise -- the flow
      counterpart of DDIM's eta (which in sigma space is the same Euler-ancestral step on a VP model).
    - Flux (``kind="flux"``, a backbone's ``kind``): the same steps on ``simple``, the list ``FluxPipeline`` passes
      (``linspace(1, 1/N, N)`` shifted, then 0; see :mod:`rdt_lib.backbones.flux`).
    """
    if getattr(model_sampling, "is_flow", False):
        return ("euler_ancestral" if stochastic else "euler"), ("simple" if kind == "flux" else "normal")
    return "ddim", "ddim_uniform"


def resolve_sampler(sampler: str | None, scheduler: str, model_sampling: ModelSampling | None = None, *,
                    stochastic: bool = False, kind: str | None = None) -> tuple[str, str]:
    """``(sampler, scheduler)`` from the arguments: a legacy combined ``scheduler`` name sets both (an explicit
    ``sampler`` then wins); ``auto`` takes the model family's (:func:`family_sampler` of ``model_sampling`` and ``kind``;
    without one only the name is checked and ``("ddim", "auto")`` returned); otherwise ``sampler`` (default
    ``ddim``) and the sigma list ``scheduler``."""
    key = scheduler.lower()
    if key in LEGACY_SCHEDULER_NAMES:
        legacy_sampler, legacy_scheduler = LEGACY_SCHEDULER_NAMES[key]
        return (sampler or legacy_sampler), legacy_scheduler
    if key == AUTO:
        default, key = ("ddim", AUTO) if model_sampling is None else family_sampler(
            model_sampling, stochastic=stochastic, kind=kind)
    elif key in SCHEDULER_NAMES:
        default = "ddim"
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}; accepted: {', '.join(SCHEDULERS)}")
    name = (sampler or default).lower()
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLER_NAMES)}")
    return name, key


def initial_noise(
    shape: tuple[int, ...], seeds: Sequence[int], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Standard-normal noise ``[len(seeds), *shape]``, row ``b`` drawn from a CPU generator seeded ``seeds[b]``.

    The same seed gives the same row whatever the batch around it. The generators are returned so the
    sampler's own noise (ancestral and SDE steps, :class:`rdt_lib.samplers.RowNoise`) continues from them.
    """
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device=device, dtype=dtype), gens


def starting_latent(model_sampling: ModelSampling, sigmas: torch.Tensor, noise: torch.Tensor,
                    latent: torch.Tensor | None = None, max_denoise: bool | None = None) -> torch.Tensor:
    """The sampler's starting point at ``sigmas[0]`` from unit-variance ``noise`` (ComfyUI's KSampler rule).

    VP models: ``latent + noise * sqrt(1 + sigma0^2)`` when ``max_denoise`` (by default: when ``sigmas[0]`` is the
    model's ``sigma_max`` or above, a full denoise from pure noise), else ``latent + noise * sigma0``; flow
    models: ``sigma0 * noise + (1 - sigma0) * latent``. ``latent`` ``None`` = an empty (zero) latent.
    """
    s0 = float(sigmas[0])
    if max_denoise is None:
        top = model_sampling.sigma_max
        max_denoise = abs(s0 - top) <= 1e-5 * abs(top) or s0 > top
    return model_sampling.noise_scaling(s0, noise.float(), None if latent is None else latent.float(), max_denoise)


def run_sampler(
    sampler: str,
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    start_step: int = 0,
    end_step: int | None = None,
    grad_steps: Callable[[int], bool] | None = None,
    eta: float | Callable[[int], float] | None = None,
    noise_sampler: Callable[[float, float], torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    model_sampling: ModelSampling | None = None,
) -> torch.Tensor:
    """Run steps ``start_step .. end_step - 1`` of the sigma list ``sigmas`` with the sampler ``sampler``.

    ``x`` is the latent at ``sigmas[start_step]``. Step indices given to ``grad_steps``, ``eta`` and the callback's
    ``info["i"]`` are those of the full list. ``grad_steps`` default: no step runs with autograd (DRaFT-K passes
    ``lambda i: i >= n - K``). A multistep sampler (dpmpp_2m) starts its history afresh at ``start_step``.
    """
    fn = get_sampler(sampler)
    n = len(sigmas) - 1
    end = n if end_step is None else end_step
    if not 0 <= start_step <= end <= n:
        raise ValueError(f"need 0 <= start_step <= end_step <= {n} steps, got {start_step}, {end}")
    if start_step == end:
        return x
    offset = start_step
    kwargs: dict[str, Any] = {
        "grad_steps": (lambda i: False) if grad_steps is None else (lambda i: bool(grad_steps(i + offset))),
        "model_sampling": model_sampling,
    }
    if callback is not None:
        kwargs["callback"] = lambda info: callback({**info, "i": info["i"] + offset})
    if sampler in STOCHASTIC:
        if eta is not None:
            kwargs["eta"] = (lambda i: eta(i + offset)) if callable(eta) else eta
        kwargs["noise_sampler"] = noise_sampler
    elif eta is not None and (callable(eta) or eta != 0):
        raise ValueError(f"eta applies to the stochastic samplers ({', '.join(sorted(STOCHASTIC))}), not {sampler!r}")
    return fn(denoiser, x, sigmas[start_step:end + 1], **kwargs)


@dataclass
class SampleResult:
    """Output of :func:`sample`: final latents, decoded images ``[B, C, H, W]`` in [0, 1] (or None), the seeds
    used, per-model evaluation counts (``base``, ``tuned``, ``joint`` calls) and the sigma list sampled."""

    latents: torch.Tensor
    images: torch.Tensor | None
    seeds: list[int]
    evaluations: dict[str, int]
    sigmas: torch.Tensor | None = None


def _as_branch(model: ModelBranch | Backbone) -> ModelBranch:
    return model if isinstance(model, ModelBranch) else ModelBranch(model)


def _denoisers(base: ModelBranch, tuned: ModelBranch | None, prompts: list[str], negatives: list[str]):
    bb = base.backbone
    needs_uncond = base.guidance != 1.0 or (tuned is not None and tuned.backbone is bb and tuned.guidance != 1.0)
    with torch.no_grad():
        cond = bb.encode_prompts(prompts)
        uncond = bb.encode_prompts(negatives, negative=True) if needs_uncond else None
    guided_base = GuidedDenoiser(base, cond, uncond)
    if tuned is None:
        return guided_base, None
    if tuned.backbone is bb:  # one network: reuse the encoded prompts
        return guided_base, GuidedDenoiser(tuned, cond, uncond)
    return guided_base, GuidedDenoiser.encode(tuned, prompts, negatives)


@torch.no_grad()
def sample(
    base: ModelBranch | Backbone,
    prompts: Sequence[str],
    *,
    tuned: ModelBranch | None = None,
    schedule: Schedule | str | None = None,
    sampler: str | None = None,
    scheduler: str = "normal",
    num_steps: int = 25,
    denoise: float = 1.0,
    sigmas: torch.Tensor | Sequence[float] | None = None,
    seeds: int | Sequence[int] = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float | None = None,
    negative_prompt: str | Sequence[str] = "",
    latents: torch.Tensor | None = None,
    max_denoise: bool | None = None,
    decode: bool = True,
    batched: bool = True,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> SampleResult:
    """Sample one image per prompt with a base model, a tuned model, or both mixed by ``schedule``.

    Args:
        base: the base model (a backbone, or a :class:`ModelBranch` with its own CFG scale).
        prompts: one prompt per image.
        tuned: the reward-tuned model: a LoRA adapter on the base network
            (``ModelBranch(backbone, adapter="tuned", cfg_scale=...)``) or a separate backbone.
        schedule: the tuned model's weight per step (default ``"tuned"`` when a tuned model is given,
            else ``"base"``); see :mod:`rdt_lib.schedules`. The step index comes from sigma.
        sampler: the step rule, one of :data:`SAMPLERS` (default ``ddim``, which at eta 0 is an Euler step).
        scheduler: the sigma list, one of :data:`SCHEDULERS` (default ``normal``); a legacy combined name
            (``dpmpp_2m_karras`` ...) also sets the sampler; ``auto`` the model family's (:func:`family_sampler`).
            Flow models: ``normal`` is the list diffusers'
            ``StableDiffusion3Pipeline`` samples (``FlowMatchEulerDiscreteScheduler`` with the model's shift),
            ``simple`` is ``FluxPipeline``'s (``linspace(1, 1/N, N)`` shifted; exactly when N divides 1000); both
            with the ``euler`` sampler (or ``ddim`` at eta 0). Sigma lists of Flux use the shift of
            ``height`` x ``width`` (:meth:`~rdt_lib.backbones.base.Backbone.model_sampling_for`).
        num_steps: sampling steps.
        denoise: ComfyUI's KSampler ``denoise`` in (0, 1]: the last ``num_steps`` steps of a longer list.
        sigmas: an explicit sigma list (noisiest first, ``num_steps + 1`` entries); overrides ``scheduler``,
            ``num_steps`` and ``denoise``.
        seeds: one seed per image, or a single seed ``s`` (image ``b`` then uses ``s + b``). Same seed =
            same image, in any batch (noise and the samplers' fresh noise are drawn per row).
        height, width: image size in pixels (backbone default if omitted).
        eta: noise amount of the stochastic samplers (``ddim``: default 0; ``euler_ancestral`` and the SDE
            samplers: default 1); an error for deterministic samplers unless 0.
        negative_prompt: the unconditional prompt(s) for classifier-free guidance.
        latents: start from these unit-variance noise latents ``[B, ...]`` instead of seeded noise.
        max_denoise: the starting-noise rule (:func:`starting_latent`; default ComfyUI's: ``noise *
            sqrt(1 + sigma0^2)`` when the list starts at the model's ``sigma_max``, else ``noise * sigma0``).
        decode: decode latents to images in [0, 1].
        batched: evaluate both models in one forward pass where they share a network.
        progress: show a tqdm progress bar.
        callback: called once per step with k-diffusion's dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}``.
    """
    base_branch = _as_branch(base)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give one prompt per image")
    b = len(prompts)
    if isinstance(seeds, int):
        seed_list = [seeds + i for i in range(b)]
    else:
        seed_list = [int(s) for s in seeds]
        if len(seed_list) != b:
            raise ValueError(f"got {len(seed_list)} seeds for {b} prompts: give one seed per prompt or a single int")
    negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != b:
        raise ValueError(f"got {len(negatives)} negative prompts for {b} prompts")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    bb = base_branch.backbone
    ms = bb.model_sampling_for(height, width)  # Flux: the flow shift of this image size
    sampler_name, scheduler_name = resolve_sampler(sampler, scheduler, ms, stochastic=bool(eta),
                                                   kind=getattr(bb, "kind", None))
    if sigmas is None:
        sigma_list = sigmas_for(scheduler_name, ms, num_steps, denoise, sampler=sampler_name)
    else:
        sigma_list = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
        if len(sigma_list) < 2:
            raise ValueError("sigmas needs at least 2 entries (one step)")
    sched = parse_schedule(schedule if schedule is not None else ("tuned" if tuned is not None else "base"))
    guided_base, guided_tuned = _denoisers(base_branch, tuned, prompts, negatives)
    joint = joint_denoiser(guided_base, guided_tuned) if (batched and guided_tuned is not None) else None
    denoiser = DualDenoiser(guided_base, guided_tuned, sched, sigmas=sigma_list, joint=joint)

    shape = bb.latent_shape(height, width)
    noise, gens = initial_noise(shape, seed_list, device=bb.device)
    if latents is not None:
        if tuple(latents.shape) != (b, *shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(b, *shape)}")
        noise = latents.to(device=bb.device, dtype=torch.float32)
    x = starting_latent(ms, sigma_list, noise, max_denoise=max_denoise)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sigma_list) - 1, desc=f"sampling ({sched})", leave=False)

    def on_step(info: dict) -> None:
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(info)

    try:
        x = run_sampler(sampler_name, denoiser, x, sigma_list, eta=eta, callback=on_step, model_sampling=ms,
                        noise_sampler=RowNoise(gens, shape, device=bb.device))
    finally:
        if bar is not None:
            bar.close()
    x = ms.inverse_noise_scaling(float(sigma_list[-1]), x)
    images = bb.decode(x.to(bb.dtype)) if decode else None
    return SampleResult(latents=x, images=images, seeds=seed_list, evaluations=dict(denoiser.evaluations),
                        sigmas=sigma_list)
