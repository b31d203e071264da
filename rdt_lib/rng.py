"""Named random streams: one generator per (seed, purpose, index), independent of each other.

Instead of seed arithmetic (``seed * 64 + j``), every random choice derived from a seed names what it is for;
the stream's seed is a hash of the three, so different purposes never share numbers and no two indices collide.

Purposes used in rdt_lib (:data:`PURPOSES`):

- ``"micro_batch"`` -- the trainer's per-micro-batch seed: (optimizer-step seed, index of the micro-batch).
- ``"eta"`` -- R0's random eta per sampling step: (micro-batch seed, 0).
- ``"stop_step"`` -- ReFL's random stop step: (micro-batch seed, 0).
- ``"intermediate_step"`` -- R0+'s supervised intermediate step (DRaFT-K option): (micro-batch seed, 0).
- ``"renoise"`` -- DRaFT-LV's fresh noise for re-noising copy ``j`` of a sample: (the row's seed, j).
- ``"vae_posterior"`` -- the VAE posterior sample of a real image (ImageReFL): (the row's seed, 0).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["PURPOSES", "stream_seed", "rng_stream"]

PURPOSES = ("micro_batch", "eta", "stop_step", "intermediate_step", "renoise", "vae_posterior")


def stream_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed for the stream ``(seed, purpose, index)`` (``purpose`` one of :data:`PURPOSES`)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random-stream purpose {purpose!r}; known: {', '.join(PURPOSES)}")
    digest = hashlib.blake2b(f"{int(seed)}/{purpose}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def rng_stream(seed: int, purpose: str, index: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`stream_seed`."""
    return torch.Generator(device).manual_seed(stream_seed(seed, purpose, index))
