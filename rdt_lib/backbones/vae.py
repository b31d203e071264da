"""Latents <-> images through a diffusers ``AutoencoderKL``, with its ``scaling_factor`` and ``shift_factor``.

One implementation for every latent backbone: SD1.x / SDXL (4 channels, no shift) and the flow models SD3 / Flux
(16 channels, ``shift_factor`` set). The model-space latent is ``(z - shift_factor) * scaling_factor`` where ``z``
is the VAE's own latent; images are ``[B, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["decode_latents", "encode_images"]


def _shift(vae: Any) -> float:
    shift = getattr(vae.config, "shift_factor", None)
    return float(shift) if shift is not None else 0.0


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1] (differentiable; clamped).

    A float16 VAE whose config says ``force_upcast`` (SDXL's, which overflows in fp16) is moved to float32 first.
    """
    z = latents / vae.config.scaling_factor + _shift(vae)
    dtype = vae.dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
        dtype = torch.float32
    img = vae.decode(z.to(dtype), return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def encode_images(vae: Any, images: torch.Tensor, generator: torch.Generator | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] -> model-space latents (a sample of the VAE posterior), in ``dtype``."""
    dist = vae.encode((images * 2 - 1).to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.sample(generator=generator)
    out = (z - _shift(vae)) * vae.config.scaling_factor
    return out if dtype is None else out.to(dtype)
