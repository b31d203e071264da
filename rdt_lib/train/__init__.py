"""The LoRA reward trainer: configuration (:mod:`.config`), checkpoints (:mod:`.checkpoint`) and the loop.

Run it with ``python -m rdt_lib.train`` (or ``accelerate launch -m rdt_lib.train``).
"""
