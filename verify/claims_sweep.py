"""Claims read from sweeps (issue #18): the committed sweep files under verify/figures/
are run with ``verify.sweep`` into ``ctx.workdir/sweeps/NAME`` (a store that skips the
runs already done there, so a second verify run trains nothing) and checked.

Full mode only: the gamma-vs-N grid is 20 runs of the paper's 5000 steps (N up to 100),
the recurrent 10-layer grid 5 runs with GD++ meta-trained to convergence, and the layers
grid 15 runs of 50,000 steps; none fits the quick mode's 1-minute budget.
"""

import os

from . import sweep as S
from .pool import threads_per_worker
from .registry import Outcome, claim
from .report_sweep import converged_per_layer, interval, load, value

SRC = "von Oswald et al. ICML'23"
FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
PAPER_GAMMA = {10: 0.179, 25: 0.099, 50: 0.056, 100: 0.029}     # Sec. 4, recurrent 2-layer


def sweep_cells(ctx, name):
    """Run (or finish) the committed sweep ``name`` in the work directory; its cells."""
    spec = S.spec_from_file(os.path.join(FIGURES, name + ".toml"), quick=not ctx.full)
    out = os.path.join(ctx.workdir, "sweeps", spec.name + ("-quick" if spec.quick else ""))
    workers = S.default_workers("local")
    counts = S.run_sweep(spec, out, S.LocalEngine(workers), threads=threads_per_worker(workers), progress=True)
    if counts["failed"]:
        raise RuntimeError(f"{counts['failed']} run(s) of sweep {name} failed; icgd sweep status {out} says why")
    return load(out)[2]


@claim("sweep.gamma_vs_N.matches_paper", source=f"{SRC}, Sec. 4 (gamma = 0.179, 0.099, 0.056, 0.029)",
       statement="Read as a GD++ layer, the trained recurrent two-layer model has the paper's curvature correction "
                 "gamma for N = 10, 25, 50 and 100",
       method="sweep verify/figures/gamma_vs_N.toml (recurrent2, 5000 steps, 5 seeds per N); gamma = -mean diagonal "
              "of the x-block of the rescaled W_PV; worst |mean gamma - paper| / paper over N (per-seed values, the "
              "fixed-step and converged GD++ gammas in the details)",
       modes=("full",))
def _(ctx):
    cells = sweep_cells(ctx, "gamma_vs_N")
    rows = {}
    for c in cells:
        N = int(c["cell"]["N"])
        iv = interval([value(r, "gamma") for r in c["runs"]])
        rows[N] = {"paper": PAPER_GAMMA[N], "mean": iv["mean"], "lo": iv["lo"], "hi": iv["hi"],
                   "per_seed": [value(r, "gamma") for r in c["runs"]],
                   "gdpp_gamma": interval([value(r, "gdpp_gamma") for r in c["runs"]])["mean"],
                   "gdpp_converged_gamma": interval([value(r, "gdpp_converged_gamma") for r in c["runs"]])["mean"],
                   "rel_err": abs(iv["mean"] - PAPER_GAMMA[N]) / PAPER_GAMMA[N]}
    worst = max(r["rel_err"] for r in rows.values())
    return Outcome.at_most(worst, 0.15,
                           "the paper gives two to three digits from its own runs; 15% separates the trained value "
                           "from a GD-like model (gamma near 0) and from the neighbouring N's gamma (ratios 1.8, "
                           "1.8, 1.9 between consecutive N)", by_N=rows)


@claim("sweep.recurrent10.vs_converged_gdpp", source=f"{SRC}, Sec. 4 (recurrent K=10 vs GD++)",
       statement="Against GD++ meta-trained to convergence (shared eta, gamma), the recurrent ten-layer model does "
                 "not reach it: its loss stays above the converged GD++'s (the paper's 1000-step GD++ is beaten)",
       method="sweep verify/figures/recurrent10.toml (5000 steps, 5 seeds); GD++ to convergence: relative eval-loss "
              "improvement < 1e-4 over each of 3 windows of 1000 Adam steps in a row, not before the paper's 1000 (at most "
              "30,000), its lowest evaluated loss; smallest L_model / L_GD++conv over seeds",
       modes=("full",))
def _(ctx):
    cells = sweep_cells(ctx, "recurrent10")
    rs = [r for c in cells for r in c["runs"]]
    ratio = [value(r, "loss") / value(r, "gdpp_converged") for r in rs]
    return Outcome.at_least(min(ratio), 1.0,
                            "an honest comparison: the model is compared with a GD++ that has stopped improving; a "
                            "ratio below 1 would mean the model beats converged GD++",
                            model=[value(r, "loss") for r in rs], gdpp_fixed=[value(r, "gdpp") for r in rs],
                            gdpp_converged=[value(r, "gdpp_converged") for r in rs],
                            gdpp_converged_steps=[value(r, "gdpp_converged_steps") for r in rs],
                            converged=[(r["analysis"]["extra_baselines"]["gdpp_converged_shared"]["converged"])
                                       for r in rs])


@claim("sweep.layers.k5_beats_converged_gdpp", source=f"{SRC}, Sec. 4, Fig. 3 (non-recurrent K layers vs GD++)",
       statement="Against per-layer GD++ meta-trained well past the paper's 30,000 steps (until the convergence "
                 "rule holds, at most 100,000 steps), the trained five-layer non-recurrent LSA still has the lower "
                 "loss",
       method="sweep verify/figures/layers.toml (K = 1..5, 50,000 steps, 3 seeds); per-layer GD++ to convergence: "
              "relative eval-loss improvement < 1e-4 over each of 3 windows of 1000 Adam steps in a row, not before "
              "the paper's 30,000, at most 100,000 steps, its lowest evaluated loss (never above the paper's "
              "protocol, whose 30,000-step iterate it passes); largest L_model / L_GD++conv over the K = 5 seeds "
              "(every K in the details)",
       modes=("full",))
def _(ctx):
    cells = sweep_cells(ctx, "layers")
    by_k = {}
    for c in cells:
        rs = c["runs"]
        K = rs[0]["config"]["model"]["n_layers"]
        by_k[K] = {"model": [value(r, "loss") for r in rs], "gd": value(rs[0], "gd"),
                   "gdpp_fixed": value(rs[0], "gdpp"), "gdpp_converged": value(rs[0], "gdpp_converged_per_layer"),
                   "gdpp_converged_steps": value(rs[0], "gdpp_converged_per_layer_steps"),
                   "gdpp_converged_met_rule": converged_per_layer(rs[0]).get("converged"),
                   "ratio": [value(r, "loss") / value(r, "gdpp_converged_per_layer") for r in rs]}
    five = by_k[5]
    return Outcome.at_most(max(five["ratio"]), 1.0,
                           "a ratio below 1 at every seed means the model beats GD++ trained more than three times "
                           "as long as the paper trains it; whether GD++ met the rule or stopped at 100,000 steps "
                           "(then still slowly descending) is in the details, so the margin says how far the lead "
                           "could shrink; the paper shows the five-layer model at GD++, not below it",
                           by_K=by_k)
