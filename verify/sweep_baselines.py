"""Baselines a sweep can add to each run, beyond the paper's fixed-step protocol that
``reference.trainer.compute_baselines`` computes for every run:

* GD++ meta-trained **to convergence** (shared and per layer), under a stated stopping
  rule measured on the run's fixed evaluation set: Adam as in
  ``reference.solvers.meta_train_gdpp`` (same initialisation, coordinates, batches and
  task stream, so its first ``gdpp_steps`` steps are the paper's protocol), evaluated
  every ``window`` steps; it stops when the evaluation loss improved by less than
  ``tol`` (relative) over each of the last ``patience`` windows, not before
  ``min_steps`` (default: the run's ``gdpp_steps``, so it is never less trained than
  the paper's protocol, which its trajectory starts with), or at ``max_steps``
  (reported as not converged). A baseline that cannot flatter the trained model: a
  single flat window is not convergence (per-layer GD++ can rest on a plateau and then
  descend again), and its reported loss is the lowest it reached (``best_loss``).
* ridge regression with the Bayes-optimal lambda = sigma^2 / w_scale^2 (the posterior
  mean for a teacher W ~ w_scale N(0, I) and label noise N(0, sigma^2)), next to least
  squares; with sigma = 0 it is least squares.

Both are computed in the worker that trained the run, on that run's evaluation set.
Converged GD++ never reads the training seed (its tasks come from the evaluation seed's
GD++ stream, its start eta from the line search on the evaluation seed's tasks), so the
runs of a cell that differ only in the seed share one: with a ``cache_dir`` (a sweep's
``baselines/`` folder) the first worker to finish writes it there, atomically, and the
others read it instead of meta-training it again (up to 100,000 Adam steps each). A
worker that finds another computing it waits for it (an flock on ``<file>.lock``, which
the system releases if that worker dies).
"""

import hashlib
import json
import os
import time

try:
    import fcntl
except ImportError:      # not POSIX: no lock, two workers may both compute it
    fcntl = None

import numpy as np

from reference import analysis as A
from reference.errors import TrainingDiverged
from reference.files import write_text_atomic
from reference.optim import AdamHP, adam_init, adam_update
from reference.solvers import GDPPParams, gdpp_expand, gdpp_loss_and_grads, gdpp_predict, least_squares_predict
from reference.tasks import STREAM_GDPP, stream_rng

CONVERGED_DEFAULTS = {"tol": 1e-4, "window": 1000, "max_steps": 100_000, "patience": 3, "min_steps": None}


def gdpp_eval_loss(evals, etas, gammas):
    with np.errstate(over="ignore", invalid="ignore"):
        return A.mean_loss(gdpp_predict(evals.X, evals.Y, evals.x_q, etas, gammas), evals.y_q)


def rule_text(cfg, tol, window, max_steps, patience=CONVERGED_DEFAULTS["patience"], min_steps=None):
    """The stopping rule for a run of ``cfg`` as a converged GD++ result states it."""
    first = cfg.baselines.gdpp_steps if min_steps is None else min_steps
    return (f"relative eval-loss improvement < {tol:g} over each of {patience} window(s) of {window} steps in a row, "
            f"from step {first} on (at most {max_steps} steps)")


def converged_gdpp(cfg, evals, eta0, *, shared, tol, window, max_steps, patience=CONVERGED_DEFAULTS["patience"],
                   min_steps=None):
    """GD++ meta-trained until its evaluation loss improves by less than ``tol``
    (relative) over each of ``patience`` consecutive windows of ``window`` steps, the
    last one ending at or after ``min_steps`` (None: the run's ``gdpp_steps``). Returns a
    dict: loss, etas, gammas, steps, converged (False: stopped at max_steps), the
    evaluation-loss curve (step, loss) every window, the rule as text, and the evaluated
    iterate with the lowest loss (best_loss, best_step, best_etas, best_gammas: Adam at a
    constant step can end above a loss it passed, e.g. above the paper's protocol at
    gdpp_steps, which is one of the evaluated iterates when window divides it)."""
    from reference.backends import host_loss_and_grads

    t0 = time.perf_counter()
    fn = host_loss_and_grads(cfg.backend)         # the run's backend, as the trainer's fixed-step GD++ uses
    b, K, N = cfg.baselines, cfg.model.n_layers, cfg.data.N
    spec = cfg.task_spec(b.gdpp_batch)
    n = 1 if shared else K
    p = (GDPPParams(np.full(n, float(eta0) / N), np.full(n, float(eta0) / N ** 2)),)
    hp = AdamHP(lr=b.gdpp_lr, b1=0.9, b2=b.gdpp_b2, eps=1e-8, clip_norm=None)
    state = adam_init(p)
    curve = [(0, gdpp_eval_loss(evals, *gdpp_expand(p[0], K, N)))]
    best = (curve[0][1], 0, gdpp_expand(p[0], K, N))
    first = b.gdpp_steps if min_steps is None else min_steps
    converged, flat = False, 0
    for s in range(max_steps):
        t = spec.sample(stream_rng(cfg.eval.eval_seed, STREAM_GDPP, s + 1))
        etas, gammas = gdpp_expand(p[0], K, N)
        L, de, dg = gdpp_loss_and_grads(t, etas, gammas, recurrent=shared, loss_and_grads_fn=fn)
        if not np.isfinite(L):
            raise TrainingDiverged(f"converged GD++ meta-training diverged at step {s + 1} (loss {L})", s + 1)
        p, state, _ = adam_update(p, (GDPPParams(N * de, dg),), state, hp)   # dL/da = N dL/deta, a = eta / N
        if (s + 1) % window == 0:
            curve.append((s + 1, gdpp_eval_loss(evals, *gdpp_expand(p[0], K, N))))
            prev, now = curve[-2][1], curve[-1][1]
            if now < best[0]:
                best = (now, s + 1, gdpp_expand(p[0], K, N))
            flat = flat + 1 if np.isfinite(now) and (prev - now) / prev < tol else 0
            if flat >= patience and s + 1 >= first:
                converged = True
                break
    etas, gammas = gdpp_expand(p[0], K, N)
    return {"loss": gdpp_eval_loss(evals, etas, gammas), "etas": etas, "gammas": gammas, "steps": curve[-1][0],
            "converged": converged, "curve": curve, "seconds": round(time.perf_counter() - t0, 2),
            "rule": rule_text(cfg, tol, window, max_steps, patience, min_steps),
            "best_loss": best[0], "best_step": best[1], "best_etas": best[2][0], "best_gammas": best[2][1]}


def ridge_bayes(cfg, evals):
    """Ridge with lambda = sigma^2 / w_scale^2 on the evaluation set: {lambda, loss}."""
    lam = (cfg.data.noise_std / cfg.data.w_scale) ** 2
    pred = least_squares_predict(evals.X, evals.Y, evals.x_q, ridge=lam)
    return {"lambda": lam, "loss": A.mean_loss(pred, evals.y_q)}


def converged_cache_path(cache_dir, cfg, kind, rule, eta0):
    """Where the converged GD++ of ``kind`` for ``cfg`` is kept in ``cache_dir``: named by
    a hash of everything it reads, i.e. the run's config without its seed, the stopping
    rule and the start eta (bit for bit)."""
    c = cfg.to_dict()
    c.pop("seed")
    text = json.dumps({"config": c, "kind": kind, "rule": rule, "eta0": float(eta0).hex()}, sort_keys=True)
    return os.path.join(cache_dir, f"gdpp_converged_{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.json")


def converged_kinds(cfg):
    """The converged GD++ kinds a run of ``cfg`` gets: shared, and per layer above one layer."""
    return ("shared",) if cfg.model.n_layers == 1 else ("shared", "per_layer")


def _converged(cache_dir, cfg, evals, eta0, kind, rule):
    """Converged GD++ of ``kind``: read from ``cache_dir`` when a seed of the cell has
    computed it, else computed here (and written there when ``cache_dir`` is given)."""
    from .runs import jsonable

    if cache_dir is None:
        return converged_gdpp(cfg, evals, eta0, shared=kind == "shared", **rule)
    path = converged_cache_path(cache_dir, cfg, kind, rule, eta0)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".lock", "a", encoding="utf-8") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)    # a worker computing it holds this; released when it ends or dies
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            pass                     # absent, or unreadable: compute it (and replace the file)
        out = jsonable(converged_gdpp(cfg, evals, eta0, shared=kind == "shared", **rule))
        write_text_atomic(path, json.dumps(out))
        return out


def extra_baselines(cfg, evals, baselines, want, cache_dir=None):
    """The extra baselines ``want`` asks for ({'gdpp_converged': {tol, window,
    max_steps, patience, min_steps} or absent, 'ridge': bool}) for a finished run with
    ``baselines``. ``cache_dir``: where converged GD++ results are shared between the
    seeds of a cell (see the module docstring); None computes them here."""
    out = {}
    rule = want.get("gdpp_converged")
    if rule:
        for kind in converged_kinds(cfg):
            out[f"gdpp_converged_{kind}"] = _converged(cache_dir, cfg, evals, baselines["gd_eta"], kind, rule)
    if want.get("ridge"):
        out["ridge"] = ridge_bayes(cfg, evals)
    return out


def missing_extra(extra, cfg, want):
    """Whether a run's stored extra baselines ``extra`` lack one that ``want`` asks for
    (a converged GD++ kind absent or computed under another stopping rule, or ridge): a
    sweep whose file gained a baseline after its runs were done computes it for them."""
    rule = want.get("gdpp_converged")
    if rule and any((extra.get(f"gdpp_converged_{k}") or {}).get("rule") != rule_text(cfg, **rule)
                    for k in converged_kinds(cfg)):
        return True
    return bool(want.get("ridge")) and "ridge" not in extra
