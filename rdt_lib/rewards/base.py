"""The ``RewardModel`` interface, input validation and gradient checkpointing shared by every reward."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Iterable

import torch
import torch.utils.checkpoint
from torch import nn

from .errors import RewardInputError

# Values this far outside [0, 1] are accepted as rounding noise (e.g. a VAE decode followed by a float cast).
RANGE_TOLERANCE = 1e-3


def validate_images(images: object) -> torch.Tensor:
    """Check that ``images`` is a finite float tensor ``[B, 3, H, W]`` in [0, 1] with B >= 1.

    Raises:
        RewardInputError: naming what was wrong and what is accepted.
    """
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(
            f"images must be a torch.Tensor of shape [B, 3, H, W] with values in [0, 1], got {type(images).__name__}"
        )
    if not images.is_floating_point():
        raise RewardInputError(
            f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}; "
            "for uint8 images in 0..255 pass images.float() / 255"
        )
    if images.dim() != 4:
        hint = " (a single image: add the batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise RewardInputError(f"images must have rank 4, [B, 3, H, W]; got shape {tuple(images.shape)}{hint}")
    b, c, h, w = images.shape
    if c != 3:
        hint = " (channels-last? use images.permute(0, 3, 1, 2))" if images.shape[-1] == 3 else ""
        raise RewardInputError(f"images must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}{hint}")
    if b == 0:
        raise RewardInputError("images is an empty batch (B = 0); pass at least one image")
    if h < 1 or w < 1:
        raise RewardInputError(f"images must have positive height and width, got shape {tuple(images.shape)}")
    with torch.no_grad():
        finite = torch.isfinite(images).all()
        lo, hi = images.min(), images.max()
        finite, lo, hi = bool(finite), float(lo), float(hi)
    if not finite:
        raise RewardInputError("images contain NaN or inf values; rewards accept finite values in [0, 1]")
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        if hi > 2.0:
            hint = " They look like 0..255 pixel values: divide by 255."
        elif lo < 0.0:
            hint = " They look like [-1, 1] values (e.g. a VAE decode): use (images + 1) / 2, clamped to [0, 1]."
        else:
            hint = " Clamp them to [0, 1]."
        raise RewardInputError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}].{hint}")
    return images


def validate_prompts(prompts: object, batch_size: int, required: bool = True) -> list[str] | None:
    """Check that ``prompts`` is a list (or tuple) of ``batch_size`` strings, one per image.

    When ``required`` is False (image-only rewards), ``None`` is accepted and returned as is.
    """
    if prompts is None:
        if required:
            raise RewardInputError(f"this reward needs one prompt per image: pass a list of {batch_size} strings")
        return None
    if isinstance(prompts, str):
        raise RewardInputError(
            f"prompts must be a list of {batch_size} strings (one per image), got a single string; "
            "for one prompt for all images pass [prompt] * B"
        )
    if not isinstance(prompts, Sequence):
        raise RewardInputError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise RewardInputError(
            f"prompts must all be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}"
        )
    if len(prompts) != batch_size:
        raise RewardInputError(
            f"got {batch_size} images but {len(prompts)} prompts; pass exactly one prompt per image"
        )
    return prompts


def _checkpointed_forward(original, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def set_layer_checkpointing(layers: Iterable[nn.Module], enabled: bool) -> None:
    """Recompute each layer's activations in backward instead of storing them (saves memory when backpropagating).

    Works in eval mode (transformers' own switch only acts in training mode, which would enable dropout).
    """
    for layer in layers:
        if enabled and "_rdt_original_forward" not in layer.__dict__:
            original = layer.forward
            layer._rdt_original_forward = original
            layer.forward = functools.partial(_checkpointed_forward, original)
        elif not enabled and "_rdt_original_forward" in layer.__dict__:
            del layer.forward
            del layer._rdt_original_forward


class RewardModel(nn.Module):
    """A frozen, differentiable image reward.

    ``score(images, prompts)`` takes a float tensor ``[B, 3, H, W]`` in [0, 1] of any size and a list of B prompts
    and returns a float32 tensor ``[B]`` in the reward's usual units (see each subclass). Gradients flow to
    ``images``; the reward's own parameters are frozen and it always runs in eval mode (no dropout).

    Subclasses set ``self.preprocess`` (an :class:`~.preprocess.ImagePreprocess`) and implement
    ``score_preprocessed(pixels, prompts)`` and ``_checkpoint_layers()``.
    """

    #: registry name, e.g. "pickscore"
    name: str = "reward"
    #: human-readable units and typical range
    units: str = ""
    #: False for image-only rewards (aesthetic), which accept ``prompts=None``
    needs_prompts: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._gradient_checkpointing = False

    # ---- public API -------------------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Score ``images`` ``[B, 3, H, W]`` in [0, 1] against ``prompts`` (B strings); returns float32 ``[B]``."""
        images = validate_images(images)
        prompts = validate_prompts(prompts, images.shape[0], required=self.needs_prompts)
        out = self._score(images.to(self.device), prompts)
        return out.float().reshape(images.shape[0])

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:  # noqa: D102
        return self.score(images, prompts)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "RewardModel":
        """Switch activation checkpointing of the image path on or off (less memory for DRaFT/ReFL backprop)."""
        set_layer_checkpointing(self._checkpoint_layers(), enabled)
        self._gradient_checkpointing = enabled
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the backbone (heads are kept in float32)."""
        return self._backbone_dtype()

    def place(self, device: torch.device | str, dtype: torch.dtype) -> "RewardModel":
        """Move to ``device`` and cast the backbone to ``dtype``; score heads stay float32."""
        self.to(device=device, dtype=dtype)
        for module in self._float32_modules():
            module.float()
        return self

    def train(self, mode: bool = True) -> "RewardModel":
        """Rewards stay in eval mode (dropout off) whatever ``mode`` is; scores must be deterministic."""
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, units={self.units!r}"

    def score_preprocessed(self, pixels: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """The model forward and score formula on pixels already preprocessed as ``self.preprocess`` does
        (``[B, 3, S, S]``, normalised); no input validation. Used to compare against reference preprocessing."""
        raise NotImplementedError

    # ---- for subclasses ---------------------------------------------------------------------------------------
    def _score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.score_preprocessed(self.preprocess(images), prompts)

    def _checkpoint_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def _float32_modules(self) -> list[nn.Module]:
        """Small heads kept in float32 whatever the backbone dtype."""
        return []

    def _backbone_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float32."""
    a = a.float()
    b = b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


__all__ = [
    "RewardModel",
    "validate_images",
    "validate_prompts",
    "set_layer_checkpointing",
    "cosine",
    "RANGE_TOLERANCE",
]
