"""Locating, downloading and safely loading reward weights.

- Hub downloads go through ``huggingface_hub`` (its cache, ``HF_HOME``, ``HF_HUB_OFFLINE`` and tokens apply).
- ``.pt``/``.pth``/``.bin`` pickles are read with ``torch.load(weights_only=True)``: a pickle that needs code to
  load is refused, never executed. ``.safetensors`` files are preferred where both exist.
- When weights are missing, :class:`RewardWeightsNotFoundError` names the hub repo, the file and how to pass a
  local copy with ``load_reward(name, path=...)``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .errors import RewardCheckpointError, RewardWeightsNotFoundError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")


def _download_hint(reward: str, repo_id: str, filename: str | None) -> str:
    what = f"{repo_id} {filename}" if filename else repo_id
    return (
        f"Fetch it on a machine that can reach the Hub, e.g. `hf download {what} --local-dir DIR` "
        f"(or copy it into DIR by hand), then call load_reward({reward!r}, path='DIR')."
    )


def hub_file(repo_id: str, filename: str, *, reward: str) -> Path:
    """Path of ``filename`` from hub repo ``repo_id`` (cache first, download if allowed)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as exc:  # offline, no such file, auth, network: all end the same way for the user
        raise RewardWeightsNotFoundError(
            f"Weights for reward {reward!r} not found: file {filename!r} of Hugging Face repo {repo_id!r} is not in "
            f"the local cache and could not be downloaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            + _download_hint(reward, repo_id, filename)
        ) from exc


def hub_snapshot(repo_id: str, allow_patterns: list[str], *, reward: str, what: str) -> Path:
    """Local directory with the files of ``repo_id`` matching ``allow_patterns`` (cache first, then download)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns))
    except Exception as exc:
        raise RewardWeightsNotFoundError(
            f"{what} for reward {reward!r} not found: Hugging Face repo {repo_id!r} (files {allow_patterns}) is "
            f"not in the local cache and could not be downloaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). " + _download_hint(reward, repo_id, None)
        ) from exc


def hub_hf_model_dir(repo_id: str, *, reward: str) -> Path:
    """Snapshot of a transformers model repo: configs, tokenizer files and one copy of the weights."""
    patterns = ["*.json", "*.txt"]
    directory = hub_snapshot(repo_id, patterns + ["*.safetensors"], reward=reward, what="Model weights")
    if not any(directory.glob("*.safetensors")):  # older repos only have pytorch_model.bin
        directory = hub_snapshot(repo_id, patterns + ["pytorch_model.bin"], reward=reward, what="Model weights")
    return directory


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def has_hf_model(directory: Path) -> bool:
    """A transformers model directory: config.json plus a weights file."""
    return (directory / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in directory.iterdir() if p.is_file()
    )


def existing_path(path: str | os.PathLike, reward: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise RewardWeightsNotFoundError(
            f"path {str(p)!r} given for reward {reward!r} does not exist; pass a directory or file with its weights"
        )
    return p


def find_weight_file(path: Path, *, reward: str, preferred: Iterable[str], repo_id: str | None = None) -> Path:
    """The checkpoint file at ``path``: the file itself, or in a directory one of ``preferred`` names, else the
    only weights file there."""
    if path.is_file():
        return path
    preferred = list(preferred)
    for name in preferred:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    where = f" (from Hugging Face repo {repo_id!r})" if repo_id else ""
    found = ", ".join(p.name for p in candidates) or "no weight files"
    raise RewardWeightsNotFoundError(
        f"directory {str(path)!r} for reward {reward!r} should contain {' or '.join(map(repr, preferred))}{where}; "
        f"found {found}. Put the checkpoint there or pass the file itself as path="
    )


def load_checkpoint(path: Path, *, mmap: bool = False) -> dict:
    """Load a checkpoint without executing code: safetensors, or a pickle through ``weights_only=True``.

    ``mmap``: memory-map a (zip) pickle so its tensors' data is read only when touched (legacy non-zip pickles
    cannot be mapped and are read whole).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        if mmap:
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RewardCheckpointError(
            f"refusing to load {str(path)!r}: the pickle needs code execution to load (only tensors, dicts, lists "
            "and numbers are accepted with torch.load(weights_only=True)). Re-save its state_dict as safetensors "
            f"from a trusted environment. Detail: {str(exc).splitlines()[0][:300]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise RewardCheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc


def require_keys(state_dict: Mapping, keys: Iterable[str], *, path: Path, what: str) -> None:
    """Raise :class:`RewardCheckpointError` unless ``state_dict`` has every key in ``keys``."""
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise RewardCheckpointError(
            f"checkpoint {str(path)!r} is not {what}: missing {missing[:4]} (found e.g. {sorted(state_dict)[:4]})"
        )


def extract_state_dict(obj: object, path: Path, nested_keys: Iterable[str] = ("state_dict", "model")) -> dict:
    """The ``{name: tensor}`` mapping in a loaded checkpoint, looking inside ``state_dict``/``model`` keys."""
    if isinstance(obj, Mapping):
        for key in nested_keys:
            if isinstance(obj.get(key), Mapping):
                return extract_state_dict(obj[key], path, ())
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise RewardCheckpointError(
        f"checkpoint {str(path)!r} holds no state dict (expected a mapping of parameter names to tensors, "
        f"possibly under one of the keys {list(nested_keys)}); got {type(obj).__name__}"
    )


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Remove ``prefix`` (e.g. DDP's "module.") when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def check_keys(expected: Mapping[str, torch.Size], mapped: Mapping[str, torch.Tensor], unused: Iterable[str],
               *, what: str, path: Path) -> None:
    """Raise :class:`RewardCheckpointError` when mapped keys or shapes do not match the architecture."""
    missing = sorted(set(expected) - set(mapped))
    unused = sorted(unused)
    shape_bad = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in mapped and tuple(mapped[k].shape) != tuple(expected[k])
    ]
    if missing or unused or shape_bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unused:
            parts.append(f"{len(unused)} unexpected (e.g. {unused[:4]})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} with wrong shapes (e.g. {shape_bad[:3]})")
        raise RewardCheckpointError(
            f"checkpoint {str(path)!r} does not match the {what} architecture: " + "; ".join(parts) + "."
        )


def materialise_position_ids(model: torch.nn.Module) -> None:
    """Fill the ``position_ids`` buffers that stay on the meta device after building a transformers model under
    ``torch.device("meta")`` and loading its parameters with ``assign=True`` (they are not in checkpoints)."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"buffer {name!r} of {type(module).__name__} was not loaded")
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()


def count_indexed(state_dict: Mapping[str, object], pattern: str) -> int:
    """Number of numbered blocks: 1 + the largest ``N`` captured by ``pattern`` (a regex with one group)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state_dict if (m := rx.match(k))}
    return max(found) + 1 if found else 0
