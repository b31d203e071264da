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

__all__ = ["MODEL_KINDS", "detect_kind", "load_backbone", "freeze"]

MODEL_KINDS: tuple[str, ...] = ("auto", "sd15", "sdxl", "sd3", "flux")
"""Accepted ``kind`` values (``auto`` = detected from the weights or the diffusers directory): ``sd15`` (SD1.x /
2.x), ``sdxl``, ``sd3`` (SD3 / SD3.5, flow matching), ``flux`` (FLUX.1, flow matching, guidance-distilled)."""


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


def detect_kind(path: str | os.PathLike[str]) -> str:
    """The model kind (one of :data:`MODEL_KINDS` but ``auto``) of a diffusers directory (``model_index.json``'s
    ``_class_name`` / components), a single-file checkpoint (its keys) or a hub id (``sd3`` / ``flux`` when the id
    names them, else as :func:`~rdt_lib.backbones.stable_diffusion.detect_sd_kind` guesses)."""
    from .flow import detect_flow_kind
    from .pipelines import checkpoint_keys
    from .stable_diffusion import detect_sd_kind

    local = Path(path).expanduser()
    if local.is_dir():
        return detect_flow_kind(local) or detect_sd_kind(local)
    if local.is_file():
        keys = checkpoint_keys(local)
        return detect_flow_kind(keys) or detect_sd_kind(keys)
    name = str(path).lower()
    if "stable-diffusion-3" in name or "sd3" in name:
        return "sd3"
    if "flux" in name:
        return "flux"
    return detect_sd_kind(str(path))


def load_backbone(
    path: str | os.PathLike[str],
    *,
    kind: str = "auto",
    single_file_config: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    t5: bool = True,
) -> Backbone:
    """Load a text-to-image backbone, frozen (no gradients, eval mode).

    Args:
        path: a diffusers directory (``model_index.json``), a single-file checkpoint (``.safetensors`` /
            ``.ckpt``, e.g. from ComfyUI's ``models/checkpoints``) or a Hugging Face hub id.
        kind: one of :data:`MODEL_KINDS`.
        single_file_config: single files only: a local diffusers directory of the same architecture to take the
            component configs and tokenizers from (``None`` = fetch them from the hub).
        dtype, device: weights' dtype and device.
        t5: ``sd3`` only: ``False`` loads no T5 text encoder (its prompt tokens are zeros, as diffusers samples
            with ``text_encoder_3=None``; saves ~9 GB for SD3 / SD3.5).
    """
    from .stable_diffusion import StableDiffusionBackbone

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; accepted: {', '.join(MODEL_KINDS)}")
    local = Path(path).expanduser()
    source = str(local) if local.exists() else str(path)
    if kind == "auto":
        kind = detect_kind(path)
    if not t5 and kind != "sd3":
        raise ValueError(f"t5=False (no T5 text encoder) is accepted for kind 'sd3' only, got {kind!r}")
    if kind in ("sd3", "flux"):
        from .flux import FluxBackbone
        from .sd3 import StableDiffusion3Backbone

        cls = StableDiffusion3Backbone if kind == "sd3" else FluxBackbone
        if local.is_file():
            backbone: Backbone = cls.from_single_file(local, config=single_file_config or None, t5=t5, dtype=dtype,
                                                      device=device)
        else:
            backbone = cls.from_pretrained(source, t5=t5, dtype=dtype, device=device)
    elif local.is_file():
        backbone = StableDiffusionBackbone.from_single_file(local, kind=kind, config=single_file_config or None,
                                                            dtype=dtype, device=device)
    else:
        backbone = StableDiffusionBackbone.from_pretrained(source, kind=kind, dtype=dtype, device=device)
    return freeze(backbone)
