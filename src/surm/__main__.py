"""``python -m surm``: the command line (:mod:`surm.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
