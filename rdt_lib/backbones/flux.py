"""FLUX.1 as a flow-matching backbone (diffusers ``FluxPipeline``), on the code shared with SD3.

Differences from SD3, all kept inside this class so the sampler, the mixer and the schedules stay the same:

- Guidance-distilled (FLUX.1-dev): the transformer takes the guidance strength as an input (``guidance_scale``,
  diffusers' default 3.5) instead of classifier-free guidance; :attr:`default_cfg` is 1 (no unconditional pass).
  A CFG scale above 1 on a :class:`~rdt_lib.denoisers.ModelBranch` is diffusers' ``true_cfg_scale`` with the
  negative prompt. FLUX.1-schnell (no guidance input) ignores ``guidance_scale``.
- Latents stay ``[B, 16, H / 8, W / 8]`` everywhere; :meth:`forward_network` packs them into 2x2 patches
  (``[B, H/16 * W/16, 64]``) with their position ids and unpacks the velocity.
- The flow shift depends on the image size (``use_dynamic_shifting``): :meth:`model_sampling_for` gives the
  :class:`~rdt_lib.model_sampling.FlowMatch` of an image size; FluxPipeline's default sigma list
  (``linspace(1, 1/N, N)`` shifted, then 0) is ComfyUI's ``simple`` scheduler on it when ``N`` divides 1000.

Time convention (see :mod:`rdt_lib.backbones.flow`): sigma in [0, 1]; :meth:`forward_network` takes the timestep
``sigma * 1000`` like every backbone and hands the transformer ``sigma`` (diffusers' ``timestep / 1000``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..model_sampling import ModelSampling, model_sampling_from_config
from .base import Conditioning
from .flow import FlowMatchingBackbone

__all__ = ["FluxBackbone", "pack_latents", "unpack_latents", "image_ids"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2) * (w/2), 4C]``: each 2x2 patch one token (channel-major within a token)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``h`` x ``w``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``[(h/2) * (w/2), 3]`` of the packed tokens of an ``h`` x ``w`` latent: ``(0, row, column)``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(FlowMatchingBackbone):
    """A diffusers FLUX.1 pipeline as a backbone.

    Args:
        pipe: a ``FluxPipeline``.
        guidance_scale: the distilled guidance strength fed to the transformer (FLUX.1-dev; diffusers' default 3.5).
        max_sequence_length: T5 tokens per prompt (diffusers' default 512).

    Conditioning tensors: ``encoder_hidden_states [B, max_sequence_length, 4096]`` (T5), ``pooled_projections
    [B, 768]`` (CLIP) and, for guidance-distilled models, ``guidance [B]`` (set when the prompts are encoded).
    """

    kind = "flux"
    default_cfg = 1.0

    def __init__(self, pipe: Any, guidance_scale: float = 3.5, max_sequence_length: int = 512) -> None:
        super().__init__(pipe)
        if not 0 < max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length}")
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def patch_size(self) -> int:
        return 2  # 2x2 latent patches per token (the transformer's own patch_size is 1 on packed tokens)

    @property
    def guidance_distilled(self) -> bool:
        return bool(getattr(self.network.config, "guidance_embeds", False))

    def model_sampling_for(self, height: int | None = None, width: int | None = None) -> ModelSampling:
        """:class:`~rdt_lib.model_sampling.FlowMatch` with the shift for ``height`` x ``width`` pixels (diffusers'
        ``calculate_shift`` on the packed token count ``(H/16) * (W/16)``; ``None`` = the default 1024 x 1024)."""
        _, h, w = self.latent_shape(height, width)
        return model_sampling_from_config(self.scheduler_config, image_seq_len=(h // 2) * (w // 2))

    def encode_prompts(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        """Encode prompts with the pipeline's ``encode_prompt`` (CLIP pooled + T5; no gradient)."""
        prompts = list(prompts)
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        tensors = {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}
        if self.guidance_distilled:
            tensors["guidance"] = torch.full((len(prompts),), self.guidance_scale, device=self.device)
        return Conditioning(tensors, len(prompts))

    def forward_network(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity ``[B, 16, h, w]`` for latents ``x [B, 16, h, w]`` at timesteps ``t = sigma * 1000`` ``[B]``."""
        _, _, h, w = x.shape
        text = cond.tensors["encoder_hidden_states"]
        guidance = cond.tensors.get("guidance")
        out = self.network(
            hidden_states=pack_latents(x),
            timestep=t.to(x.dtype) / 1000,
            guidance=None if guidance is None else guidance.float(),
            pooled_projections=cond.tensors["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
