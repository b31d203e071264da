"""``python -m rdt_lib.train`` / ``accelerate launch -m rdt_lib.train``: see :mod:`rdt_lib.train.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
