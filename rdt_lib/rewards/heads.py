"""The linear MLP head shared by the LAION aesthetic predictor and ImageReward.

Both use ``Linear(in, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2) Linear(128, 64) Dropout(0.1)
Linear(64, 16) Linear(16, 1)`` without activations, so the released state dicts name the linear layers
``{0, 2, 4, 6, 7}`` (under ``layers.`` for the aesthetic head, ``mlp.layers.`` in ImageReward.pt).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import RewardCheckpointError
from .weights import check_keys

LINEAR_INDICES = (0, 2, 4, 6, 7)
_DROPOUTS = (0.2, 0.2, 0.1)


class LinearMLPHead(nn.Sequential):
    """``widths = [in, 1024, 128, 64, 16, 1]`` for the released heads; dropouts after the first three linears."""

    def __init__(self, widths: list[int]) -> None:
        if len(widths) != 6:
            raise ValueError(f"the head has 5 linear layers (6 widths), got widths {widths}")
        mods: list[nn.Module] = []
        for i in range(5):
            mods.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(_DROPOUTS):
                mods.append(nn.Dropout(_DROPOUTS[i]))
        super().__init__(*mods)


def head_from_state_dict(state_dict: dict[str, torch.Tensor], *, what: str, path: Path) -> LinearMLPHead:
    """Build and load a :class:`LinearMLPHead` from ``{"0.weight": ..., ..., "7.bias": ...}``."""
    try:
        widths = [state_dict["0.weight"].shape[1]] + [state_dict[f"{i}.weight"].shape[0] for i in LINEAR_INDICES]
    except KeyError as exc:
        raise RewardCheckpointError(
            f"checkpoint {str(path)!r} is not a {what}: expected linear layers {{0,2,4,6,7}} with weight and bias "
            f"(got e.g. {sorted(state_dict)[:5]})"
        ) from exc
    head = LinearMLPHead(widths)
    expected = {k: v.shape for k, v in head.state_dict().items()}
    check_keys(expected, state_dict, set(state_dict) - set(expected), what=what, path=path)
    head.load_state_dict(state_dict)
    return head
