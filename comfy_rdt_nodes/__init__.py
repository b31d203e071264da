"""ComfyUI nodes over :mod:`rdt_lib`, one module per node family (as ComfyUI's ``comfy_extras/nodes_*.py``).

Each family module exports its own ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``; this package merges
the modules listed in ``_FAMILIES``. ``comfy`` and ``folder_paths`` are imported inside the nodes' functions, so
the modules import (and their node functions run) without ComfyUI.
"""

from __future__ import annotations

from . import nodes_reward, nodes_sampling, nodes_training

_FAMILIES = [nodes_sampling, nodes_reward, nodes_training]

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in _FAMILIES:
    _clash = set(NODE_CLASS_MAPPINGS) & set(_module.NODE_CLASS_MAPPINGS)
    if _clash:
        raise RuntimeError(f"node names defined twice: {sorted(_clash)} ({_module.__name__})")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
