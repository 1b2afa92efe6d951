"""Training a model from scratch: the loop a port reproduces, and what it evaluates.

von Oswald et al. 2023, Sec. 3-4 and App. A (paper-settings.md sections 4-6). One run
of a :class:`reference.config.TrainConfig`:

1. baselines on fixed task sets that do not depend on the training seed
   (:func:`compute_baselines`): GD-K with eta from the paper's line search
   (arange(0.001, 25, 0.1), on ``line_search_tasks`` tasks), GD++ with (eta, gamma)
   meta-trained by Adam (``solvers.meta_train_gdpp``; shared when the model is
   recurrent or has one layer, one pair per layer otherwise), least squares;
2. the initial parameters (:func:`init_params`): each parameter set of the Arch drawn in
   order from ``stream_rng(seed, STREAM_INIT)`` (for LSA: W_Q, W_K, W_V, P);
3. :func:`train_loop`: at step s (0-based) the backend's stepper draws the tasks of
   ``step_rng(seed, s)`` (a fast backend: its own generator keyed by (seed, s)), computes
   the loss and gradients, clips them by global norm and takes one Adam step; the
   training loss of the update is recorded with the step count s + 1. A non-finite loss,
   gradient norm or parameter stops the loop (:class:`TrainingDiverged`, naming the step);
4. every ``eval_every`` updates and after the last one (and once before the first, at
   step 0): the loss on the fixed evaluation set and the alignment metrics against GD
   and GD++ (:func:`evaluate`). The divergence rule (:class:`DivergenceWatch`) stops a
   run whose eval loss stays above ``diverge_factor`` times its reference (the larger of
   the step-0 eval loss and the zero predictor's) for ``diverge_evals`` evaluations in a
   row; its state is part of :class:`TrainState`, so a resumed run decides as an
   uninterrupted one.

The mesa paper's sequence task (``data.task == "lds"``, ``cfg.is_sequence``) has its own
initial draw, evaluation set, baselines, evaluation and stepper in
``reference.seq_training``; the functions below hand those over to it, and the loop,
the divergence rule and the state are shared.

The loop reports to an observer (:class:`Observer`: ``after_step``, ``after_eval``),
which is where an application writes checkpoints, metrics and progress; this module
writes no files. The end-of-run analyses are ``analysis.final_analyses``.
"""

import time
from typing import NamedTuple, Optional

import numpy as np

from . import analysis
from .backends import get_backend, host_loss_and_grads, require_support
from ._checks import NonFiniteError
from .errors import TrainingDiverged
from .layers import InitSettings
from .optim import AdamState, adam_init
from .solvers import gdpp_predict, least_squares_predict, line_search_eta, meta_train_gdpp
from .tasks import STREAM_EVAL, STREAM_INIT, STREAM_LINE_SEARCH, stream_rng
from .tree import all_finite, to_host


class DivergenceWatch(NamedTuple):
    """The divergence rule's state: its reference loss (None until step 0 is evaluated)
    and the evaluations in a row (with their steps) above diverge_factor * reference."""
    reference: Optional[float] = None
    strikes: tuple = ()

    def update(self, step, loss, zero_loss, factor, patience):
        """(new watch, True if the run has diverged) after the evaluation at ``step``."""
        if self.reference is None:
            return DivergenceWatch(max(float(loss), float(zero_loss)), ()), False
        if loss > factor * self.reference:
            strikes = self.strikes + (int(step),)
            return DivergenceWatch(self.reference, strikes), len(strikes) >= patience
        return DivergenceWatch(self.reference, ()), False

    def to_dict(self):
        return {"reference": self.reference, "strikes": list(self.strikes)}

    @classmethod
    def from_dict(cls, d):
        return cls(None if d["reference"] is None else float(d["reference"]), tuple(int(s) for s in d["strikes"]))


class TrainState(NamedTuple):
    """Where a run is: parameters, Adam state, the number of updates done and the
    divergence rule's state."""
    params: tuple
    adam: AdamState
    step: int
    watch: DivergenceWatch = DivergenceWatch()


class EvalSet(NamedTuple):
    """The fixed evaluation tasks (float64), their tokens in the model's dtype, the
    references (GD-K and GD++ predictions and implicit linear models) on them, and the
    zero predictor's loss 0.5 E||y_q||^2."""
    tasks: object
    E: object     # (B_eval, T, D)
    refs: dict    # name -> (pred (B, d_y), g (B, d_y, d))
    zero_loss: float


def init_params(cfg):
    """The paper's initialisation (variance scaling, init_scale / K over fan-in,
    truncated normal), from ``stream_rng(seed, STREAM_INIT)``; with ``init_std`` set,
    normal(0, init_std) weight matrices (``seq_training.init_normal``)."""
    if cfg.model.init_std is not None:
        from . import seq_training

        D_in = seq_training.layout_of(cfg).D_in if cfg.is_sequence else cfg.layout().D_in
        return seq_training.init_normal(cfg.arch(), D_in, cfg.model.init_std, stream_rng(cfg.seed, STREAM_INIT),
                                        cfg.np_dtype)
    settings = InitSettings(cfg.model.init_scale, cfg.model.n_layers, cfg.np_dtype)
    return cfg.arch().init(stream_rng(cfg.seed, STREAM_INIT), cfg.layout().D_in, settings)


def init_state(cfg):
    params = init_params(cfg)
    return TrainState(params, adam_init(params), 0)


def eval_tasks(cfg):
    """The fixed evaluation set (float64; independent of the training seed)."""
    if cfg.is_sequence:
        from . import seq_training

        return seq_training.eval_sequences(cfg)
    return cfg.task_spec(cfg.eval.eval_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_EVAL))


def gd_k_baseline(cfg, K, evals=None):
    """(loss, eta) of K GD steps from W = 0 on the eval set ``evals`` (default: the run's
    eval set), eta line-searched for K steps on the run's line-search tasks: the GD-K
    baseline of a run of ``cfg`` for any K (compute_baselines uses K = n_layers)."""
    ls = cfg.task_spec(cfg.baselines.line_search_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_LINE_SEARCH))
    eta, _ = line_search_eta(ls.X, ls.Y, ls.x_q, ls.y_q, n_steps=K)
    if evals is None:
        evals = cfg.task_spec(cfg.eval.eval_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_EVAL))
    pred_gd, _ = analysis.gd_reference(evals, eta, K)
    return analysis.mean_loss(pred_gd, evals.y_q), float(eta)


def compute_baselines(cfg, evals, log=None):
    """GD-K (line-searched eta), GD++ (meta-trained), least squares, on the eval set.
    ``log(text)``: optional progress lines. Returns a JSON-able dict. (lds task:
    ``seq_training.compute_baselines``.)"""
    if cfg.is_sequence:
        from . import seq_training

        return seq_training.compute_baselines(cfg, evals, log)
    t0 = time.perf_counter()
    K, b = cfg.model.n_layers, cfg.baselines
    gd_loss, eta = gd_k_baseline(cfg, K, evals)
    if log:
        log(f"baselines: GD-{K} eta {eta:.3f} (line search on {b.line_search_tasks} tasks), eval loss {gd_loss:.5f}")
    gdpp_log = _GDPPLog(log, b.gdpp_steps) if (log and b.gdpp_steps >= 2000) else None
    etas, gammas, _ = meta_train_gdpp(cfg.task_spec(b.gdpp_batch), K, eta, shared=cfg.gdpp_shared,
                                      steps=b.gdpp_steps, lr=b.gdpp_lr, b2=b.gdpp_b2, seed=cfg.eval.eval_seed,
                                      loss_and_grads_fn=host_loss_and_grads(cfg.backend), log=gdpp_log)
    with np.errstate(over="ignore", invalid="ignore"):
        gdpp_loss = analysis.mean_loss(gdpp_predict(evals.X, evals.Y, evals.x_q, etas, gammas), evals.y_q)
    ls_loss = analysis.mean_loss(least_squares_predict(evals.X, evals.Y, evals.x_q), evals.y_q)
    zero_loss = analysis.mean_loss(np.zeros_like(evals.y_q), evals.y_q)
    if log:
        log(f"baselines: GD++ ({'shared' if cfg.gdpp_shared else 'per layer'}, {b.gdpp_steps} Adam steps on P) "
            f"eta {np.round(etas, 3).tolist()} gamma {np.round(gammas, 4).tolist()}, eval loss {gdpp_loss:.5f}; "
            f"least squares {ls_loss:.5f} ({time.perf_counter() - t0:.0f} s)")
    losses = {"gd": gd_loss, "gdpp": gdpp_loss, "lstsq": ls_loss}
    failed = {k: v for k, v in losses.items() if not (np.isfinite(v) and v <= zero_loss)}
    if log:
        for k, v in failed.items():
            log(f"warning: the {BASELINE_NAMES[k]} baseline failed: its eval loss {v:.4g} is above the zero "
                f"predictor's {zero_loss:.4g} (0.5 E||y||^2); comparisons with it are not meaningful")
    return {"gd_eta": float(eta), "gd_loss": gd_loss, "gdpp_etas": [float(e) for e in etas],
            "gdpp_gammas": [float(g) for g in gammas], "gdpp_loss": gdpp_loss, "lstsq_loss": ls_loss,
            "zero_loss": zero_loss, "failed": failed, "seconds": round(time.perf_counter() - t0, 2)}


BASELINE_NAMES = {"gd": "GD-K", "gdpp": "GD++", "lstsq": "least-squares"}


class _GDPPLog:
    """``log(step, loss)`` for meta_train_gdpp, as text lines through ``log``."""

    def __init__(self, log, total):
        self.log, self.total = log, total

    def __call__(self, s, L):
        self.log(f"baselines: GD++ meta-training step {s}/{self.total}, batch loss {L:.5f}")


def eval_set(cfg, evals, baselines):
    """:class:`EvalSet` of the run: tokens in the model dtype and the GD / GD++ references."""
    if cfg.is_sequence:
        from . import seq_training

        return seq_training.eval_set(cfg, evals, baselines)
    evals_m = analysis.cast_tasks(evals, cfg.np_dtype)
    E = cfg.layout().build(evals_m.X, evals_m.Y, evals_m.x_q)                     # (B_eval, T, D)
    refs = {"gd": _reference(analysis.gd_reference, evals, baselines["gd_eta"], cfg.model.n_layers),
            "gdpp": _reference(analysis.gdpp_reference, evals, baselines["gdpp_etas"], baselines["gdpp_gammas"])}
    return EvalSet(evals, E, refs, analysis.mean_loss(np.zeros_like(evals.y_q), evals.y_q))


def _reference(fn, evals, *args):
    """A reference learner's (pred, g) on the eval set; NaN where it cannot be computed
    (a failed baseline whose tokens overflow), so its alignment metrics read NaN."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            pred, g = fn(evals, *args)
    except ValueError:
        B, d_y, d = evals.y_q.shape[0], evals.y_q.shape[1], evals.X.shape[2]
        return np.full((B, d_y), np.nan), np.full((B, d_y, d), np.nan)
    return pred, g


def evaluate(params, cfg, es):
    """Eval loss and the alignment metrics against GD and GD++ (one forward+backward of
    the reference on host params). Returns dict(loss, preds_diff_gd, model_cos_gd, ...).
    (lds task: ``seq_training.evaluate``, with per-time-step losses.)"""
    if cfg.is_sequence:
        from . import seq_training

        return seq_training.evaluate(params, cfg, es)
    pred, g = analysis.sensitivity(es.E, params, cfg.arch(), cfg.layout())
    row = {"loss": analysis.mean_loss(pred, es.tasks.y_q)}
    for name, (p_ref, g_ref) in es.refs.items():
        for k, v in analysis.alignment(pred, g, p_ref, g_ref).items():
            row[f"{k}_{name}"] = v
    if cfg.data.tokens == "classic":
        row.update(copy_metrics(params, cfg, es.tasks))
    return row


COPY_TASKS = 64   # eval tasks the copy sensitivities of a classic-token run are taken on


def copy_metrics(params, cfg, tasks):
    """The first attention layer's copy sensitivities on the first COPY_TASKS eval tasks
    (``copy_analysis.copy_sensitivities``, complex step): copy_self, copy_next, copy_other."""
    from .copy_analysis import copy_sensitivities

    sub = analysis.cast_tasks(type(tasks)(*(a[:COPY_TASKS] for a in tasks)), cfg.np_dtype)
    s = copy_sensitivities(params, cfg.arch(), cfg.layout(), sub)
    return {f"copy_{k}": s[k] for k in ("self", "next", "other")}


class Observer:
    """What :func:`train_loop` reports to; the default does nothing.

    ``after_step(state, loss, grad_norm)``: after every update (``state.step`` counts it);
    ``after_eval(state, row, train_loss, grad_norm)``: after each evaluation, with the mean
    training loss and gradient norm of the updates since the previous one (None at step 0).
    The application writes checkpoints, metrics and progress here."""

    def after_step(self, state, loss, grad_norm):
        pass

    def after_eval(self, state, row, train_loss, grad_norm):
        pass


def make_stepper(cfg):
    """The configured backend's stepper for this run, after checking the backend can run it."""
    if cfg.is_sequence:
        from . import seq_training

        return seq_training.make_stepper(cfg)
    backend = get_backend(cfg.backend)
    backend.check_available()
    arch = cfg.arch()
    require_support(backend, arch)
    layout = cfg.layout()
    extra = {} if layout.kind in ("regression", "embedded") else {"layout": layout}   # classic tokens
    return backend.make_stepper(arch, cfg.adam_hp(), cfg.task_spec(), cfg.seed, cfg.np_dtype, **extra)


def train_loop(cfg, state, es, observer=None, stepper=None):
    """Train from ``state`` until ``cfg.steps`` updates; returns the final TrainState
    (params may be device arrays on a device backend). Evaluates at step 0 when
    ``state.step == 0`` and no evaluation is recorded yet (``state.watch.reference`` is
    None; a run resumed from its step-0 checkpoint has that evaluation already). Raises
    TrainingDiverged on a non-finite loss, gradient norm or parameter (before the observer
    sees the bad state)."""
    observer = Observer() if observer is None else observer
    stepper = make_stepper(cfg) if stepper is None else stepper
    every = cfg.eval.eval_every
    if state.step == 0 and state.watch.reference is None:   # not a resume from the step-0 checkpoint
        state, row = _evaluated(cfg, state, es)
        observer.after_eval(state, row, None, None)
    losses, norms = [], []
    while state.step < cfg.steps:
        step = state.step + 1
        try:
            res = stepper.step(state.params, state.adam, state.step)
        except NonFiniteError as exc:     # an intermediate token or gradient overflowed inside the step
            raise TrainingDiverged(f"training diverged at step {step} of {cfg.steps}: {exc}", step) from None
        loss, gnorm = float(res.loss), float(res.grad_norm)
        finite = all_finite(res.params)
        if not (np.isfinite(loss) and np.isfinite(gnorm) and finite):
            raise _diverged(cfg, step, loss, gnorm, finite)
        state = TrainState(res.params, res.state, step, state.watch)
        losses.append(loss)
        norms.append(gnorm)
        observer.after_step(state, loss, gnorm)
        if step % every == 0 or step == cfg.steps:
            state, row = _evaluated(cfg, state, es)
            observer.after_eval(state, row, float(np.mean(losses)), float(np.mean(norms)))
            losses, norms = [], []
    return state


def _evaluated(cfg, state, es):
    """Evaluate, apply the divergence rule; (new state, eval row) or TrainingDiverged."""
    try:
        row = {"step": state.step, **evaluate(to_host(state.params), cfg, es)}
    except NonFiniteError as exc:
        raise TrainingDiverged(f"training diverged at step {state.step} of {cfg.steps}: the evaluation overflowed "
                               f"({exc})", state.step) from None
    if not np.isfinite(row["loss"]):
        raise _diverged(cfg, state.step, row["loss"], None, True)
    e = cfg.eval
    watch, diverged = state.watch.update(state.step, row["loss"], es.zero_loss, e.diverge_factor, e.diverge_evals)
    if diverged:
        raise TrainingDiverged(
            f"training diverged at step {state.step} of {cfg.steps}: the eval loss ({row['loss']:.4g} now) was above "
            f"{e.diverge_factor:g} x its reference {watch.reference:.4g} (the larger of the step-0 eval loss and "
            f"the zero predictor's) at {e.diverge_evals} evaluations in a row (steps "
            f"{', '.join(map(str, watch.strikes))})", state.step)
    return state._replace(watch=watch), row


def _diverged(cfg, step, loss, grad_norm, finite_params):
    what = [f"loss {loss}"]
    if grad_norm is not None and not np.isfinite(grad_norm):
        what.append(f"gradient norm {grad_norm}")
    if not finite_params:
        what.append("non-finite parameters")
    return TrainingDiverged(f"training diverged at step {step} of {cfg.steps}: {', '.join(what)}", step)


def memory_estimate(cfg):
    """Bytes a run of ``cfg`` needs at its peak, estimated from the config alone (no
    array is made), as dict(parts={name: bytes} (what is held at the peak), passes={name:
    bytes} (every transient pass), total=bytes).

    What is counted: the parameters with their gradients, Adam moments and the updated
    copy (5 copies); the evaluation set, kept for the whole run (float64 tasks, tokens,
    the GD and GD++ references); and the largest of the passes that come and go: one
    training step on ``batch`` tasks (tasks drawn in float64 and cast, tokens, the
    forward's caches as the layers report them, and as much again for the backward),
    the evaluation forward and backward (also the GD++ reference's, in float64), the
    line search, a GD++ meta-training step and an OOD point. The fused backends keep
    less than the reference's caches, so this is an upper bound for them."""
    if cfg.is_sequence:
        from . import seq_training

        return seq_training.memory_estimate(cfg)
    t, arch, item = cfg.data, cfg.arch(), cfg.np_dtype.itemsize
    D, T = cfg.layout().D_in, cfg.layout().n_tokens(t.N)
    task = t.N * (t.d + t.d_y) + t.d + t.d_y + t.d_y * t.d          # floats per task (X, Y, x_q, y_q, W)
    cache = arch.cache_floats(T, D)                                  # floats per task the forward keeps
    refs = 2 * t.d_y * (1 + t.d)                                     # GD and GD++ (pred, g) per task
    E_eval = cfg.eval.eval_tasks
    passes = {
        "train_step": cfg.data.batch * (task * (8 + item) + T * D * item + 2 * cache * item),
        "eval_pass": E_eval * 2 * cache * max(item, 8),
        "line_search": cfg.baselines.line_search_tasks * task * 8 * 3,
        "gdpp_step": cfg.baselines.gdpp_batch * (task + 2 * cache) * 8,
        "ood_point": cfg.analysis.ood_tasks * (task * (8 + item) + 2 * cache * item),
    }
    parts = {"params": 5 * arch.param_floats(D) * item,
             "eval": E_eval * (task * 8 + T * D * item + refs * 8)}
    peak = max(passes, key=passes.get)
    parts[peak] = passes[peak]
    return {"parts": parts, "passes": passes, "total": int(sum(parts.values()))}
