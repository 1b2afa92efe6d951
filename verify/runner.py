"""``python -m verify`` / ``icgd verify``: run the claims and report them.

Every option is checked before any claim runs (exit code 2 with a message naming it):
``--only`` must hold a pattern, ``--seed`` is an integer >= 0, the ``--json`` and
``--markdown`` files must be writable (``reference.files``), and ``--workdir`` must be a
usable directory when a training claim is selected. Ctrl-C stops the run with exit code
130 and writes no report; a report that cannot be written at the end (a full disk) is
said with exit code 2.
"""

import argparse
import os
import sys
import time

from reference import __version__
from reference.files import OutputPathError, check_output_dir, check_writable, write_output

from . import registry, report
from .cli import INTERRUPTED, int_at_least
from .records import RECORDS_DIR

TRAINING_CLAIMS = "verify.claims_training"     # the module whose claims train runs in --workdir


def add_arguments(p):
    p.add_argument("--full", action="store_true", help="the paper's settings and seeds (slow); default: quick mode")
    p.add_argument("--only", metavar="PATTERN", help="run claims whose id contains PATTERN (or matches it as a glob); comma-separated for several")
    p.add_argument("--json", metavar="FILE", help="write the JSON report to FILE")
    p.add_argument("--markdown", metavar="FILE", help="write a markdown report to FILE")
    p.add_argument("--list", action="store_true", help="list the claims and exit")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="base seed for the numeric claims (default 0)")
    p.add_argument("--workdir", default="runs/verify", help="where training claims keep their runs (default runs/verify)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="use a finished run already in --workdir instead of retraining it, when its config.json equals "
                        "the one the claim asks for and it reached the last step (the report lists the reused runs); "
                        "a sequence run missing there is answered by its committed record under --records, if intact")
    p.add_argument("--no-train", action="store_true",
                   help="with --reuse-runs: train nothing; a training claim whose runs are neither finished in "
                        "--workdir nor recorded fails, naming them")
    p.add_argument("--older-records", action="store_true",
                   help="with --reuse-runs: also use records trained by other reference/ sources (the report names "
                        "each one with the hash and commit of the sources that trained it)")
    p.add_argument("--records", default=RECORDS_DIR, metavar="DIR",
                   help=f"committed run records read with --reuse-runs (default {RECORDS_DIR}; see icgd record)")


def _fail(msg):
    print(f"icgd verify: {msg}", file=sys.stderr)
    return 2


def check_outputs(args, claims):
    """OutputPathError for the first output option that cannot be written."""
    for opt in ("json", "markdown"):
        path = getattr(args, opt)
        if path is not None:
            check_writable(path, f"--{opt}")
    if args.json and args.markdown and os.path.realpath(args.json) == os.path.realpath(args.markdown):
        raise OutputPathError(f"--json and --markdown: both name {args.json}; give two files")
    if any(c.module == TRAINING_CLAIMS for c in claims):
        check_output_dir(args.workdir, "--workdir")


def run(args):
    for flag, on in (("--no-train", args.no_train), ("--older-records", args.older_records)):
        if on and not args.reuse_runs:
            return _fail(f"{flag}: only with --reuse-runs (the runs and records it may use instead of training)")
    if args.only is not None and not any(p.strip() for p in args.only.split(",")):
        return _fail(f"--only: no pattern in {args.only!r}; give claim ids or globs, comma-separated")
    mode = "full" if args.full else "quick"
    claims = registry.select(registry.discover(), mode, args.only)
    if args.list:
        for c in claims:
            print(f"{c.id:<44} {c.source:<28} {c.statement}")
        return 0
    if not claims and not registry.import_errors():
        return _fail(f"no claim matches {args.only!r}")
    try:
        check_outputs(args, claims)
    except OutputPathError as exc:
        return _fail(exc)
    ctx = registry.Context(mode=mode, seed=args.seed, workdir=args.workdir, reuse_runs=args.reuse_runs,
                           records=args.records, no_train=args.no_train,
                           older_records=args.older_records, selected=[c.id for c in claims])
    print(f"icgd {__version__} verify, {mode} mode, {len(claims)} claims", flush=True)
    t0 = time.perf_counter()
    rows = registry.import_error_rows()
    for r in rows:
        print(report.verdict_line(r), flush=True)
    done = 0
    try:
        for c in claims:
            row = registry.run_claim(c, ctx)
            rows.append(row)
            done += 1
            print(report.verdict_line(row), flush=True)
    except KeyboardInterrupt:
        hint = (f"; --reuse-runs reuses the training runs finished in {args.workdir}"
                if claims[done].module == TRAINING_CLAIMS else "")
        print(f"\nicgd verify: interrupted during {claims[done].id} ({done} of {len(claims)} claims done); "
              f"no report written{hint}", file=sys.stderr)
        return INTERRUPTED
    n_failed = sum(not r["passed"] for r in rows)
    rep = {"version": __version__, "mode": mode, "machine": report.machine_info(),
           "seconds": round(time.perf_counter() - t0, 2), "n_passed": len(rows) - n_failed,
           "n_failed": n_failed, "reused_runs": registry.reused_runs(), "claims": rows}
    unwritten = []
    for opt, path, text in (("--json", args.json, report.to_json), ("--markdown", args.markdown, report.to_markdown)):
        if path is not None:
            try:
                write_output(path, text(rep), opt)
            except OutputPathError as exc:
                unwritten.append(str(exc))
    print(f"{len(rows) - n_failed} passed, {n_failed} failed in {rep['seconds']:.0f} s")
    for r in rows:
        if not r["passed"] and r.get("traceback"):
            print(f"\n--- {r['id']} ---\n{r['traceback']}", file=sys.stderr)
    if unwritten:
        for msg in unwritten:
            _fail(msg)
        return 2
    return 1 if n_failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m verify", description="Check the papers' claims and report each one.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:          # before the claims (discovering them)
        print("\nicgd verify: interrupted; no report written", file=sys.stderr)
        return INTERRUPTED
