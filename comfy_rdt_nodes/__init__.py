"""ComfyUI node wrappers over :mod:`rdt_lib` (dual-model KSampler, reward scorer, train-LoRA).

The nodes come with the ComfyUI node issue; until then the pack registers no nodes, so loading it in
ComfyUI is harmless.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
