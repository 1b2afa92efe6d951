"""The ``icgd`` console script. Subcommands are thin: each lives in its own module,
which provides ``add_arguments(parser)`` and ``run(args) -> exit code``.

    icgd verify ...          the claims (same as python -m verify)
    icgd prove ...           the symbolic proofs (symbolic.cli)
    icgd train ...           train an LSA model (verify.train_cli)
    icgd vectors write|check golden test vectors (verify.golden)
"""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "verify": ("verify.runner", "check the papers' claims and report each one"),
    "prove": ("symbolic.cli", "establish the symbolic proofs with SymPy"),
    "train": ("verify.train_cli", "train an LSA transformer from scratch"),
    "vectors": ("verify.golden", "write or check the golden test vectors (under verify/vectors/)"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="icgd", description="In-context learning by gradient descent: the framework-free reference.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (modname, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (modname + ".").startswith(exc.name + "."):
                raise  # a missing dependency inside the module is a real error
            continue
        mod.add_arguments(sp)
        modules[name] = mod
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    if args.command not in modules:
        print(f"icgd {args.command}: not available in this build", file=sys.stderr)
        return 2
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
