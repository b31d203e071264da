"""Reading diffusers pipelines and single-file checkpoints: what every diffusers-backed backbone shares.

- :func:`dtype_kwarg`: the weights-dtype keyword the installed diffusers reads.
- :func:`pipeline_from_pretrained`: ``pipe_cls.from_pretrained`` with one clear error for a missing directory or an
  unreachable hub id.
- :func:`checkpoint_keys`: the tensor names of a single-file checkpoint, read lazily, for detecting its kind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, hub_unreachable, one_line

__all__ = ["dtype_kwarg", "pipeline_from_pretrained", "checkpoint_keys"]


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers renamed ``torch_dtype`` to ``dtype``; pass whichever the installed version reads."""
    try:
        from diffusers.utils import deprecation_utils

        renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    except ImportError:  # pragma: no cover - very old diffusers
        renamed = False
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def pipeline_from_pretrained(pipe_cls: Any, path_or_id: str | os.PathLike[str], *, what: str, layout: str,
                             dtype: torch.dtype, **kwargs: Any) -> Any:
    """``pipe_cls.from_pretrained(path_or_id, ...)`` in ``dtype``; a :class:`ModelLoadError` naming ``what`` (e.g.
    ``"SD3 model"``) and the expected directory ``layout`` (e.g. ``"unet/, vae/, text_encoder/ ..."``) otherwise."""
    try:
        return pipe_cls.from_pretrained(str(path_or_id), **dtype_kwarg(dtype), **kwargs)
    except (OSError, ValueError) as err:
        local = Path(path_or_id).expanduser().exists()
        why = ("it is not a local path and the Hugging Face hub cannot be reached from here (offline?) nor is "
               "it in the local cache" if hub_unreachable(err) and not local else one_line(err))
        raise ModelLoadError(
            f"could not load a diffusers {what} from {str(path_or_id)!r}: {why}; give a local diffusers directory "
            f"(with model_index.json, {layout}), a single .safetensors checkpoint, or a hub id reachable from this "
            "machine (or download it first)"
        ) from err


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint (``.safetensors`` read lazily; others with ``torch.load``,
    ``weights_only=True``). Raises ValueError for a file that is not a readable checkpoint."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a checkpoint at all (truncated, another format renamed ...)
        what = ".safetensors file" if path.suffix.lower() == ".safetensors" else "checkpoint file"
        raise ValueError(f"{str(path)!r} is not a readable {what}: {err}") from err
    return list(sd.get("state_dict", sd)) if isinstance(sd, Mapping) else []
