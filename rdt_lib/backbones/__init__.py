"""Backbones: the diffusion models the sampler and the trainer drive (see :mod:`.base`)."""

from .base import Backbone, Conditioning
from .toy2d import GaussianMixture2D, ToyBackbone, ToyDenoiser, train_toy_base

__all__ = ["Backbone", "Conditioning", "GaussianMixture2D", "ToyBackbone", "ToyDenoiser", "train_toy_base"]
