"""Image tensors to files: grids of images and 8-bit PNGs written atomically (validation grids, the sweep's
cache and report). Images are float tensors ``[3, H, W]`` (or ``[N, 3, H, W]``) in [0, 1]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .atomic_io import write_image_atomic

__all__ = ["image_grid", "to_uint8", "write_png"]


def image_grid(images: torch.Tensor, rows: int, cols: int, pad: int = 0) -> torch.Tensor:
    """``images [N, 3, H, W]`` in [0, 1], row-major, as one ``[3, rows*H + (rows-1)*pad, cols*W + (cols-1)*pad]``
    image with ``pad`` white pixels between cells; cells past ``N`` stay white."""
    n, c, h, w = images.shape
    canvas = torch.ones(c, rows * (h + pad) - pad, cols * (w + pad) - pad, dtype=images.dtype, device=images.device)
    for i in range(min(n, rows * cols)):
        r, col = divmod(i, cols)
        canvas[:, r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = images[i]
    return canvas


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` uint8 (clamped, rounded to the nearest level)."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def write_png(path: str | os.PathLike[str], image: torch.Tensor) -> Path:
    """Write ``image [3, H, W]`` in [0, 1] as a lossless 8-bit PNG, atomically; returns the path."""
    from PIL import Image

    return write_image_atomic(path, Image.fromarray(to_uint8(image)), format="PNG")
