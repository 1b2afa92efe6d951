"""Claims of the classic-token experiment (issue #15): a softmax layer learns to copy
each label next to its input (an induction-head-like band), and a linear layer on top
then does one GD step.

von Oswald et al. ICML'23, Sec. 4 and App. A.5 (paper-settings.md 7, 7a). Two
non-recurrent layers on classic tokens x_1, (0, y_1), ..., x_N, (0, y_N), x_q with
concatenated sin/cos encodings of width 10: ``induction`` (layer 1 softmax, layer 2
linear) and ``induction_linear`` (both linear, which the paper could not train). Each
evaluation row of such a run carries the first layer's copy sensitivities
(``reference.copy_analysis.copy_sensitivities`` on the first COPY_TASKS eval tasks:
``copy_self``, ``copy_next``, ``copy_other``). Every claim here needs the paper's length
(10,000 steps; the loss drops late): full mode only.

Full-mode results (5 seeds, 10,000 steps, verify/results/induction-full.md; figures in
verify/figures/results/induction/): seeds 0, 2 and 3 reach 1.042-1.044 x GD-1 (0.2193-0.2198
vs 0.2105) with the sub-diagonal copy band in the first layer (mean weight 0.69-0.77 from
each x token to its label's token); seed 4 ends at 1.094 x (band 0.34) and seed 1 never
copies (its first layer attends to the token itself, copy_self 0.65; loss 0.399, 1.90 x).
The next-token sensitivity peaks when the loss drops (seed 0: 0.74 at step 5000) and then
decays (0.55, 0.31, 0.49 at the end on seeds 0, 2, 3; the paper: 0.8-1.0). So
loss_equals_gd1, learns_to_copy, attention_band and copy_before_drop fail as measured
(each on the seeds that did not copy, or on the decayed sensitivity); not_gd2,
others_stay_small and induction_linear.misses_gd1 (1.44-1.53 x GD-1) pass.
"""

import numpy as np

from reference import analysis as A
from reference.copy_analysis import attention_maps
from reference.tasks import STREAM_EVAL, stream_rng
from reference.trainer import gd_k_baseline

from . import runs as R
from .claims_training import _final_loss, _per_seed, runs
from .registry import Outcome, claim

SRC = "von Oswald et al. ICML'23"
MAP_TASKS = 256


def gd2_loss(r):
    """GD-2 (line-searched eta, as the GD-K baselines) on the run's eval set."""
    return gd_k_baseline(r.config, 2)


def copy_band(r):
    """Mean attention weight of the first layer from each x token to the next (its label's)
    token, and the largest mean weight from an x token to any other key."""
    cfg = r.config
    ev = cfg.task_spec(MAP_TASKS).sample(stream_rng(cfg.eval.eval_seed, STREAM_EVAL))
    A1 = attention_maps(r.params, cfg.arch(), cfg.layout(), A.cast_tasks(ev, cfg.np_dtype))[0].mean(axis=0)   # (T, S)
    T = A1.shape[0]
    xs = list(range(0, T - 1, 2))
    band = float(np.mean([A1[j, j + 1] for j in xs]))
    off = float(max(A1[j, i] for j in xs for i in range(A1.shape[1]) if i != j + 1))
    return {"band": band, "largest_off_band": off, "map": A1.tolist()}


def _history(r, key):
    return [(row["step"], row[key]) for row in r.history if key in row]


def copy_timing(r):
    """The first step where copy_next reaches 0.5 and the loss-drop step
    (:func:`verify.runs.loss_drop_step`: the loss at or below the midpoint between the
    zero predictor's loss, the plateau before any copy, and GD-1's)."""
    nxt = _history(r, "copy_next")
    s_copy = next((s for s, v in nxt if v >= 0.5), None)
    s_loss = R.loss_drop_step(r.history, r.baselines)
    return {"copy_next_reaches_0.5": s_copy, "loss_below_midpoint": s_loss, "eval_every": r.config.eval.eval_every}


@claim("training.induction.loss_equals_gd1", source=f"{SRC}, Sec. 4 (classic tokens)", modes=("full",),
       statement="Two layers on classic tokens (layer 1 softmax, layer 2 linear) trained from scratch reach the GD-1 "
                 "loss",
       method="induction experiment (init 0.01, Adam lr 1e-3 b2 0.98, batch 2048, clip 10, 10,000 steps, 5 seeds); "
              "worst |L_model - L_GD1| / L_GD1 on the 10,000-task eval set")
def _(ctx):
    rs = runs(ctx, "induction")
    rel = [abs(_final_loss(r) - r.baselines["gd_loss"]) / r.baselines["gd_loss"] for r in rs]
    return Outcome.at_most(max(rel), 0.05,
                           "the paper's trained model reaches GD-1 about an order of magnitude more slowly than on "
                           "constructed tokens; the copy at the official encoding width is approximate (the best "
                           "shift copy is 1.06-1.08 x GD-1, claims copy.*), so 5% rather than the 2% of "
                           "constructed tokens",
                           losses=_per_seed(rs, lambda r: {"model": _final_loss(r), "gd1": r.baselines["gd_loss"]}))


@claim("training.induction.not_gd2", source=f"{SRC}, Sec. 4", modes=("full",),
       statement="The two-layer classic-token model does one GD step, not two: its loss stays above GD-2's",
       method="smallest L_model / L_GD2 over seeds (GD-2 with its own line-searched eta on the eval set)")
def _(ctx):
    rs = runs(ctx, "induction")
    info = _per_seed(rs, lambda r: dict(zip(("gd2", "gd2_eta"), gd2_loss(r)), model=_final_loss(r)))
    ratio = min(v["model"] / v["gd2"] for v in info.values())
    return Outcome.at_least(ratio, 1.1,
                            "GD-2 is 0.75 of GD-1 (0.158 vs 0.2105 at d = N = 10); the first layer spends itself on "
                            "the copy, so the second can do only one step; a model at GD-1 gives 1.33",
                            losses=info)


@claim("training.induction.learns_to_copy", source=f"{SRC}, Sec. 4 (copy diagnostic)", modes=("full",),
       statement="The first layer learns to copy: its update at each x token depends on the next token (the label's) "
                 "with sensitivity about 1, and little on the others",
       method="copy sensitivities of the first layer at the last evaluation (Frobenius norms of d Delta_j / d e_i "
              "averaged over x tokens j and 64 eval tasks); smallest copy_next over seeds (copy_other in the details)")
def _(ctx):
    rs = runs(ctx, "induction")
    last = _per_seed(rs, lambda r: {k: r.history[-1][k] for k in ("copy_self", "copy_next", "copy_other")})
    worst = min(v["copy_next"] for v in last.values())
    return Outcome.at_least(worst, 0.7,
                            "the paper reports 0.8-1.0 for the next-token sensitivity; an exact copy has 1 "
                            "(sqrt(d_y)); at init it is about 0; 0.7 leaves room for the official width's "
                            "approximate copy",
                            sensitivities=last)


@claim("training.induction.others_stay_small", source=f"{SRC}, Sec. 4 (copy diagnostic)", modes=("full",),
       statement="The first layer's sensitivity to tokens other than itself and the next stays small",
       method="largest copy_other over the evaluations and seeds")
def _(ctx):
    rs = runs(ctx, "induction")
    worst = max(v for r in rs for _, v in _history(r, "copy_other"))
    return Outcome.at_most(worst, 0.2,
                           "the paper's other-token sensitivity stays near 0; 0.2 is a fifth of the copy's",
                           per_seed=_per_seed(rs, lambda r: max(v for _, v in _history(r, "copy_other"))))


@claim("training.induction.copy_before_drop", source=f"{SRC}, Sec. 4 (the copy forms just before the loss drops)",
       modes=("full",),
       statement="The copy forms before the loss drops: copy_next reaches 0.5 no later than the loss falls halfway "
                 "from the zero predictor's loss (the plateau before any copy) to GD-1",
       method="first evaluation step of each event; largest (copy step - loss step) over seeds, in evaluation "
              "intervals")
def _(ctx):
    rs = runs(ctx, "induction")
    info = _per_seed(rs, copy_timing)
    lags = []
    for v in info.values():
        a, b = v["copy_next_reaches_0.5"], v["loss_below_midpoint"]
        lags.append(np.inf if a is None or b is None else (a - b) / v["eval_every"])
    return Outcome.at_most(max(lags), 0.0,
                           "the paper's Fig. shows the sensitivity rising just before the loss drops; 0 intervals "
                           "means no later than the loss (both read at the same evaluations)",
                           timing=info)


@claim("training.induction.attention_band", source=f"{SRC}, Sec. 4 (sub-diagonal attention band)", modes=("full",),
       statement="The first layer's attention map shows the copy band: each x token attends to the next token",
       method=f"softmax weights of layer 1 averaged over {MAP_TASKS} eval tasks; mean weight from x token j to token "
              "j + 1; smallest over seeds (largest off-band weight in the details)")
def _(ctx):
    rs = runs(ctx, "induction")
    info = _per_seed(rs, copy_band)
    worst = min(v["band"] for v in info.values())
    return Outcome.at_least(worst, 0.5,
                            "uniform attention over the 20 context tokens gives 0.05; a copy puts most of the "
                            "weight on the next token",
                            band={k: {"band": v["band"], "largest_off_band": v["largest_off_band"]}
                                  for k, v in info.items()})


@claim("training.induction_linear.misses_gd1", source=f"{SRC}, Sec. 4 (an all-linear model)", modes=("full",),
       statement="Two linear layers trained the same way on classic tokens do not reach GD-1 (the paper could not "
                 "train one)",
       method="induction_linear experiment (as induction, both layers LSA); smallest L_model / L_GD1 over seeds")
def _(ctx):
    rs = runs(ctx, "induction_linear")
    ratio = [_final_loss(r) / r.baselines["gd_loss"] for r in rs]
    return Outcome.at_least(min(ratio), 1.1,
                            "a linear copy from the official width-10 encodings is as far from GD as predicting "
                            "zero (claims copy.*: relative MSE 0.96), so a linear first layer cannot build the "
                            "tokens GD needs; 10% is twice the margin of the softmax model's claim",
                            losses=_per_seed(rs, lambda r: {"model": _final_loss(r), "gd1": r.baselines["gd_loss"]}))
