"""LoRA weights: conversion between peft and kohya key styles, loading into a UNet, atomic safetensors I/O.

Key styles for one LoRA'd layer, e.g. the UNet module ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``:

- peft (what ``peft.get_peft_model_state_dict(unet, adapter_name=...)`` returns)::

      down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   # [r, in]
      down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   # [out, r]

  The adapter's scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), per module when the
  ``LoraConfig`` has ``rank_pattern`` / ``alpha_pattern``.

- kohya (what ComfyUI's LoraLoader, diffusers' ``load_lora_weights`` and A1111-style tools read)::

      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   # = lora_A
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     # = lora_B
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              # scalar

  i.e. ``lora_unet_`` + the diffusers module path with dots replaced by underscores. The scale is
  ``alpha / rank`` with ``rank = lora_down.shape[0]``. Conversions here keep ``up @ down * scale`` identical,
  so the stored ``alpha`` is ``peft_scale * rank`` (= ``lora_alpha`` for plain LoRA).

Only UNet LoRAs in the diffusers module layout are handled (no text-encoder ``lora_te_`` keys, no LDM-layout
``lora_unet_input_blocks_...`` names, no DoRA / LoCon extras); anything else is rejected with an error that
names the offending keys.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .atomic_io import write_bytes_atomic

__all__ = [
    "KOHYA_UNET_PREFIX",
    "DEFAULT_TARGET_MODULES",
    "PeftLoraLayout",
    "kohya_module_name",
    "peft_state_dict_to_kohya",
    "unet_lora_to_kohya",
    "kohya_to_peft_state_dict",
    "load_kohya_lora_into_unet",
    "kohya_metadata",
    "save_lora_safetensors",
    "load_lora_safetensors",
]

KOHYA_UNET_PREFIX = "lora_unet_"
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

# "<module>.lora_A.weight" or "<module>.lora_A.<adapter>.weight" (adapter names without dots).
_PEFT_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIXES = ("base_model.model.", "unet.")
_KOHYA_KEY = re.compile(r"^(?P<name>lora_unet_[^.]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)$")
_LDM_BLOCK_NAMES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


# --------------------------------------------------------------------------------------------------
# naming helpers


def kohya_module_name(module_path: str) -> str:
    """``"down_blocks.0.attentions.0.proj_in"`` -> ``"lora_unet_down_blocks_0_attentions_0_proj_in"``."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def _strip_peft_prefix(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _match_pattern(patterns: Mapping[str, Any] | None, module_path: str) -> str | None:
    """peft's pattern semantics: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module_path)``."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def _kohya_alpha(module_path: str, actual_rank: int, *, alpha: float, rank: int,
                 alpha_pattern: Mapping[str, float] | None, rank_pattern: Mapping[str, int] | None,
                 use_rslora: bool) -> float:
    """kohya alpha (= peft scale * actual rank) of ``module_path`` under a LoraConfig with these fields."""
    rk = _match_pattern(rank_pattern, module_path)
    r = int(rank_pattern[rk]) if rk is not None else int(rank)
    if actual_rank != r:
        raise ValueError(
            f"module {module_path!r}: lora_A has rank {actual_rank} but the configuration gives rank {r}"
            f" (rank={rank}, rank_pattern={dict(rank_pattern or {})})"
        )
    ak = _match_pattern(alpha_pattern, module_path)
    a = float(alpha_pattern[ak]) if ak is not None else float(alpha)
    # peft scale a / r (rsLoRA: a / sqrt(r)); kohya alpha = scale * r, written to stay exact when possible.
    return a * math.sqrt(r) if use_rslora else a


# --------------------------------------------------------------------------------------------------
# peft -> kohya


def _group_peft_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"A": tensor, "B": tensor}; rejects anything that is not a LoRA A/B weight."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    adapters: set[str] = set()
    for key, value in state_dict.items():
        m = _PEFT_KEY.match(_strip_peft_prefix(key))
        if m is None:
            bad.append(key)
            continue
        if m.group("adapter") is not None:
            adapters.add(m.group("adapter"))
        slot = groups.setdefault(m.group("module"), {})
        if m.group("ab") in slot:
            raise ValueError(f"duplicate LoRA weight for module {m.group('module')!r} (key {key!r})")
        slot[m.group("ab")] = value
    if bad:
        raise ValueError(
            f"{len(bad)} key(s) are not peft LoRA weights '<module>.lora_A.weight' / '<module>.lora_B.weight' "
            f"(DoRA magnitudes, biases, embeddings and modules_to_save cannot be stored in kohya format): "
            f"{bad[:8]}"
        )
    if len(adapters) > 1:
        raise ValueError(f"state dict mixes several adapters {sorted(adapters)}; pass one adapter's weights")
    for module, slot in groups.items():
        missing = {"A", "B"} - set(slot)
        if missing:
            raise ValueError(f"module {module!r} has no lora_{'/'.join(sorted(missing))} weight")
    return groups


def _check_pair(module: str, down: torch.Tensor, up: torch.Tensor) -> int:
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(
            f"module {module!r}: expected 2-D (Linear) or 4-D (Conv2d) LoRA weights, got down {tuple(down.shape)} "
            f"and up {tuple(up.shape)}"
        )
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(
            f"module {module!r}: rank mismatch, lora_down/lora_A has {rank} rows but lora_up/lora_B has "
            f"{up.shape[1]} columns"
        )
    return int(rank)


def _to_kohya(groups: Mapping[str, Mapping[str, torch.Tensor]], alphas: Mapping[str, float],
              dtype: torch.dtype | None, uniform_alpha: bool) -> dict[str, torch.Tensor]:
    """Build kohya tensors from grouped A/B weights and each module's kohya alpha (scale * rank)."""
    common = Counter(alphas.values()).most_common(1)[0][0] if alphas else 1.0
    out: dict[str, torch.Tensor] = {}
    for module in sorted(groups):
        down, up = groups[module]["A"], groups[module]["B"]
        _check_pair(module, down, up)
        alpha = float(alphas[module])
        cast = dtype or down.dtype
        up = up.detach()
        if uniform_alpha and alpha != common:
            # Fold the ratio into lora_up so that every module carries the same alpha: up * alpha / rank ==
            # (up * alpha / common) * common / rank. Loaders that apply one alpha to all modules then agree.
            up = (up.to(torch.float64) * (alpha / common)).to(up.dtype)
            alpha = common
        name = kohya_module_name(module)
        out[f"{name}.lora_down.weight"] = down.detach().to("cpu", cast).contiguous().clone()
        out[f"{name}.lora_up.weight"] = up.to("cpu", cast).contiguous().clone()
        # alpha is kept in float32 whatever the weight dtype: alpha / rank must stay exact.
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def peft_state_dict_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    rank: int,
    alpha_pattern: Mapping[str, float] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    use_rslora: bool = False,
    dtype: torch.dtype | None = None,
    uniform_alpha: bool = True,
) -> dict[str, torch.Tensor]:
    """Convert a peft LoRA state dict of a diffusers UNet to kohya keys.

    Args:
        state_dict: ``get_peft_model_state_dict(unet, adapter_name=...)`` output; keys
            ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``. Keys carrying the adapter name
            (``...lora_A.<adapter>.weight``, as in ``unet.state_dict()``) and a leading ``unet.`` or
            ``base_model.model.`` are accepted too.
        alpha, rank: the LoraConfig's ``lora_alpha`` and ``r`` (scale = alpha / rank).
        alpha_pattern, rank_pattern: the LoraConfig's per-module overrides (peft's regex-suffix semantics).
        use_rslora: the LoraConfig's ``use_rslora`` (scale = alpha / sqrt(rank)).
        dtype: cast the up/down weights (e.g. ``torch.float16``); None keeps their dtype. ``.alpha`` is float32.
        uniform_alpha: when modules end up with different kohya alphas (alpha_pattern, or rsLoRA with a
            rank_pattern), store the most common alpha everywhere and fold the ratio into ``lora_up``. The
            product ``up @ down * alpha / rank`` is unchanged. Needed for diffusers 0.42, whose kohya loader
            applies a single ``lora_alpha`` to every module (per-module alphas are keyed under names that
            match no module). False stores each module's own alpha.

    Returns:
        ``{lora_unet_<path>.lora_down.weight, ...lora_up.weight, ...alpha}`` (CPU, contiguous, new tensors)
        with kohya's ``alpha / rank`` equal to peft's scale for every module.

    Raises:
        ValueError: a key is not a LoRA A/B weight, A or B is missing, shapes are inconsistent, or a module's
            actual rank differs from the configured one.
    """
    groups = _group_peft_state_dict(state_dict)
    alphas = {
        module: _kohya_alpha(module, int(slot["A"].shape[0]), alpha=alpha, rank=rank, alpha_pattern=alpha_pattern,
                             rank_pattern=rank_pattern, use_rslora=use_rslora)
        for module, slot in groups.items()
    }
    return _to_kohya(groups, alphas, dtype, uniform_alpha)


def unet_lora_to_kohya(
    unet: torch.nn.Module,
    adapter_name: str = "default",
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    uniform_alpha: bool = True,
) -> dict[str, torch.Tensor]:
    """Kohya tensors of one peft adapter on ``unet``, each module's scale read from the layer itself.

    Reading ``layer.scaling[adapter_name]`` covers rank/alpha patterns and rsLoRA without re-deriving them
    (note: a scale changed with ``unet.set_adapters(..., weights)`` / ``scale_layer`` is exported too).

    Args:
        unet: a module carrying the adapter (``unet.add_adapter(...)`` or a PeftModel).
        adapter_name: the adapter to export.
        state_dict: weights to export in place of the adapter's current ones, same keys as
            ``get_peft_model_state_dict(unet, adapter_name=adapter_name)`` (e.g. EMA weights).
        dtype: optional cast of the up/down weights.
        uniform_alpha: see :func:`peft_state_dict_to_kohya`.
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    if state_dict is None:
        state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    groups = _group_peft_state_dict(state_dict)
    alphas: dict[str, float] = {}
    modules = dict(unet.named_modules())
    for module, slot in groups.items():
        layer = modules.get(module)
        if layer is None:
            layer = modules.get("base_model.model." + module)
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.scaling:
            raise ValueError(f"module {module!r} of the state dict has no LoRA adapter {adapter_name!r} on the model")
        actual_rank = int(slot["A"].shape[0])
        scale = float(layer.scaling[adapter_name])
        lora_alpha = float(layer.lora_alpha[adapter_name])
        r = int(layer.r[adapter_name])
        if r == actual_rank and scale == lora_alpha / r:
            alphas[module] = lora_alpha  # exact, no round trip through the division
        else:
            alphas[module] = scale * actual_rank
    return _to_kohya(groups, alphas, dtype, uniform_alpha)


# --------------------------------------------------------------------------------------------------
# kohya -> peft


@dataclass
class PeftLoraLayout:
    """A LoRA in peft form, as converted from kohya tensors.

    Attributes:
        state_dict: ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (no adapter name), for
            ``peft.set_peft_model_state_dict``.
        ranks: module path -> rank (rows of lora_A).
        alphas: module path -> ``lora_alpha`` (scale = alpha / rank; kohya's default alpha = rank when absent).
    """

    state_dict: dict[str, torch.Tensor]
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The most common rank (LoraConfig ``r``)."""
        return Counter(self.ranks.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        """The most common alpha (LoraConfig ``lora_alpha``)."""
        return Counter(self.alphas.values()).most_common(1)[0][0]

    @property
    def rank_pattern(self) -> dict[str, int]:
        """Escaped full module paths whose rank differs from :attr:`rank`."""
        r = self.rank
        return {re.escape(m): v for m, v in sorted(self.ranks.items()) if v != r}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """Escaped full module paths whose alpha differs from :attr:`alpha`."""
        a = self.alpha
        return {re.escape(m): v for m, v in sorted(self.alphas.items()) if v != a}

    def scale_kwargs(self) -> dict[str, Any]:
        """``alpha``, ``rank``, ``alpha_pattern``, ``rank_pattern`` for :func:`peft_state_dict_to_kohya`."""
        return dict(alpha=self.alpha, rank=self.rank, alpha_pattern=self.alpha_pattern, rank_pattern=self.rank_pattern)

    def lora_config(self, **overrides: Any):
        """A ``peft.LoraConfig`` targeting exactly these modules with these ranks and alphas."""
        from peft import LoraConfig

        kwargs: dict[str, Any] = dict(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=sorted(self.ranks),
            rank_pattern=self.rank_pattern,
            alpha_pattern=self.alpha_pattern,
        )
        kwargs.update(overrides)
        return LoraConfig(**kwargs)


def _module_lookup(module_names: Iterable[str]) -> dict[str, str]:
    lookup: dict[str, str] = {}
    for path in module_names:
        if not path:
            continue
        underscored = path.replace(".", "_")
        other = lookup.get(underscored)
        if other is not None and other != path:
            raise ValueError(f"module paths {other!r} and {path!r} have the same kohya name {underscored!r}")
        lookup[underscored] = path
    return lookup


def kohya_to_peft_state_dict(tensors: Mapping[str, torch.Tensor], module_names: Iterable[str]) -> PeftLoraLayout:
    """Convert kohya UNet LoRA tensors to peft keys.

    Kohya names replace every dot by an underscore, which is ambiguous (``to_out_0`` vs ``to.out.0``), so the
    valid module paths are needed: ``[name for name, _ in unet.named_modules()]``.

    Args:
        tensors: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / optional ``.alpha``.
        module_names: dotted module paths of the target model.

    Returns:
        :class:`PeftLoraLayout` with peft keys and per-module ranks/alphas (alpha defaults to the rank).

    Raises:
        ValueError: keys that are not kohya UNet LoRA keys (text encoder, LDM layout, DoRA, ...), a down
            without an up weight (or the reverse), or names that match no module (with close matches).
    """
    lookup = _module_lookup(module_names)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for key, value in tensors.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            bad.append(key)
            continue
        groups.setdefault(m.group("name"), {})[m.group("kind")] = value
    if bad:
        hint = ""
        if any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in bad):
            hint = " Text-encoder LoRA keys (lora_te*) are not supported."
        raise ValueError(
            f"{len(bad)} key(s) are not kohya UNet LoRA keys 'lora_unet_<module>.lora_down.weight' / "
            f"'.lora_up.weight' / '.alpha': {sorted(bad)[:8]}.{hint}"
        )

    unmatched: list[str] = []
    layout = PeftLoraLayout(state_dict={})
    for name in sorted(groups):
        slot = groups[name]
        if "lora_down.weight" not in slot or "lora_up.weight" not in slot:
            raise ValueError(f"kohya LoRA {name!r} needs both lora_down.weight and lora_up.weight, has {sorted(slot)}")
        path = lookup.get(name[len(KOHYA_UNET_PREFIX):])
        if path is None:
            unmatched.append(name)
            continue
        down, up = slot["lora_down.weight"], slot["lora_up.weight"]
        rank = _check_pair(path, down, up)
        alpha = float(slot["alpha"].item()) if "alpha" in slot else float(rank)
        layout.state_dict[f"{path}.lora_A.weight"] = down
        layout.state_dict[f"{path}.lora_B.weight"] = up
        layout.ranks[path] = rank
        layout.alphas[path] = alpha
    if unmatched:
        lines = []
        candidates = [KOHYA_UNET_PREFIX + k for k in lookup]
        for name in unmatched[:8]:
            close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.8)
            lines.append(f"  {name}" + (f"  (closest module: {close[0]})" if close else ""))
        more = f"\n  ... and {len(unmatched) - 8} more" if len(unmatched) > 8 else ""
        ldm = ""
        if any(n.startswith(_LDM_BLOCK_NAMES) for n in unmatched):
            ldm = ("\nThese look like LDM-layout names (input_blocks/middle_block/output_blocks); only the diffusers "
                   "layout (down_blocks/mid_block/up_blocks) is supported here.")
        raise ValueError(
            f"{len(unmatched)} kohya LoRA module(s) match no module of the model:\n" + "\n".join(lines) + more + ldm
        )
    if not layout.state_dict:
        raise ValueError("no LoRA weights found (empty tensor dict)")
    return layout


def load_kohya_lora_into_unet(
    unet: torch.nn.Module,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    **lora_config_overrides: Any,
):
    """Add a kohya-format LoRA (file or tensor dict) to a diffusers UNet as a peft adapter.

    Uses diffusers' ``unet.add_adapter`` (PeftAdapterMixin), which also makes ``adapter_name`` the active
    adapter (switch with ``unet.set_adapter`` / ``unet.disable_adapters()``); modules without
    ``add_adapter`` get ``peft.inject_adapter_in_model``. The weights are copied into the UNet's dtype and
    device.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any module with ``add_adapter``).
        source: path of a ``.safetensors`` file, or the tensors themselves.
        adapter_name: name of the new adapter; must not exist yet.
        lora_config_overrides: extra ``LoraConfig`` fields (e.g. ``lora_dropout``).

    Returns:
        The ``LoraConfig`` used.

    Raises:
        ValueError: keys that match no module (see :func:`kohya_to_peft_state_dict`), modules that are not
            Linear/Conv2d, or an existing adapter of that name.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    tensors = load_lora_safetensors(source)[0] if isinstance(source, (str, os.PathLike)) else dict(source)
    existing = set(getattr(unet, "peft_config", None) or {})
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            existing |= set(module.lora_A.keys())
    if adapter_name in existing:
        raise ValueError(f"the UNet already has an adapter named {adapter_name!r}; pick another adapter_name")
    modules = dict(unet.named_modules())
    layout = kohya_to_peft_state_dict(tensors, modules.keys())
    for path in layout.ranks:
        mod = modules[path]
        base = getattr(mod, "base_layer", mod)
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            raise ValueError(f"kohya LoRA targets {path!r}, a {type(base).__name__}; only Linear and Conv2d are supported")
    config = layout.lora_config(**lora_config_overrides)
    if hasattr(unet, "add_adapter"):  # diffusers models: registers the config and activates the adapter
        unet.add_adapter(config, adapter_name=adapter_name)
    else:  # any torch module
        inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    result = set_peft_model_state_dict(unet, layout.state_dict, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if f".{adapter_name}." in k and "lora_" in k]
    if unexpected or missing:
        raise RuntimeError(f"LoRA weights did not load cleanly: unexpected {unexpected[:5]}, missing {missing[:5]}")
    return config


# --------------------------------------------------------------------------------------------------
# metadata and files


def kohya_metadata(*, rank: int, alpha: float, base_model_version: str = "sd_v1",
                   extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """kohya-style ``ss_*`` metadata (read by A1111-style tools and model sites) plus ``extra`` as strings.

    Args:
        rank, alpha: network dim and alpha (most common ones when they vary).
        base_model_version: e.g. ``"sd_v1"`` or ``"sdxl_base_v1-0"`` (kohya's spellings).
        extra: further entries; values are converted with ``str`` (pass JSON strings for structures).
    """
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": repr(float(alpha)),
        "ss_base_model_version": base_model_version,
    }
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else str(value)
    return meta


def save_lora_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (+ string ``metadata``) to a safetensors file atomically.

    The bytes go to a temporary file in the same directory, which is fsynced and then ``os.replace``d onto
    ``path`` (and the directory fsynced): a crash or a full disk leaves either the old file or the new one,
    never a truncated file. The parent directory is created if needed.

    Raises:
        TypeError: a metadata key or value is not a ``str`` (safetensors metadata is str -> str).
    """
    from safetensors.torch import save as st_save

    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; entry {key!r}: {type(value).__name__} {value!r}")
    # clone: safetensors refuses tensors that share storage; LoRA files are small
    data = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=meta or None)
    return write_bytes_atomic(path, data)


def load_lora_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file into CPU tensors and its metadata (empty dict when there is none)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        metadata = dict(fh.metadata() or {})
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    return tensors, metadata
