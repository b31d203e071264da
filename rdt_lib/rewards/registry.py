"""``load_reward`` / ``available``: the reward names, their default sources and the model cache."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .base import RewardModel
from .clip_rewards import (
    AESTHETIC_FILE,
    AESTHETIC_ORIGIN,
    AESTHETIC_REPO,
    CLIP_L_REPO,
    PICKSCORE_REPO,
    VIT_H_PROCESSOR_REPO,
    load_aesthetic,
    load_clipscore,
    load_pickscore,
)
from .errors import UnknownRewardError
from .identify import check_reward_path
from .hps import HPS_FILES, HPS_REPO, load_hps
from .imagereward import BERT_REPO, IMAGEREWARD_FILE, IMAGEREWARD_REPO, MED_CONFIG_FILE, load_imagereward
from .weights import existing_path


@dataclass(frozen=True)
class RewardInfo:
    """What a reward is, its units and where its weights come from by default."""

    name: str
    architecture: str
    units: str
    sources: tuple[str, ...]
    local_layout: str


_INFO: dict[str, RewardInfo] = {
    "pickscore": RewardInfo(
        "pickscore", "CLIP ViT-H/14 (transformers CLIPModel)",
        "logit_scale.exp() * cosine (x100), about 18..23 on SD images",
        (f"hf://{PICKSCORE_REPO}", f"hf://{VIT_H_PROCESSOR_REPO} (tokenizer)"),
        "transformers directory: config.json + model.safetensors|pytorch_model.bin (+ tokenizer files)",
    ),
    "hpsv2": RewardInfo(
        "hpsv2", "open_clip ViT-H-14 mapped onto transformers CLIPModel",
        "100 * cosine (HPS benchmark units); not comparable with hpsv2.1",
        (f"hf://{HPS_REPO}/{HPS_FILES['hpsv2']}", f"hf://{VIT_H_PROCESSOR_REPO} (tokenizer)"),
        f"{HPS_FILES['hpsv2']} (or its directory, + optional open_clip_config.json and tokenizer files)",
    ),
    "hpsv2.1": RewardInfo(
        "hpsv2.1", "open_clip ViT-H-14 mapped onto transformers CLIPModel",
        "100 * cosine (HPS benchmark units), about 25..32 on SD images",
        (f"hf://{HPS_REPO}/{HPS_FILES['hpsv2.1']}", f"hf://{VIT_H_PROCESSOR_REPO} (tokenizer)"),
        f"{HPS_FILES['hpsv2.1']} (or its directory, + optional open_clip_config.json and tokenizer files)",
    ),
    "imagereward": RewardInfo(
        "imagereward", "BLIP ViT-L (BlipVisionModel) + BERT with cross-attention (BlipTextModel) + linear MLP",
        "(mlp - 0.16717) / 1.03334, about -2..2",
        (f"hf://{IMAGEREWARD_REPO}/{IMAGEREWARD_FILE}", f"hf://{IMAGEREWARD_REPO}/{MED_CONFIG_FILE}",
         f"hf://{BERT_REPO} (tokenizer)"),
        f"directory with {IMAGEREWARD_FILE} + {MED_CONFIG_FILE} (+ optional BERT vocab.txt)",
    ),
    "aesthetic": RewardInfo(
        "aesthetic", "CLIP ViT-L/14 image embedding (L2-normalised) + linear MLP (LAION aesthetic v2)",
        "aesthetic score, about 1..10",
        (f"hf://{AESTHETIC_REPO}/{AESTHETIC_FILE} (origin {AESTHETIC_ORIGIN})", f"hf://{CLIP_L_REPO}"),
        f"{AESTHETIC_FILE} (or a directory with it, + optional CLIP ViT-L/14 transformers dir there or in clip/)",
    ),
    "clipscore": RewardInfo(
        "clipscore", "CLIP ViT-L/14 (transformers CLIPModel)",
        "max(100 * cosine, 0), about 20..35 for matching pairs",
        (f"hf://{CLIP_L_REPO}",),
        "transformers directory: config.json + weights + tokenizer files",
    ),
}

_LOADERS: dict[str, Callable[[str | None], RewardModel]] = {
    "pickscore": load_pickscore,
    "hpsv2": partial(load_hps, "hpsv2"),
    "hpsv2.1": partial(load_hps, "hpsv2.1"),
    "imagereward": load_imagereward,
    "aesthetic": load_aesthetic,
    "clipscore": load_clipscore,
}

_ALIASES = {
    "pick_score": "pickscore", "pick-score": "pickscore",
    "hpsv21": "hpsv2.1", "hpsv2_1": "hpsv2.1", "hps_v2.1": "hpsv2.1", "hps_v2": "hpsv2",
    "image_reward": "imagereward", "image-reward": "imagereward",
    "laion_aesthetic": "aesthetic", "aesthetics": "aesthetic",
    "clip_score": "clipscore", "clip-score": "clipscore", "clip": "clipscore",
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

_cache: dict[tuple, RewardModel] = {}
_lock = threading.Lock()


def available() -> dict[str, RewardInfo]:
    """The reward names accepted by :func:`load_reward`, with architecture, units and default sources."""
    return dict(_INFO)


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case-insensitive, a few aliases); UnknownRewardError otherwise."""
    if not isinstance(name, str):
        raise UnknownRewardError(f"reward name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise UnknownRewardError(f"unknown reward {name!r}; available: {', '.join(_LOADERS)}")
    return key


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU by default; on GPU bfloat16 where supported, else float16."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"reward dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def load_reward(
    name: str,
    *,
    path: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> RewardModel:
    """Load a reward model by name (see :func:`available`).

    Args:
        name: ``pickscore``, ``hpsv2``, ``hpsv2.1``, ``imagereward``, ``aesthetic`` or ``clipscore``.
        path: local weights (a directory or file, layout per ``available()[name].local_layout``); default: the
            Hugging Face hub ids of ``available()[name].sources`` (cache first, then download).
        device: default ``cuda`` when available, else ``cpu``.
        dtype: backbone dtype; default float32 on CPU, bfloat16 (or float16) on GPU. Score heads stay float32.

    Returns:
        A frozen :class:`RewardModel` in eval mode. Loads are cached: the same name, path, device and dtype return
        the same object (call :func:`clear_cache` to free it).

    Raises:
        UnknownRewardError: unknown name. RewardWeightsNotFoundError: weights missing and not downloadable (the
        message names the hub repo and file). RewardCheckpointError: keys/shapes do not match, unsafe pickle,
        or ``path`` holds another reward's weights (found from its keys before loading, see
        :func:`~.identify.check_reward_path`).
    """
    key_name = canonical_name(name)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if path is not None:
        # Keys and configs first: weights of another reward fail here, before a loader reaches for hub files.
        check_reward_path(key_name, existing_path(path, key_name))
    path_key = str(Path(path).expanduser().resolve()) if path is not None else None
    key = (key_name, path_key, str(dev), dt)
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        model = _LOADERS[key_name](None if path is None else str(path))
        model.place(dev, dt)
        _cache[key] = model
        return model


def clear_cache() -> None:
    """Forget all cached reward models (their memory is freed once no other reference holds them)."""
    with _lock:
        _cache.clear()
