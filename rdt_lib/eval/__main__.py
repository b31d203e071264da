"""``python -m rdt_lib.eval`` / ``accelerate launch -m rdt_lib.eval``: see :mod:`rdt_lib.eval.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
