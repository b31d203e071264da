"""DINO ViT image embeddings for the diversity measures (ImageReFL: ``facebook/dino-vits16`` CLS embeddings).

:class:`DinoEmbedder` wraps a transformers ``ViTModel`` (loaded from a hub id or a local directory, without the
pooling layer) and preprocesses in torch, on the images' device, as ImageReFL's diversity measure does through the
model's own image processor (``facebook/dino-vits16``'s ``ViTImageProcessor``): resize the whole image to
224 x 224 (bilinear, antialiased; no crop, so nothing at the borders is lost), normalise with the ImageNet mean and
std. The embedding is the final layer-normed CLS token (``last_hidden_state[:, 0]``), as ImageReFL takes it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import MissingFileError, hub_unreachable

__all__ = ["DinoEmbedder", "dino_preprocess", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_EMBEDDER"]

DEFAULT_EMBEDDER = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """``images [B, 3, H, W]`` in [0, 1] -> the ViT's input ``[B, 3, size, size]``: the whole image resized to
    ``size`` x ``size`` (bilinear, antialiased, as PIL resizes in the model's ``ViTImageProcessor``), then the ImageNet
    mean and std."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


class DinoEmbedder(torch.nn.Module):
    """CLS embeddings of a DINO ViT: ``embedder(images [B, 3, H, W] in [0, 1]) -> [B, D]`` (float32)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_EMBEDDER, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "DinoEmbedder":
        """Load a ``ViTModel`` from a hub id or a local directory (``config.json`` + weights)."""
        from transformers import ViTModel

        try:
            model = ViTModel.from_pretrained(source, add_pooling_layer=False, dtype=dtype)
        except OSError as err:
            where = ("the Hugging Face hub could not be reached and it is not in the local cache"
                     if hub_unreachable(err) else str(err).splitlines()[0])
            raise MissingFileError(
                f"the DINO embedder {source!r} could not be loaded ({where}); download it once with "
                f"`huggingface-cli download {DEFAULT_EMBEDDER}`, or set metrics.embedder to a local ViT directory"
            ) from err
        return cls(model).to(device)

    @property
    def image_size(self) -> int:
        return int(getattr(self.model.config, "image_size", 224))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        param = next(self.model.parameters())
        pixels = dino_preprocess(images.to(param.device), size=self.image_size)
        out = self.model(pixel_values=pixels.to(param.dtype))
        return out.last_hidden_state[:, 0].float()

    def embed(self, images: Sequence[torch.Tensor] | torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Embeddings of many images (one tensor ``[N, 3, H, W]`` or a list of ``[3, H, W]``), in batches."""
        items = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
        out = [self(torch.stack(items[i:i + batch_size])).cpu() for i in range(0, len(items), batch_size)]
        return torch.cat(out) if out else torch.empty(0, 0)
