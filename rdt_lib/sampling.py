"""Sampling loops over diffusers schedulers, for one model or a dual-model pair.

:func:`denoise` is the plain loop (a denoiser callable, a scheduler, latents); :func:`sample` wraps it
with prompt encoding, classifier-free guidance, seeds and decoding. The trainer uses :func:`denoise`
too, with gradients switched on for chosen steps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from .backbones.base import Backbone
from .dual import DualModelDenoiser, GuidedModel, ModelBranch
from .schedules import Schedule, parse_schedule

__all__ = ["SCHEDULERS", "make_scheduler", "initial_noise", "denoise", "sample", "SampleResult"]

# name -> (scheduler class, config overrides)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}
_ALIASES = {"dpm++2m": "dpmpp_2m", "dpm++_2m": "dpmpp_2m", "dpm++2m_karras": "dpmpp_2m_karras", "euler_ancestral": "euler_a"}

# Denoiser signature: (latents scaled for the model, timestep, step index, number of steps) -> prediction
Denoiser = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A fresh diffusers scheduler ``name`` (one of :data:`SCHEDULERS`) built from a model's scheduler config.

    Every scheduler named here makes exactly one model evaluation per step, so the step index of the
    loop is the sampling step index the schedules use.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[key]
    return cls.from_config({**dict(config), **overrides})


def initial_noise(
    shape: tuple[int, ...], seeds: Sequence[int], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Standard-normal noise ``[len(seeds), *shape]``, row ``b`` drawn from a CPU generator seeded ``seeds[b]``.

    The same seed gives the same row whatever the batch around it. The generators are returned so the
    sampler's own noise (DDPM, ancestral steps) continues from them.
    """
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device=device, dtype=dtype), gens


def _step_kwargs(scheduler, generator, eta: float | None) -> dict[str, Any]:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "generator" in params and generator is not None:
        kwargs["generator"] = generator
    if "eta" in params and eta is not None:
        kwargs["eta"] = eta
    return kwargs


def denoise(
    denoiser: Denoiser,
    scheduler,
    latents: torch.Tensor,
    num_steps: int,
    *,
    start_step: int = 0,
    end_step: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float | Callable[[int], float] | None = None,
    grad_steps: Callable[[int], bool] | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    set_timesteps: bool = True,
) -> torch.Tensor:
    """Run scheduler steps ``start_step .. end_step-1`` of an ``num_steps``-step schedule.

    Args:
        denoiser: called as ``denoiser(model_input, t, i, num_steps)`` where ``model_input`` is the
            scheduler-scaled latent, ``t`` the timestep (training units) and ``i`` the step index.
        latents: the current sample at step ``start_step`` (for ``start_step = 0``: noise already
            multiplied by ``scheduler.init_noise_sigma``).
        eta: DDIM's eta (0 = deterministic); a callable gets the step index (random eta per step).
        grad_steps: which step indices run with autograd on (default none: the loop runs under
            ``torch.no_grad``). DRaFT-K passes ``lambda i: i >= num_steps - K``.
        callback: called after every step as ``callback(i, num_steps, latents)``.
        set_timesteps: call ``scheduler.set_timesteps(num_steps)`` first (False to keep a prepared scheduler).
    Returns:
        The latents after step ``end_step - 1`` (default: the final, fully denoised latents).
    """
    if set_timesteps:
        scheduler.set_timesteps(num_steps, device=latents.device)
    timesteps = scheduler.timesteps
    if len(timesteps) != num_steps:
        raise ValueError(
            f"scheduler {type(scheduler).__name__} has {len(timesteps)} timesteps for {num_steps} steps; "
            f"only one-evaluation-per-step schedulers are supported: {', '.join(SCHEDULERS)}"
        )
    end = num_steps if end_step is None else end_step
    if not 0 <= start_step <= end <= num_steps:
        raise ValueError(f"need 0 <= start_step <= end_step <= num_steps, got {start_step}, {end}, {num_steps}")
    if hasattr(scheduler, "set_begin_index"):
        # index steps by position, not by looking the timestep up (duplicate timesteps would confuse that)
        scheduler.set_begin_index(start_step)
    for i in range(start_step, end):
        t = timesteps[i]
        with torch.set_grad_enabled(bool(grad_steps(i)) if grad_steps is not None else False):
            model_input = scheduler.scale_model_input(latents, t)
            pred = denoiser(model_input, t, i, num_steps)
            step_eta = eta(i) if callable(eta) else eta
            latents = scheduler.step(pred, t, latents, **_step_kwargs(scheduler, generator, step_eta)).prev_sample
        if callback is not None:
            callback(i, num_steps, latents)
    return latents


@dataclass
class SampleResult:
    """Output of :func:`sample`: final latents, decoded images ``[B, C, H, W]`` in [0, 1] (or None), the
    seeds used, and per-model evaluation counts."""

    latents: torch.Tensor
    images: torch.Tensor | None
    seeds: list[int]
    evaluations: dict[str, int]


def _as_branch(model: ModelBranch | Backbone) -> ModelBranch:
    return model if isinstance(model, ModelBranch) else ModelBranch(model)


@torch.no_grad()
def sample(
    base: ModelBranch | Backbone,
    prompts: Sequence[str],
    *,
    tuned: ModelBranch | None = None,
    schedule: Schedule | str | None = None,
    scheduler: str = "ddim",
    num_steps: int = 25,
    seeds: int | Sequence[int] = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    negative_prompt: str | Sequence[str] = "",
    latents: torch.Tensor | None = None,
    decode: bool = True,
    batched: bool = True,
    progress: bool = False,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> SampleResult:
    """Sample one image per prompt with a base model, a tuned model, or both mixed by ``schedule``.

    Args:
        base: the base model (a backbone, or a :class:`ModelBranch` with its own CFG scale).
        prompts: one prompt per image.
        tuned: the reward-tuned model: a LoRA adapter on the base network
            (``ModelBranch(backbone, adapter="tuned", cfg_scale=...)``) or a separate backbone.
        schedule: the tuned model's weight per step (default ``"tuned"`` when a tuned model is given,
            else ``"base"``); see :mod:`rdt_lib.schedules`.
        scheduler: ``ddim``, ``ddpm``, ``euler``, ``euler_a``, ``dpmpp_2m``, ``dpmpp_2m_karras``.
        num_steps: sampling steps.
        seeds: one seed per image, or a single seed ``s`` (image ``b`` then uses ``s + b``). Same seed =
            same image.
        height, width: image size in pixels (backbone default if omitted).
        eta: DDIM eta (0 = deterministic DDIM).
        negative_prompt: the unconditional prompt(s) for classifier-free guidance.
        latents: start from these noise latents (``[B, ...]``, unit variance) instead of seeded noise.
        decode: decode latents to images in [0, 1].
        batched: evaluate both models in one forward pass where they share a network.
        progress: show a tqdm progress bar.
        callback: called after every step as ``callback(step, num_steps, latents)``.
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

    sched = parse_schedule(schedule if schedule is not None else ("tuned" if tuned is not None else "base"))
    bb = base_branch.backbone
    guided_base = GuidedModel.encode(base_branch, prompts, negatives)
    guided_tuned = None
    if tuned is not None:
        if tuned.backbone is bb:  # one network: reuse the encoded prompts
            uncond = guided_base.uncond
            if uncond is None and tuned.guidance != 1.0:
                uncond = bb.encode_prompts(negatives, negative=True)
            guided_tuned = GuidedModel(tuned, guided_base.cond, uncond)
        else:
            guided_tuned = GuidedModel.encode(tuned, prompts, negatives)
    denoiser = DualModelDenoiser(guided_base, guided_tuned, sched, batched=batched)

    sch = make_scheduler(scheduler, bb.scheduler_config)
    shape = bb.latent_shape(height, width)
    noise, gens = initial_noise(shape, seed_list, device=bb.device, dtype=bb.dtype)
    if latents is not None:
        if tuple(latents.shape) != (b, *shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(b, *shape)}")
        noise = latents.to(device=bb.device, dtype=bb.dtype)
    sch.set_timesteps(num_steps, device=bb.device)
    x = noise * sch.init_noise_sigma

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc=f"sampling ({sched})", leave=False)

    def on_step(i: int, n: int, lat: torch.Tensor) -> None:
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(i, n, lat)

    try:
        x = denoise(denoiser, sch, x, num_steps, generator=gens, eta=eta, callback=on_step, set_timesteps=False)
    finally:
        if bar is not None:
            bar.close()
    images = bb.decode(x) if decode else None
    return SampleResult(latents=x, images=images, seeds=seed_list, evaluations=dict(denoiser.evaluations))

