"""``python -m spkver.cli``: the ``spkver`` command."""
import sys

from spkver.cli import main

if __name__ == "__main__":  # not when a tool imports every module of the package
    sys.exit(main())
