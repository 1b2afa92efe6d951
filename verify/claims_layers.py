"""Claims of the models beyond linear attention (issue #14): softmax attention, LayerNorm
and the sine-regression transformer against "MLP + GD".

von Oswald et al. ICML'23, Sec. 5 and App. A.9 (paper-settings.md sections 7, 7a). Runs
are trained once per verify run by :mod:`verify.claims_training` (same memo, pool and
run directories); each claim's reason says what was measured at which length. Negative
claims (one softmax head does not reach GD) are full-only: a shortened run that has not
reached GD proves nothing.

Full-mode results (5 seeds, verify/results/softmax-full.md): one head misses GD-1 (1.39 x),
two heads align with GD (model cos 0.958) but plateau 6.5-7% above GD-1's loss (0.2242-0.2253
vs 0.2105 from step 3000 to 5000), so ``training.softmax2.loss_equals_gd1`` fails at its 3%;
and their W_KQ x-blocks have opposite diagonals with equal off-diagonal parts, so
``training.softmax2.heads_cancel`` (the sign-reversed off-diagonals of the issue's reading of
App. A.9) fails while ``heads_opposite_diagonals`` passes. Both failures are kept as measured.

Full-mode sine results (5 seeds, 20,000 steps, verify/results/sine-full.md): the transformer
ends at 1.05-1.37e-3 and MLP + GD at 1.44-1.47e-3 on seeds 1-4 and 1.95e-3 on seed 0 (the
paper: both about 1e-3), so the worst ratio is 1.86 (seed 0; 1.05-1.29 on the others) and
``training.sine.loss_near_mlp_gd`` fails at its 1.5; both models were still improving
slowly at step 20,000 (MLP + GD at its lr 3e-4 more so). The partial cosine is 0.972-0.994
(paper 0.93-0.95) and both models are at most 0.074 of plain GD's loss: those pass.
"""

import numpy as np

from reference import analysis as A
from reference import sine_analysis as S
from reference.tasks import STREAM_EVAL, stream_rng

from .claims_training import _final_loss, _per_seed, runs
from .registry import Outcome, claim

SRC = "von Oswald et al. ICML'23"

# OOD grid of the LayerNorm claims: the paper's input scales reach 2; the crossing of the
# LayerNorm models with GD was measured between 1.2 and 1.4, so the grid goes past it.
LN_INPUT_SCALES = np.round(np.arange(0.5, 3.01, 0.1), 10)
SINE_MODES = ("quick", "full")
SINE_GRID_POINTS = 25       # queries per task on the input range for the sensitivity cosine
SINE_CURVE_TASKS = 256      # eval tasks the sensitivity curves are computed on


# ---- softmax attention (App. A.9) ------------------------------------------------------

def _head_products(p):
    """W_KQ^h = W_K^h^T W_Q^h (H, D, D) of one softmax layer's params."""
    return np.einsum("hkd,hke->hde", np.asarray(p.W_K, np.float64), np.asarray(p.W_Q, np.float64))


def heads_cancellation(p, d):
    """How the two heads' W_KQ x-blocks relate: cos of their off-diagonal parts, cos of
    their diagonals, and the Frobenius norm of the sum's off-diagonal part relative to the
    heads' (1 when nothing cancels, 0 when they cancel exactly)."""
    W = _head_products(p)[:, :d, :d]                                      # (2, d, d)
    off = ~np.eye(d, dtype=bool)
    o1, o2 = W[0][off], W[1][off]
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return {"offdiag_cos": cos(o1, o2), "diag_cos": cos(np.diag(W[0]), np.diag(W[1])),
            "offdiag_sum_over_heads": float(np.linalg.norm(o1 + o2) / (np.linalg.norm(o1) + np.linalg.norm(o2))),
            "diag_means": [float(np.diag(W[h]).mean()) for h in range(2)]}


@claim("training.softmax2.loss_equals_gd1", source=f"{SRC}, App. A.9 (softmax attention)", modes=("full",),
       statement="One softmax self-attention layer with two heads trained from scratch reaches the GD-1 loss",
       method="softmax2 experiment (d = N = 10, Adam lr 1e-3, clip 0.001, 5000 steps, 5 seeds); worst "
              "|L_model - L_GD1| / L_GD1 on the 10,000-task eval set")
def _(ctx):
    rs = runs(ctx, "softmax2")
    rel = [abs(_final_loss(r) - r.baselines["gd_loss"]) / r.baselines["gd_loss"] for r in rs]
    return Outcome.at_most(max(rel), 0.03,
                           "two heads with opposite-sign logits make softmax(+b x.x_q) - softmax(-b x.x_q) linear in "
                           "x.x_q to first order, so GD-1 is reachable up to the softmax's second-order terms; 3% "
                           "admits those and Adam's jitter (0.5% for linear attention)",
                           losses=_per_seed(rs, lambda r: {"model": _final_loss(r), "gd": r.baselines["gd_loss"]}))


@claim("training.softmax2.aligns_with_gd", source=f"{SRC}, App. A.9", modes=("full",),
       statement="The two-head softmax layer's implicit linear model d y_hat / d x_q points the way of GD's",
       method="model cos against GD-1 on the eval set at the last evaluation; worst over seeds")
def _(ctx):
    rs = runs(ctx, "softmax2")
    cos = [r.summary["final"]["model_cos_gd"] for r in rs]
    return Outcome.at_least(min(cos), 0.95,
                            "linear attention reaches 0.999; the softmax's curvature bends the implicit model a little "
                            "away from GD's; a model at the one-head loss is near 0.9",
                            cos=_per_seed(rs, lambda r: r.summary["final"]["model_cos_gd"]))


@claim("training.softmax2.heads_cancel", source=f"{SRC}, App. A.9 (the two heads' W_KQ)", modes=("full",),
       statement="The two heads' W_KQ x-blocks carry nearly sign-reversed off-diagonal parts that cancel in the sum",
       method="cos between the off-diagonal entries of W_K^T W_Q (x-block) of head 1 and head 2 after training; worst "
              "(largest) over seeds")
def _(ctx):
    rs = runs(ctx, "softmax2")
    info = _per_seed(rs, lambda r: heads_cancellation(r.params[0], r.config.data.d))
    worst = max(v["offdiag_cos"] for v in info.values())
    return Outcome.at_most(worst, -0.5,
                           "sign-reversed parts give cos near -1; unrelated parts near 0 and equal ones +1, so -0.5 "
                           "separates cancelling heads from independent ones",
                           heads=info)


@claim("training.softmax2.heads_opposite_diagonals", source=f"{SRC}, App. A.9 (the two heads' W_KQ)",
       modes=("full",),
       statement="The two heads' W_KQ x-blocks have diagonals of opposite sign (one head attends with +beta x.x_q, "
                 "the other with -beta x.x_q, so softmax(+) - softmax(-) is linear in x.x_q to first order)",
       method="cos between the diagonals of W_K^T W_Q (x-block) of head 1 and head 2 after training; worst (largest) "
              "over seeds (the off-diagonal cosine and the diagonal means in the details)")
def _(ctx):
    rs = runs(ctx, "softmax2")
    info = _per_seed(rs, lambda r: heads_cancellation(r.params[0], r.config.data.d))
    worst = max(v["diag_cos"] for v in info.values())
    return Outcome.at_most(worst, -0.5,
                           "opposite diagonals give cos near -1, unrelated ones near 0; measured -0.83 to -0.97 on 5 "
                           "seeds at 5000 steps (diagonal means +1.1..+3.3 and -0.8..-3.5), while the off-diagonal "
                           "parts are equal in both heads (cos +0.99), not sign-reversed as the claim "
                           "training.softmax2.heads_cancel states",
                           heads=info)


@claim("training.softmax1.misses_gd1", source=f"{SRC}, App. A.9 (one head)", modes=("full",),
       statement="One softmax self-attention layer with one head does not reach the GD-1 loss",
       method="softmax1 experiment at the full length (5000 steps, 5 seeds); smallest L_model / L_GD1 over seeds")
def _(ctx):
    rs = runs(ctx, "softmax1")
    ratio = [_final_loss(r) / r.baselines["gd_loss"] for r in rs]
    return Outcome.at_least(min(ratio), 1.05,
                            "one head's softmax weights are positive and sum to one, so the layer cannot form the "
                            "signed x_j.x_q weights of GD; 5% is ten times Adam's jitter at GD-1",
                            losses=_per_seed(rs, lambda r: {"model": _final_loss(r), "gd": r.baselines["gd_loss"]}))


# ---- LayerNorm (App. A.9) ---------------------------------------------------------------

def ln_ood(r):
    """The input-scale sweep of a LayerNorm run on :data:`LN_INPUT_SCALES`: model and GD-K
    losses, the crossing scale (where the model's loss falls below GD's, linear in the
    log-ratio between grid points; None if it never does) and the ratios at the ends."""
    sweep = A.ood_sweeps(r.config, r.params, r.baselines, input_scales=LN_INPUT_SCALES,
                         teacher_scales=[1.0])["input"]
    a, m, g = (np.asarray(sweep[k]) for k in ("alpha", "model", "gd"))
    lr = np.log(m / g)                                                   # > 0: the model is worse
    cross = None
    for i in range(len(a) - 1):
        if lr[i] > 0 >= lr[i + 1]:
            cross = float(a[i] + (a[i + 1] - a[i]) * lr[i] / (lr[i] - lr[i + 1]))
            break
    return {"alpha": a.tolist(), "model": m.tolist(), "gd": g.tolist(), "crossing": cross,
            "gd_over_model_at_max": float(g[-1] / m[-1])}


def _ln_claims(exp, K):
    ref = "GD-1" if K == 1 else "per-layer GD++"

    @claim(f"training.{exp}.worse_in_distribution", source=f"{SRC}, App. A.9 (LayerNorm)",
           statement=f"An LSA model with LayerNorm ({exp}) trained from scratch is worse in distribution than {ref}"
                     + ("" if K == 1 else " (the paper says 'than GD'; our two-layer LayerNorm model does go below "
                                          "plain GD-2, ratio in the details, so the claim is checked against GD++)"),
           method=f"{exp} experiment; quick: 1500 steps, 1 seed; full: 5000 steps, 5 seeds. Smallest L_model / "
                  f"L_{'GD1' if K == 1 else 'GD++'} over seeds on the eval set (GD++ meta-trained 1000 Adam steps)")
    def _(ctx):
        rs = runs(ctx, exp)
        key = "gd_loss" if K == 1 else "gdpp_loss"
        ratio = [_final_loss(r) / r.baselines[key] for r in rs]
        return Outcome.at_least(min(ratio), 1.05,
                                "LayerNorm rescales each token to unit variance, which removes the scale of x.x_q "
                                "that GD's prediction is linear in; measured at 1500 steps: ln1 1.25 x GD-1, ln2 1.33 x "
                                "GD++ (and 0.94 x GD-2). 5% is ten times Adam's jitter at GD",
                                losses=_per_seed(rs, lambda r: {"model": _final_loss(r), "gd": r.baselines["gd_loss"],
                                                                "gdpp": r.baselines["gdpp_loss"],
                                                                "model_over_gd": _final_loss(r) / r.baselines["gd_loss"]}))

    @claim(f"training.{exp}.better_ood_large_inputs", source=f"{SRC}, App. A.9 (LayerNorm, OOD)",
           statement=f"The LayerNorm model ({exp}) is better than GD-{K} out of distribution for large input scales; "
                     "the crossing scale is reported",
           method=f"loss of the model and of GD-{K} (its in-distribution eta) on 1000 tasks per input scale alpha "
                  "(x ~ U(-alpha/2, alpha/2)), alpha = 0.5..3.0 step 0.1; smallest GD / model loss ratio at alpha = 3 "
                  "over seeds (crossing scales in the details)")
    def _(ctx):
        rs = runs(ctx, exp)
        info = _per_seed(rs, ln_ood)
        ratio = min(v["gd_over_model_at_max"] for v in info.values())
        return Outcome.at_least(ratio, 2.0,
                                "GD with a fixed eta overshoots once eta ||x||^2 grows (its loss grows like alpha^6 at "
                                "large alpha), while LayerNorm keeps the tokens at unit scale; measured at 1500 steps "
                                "and alpha = 1.94: 6.4 (ln1, crossing near 1.3), 17 (ln2, crossing near 0.8). A model "
                                "no better than GD gives 1",
                                crossing={k: v["crossing"] for k, v in info.items()}, sweeps=info)


_ln_claims("ln1", 1)
_ln_claims("ln2", 2)


# ---- sine regression (Sec. 5) -----------------------------------------------------------

def sine_comparison(r_tf, r_mg, n_tasks=SINE_CURVE_TASKS, M=SINE_GRID_POINTS):
    """The transformer's and MLP + GD's sensitivity curves on the first ``n_tasks`` eval
    tasks: partial cosine (per task over the query grid), the across-task cosine at the
    tasks' own queries, and each model's curve loss against the true sine."""
    cfg = r_tf.config
    ev = cfg.task_spec(cfg.eval.eval_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_EVAL))
    sub = type(ev)(*(a[:n_tasks] for a in ev))
    grid = S.query_grid((cfg.data.x_low, cfg.data.x_high), M)
    c_tf = S.sine_curves(r_tf.params, cfg.arch(), sub, grid, cfg.np_dtype)
    c_mg = S.sine_curves(r_mg.params, r_mg.config.arch(), sub, grid, cfg.np_dtype)
    lay_tf, lay_mg = cfg.layout(), r_mg.config.layout()
    sub_m = A.cast_tasks(sub, cfg.np_dtype)
    _, g_tf = A.sensitivity(lay_tf.build(sub_m.X, sub_m.Y, sub_m.x_q), r_tf.params, cfg.arch(), lay_tf)
    _, g_mg = A.sensitivity(lay_mg.build(sub_m.X, sub_m.Y, sub_m.x_q), r_mg.params,
                            r_mg.config.arch(), lay_mg)
    return {"partial_cos": S.partial_cosine(c_tf.dpred, c_mg.dpred),
            "across_task_cos": S.across_task_cosine(g_tf, g_mg),
            "curve_loss_transformer": S.curve_losses(c_tf), "curve_loss_mlp_gd": S.curve_losses(c_mg),
            "tasks": n_tasks, "grid_points": M}


def _sine_pairs(ctx):
    return list(zip(runs(ctx, "sine"), runs(ctx, "sine_mlp_gd")))


@claim("training.sine.loss_near_mlp_gd", modes=SINE_MODES, source=f"{SRC}, Sec. 5, Fig. 6 (sine regression)",
       statement="The sine-regression transformer (embedding, MLP, one LSA layer) reaches the loss of MLP + GD (the "
                 "same embedding and MLP meta-trained through a frozen GD layer)",
       method="sine and sine_mlp_gd experiments, same seed (same initial embedding and MLP); quick: 3000 steps, "
              "1 seed; full: 20,000 steps, 5 seeds. Worst max(L_tf / L_mlp+gd, L_mlp+gd / L_tf) over seeds on the "
              "2048-task eval set")
def _(ctx):
    pairs = _sine_pairs(ctx)
    ratio = [max(_final_loss(a) / _final_loss(b), _final_loss(b) / _final_loss(a)) for a, b in pairs]
    return Outcome.at_most(max(ratio), SINE_RATIO[ctx.mode],
                           SINE_RATIO_REASON[ctx.mode],
                           losses={f"seed{a.config.seed}": {"transformer": _final_loss(a), "mlp_gd": _final_loss(b),
                                                            "gd1_raw": a.baselines["gd_loss"],
                                                            "zero": a.baselines["zero_loss"]} for a, b in pairs})


@claim("training.sine.partial_cosine", modes=SINE_MODES, source=f"{SRC}, Sec. 5 (sensitivity alignment)",
       statement="The trained transformer's sensitivities d y_hat / d x_q align with MLP + GD's",
       method=f"per task, the vector of d y_hat / d x_q at {SINE_GRID_POINTS} queries on [-5, 5] of each model "
              f"(hand-written backward), cosine per task, mean over {SINE_CURVE_TASKS} eval tasks; worst over seeds "
              "(the cosine of single-query sensitivities across tasks in the details)")
def _(ctx):
    info = {f"seed{a.config.seed}": sine_comparison(a, b) for a, b in _sine_pairs(ctx)}
    worst = min(v["partial_cos"] for v in info.values())
    return Outcome.at_least(worst, SINE_COS[ctx.mode], SINE_COS_REASON[ctx.mode], comparison=info)


@claim("training.sine.beats_plain_gd", modes=SINE_MODES, source=f"{SRC}, Sec. 5",
       statement="Both the transformer and MLP + GD beat one step of GD on the raw (x, y) tokens by a wide margin",
       method="largest of L_tf / L_GD1 and L_mlp+gd / L_GD1 over seeds, GD-1 with the line-searched eta on the raw "
              "tokens (a linear model of a sine: about the zero predictor's loss)")
def _(ctx):
    pairs = _sine_pairs(ctx)
    worst = max(max(_final_loss(a), _final_loss(b)) / a.baselines["gd_loss"] for a, b in pairs)
    return Outcome.at_most(worst, SINE_GD_RATIO[ctx.mode], SINE_GD_REASON[ctx.mode],
                           losses={f"seed{a.config.seed}": {"transformer": _final_loss(a), "mlp_gd": _final_loss(b),
                                                            "gd1_raw": a.baselines["gd_loss"]} for a, b in pairs})


# Thresholds of the sine claims by mode (see each claim's reason). Measured at 3000 steps
# (the quick length; numpy backend, seed 0): transformer 0.00265, MLP + GD 0.00296 (ratio
# 1.12), partial cosine 0.956, both 0.10-0.11 of plain GD's loss; at 2000 steps MLP + GD
# (lr 3e-4) is still at 0.00625 (ratio 2.1), at 1500 steps 0.0143 (ratio 4.0).
SINE_RATIO = {"quick": 1.5, "full": 1.5}
SINE_RATIO_REASON = {m: "the paper reports both at about 1e-3 after 20,000 steps; measured 1.12 at 3000 steps (the "
                        "quick length: 0.00265 vs 0.00296) while MLP + GD, at its lower lr, is still 2.1x above at "
                        "2000 steps; 1.5 allows one model to be half again above the other, while a model without "
                        "learned features (plain GD, about the zero predictor's 0.026) is 9x above"
                     for m in ("quick", "full")}
SINE_COS = {"quick": 0.9, "full": 0.9}
SINE_COS_REASON = {m: "the paper reports 0.93-0.95; measured 0.956 at 3000 steps (0.53 between a 1000-step "
                      "transformer and a half-trained MLP + GD); functions of x unrelated to each other give about 0"
                   for m in ("quick", "full")}
SINE_GD_RATIO = {"quick": 0.2, "full": 0.2}
SINE_GD_REASON = {m: "a linear model of a sine is about the zero predictor (GD-1 on raw tokens: 0.02633 vs 0.02634); "
                     "measured 0.10 (transformer) and 0.11 (MLP + GD) at 3000 steps; 0.2 is 'a wide margin' that a "
                     "model halfway through learning its features (MLP + GD at step 1500: 0.54) does not meet"
                  for m in ("quick", "full")}
