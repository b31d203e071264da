"""Differentiable image preprocessing for the reward models, in torch (no PIL, no torchvision).

Each reward's reference pipeline is ``PIL resize (bicubic) -> crop or pad -> ToTensor -> Normalize``. Here the
same steps run on a float tensor ``[B, 3, H, W]`` in [0, 1], so gradients reach the input pixels:

- resize: bicubic with antialiasing. ``backend="torch"`` (default) uses ``F.interpolate(..., antialias=True)``,
  whose antialiased bicubic follows PIL's resampling filter (mean abs pixel difference to PIL about 1e-3 on
  natural images); ``backend="kornia"`` uses ``kornia.geometry.transform.resize(antialias=True)``, which blurs with
  a Gaussian before plain bicubic (about 4e-3 from PIL). The result is clamped to [0, 1] as PIL's uint8 output is.
- crop (CLIP, PickScore, ImageReward, aesthetic): shortest side to ``size``, center crop ``size x size``.
- pad (HPSv2 official): longest side to ``size``, zero-pad (black) to ``size x size``, as open_clip's
  ``ResizeMaxSize`` does.
- normalise with the mean/std (kornia).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import kornia
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ResizeBackend = Literal["torch", "kornia"]


def resize_bicubic(images: torch.Tensor, size: tuple[int, int], backend: ResizeBackend = "torch") -> torch.Tensor:
    """Antialiased bicubic resize of ``[B, C, H, W]`` to ``size = (h, w)``, clamped to [0, 1]."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if backend == "torch":
        out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    elif backend == "kornia":
        out = kornia.geometry.transform.resize(images, size, interpolation="bicubic", antialias=True)
    else:
        raise ValueError(f"resize backend must be 'torch' or 'kornia', got {backend!r}")
    return out.clamp(0.0, 1.0)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output size when the shorter side becomes ``size`` (long side truncated, as torchvision and CLIP do)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output size when the longer side becomes ``size`` (both sides rounded, as open_clip's ResizeMaxSize)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def center_crop(images: torch.Tensor, size: int, rounding: Literal["floor", "round"] = "floor") -> torch.Tensor:
    """Center crop to ``size x size`` by slicing (exact, no resampling).

    ``rounding="floor"`` places the crop like transformers' CLIP image processor, ``"round"`` like torchvision's
    ``CenterCrop``; they differ by one pixel only when the margin is odd.
    """
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {size}x{size} from a {h}x{w} image; resize first")
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def pad_to_square(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Pad ``[.., h, w]`` (both <= size) to ``size x size``; left/top get the smaller half, as ResizeMaxSize."""
    h, w = images.shape[-2:]
    pad_h, pad_w = size - h, size - w
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


@dataclass(frozen=True)
class ImagePreprocess:
    """Preprocessing of one reward: ``[B, 3, H, W]`` in [0, 1] -> normalised ``[B, 3, size, size]``.

    Attributes:
        size: side of the square model input (224 for every released reward; follows the model config).
        mode: ``"crop"`` (shortest side to ``size``, center crop) or ``"pad"`` (longest side, zero-pad).
        mean, std: per-channel normalisation.
        crop_rounding: see :func:`center_crop`.
        backend: resize implementation, see :func:`resize_bicubic`.
    """

    size: int = 224
    mode: Literal["crop", "pad"] = "crop"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    crop_rounding: Literal["floor", "round"] = "floor"
    backend: ResizeBackend = "torch"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        h, w = images.shape[-2:]
        if self.mode == "crop":
            images = resize_bicubic(images, shortest_side_size(h, w, self.size), self.backend)
            images = center_crop(images, self.size, self.crop_rounding)
        elif self.mode == "pad":
            images = resize_bicubic(images, longest_side_size(h, w, self.size), self.backend)
            images = pad_to_square(images, self.size)
        else:
            raise ValueError(f"preprocess mode must be 'crop' or 'pad', got {self.mode!r}")
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype)
        return kornia.enhance.normalize(images, mean, std)
