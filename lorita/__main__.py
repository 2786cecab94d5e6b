"""``python -m lorita ...`` (also what ``torchrun -m lorita ...`` runs in each process)."""

import sys

from . import _startup
from .cli import main

_startup.release(by_main=True)  # Ctrl-C from here on is the command's own (exit code 130)

if __name__ == "__main__":
    sys.exit(main())
