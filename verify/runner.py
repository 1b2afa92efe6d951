"""``python -m verify`` / ``icgd verify``: run the claims and report them."""

import argparse
import sys
import time

from . import registry, report
from reference import __version__


def add_arguments(p):
    p.add_argument("--full", action="store_true", help="the paper's settings and seeds (slow); default: quick mode")
    p.add_argument("--only", metavar="PATTERN", help="run claims whose id contains PATTERN (or matches it as a glob); comma-separated for several")
    p.add_argument("--json", metavar="FILE", help="write the JSON report to FILE")
    p.add_argument("--markdown", metavar="FILE", help="write a markdown report to FILE")
    p.add_argument("--list", action="store_true", help="list the claims and exit")
    p.add_argument("--seed", type=int, default=0, help="base seed for the numeric claims (default 0)")
    p.add_argument("--workdir", default="runs/verify", help="where training claims keep their runs (default runs/verify)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="use a finished run already in --workdir instead of retraining it, when its config.json equals "
                        "the one the claim asks for and it reached the last step (the report lists the reused runs)")


def run(args):
    mode = "full" if args.full else "quick"
    claims = registry.select(registry.discover(), mode, args.only)
    if args.list:
        for c in claims:
            print(f"{c.id:<44} {c.source:<28} {c.statement}")
        return 0
    if not claims and not registry.import_errors():
        print(f"no claim matches {args.only!r}", file=sys.stderr)
        return 2
    ctx = registry.Context(mode=mode, seed=args.seed, workdir=args.workdir, reuse_runs=args.reuse_runs,
                           selected=[c.id for c in claims])
    print(f"icgd {__version__} verify, {mode} mode, {len(claims)} claims", flush=True)
    t0 = time.perf_counter()
    rows = registry.import_error_rows()
    for r in rows:
        print(report.verdict_line(r), flush=True)
    for c in claims:
        row = registry.run_claim(c, ctx)
        rows.append(row)
        print(report.verdict_line(row), flush=True)
    n_failed = sum(not r["passed"] for r in rows)
    rep = {"version": __version__, "mode": mode, "machine": report.machine_info(),
           "seconds": round(time.perf_counter() - t0, 2), "n_passed": len(rows) - n_failed,
           "n_failed": n_failed, "reused_runs": registry.reused_runs(), "claims": rows}
    if args.json:
        report.write_atomic(args.json, report.to_json(rep))
    if args.markdown:
        report.write_atomic(args.markdown, report.to_markdown(rep))
    print(f"{len(rows) - n_failed} passed, {n_failed} failed in {rep['seconds']:.0f} s")
    for r in rows:
        if not r["passed"] and r.get("traceback"):
            print(f"\n--- {r['id']} ---\n{r['traceback']}", file=sys.stderr)
    return 1 if n_failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m verify", description="Check the papers' claims and report each one.")
    add_arguments(p)
    return run(p.parse_args(argv))
