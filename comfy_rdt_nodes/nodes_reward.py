"""Reward nodes (category ``rdt/reward``): load the library's reward models and score, sort and pick images.

- ``RDTRewardModelLoader``: reward name + weights (files and folders in ComfyUI's ``models/rewards``, or
  ``default``: the Hugging Face hub source) + precision -> ``REWARD_MODEL``. The network is wrapped in a
  ``comfy.model_patcher.ModelPatcher``: ``comfy.model_management.load_models_gpu`` puts it on the GPU when it
  scores and offloads it when a sampler needs the memory. One load per (reward, weights, precision, device).
- ``RDTRewardScorer``: ``IMAGE`` batch + prompt(s) + up to three ``REWARD_MODEL`` with weights + normalisation ->
  per-image combined scores, the batch sorted best first, the top k, their batch indices and a text table (also
  shown on the node).
- ``RDTSaveScoredImages``: saves images as PNG with rank, batch index and score in the file name and the PNG
  text metadata.

``comfy`` and ``folder_paths`` are imported inside functions: without ComfyUI (unit tests) the nodes run on the
CPU with the rewards held directly, and the weights folders are passed explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from rdt_lib.rewards import (
    RewardInputError,
    RewardModel,
    RewardWeightsNotFoundError,
    UnknownRewardError,
    available,
    combine_parts,
    load_reward,
    make_normalizer,
)
from rdt_lib.rewards.base import RANGE_TOLERANCE
from rdt_lib.rewards.identify import EXPECTED
from rdt_lib.rewards.registry import canonical_name, resolve_device, resolve_dtype
from rdt_lib.rewards.weights import WEIGHT_SUFFIXES

log = logging.getLogger(__name__)

REWARD_FOLDER = "rewards"  # ComfyUI models/<this>, registered with folder_paths
REWARD_NAMES = ("pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic", "clipscore")
DEFAULT_WEIGHTS = "default"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NORMALIZATIONS = ("none", "imagerefl", "standardize")
_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- weights folders ---------------------------------------------------------------------------------------------
def ensure_rewards_folder() -> list[Path]:
    """Register ``models/rewards`` with ComfyUI's ``folder_paths`` (unless already registered, e.g. by
    ``extra_model_paths.yaml``) and return its folders; ``[]`` without ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    if REWARD_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(REWARD_FOLDER, os.path.join(folder_paths.models_dir, REWARD_FOLDER),
                                           is_default=True)
    return [Path(p) for p in folder_paths.get_folder_paths(REWARD_FOLDER)]


def _is_hf_model_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def list_reward_weights(folders: Sequence[Path] | None = None, max_depth: int = 3) -> list[str]:
    """``"default"``, then the weights in the reward folders as paths relative to their folder ('/'-separated):
    every folder that directly holds a weights file (listed with a trailing '/'), and every weights file that is
    not part of a transformers model folder (one with a config.json)."""
    folders = ensure_rewards_folder() if folders is None else [Path(f) for f in folders]
    found: set[str] = set()
    for root in folders:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            rel = here.relative_to(root)
            if len(rel.parts) >= max_depth:
                dirnames[:] = []
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            weights = [f for f in filenames if Path(f).suffix in WEIGHT_SUFFIXES]
            if weights and rel.parts:
                found.add(rel.as_posix() + "/")
            if weights and not _is_hf_model_dir(here):
                found.update((rel / f).as_posix() for f in weights)
    return [DEFAULT_WEIGHTS] + sorted(found, key=str.lower)


def _hub_sources(reward: str) -> str:
    return ", ".join(s.replace("hf://", "") for s in available()[reward].sources)


def weights_hint(reward: str, folders: Sequence[Path]) -> str:
    where = " or ".join(repr(str(f)) for f in folders) if folders else "ComfyUI/models/rewards"
    return (f"Put {EXPECTED[reward]} into {where} (the ComfyUI models/rewards folder; a file or a sub-folder) and "
            f"choose it in 'weights'; 'default' fetches {_hub_sources(reward)} from the Hugging Face hub, which "
            "works only where this machine can reach it.")


def resolve_weights(reward: str, weights: str, folders: Sequence[Path]) -> Path | None:
    """The path of a ``weights`` choice (None for ``"default"``); RewardWeightsNotFoundError naming the folder,
    the files the reward needs and its hub id when it is not there."""
    if weights == DEFAULT_WEIGHTS:
        return None
    rel = Path(weights.rstrip("/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise RewardWeightsNotFoundError(f"weights {weights!r} must be a name inside the rewards folder. "
                                         + weights_hint(reward, folders))
    for root in folders:
        candidate = root / rel
        if candidate.exists():
            return candidate
    raise RewardWeightsNotFoundError(
        f"weights {weights!r} for reward {reward!r} not found in {[str(f) for f in folders] or 'models/rewards'}. "
        + weights_hint(reward, folders)
    )


# ---- the REWARD_MODEL value -----------------------------------------------------------------------------------------
class _ManagedReward(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages: the reward as a submodule plus the plain ``device`` attribute the
    patcher writes (``RewardModel.device`` is a read-only property)."""

    def __init__(self, reward: RewardModel, device: torch.device) -> None:
        super().__init__()
        self.reward = reward
        self.device = device


@dataclass
class RewardHandle:
    """A loaded reward as passed between nodes (``REWARD_MODEL``)."""

    name: str
    reward: RewardModel
    weights: str
    dtype: torch.dtype
    load_device: torch.device
    patcher: Any = None  # comfy.model_patcher.ModelPatcher under ComfyUI, else None
    label: str = field(default="")

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def needs_prompts(self) -> bool:
        return self.reward.needs_prompts

    def prepare(self) -> torch.device:
        """Load the network where it scores (ComfyUI model management: GPU, offloading others as needed)."""
        if self.patcher is None:
            return self.reward.device
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        devices = {p.device for p in self.reward.parameters()}
        if len(devices) > 1:  # a partial load (e.g. --novram) leaves plain modules behind: score in one place
            log.warning("reward %s was loaded partially (%s); moving it to %s whole", self.name, devices,
                        self.load_device)
            self.reward.to(self.load_device)
        return self.reward.device

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """Scores (float32 ``[B]``, on the CPU) of ``images`` ``[B, 3, H, W]`` in [0, 1]."""
        device = self.prepare()
        with torch.no_grad():
            return self.reward.score(images.to(device), prompts if self.needs_prompts else None).float().cpu()


_handles: dict[tuple, RewardHandle] = {}
_handles_lock = threading.Lock()


def _devices() -> tuple[torch.device, torch.device, bool]:
    """``(load device, offload device, under ComfyUI)``."""
    try:
        import comfy.model_management as mm
    except ImportError:
        dev = resolve_device(None)
        return dev, dev, False
    return mm.get_torch_device(), mm.unet_offload_device(), True


def _auto_dtype(load_device: torch.device, comfy_present: bool) -> torch.dtype:
    if comfy_present and load_device.type != "cpu":
        import comfy.model_management as mm

        if mm.should_use_bf16(load_device):
            return torch.bfloat16
        if mm.should_use_fp16(load_device):
            return torch.float16
        return torch.float32
    return resolve_dtype(None, load_device)


def load_reward_model(reward: str, weights: str = DEFAULT_WEIGHTS, precision: str = "auto",
                      folders: Sequence[Path] | None = None) -> RewardHandle:
    """Load (or reuse) a reward for the nodes. ``folders``: the reward folders (default: ComfyUI's)."""
    try:
        name = canonical_name(reward)
    except UnknownRewardError as exc:
        raise UnknownRewardError(f"{exc}. The Reward Model Loader offers {', '.join(REWARD_NAMES)}") from None
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    folders = ensure_rewards_folder() if folders is None else [Path(f) for f in folders]
    path = resolve_weights(name, weights, folders)
    load_device, offload_device, comfy_present = _devices()
    dtype = _PRECISION_DTYPES[precision] if precision != "auto" else _auto_dtype(load_device, comfy_present)
    key = (name, str(path.resolve()) if path is not None else DEFAULT_WEIGHTS, dtype, str(load_device))
    with _handles_lock:
        handle = _handles.get(key)
        if handle is not None:
            return handle
        try:
            model = load_reward(name, path=path, device=offload_device, dtype=dtype)
        except RewardWeightsNotFoundError as exc:
            raise RewardWeightsNotFoundError(f"{exc} {weights_hint(name, folders)}") from exc
        patcher = None
        if comfy_present:
            import comfy.model_patcher

            patcher = comfy.model_patcher.ModelPatcher(_ManagedReward(model, offload_device),
                                                       load_device=load_device, offload_device=offload_device)
        handle = RewardHandle(name=name, reward=model, weights=weights, dtype=dtype, load_device=load_device,
                              patcher=patcher)
        _handles[key] = handle
        return handle


def clear_reward_cache() -> None:
    """Forget the loaded reward models (ComfyUI frees them once nothing else holds them)."""
    from rdt_lib.rewards import clear_cache

    with _handles_lock:
        _handles.clear()
    clear_cache()


# ---- scoring ------------------------------------------------------------------------------------------------------
def comfy_images_to_bchw(images: object) -> tuple[torch.Tensor, list[str]]:
    """ComfyUI ``IMAGE`` (float ``[B, H, W, C]`` in [0, 1]) -> ``[B, 3, H, W]``; returns notes about what was done.

    A 4th (alpha) channel is ignored for scoring (the image outputs keep it). Refused with a RewardInputError: not a
    tensor, not rank 4, an empty batch, channels other than 3 or 4, NaN/inf, values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"images must be a ComfyUI IMAGE tensor [B, H, W, C], got {type(images).__name__}")
    if images.dim() != 4:
        raise RewardInputError(f"images must be a ComfyUI IMAGE [B, H, W, C] (rank 4), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise RewardInputError("images is an empty batch (0 images); the scorer needs at least one image")
    notes = []
    channels = images.shape[-1]
    if channels == 4:
        images = images[..., :3]
        notes.append("alpha channel ignored for scoring (kept in the image outputs)")
    elif channels != 3:
        raise RewardInputError(
            f"images must have 3 (RGB) or 4 (RGBA) channels in the last dimension of [B, H, W, C], got shape "
            f"{tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise RewardInputError(f"images must be float in [0, 1] (ComfyUI IMAGE), got dtype {images.dtype}")
    with torch.no_grad():
        finite = bool(torch.isfinite(images).all())
        lo, hi = float(images.min()), float(images.max())
    if not finite:
        raise RewardInputError("images contain NaN or inf values; the scorer accepts values in [0, 1]")
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise RewardInputError(
            f"images must be in [0, 1] (ComfyUI IMAGE), got values in [{lo:.4g}, {hi:.4g}]; refused rather than "
            "clamped. Scale or clamp them before the scorer (0..255 values: divide by 255)."
        )
    return images.permute(0, 3, 1, 2).float(), notes


def split_prompts(prompt: str, batch_size: int, needed: bool) -> list[str] | None:
    """One prompt for all images, or one line per image (trailing empty lines are ignored)."""
    if not isinstance(prompt, str):
        raise RewardInputError(f"prompt must be a string, got {type(prompt).__name__}")
    lines = prompt.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        if needed:
            raise RewardInputError("prompt is empty, but a connected reward scores images against their prompt; "
                                   "give one prompt for all images, or one line per image")
        return None
    if len(lines) == 1:
        return [lines[0].strip()] * batch_size
    if len(lines) != batch_size:
        raise RewardInputError(
            f"prompt has {len(lines)} lines but the batch has {batch_size} images; give one line for all images, "
            f"or exactly {batch_size} lines (line i is the prompt of image i)"
        )
    if needed:
        empty = [i for i, line in enumerate(lines) if not line.strip()]
        if empty:
            raise RewardInputError(f"prompt line {empty[0] + 1} (image {empty[0]}) is empty")
    return [line.strip() for line in lines]


@dataclass
class ScoreResult:
    """Everything the scorer returns. ``total``: combined score per image in batch order; ``order``: batch indices
    best first (ties keep batch order)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    normalized: dict[str, torch.Tensor]
    weights: dict[str, float]
    order: list[int]
    top_k: int
    notes: list[str]
    normalization: str

    @property
    def top_indices(self) -> list[int]:
        return self.order[: self.top_k]

    def table(self) -> str:
        labels = list(self.parts)
        head = ["rank", "image"] + labels + ["combined"]
        rows = []
        for rank, i in enumerate(self.order, 1):
            mark = "*" if rank <= self.top_k else ""
            rows.append([f"{rank}{mark}", str(i)] + [f"{float(self.parts[l][i]):.4f}" for l in labels]
                        + [f"{float(self.total[i]):.4f}"])
        widths = [max(len(r[c]) for r in rows + [head]) for c in range(len(head))]
        fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
        formula = " + ".join(f"{self.weights[l]:g}*{'norm(' + l + ')' if self.normalization != 'none' else l}"
                             for l in labels)
        lines = [fmt(head)] + [fmt(r) for r in rows]
        lines.append(f"combined = {formula} (normalisation: {self.normalization}); * = top {self.top_k}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _labelled(models: Sequence[tuple[RewardHandle, float]]) -> list[tuple[str, RewardHandle, float]]:
    out, seen = [], {}
    for handle, weight in models:
        seen[handle.name] = seen.get(handle.name, 0) + 1
        label = handle.name if seen[handle.name] == 1 else f"{handle.name}#{seen[handle.name]}"
        out.append((label, handle, float(weight)))
    return out


def score_images(images: torch.Tensor, prompt: str, models: Sequence[tuple[RewardHandle, float]],
                 normalization: str = "none", top_k: int = 1) -> ScoreResult:
    """Score a ComfyUI IMAGE batch with weighted rewards: ``combined = sum_i w_i * norm_i(reward_i)``.

    ``normalization``: ``"none"``; ``"imagerefl"`` (ImageReFL's ``(r + offset) * scale`` per reward, defined for
    pickscore, hpsv2, hpsv2.1 and imagereward); ``"standardize"`` (each reward's ``(r - mean) / std`` over this
    batch, population std).
    """
    if normalization not in NORMALIZATIONS:
        raise RewardInputError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not models:
        raise RewardInputError("connect at least one REWARD_MODEL")
    for handle, _ in models:
        if not isinstance(handle, RewardHandle):
            raise RewardInputError(f"reward_model inputs must come from the Reward Model Loader, got "
                                   f"{type(handle).__name__}")
    pixels, notes = comfy_images_to_bchw(images)
    batch = pixels.shape[0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise RewardInputError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_k > batch:
        raise RewardInputError(f"top_k = {top_k} is larger than the batch ({batch} images); use top_k <= {batch}")
    labelled = _labelled(models)
    prompts = split_prompts(prompt, batch, needed=any(h.needs_prompts for _, h, _ in labelled))
    spec = None if normalization == "none" else normalization
    try:
        normalizers = {label: make_normalizer(h.name, spec, label=label) for label, h, _ in labelled}
    except ValueError as exc:
        raise RewardInputError(f"{exc}; choose normalization 'none' or 'standardize' for these rewards") from None
    parts = {label: handle.score(pixels, prompts) for label, handle, _ in labelled}
    weights = {label: w for label, _, w in labelled}
    combined = combine_parts(parts, weights, normalizers)
    total = combined.total.float().cpu()
    order = sorted(range(batch), key=lambda i: (-float(total[i]), i))
    return ScoreResult(total=total, parts=combined.parts, normalized=combined.normalized, weights=weights,
                       order=order, top_k=top_k, notes=notes, normalization=normalization)


# ---- nodes --------------------------------------------------------------------------------------------------------
class RDTRewardModelLoader:
    """Load a reward model once and keep it (managed by ComfyUI's model management)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reward": (list(REWARD_NAMES), {"default": "hpsv2.1", "tooltip": "Which reward model."}),
            "weights": (list_reward_weights(), {"tooltip": "A file or folder in models/rewards; 'default' is the "
                                                           "Hugging Face hub source (needs network access)."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip": "auto: bf16/fp16 on GPU, fp32 on CPU. "
                                                                            "Score heads stay fp32."}),
        }}

    RETURN_TYPES = ("REWARD_MODEL",)
    RETURN_NAMES = ("reward_model",)
    FUNCTION = "load"
    CATEGORY = "rdt/reward"
    DESCRIPTION = ("Loads one of the reward models (PickScore, HPSv2, HPSv2.1, ImageReward, LAION aesthetic, CLIP "
                   "score) from models/rewards. Loaded once and reused; ComfyUI offloads it when sampling needs the "
                   "memory.")

    def load(self, reward: str, weights: str, precision: str = "auto", folders: Sequence[Path] | None = None):
        return (load_reward_model(reward, weights, precision, folders=folders),)


class RDTRewardScorer:
    """Per-image reward scores, the batch sorted by score, the top k and a table."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Images to score ([B, H, W, C] in [0, 1]; alpha is ignored)."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "One prompt for all images, or one line per image."}),
                "reward_model": ("REWARD_MODEL",),
                "weight": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "top_k": ("INT", {"default": 1, "min": 1, "max": 4096,
                                  "tooltip": "How many of the best images go to top_k_images (best-of-N)."}),
                "normalization": (list(NORMALIZATIONS), {
                    "default": "none",
                    "tooltip": "none; imagerefl: ImageReFL's offsets and scales (pickscore, hps, imagereward); "
                               "standardize: (r - mean) / std over this batch, per reward."}),
            },
            "optional": {
                "reward_model_2": ("REWARD_MODEL",),
                "weight_2": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "reward_model_3": ("REWARD_MODEL",),
                "weight_3": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            },
        }

    RETURN_TYPES = ("FLOAT", "IMAGE", "IMAGE", "INT", "STRING")
    RETURN_NAMES = ("scores", "sorted_images", "top_k_images", "top_k_indices", "table")
    OUTPUT_IS_LIST = (True, False, False, True, False)
    OUTPUT_TOOLTIPS = ("Combined score per image, in batch order.", "The batch, best first.",
                       "The top_k best images, best first.", "Batch indices of the top_k images, best first.",
                       "Table: rank, image index, each reward, combined score.")
    FUNCTION = "score"
    CATEGORY = "rdt/reward"
    DESCRIPTION = "Scores each image with up to three weighted rewards; sorts the batch and picks the best k."

    def score(self, images, prompt, reward_model, weight=1.0, top_k=1, normalization="none", reward_model_2=None,
              weight_2=1.0, reward_model_3=None, weight_3=1.0):
        models = [(reward_model, weight)]
        models += [(m, w) for m, w in ((reward_model_2, weight_2), (reward_model_3, weight_3)) if m is not None]
        result = score_images(images, prompt, models, normalization=normalization, top_k=top_k)
        order = torch.tensor(result.order, dtype=torch.long)
        sorted_images = images[order.to(images.device)]
        table = result.table()
        return {"ui": {"text": (table,)},
                "result": ([float(s) for s in result.total], sorted_images, sorted_images[:top_k],
                           list(result.top_indices), table)}


def _save_location(prefix: str, output_dir: str | None, width: int, height: int) -> tuple[str, str, int, str]:
    """``(folder, file name stem, first counter, subfolder)`` for saved images: ComfyUI's
    ``folder_paths.get_save_image_path`` (its prefix formatting and counters), or, without ComfyUI, ``output_dir``
    with a counter after the files already there."""
    try:
        import folder_paths
    except ImportError:
        folder_paths = None
    if folder_paths is not None:
        root = output_dir or folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root, width, height)
        return folder, filename, counter, subfolder
    if output_dir is None:
        raise RuntimeError("saving outside ComfyUI needs output_dir")
    rel = Path(prefix)
    folder = Path(output_dir) / rel.parent
    folder.mkdir(parents=True, exist_ok=True)
    taken = [f.name[len(rel.name) + 1:].split("_")[0] for f in folder.glob(f"{rel.name}_*_.png")]
    counter = max([int(t) for t in taken if t.isdigit()], default=0) + 1
    return str(folder), rel.name, counter, rel.parent.as_posix() if rel.parent.parts else ""


class RDTSaveScoredImages:
    """Save images with their rank, batch index and score in the file name and PNG metadata."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save, e.g. the scorer's top_k_images."}),
                "scores": ("FLOAT", {"forceInput": True, "tooltip": "The scorer's scores (batch order)."}),
                "indices": ("INT", {"forceInput": True,
                                    "tooltip": "The scorer's top_k_indices: batch index of each image saved."}),
                "filename_prefix": ("STRING", {"default": "rdt/best"}),
            },
            "optional": {"table": ("STRING", {"forceInput": True, "tooltip": "The scorer's table (saved as PNG "
                                                                            "text 'rdt_scores_table')."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    INPUT_IS_LIST = True
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "rdt/reward"
    DESCRIPTION = ("Saves images as PNG named <prefix>_<counter>_rank<r>_img<i>_score<s>_.png, with the score, rank "
                   "and batch index (and the scorer's table) in the PNG text metadata.")

    def save(self, images, scores, indices, filename_prefix, table=None, prompt=None, extra_pnginfo=None,
             output_dir: str | None = None):
        import numpy as np
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        batches = [b for b in images if isinstance(b, torch.Tensor)]
        if not batches:
            raise RewardInputError("images: no IMAGE given")
        stacked = torch.cat([b if b.dim() == 4 else b[None] for b in batches])
        scores = [float(s) for s in scores]
        indices = [int(i) for i in indices]
        prefix = filename_prefix[0] if isinstance(filename_prefix, list) else filename_prefix
        table_text = table[0] if isinstance(table, list) and table else table
        prompt = prompt[0] if isinstance(prompt, list) and prompt else prompt
        extra_pnginfo = extra_pnginfo[0] if isinstance(extra_pnginfo, list) and extra_pnginfo else extra_pnginfo
        if len(indices) != stacked.shape[0]:
            raise RewardInputError(f"got {stacked.shape[0]} images but {len(indices)} indices; connect the scorer's "
                                   "top_k_images and top_k_indices (or sorted_images with all indices) together")
        bad = [i for i in indices if not 0 <= i < len(scores)]
        if bad:
            raise RewardInputError(f"index {bad[0]} is outside the {len(scores)} scores; connect the same scorer's "
                                   "scores and indices")
        folder, filename, counter, subfolder = _save_location(prefix, output_dir, stacked.shape[2], stacked.shape[1])
        results = []
        for rank, (image, index) in enumerate(zip(stacked, indices), 1):
            arr = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)
            info = PngInfo()
            info.add_text("rdt_score", json.dumps({"score": scores[index], "rank": rank, "batch_index": index}))
            if table_text:
                info.add_text("rdt_scores_table", table_text)
            if prompt is not None:
                info.add_text("prompt", json.dumps(prompt))
            if extra_pnginfo is not None:
                for key, value in extra_pnginfo.items():
                    info.add_text(key, json.dumps(value))
            name = f"{filename}_{counter:05}_rank{rank:02}_img{index}_score{scores[index]:.4f}_.png"
            Image.fromarray(arr).save(os.path.join(folder, name), pnginfo=info, compress_level=4)
            results.append({"filename": name, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results}}


NODE_CLASS_MAPPINGS = {
    "RDTRewardModelLoader": RDTRewardModelLoader,
    "RDTRewardScorer": RDTRewardScorer,
    "RDTSaveScoredImages": RDTSaveScoredImages,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RDTRewardModelLoader": "Reward Model Loader (rdt)",
    "RDTRewardScorer": "Reward Scorer (rdt)",
    "RDTSaveScoredImages": "Save Scored Images (rdt)",
}
