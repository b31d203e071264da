"""Stable Diffusion 3 / 3.5 as a flow-matching backbone (diffusers ``StableDiffusion3Pipeline``).

The network is ``SD3Transformer2DModel`` (MMDiT); prompts go through the pipeline's own ``encode_prompt`` (two
CLIP text encoders with projection, and T5 where loaded); latents are the 16-channel VAE's. Time convention (see
:mod:`rdt_lib.backbones.flow`): sigma in [0, 1], network timestep ``sigma * 1000``, velocity output. The model
sampling is :class:`rdt_lib.model_sampling.FlowMatch` with the scheduler config's ``shift`` (3.0 for SD3 / SD3.5).

The sigma list diffusers' ``FlowMatchEulerDiscreteScheduler`` samples by default (``N`` timesteps evenly spaced
from ``1000 * sigma_max`` to ``1000 * sigma_min``, divided by 1000, shifted, then 0) is ComfyUI's ``normal``
scheduler on this model sampling: ``rdt_lib.sampling.sample(..., scheduler="normal")`` with the ``euler`` (or
``ddim`` at eta 0) sampler reproduces ``StableDiffusion3Pipeline``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import Conditioning
from .flow import FlowMatchingBackbone

__all__ = ["StableDiffusion3Backbone"]


class StableDiffusion3Backbone(FlowMatchingBackbone):
    """A diffusers SD3 / SD3.5 pipeline as a backbone.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (``text_encoder_3=None`` for sampling without T5: its tokens are zeros).
        max_sequence_length: T5 tokens per prompt (diffusers' default 256; at most 512).

    Conditioning tensors: ``encoder_hidden_states [B, 77 + max_sequence_length, joint_attention_dim]`` (CLIP-L and
    CLIP-G hidden states side by side, zero-padded to T5's width, then T5's) and ``pooled_projections [B, 2048]``
    (both CLIPs' pooled projections). CFG is ordinary classifier-free guidance (default 7.0, diffusers').
    """

    kind = "sd3"
    default_cfg = 7.0

    def __init__(self, pipe: Any, max_sequence_length: int = 256) -> None:
        super().__init__(pipe)
        if not 0 < max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)

    @classmethod
    def _component_overrides(cls, t5: bool) -> dict[str, Any]:
        return {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}

    @property
    def has_t5(self) -> bool:
        return getattr(self.pipe, "text_encoder_3", None) is not None

    def encode_prompts(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        """Encode prompts with the pipeline's ``encode_prompt`` (no gradient); negative prompts are encoded the
        same way (SD3 has no zeroed empty negative)."""
        prompts = list(prompts)
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return Conditioning({"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)},
                            len(prompts))

    def forward_network(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's velocity for latents ``x [B, 16, h, w]`` at timesteps ``t = sigma * 1000`` ``[B]``."""
        return self.network(
            hidden_states=x, timestep=t, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            pooled_projections=cond.tensors["pooled_projections"], return_dict=False,
        )[0]

