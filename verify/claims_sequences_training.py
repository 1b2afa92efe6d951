"""Claims of the mesa paper's trained sequence models (issue #17): causal linear attention
of 1, 2, 4 and 6 layers and the one-layer mesa layer trained from scratch on the code's
constructed tokens (``reference.seq_training``, experiments ``seq_*``).

von Oswald et al. 2023b (arXiv 2309.05858), Sec. 3-5, Figs. 2-4. Runs are trained once
per verify run by :mod:`verify.claims_training` (same memo, pool and run directories;
its QUICK table holds the shortened settings, its RUN_DEPS the claims that read several
runs). Every comparison is per time step on the fixed evaluation set (2048 sequences, a
documented departure from the code's fresh batches); "late t" is t = 41 .. 50. The
per-time-step curves of the model and the baselines are in each claim's details.

Quick mode trains seq_lsa1 only (1000 steps); the depth ordering, the comparisons of
runs with each other and the data variants are full-only: a negative or ordering claim
proves nothing at a shortened length. The full-only thresholds come from the paper's
figures and the baselines measured on the evaluation set (the runs' own numbers are to be
measured: the NumPy reference needs hours per seed for the deep models).
"""

import numpy as np

from .claims_training import runs
from .registry import Outcome, claim

SRC = "von Oswald et al. 2023b (arXiv 2309.05858)"
LATE = slice(40, 50)      # t = 41 .. 50 (1-based)


def _final(r):
    return r.summary["final"]


def _late(per_t):
    return float(np.mean(np.asarray(per_t, np.float64)[LATE]))


def _curves(r, keys=("gd", "lstsq", "prop2", "cheb")):
    """Per-t curves of the model (final evaluation) and the baselines, for the details."""
    b = r.baselines
    out = {"model": _final(r)["per_t"]}
    out.update({k: b[f"{k}_per_t"] for k in keys if b.get(f"{k}_per_t") is not None})
    return out


def _per_seed(rs, fn):
    return {f"seed{r.config.seed}": fn(r) for r in rs}


# ---- one layer: the causal Prop. 1 GD construction ------------------------------------------

@claim("training.seq_lsa1.loss_matches_gd_per_t", source=f"{SRC}, Sec. 3, Fig. 2 (one layer)",
       statement="A one-layer causal LSA trained from scratch on constructed tokens has the per-time-step loss of the "
                 "Prop. 1 construction (one GD step, eta line-searched) at every t",
       method="seq_lsa1 (2 heads, key 20, input mask 20, clip 4, init N(0, 2e-4), clip 1 + AdamW lr 1e-4 wd 0.1, batch "
              "256); quick: 1000 steps, 1 seed; full: 5000 steps, 5 seeds. Worst over t = 2..50 and seeds of "
              "|l_t - l_t(GD)| / l_t(GD) (t = 1 has no pair to learn from: both predict ~0)")
def _(ctx):
    rs = runs(ctx, "seq_lsa1")
    worst = []
    for r in rs:
        m, g = np.asarray(_final(r)["per_t"]), np.asarray(r.baselines["gd_per_t"])
        worst.append(float(np.max(np.abs(m[1:] - g[1:]) / g[1:])))
    return Outcome.at_most(max(worst), 0.06,
                           "GD with the best eta is what one causal linear-attention layer on these tokens can do to "
                           "first order; measured on seed 0 (numpy) 0.031 at step 1000 and 0.013-0.017 at steps "
                           "1500-2500 (Adam's jitter at lr 1e-4; the trained layer ends slightly below GD's mean "
                           "loss, 0.884 vs 0.888); at step 500 the worst t is 19% off and at init 200%",
                           worst_per_seed=worst, curves=_per_seed(rs, _curves))


@claim("training.seq_lsa1.predictions_align_gd", source=f"{SRC}, Sec. 3, Fig. 2 (alignment)",
       statement="The trained one-layer model's predictions point the way of the GD construction's (cosine of the "
                 "10-dim predictions, averaged over sequences and t, close to 1)",
       method="cos(y_hat_model, y_hat_GD) per (sequence, t) on the eval set, averaged; worst over seeds (the per-t "
              "cosines and the distance in the details)")
def _(ctx):
    rs = runs(ctx, "seq_lsa1")
    cos = [_final(r)["pred_cos_gd"] for r in rs]
    return Outcome.at_least(min(cos), 0.96,
                            "measured 0.974 (seed 0) from step 1000 to 2500, steady: the layer is GD plus small terms "
                            "(the remaining 2.6% is in the early t, where the predictions are small); at step 300 the "
                            "cosine is 0.70, at step 500 0.935; a ridge predictor has 0.86",
                            pred_cos_gd=cos, per_t=_per_seed(rs, lambda r: _final(r)["pred_cos_gd_per_t"]),
                            preds_diff_gd=[_final(r)["preds_diff_gd"] for r in rs])


@claim("training.seq_lsa1.weights_match_construction", source=f"{SRC}, Prop. 1 (weights)",
       statement="The trained one-layer model's weights equal the causal Prop. 1 construction up to the model's "
                 "symmetries (per-head rescaling, the split of the sum over heads), with the learned step close to the "
                 "line-searched eta",
       method="cosine between T = sum_h W_PV,h (x) W_KQ,h (rows read by the readout, unmasked channels) and the "
              "construction's (reference.seq_training.gd_weight_match); worst over seeds; the learned eta (the best "
              "scale) against the line search in the details")
def _(ctx):
    rs = runs(ctx, "seq_lsa1")
    w = [r.summary["gd_weights"] for r in rs]
    return Outcome.at_least(min(x["tensor_cos"] for x in w), 0.97,
                            "measured 0.991 on seed 0 after 2500 steps (learned eta 0.0328, line search 0.032); "
                            "weight decay 0.1 shrinks the entries no gradient reaches, so what is left off the "
                            "construction is what the data rewards; a random layer has |cos| < 0.1",
                            weights=_per_seed(rs, lambda r: dict(r.summary["gd_weights"], gd_eta=r.baselines["gd_eta"])))


# ---- depth: 2, 4, 6 layers (full only) -------------------------------------------------------

DEPTHS = (("seq_lsa1", 1), ("seq_lsa2", 2), ("seq_lsa4", 4), ("seq_lsa6", 6))


@claim("training.seq_depth.ordered_towards_ridge", source=f"{SRC}, Sec. 4, Fig. 3", modes=("full",),
       statement="Deeper causal LSA models (1, 2, 4, 6 layers) have lower late-t losses, in order of depth, and all "
                 "stay above exact ridge regression on the pairs before t",
       method="seq_lsa1/2/4/6 at the code's lengths (5000, 5000, 10,000, 15,000 steps), 5 seeds; mean l_t over "
              "t = 41..50; measured: the smallest ratio late(K) / late(K') over consecutive depths K < K' and seeds "
              "(> 1 when ordered); ridge below all is required as well")
def _(ctx):
    by = {K: runs(ctx, name) for name, K in DEPTHS}
    ratios, above_ridge = [], True
    for i in range(len(DEPTHS) - 1):
        (_, Ka), (_, Kb) = DEPTHS[i], DEPTHS[i + 1]
        for ra, rb in zip(by[Ka], by[Kb]):
            ratios.append(_late(_final(ra)["per_t"]) / _late(_final(rb)["per_t"]))
    for K, rs in by.items():
        above_ridge &= all(_late(_final(r)["per_t"]) > _late(r.baselines["lstsq_per_t"]) for r in rs)
    worst = min(ratios) if above_ridge else 0.0
    return Outcome.at_least(worst, 1.05,
                            "the paper's Fig. 3 shows each added pair of layers lowering the late-t loss by a large "
                            "factor; 5% above 1 keeps two depths that merely tie from passing; a model below ridge "
                            "would mean the evaluation is wrong (ridge is the Bayes-style optimum here)",
                            ratios=ratios, late=_per_seed_depth(by))


def _per_seed_depth(by):
    return {f"K{K}": [_late(_final(r)["per_t"]) for r in rs] for K, rs in by.items()}


def _matches_prop2(ctx, name, K):
    rs = runs(ctx, name)
    ratio = [_late(_final(r)["per_t"]) / _late(r.baselines["prop2_per_t"]) for r in rs]
    return Outcome.at_most(max(ratio), 1.1,
                           f"the {K}-layer Prop. 2 construction here is K - 1 = {K - 1} Neumann layers with one "
                           "line-searched step omega and the GD readout layer (SPEC 17), a fixed polynomial in A_t; "
                           "the paper's Fig. 3 has the trained models on or below their Prop. 2 curves, and the "
                           "code's Chebyshev coefficients (normalised by ||A_t||, not a layer construction) are "
                           "better still (in the details); 1.1 allows Adam's jitter",
                           ratio=ratio, curves=_per_seed(rs, _curves))


for _name, _K in DEPTHS[1:]:
    def _make(name=_name, K=_K):
        @claim(f"training.{name}.matches_prop2", source=f"{SRC}, Prop. 2, Fig. 3", modes=("full",),
               statement=f"The trained {K}-layer causal LSA does at least as well per late time step as the {K}-layer "
                         "Prop. 2 construction (preconditioned GD)",
               method=f"{name}, 5 seeds at the code's length; mean l_t over t = 41..50 of the model over that of the "
                      f"{K}-layer Neumann construction (omega line-searched on 2048 sequences); worst over seeds")
        def _(ctx):
            return _matches_prop2(ctx, name, K)
    _make()


# ---- the mesa layer (full only) -------------------------------------------------------------

@claim("training.seq_compare.mesa_beats_lsa6", source=f"{SRC}, Sec. 5, Fig. 4", modes=("full",),
       statement="One trained mesa layer beats six trained causal LSA layers at late t and is close to exact ridge",
       method="seq_mesa (5000 steps) and seq_lsa6 (15,000 steps), 5 seeds; measured: the worst over seeds of "
              "late(mesa) / late(lsa6) (< 1 when the mesa layer is better); late(mesa) / late(ridge) in the details "
              "and in training.seq_mesa.near_ridge")
def _(ctx):
    mesa, lsa6 = runs(ctx, "seq_mesa"), runs(ctx, "seq_lsa6")
    ratio = [_late(_final(a)["per_t"]) / _late(_final(b)["per_t"]) for a, b in zip(mesa, lsa6)]
    return Outcome.at_most(max(ratio), 1.0,
                           "the mesa layer solves the ridge problem per token, six linear layers approximate it by a "
                           "degree-5 polynomial; a measured partial run (seed 0, 600 steps) already has late-t loss "
                           "0.0149, at the level of the code's 6-step Chebyshev baseline (0.0144) and far below the "
                           "6-layer Neumann construction (0.174)",
                           ratio=ratio, mesa=_per_seed(mesa, _curves), lsa6=_per_seed(lsa6, _curves))


@claim("training.seq_mesa.near_ridge", source=f"{SRC}, Sec. 5, Fig. 4", modes=("full",),
       statement="The trained one-layer mesa layer is close to exact ridge regression (on the pairs before t) at late t",
       method="seq_mesa (float64: the float32 reverse walk is refused in training), 5000 steps, 5 seeds; worst over "
              "seeds of late(mesa) / late(ridge)")
def _(ctx):
    rs = runs(ctx, "seq_mesa")
    ratio = [_late(_final(r)["per_t"]) / _late(r.baselines["lstsq_per_t"]) for r in rs]
    return Outcome.at_most(max(ratio), 5.0,
                           "ridge's late-t loss (6.3e-4) sits at the noise floor (0.5 * 10 * 0.01^2 = 5e-4), so a "
                           "ratio of 5 is 3e-3 absolute, 200x below GD's 0.63; the mesa layer can represent ridge "
                           "exactly (W_K = W_Q = select(x_{t-1}, x_t), W_V = select(x_t)); measured at full length "
                           "(float64, 5 seeds): 1.87-2.03, the learned lam 1.4-1.7",
                           ratio=ratio, lam=_per_seed(rs, lambda r: r.summary.get("mesa_lam")), curves=_per_seed(rs, _curves))


# ---- the data variants (full only) ----------------------------------------------------------

@claim("training.seq_fixed_lsa1.beats_gd", source=f"{SRC}, Sec. 3 (fixed teacher)", modes=("full",),
       statement="With one teacher W shared by every sequence, the trained one-layer model beats the GD construction by "
                 "a large factor at late t (it can store W in its weights)",
       method="seq_fixed_lsa1, 20,000 steps, 5 seeds; worst over seeds of late(GD) / late(model)")
def _(ctx):
    rs = runs(ctx, "seq_fixed_lsa1")
    factor = [_late(r.baselines["gd_per_t"]) / _late(_final(r)["per_t"]) for r in rs]
    return Outcome.at_least(min(factor), 3.0,
                            "GD from Phi_0 = 0 knows nothing of the shared W (late-t loss 0.68 on this eval set); "
                            "one causal layer has no linear path to the prediction, but 2 heads on the unmasked "
                            "slots can output c ||x_t||^2 W x_t with W in their weights (the prefix sums telescope; "
                            "test_two_causal_heads_can_memorise_a_fixed_teacher_by_telescoping), late-t loss 0.10-"
                            "0.11, 6x below GD; a factor 3 is far outside what a GD-like layer reaches (about 1) and "
                            "half of what this memoriser gives",
                            factor=factor, curves=_per_seed(rs, _curves))


@claim("training.seq_contracting.mesa_near_ridge_below_lsa6", source=f"{SRC}, App. (contracting dynamics)",
       modes=("full",),
       statement="With contracting dynamics the trained mesa layer is close to ridge at t = 50 and below the six-layer "
                 "linear model",
       method="seq_contracting_mesa and seq_contracting_lsa6, 20,000 steps, 5 seeds; measured: worst over seeds of "
              "l_50(mesa) / l_50(ridge); l_50(mesa) < l_50(lsa6) is required as well (the measured value is inf "
              "when it fails)")
def _(ctx):
    mesa, lsa6 = runs(ctx, "seq_contracting_mesa"), runs(ctx, "seq_contracting_lsa6")
    ratio, below = [], True
    for a, b in zip(mesa, lsa6):
        ratio.append(_final(a)["per_t"][-1] / a.baselines["lstsq_per_t"][-1])
        below &= _final(a)["per_t"][-1] < _final(b)["per_t"][-1]
    return Outcome.at_most(max(ratio) if below else float("inf"), 5.0,
                           "as training.seq_mesa.near_ridge (ridge's l_50 here is 6e-3, the contracting data's noise "
                           "floor relative to its smaller states), and the paper reports the mesa layer below six "
                           "linear layers on this variant",
                           ratio=ratio, mesa=_per_seed(mesa, _curves), lsa6=_per_seed(lsa6, _curves))
