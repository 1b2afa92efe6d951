"""``python -m benchmarks``: the CPU benchmark (see :mod:`benchmarks.bench`).

    python -m benchmarks [options of benchmarks.bench]      the LSA training steps (unchanged)
    python -m benchmarks seq [options of benchmarks.seq]    the sequence training steps (lds
                                                            task: LSA stacks and the mesa
                                                            layer; numba, numpy, JAX and
                                                            PyTorch peers), see :mod:`benchmarks.seq`
"""

import sys

from .bench import main

SUBCOMMANDS = ("seq",)


def dispatch(argv=None):
    """Run ``benchmarks.seq`` for ``seq ...``, else ``benchmarks.bench`` with ``argv`` as given."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["seq"]:
        from .seq import main as seq_main

        return seq_main(args[1:], prog="python -m benchmarks seq")
    return main(argv)


if __name__ == "__main__":
    sys.exit(dispatch())
