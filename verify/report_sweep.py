"""``icgd report SWEEP``: aggregate a sweep's store across seeds and draw its figures.

    icgd report SWEEP_DIR|SWEEP_FILE [--quick] [--out DIR]

Reads only the store (``verify.sweep_store``: the run directories are not needed) and
writes, under DIR (default SWEEP_DIR/report): ``report.md`` (tables, the figures linked),
``report.html`` (the same with the PNGs embedded), ``report.json`` (every number of the
tables and figures) and one PNG per figure. Each cell (a grid point without its seed)
gets the mean over its seeds and a 95% interval, mean +- t_{0.975, n-1} s / sqrt(n)
(Student's t; none for one seed).

What is drawn comes from the sweep file's [report] table:

    [report]
    title = "..."
    metrics = ["loss", "gd", "gdpp"]            # columns of the cell table (default below)
    [[report.figure]]
    name = "loss"                               # the PNG's name
    kind = "curves"                             # an evaluation metric against the step
    metric = "loss"                             # a key of the evaluation rows
    baselines = ["gd", "gdpp", "gdpp_converged", "lstsq"]
    logy = true                                 # logx too
    [[report.figure]]
    kind = "versus"                             # a final value against a grid field
    x = "N"
    metric = "gamma"
    baselines = ["gdpp_gamma"]
    reference = { x = [10, 25], y = [0.179, 0.099], label = "paper" }
    [[report.figure]]
    kind = "ood"                                # loss against the input or teacher scale
    axis = "input"
    [[report.figure]]
    kind = "per_t"                              # sequence models: final loss l_t against the time step t
    baselines = ["gd", "lstsq", "prop2"]        # their per-t curves (the run's ``{name}_per_t`` baselines)

Values of a run (:data:`VALUES`): any key of its last evaluation row (``loss``,
``model_cos_gd``, ...), ``gamma`` / ``eta`` (its first layer read as a GD++ layer), and
the baselines ``gd``, ``gdpp``, ``lstsq`` (the paper's protocol), ``gdpp_converged``
(shared) / ``gdpp_converged_per_layer`` (the lowest evaluation loss the converged GD++
run reached) with ``_steps`` (how many steps it ran), ``ridge`` (Bayes-optimal lambda),
``gdpp_gamma`` and ``gdpp_converged_gamma`` (its final iterate's).
"""

import base64
import html
import json
import math
import os
import sys

import numpy as np

from reference.files import write_text_atomic

from reference.config import ConfigError, field_path

from .sweep import STORE_FILE, SweepError, default_out, spec_from_file
from .sweep_store import StoreError, SweepStore

FIGURE_KINDS = {"curves": ("name", "kind", "metric", "baselines", "logy", "logx", "title", "cells"),
                "versus": ("name", "kind", "x", "metric", "baselines", "logy", "logx", "title", "reference", "by"),
                "ood": ("name", "kind", "axis", "logy", "title", "cells"),
                "per_t": ("name", "kind", "baselines", "logy", "title", "cells")}
REPORT_KEYS = ("title", "metrics", "figure", "table")
DEFAULT_METRICS = ("loss", "gd", "gdpp", "gdpp_converged", "lstsq", "ridge", "model_cos_gd", "model_cos_gdpp",
                   "gamma")

# Student's t quantile t_{0.975, df}, df = 1..30 (two-sided 95%); above 30: the normal 1.96
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

LABELS = {"gd": "GD-K (line-searched eta)", "gdpp": "GD++ (paper's fixed steps)",
          "gdpp_converged": "GD++ meta-trained to convergence (shared, best evaluated iterate)",
          "gdpp_converged_per_layer": "GD++ to convergence (per layer, best evaluated iterate)",
          "lstsq": "least squares", "ridge": "ridge, lambda = sigma^2 / w_scale^2",
          "gdpp_gamma": "GD++ gamma (paper's fixed steps)", "gdpp_converged_gamma": "GD++ gamma (converged)",
          "loss": "trained LSA", "gamma": "trained LSA gamma",
          "prop2": "Prop. 2 construction (same depth)", "cheb": "Chebyshev iteration as coded"}
X_LABELS = {"noise_std": "label noise sigma (y = w^T x + sigma * N(0, 1))", "N": "context size N (examples per task)",
            "n_layers": "number of layers K"}
STYLES = {"gd": "--", "gdpp": ":", "gdpp_converged": "-.", "gdpp_converged_per_layer": (0, (5, 1, 1, 1, 1, 1)),
          "lstsq": (0, (1, 3)), "ridge": (0, (6, 2)), "prop2": ":", "cheb": (0, (1, 2)), "gdpp_gamma": ":", "gdpp_converged_gamma": "-."}


def check_report_table(report, where):
    for k in report:
        if k not in REPORT_KEYS:
            raise SweepError(f"{where}.{k}: unknown key; known: {', '.join(REPORT_KEYS)}")
    figs = report.get("figure", [])
    if not isinstance(figs, list):
        raise SweepError(f"{where}.figure: expected an array of tables ([[report.figure]])")
    names = set()
    for i, f in enumerate(figs):
        w = f"{where}.figure[{i}]"
        kind = f.get("kind")
        if kind not in FIGURE_KINDS:
            raise SweepError(f"{w}.kind: expected one of {', '.join(FIGURE_KINDS)}, got {kind!r}")
        for k in f:
            if k not in FIGURE_KINDS[kind]:
                raise SweepError(f"{w}.{k}: unknown key for a {kind} figure; known: {', '.join(FIGURE_KINDS[kind])}")
        if kind == "versus" and "x" not in f:
            raise SweepError(f"{w}.x: missing (the grid field on the x axis)")
        if kind == "ood" and f.get("axis", "input") not in ("input", "teacher"):
            raise SweepError(f"{w}.axis: expected 'input' or 'teacher', got {f.get('axis')!r}")
        name = f.get("name", f"{kind}{i}")
        if name in names:
            raise SweepError(f"{w}.name: {name!r} is used twice")
        names.add(name)
        ref = f.get("reference")
        if ref is not None and (not isinstance(ref, dict) or len(ref.get("x", [])) != len(ref.get("y", [1]))):
            raise SweepError(f"{w}.reference: expected {{x = [...], y = [...], label = '...'}} of equal lengths")


# ---- values of a run ------------------------------------------------------------------------------

def _extra(run, key):
    return ((run.get("analysis") or {}).get("extra_baselines") or {}).get(key) or {}


def best_loss(entry):
    """The lowest evaluation loss of a converged GD++ result: its ``best_loss``, or for
    results stored without one the lowest point of its curve (the same windows); None if
    it has neither."""
    if "best_loss" in entry:
        return entry["best_loss"]
    losses = [v for _, v in entry.get("curve") or [] if v is not None and math.isfinite(v)]
    return min(losses) if losses else entry.get("loss")


def converged_per_layer(run):
    """Converged per-layer GD++; for one layer that is the shared one (one eta, one gamma),
    which is all the sweep computes there."""
    return _extra(run, "gdpp_converged_per_layer") or (
        _extra(run, "gdpp_converged_shared") if run["config"]["model"]["n_layers"] == 1 else {})


def value(run, name):
    """The named value of a done run row (None when the run does not have it)."""
    f, b, a = run.get("final") or {}, run.get("baselines") or {}, run.get("analysis") or {}
    w = a.get("weights")                       # a list per layer, or {"skipped": why} (a model that is no LSA stack)
    w = w[0] if isinstance(w, list) and w else {}
    table = {
        "gd": lambda: b.get("gd_loss"), "gdpp": lambda: b.get("gdpp_loss"), "lstsq": lambda: b.get("lstsq_loss"),
        "zero": lambda: b.get("zero_loss"), "prop2": lambda: b.get("prop2_loss"), "cheb": lambda: b.get("cheb_loss"),
        "gdpp_gamma": lambda: (b.get("gdpp_gammas") or [None])[0],
        "gamma": lambda: w.get("gamma_equiv"),
        "eta": lambda: None if w.get("eta_over_N") is None else w["eta_over_N"] * run["config"]["data"]["N"],
        "gdpp_converged": lambda: best_loss(_extra(run, "gdpp_converged_shared")),
        "gdpp_converged_per_layer": lambda: best_loss(converged_per_layer(run)),
        "gdpp_converged_per_layer_steps": lambda: converged_per_layer(run).get("steps"),
        "gdpp_converged_gamma": lambda: (_extra(run, "gdpp_converged_shared").get("gammas") or [None])[0],
        "gdpp_converged_steps": lambda: _extra(run, "gdpp_converged_shared").get("steps"),
        "ridge": lambda: _extra(run, "ridge").get("loss"),
    }
    v = table[name]() if name in table else f.get(name)
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def interval(values):
    """{n, mean, std, lo, hi} of ``values`` (the 95% t interval; lo = hi = mean for n = 1)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None}
    m = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": m, "std": None, "lo": m, "hi": m}
    s = float(x.std(ddof=1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return {"n": n, "mean": m, "std": s, "lo": m - t * s / math.sqrt(n), "hi": m + t * s / math.sqrt(n)}


def metric_range(metric):
    """The values ``metric`` can take: [-1, 1] for a cosine, [0, inf) for a loss or
    distance, else unbounded. Only the drawn band is kept inside it (a 95% t interval
    over 5 seeds of a cosine near 1 reaches past 1); tables and JSON keep the interval."""
    if "cos" in metric:
        return -1.0, 1.0
    if metric in ("loss", "gd", "gdpp", "gdpp_converged", "gdpp_converged_per_layer", "lstsq", "ridge", "prop2") \
            or metric.startswith("preds_diff"):
        return 0.0, math.inf
    return -math.inf, math.inf


def drawn_band(metric, lo, hi):
    """(lo, hi) of the shaded band of ``metric``, clipped to :func:`metric_range`."""
    a, b = metric_range(metric)
    return np.clip(np.asarray(lo, dtype=float), a, b), np.clip(np.asarray(hi, dtype=float), a, b)


# ---- the aggregate --------------------------------------------------------------------------------

def load(out_dir):
    """(name, spec dict, cells) of the store in ``out_dir``: cells is a list of
    {cell, key, runs (done run rows with their history), points, failed, pending}."""
    path = os.path.join(out_dir, STORE_FILE)
    if not os.path.exists(path):
        raise SweepError(f"{out_dir}: no sweep store ({STORE_FILE}) there; run icgd sweep first")
    with SweepStore(path, readonly=True) as store:
        runs = {r["hash"]: r for r in store.runs()}
        for h, r in runs.items():
            r["history"] = store.history(h) if r["status"] == "done" else []
        cells = {}
        for p in store.points():
            key = json.dumps(p["cell"])
            c = cells.setdefault(key, {"cell": p["cell"], "key": key, "runs": [], "points": 0, "failed": 0,
                                       "pending": 0})
            c["points"] += 1
            r = runs[p["hash"]]
            if r["status"] == "done":
                c["runs"].append(r)
            elif r["status"] == "failed":
                c["failed"] += 1
            else:
                c["pending"] += 1
        return store.meta("name"), json.loads(store.meta("spec") or "{}"), list(cells.values())


def cell_label(cell):
    return ", ".join(f"{k}={v}" for k, v in cell.items()) or "all"


def aggregate(cells, metrics):
    return [{"cell": c["cell"], "seeds": sorted(r["seed"] for r in c["runs"]), "failed": c["failed"],
             "pending": c["pending"], "metrics": {m: interval([value(r, m) for r in c["runs"]]) for m in metrics}}
            for c in cells]


def curves(cell, metric):
    """{step: interval} of an evaluation metric over the cell's seeds (steps all runs have)."""
    by_step = {}
    for r in cell["runs"]:
        for row in r["history"]:
            by_step.setdefault(row["step"], []).append(row.get(metric))
    n = len(cell["runs"])
    return {s: interval(v) for s, v in sorted(by_step.items()) if len(v) == n}


# ---- figures --------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def cell_value(c, key, where):
    """A cell's value of the config field ``key``: its grid value, else the value every
    done run of the cell has (a field that a ``[[case]]`` sets, e.g. n_layers); None for
    a cell without done runs. SweepError naming ``where`` for an unknown field or one
    whose value differs between the cell's runs."""
    if key in c["cell"]:
        return c["cell"][key]
    try:
        path = field_path(key)
    except ConfigError as exc:
        raise SweepError(f"{where} = {key!r}: {exc}") from None
    seen = {}
    for r in c["runs"]:
        v = r["config"]
        for part in path:
            v = v[part]
        seen[json.dumps(v)] = v
    if len(seen) > 1:
        raise SweepError(f"{where} = {key!r} differs between the runs of the cell {cell_label(c['cell'])}: "
                         f"{', '.join(seen)}")
    return next(iter(seen.values()), None)


def _x_of(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _model_label(cell, many):
    """'trained EXPERIMENT [rest of the cell]' for a sweep over experiments, else
    'trained LSA [cell]' (a sweep of one LSA experiment)."""
    if "experiment" in cell:
        rest = {k: v for k, v in cell.items() if k != "experiment"}
        return f"trained {cell['experiment']}" + (f" {cell_label(rest)}" if rest else "")
    return "trained LSA" + (f" {cell_label(cell)}" if many else "")


def figure_curves(fig_spec, cells, title, path):
    plt = _plt()
    metric = fig_spec.get("metric", "loss")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    data = []
    many = len(cells) > 1
    # a baseline with one value in every cell (e.g. GD-1 of two models on the same tasks) is drawn once
    shared = {}
    for b in fig_spec.get("baselines", []):
        vs = [interval([value(r, b) for r in c["runs"]])["mean"] for c in cells]
        if many and None not in vs and np.allclose(vs, vs[0], rtol=1e-9, atol=0):
            shared[b] = vs[0]
    for i, c in enumerate(cells):
        cv = curves(c, metric)
        if not cv:
            continue
        steps = np.array(list(cv))
        mean = np.array([cv[s]["mean"] for s in cv], dtype=float)
        lo = np.array([cv[s]["lo"] for s in cv], dtype=float)
        hi = np.array([cv[s]["hi"] for s in cv], dtype=float)
        color = f"C{i}"
        n = len(c["runs"])
        label = f"{_model_label(c['cell'], many)} (mean of {n} seed{'s' * (n > 1)})"
        if len(steps) == 1:
            # one evaluation (a run answered by a committed record keeps its final row, not its curve):
            # a line through one point draws nothing, so it is a marker with its interval, and says so
            ax.errorbar(steps, mean, yerr=None if n == 1 else np.abs(np.array(drawn_band(metric, lo, hi)) - mean),
                        color=color, marker="o", ms=6, capsize=3, ls="none",
                        label=label + ": final evaluation only (no curve stored)")
        else:
            ax.plot(steps, mean, color=color, lw=1.8, label=label)
        if n > 1 and len(steps) > 1:
            ax.fill_between(steps, *drawn_band(metric, lo, hi), color=color, alpha=0.25, lw=0)
        base = {}
        logy = fig_spec.get("logy", metric == "loss")
        floor = 1e-3 * np.nanmin(lo) if logy else -np.inf
        for b in fig_spec.get("baselines", []):
            v = interval([value(r, b) for r in c["runs"]])["mean"]
            if v is None:
                continue
            base[b] = v
            if b in shared and i > 0:             # drawn with the first cell, for all of them
                continue
            one = b in shared or not many
            label = LABELS.get(b, b) + ("" if one else f" ({cell_label(c['cell'])})") + f": {v:.4g}"
            style = dict(color="k" if one else color, ls=STYLES.get(b, "--"), lw=1.2)
            if v < floor:       # e.g. least squares at rounding level: named, not drawn, so the axis stays readable
                ax.plot([], [], label=label + " (below the axis)", **style)
            else:
                ax.axhline(v, label=label, **style)
        data.append({"cell": c["cell"], "steps": steps.tolist(), "mean": mean.tolist(), "lo": lo.tolist(),
                     "hi": hi.tolist(), "baselines": base, "final_only": len(steps) == 1})
    ax.set(xlabel="training step", ylabel=_metric_label(metric), title=fig_spec.get("title", title))
    if fig_spec.get("logy", metric == "loss"):
        ax.set_yscale("log")
    if fig_spec.get("logx"):
        ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)
    return {"kind": "curves", "metric": metric, "series": data}


def figure_versus(fig_spec, cells, title, path):
    plt = _plt()
    xkey, metric = fig_spec["x"], fig_spec.get("metric", "loss")
    by = fig_spec.get("by")
    groups, xval = {}, {}
    for c in cells:
        x = cell_value(c, xkey, f"report figure {fig_spec.get('name')}: x")
        if x is None:                            # no done run yet: nothing to draw
            continue
        xval[c["key"]] = _x_of(x)
        g = c["cell"].get(by, "") if by else ""
        groups.setdefault(g, []).append(c)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = []
    names = [metric] + list(fig_spec.get("baselines", []))

    def points(cs, m):                           # {x: mean of m over the seeds}
        return {xval[c["key"]]: interval([value(r, m) for r in c["runs"]])["mean"] for c in cs}

    # a baseline with the same values at the same x in every group (ridge of two models on the
    # same tasks) is drawn once
    shared = set()
    if len(groups) > 1:
        for m in names[1:]:
            ps = [points(cs, m) for cs in groups.values()]
            if all(p.keys() == ps[0].keys() and None not in p.values()
                   and np.allclose(list(p.values()), list(ps[0].values()), rtol=1e-9, atol=0) for p in ps):
                shared.add(m)
    for gi, (g, cs) in enumerate(groups.items()):
        cs = sorted(cs, key=lambda c: xval[c["key"]])
        xs = np.array([xval[c["key"]] for c in cs], dtype=float)
        for j, m in enumerate(names):
            if m in shared and gi > 0:              # drawn with the first group, for all of them
                continue
            iv = [interval([value(r, m) for r in c["runs"]]) for c in cs]
            mean = np.array([np.nan if v["mean"] is None else v["mean"] for v in iv])
            if np.all(np.isnan(mean)):
                continue
            lo = np.array([np.nan if v["lo"] is None else v["lo"] for v in iv])
            hi = np.array([np.nan if v["hi"] is None else v["hi"] for v in iv])
            label = LABELS.get(m, m) + (f" ({by}={g})" if by and m not in shared else "")
            color = "k" if m in shared else f"C{gi * len(names) + j}" if by else f"C{j}"
            if fig_spec.get("logy") and m != metric and series and np.nanmax(mean) < 1e-3 * np.nanmin(series[0]["lo"]):
                ax.plot([], [], "s", ls=STYLES.get(m, "--"), color=color, label=label + f" ({np.nanmax(mean):.2g}, below the axis)")
                continue
            if m == metric:
                ax.plot(xs, mean, "o-", color=color, lw=2, label=label)
                if max(v["n"] for v in iv) > 1:
                    ax.fill_between(xs, *drawn_band(m, lo, hi), color=color, alpha=0.25, lw=0)
            else:
                ax.plot(xs, mean, "s", ls=STYLES.get(m, "--"), color=color, lw=1.2, ms=4, label=label)
            series.append({"group": g, "value": m, "x": xs.tolist(), "mean": mean.tolist(), "lo": lo.tolist(),
                           "hi": hi.tolist(), "n": [v["n"] for v in iv]})
    ref = fig_spec.get("reference")
    if ref:
        ax.plot(ref["x"], ref["y"], "k*", ms=10, label=ref.get("label", "reference"))
    ax.set(xlabel=X_LABELS.get(xkey, xkey), ylabel=_metric_label(metric), title=fig_spec.get("title", title))
    if fig_spec.get("logy"):
        ax.set_yscale("log")
    if fig_spec.get("logx"):
        ax.set_xscale("log")
    elif xval and all(float(x).is_integer() for x in xval.values()):
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # K = 1..5, not 1.5
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)
    return {"kind": "versus", "x": xkey, "metric": metric, "series": series, "reference": ref}


def figure_ood(fig_spec, cells, title, path):
    plt = _plt()
    axis = fig_spec.get("axis", "input")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = []
    many = len(cells) > 1
    for i, c in enumerate(cells):
        rs = [r for r in c["runs"] if ((r.get("analysis") or {}).get("ood") or {}).get(axis)]
        if not rs:
            continue
        alpha = np.array(rs[0]["analysis"]["ood"][axis]["alpha"], dtype=float)
        for j, m in enumerate(("model", "gd", "gdpp", "lstsq")):
            ys = np.array([r["analysis"]["ood"][axis][m] for r in rs], dtype=float)
            mean = ys.mean(0)
            iv = [interval(ys[:, k]) for k in range(ys.shape[1])]
            color = f"C{i}" if many else f"C{j}"
            label = {"model": "trained LSA", "gd": LABELS["gd"], "gdpp": LABELS["gdpp"], "lstsq": "least squares"}[m]
            model_min = np.nanmin(np.array([r["analysis"]["ood"][axis]["model"] for r in rs], dtype=float))
            if m != "model" and np.nanmax(mean) < 1e-3 * model_min:    # rounding level: named, not drawn
                ax.plot([], [], color=color, ls=STYLES[m], label=label + f" (<= {np.nanmax(mean):.2g}, below the axis)")
                continue
            if m == "model":
                label = _model_label(c["cell"], many)
            elif many:
                label += f" ({cell_label(c['cell'])})"
            ax.plot(alpha, mean, color=color, ls="-" if m == "model" else STYLES[m], lw=1.8 if m == "model" else 1.2,
                    label=label)
            if m == "model" and len(rs) > 1:
                ax.fill_between(alpha, *drawn_band("loss", [v["lo"] for v in iv], [v["hi"] for v in iv]), color=color,
                                alpha=0.25, lw=0)
            series.append({"cell": c["cell"], "value": m, "alpha": alpha.tolist(), "mean": mean.tolist(),
                           "lo": [v["lo"] for v in iv], "hi": [v["hi"] for v in iv]})
    ax.set(xlabel=f"{'input' if axis == 'input' else 'teacher'} scale alpha "
                  f"({'x ~ alpha U(x_low, x_high)' if axis == 'input' else 'W ~ alpha w_scale N(0, I)'})",
           ylabel="loss", title=fig_spec.get("title", title))
    ax.set_yscale("log" if fig_spec.get("logy", True) else "linear")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)
    return {"kind": "ood", "axis": axis, "series": series}


SEQ_BASELINES = {"gd": ("GD, one step (Prop. 1, eta line-searched)", "--"),
                 "lstsq": ("ridge (lambda 1e-3) on the pairs before t", "-."),
                 "prop2": ("Prop. 2 construction, same depth", ":"),
                 "cheb": ("Chebyshev iteration as coded", (0, (1, 2)))}


def per_t_curve(runs, get):
    """(mean, lo, hi) arrays over t of the per-t curves ``get(run)`` of ``runs``
    (None when a run lacks the curve or the runs' lengths differ)."""
    ys = [get(r) for r in runs]
    if not ys or any(y is None for y in ys) or len({len(y) for y in ys}) != 1:
        return None
    ys = np.asarray(ys, dtype=float)
    iv = [interval(ys[:, k]) for k in range(ys.shape[1])]
    return (np.array([v["mean"] for v in iv]), np.array([v["lo"] for v in iv]), np.array([v["hi"] for v in iv]))


def figure_per_t(fig_spec, cells, title, path):
    """Sequence models (the mesa paper's main figure): each cell's final per-time-step
    evaluation loss l_t, t = 1..T (mean and 95% interval over seeds), with the baselines'
    per-t curves; a baseline equal in every cell (GD, ridge: the same evaluation set) is
    drawn once in black, one that depends on the cell (Prop. 2 at the model's depth) in
    the cell's colour."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    series = []
    many = len(cells) > 1
    names = fig_spec.get("baselines", ["gd", "lstsq", "prop2"])
    drawn_shared = {}
    done = [[r for r in c["runs"] if r["history"] and r["history"][-1].get("per_t") is not None] for c in cells]
    for i, (c, runs) in enumerate(zip(cells, done)):
        model = per_t_curve(runs, lambda r: r["history"][-1]["per_t"])
        if model is None:
            continue
        color = f"C{i}"
        t = np.arange(1, len(model[0]) + 1)
        n = len(runs)
        label = _model_label(c["cell"], many) + f" (step {runs[0]['history'][-1]['step']}, {n} seed{'s' * (n > 1)})"
        ax.plot(t, model[0], color=color, lw=2, label=label)
        if n > 1:
            ax.fill_between(t, *drawn_band("loss", model[1], model[2]), color=color, alpha=0.25, lw=0)
        entry = {"cell": c["cell"], "t": t.tolist(), "model": {"mean": model[0].tolist(), "lo": model[1].tolist(),
                                                              "hi": model[2].tolist()}, "baselines": {}}
        for b in names:
            cur = per_t_curve(runs, lambda r, b=b: (r.get("baselines") or {}).get(f"{b}_per_t"))
            if cur is None:
                continue
            entry["baselines"][b] = cur[0].tolist()
            others = [per_t_curve(o, lambda r, b=b: (r.get("baselines") or {}).get(f"{b}_per_t")) for o in done if o]
            shared = all(o is not None and np.allclose(o[0], cur[0], rtol=1e-9, atol=0) for o in others)
            name, ls = SEQ_BASELINES.get(b, (b, "--"))
            if shared:
                if b in drawn_shared:
                    continue
                drawn_shared[b] = True
                ax.plot(t, cur[0], color="k", ls=ls, lw=1.2, label=name)
            else:
                ax.plot(t, cur[0], color=color, ls=ls, lw=1.2, label=f"{name} ({cell_label(c['cell'])})")
        series.append(entry)
    ax.set(xlabel="time step t (pairs seen so far: t - 1)",
           ylabel="l_t = mean over sequences of 0.5 ||y_hat_t - y_t||^2, y_t = s_{t+1}", title=fig_spec.get("title", title))
    ax.set_yscale("log" if fig_spec.get("logy", True) else "linear")
    ax.grid(alpha=0.3, which="both")
    if series:
        ax.legend(fontsize=7)
    else:                                   # every cell still pending: say so on the figure
        ax.text(0.5, 0.5, "no finished runs yet", transform=ax.transAxes, ha="center")
    _save(fig, path)
    return {"kind": "per_t", "series": series, "shared_baselines": list(drawn_shared)}


def _metric_label(m):
    return {"loss": "loss 0.5 E||y_hat - y_q||^2 (eval set)", "gamma": "gamma (curvature correction)",
            "model_cos_gd": "model cosine vs GD", "model_cos_gdpp": "model cosine vs GD++",
            "preds_diff_gd": "prediction difference vs GD", "model_diff_gd": "model difference vs GD"}.get(m, m)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


DRAW = {"curves": figure_curves, "versus": figure_versus, "ood": figure_ood, "per_t": figure_per_t}


# ---- the report -----------------------------------------------------------------------------------

# table headers where a figure's legend label would not say what the column holds
HEADERS = {"loss": "loss (the trained model)",
           "model_cos_gd": "cos(trained LSA, GD-K) of implicit models (d pred / d x_query)",
           "model_cos_gdpp": "cos(trained LSA, GD++) of implicit models"}


def column_header(metric):
    """The table header of ``metric``: its label, or a converged baseline's label with
    "meta-steps run" for its ``*_steps`` count; the raw key when it has neither."""
    if metric in HEADERS:
        return HEADERS[metric]
    if metric.endswith("_steps") and metric[:-len("_steps")] in LABELS:
        return LABELS[metric[:-len("_steps")]] + ": meta-steps run"
    return LABELS.get(metric, metric)


def _num(x):
    """``x`` to 4 significant digits; a whole number (a step count) in full."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def _fmt(iv):
    if iv["mean"] is None:
        return "-"
    if iv["n"] == 1 or iv["std"] is None:
        return _num(iv["mean"])
    return f"{_num(iv['mean'])} [{_num(iv['lo'])}, {_num(iv['hi'])}]"


def build(out_dir, report_dir, file_spec=None):
    """The report of the sweep in ``out_dir``. ``file_spec`` (a sweep file's spec, as
    ``icgd report FILE`` passes it): its [report] table replaces the one stored when the
    sweep ran, so a figure's settings can change without retraining; the file must name
    the stored sweep and the same grid."""
    name, spec, cells = load(out_dir)
    if file_spec is not None:
        fs = file_spec.to_dict()
        same = ("name", "experiments", "seeds", "fixed", "grid", "cases", "baselines", "quick")
        diff = [k for k in same if k in spec and json.dumps(fs.get(k), sort_keys=True) != json.dumps(spec[k], sort_keys=True)]
        if diff:
            raise SweepError(f"the sweep file and the sweep in {out_dir} differ in {', '.join(diff)}: run icgd sweep "
                             f"with the file first (done runs are kept), or give the sweep directory alone")
        spec = {**spec, "report": fs.get("report") or {}}
    rep_cfg = spec.get("report") or {}
    metrics = list(rep_cfg.get("metrics", DEFAULT_METRICS))
    agg = aggregate(cells, metrics)
    metrics = [m for m in metrics if any(a["metrics"][m]["n"] for a in agg)]
    title = rep_cfg.get("title", name)
    if spec.get("quick"):
        title += " (quick settings: fewer steps than the paper; see the config)"
    os.makedirs(report_dir, exist_ok=True)
    figures = []
    for i, f in enumerate(rep_cfg.get("figure", [])):
        fname = f.get("name", f"{f['kind']}{i}") + ".png"
        sel = cells if "cells" not in f else [c for c in cells if cell_label(c["cell"]) in f["cells"]]
        data = DRAW[f["kind"]](f, sel, title, os.path.join(report_dir, fname))
        figures.append({"file": fname, **data})
    n_runs = sum(len(c["runs"]) for c in cells)
    rep = {"name": name, "title": title, "description": spec.get("description", ""), "quick": spec.get("quick", False),
           "sweep_dir": out_dir, "experiments": spec.get("experiments"), "seeds": spec.get("seeds"),
           "fixed": spec.get("fixed"), "grid": spec.get("grid"), "baselines": spec.get("baselines"),
           "runs_done": n_runs, "interval": "95% Student-t interval over seeds", "cells": agg, "figures": figures}
    write_text_atomic(os.path.join(report_dir, "report.json"), json.dumps(rep, indent=1) + "\n")
    md = to_markdown(rep, metrics)
    write_text_atomic(os.path.join(report_dir, "report.md"), md)
    write_text_atomic(os.path.join(report_dir, "report.html"), to_html(rep, metrics, report_dir))
    return rep


def _table(rep, metrics):
    head = ["cell", "seeds"] + [column_header(m) for m in metrics]
    rows = []
    for a in rep["cells"]:
        note = (f" ({a['failed']} failed)" if a["failed"] else "") + (f" ({a['pending']} pending)" if a["pending"] else "")
        rows.append([cell_label(a["cell"]), f"{len(a['seeds'])}{note}"] + [_fmt(a["metrics"][m]) for m in metrics])
    return head, rows


def to_markdown(rep, metrics):
    lines = [f"# {rep['title']}", "", rep["description"], "",
             f"Sweep `{rep['name']}`: experiments {rep['experiments']}, seeds {rep['seeds']}, grid "
             f"`{json.dumps(rep['grid'])}`, fixed `{json.dumps(rep['fixed'])}`"
             + (f", extra baselines `{json.dumps(rep['baselines'])}`" if rep["baselines"] else "") + ".",
             f"Each entry: mean over seeds [{rep['interval']}].", ""]
    head, rows = _table(rep, metrics)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    for f in rep["figures"]:
        lines += [f"![{f['file']}]({f['file']})", ""]
    return "\n".join(lines)


def to_html(rep, metrics, report_dir):
    head, rows = _table(rep, metrics)
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(rep['title'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>",
             f"<h1>{e(rep['title'])}</h1><p>{e(rep['description'])}</p>",
             f"<p>Sweep <code>{e(rep['name'])}</code>, seeds {e(str(rep['seeds']))}, grid "
             f"<code>{e(json.dumps(rep['grid']))}</code>, fixed <code>{e(json.dumps(rep['fixed']))}</code>. "
             f"Each entry: mean over seeds [{e(rep['interval'])}].</p><table><tr>"
             + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table>")
    for f in rep["figures"]:
        with open(os.path.join(report_dir, f["file"]), "rb") as fh:
            b64 = base64.b64encode(fh.read()).decode()
        parts.append(f"<h3>{e(f['file'])}</h3><img alt='{e(f['file'])}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def add_arguments(p):
    p.add_argument("sweep", metavar="SWEEP", help="a sweep directory, or a sweep file (its default directory)")
    p.add_argument("--quick", action="store_true", help="with a sweep file: its --quick directory (NAME-quick)")
    p.add_argument("--sweep-dir", metavar="DIR", help="with a sweep file: the sweep directory (icgd sweep --out)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default SWEEP_DIR/report)")


def run(args):
    try:
        file_spec = None
        if os.path.isfile(args.sweep):
            file_spec = spec_from_file(args.sweep, quick=args.quick)
            sweep_dir = args.sweep_dir or default_out(file_spec)
        else:
            sweep_dir = args.sweep
        rep = build(sweep_dir, args.out or os.path.join(sweep_dir, "report"), file_spec)
    except (SweepError, StoreError) as exc:
        print(f"icgd report: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(sweep_dir, "report")
    print(f"icgd report {rep['name']}: {rep['runs_done']} runs in {len(rep['cells'])} cells, "
          f"{len(rep['figures'])} figures -> {out}/report.md, report.html, report.json")
    return 0
