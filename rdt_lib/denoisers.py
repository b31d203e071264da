"""Wrappers that turn a backbone's network into sigma-space denoisers ``(x, sigma) -> x0``.

The wrapper binds what one model of a sampling run needs: the network and its model sampling (sigma to
timestep, input scaling, eps / v / flow output to x0: :mod:`rdt_lib.model_sampling`), the encoded prompts, the
classifier-free guidance scale, and the LoRA adapter (chosen here through peft, per call or per batch row:
:func:`rdt_lib.lora.use_adapters`). :func:`joint_denoiser` evaluates a base and a tuned model that share one
network in a single batched forward pass, for :class:`rdt_lib.mix.DualDenoiser`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .backbones.base import Backbone, Conditioning
from .lora import use_adapters
from .mix import JointDenoise, cfg_combine

__all__ = ["ModelBranch", "network_output", "GuidedDenoiser", "joint_denoiser"]


@dataclass(frozen=True)
class ModelBranch:
    """One model of a sampling run.

    Args:
        backbone: the backbone whose network makes the prediction.
        adapter: the LoRA adapter active for this model; ``None`` = the network's base weights
            (all adapters disabled). A full fine-tune is a separate backbone with ``adapter=None``.
        cfg_scale: classifier-free guidance scale for this model (1 = conditional prediction only, no
            unconditional pass); ``None`` takes the backbone's usual scale (7.5 SD1.5, 5 SDXL, 7 SD3, 1 Flux and the toy).
        lora_scale: multiplier of the adapter's contribution (the "LoRA scaling" baseline; 1 = as trained).
    """

    backbone: Backbone
    adapter: str | None = None
    cfg_scale: float | None = None
    lora_scale: float = 1.0

    @property
    def guidance(self) -> float:
        scale = self.backbone.default_cfg if self.cfg_scale is None else float(self.cfg_scale)
        if not self.backbone.conditional and scale != 1.0:
            raise ValueError(
                f"{type(self.backbone).__name__} is unconditional: classifier-free guidance is not available, "
                f"so cfg_scale must be 1 (got {scale})"
            )
        return scale


def network_output(
    backbone: Backbone,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    cond: Conditioning,
    adapters: str | None | Sequence[str | None] = None,
    *,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """The network's raw output (eps, v or flow, float32) for latent ``x`` at noise level ``sigma``.

    ``x`` is in sigma space (``x0 + sigma * noise`` for VP models); it is scaled for the network
    (``calculate_input``) and cast to the network's dtype; ``sigma`` (a float or one per row) becomes the
    network's timestep (``timestep(sigma)``). ``adapters``: ``None`` = base weights, a name = that adapter,
    or one entry per row of ``x`` (a mixed batch in one forward pass); ``lora_scale`` scales named adapters.
    """
    ms = backbone.model_sampling
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    xin = ms.calculate_input(s, x.float()).to(backbone.dtype)
    t = ms.timestep(s).to(x.device)
    with use_adapters(backbone.network, adapters, scale=lora_scale):
        return backbone.predict(xin, t, cond).float()


class GuidedDenoiser:
    """A branch bound to its encoded prompts: ``(x, sigma) -> x0`` after the branch's own CFG.

    The unconditional and conditional rows go through one forward pass (``[uncond; cond]``); guidance
    ``uncond + cfg * (cond - uncond)`` is applied to the network output (equal to guiding x0: x0 is affine in the
    output at fixed ``x`` and ``sigma``). ``x`` stays float32; the result is float32.
    """

    def __init__(self, branch: ModelBranch, cond: Conditioning, uncond: Conditioning | None) -> None:
        self.branch = branch
        self.backbone = branch.backbone
        self.model_sampling = branch.backbone.model_sampling
        self.cfg = branch.guidance
        if self.cfg != 1.0 and uncond is None:
            raise ValueError("a CFG scale other than 1 needs the unconditional (negative-prompt) conditioning")
        self.cond = cond
        self.uncond = uncond if self.cfg != 1.0 else None

    @classmethod
    def encode(cls, branch: ModelBranch, prompts: Sequence[str], negative_prompts: Sequence[str]) -> "GuidedDenoiser":
        """Encode ``prompts`` (and, for CFG, ``negative_prompts``) with the branch's backbone."""
        bb = branch.backbone
        with torch.no_grad():
            cond = bb.encode_prompts(prompts)
            uncond = bb.encode_prompts(negative_prompts, negative=True) if branch.guidance != 1.0 else None
        return cls(branch, cond, uncond)

    def with_branch(self, branch: ModelBranch) -> "GuidedDenoiser":
        """The same encoded prompts for another branch of the same backbone (another adapter or CFG scale;
        a CFG scale other than 1 needs this denoiser to hold the unconditional rows)."""
        if branch.backbone is not self.backbone:
            raise ValueError("with_branch needs a branch of the same backbone; encode the prompts for another one")
        return GuidedDenoiser(branch, self.cond, self.uncond)

    def repeat(self, n: int) -> "GuidedDenoiser":
        """The same model with its prompts repeated ``n`` times (copy-major rows)."""
        rep = (lambda c: None if c is None else Conditioning.cat([c] * n))
        return GuidedDenoiser(self.branch, rep(self.cond), rep(self.uncond))

    @property
    def rows_per_sample(self) -> int:
        return 1 if self.uncond is None else 2

    def conditioning(self) -> Conditioning:
        """The rows this model evaluates: ``[uncond; cond]`` with CFG, ``cond`` without."""
        return self.cond if self.uncond is None else Conditioning.cat([self.uncond, self.cond])

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """Guided output from this model's rows (as ordered by :meth:`conditioning`)."""
        if self.uncond is None:
            return out
        uncond, cond = out.chunk(2)
        return cfg_combine(cond, uncond, self.cfg)

    def guided_output(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The guided raw network output (eps / v / flow) at ``(x, sigma)``."""
        xs = x if self.uncond is None else torch.cat([x, x])
        s = _rows(sigma, x)
        ss = s if self.uncond is None else torch.cat([s, s])
        out = network_output(self.backbone, xs, ss, self.conditioning(), self.branch.adapter,
                             lora_scale=self.branch.lora_scale)
        return self.combine(out)

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor | float, output: torch.Tensor) -> torch.Tensor:
        """x0 from a (guided) network output at ``(x, sigma)``."""
        return self.model_sampling.calculate_denoised(_rows(sigma, x), output, x.float())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.denoised(x, sigma, self.guided_output(x, sigma))


def _rows(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return s.expand(x.shape[0]) if s.ndim == 0 else s


def joint_denoiser(base: GuidedDenoiser, tuned: GuidedDenoiser) -> JointDenoise | None:
    """``(x, sigma) -> (base x0, tuned x0)`` from one forward pass over both models' stacked rows, each row
    with its own adapter (peft mixed-adapter batch), or ``None`` when the two cannot share a pass (different
    networks, or two different adapter scalings)."""
    if base.backbone is not tuned.backbone:
        return None
    scaled = {(m.branch.adapter, m.branch.lora_scale) for m in (base, tuned) if m.branch.adapter is not None}
    if len(scaled) > 1:
        return None
    scale = next(iter(scaled))[1] if scaled else 1.0

    def joint(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_base, n_tuned = base.rows_per_sample, tuned.rows_per_sample
        b = x.shape[0]
        s = _rows(sigma, x)
        xs = torch.cat([x] * (n_base + n_tuned))
        cond = Conditioning.cat([base.conditioning(), tuned.conditioning()])
        adapters = [base.branch.adapter] * (n_base * b) + [tuned.branch.adapter] * (n_tuned * b)
        out = network_output(base.backbone, xs, torch.cat([s] * (n_base + n_tuned)), cond, adapters, lora_scale=scale)
        return (base.denoised(x, s, base.combine(out[: n_base * b])),
                tuned.denoised(x, s, tuned.combine(out[n_base * b:])))

    return joint
