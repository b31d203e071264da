"""ComfyUI node wrappers over :mod:`rdt_lib`: each node family is one module with its own
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``, merged here. No module imports ComfyUI at import
time (``comfy`` is imported inside the node functions), so ``import comfy_rdt_nodes`` works without it.
"""

from __future__ import annotations

from . import nodes_sampling

_FAMILIES = [nodes_sampling]

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _family in _FAMILIES:
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
