"""One entry point that turns "where the model is" into a backbone, for every front door (trainer, sweep, CLI).

:func:`load_backbone` takes a diffusers directory, a hub id or a single-file checkpoint and the architecture
(``kind``: ``auto`` detects it from the files), and returns a frozen backbone in eval mode. New model families
register here, so the trainer and the evaluation sweep never pick a backbone class themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import Backbone

__all__ = ["MODEL_KINDS", "load_backbone", "freeze"]

MODEL_KINDS: tuple[str, ...] = ("auto", "sd15", "sdxl")
"""Accepted ``kind`` values (``auto`` = detected from the weights or the diffusers directory)."""


def freeze(backbone: Backbone) -> Backbone:
    """Switch every network of ``backbone`` (denoiser, VAE, text encoders) to eval mode without gradients."""
    pipe = getattr(backbone, "pipe", None)
    modules = [getattr(pipe, name, None) for name in getattr(pipe, "components", {})] if pipe is not None else []
    modules.append(backbone.network)
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return backbone


def load_backbone(
    path: str | os.PathLike[str],
    *,
    kind: str = "auto",
    single_file_config: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Backbone:
    """Load a text-to-image backbone, frozen (no gradients, eval mode).

    Args:
        path: a diffusers directory (``model_index.json``), a single-file checkpoint (``.safetensors`` /
            ``.ckpt``, e.g. from ComfyUI's ``models/checkpoints``) or a Hugging Face hub id.
        kind: one of :data:`MODEL_KINDS`.
        single_file_config: single files only: a local diffusers directory of the same architecture to take the
            component configs and tokenizers from (``None`` = fetch them from the hub).
        dtype, device: weights' dtype and device.
    """
    from .stable_diffusion import StableDiffusionBackbone, detect_sd_kind

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; accepted: {', '.join(MODEL_KINDS)}")
    local = Path(path).expanduser()
    if local.is_file():
        file_kind = detect_sd_kind(local) if kind == "auto" else kind
        backbone = StableDiffusionBackbone.from_single_file(local, kind=file_kind, config=single_file_config or None,
                                                            dtype=dtype, device=device)
    else:
        backbone = StableDiffusionBackbone.from_pretrained(str(local) if local.exists() else str(path), kind=kind,
                                                           dtype=dtype, device=device)
    return freeze(backbone)
