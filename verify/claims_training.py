"""Claims of the training experiments (issue #4): LSA models trained from scratch with
the hand-written passes reproduce the paper's trained-vs-GD results.

von Oswald et al. ICML'23, Sec. 3-4, Figs. 2-4 and App. A. Every model is trained once
per verify run (an in-process memo shared by the claims) into a run directory under
``ctx.workdir`` (config.json, metrics.jsonl, checkpoint.npz, summary.json), so a
failing claim can be inspected with ``verify.plots.make_plots(run_dir)``.

Quick mode keeps the paper's learning rates, clipping, initialisation and evaluation
set (10,000 tasks) and shortens training to where the claims hold with margin
(measured, see QUICK and each claim); ``--full`` uses the paper's settings and 5 seeds.
Models train on ``reference.backends.DEFAULT_TRAIN_BACKEND`` unless the environment
variable ICGD_TRAIN_BACKEND names another (e.g. ``numpy``, the reference itself).
Independent runs train in parallel worker processes, one per core.
"""

import os
import sys
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from reference import analysis as A

from . import records, registry, runs as R
from .experiments import EXPERIMENTS, get_experiment
from .pool import train_all
from .registry import Outcome, claim
from .settings import apply_overrides

SRC = "von Oswald et al. ICML'23"
FULL_SEEDS = (0, 1, 2, 3, 4)

# Quick mode: the paper's lr, clipping, init and evaluation set (10,000 tasks), fewer
# steps (and tasks per step where measured to be safe). Measured on the numpy backend:
# * one_layer, batch 2048: within 1% of the GD-1 loss by step 500-600 on seeds 0-3;
#   with batch 512 or 1024 some seeds sit on a plateau at loss 0.40 for > 1000 steps,
#   so the batch stays at the paper's 2048;
# * recurrent2, batch 2048: a first plateau near 0.147 until step ~1500, then GD++
#   (0.112) is reached (within 5%) by step 1700-2500 (seeds 0-4); from step 3000 on
#   every evaluation is within 2.8% of GD++. With batch 1024 Adam's jitter doubles
#   (up to 3.4% above GD++ at a single evaluation), so the batch stays at 2048;
# * layers5, batch 512: below GD-5 from step ~2000; at 3000 steps 21-41% of the way from
#   GD-5 (0.114) to per-layer GD++ (0.060); the paper trains 50,000 steps.
QUICK = {
    "one_layer": dict(steps=1000, gdpp_steps=100, checkpoint_every=500),
    "two_heads": dict(steps=1000, gdpp_steps=100, checkpoint_every=500),
    "recurrent2": dict(steps=3000, checkpoint_every=500),
    "recurrent10": dict(steps=3500, checkpoint_every=500),
    "layers5": dict(steps=3000, batch=512, gdpp_steps=1000, eval_every=250, checkpoint_every=1000),
    # LayerNorm (claims_layers): at 1500 steps ln1 is 1.25 x GD-1 and ln2 1.33 x GD++ in
    # distribution, and both 6-17x below GD at input scale 1.94 (measured, numpy)
    "ln1": dict(steps=1500, checkpoint_every=500),
    "ln2": dict(steps=1500, checkpoint_every=500),
    # sine pair (claims_layers): at 3000 steps the transformer (0.00265) and MLP + GD
    # (0.00296, lr 3e-4: still 2.1x above at step 2000) agree within 12% and have partial
    # cosine 0.956 (measured, numpy, seed 0)
    "sine": dict(steps=3000, checkpoint_every=1000),
    "sine_mlp_gd": dict(steps=3000, checkpoint_every=1000),
}
_MEMO = {}


def _seeds(ctx):
    return FULL_SEEDS if ctx.full else (ctx.seed,)


# Mesa-paper sequence models (claims_sequences_training; the numpy reference trains them
# whatever ICGD_TRAIN_BACKEND says): seq_lsa1 is within 0.2% of the GD loss from step
# ~1000 (seed 0, numpy); evaluations every 250 steps to save time.
QUICK.update({"seq_lsa1": dict(steps=1000, eval_every=250, checkpoint_every=500)})


def config_for(ctx, experiment, seed):
    over = {"seed": seed}
    if os.environ.get("ICGD_TRAIN_BACKEND") and not get_experiment(experiment).config.is_sequence:
        over["backend"] = os.environ["ICGD_TRAIN_BACKEND"]
    if not ctx.full:
        over.update(QUICK[experiment])
    return apply_overrides(get_experiment(experiment).config, over)


def _run_dir(ctx, cfg):
    return os.path.join(ctx.workdir, ctx.mode, f"{cfg.experiment}-seed{cfg.seed}")


def _reusable(ctx, cfg):
    """The finished run of ``cfg`` already in the work directory, or None. Only with
    ``--reuse-runs``; the run's config.json must equal ``cfg`` field by field (backend,
    dtype and seed included), its last evaluation must be at ``cfg.steps``, and its
    summary's digest must match its config, its checkpoint and the current reference/
    sources (a format-1 run has no digest: it is accepted and the report says so).
    When the work directory has no such run, the committed record of the run
    (``verify.records``, under ``ctx.records``) answers instead, if it is intact."""
    if not ctx.reuse_runs:
        return None
    d = _run_dir(ctx, cfg)
    r = _reusable_dir(d, cfg)
    if r is None and ctx.records:
        r = records.find(ctx.records, ctx.mode, cfg, older=ctx.older_records)
        if r is not None:
            other = records.trained_by_other_sources(r)
            registry.note_reused(f"{r.run_dir} (a committed record: summary.json and config.json; "
                                 "the checkpoint is not recorded, so the digest's checkpoint part is not rechecked"
                                 + (f"; {other}, accepted by --older-records" if other else "") + ")")
            print(f"reusing the committed record {r.run_dir}" + (f" ({other})" if other else ""), file=sys.stderr,
                  flush=True)
    return r


class RunNotTrained(RuntimeError):
    """``--no-train``: a run a claim needs is neither finished in the work directory nor
    answered by a record; the claim fails with this error instead of training it."""


def _not_trained(ctx, cfg):
    return RunNotTrained(f"{cfg.experiment} seed {cfg.seed} ({ctx.mode} mode) is not finished in "
                         f"{_run_dir(ctx, cfg)} and has no usable record under {ctx.records}; --no-train trains nothing")


def _reusable_dir(d, cfg):
    try:
        r = R.load_result(d)
        bad = R.check_digest(d)
    except (OSError, ValueError, KeyError, R.CheckpointError):
        return None
    final = r.summary.get("final") or {}
    if r.config != cfg or final.get("step") != cfg.steps:
        return None
    legacy = bad == ["no digest (a format-1 run)"]
    if bad and not legacy:
        print(f"not reusing {d}: {'; '.join(bad)}", file=sys.stderr, flush=True)
        return None
    registry.note_reused(d + (" (format 1: no digest to check)" if legacy else ""))
    print(f"reusing the finished run in {d}", file=sys.stderr, flush=True)
    return r


def run_for(ctx, experiment, seed):
    """Train (once per verify run) the named experiment at ``seed`` in this mode."""
    cfg = config_for(ctx, experiment, seed)
    if cfg not in _MEMO:
        _prefetch(ctx)
    if cfg not in _MEMO:
        r = _reusable(ctx, cfg)
        if r is None and ctx.no_train:
            r = _not_trained(ctx, cfg)
        _MEMO[cfg] = r if r is not None else R.train_run(cfg, _run_dir(ctx, cfg), overwrite=True)
    if isinstance(_MEMO[cfg], Exception):      # the run failed in a worker: every claim on it reports that
        raise _MEMO[cfg]
    return _MEMO[cfg]


# Claims named after one experiment that also read other runs (trained in the same pool).
RUN_DEPS = {"sine": ("sine", "sine_mlp_gd"),
            "seq_depth": ("seq_lsa1", "seq_lsa2", "seq_lsa4", "seq_lsa6"),
            "seq_compare": ("seq_mesa", "seq_lsa6"),
            "seq_contracting": ("seq_contracting_mesa", "seq_contracting_lsa6")}


def _selected_experiments(ctx):
    """The experiments whose claims this verify run selected (``ctx.selected``, the claim
    ids the runner chose) and the runs those claims also read (:data:`RUN_DEPS`); in
    quick mode only those with quick settings (:data:`QUICK`; the others' claims are
    full-only). Every training experiment when the runner did not say."""
    ids = ctx.selected if ctx.selected is not None else [f"training.{e}." for e in EXPERIMENTS]
    names = {i.split(".")[1] for i in ids if i.startswith("training.") and i.count(".") >= 1}
    names = {n for name in names for n in RUN_DEPS.get(name, (name,))}
    return sorted(n for n in names if n in EXPERIMENTS and (ctx.full or n in QUICK))


_PREFETCHED = set()


def _prefetch(ctx):
    """Train every run the selected training claims need, in parallel worker processes
    (``verify.pool``); results come back from the run directories. A run that failed in
    a worker keeps its error, which every claim on that run reports; a run whose worker
    died is retrained in-process by :func:`run_for`."""
    key = (ctx.mode, ctx.seed, ctx.workdir)
    if key in _PREFETCHED:
        return
    _PREFETCHED.add(key)
    cfgs = [config_for(ctx, e, s) for e in _selected_experiments(ctx) for s in _seeds(ctx)]
    for c in cfgs:
        r = _reusable(ctx, c) if c not in _MEMO else None
        if r is not None:
            _MEMO[c] = r
    if ctx.no_train:
        for c in cfgs:
            _MEMO.setdefault(c, _not_trained(ctx, c))
        return
    jobs = [(c, _run_dir(ctx, c)) for c in cfgs if c not in _MEMO]
    for c, res in train_all(jobs).items():
        # a run that failed in its worker keeps its error (retraining it in-process would
        # only fail again); a broken pool (a worker killed) leaves it to run_for to retrain
        if not isinstance(res, BrokenProcessPool):
            _MEMO[c] = res


def runs(ctx, experiment):
    out, missing = [], []
    for s in _seeds(ctx):
        try:
            out.append(run_for(ctx, experiment, s))
        except RunNotTrained:
            missing.append(s)
    if missing:        # --no-train: name every seed this claim lacks, not just the first
        raise RunNotTrained(f"{experiment} seed(s) {', '.join(map(str, missing))} ({ctx.mode} mode): not finished in "
                            f"{os.path.join(ctx.workdir, ctx.mode)} and no usable record under {ctx.records}; "
                            "--no-train trains nothing")
    return out


def _per_seed(results, fn):
    return {f"seed{r.config.seed}": fn(r) for r in results}


def _final_loss(r):
    return r.summary["final"]["loss"]


def _rel_to(results, baseline):
    """|L_model - L_baseline| / L_baseline per run (``baseline``: a key of the baselines)."""
    return [abs(_final_loss(r) - r.baselines[baseline]) / r.baselines[baseline] for r in results]


def _over(results, baseline):
    """L_model / L_baseline per run."""
    return [_final_loss(r) / r.baselines[baseline] for r in results]


def _gap_closed(r):
    """(L_GD - L_model) / (L_GD - L_GD++): 0 at GD-K, 1 at GD++, > 1 below GD++."""
    b = r.baselines
    return (b["gd_loss"] - _final_loss(r)) / (b["gd_loss"] - b["gdpp_loss"])


def _alignment(results, refs=("gd", "gdpp")):
    """The final evaluation's alignment metrics against the references ``refs``, per seed."""
    return _per_seed(results, lambda r: {k: v for k, v in r.summary["final"].items()
                                         if k.rsplit("_", 1)[-1] in refs})


def _gdpp_reading(results):
    """The trained first layer read as a GD++ layer (gamma, eta) next to the meta-trained GD++'s."""
    return dict(gamma_model=[r.summary["weights"][0]["gamma_equiv"] for r in results],
                gamma_gdpp=[r.baselines["gdpp_gammas"][0] for r in results],
                eta_model=[r.config.data.N * r.summary["weights"][0]["eta_over_N"] for r in results],
                eta_gdpp=[r.baselines["gdpp_etas"][0] for r in results])


def _loss_rows(results):
    return _per_seed(results, lambda r: {"model": _final_loss(r), "gd": r.baselines["gd_loss"],
                                         "gdpp": r.baselines["gdpp_loss"], "lstsq": r.baselines["lstsq_loss"],
                                         "gd_eta": r.baselines["gd_eta"], "gdpp_etas": r.baselines["gdpp_etas"],
                                         "gdpp_gammas": r.baselines["gdpp_gammas"]})


# ---- one layer (Fig. 2) ---------------------------------------------------------------

@claim("training.one_layer.loss_equals_gd1", source=f"{SRC}, Sec. 3, Fig. 2",
       statement="A one-layer LSA trained from scratch reaches the loss of one GD step with the line-searched eta",
       method="one_layer experiment (Adam b2 0.98, clip 0.001, batch 2048, init 0.002/K); quick: 1000 steps, 1 seed; "
              "full: 5000 steps, 5 seeds. Worst |L_model - L_GD1| / L_GD1 on the 10,000-task eval set")
def _(ctx):
    rs = runs(ctx, "one_layer")
    rel = _rel_to(rs, "gd_loss")
    return Outcome.at_most(max(rel), 0.02,
                           "GD-1 is the best one-layer linear-attention predictor up to eta (isotropic data), so the "
                           "trained loss can only meet it; Adam at a constant lr leaves a measured jitter of about "
                           "+-0.5% around it; a model still on the early plateau is 100% above (0.40 vs 0.20), one at "
                           "step 400 about 5-10%",
                           losses=_loss_rows(rs))


@claim("training.one_layer.aligns_with_gd", source=f"{SRC}, Sec. 3, Fig. 2 (alignment)",
       statement="The trained one-layer model's implicit linear model g = d y_hat / d x_q points the way of GD's (model cos "
                 "close to 1), and its predictions are close to GD's",
       method="g from the hand-written backward on the 10,000 eval tasks, against GD-1's weight; worst model cos over "
              "seeds (preds diff and model diff in the details)")
def _(ctx):
    rs = runs(ctx, "one_layer")
    cos = [r.summary["final"]["model_cos_gd"] for r in rs]
    return Outcome.at_least(min(cos), 0.99,
                            "the paper's Fig. 2 shows model cos reaching about 1 (measured 0.9991-0.9995 on 5 "
                            "seeds); a "
                            "model on the plateau has cos 0.25, one halfway through its descent (loss 0.25) 0.89",
                            alignment=_alignment(rs))


@claim("training.one_layer.weights_equal_construction", source=f"{SRC}, Prop. 1, Fig. 2 (weights)",
       statement="The trained products W_KQ = W_K^T W_Q and W_PV = P W_V equal the Prop. 1 construction up to the scale "
                 "symmetry (W_KQ / beta, W_PV * beta, beta = mean diagonal of W_KQ's x-block)",
       method="relative Frobenius error of each rescaled product against the construction with the line-searched eta; "
              "worst over the two products and the seeds (the equivalent eta of the trained layer in the details)")
def _(ctx):
    rs = runs(ctx, "one_layer")
    errs = [r.summary["weights"][0]["rel_err"] for r in rs]
    return Outcome.at_most(max(errs), 0.1,
                           "measured 0.042-0.065 on 5 seeds (5000 steps): the entries that never get a gradient "
                           "(W_KQ's y-column, W_PV's x-rows, read by nothing after one layer) keep their initial "
                           "values, and Adam's constant step leaves eta within ~2% of the line search (5.95-6.09 vs "
                           "6.10); a model before convergence (step 300) is at 0.68",
                           weights=_per_seed(rs, lambda r: dict(r.summary["weights"][0],
                                                                eta_equiv=r.config.data.N * r.summary["weights"][0]["eta_over_N"],
                                                                gd_eta=r.baselines["gd_eta"])))


@claim("training.one_layer.interpolation", source=f"{SRC}, Sec. 3 (interpolated model)",
       statement="The model whose products are the average of the rescaled trained ones and the construction's performs "
                 "like both",
       method="loss of the interpolated model on the eval set; worst of |L_interp - L_model| and |L_interp - L_GD1| "
              "relative to L_GD1, over seeds")
def _(ctx):
    rs = runs(ctx, "one_layer")
    rel = []
    for r in rs:
        i = r.summary["interpolation"]
        rel.append(max(abs(i["loss_interpolated"] - i["loss_model"]), abs(i["loss_interpolated"] - i["loss_construction"]))
                   / i["loss_construction"])
    return Outcome.at_most(max(rel), 0.02,
                           "the same 2% as the trained-vs-GD loss claim: if the two end points agree to the Adam "
                           "jitter (+-0.5%), a model between them must too (measured 0.1-0.2%)",
                           interpolation=_per_seed(rs, lambda r: r.summary["interpolation"]))


@claim("training.one_layer.ood_equals_gd", source=f"{SRC}, Sec. 3, Fig. 3 (out of distribution)",
       statement="Out of distribution (inputs scaled by alpha in [0.5, 2], teacher scaled by alpha in [0.5, 5]) the "
                 "trained one-layer model's loss follows GD-1's",
       method="1000 tasks per alpha on the paper's grids, same tasks for model and GD; worst |L_model - L_GD1| / L_GD1 "
              "over both sweeps and seeds")
def _(ctx):
    rs = runs(ctx, "one_layer")
    worst, where = 0.0, None
    for r in rs:
        for kind, rows in r.summary["ood"].items():
            m, g = np.array(rows["model"]), np.array(rows["gd"])
            rel = np.abs(m - g) / g
            i = int(np.argmax(rel))
            if rel[i] >= worst:
                worst, where = float(rel[i]), {"seed": r.config.seed, "sweep": kind, "alpha": rows["alpha"][i],
                                               "model": float(m[i]), "gd": float(g[i])}
    return Outcome.at_most(worst, 0.1,
                           "the worst point is always at the largest input scale, where GD overshoots (loss 30x the "
                           "in-distribution one) and the loss moves 2-3x as fast as eta: the trained layer's eta is "
                           "within ~2% of the line search, which gives the measured 2-6% (5 seeds); a model that "
                           "were not GD would differ by O(1) out there",
                           worst_point=where)


@claim("training.one_layer.rollout_tracks_damped_gd", source=f"{SRC}, Sec. 3 (iterating the trained layer)",
       statement="Applying the trained layer 50 times, updating only the y-slots with damping 0.75, tracks 50 steps of GD "
                 "with step size 0.75 * eta",
       method="1000 tasks; loss after each application against damped GD's after each step; worst relative difference "
              "over the 50 steps and the seeds")
def _(ctx):
    rs = runs(ctx, "one_layer")
    worst = 0.0
    for r in rs:
        m, g = np.array(r.summary["rollout"]["model"]), np.array(r.summary["rollout"]["gd"])
        worst = max(worst, float(np.max(np.abs(m - g) / g)))
    return Outcome.at_most(worst, 0.15,
                           "measured 3.5-6% (5 full seeds) and 5-8% (quick, numba and numpy task streams); not from "
                           "eta (a 2% eta change moves this curve by 1%) but from the entries one application never "
                           "uses and training leaves near their init (W_KQ's y-row and y-column meet the query's "
                           "y-slot once it is non-zero), 3-5% of the construction's norm; 0.15 is about twice the "
                           "worst measured, while a layer off the construction (e.g. on the early plateau) ends "
                           "several times above damped GD",
                           rollout=_per_seed(rs, lambda r: {"model": r.summary["rollout"]["model"][::7],
                                                            "gd": r.summary["rollout"]["gd"][::7]}))


# ---- two heads (Sec. 3) -----------------------------------------------------------

def _first_step_within(r, ref_key, rel):
    """First evaluation step whose loss is within ``rel`` of the baseline ``ref_key``."""
    ref = r.baselines[ref_key]
    return next((h["step"] for h in r.history if abs(h["loss"] - ref) <= rel * ref), None)


@claim("training.two_heads.loss_equals_gd1", source=f"{SRC}, Sec. 3 (two heads)",
       statement="A one-layer LSA with two heads trained from scratch also reaches the loss of one GD step (the paper "
                 "adds the second head to remove the early plateau; at batch 2048 we see none with one head either: "
                 "two heads come within 5% of GD-1 by step 300-400, one head by step 400-500)",
       method="two_heads experiment (K=1, H=2, otherwise as one_layer); quick: 1000 steps, 1 seed; full: 5000 "
              "steps, 5 seeds. Worst |L_model - L_GD1| / L_GD1 on the eval set (the first evaluation within 5% of "
              "GD-1 per seed in the details)")
def _(ctx):
    rs = runs(ctx, "two_heads")
    rel = _rel_to(rs, "gd_loss")
    return Outcome.at_most(max(rel), 0.02,
                           "the same bound as one head: GD-1 is the best one-layer linear-attention predictor up to "
                           "eta, and a second head adds no expressiveness toward a lower loss (the heads' sum is again "
                           "one bilinear map); measured 0.1-0.4% on 5 seeds at 5000 steps and 0.2-0.4% at step "
                           "1000 (the quick length), while at step 200 a model is still 40% above",
                           losses=_loss_rows(rs),
                           first_step_within_5pct=_per_seed(rs, lambda r: _first_step_within(r, "gd_loss", 0.05)))


@claim("training.two_heads.aligns_with_gd", source=f"{SRC}, Sec. 3 (two heads)",
       statement="The two heads together implement GD: the trained model's implicit linear model points the way of "
                 "GD-1's (model cos close to 1)",
       method="g = d y_hat / d x_q from the hand-written backward on the 10,000 eval tasks, against GD-1's weight; "
              "worst model cos over seeds")
def _(ctx):
    rs = runs(ctx, "two_heads")
    cos = [r.summary["final"]["model_cos_gd"] for r in rs]
    return Outcome.at_least(min(cos), 0.99,
                            "as for one head (measured 0.9991-0.9994 on 5 seeds at 5000 steps, 0.9986-0.9993 at "
                            "step 1000); a model still descending (loss 0.30, step 200 of seed 0) has cos 0.83",
                            alignment=_alignment(rs, refs=("gd",)))


@claim("training.two_heads.heads_sum_to_construction", source=f"{SRC}, Prop. 1 (two heads)",
       statement="The two trained heads together equal the Prop. 1 construction: the readout map summed over heads, "
                 "T[a,b,j] = sum_h W_PV,h[y,a] W_KQ,h[b,j], matches the construction's, although neither head alone "
                 "is a GD layer",
       method="relative Frobenius error of T (the only part of the layer the prediction reads; invariant to each "
              "head's scale symmetry) against the construction with the line-searched eta, worst over seeds; each "
              "head's own map against the best multiple of the construction's in the details")
def _(ctx):
    rs = runs(ctx, "two_heads")
    m = [A.readout_map_match(np.array(r.summary["products"][0]["W_KQ"]), np.array(r.summary["products"][0]["W_PV"]),
                             A.gd_construction_layer(r.config.data.d, r.config.data.d_y, r.config.data.N, r.baselines["gd_eta"]),
                             r.config.data.d) for r in rs]
    return Outcome.at_most(max(x["rel_err"] for x in m), 0.1,
                           "the one-head weights bound: Adam's constant step leaves eta within ~2% and the x-x "
                           "entries near their init noise; measured 0.046-0.062 on 5 seeds (one head: 0.038-0.053 on "
                           "the same map), while each head alone is 0.51-0.85 from any multiple of GD: the heads "
                           "carry off-diagonal terms that cancel in the sum",
                           readout_map={f"seed{r.config.seed}": x for r, x in zip(rs, m)})


# ---- recurrent two layers (Fig. 4) --------------------------------------------------

@claim("training.recurrent2.below_gd2", source=f"{SRC}, Sec. 4, Fig. 4",
       statement="A recurrent (weight-tied) two-layer LSA trained from scratch beats two steps of GD",
       method="recurrent2 experiment (clip 0.001, lr 1e-3, batch 2048); quick: 3000 steps, 1 seed; full: 5000 steps, "
              "5 seeds. Worst L_model / L_GD2 over seeds")
def _(ctx):
    rs = runs(ctx, "recurrent2")
    ratio = _over(rs, "gd_loss")
    return Outcome.at_most(max(ratio), 0.9,
                           "GD++ is 0.71 of GD-2 (0.112 vs 0.158); the training passes a first plateau at 0.93 of "
                           "GD-2 (steps 600-1500) before reaching GD++; 0.9 asks for more than that plateau",
                           losses=_loss_rows(rs))


@claim("training.recurrent2.near_gdpp", source=f"{SRC}, Sec. 4, Fig. 4 (GD++)",
       statement="The trained recurrent two-layer model sits near GD++ with meta-trained shared (eta, gamma)",
       method="GD++ (eta, gamma) meta-trained by Adam (lr 1e-3, b2 0.999, batch 512, 1000 steps) on P's entries "
              "from gamma = eta/N^2; worst |L_model - L_GD++| / L_GD++ over seeds (model cos vs GD++ in the details)")
def _(ctx):
    rs = runs(ctx, "recurrent2")
    rel = _rel_to(rs, "gdpp_loss")
    return Outcome.at_most(max(rel), 0.05,
                           "measured 0.4-1.5% on 5 seeds at 5000 steps, and every evaluation from step 3000 on "
                           "within 2.8% (Adam's jitter) once the model has left its first plateau (27% above GD++); "
                           "1000 meta-training steps leave GD++ itself ~1% above its converged loss",
                           losses=_loss_rows(rs),
                           model_cos_gdpp=_per_seed(rs, lambda r: r.summary["final"]["model_cos_gdpp"]))


@claim("training.recurrent2.gamma_equals_paper", source=f"{SRC}, Sec. 4 (gamma = 0.179 for N = 10)",
       statement="Read as a GD++ layer, the trained recurrent two-layer model has the curvature correction gamma the "
                 "paper reports for N = 10 (0.179)",
       method="gamma = -mean diagonal of the x-block of the rescaled W_PV * beta; worst |gamma - 0.179| / 0.179 over "
              "seeds (the meta-trained GD++ gamma in the details)")
def _(ctx):
    rs = runs(ctx, "recurrent2")
    reading = _gdpp_reading(rs)
    rel = [abs(x - 0.179) / 0.179 for x in reading["gamma_model"]]
    return Outcome.at_most(max(rel), 0.1,
                           "the paper gives three digits; measured 0.173-0.174 from the trained weights (5 seeds) "
                           "and 0.176 from GD++ meta-trained to convergence (3000 steps); 10% separates it from the "
                           "GD-like first plateau (gamma near 0) and from an unconverged GD++ (0.09 after 1000 Adam "
                           "steps on eta itself)",
                           **reading)


# ---- recurrent ten layers (Sec. 4) --------------------------------------------------

@claim("training.recurrent10.below_gd10", source=f"{SRC}, Sec. 4 (recurrent K=10)",
       statement="A recurrent (weight-tied) ten-layer LSA trained from scratch beats ten steps of GD",
       method="recurrent10 experiment (lr 5e-4, clip 10, token clip 10, batch 2048); quick: 3500 steps, 1 seed; "
              "full: 5000 steps, 5 seeds. Worst L_model / L_GD10 over seeds")
def _(ctx):
    rs = runs(ctx, "recurrent10")
    ratio = _over(rs, "gd_loss")
    return Outcome.at_most(max(ratio), 0.9,
                           "measured 0.61-0.65 on 5 seeds at 5000 steps and 0.73-0.78 at step 3500 (the quick "
                           "length); the training first sits at 0.91-0.97 of GD-10 (steps 1500-2000), so 0.9 asks "
                           "for more than reaching GD and stalling there",
                           losses=_loss_rows(rs))


@claim("training.recurrent10.reaches_gdpp", source=f"{SRC}, Sec. 4 (recurrent K=10, GD++)",
       statement="The trained recurrent ten-layer model closes the gap from GD-10 to GD++ with shared (eta, gamma) "
                 "meta-trained as in the paper (1000 Adam steps), and in the full run goes below it",
       method="fraction of the gap closed, (L_GD10 - L_model) / (L_GD10 - L_GD++), worst over seeds (1 = at GD++). "
              "The paper's 1000 meta-steps leave shared GD++ at K=10 far from converged: 0.0634 (eta 9.5, gamma "
              "0.025); 10,000 steps reach 0.0311 (eta 52.8, gamma 0.201) and it is still descending, so this claim "
              "is about the paper's GD++, not about the best GD++")
def _(ctx):
    rs = runs(ctx, "recurrent10")
    frac = [_gap_closed(r) for r in rs]
    details = dict(losses=_loss_rows(rs), gap_closed=frac,
                   gdpp_converged_reference={"gdpp_steps": 10000, "loss": 0.0311, "eta": 52.75, "gamma": 0.2011},
                   final_alignment=_alignment(rs))
    if ctx.full:
        return Outcome.at_least(min(frac), 1.0,
                                "the paper's trained recurrent models end at or below its GD++; measured 1.44-1.62 "
                                "(losses 0.051-0.055 vs GD++ 0.0634, GD-10 0.0835) on 5 seeds, still descending "
                                "(about 0.005 per 1000 steps at step 5000), i.e. on the way to the converged GD++ "
                                "(0.031) rather than at it",
                                **details)
    return Outcome.at_least(min(frac), 0.5,
                            "at step 3500 (70% of the paper's steps) measured 0.90-1.10 on 5 seeds; 0.5 asks that the "
                            "model is clearly past the GD-10 plateau and half way to GD++",
                            **details)


@claim("training.recurrent10.curvature_correction", source=f"{SRC}, Sec. 4 (GD++)",
       statement="Read as a GD++ layer, the trained recurrent ten-layer model applies a curvature correction: its "
                 "gamma is clearly positive (plain GD has gamma = 0)",
       method="gamma = -mean diagonal of the x-block of the rescaled W_PV * beta; smallest over seeds (the eta it "
              "implies and the meta-trained GD++ values in the details)")
def _(ctx):
    rs = runs(ctx, "recurrent10")
    details = _gdpp_reading(rs)
    g = details["gamma_model"]
    # gamma of seed 0 along its training: 0.0026 at step 1500 (the GD-10 plateau, model cos vs GD 0.999),
    # 0.015 at 2500, 0.047 at 3500, 0.122 at 5000
    if ctx.full:
        return Outcome.at_least(min(g), 0.05,
                                "measured 0.120-0.126 on 5 seeds at 5000 steps (between the paper-protocol GD++'s "
                                "0.025 and the converged GD++'s 0.201); plain GD has gamma exactly 0 and the model "
                                "on its GD-10 plateau (step 1500) 0.0026; 0.05 is far above both and well below the "
                                "measured values", **details)
    return Outcome.at_least(min(g), 0.02,
                            "gamma grows as the model leaves GD (seed 0: 0.0026 on the GD-10 plateau at step 1500, "
                            "0.015 at 2500, 0.047 at 3500, 0.122 at 5000); at the quick length (3500) 0.02 is 8x "
                            "the plateau value and half the measured one", **details)


# ---- five separate layers -----------------------------------------------------------

@claim("training.layers5.approaches_gdpp", source=f"{SRC}, Sec. 4 (non-recurrent K=5)",
       statement="A five-layer non-recurrent LSA trained from scratch leaves GD-5 behind and reaches GD++ with per-layer "
                 "meta-trained (eta_k, gamma_k) (in our full runs it then goes on well below GD++)",
       method="layers5 experiment (lr 5e-4, clip 10, token clip 10); GD++ per layer from Adam on P's entries. "
              "Measured: the fraction of the gap from GD-5 to GD++ the model has closed, "
              "(L_GD5 - L_model) / (L_GD5 - L_GD++) (1 = at GD++, > 1 = below it), worst over seeds. Quick: 3000 "
              "steps at batch 512 (6% of the paper's 50,000) against GD++ after 1000 meta-steps; full: 50,000 steps, "
              "GD++ 30,000 steps, 5 seeds")
def _(ctx):
    rs = runs(ctx, "layers5")
    frac = [_gap_closed(r) for r in rs]
    details = dict(losses=_loss_rows(rs), gap_closed=frac,
                   model_over_gdpp=_over(rs, "gdpp_loss"),
                   final_alignment=_alignment(rs))
    if ctx.full:
        return Outcome.at_least(min(frac), 0.75,
                                "the paper's 5-layer model ends at per-layer GD++; 0.75 of the gap closed is 'near "
                                "or beyond GD++' and excludes a model that merely beats GD-5. Measured 1.25-1.28 on 5 "
                                "seeds (numba): the model crosses GD++'s loss between steps 10,000 and 18,000, near "
                                "where its alignment with GD++ peaks (model cos 0.99-0.995), and ends at 0.0083-0.0105 "
                                "vs GD++ 0.0304; GD++ meta-trained for 100,000 steps instead of 30,000 reaches "
                                "0.0245, so the model's lead is not an unconverged baseline",
                                gdpp_100k_reference={"gdpp_steps": 100000, "loss": 0.02447}, **details)
    return Outcome.at_least(min(frac), 0.1,
                            "after 6% of the paper's steps the model is measured 21-41% of the way from GD-5 to "
                            "GD++ (numpy and numba task streams) and still descending; 0.1 asks that it has clearly "
                            "left GD-5 behind in GD++'s direction, not that it has arrived (in the full run it "
                            "reaches GD++ at step 17,000)",
                            **details)
