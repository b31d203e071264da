"""The backbone interface shared by the dual-model sampler and the reward trainer.

A backbone bundles what a text-to-image diffusion model needs around its denoising network: prompt
encoding, one raw network call, decoding latents to images, and the noise-schedule configuration (as
:attr:`Backbone.model_sampling`, sigma space). The denoising ``network`` is a plain ``torch.nn.Module`` that may
carry peft LoRA adapters; which adapter runs is chosen by the denoiser wrapper (:mod:`rdt_lib.denoisers`), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..model_sampling import ModelSampling, model_sampling_from_config

__all__ = ["Conditioning", "Backbone"]


@dataclass
class Conditioning:
    """Encoded prompts: named tensors, every one batch-first (row ``b`` belongs to prompt ``b``).

    An unconditional backbone returns an empty conditioning that only carries the batch size.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_size: int = 0

    def __post_init__(self) -> None:
        for name, t in self.tensors.items():
            if t.shape[0] != self.batch_size:
                raise ValueError(f"conditioning tensor {name!r} has {t.shape[0]} rows, expected {self.batch_size}")

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Stack several conditionings along the batch dimension (same keys required)."""
        keys = set(items[0].tensors)
        if any(set(c.tensors) != keys for c in items):
            raise ValueError("cannot concatenate conditionings with different tensors")
        return Conditioning(
            {k: torch.cat([c.tensors[k] for c in items]) for k in items[0].tensors},
            sum(c.batch_size for c in items),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move floating tensors to ``device`` / ``dtype``."""
        return Conditioning(
            {k: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for k, t in self.tensors.items()},
            self.batch_size,
        )


class Backbone:
    """Interface of a diffusion backbone. Subclasses implement the ``_``-free abstract methods.

    Attributes:
        network: the denoising network (UNet, MLP) that LoRA adapters are added to.
        conditional: whether prompts change the prediction (False: classifier-free guidance is not
            available and every CFG scale must be 1).
        scheduler_config: the diffusers scheduler config the network was trained with (``num_train_timesteps``,
            ``beta_schedule``, ``prediction_type`` ...); :attr:`model_sampling` is built from it.
        default_cfg: the usual classifier-free guidance scale for this family (7.5 SD1.5, 5 SDXL, 7 SD3, 1 toy
            and guidance-distilled Flux).
    """

    network: torch.nn.Module
    conditional: bool = True
    scheduler_config: Mapping[str, Any]
    default_cfg: float = 1.0

    # ---- to implement -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        """Encode ``prompts`` (one row each); no gradient. ``negative``: these are the unconditional /
        negative prompts of classifier-free guidance (some models encode an empty negative specially)."""
        raise NotImplementedError

    def forward_network(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One raw network call: ``x`` latents ``[B, ...]``, ``t`` timesteps ``[B]`` in training-timestep
        units (not a step index, not a sigma): 0 .. num_train_timesteps-1 for VP models, ``sigma * 1000`` (a float
        in [0, 1000]) for flow models; ``cond`` with B rows."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images ``[B, C, H, W]`` in [0, 1] (differentiable)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] to latents (for training on real images)."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode images")

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dimension) for an image of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def model_sampling(self) -> ModelSampling:
        """The network's sigma-space conventions, from :attr:`scheduler_config` (built once, then cached)."""
        key = repr(sorted(dict(self.scheduler_config).items()))
        cached = self.__dict__.get("_model_sampling")
        if cached is None or cached[0] != key:
            cached = (key, model_sampling_from_config(self.scheduler_config))
            self.__dict__["_model_sampling"] = cached
        return cached[1]

    def model_sampling_for(self, height: int | None = None, width: int | None = None) -> ModelSampling:
        """The model sampling for an image of ``height`` x ``width`` pixels (``None`` = the backbone's default size).

        The same as :attr:`model_sampling` except for models whose noise schedule depends on the image size (Flux's
        resolution-dependent flow shift); sigma lists for a given size come from this. For flow models the shift
        changes only which sigmas a schedule visits: the network input, its timestep (``sigma * 1000``) and the x0
        from its output do not depend on it, so the denoisers use :attr:`model_sampling` throughout.
        """
        return self.model_sampling

    def predict(self, x: torch.Tensor, t: torch.Tensor | float | int, cond: Conditioning) -> torch.Tensor:
        """The raw network output (noise, velocity or flow) for network input ``x`` at timestep ``t``.

        ``x`` is already scaled for the network (:meth:`~rdt_lib.model_sampling.DiscreteVP.calculate_input`);
        ``t`` is in training-timestep units (not a step index, not a sigma), a scalar or one per row. The LoRA
        adapters active are whatever the caller set (:func:`rdt_lib.lora.use_adapters`).
        """
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), float(t), device=x.device)
        elif t.ndim == 0:
            t = t.to(x.device).reshape(1).expand(x.shape[0])
        if x.shape[0] != cond.batch_size:
            raise ValueError(f"x has {x.shape[0]} rows but the conditioning has {cond.batch_size}")
        return self.forward_network(x, t.to(x.device), cond)
