"""Command line of the reward trainer: ``python -m rdt_lib.train`` (or ``accelerate launch -m rdt_lib.train``).

Examples::

    python -m rdt_lib.train --config draftplus_sd15_pickscore --set model.path=/models/sd15 \\
        --set data.prompts_file=prompts.txt
    python -m rdt_lib.train --config my.toml --set optim.lr=1e-4 --set rewards.0.weight=2
    python -m rdt_lib.train --config my.toml --resume latest          # continue after a crash or Ctrl-C
    accelerate launch --num_processes 4 -m rdt_lib.train --config my.toml
    python -m rdt_lib.train --help                                      # every key with its default

Exit status: 0 done, 2 configuration / input error (one ``error: ...`` line; ``--debug`` or ``RDT_DEBUG=1`` adds
the traceback), 3 stopped after too many NaN / inf steps, 130 interrupted (a checkpoint was saved;
``--resume latest`` continues).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import run_cli

__all__ = ["main", "build_parser", "load_cli_config"]

EXIT_CONFIG, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    from .config import SCHEMA

    parser = SCHEMA.argument_parser(
        "LoRA reward fine-tuning of Stable Diffusion, SD3 and Flux (DRaFT-K / DRaFT-LV / DRaFT+, ReFL, ImageReFL, "
        "R0-style regularisers, R0+ intermediate supervision).",
        set_example="--set optim.lr=1e-4 --set rewards.0.name=hpsv2.1")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|DIR",
                        help="continue from the newest checkpoint in run.output_dir (default) or from DIR")
    return parser


def load_cli_config(args: argparse.Namespace):
    """The validated :class:`TrainConfig` from parsed arguments (``--resume`` becomes ``run.resume``)."""
    from .config import SCHEMA, load_config

    SCHEMA.check_config_args(args.config)  # neither a file nor a preset: list the presets, not "does not exist"
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"run.resume={args.resume}")
    return load_config(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, return the exit status (user errors: one ``error:`` line, status 2)."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError, list_presets, to_toml

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    try:
        config = load_cli_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("(python -m rdt_lib.train --help lists every key with its default)", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(to_toml(config), end="")
        return 0

    from .data import DataError
    from .run import train_from_config
    from .trainer import NonFiniteLossError

    try:
        result = train_from_config(config)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print("aborted without saving", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.interrupted:
        return EXIT_INTERRUPTED
    return 0
