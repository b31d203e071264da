"""A toy 2-D diffusion backbone: an MLP noise predictor over points of a mixture of Gaussians.

It is the embedded default: small enough to train, fine-tune and sample in seconds on a CPU, and rich
enough to show reward hacking and mode collapse. "Images" are points ``[B, 2]`` in data units; the
network works on latents = points / ``data_scale`` so the diffusion runs at unit scale. The backbone is
unconditional: prompts only set the batch size and classifier-free guidance is not available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .base import Backbone, Conditioning

__all__ = ["GaussianMixture2D", "ToyDenoiser", "ToyBackbone", "TOY_LORA_TARGETS", "train_toy_base"]

TOY_LORA_TARGETS = ("fc1", "fc2", "fc3", "fc_out")
"""The toy network's Linear layers that LoRA adapts."""


@dataclass(frozen=True)
class GaussianMixture2D:
    """``n_modes`` isotropic Gaussians of std ``std`` evenly spaced on a circle of radius ``radius``
    (data units), equally weighted. Mode 0 sits at angle 0 (the +x axis)."""

    n_modes: int = 8
    radius: float = 4.0
    std: float = 0.25

    @property
    def centers(self) -> torch.Tensor:
        """Mode centres ``[n_modes, 2]``."""
        angles = torch.arange(self.n_modes, dtype=torch.float32) * (2 * math.pi / self.n_modes)
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * self.radius

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points ``[n, 2]`` from the mixture."""
        idx = torch.randint(0, self.n_modes, (n,), generator=generator)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=generator)

    def nearest_mode(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the nearest mode centre and the distance to it in units of ``std``."""
        d = torch.cdist(points.float().cpu(), self.centers)
        dist, idx = d.min(dim=1)
        return idx, dist / self.std

    def on_distribution(self, points: torch.Tensor, max_std: float = 3.0) -> torch.Tensor:
        """Boolean mask: within ``max_std`` standard deviations of some mode centre."""
        return self.nearest_mode(points)[1] <= max_std


def _timestep_embedding(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` (training units) -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() / num_train_timesteps * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ToyDenoiser(nn.Module):
    """MLP ``(x [B, 2], t [B]) -> epsilon [B, 2]`` with a sinusoidal time embedding."""

    def __init__(self, hidden: int = 128, time_dim: int = 32, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.num_train_timesteps = num_train_timesteps
        self.fc1 = nn.Linear(2 + time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.fc_out = nn.Linear(hidden, 2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, _timestep_embedding(t, self.time_dim, self.num_train_timesteps).to(x.dtype)], dim=1)
        h = self.act(self.fc1(h))
        h = self.act(self.fc2(h)) + h
        h = self.act(self.fc3(h)) + h
        return self.fc_out(h)


class ToyBackbone(Backbone):
    """The toy backbone: unconditional epsilon-prediction over 2-D points.

    Args:
        network: the denoiser (a fresh untrained :class:`ToyDenoiser` by default).
        data_scale: latents = points / data_scale.
    """

    conditional = False
    default_cfg = 1.0

    def __init__(self, network: ToyDenoiser | None = None, *, data_scale: float = 4.0) -> None:
        self.network = network if network is not None else ToyDenoiser()
        self.data_scale = float(data_scale)
        self.scheduler_config = {
            "num_train_timesteps": self.network.num_train_timesteps,
            # SD's noise schedule: a cosine schedule's near-zero final alpha makes DDIM amplify errors ~1e4x
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "prediction_type": "epsilon",
            "clip_sample": False,
            "timestep_spacing": "trailing",
            "steps_offset": 0,
            "set_alpha_to_one": True,
        }

    def encode_prompts(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        return Conditioning({}, len(prompts))

    def forward_network(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.network(x, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> points in data units ``[B, 2]``."""
        return latents * self.data_scale

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Points in data units -> latents."""
        return images / self.data_scale

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        return (2,)


def train_toy_base(
    backbone: ToyBackbone,
    data: GaussianMixture2D,
    *,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fit the toy network to ``data`` with the plain diffusion loss (epsilon MSE, uniform timesteps).

    Returns the loss per step. Runs in a few seconds on a CPU for the defaults.
    """
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(backbone.scheduler_config)
    net = backbone.network
    net.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="training the toy base model", leave=False)
    for _ in iterator:
        x0 = backbone.encode_images(data.sample(batch_size, gen))
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, eps, t)
        loss = torch.nn.functional.mse_loss(net(xt, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    return losses
