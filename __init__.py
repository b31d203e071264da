"""ComfyUI entry point of the rdt node pack (``custom_nodes/<this folder>/__init__.py``).

ComfyUI imports this file and reads ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``. The nodes
live in :mod:`comfy_rdt_nodes`; they call the library :mod:`rdt_lib`. When the pack is used from a
ComfyUI ``custom_nodes`` folder without ``pip install``, this folder is put on ``sys.path`` so
``rdt_lib`` imports.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

from comfy_rdt_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web/js"  # the Reward Scorer shows its table on the node
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
