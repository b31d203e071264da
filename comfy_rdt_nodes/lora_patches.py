"""How a tuned MODEL that is the base MODEL plus LoRA patches is run from the base's one weight copy.

ComfyUI's ``ModelPatcher.patches`` maps a weight key (``"diffusion_model.<module path>.weight"``) to a list of
entries ``(strength_patch, patch, strength_model, offset, function)``; ``patch`` is a
``comfy.weight_adapter`` adapter (a LoRA adapter has ``name == "lora"`` and ``weights = (up, down, alpha, mid,
dora_scale, reshape)``) or an older tuple such as ``("diff", (tensor,))``. A clone of a patcher copies the
lists, so the tuned model's list for a key starts with the very entries of the base's list; the entries after
them are the tuned model's own patches (:func:`extra_patches`).

:func:`plan_forward_patches` decides how to apply them at forward time:

- ``"rows"``: every extra patch is a plain LoRA (no DoRA, Tucker mid, reshape, function, strength_model; an
  offset only on the output rows, ``(0, start, length)``, as ComfyUI's SD3 / Flux key maps put the q / k / v LoRAs
  on slices of the fused qkv weights) on a Linear or ungrouped convolution weight: per-row low-rank terms
  (:mod:`comfy_rdt_nodes.forward_lora`), so base and tuned rows run in one batched forward pass;
- ``"weights"``: anything else (LoHa, LoKr, full diffs, norm weights, biases): a weight function that applies
  the patches to the weight on each forward while the tuned model is evaluated (two passes where both models
  are needed).

Torch only; no ComfyUI import (patch adapters are recognised by their attributes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .forward_lora import LowRankTerm, supports_row_lora

__all__ = ["extra_patches", "low_rank_term", "ForwardPatchPlan", "plan_forward_patches", "get_submodule"]


def extra_patches(base_patches: Mapping[str, Sequence[Any]], tuned_patches: Mapping[str, Sequence[Any]]) -> dict[str, list]:
    """The tuned model's patches beyond the base model's, per key.

    Raises ``ValueError`` when the tuned model is not the base plus patches (a base patch is missing or
    different in the tuned model).
    """
    for key, base_list in base_patches.items():
        tuned_list = tuned_patches.get(key, [])
        if len(tuned_list) < len(base_list) or any(a is not b for a, b in zip(base_list, tuned_list)):
            raise ValueError(
                f"the tuned MODEL shares the base MODEL's weights but not its patches (key {key}): connect the base "
                "MODEL to the LoRA loader that makes the tuned model, so the tuned model is the base plus patches"
            )
    out: dict[str, list] = {}
    for key, tuned_list in tuned_patches.items():
        extra = list(tuned_list[len(base_patches.get(key, [])):])
        if extra:
            out[key] = extra
    return out


def _lora_weights(patch: Any):
    if getattr(patch, "name", None) == "lora" and isinstance(getattr(patch, "weights", None), (tuple, list)):
        return patch.weights
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        return patch[1]
    return None


def _row_slice(offset: Any) -> tuple[int, int] | None | bool:
    """ComfyUI's patch offset ``(dim, start, length)`` as output rows ``(start, length)``; ``None`` for no
    offset, ``False`` for an offset on another dimension."""
    if offset is None:
        return None
    if len(offset) == 3 and int(offset[0]) == 0:
        return int(offset[1]), int(offset[2])
    return False


def low_rank_term(entry: Sequence[Any]) -> LowRankTerm | None:
    """The low-rank term of one patch entry if it is a plain LoRA (on the whole weight or, with an offset
    ``(0, start, length)``, on its output rows ``start .. start + length - 1``), else ``None``."""
    strength, patch, strength_model, offset, function = tuple(entry)[:5]
    out_slice = _row_slice(offset)
    if strength_model != 1.0 or out_slice is False or function is not None:
        return None
    weights = _lora_weights(patch)
    if weights is None or len(weights) < 2:
        return None
    up, down = weights[0], weights[1]
    alpha = weights[2] if len(weights) > 2 else None
    if any(w is not None for w in tuple(weights[3:6])):  # Tucker mid, DoRA scale, reshape
        return None
    if not (torch.is_tensor(up) and torch.is_tensor(down)) or up.ndim < 2 or down.ndim < 2:
        return None
    rank = down.shape[0]
    scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
    return LowRankTerm(up=up, down=down, scale=scale, out_slice=out_slice)


def get_submodule(model: torch.nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class ForwardPatchPlan:
    """``mode`` is ``"rows"`` (``layers``: ``(module, [terms])``) or ``"weights"`` (``patches``: key -> entries)."""

    mode: str
    layers: list = field(default_factory=list)
    patches: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.layers and not self.patches


def _check_shapes(model: torch.nn.Module, key: str, entries: Sequence[Any]) -> None:
    try:
        weight = get_submodule(model, key)
    except AttributeError:
        raise ValueError(f"the tuned MODEL patches {key}, which the base model does not have (another architecture?)") from None
    if not torch.is_tensor(weight):
        raise ValueError(f"the tuned MODEL patches {key}, which is not a weight of the base model")
    for entry in entries:
        patch = entry[1]
        lw = _lora_weights(patch)
        reshape = lw[5] if lw is not None and len(lw) > 5 else None
        rows = _row_slice(entry[3])
        if lw is not None and rows is not False and reshape is None:
            up, down = lw[0].flatten(1), lw[1].flatten(1)
            start, length = rows if rows is not None else (0, weight.shape[0])
            if (up.shape[0] * down.shape[1] != weight[0].numel() * length or up.shape[1] != down.shape[0]
                    or start + length > weight.shape[0]):
                where = f" on output rows {start}..{start + length - 1}" if rows is not None else ""
                raise ValueError(
                    f"the tuned MODEL's LoRA for {key} has up {tuple(lw[0].shape)} / down {tuple(lw[1].shape)}{where}, "
                    f"which do not fit the base weight {tuple(weight.shape)}: the LoRA is for another architecture"
                )
        elif isinstance(patch, tuple) and len(patch) in (1, 2):
            diff = patch[0] if len(patch) == 1 else (patch[1][0] if patch[0] == "diff" else None)
            if torch.is_tensor(diff) and diff.shape != weight.shape and entry[3] is None:
                raise ValueError(
                    f"the tuned MODEL's weight diff for {key} has shape {tuple(diff.shape)}, the base weight "
                    f"{tuple(weight.shape)}: it is for another architecture"
                )


def plan_forward_patches(model: torch.nn.Module, extra: Mapping[str, Sequence[Any]]) -> ForwardPatchPlan:
    """Decide how the extra patches are applied at forward time on ``model`` (the base's network, the object
    the keys are relative to, e.g. ComfyUI's ``BaseModel``). Raises ``ValueError`` for patches that do not fit
    the model (another architecture)."""
    for key, entries in extra.items():
        _check_shapes(model, key, entries)
    layers = []
    for key, entries in extra.items():
        module_path, _, param = key.rpartition(".")
        module = get_submodule(model, module_path) if module_path else None
        terms = [low_rank_term(e) for e in entries]
        if param != "weight" or module is None or not supports_row_lora(module) or any(t is None for t in terms):
            return ForwardPatchPlan(mode="weights", patches={k: list(v) for k, v in extra.items()})
        for t in terms:
            t.check(module, key)
        layers.append((module, terms))
    return ForwardPatchPlan(mode="rows", layers=layers)
