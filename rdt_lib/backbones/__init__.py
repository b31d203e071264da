"""Backbones: the diffusion models the sampler and the trainer drive (see :mod:`.base`).

The diffusers-backed backbones (``StableDiffusionBackbone``, ``StableDiffusion3Backbone``, ``FluxBackbone``) and
``load_backbone`` are imported on first use, so ``import rdt_lib.backbones`` does not import diffusers.
"""

from importlib import import_module
from typing import Any

from .base import Backbone, Conditioning
from .toy2d import GaussianMixture2D, ToyBackbone, ToyDenoiser, train_toy_base

_LAZY = {
    "StableDiffusionBackbone": ".stable_diffusion",
    "StableDiffusion3Backbone": ".sd3",
    "FluxBackbone": ".flux",
    "load_backbone": ".loading",
    "MODEL_KINDS": ".loading",
}

__all__ = ["Backbone", "Conditioning", "GaussianMixture2D", "ToyBackbone", "ToyDenoiser", "train_toy_base", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module, __name__), name)
