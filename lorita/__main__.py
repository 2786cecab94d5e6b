"""``python -m lorita ...`` (also what ``torchrun -m lorita ...`` runs in each process)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
