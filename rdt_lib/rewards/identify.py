"""What reward a weights file or folder holds, read from its keys before any hub access.

``identify_reward_file(path) -> (kind, details)`` looks at a file's tensor names (safetensors header, or the
pickle loaded with ``torch.load(weights_only=True, mmap=True)``, which does not read the tensors' data) or at a
directory's ``config.json`` and files. ``check_reward_path(reward, path)`` raises
:class:`~.errors.RewardCheckpointError` at once when the weights belong to another reward, naming what was found
and what ``reward`` expects. :func:`~.registry.load_reward` runs it before its loaders, so a wrong file never
reaches a loader that would fetch missing companion files (``med_config.json``, tokenizers) from the hub.

Kinds:

- ``"hps"``: an open_clip ViT CLIP state dict (``visual.conv1.weight``, ``token_embedding.weight``, ...), the
  format of ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``. ``details["versions"]`` maps the versions told
  by file name or stored metadata (``"hpsv2"``, ``"hpsv2.1"``) to their files; the two releases have the same
  architecture and key names, so a renamed file of unknown version is accepted for either.
- ``"imagereward"``: ``blip.visual_encoder.*`` / ``blip.text_encoder.*`` / ``mlp.layers.*`` (``ImageReward.pt``);
  ``details["med_config"]`` is the ``med_config.json`` beside it or None.
- ``"aesthetic_head"``: a linear MLP ``layers.{0,2,4,6,7}`` (``sac+logos+ava1-l14-linearMSE.pth``).
- ``"aesthetic"``: a directory with the aesthetic head and a transformers CLIP model (in it or in ``clip/``).
- ``"clip"``: a transformers CLIP directory (config.json ``model_type`` clip + weights): PickScore or CLIP score;
  ``details["family"]`` is ``"ViT-H/14"`` / ``"ViT-L/14"`` when the config has those released sizes.
- ``"clip_weights"``: a transformers CLIP weights file without its directory's config.json.
- ``"sd_checkpoint"``, ``"lora"``: diffusion weights, not rewards. ``"unknown"``: none of the above.
- ``"empty"``: a directory without weights (the loaders report the missing files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import RewardCheckpointError, RewardWeightsNotFoundError
from .weights import WEIGHT_SUFFIXES, load_checkpoint

# Known sizes of the released CLIP backbones (vision hidden size, patch size, projection dim).
CLIP_FAMILIES = {
    (1280, 14, 1024): "ViT-H/14",  # yuvalkirstain/PickScore_v1, laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    (1024, 14, 768): "ViT-L/14",  # openai/clip-vit-large-patch14
}

#: What each reward's ``path`` must hold, in words (used in error messages and by the ComfyUI loader node).
EXPECTED: dict[str, str] = {
    "pickscore": "a transformers CLIP ViT-H/14 folder (config.json + model.safetensors, tokenizer files), "
                 "e.g. yuvalkirstain/PickScore_v1",
    "hpsv2": "HPS_v2_compressed.pt (open_clip ViT-H-14 state dict under 'state_dict', from xswu/HPSv2) or a "
             "folder with it",
    "hpsv2.1": "HPS_v2.1_compressed.pt (open_clip ViT-H-14 state dict under 'state_dict', from xswu/HPSv2) or a "
               "folder with it",
    "imagereward": "ImageReward.pt (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) with "
                   "med_config.json beside it, from THUDM/ImageReward",
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth (layers.0..7) or a folder with it and the CLIP ViT-L/14 "
                 "transformers model (openai/clip-vit-large-patch14)",
    "clipscore": "a transformers CLIP ViT-L/14 folder (config.json + model.safetensors, tokenizer files), "
                 "e.g. openai/clip-vit-large-patch14",
}

#: kinds each reward's loader can use (anything else is refused before loading).
_ACCEPTS: dict[str, tuple[str, ...]] = {
    "pickscore": ("clip",),
    "clipscore": ("clip", "aesthetic"),
    "aesthetic": ("aesthetic", "aesthetic_head", "clip"),
    "hpsv2": ("hps",),
    "hpsv2.1": ("hps",),
    "imagereward": ("imagereward",),
}

_HEAD_KEY = re.compile(r"^(?:layers\.)?(\d+)\.(weight|bias)$")
_HPS_V21_NAME = re.compile(r"v2[._-]?1(?!\d)")
_HPS_V2_NAME = re.compile(r"v2(?![._-]?\d)")


def _read_tensor_names(path: Path) -> tuple[list[str], dict]:
    """``(tensor names, metadata)`` of a weights file without loading its tensors' data.

    Metadata: the safetensors header's ``__metadata__``, or a pickle's non-tensor top-level entries (str/int/float).
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys()), dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise RewardCheckpointError(f"cannot read safetensors file {str(path)!r}: {exc}") from exc
    obj = load_checkpoint(path, mmap=True)
    metadata: dict = {}
    state = obj
    if isinstance(obj, Mapping):
        metadata = {str(k): v for k, v in obj.items() if isinstance(v, (str, int, float))}
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping):
        return [], metadata
    names = [str(k) for k, v in state.items() if isinstance(v, torch.Tensor)]
    return names, metadata


def _hps_version(path: Path, metadata: Mapping) -> tuple[str | None, str | None]:
    """``(version, how it was told)`` of an HPS checkpoint: stored metadata first, then the file name."""
    for key in ("hps_version", "version", "name"):
        value = metadata.get(key)
        if not isinstance(value, str) or (key == "name" and "hps" not in value.lower()):
            continue
        if _HPS_V21_NAME.search(value.lower()):
            return "hpsv2.1", f"metadata {key}={value!r}"
        if _HPS_V2_NAME.search(value.lower()):
            return "hpsv2", f"metadata {key}={value!r}"
    name = path.name.lower()
    if "hps" in name:
        if _HPS_V21_NAME.search(name):
            return "hpsv2.1", "file name"
        if _HPS_V2_NAME.search(name):
            return "hpsv2", "file name"
    return None, None


def _classify_names(names: list[str]) -> str:
    keys = {k[len("module."):] if k.startswith("module.") else k for k in names}
    if any(k.startswith("blip.visual_encoder.") or k.startswith("blip.text_encoder.") for k in keys):
        return "imagereward"
    if any(k.startswith("visual.") for k in keys) and ("token_embedding.weight" in keys or "visual.conv1.weight" in keys):
        return "hps"
    if any(k.startswith("model.diffusion_model.") or k.startswith("first_stage_model.") for k in keys):
        return "sd_checkpoint"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k or ".lora_down." in k for k in keys):
        return "lora"
    if any(k.startswith("vision_model.embeddings.") for k in keys) and any(k.startswith("text_model.") for k in keys):
        return "clip_weights"
    if keys and all(_HEAD_KEY.match(k) for k in keys) and {"0.weight", "7.weight"} <= {
        f"{m.group(1)}.{m.group(2)}" for k in keys if (m := _HEAD_KEY.match(k))
    }:
        return "aesthetic_head"
    return "unknown"


def _identify_file(path: Path) -> tuple[str, dict]:
    names, metadata = _read_tensor_names(path)
    kind = _classify_names(names)
    details: dict = {"file": str(path), "keys": sorted(names)[:6], "num_tensors": len(names)}
    if kind == "hps":
        version, how = _hps_version(path, metadata)
        details["version"] = version
        details["version_from"] = how
        details["versions"] = {version: str(path)} if version else {}
    elif kind == "imagereward":
        med = path.parent / "med_config.json"
        details["med_config"] = str(med) if med.is_file() else None
    return kind, details


def _clip_config(directory: Path) -> dict | None:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None


def _has_weights(directory: Path) -> bool:
    return any(p.is_file() and p.suffix in (".safetensors", ".bin") for p in directory.iterdir())


def _identify_clip_dir(directory: Path, cfg: dict) -> tuple[str, dict]:
    vision = cfg.get("vision_config") or {}
    size = (vision.get("hidden_size"), vision.get("patch_size"), cfg.get("projection_dim"))
    details = {"dir": str(directory), "model_type": cfg.get("model_type"), "vision_hidden_size": size[0],
               "patch_size": size[1], "projection_dim": size[2], "family": CLIP_FAMILIES.get(size)}
    return "clip", details


def identify_reward_file(path: str | Path) -> tuple[str, dict]:
    """Identify the reward weights at ``path`` (a file or a folder) from their keys and configs.

    Returns ``(kind, details)``; see the module docstring for the kinds. Only headers and configs are read (no hub
    access, no tensor data for zip-format pickles and safetensors).

    Raises:
        RewardWeightsNotFoundError: ``path`` does not exist.
        RewardCheckpointError: a pickle that needs code to load, or an unreadable file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise RewardWeightsNotFoundError(f"path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix not in WEIGHT_SUFFIXES:
            return "unknown", {"file": str(p), "keys": [], "num_tensors": 0,
                               "note": f"not a weights file (suffix {p.suffix!r}; expected one of {WEIGHT_SUFFIXES})"}
        kind, details = _identify_file(p)
        if kind == "clip_weights":
            cfg = _clip_config(p.parent)
            if cfg is not None and cfg.get("model_type") == "clip":
                return _identify_clip_dir(p.parent, cfg)
        return kind, details

    cfg = _clip_config(p)
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    clip_dir = None
    for cand in (p, p / "clip"):
        c = _clip_config(cand) if cand.is_dir() else None
        if c is not None and c.get("model_type") == "clip" and _has_weights(cand):
            clip_dir = (cand, c)
            break
    if clip_dir is not None:
        pickles = [f for f in files if f.suffix in (".pth", ".pt")]
        heads = [f for f in pickles if _identify_file(f)[0] == "aesthetic_head"]
        kind, details = _identify_clip_dir(*clip_dir)
        if heads:
            details.update(head=str(heads[0]), clip_dir=details.pop("dir"), dir=str(p))
            return "aesthetic", details
        return kind, details
    if cfg is not None and _has_weights(p):
        return "unknown", {"dir": str(p), "model_type": cfg.get("model_type"),
                           "note": f"a transformers {cfg.get('model_type')!r} model folder, not CLIP"}
    if not files:
        return "empty", {"dir": str(p), "files": sorted(f.name for f in p.iterdir())[:10]}
    found = {f: _identify_file(f) for f in files}
    kinds = {k for k, _ in found.values()}
    if len(kinds) == 1:
        kind = kinds.pop()
        first = next(iter(found.values()))[1]
        details = dict(first, dir=str(p), files=[f.name for f in files])
        if kind == "hps":
            details["versions"] = {d["version"]: d["file"] for _, d in found.values() if d.get("version")}
        return kind, details
    return "mixed", {"dir": str(p), "files": {f.name: k for f, (k, _) in found.items()}}


_KIND_WORDS = {
    "hps": "an HPS checkpoint (open_clip ViT CLIP state dict)",
    "imagereward": "an ImageReward checkpoint (BLIP + BERT + MLP)",
    "aesthetic_head": "a LAION aesthetic head (linear MLP layers.0..7)",
    "aesthetic": "a LAION aesthetic folder (head + CLIP model)",
    "clip": "a transformers CLIP folder",
    "clip_weights": "a transformers CLIP weights file without its config.json",
    "sd_checkpoint": "a Stable Diffusion checkpoint (model.diffusion_model.*), not a reward",
    "lora": "a LoRA file, not a reward",
    "unknown": "weights of no known reward",
    "mixed": "a folder with weights of several kinds",
    "empty": "a folder without weights",
}


def describe(kind: str, details: Mapping) -> str:
    """One line saying what :func:`identify_reward_file` found."""
    where = details.get("file") or details.get("dir") or "?"
    text = f"{where!r} holds {_KIND_WORDS.get(kind, kind)}"
    if kind == "hps":
        versions = details.get("versions") or {}
        if versions:
            text += " of version " + " and ".join(sorted(versions)) + f" (told by {details.get('version_from') or 'file names'})"
        else:
            text += " of unknown version (the file name does not say v2 or v2.1)"
    if kind == "clip" and details.get("family"):
        text += f" of {details['family']} size"
    if kind in ("unknown", "mixed"):
        if details.get("note"):
            text += f": {details['note']}"
        elif details.get("files"):
            text += f": {details['files']}"
        else:
            text += f" (keys e.g. {details.get('keys', [])[:4]})"
    return text


def expected_text(reward: str | None = None) -> str:
    """What ``reward`` (or, with None, each reward) expects."""
    if reward is not None:
        return f"reward {reward!r} expects {EXPECTED[reward]}"
    return "; ".join(f"{name}: {text}" for name, text in EXPECTED.items())


def suitable_rewards(kind: str, details: Mapping) -> list[str]:
    """The reward names whose loader accepts weights of this kind (HPS versions and CLIP sizes considered)."""
    return [name for name in EXPECTED if _refusal(name, kind, details) is None]


def _refusal(reward: str, kind: str, details: Mapping) -> str | None:
    if kind == "empty":
        return None  # the loader names the files it needs
    if kind not in _ACCEPTS[reward]:
        return "wrong kind"
    if reward in ("hpsv2", "hpsv2.1"):
        versions = details.get("versions") or {}
        if versions and reward not in versions:
            return f"it is {' and '.join(sorted(versions))}, not {reward}"
    if kind in ("clip", "aesthetic"):
        family = details.get("family")
        want = "ViT-H/14" if reward == "pickscore" else "ViT-L/14"
        if family is not None and family != want:
            return f"its CLIP is {family}, {reward} uses CLIP {want}"
    return None


def check_reward_path(reward: str, path: str | Path) -> tuple[str, dict]:
    """Raise :class:`RewardCheckpointError` unless the weights at ``path`` suit ``reward`` (a registry name).

    Returns ``identify_reward_file(path)``. A folder without weights passes (the loader names what is missing).
    """
    kind, details = identify_reward_file(path)
    why = _refusal(reward, kind, details)
    if why is None:
        return kind, details
    others = [name for name in suitable_rewards(kind, details) if name != reward]
    hint = f" It suits reward {' / '.join(map(repr, others))}." if others else ""
    if why != "wrong kind":
        hint = f" ({why}).{hint}"
    else:
        hint = "." + hint
    expects = expected_text(reward)
    expects = expects[0].upper() + expects[1:] + "."
    if not others:  # fits no reward: say what each one expects
        expects += " Each reward expects: " + expected_text() + "."
    raise RewardCheckpointError(f"weights for reward {reward!r} do not fit: {describe(kind, details)}{hint} {expects}")


__all__ = ["identify_reward_file", "check_reward_path", "describe", "expected_text", "suitable_rewards",
           "EXPECTED", "CLIP_FAMILIES"]
