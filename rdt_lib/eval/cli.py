"""Command line of the evaluation sweep: ``python -m rdt_lib.eval`` (or ``accelerate launch -m rdt_lib.eval``).

Examples::

    python -m rdt_lib.eval --config sd15_lora --set model.path=/models/sd15 --set tuned.path=my_lora.safetensors
    python -m rdt_lib.eval --config my_sweep.toml --set 'schedules.names=["base", "tuned", "power:3"]'
    accelerate launch --num_processes 4 -m rdt_lib.eval --config my_sweep.toml
    python -m rdt_lib.eval --help                                        # every key with its default

Exit status: 0 done, 2 configuration / input error (one ``error: ...`` line; ``--debug`` or ``RDT_DEBUG=1`` adds
the traceback), 130 interrupted (images sampled so far stay cached; the same command resumes).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import run_cli

__all__ = ["main", "build_parser"]

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from .config import SCHEMA

    return SCHEMA.argument_parser(
        "Sweep base / tuned / combined-generation / AIG / LoRA-scaling schedules, score the images (rewards, DINO "
        "diversity, Vendi, spectral distance) and draw the reward-diversity Pareto front.",
        set_example="--set prompts.images_per_prompt=8 --set rewards.0.name=hpsv2.1")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the sweep, return the exit status (user errors: one ``error:`` line, status 2)."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import SCHEMA, load_config, to_toml

    if args.list_presets:
        print("\n".join(SCHEMA.list_presets()))
        return 0
    SCHEMA.check_config_args(args.config)
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    from .sweep import run_sweep

    try:
        run_sweep(config)
    except KeyboardInterrupt:
        print("interrupted: the images sampled so far are cached; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
