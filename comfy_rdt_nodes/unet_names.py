"""Module names of a Stable Diffusion UNet in ComfyUI's (original LDM) layout and in diffusers' layout.

Pure string functions (no ComfyUI, no torch): the reward-LoRA trainer names its LoRA layers the way diffusers
names the UNet's modules, so the file it writes has the kohya keys ``lora_unet_<diffusers path with
underscores>`` that ComfyUI's LoraLoader, diffusers' ``load_lora_weights`` and :mod:`rdt_lib.lora_io` all read,
and the initial LoRA is drawn in the same module order as the headless trainer's (peft initialises the layers in
``named_modules()`` order).

LDM layout (ComfyUI's ``diffusion_model``), derived from the weight names alone so any block count works:

- ``input_blocks.0`` is ``conv_in``; then per down level ``num_res_blocks`` entries ``input_blocks.n.{0: resnet,
  1: transformer}`` and, except after the last level, one ``input_blocks.n.0.op`` downsampler.
- ``middle_block.1`` is the mid-block transformer.
- per up level ``num_res_blocks + 1`` entries ``output_blocks.n.{0: resnet, 1: transformer}``; the last entry
  of every level but the last carries an upsampler (``output_blocks.n.1.conv`` or ``.2.conv``).

Inside a transformer both layouts agree: ``transformer_blocks.k.attn{1,2}.{to_q,to_k,to_v,to_out.0}``.
"""

from __future__ import annotations

import re
from typing import Iterable

__all__ = ["LORA_TARGETS", "ldm_block_map", "attention_lora_targets", "diffusers_sort_key"]

LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections the reward LoRA trains (SPEC section 2)."""

_INPUT = re.compile(r"^input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.")
_TARGET = re.compile(
    r"^(?P<block>input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
    r"\.(?P<rest>transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))$"
)


def ldm_block_map(names: Iterable[str]) -> dict[str, str]:
    """LDM transformer-block prefix -> diffusers prefix, e.g. ``input_blocks.1.1`` -> ``down_blocks.0.attentions.0``.

    Args:
        names: the UNet's weight or module names in the LDM layout, without the ``diffusion_model.`` prefix
            (e.g. ``input_blocks.1.1.proj_in.weight``).

    Returns:
        One entry per transformer block (``input_blocks.n.1``, ``middle_block.1``, ``output_blocks.n.1`` that hold
        ``transformer_blocks``).
    """
    names = list(names)
    joined = set(names)

    def has_prefix(prefix: str) -> bool:
        return any(n == prefix or n.startswith(prefix + ".") for n in joined)

    out: dict[str, str] = {}
    inputs = sorted({int(m.group(1)) for n in names if (m := _INPUT.match(n))})
    level, j = 0, 0
    for n in inputs:
        if n == 0:
            continue  # conv_in
        if has_prefix(f"input_blocks.{n}.0.op"):  # downsampler: the level ends here
            level, j = level + 1, 0
            continue
        if has_prefix(f"input_blocks.{n}.1.transformer_blocks"):
            out[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{j}"
        j += 1
    if has_prefix("middle_block.1.transformer_blocks"):
        out["middle_block.1"] = "mid_block.attentions.0"
    outputs = sorted({int(m.group(1)) for n in names if (m := _OUTPUT.match(n))})
    level, j = 0, 0
    for n in outputs:
        if has_prefix(f"output_blocks.{n}.1.transformer_blocks"):
            out[f"output_blocks.{n}.1"] = f"up_blocks.{level}.attentions.{j}"
        if has_prefix(f"output_blocks.{n}.1.conv") or has_prefix(f"output_blocks.{n}.2.conv"):  # upsampler
            level, j = level + 1, 0
        else:
            j += 1
    return out


_SECTION = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # diffusers' UNet2DConditionModel registration order
_LEAF = {"to_q": 0, "to_k": 1, "to_v": 2, "to_out.0": 3}


def diffusers_sort_key(path: str) -> tuple:
    """Sort key giving diffusers' ``named_modules()`` order of attention projections
    (``down_blocks``, ``up_blocks``, then ``mid_block``; numeric indices; ``attn1`` before ``attn2``;
    ``to_q, to_k, to_v, to_out.0``)."""
    section = path.split(".", 1)[0]
    leaf = "to_out.0" if path.endswith(".to_out.0") else path.rsplit(".", 1)[-1]
    numbers = tuple(int(x) for x in re.findall(r"(?<=\.)\d+(?=\.|$)", path[: len(path) - len(leaf)]))
    attn = 1 if ".attn2." in path else 0
    return (_SECTION.get(section, 9), numbers, attn, _LEAF.get(leaf, 9))


def attention_lora_targets(names: Iterable[str], targets: Iterable[str] = LORA_TARGETS) -> list[tuple[str, str]]:
    """The attention projections to put a LoRA on: ``(ldm module path, diffusers module path)`` pairs in
    diffusers' module order.

    Args:
        names: LDM weight or module names of the UNet (no ``diffusion_model.`` prefix); weight names
            (``....to_q.weight``) are reduced to their module path.
        targets: leaf names among :data:`LORA_TARGETS`.

    Raises:
        ValueError: a target that is not an attention projection, or a UNet without transformer blocks.
    """
    targets = tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"LoRA target modules {bad} are not supported on a ComfyUI UNet; accepted: "
                         f"{', '.join(LORA_TARGETS)}")
    names = list(names)
    blocks = ldm_block_map(names)
    modules = {n[: -len(".weight")] if n.endswith(".weight") else n for n in names}
    pairs = []
    for path in modules:
        m = _TARGET.match(path)
        if m is None:
            continue
        leaf = "to_out.0" if path.endswith(".to_out.0") else path.rsplit(".", 1)[-1]
        if leaf not in targets or m.group("block") not in blocks:
            continue
        pairs.append((path, f"{blocks[m.group('block')]}.{m.group('rest')}"))
    if not pairs:
        raise ValueError("the UNet has no attention projections (transformer_blocks.*.attn1/attn2.to_q ...) "
                         "to put a LoRA on")
    return sorted(pairs, key=lambda p: diffusers_sort_key(p[1]))
