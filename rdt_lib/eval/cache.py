"""The sweep's image cache: every generated image on disk, keyed by everything that changes its pixels.

An image lives at ``<run>/cache/<group>/<prompt hash>_<seed>.png`` (lossless 8-bit PNG, written atomically). The
group is the SHA-256 of the settings shared by a schedule's images (:func:`group_settings`: base model identity,
tuned model identity where the schedule uses it, schedule, LoRA strength, sampler, scheduler, steps, eta, CFG of
each model, resolution, negative prompt, dtype, device type); the settings are written beside the images as
``settings.json``. So a rerun with one more schedule finds every other image, an interrupted sweep resumes where
it stopped, and two sweeps with different settings in one run directory keep their images apart (they never
reuse each other's).

:func:`model_identity` names a model by its path and its files' sizes and modification times (a hub id by the id),
so replacing a LoRA file under the same name starts a new group.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..atomic_io import write_text_atomic
from ..images import write_png

__all__ = ["model_identity", "group_key", "ImageCache"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt", ".model")


def model_identity(path: str) -> str:
    """``path`` (resolved) with the size and mtime of the file, or of every weight/config file in the folder;
    a hub id (not a local path) as ``hub:<id>``."""
    local = Path(path).expanduser()
    if not local.exists():
        return f"hub:{path}"
    local = local.resolve()
    if local.is_file():
        files = [local]
    else:
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(local).parts))
    parts = [str(local)]
    for f in files:
        st = f.stat()
        parts.append(f"{f.relative_to(local) if f != local else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def group_key(settings: Mapping[str, Any]) -> str:
    """The cache group of a schedule's settings: 16 hex digits of the SHA-256 of their sorted JSON."""
    text = json.dumps(dict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


class ImageCache:
    """Images of one run directory's ``cache/`` folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def group_dir(self, settings: Mapping[str, Any]) -> Path:
        return self.root / group_key(settings)

    def path(self, settings: Mapping[str, Any], prompt: str, seed: int) -> Path:
        return self.group_dir(settings) / f"{_prompt_key(prompt)}_{int(seed)}.png"

    def has(self, settings: Mapping[str, Any], prompt: str, seed: int) -> bool:
        return self.path(settings, prompt, seed).is_file()

    def put(self, settings: Mapping[str, Any], prompt: str, seed: int, image: torch.Tensor) -> Path:
        """Store ``image [3, H, W]`` in [0, 1] (rounded to 8 bits) and the group's ``settings.json``."""
        group = self.group_dir(settings)
        meta = group / "settings.json"
        if not meta.is_file():
            write_text_atomic(meta, json.dumps(dict(settings), indent=2, sort_keys=True, default=str) + "\n")
        return write_png(self.path(settings, prompt, seed), image)

    def get(self, settings: Mapping[str, Any], prompt: str, seed: int) -> torch.Tensor:
        """The stored image as ``[3, H, W]`` float32 in [0, 1]."""
        from PIL import Image

        with Image.open(self.path(settings, prompt, seed)) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
