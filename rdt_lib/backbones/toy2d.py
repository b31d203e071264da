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

    def posterior_mean(self, noisy: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``E[x0 | noisy]`` for ``noisy = signal * x0 + noise * eps``, ``x0`` from this mixture, ``eps ~ N(0, I)``.

        The closed-form optimal denoiser (the minimiser of the denoising loss): with ``v = std^2``, component
        ``k`` gives ``noisy ~ N(signal * mu_k, (signal^2 v + noise^2) I)``; its responsibility ``w_k`` is the
        softmax of those log-densities (equal weights) and its posterior mean
        ``mu_k + signal v / (signal^2 v + noise^2) * (noisy - signal * mu_k)``; the result is the ``w``-weighted
        sum. ``noisy`` ``[B, 2]`` and the result are in data units; ``signal`` (in [0, 1]) and ``noise``
        (data units, > 0 where ``signal`` < 1) are ``[B]`` tensors or scalars.
        """
        x = noisy.double()
        a = torch.as_tensor(signal, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        s = torch.as_tensor(noise, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        mu = self.centers.to(device=x.device, dtype=torch.float64)[None]  # [1, K, 2]
        v = self.std ** 2
        var = a ** 2 * v + s ** 2  # [B, 1, 1]
        diff = x[:, None, :] - a * mu  # [B, K, 2]
        w = torch.softmax(-(diff ** 2).sum(-1, keepdim=True) / (2 * var), dim=1)
        return (w * (mu + a * v / var * diff)).sum(dim=1).to(noisy.dtype)


def _timestep_embedding(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` (training units) -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() / num_train_timesteps * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ToyDenoiser(nn.Module):
    """MLP ``(x [B, 2], t [B]) -> epsilon [B, 2]`` with a sinusoidal time embedding.

    ``input_scale`` multiplies ``x`` before the first layer (1 = latents as they come): with the latents at
    unit scale, narrow modes are sharp features that a SiLU MLP resolves far better when its input is
    spread out (e.g. ``input_scale = data_scale``, so the first layer sees data units).
    """

    def __init__(self, hidden: int = 128, time_dim: int = 32, num_train_timesteps: int = 1000,
                 input_scale: float = 1.0) -> None:
        super().__init__()
        self.input_scale = float(input_scale)
        self.time_dim = time_dim
        self.num_train_timesteps = num_train_timesteps
        self.fc1 = nn.Linear(2 + time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.fc_out = nn.Linear(hidden, 2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = _timestep_embedding(t, self.time_dim, self.num_train_timesteps).to(x.dtype)
        h = torch.cat([x * self.input_scale, temb], dim=1)
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
    target: str = "noise",
    spread_share: float = 0.25,
    low_noise_share: float = 0.5,
) -> list[float]:
    """Fit the toy network to ``data`` with the diffusion loss (epsilon MSE, uniform training timesteps).

    ``target``: ``"noise"``, the plain denoising loss (the drawn noise ``eps`` is the regression target), or
    ``"exact"``, the noise the optimal denoiser would predict, ``(x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a)``
    with the mixture's closed-form posterior mean (:meth:`GaussianMixture2D.posterior_mean`). Both have the
    same minimiser; the exact target has no label noise, so the network fits the mixture in far fewer steps
    (a distillation of the optimal denoiser, still a trained network). Because that target is exact for any
    input, the ``exact`` mode also trains where noised data rarely lands: ``spread_share`` of the rows replace
    the noised point by a uniform draw over the box the sampler visits, and ``low_noise_share`` of the rows draw
    their timestep log-uniform in sigma (the samplers' Karras steps crowd at low noise, where the narrow modes
    are sharp features). Both are ignored for ``noise``.

    Returns the loss per step. Runs in a few seconds on a CPU for the defaults.
    """
    if target not in ("noise", "exact"):
        raise ValueError(f"target must be 'noise' or 'exact', got {target!r}")
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(backbone.scheduler_config)
    net = backbone.network
    net.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    losses = []
    log_sigma_table = backbone.model_sampling.log_sigmas.float()  # ascending in t
    log_sig_min, log_sig_max = float(log_sigma_table[0]), float(log_sigma_table[-1])
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="training the toy base model", leave=False)
    for _ in iterator:
        x0 = backbone.encode_images(data.sample(batch_size, gen))
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        if target == "exact" and low_noise_share > 0:
            # samplers spend most steps at low noise (Karras: sigma log-spaced toward sigma_min), where the
            # modes are sharp: a share of the timesteps drawn log-uniform in sigma
            u = torch.rand(batch_size, generator=gen)
            log_sigma = log_sig_min + u * (log_sig_max - log_sig_min)
            t_low = torch.searchsorted(log_sigma_table, log_sigma).clamp(max=len(log_sigma_table) - 1)
            t = torch.where(torch.rand(batch_size, generator=gen) < low_noise_share, t_low, t)
        eps = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, eps, t)
        goal = eps
        if target == "exact":
            # the target is exact anywhere, so a share of the inputs spread over the whole box the sampler
            # visits, not only where noised data lies (between the modes at low noise, where a network
            # trained on noised data alone extrapolates and leaves samples stranded)
            spread = torch.rand(batch_size, generator=gen) < spread_share
            box = (torch.rand(x0.shape, generator=gen) * 2 - 1) * 1.5 * (data.radius / backbone.data_scale + 0.5)
            xt = torch.where(spread[:, None], box, xt)
            ab = noise_sched.alphas_cumprod[t].to(xt.dtype)
            signal, noise = ab.sqrt(), (1 - ab).sqrt()
            x0_mean = backbone.encode_images(
                data.posterior_mean(backbone.decode(xt), signal, noise * backbone.data_scale))
            goal = (xt - signal[:, None] * x0_mean) / noise[:, None]
        loss = torch.nn.functional.mse_loss(net(xt, t), goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    return losses
