"""Reports of a verify run: the terminal table, JSON and markdown.

The JSON object's field names are an interface CI systems rely on: ``version``,
``machine``, ``mode``, ``claims`` (items with ``id``, ``statement``, ``source``,
``measured``, ``tolerance``, ``passed``), ``n_passed``, ``n_failed``.
"""

import json
import os
import platform
import sys


def machine_info():
    import numpy

    info = {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "numpy": numpy.__version__}
    for mod in ("numba", "sympy", "cupy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    return info


def fmt_num(x):
    if x is None:
        return "-"
    return f"{x:.3g}" if (x == 0 or 1e-3 <= abs(x) < 1e4) else f"{x:.2e}"


def verdict_line(row):
    mark = "PASS" if row["passed"] else "FAIL"
    if row.get("error"):
        return f"{mark}  {row['id']:<44} error: {row['error']}"
    return (f"{mark}  {row['id']:<44} measured {fmt_num(row['measured']):>9} "
            f"{row['comparison']} {fmt_num(row['tolerance']):>9}   ({row['seconds']:.1f}s)")


def to_json(report):
    return json.dumps(report, indent=2, default=str) + "\n"


def to_markdown(report):
    lines = [f"# icgd verify report ({report['mode']} mode)", "",
             f"Version {report['version']}, {report['n_passed']} passed, {report['n_failed']} failed, "
             f"{report['seconds']:.0f} s on {report['machine']['platform']} ({report['machine']['cpus']} CPUs).", "",
             "| claim | verdict | measured | tolerance | source | statement | tolerance reason |",
             "|---|---|---|---|---|---|---|"]
    if report.get("reused_runs"):
        lines[3:3] = ["", "Training runs reused from disk (--reuse-runs), not retrained here: "
                      + ", ".join(f"`{d}`" for d in report["reused_runs"]) + "."]
    for r in report["claims"]:
        verdict = "pass" if r["passed"] else "**FAIL**"
        meas = "error: " + r["error"] if r.get("error") else fmt_num(r["measured"])
        tol = "-" if r["tolerance"] is None else f"{r['comparison']} {fmt_num(r['tolerance'])}"
        cells = [r["id"], verdict, meas, tol, r["source"], r["statement"], r.get("tolerance_reason") or "-"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
