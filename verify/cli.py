"""The ``icgd`` console script. Subcommands are thin: each lives in its own module,
which provides ``add_arguments(parser)`` and ``run(args) -> exit code``.

    icgd verify ...          the claims (same as python -m verify)
    icgd prove ...           the symbolic proofs (symbolic.cli)
    icgd train ...           train an LSA model (verify.train_cli)
    icgd vectors write|check golden test vectors (verify.golden)
    icgd sweep FILE|status   a grid of runs with a results store (verify.sweep)
    icgd report SWEEP        a sweep's seed-aggregated tables and figures (verify.report_sweep)
    icgd plots RUN_DIR       a run directory's plots (verify.plots)
    icgd record RUN_DIR ...  commit finished sequence runs as records (verify.records)

Exit codes shared by every subcommand: 0 done, 1 a check failed, 2 bad usage (an option's
value, a config field, an output path; said before any work), 130 interrupted (Ctrl-C).
:func:`int_at_least` is the argument type of the options that take a count or a seed.
"""

import argparse
import importlib
import sys

INTERRUPTED = 130     # the shell's code for a process ended by SIGINT


def int_at_least(lo):
    """An argparse type: an integer >= lo (the message names the option)."""

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


SUBCOMMANDS = {
    "verify": ("verify.runner", "check the papers' claims and report each one"),
    "prove": ("symbolic.cli", "establish the symbolic proofs with SymPy"),
    "train": ("verify.train_cli", "train an LSA transformer from scratch"),
    "vectors": ("verify.golden", "write or check the golden test vectors (under verify/vectors/)"),
    "conformance": ("verify.conformance", "check a port's adapter against the golden vectors (SPEC.md section 14)"),
    "sweep": ("verify.sweep", "train a grid of runs (a sweep file or flags) into a results store"),
    "report": ("verify.report_sweep", "aggregate a sweep across seeds: tables, figures, JSON"),
    "plots": ("verify.plots", "draw a run directory's plots (PNG)"),
    "record": ("verify.records", "commit finished sequence runs as records that verify --reuse-runs reads"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="icgd", description="In-context learning by gradient descent: the framework-free reference.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (modname, help_) in SUBCOMMANDS.items():
        # no abbreviations for train: a prefix of a config field (--ste) must not pick the field
        sp = sub.add_parser(name, help=help_, description=help_, allow_abbrev=name != "train")
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
    try:
        return modules[args.command].run(args)
    except KeyboardInterrupt:          # a subcommand that does not say where it was stopped
        print(f"\nicgd {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
