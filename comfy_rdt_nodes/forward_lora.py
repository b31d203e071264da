"""Forward-time, per-row LoRA on plain torch layers: one weight copy serves the base and the tuned model.

A LoRA patch changes a layer's weight to ``W + scale * up @ down`` (``scale = strength * alpha / rank``).
Linear and convolution layers are linear in their weight, so the patched layer's output is the base output
plus ``scale * up(down(x))``, where ``down`` is a convolution / linear map with the ``down`` matrix (reshaped to
the layer's kernel) and ``up`` a 1x1 (pointwise) map. This module adds that low-rank term at forward time, in a
forward hook, and only to chosen rows of the batch, so one forward pass over ``[base rows, tuned rows]`` gives
the base model's output on the first and the tuned model's on the others, with the weights left untouched.

A term may patch only a slice of the weight's output rows (``out_slice = (start, length)``, ComfyUI's patch offset
``(0, start, length)``): a LoRA on one part of a fused weight, such as the q, k or v part of an MMDiT's fused qkv
projection (ComfyUI's SD3 / Flux LoRA key maps). Its ``up`` has ``length`` rows and its term is added to those
output channels only.

Which rows are tuned is told by a :class:`TunedRows` state shared by the hooks: ``off`` (no LoRA term), ``all``
(every row) or a set of *chunk* indices with the number of chunks in the batch (ComfyUI's ``calc_cond_batch``
concatenates chunks of equal size, one per cond, and lists them in ``transformer_options['cond_or_uncond']``).
A layer whose input has ``R`` rows and a batch of ``n`` chunks gets rows ``[c * R/n, (c + 1) * R/n)`` of each
tuned chunk ``c`` (the batch dimension is chunk-major in every layer of a UNet or DiT).

Torch only; no ComfyUI import.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["LowRankTerm", "TunedRows", "supports_row_lora", "attach_row_loras", "merged_weight", "tuned_chunk_positions"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def supports_row_lora(module: torch.nn.Module) -> bool:
    """Whether a layer takes a per-row low-rank term: ``nn.Linear`` or an ungrouped ``nn.Conv{1,2,3}d``
    with zero padding (ComfyUI's ``comfy.ops`` layers are subclasses of these)."""
    if isinstance(module, torch.nn.Linear):
        return True
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


def _channel_dim(module: torch.nn.Module) -> int:
    """The output-channel dimension of a layer's output: last for ``Linear``, 1 for convolutions."""
    return -1 if isinstance(module, torch.nn.Linear) else 1


@dataclass
class LowRankTerm:
    """``scale * up @ down`` added to one layer's weight (or to the output rows ``out_slice = (start, length)``
    of it); ``up`` is ``[rows, rank, ...]`` and ``down`` ``[rank, in, ...]`` in any shape whose flattened product
    ``up.flatten(1) @ down.flatten(1)`` reshapes to the weight's rows (as ComfyUI's LoRA patches are applied)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    out_slice: tuple[int, int] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def check(self, module: torch.nn.Module, key: str = "") -> None:
        """Raise ``ValueError`` if the term does not fit the layer's weight shape (or its ``out_slice``)."""
        w = module.weight
        up, down = self.up.flatten(1), self.down.flatten(1)
        start, rows = self.out_slice if self.out_slice is not None else (0, w.shape[0])
        if (up.shape[1] != down.shape[0] or up.shape[0] != rows or up.shape[0] * down.shape[1] != w[0].numel() * rows
                or start < 0 or start + rows > w.shape[0]):
            where = f" on output rows {start}..{start + rows - 1}" if self.out_slice is not None else ""
            raise ValueError(
                f"LoRA patch {key or ''} has up {tuple(self.up.shape)} / down {tuple(self.down.shape)}{where}, which "
                f"do not fit the base weight {tuple(w.shape)}"
            )

    def _factors(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        k = (device, dtype)
        got = self._cache.get(k)
        if got is None:
            w_shape = module.weight.shape
            rows, rank = self.up.flatten(1).shape
            down = self.down.reshape(rank, *w_shape[1:]) if not isinstance(module, torch.nn.Linear) \
                else self.down.reshape(rank, -1)
            up = self.up.reshape(rows, rank, *([1] * (len(w_shape) - 2)))
            got = (down.to(device=device, dtype=dtype), (up * self.scale).to(device=device, dtype=dtype))
            self._cache[k] = got
        return got

    def delta(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The term's contribution to the layer's output for input rows ``x`` (to the ``out_slice`` channels
        only, when set: ``length`` channels)."""
        down, up = self._factors(module, x.device, x.dtype)
        if isinstance(module, torch.nn.Linear):
            return F.linear(F.linear(x, down), up)
        conv = _CONV_FNS[down.ndim - 2]
        h = conv(x, down, None, module.stride, module.padding, module.dilation)
        return conv(h, up)


class TunedRows:
    """Which rows of the current forward pass belong to the tuned model (shared by the hooks)."""

    def __init__(self) -> None:
        self.mode = "off"  # "off" | "all" | "chunks"
        self.chunks: tuple[int, ...] = ()
        self.num_chunks = 1
        self._index_cache: dict = {}

    def set_off(self) -> None:
        self.mode = "off"

    def set_all(self) -> None:
        self.mode = "all"

    def set_chunks(self, tuned_chunks: Sequence[int], num_chunks: int) -> None:
        """Tuned rows are the chunks at positions ``tuned_chunks`` of ``num_chunks`` equal chunks."""
        tuned = tuple(sorted(set(int(c) for c in tuned_chunks)))
        if num_chunks < 1 or any(not 0 <= c < num_chunks for c in tuned):
            raise ValueError(f"tuned chunks {tuned} are not positions among {num_chunks} chunks")
        if len(tuned) == num_chunks:
            self.mode = "all"
        elif not tuned:
            self.mode = "off"
        else:
            self.mode, self.chunks, self.num_chunks = "chunks", tuned, num_chunks

    @contextlib.contextmanager
    def scoped(self, setter, *args) -> Iterator[None]:
        """Set the state for a block and restore the previous one afterwards."""
        saved = (self.mode, self.chunks, self.num_chunks)
        setter(*args)
        try:
            yield
        finally:
            self.mode, self.chunks, self.num_chunks = saved

    def row_index(self, rows: int, device: torch.device) -> torch.Tensor | None | slice:
        """Rows of a ``rows``-row layer input that are tuned: ``None`` (none), ``slice(None)`` (all) or an index."""
        if self.mode == "off":
            return None
        if self.mode == "all":
            return slice(None)
        n = self.num_chunks
        if rows % n != 0:
            raise RuntimeError(f"a layer input has {rows} rows, not a multiple of the {n} batched chunks")
        key = (rows, n, self.chunks, device)
        idx = self._index_cache.get(key)
        if idx is None:
            per = rows // n
            idx = torch.cat([torch.arange(c * per, (c + 1) * per) for c in self.chunks]).to(device)
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            self._index_cache[key] = idx
        return idx


def tuned_chunk_positions(cond_or_uncond: Sequence[int], first_tuned: int) -> list[int]:
    """Positions of the tuned chunks in a batch whose chunks are the conds ``cond_or_uncond`` (ComfyUI's list
    of cond indices, in batch order); conds ``first_tuned`` and above are the tuned model's."""
    return [pos for pos, cond in enumerate(cond_or_uncond) if cond >= first_tuned]


def _terms_delta(terms: Sequence[LowRankTerm], module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The sum of the terms' contributions to the layer's whole output for input rows ``x``."""
    d = None
    for t in terms:
        part = t.delta(module, x)
        if t.out_slice is None:
            d = part if d is None else d + part
            continue
        if d is None:
            shape = list(part.shape)
            shape[_channel_dim(module)] = module.weight.shape[0]
            d = part.new_zeros(shape)
        d.narrow(_channel_dim(module), t.out_slice[0], t.out_slice[1]).add_(part)
    return d


def _make_hook(terms: Sequence[LowRankTerm], rows: TunedRows):
    def hook(module, inputs, output):
        sel = rows.row_index(output.shape[0], output.device)
        if sel is None:
            return None
        x = inputs[0]
        if isinstance(sel, slice):
            return output + _terms_delta(terms, module, x).to(output.dtype)
        d = _terms_delta(terms, module, x.index_select(0, sel))
        return output.index_add(0, sel, d.to(output.dtype))

    return hook


@contextlib.contextmanager
def attach_row_loras(layers: Iterable[tuple[torch.nn.Module, Sequence[LowRankTerm]]], rows: TunedRows) -> Iterator[None]:
    """Install the per-row LoRA hooks on the layers for the duration of the block (removed afterwards, also
    on error). Layers keep their weights; the hooks do nothing while ``rows`` is ``off``."""
    handles = []
    try:
        for module, terms in layers:
            if terms:
                handles.append(module.register_forward_hook(_make_hook(list(terms), rows)))
        yield
    finally:
        for h in handles:
            h.remove()


def merged_weight(weight: torch.Tensor, terms: Sequence[LowRankTerm]) -> torch.Tensor:
    """Reference: the weight with every term merged in, ``W + sum(scale * up @ down)`` (float32 math)."""
    out = weight.detach().to(torch.float32).clone()
    for t in terms:
        start, rows = t.out_slice if t.out_slice is not None else (0, weight.shape[0])
        update = (t.up.flatten(1).float() @ t.down.flatten(1).float()).reshape(rows, *weight.shape[1:])
        out[start:start + rows] += t.scale * update
    return out.to(weight.dtype)
