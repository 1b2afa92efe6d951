"""``python -m benchmarks``: the CPU benchmark (see :mod:`benchmarks.bench`)."""

import sys

from .bench import main

if __name__ == "__main__":
    sys.exit(main())
