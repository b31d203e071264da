"""Setting up ComfyUI inside a test script run with ComfyUI's own Python (the in-process checks)."""

from __future__ import annotations

import sys
from pathlib import Path


def setup_comfy(comfy_dir: str, work: Path) -> None:
    """Make ComfyUI's modules importable, parse its arguments as ``main.py --cpu`` would on a machine without CUDA,
    and point its ``loras`` folder and output directory into ``work``."""
    import torch

    sys.path.insert(0, comfy_dir)
    if not torch.cuda.is_available():
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.options

        comfy.options.enable_args_parsing()
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
    folder_paths.set_output_directory(str(work / "output"))
