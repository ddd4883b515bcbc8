"""``python -m hp_fast``: the ``hp-fast`` command line (also under ``torchrun``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
