"""peft LoRA adapters on any torch network: adding them, and choosing per call which one is active.

One copy of the weights serves both models of a dual-model sampler: the base prediction is the network
with its adapters disabled, the tuned prediction the same network with the tuned adapter on. Where both
are needed at one step, :func:`use_adapters` with a per-row list evaluates them in one batched forward
pass (peft's mixed-adapter batches: rows labelled ``None`` get the base weights).
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

__all__ = [
    "DEFAULT_SD_TARGETS",
    "add_lora",
    "lora_layers",
    "adapter_names",
    "lora_parameters",
    "use_adapters",
]

BASE_ROW = "__base__"  # peft's label for rows that get no adapter in a mixed batch

DEFAULT_SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections of a diffusers UNet, the usual reward-LoRA targets (SPEC.md section 2)."""


def add_lora(
    network: torch.nn.Module,
    adapter_name: str = "tuned",
    *,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] | str = DEFAULT_SD_TARGETS,
    dropout: float = 0.0,
    init_lora_weights: bool | str = True,
) -> torch.nn.Module:
    """Inject a peft LoRA adapter named ``adapter_name`` into ``network`` in place and return it.

    ``alpha`` defaults to ``rank`` (scale 1). With ``init_lora_weights=True`` the up-projection starts at
    zero, so the adapter does not change the network until trained. Only the LoRA weights are trainable
    afterwards (peft freezes nothing itself; the base weights' ``requires_grad`` is set to False here).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if adapter_name == BASE_ROW:
        raise ValueError(f"{BASE_ROW!r} is reserved for the base weights; choose another adapter name")
    if adapter_name in adapter_names(network):
        raise ValueError(f"the network already has an adapter named {adapter_name!r}")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
    )
    for p in network.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, network, adapter_name=adapter_name)
    for name, p in network.named_parameters():
        if f".{adapter_name}." in name and ("lora_A" in name or "lora_B" in name):
            p.requires_grad_(True)
    return network


_LAYER_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[str, ...], list[LoraLayer]]]" = (
    weakref.WeakKeyDictionary()
)


def lora_layers(network: torch.nn.Module) -> list[LoraLayer]:
    """All peft LoRA layers inside ``network``.

    Cached per network (walking a UNet's modules takes milliseconds, and the sampler asks every step);
    the cache is renewed whenever the network's ``peft_config`` names another set of adapters.
    """
    key = tuple(getattr(network, "peft_config", {}) or ())
    cached = _LAYER_CACHE.get(network)
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = [m for m in network.modules() if isinstance(m, LoraLayer)]
    _LAYER_CACHE[network] = (key, layers)
    return layers


def adapter_names(network: torch.nn.Module) -> list[str]:
    """The names of the LoRA adapters present in ``network`` (sorted)."""
    names: set[str] = set()
    for layer in lora_layers(network):
        names.update(layer.lora_A.keys())
    return sorted(names)


def lora_parameters(network: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA A/B parameters of one adapter, by their full parameter name."""
    return {
        name: p
        for name, p in network.named_parameters()
        if f".{adapter_name}." in name and ("lora_A" in name or "lora_B" in name)
    }


def _mixed_batch_hook(module, args, kwargs, labels):
    kwargs["adapter_names"] = labels
    return args, kwargs


def _switch(layer: LoraLayer, disabled: bool, active: list[str]) -> None:
    """Set which adapters a layer applies without touching ``requires_grad`` (peft's own
    ``enable_adapters`` / ``set_adapter`` also flip trainability, and cost far more per call)."""
    state = layer.__dict__  # plain attributes: skip nn.Module.__setattr__'s parameter/buffer checks
    state["_disable_adapters"] = disabled
    state["_active_adapter"] = active


@contextlib.contextmanager
def use_adapters(
    network: torch.nn.Module,
    adapters: str | None | Sequence[str | None],
    *,
    scale: float = 1.0,
) -> Iterator[None]:
    """Run ``network`` with a chosen adapter for the duration of the ``with`` block.

    ``adapters``: ``None`` = base weights (every adapter disabled); a name = that adapter alone; a list
    with one entry per batch row = a mixed batch (``None`` rows get the base weights). ``scale``
    multiplies the LoRA contribution of the named adapter(s) (the "LoRA scaling" baseline; 1 = as
    trained). A network without LoRA layers accepts only ``None``. Which parameters are trainable is
    never changed; the previous adapter state is restored on exit.
    """
    layers = lora_layers(network)
    per_row = not (adapters is None or isinstance(adapters, str))
    wanted = {a for a in (adapters if per_row else [adapters]) if a is not None}  # type: ignore[union-attr]
    if wanted:
        known = adapter_names(network)
        unknown = wanted - set(known)
        if unknown:
            raise ValueError(f"unknown LoRA adapter(s) {sorted(unknown)}; the network has {known or 'no adapters'}")
    if not layers:
        yield
        return

    saved = [(layer, layer._disable_adapters, layer._active_adapter) for layer in layers]
    scaled = [(layer, name, layer.scaling[name]) for layer in layers for name in wanted if name in layer.scaling] \
        if scale != 1.0 else []
    handles = []
    try:
        if per_row:
            for layer in layers:
                _switch(layer, False, list(layer.active_adapters))
            labels = [BASE_ROW if a is None else a for a in adapters]  # type: ignore[union-attr]
            hook = partial(_mixed_batch_hook, labels=labels)
            handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
        elif adapters is None:
            for layer in layers:
                _switch(layer, True, layer._active_adapter)
        else:
            for layer in layers:
                _switch(layer, False, [adapters])
        for layer, name, value in scaled:
            layer.scaling[name] = value * scale
        yield
    finally:
        for h in handles:
            h.remove()
        for layer, disabled, active in saved:
            _switch(layer, disabled, active)
        for layer, name, value in scaled:
            layer.scaling[name] = value
