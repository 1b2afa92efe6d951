"""``icgd prove`` / ``python -m symbolic``: establish the symbolic proofs and report each.

For every theorem: its statement, its hypotheses (symbolic dimensions, or which
explicit sizes), how each step was established, and the time it took. A theorem that
is not established (a residual that does not vanish, a bridge error above the
tolerance, or an exception) is reported as FAILED and the exit code is 1; nothing is
skipped. Exit code 2 for a bad option, checked before any proof: ``--only`` without a
pattern or matching no theorem, a ``--seed`` below 0, a ``--json`` file that cannot be
written (``reference.files``); exit code 130 on Ctrl-C (no report written).
"""

import argparse
import fnmatch
import json
import re
import sys
import textwrap
import time

from reference.files import OutputPathError, check_writable, write_output

WIDTH = 100
INTERRUPTED = 130


def _seed(text):
    """An argparse type: an integer >= 0 (the bridge's random points use it as a seed)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_arguments(p):
    p.add_argument("--only", metavar="PATTERN",
                   help="prove theorems whose id contains PATTERN (or matches it as a glob); comma-separated for "
                        "several; ids may be written with or without the 'symbolic.' prefix")
    p.add_argument("--json", metavar="FILE", help="write the JSON report to FILE")
    p.add_argument("--list", action="store_true", help="list the theorems and exit")
    p.add_argument("--brief", action="store_true", help="one line per theorem instead of the full report")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random points of the numeric bridge (default 0)")


def select(theorems, only):
    """Theorems matching ``only`` (substring, or glob if it has * ? [), in registry order."""
    out = list(theorems.values())
    if not only:
        return out
    pats = [p.strip() for p in only.split(",") if p.strip()]
    pats = [p[len("symbolic."):] if p.startswith("symbolic.") else p for p in pats]

    def hit(tid):
        return any(fnmatch.fnmatchcase(tid, p) if any(ch in p for ch in "*?[") else p in tid for p in pats)

    return [t for t in out if hit(t.id)]


def _wrap(text, indent):
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")


def _num(x):
    return f"{x:.1e}" if x else "0"


def describe(res):
    """The multi-line report of one result."""
    mark = "PROVED" if res.established else "FAILED"
    lines = [f"{mark}  {res.id}  ({res.seconds:.2f} s)",
             _wrap(f"theorem:    {res.statement}", "  "),
             _wrap(f"hypotheses: {res.hypotheses}", "  ")]
    if res.error:
        lines.append(_wrap(f"error: {res.error}", "  "))
        return "\n".join(lines)
    lines.append("  established by:" if res.established else "  steps:")
    groups = {}
    for s in res.steps:
        groups.setdefault(s.label, []).append(s)
    for label, steps in groups.items():
        ok = all(s.holds for s in steps)
        lines.append(_wrap(f"{'-' if ok else 'X'} {label}", "    "))
        wheres = "; ".join(dict.fromkeys(s.where for s in steps))
        n = sum(s.checked for s in steps)
        if res.kind == "bridge":
            worst = max(s.error for s in steps)
            how = (f"{len(steps)} comparison(s), worst float64 relative error {_num(worst)} "
                   f"(rtol {steps[0].tolerance:g}) at: {wheres}")
        else:
            hows = "; ".join(dict.fromkeys(re.sub(r"\s*\(\d+ \w+\)$", "", s.how) for s in steps))
            how = f"{hows}; {n} checked in all, at: {wheres}"
        lines.append(_wrap(how, "        "))
        for s in steps:
            if not s.holds:
                lines.append(_wrap(f"NOT ESTABLISHED at {s.where}: {s.failed} of {s.checked} did not vanish; "
                                   f"e.g. {s.witness}", "        "))
    return "\n".join(lines)


def brief_line(res):
    mark = "PROVED" if res.established else "FAILED"
    meas = "error" if res.error else (f"{int(res.measured)} nonzero residuals" if res.kind == "exact"
                                      else f"worst rel err {_num(res.measured)}")
    return f"{mark}  {res.id:<34} {meas:<28} ({res.seconds:.2f} s)"


def _fail(msg):
    print(f"icgd prove: {msg}", file=sys.stderr)
    return 2


def run(args):
    import sympy

    from .core import load_all, run_theorem

    if args.only is not None and not any(p.strip() for p in args.only.split(",")):
        return _fail(f"--only: no pattern in {args.only!r}; give theorem ids or globs, comma-separated")
    theorems = select(load_all(), args.only)
    if args.list:
        for t in theorems:
            print(f"{t.id:<34} {t.kind:<7} {'slow' if t.slow else '    '}  {t.statement[:80]}")
        return 0
    if not theorems:
        print(f"no theorem matches {args.only!r}", file=sys.stderr)
        return 2
    if args.json is not None:
        try:
            check_writable(args.json, "--json")
        except OutputPathError as exc:
            return _fail(exc)
    print(f"icgd prove: {len(theorems)} theorem(s), SymPy {sympy.__version__}\n", flush=True)
    t0 = time.perf_counter()
    results = []
    try:
        for t in theorems:
            res = run_theorem(t, **({"seed": args.seed} if t.kind == "bridge" else {}))
            results.append(res)
            print(brief_line(res) if args.brief else describe(res) + "\n", flush=True)
    except KeyboardInterrupt:
        print(f"\nicgd prove: interrupted during {theorems[len(results)].id} ({len(results)} of {len(theorems)} "
              "done); no report written", file=sys.stderr)
        return INTERRUPTED
    seconds = time.perf_counter() - t0
    n_failed = sum(not r.established for r in results)
    print(f"{len(results) - n_failed} established, {n_failed} failed in {seconds:.1f} s")
    for r in results:
        if r.traceback:
            print(f"\n--- {r.id} ---\n{r.traceback}", file=sys.stderr)
    if args.json is not None:
        rep = {"sympy": sympy.__version__, "seed": args.seed, "seconds": round(seconds, 2),
               "n_established": len(results) - n_failed, "n_failed": n_failed,
               "theorems": [r.as_dict() for r in results]}
        try:
            write_output(args.json, json.dumps(rep, indent=2, default=str) + "\n", "--json")
        except OutputPathError as exc:
            return _fail(exc)
    return 1 if n_failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m symbolic",
                                description="Establish the symbolic proofs (SymPy) and report each one.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:          # while loading the theorems
        print("\nicgd prove: interrupted; no report written", file=sys.stderr)
        return INTERRUPTED
