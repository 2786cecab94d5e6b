"""``python -m lorita ...`` (also what ``torchrun -m lorita ...`` runs in each process)."""

import sys

from . import _import_all, _startup
from .cli import main, needs_library

if needs_library(sys.argv[1:]):
    _import_all()  # torch and the library, while Ctrl-C still ends the start quietly
_startup.release(by_main=True)  # Ctrl-C from here on is the command's own (exit code 130)

if __name__ == "__main__":
    sys.exit(main())
