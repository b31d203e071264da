"""The LoRA reward trainer.

Modules: :mod:`.config` (schema, TOML/YAML, ``--set`` overrides, presets), :mod:`.data` (prompts, image +
caption datasets), :mod:`.trainer` (the optimisation loop, multi-process gradient averaging, EMA, NaN handling,
resumable state), :mod:`.checkpoint` (atomic checkpoints), :mod:`.run` (``build_run``: config -> model,
rewards, objective, data, trainer, with an injectable backbone and rewards; ``run_training``: the loop with
logging, validation, progress callback, stop flag, checkpoints and kohya LoRA output; ``train_from_config``: the
command line's composition with accelerate, signals and resuming), :mod:`.cli` (the command line).

Run it with ``python -m rdt_lib.train --config X.toml`` or, on several GPUs,
``accelerate launch --num_processes N -m rdt_lib.train --config X.toml`` (on CPU-only machines use
``accelerate launch --multi_gpu --num_processes N ...``: accelerate's ``--cpu`` flag selects a single-process
launcher).
"""
