"""Analyses of trained LSA models against the gradient-descent constructions.

von Oswald et al. 2023, Sec. 3-4 and App. A (paper-settings.md section 6). What is
here, all in NumPy and all from the hand-written passes of this package:

* :func:`sensitivity`: the model's implicit linear model g = d y_hat / d x_q, from
  the hand-written backward (``readout_backward`` with dy_hat = 1, then
  ``model_backward``, keeping dE[:, N, :d]). For LSA without token clipping the
  query token stays linear in x_q through every layer (the query is never a key or a
  value), so g is exact, not a local linearisation.
* :func:`alignment`: the paper's three alignment metrics between a model and a
  reference learner (GD or GD++), per task then averaged:
  preds diff = mean |y_hat - y_hat_ref|,
  model cos  = mean <g / (|g| + 1e-8), g_ref / (|g_ref| + 1e-8)>,
  model diff = mean |g - g_ref|_2.
* :func:`rescale_to_construction`, :func:`construction_match`, :func:`interpolate`:
  the trained products W_KQ = W_K^T W_Q and W_PV = P W_V compared with a
  construction's after removing the scale symmetry (W_KQ / beta, W_PV * beta with
  beta = mean of the diagonal of W_KQ's x-block), and the averaged model.
* :func:`ood_tasks`: tasks with inputs x ~ U(-alpha/2, alpha/2) or teacher scale
  alpha, for the out-of-distribution sweeps (alpha = 1 is the training
  distribution).
* :func:`rollout_losses`, :func:`damped_gd_losses`: a trained layer applied many
  times with a damped update of the y-slot only, against damped GD.

This module draws nothing by itself except where a generator is passed in, and it
imports nothing outside ``reference``.
"""

import numpy as np

from ._checks import check_float, check_int
from .constructions import gd_layer, gdpp_layer, gdpp_model
from .layers.lsa import MergedParams, lsa_forward, to_merged
from .model import Arch, lsa_stack, model_backward, model_forward
from .solvers import gd_predict
from .tasks import sample_tasks
from .tokens import as_layout, build_tokens, readout

COS_EPS = 1e-8  # the paper's guard in g / (|g| + 1e-8)

# The out-of-distribution grids of the paper's figures (official code).
INPUT_SCALES = np.arange(0.5, 2.03, 0.03)
TEACHER_SCALES = np.arange(0.5, 5.1, 0.1)


def mean_loss(pred, y_q):
    """0.5 * mean over tasks of ||pred - y_q||^2, as a Python float (float64 sum)."""
    err = np.asarray(pred, np.float64) - np.asarray(y_q, np.float64)        # (B, d_y)
    return float(0.5 * (err * err).sum(axis=1).mean())


def sensitivity(E, params, arch, layout):
    """Prediction and implicit linear model of an LSA stack.

    Returns (y_hat (B, d_y), g (B, d_y, d)) with g[b, j] = d y_hat[b, j] / d x_q[b]:
    one forward, then per output dim j the backward of the readout with
    dy_hat = e_j and the model backward; g is the x-part of the query row of dE.
    """
    out, cache = model_forward(E, params, arch)                             # (B, T, D)
    lay = as_layout(layout, out.shape[2])
    d = lay.d
    pred = lay.readout(out)                                                 # (B, d_y)
    B, d_y = pred.shape
    g = np.empty((B, d_y, d), dtype=pred.dtype)                             # (B, d_y, d)
    for j in range(d_y):
        dpred = np.zeros_like(pred)                                         # (B, d_y)
        dpred[:, j] = 1.0
        dout = lay.readout_backward(dpred, out.shape)                       # (B, T, D)
        dE, _ = model_backward(dout, cache)                                 # (B, T, D)
        g[:, j, :] = dE[:, -1, :d]
    return pred, g


def alignment(pred, g, pred_ref, g_ref):
    """The paper's alignment metrics of (pred, g) against a reference (pred_ref, g_ref).

    pred (B, d_y), g (B, d_y, d). Returns dict(preds_diff, model_cos, model_diff),
    each a per-task quantity averaged over the B tasks (float64 arithmetic).
    """
    p = np.asarray(pred, np.float64)
    pr = np.asarray(pred_ref, np.float64)
    B = p.shape[0]
    a = np.asarray(g, np.float64).reshape(B, -1)                            # (B, d_y*d)
    b = np.asarray(g_ref, np.float64).reshape(B, -1)                        # (B, d_y*d)
    an = a / (np.linalg.norm(a, axis=1, keepdims=True) + COS_EPS)
    bn = b / (np.linalg.norm(b, axis=1, keepdims=True) + COS_EPS)
    return {
        "preds_diff": float(np.linalg.norm(p - pr, axis=1).mean()),
        "model_cos": float((an * bn).sum(axis=1).mean()),
        "model_diff": float(np.linalg.norm(a - b, axis=1).mean()),
    }


def gd_reference(tasks, eta, n_steps):
    """GD-K from W_0 = 0 as a reference learner: (y_hat (B, d_y), g (B, d_y, d)).
    The implicit linear model of GD is its final weight W_K."""
    pred, W = gd_predict(tasks.X, tasks.Y, tasks.x_q, eta, n_steps)
    return pred, W


def gdpp_reference(tasks, etas, gammas):
    """GD++ as a reference learner, through its construction and :func:`sensitivity`:
    (y_hat (B, d_y), g (B, d_y, d)), in the dtype of ``tasks``."""
    B, N, d = tasks.X.shape
    d_y = tasks.Y.shape[2]
    params, arch = gdpp_model(d, d_y, N, etas, gammas, recurrent=False, dtype=tasks.X.dtype)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)                           # (B, T, D)
    return sensitivity(E, params, arch, d)


def layer_products(layer):
    """(W_KQ, W_PV) of one layer's params (factored or merged), each (H, D, D)."""
    m = to_merged(layer)
    return np.asarray(m.W_KQ), np.asarray(m.W_PV)


def rescale_to_construction(layer, d):
    """Remove the scale symmetry (W_KQ, W_PV) -> (W_KQ / beta, W_PV * beta) of a
    one-head layer, with beta = mean of the diagonal of W_KQ's x-block (the
    construction has beta = 1). Returns (beta, W_KQ / beta (D, D), W_PV * beta (D, D))."""
    W_KQ, W_PV = layer_products(layer)
    if W_KQ.shape[0] != 1:
        raise ValueError(f"the rescaling compares one-head layers, got H={W_KQ.shape[0]}")
    W_KQ, W_PV = W_KQ[0].astype(np.float64), W_PV[0].astype(np.float64)
    beta = float(np.mean(np.diag(W_KQ[:d, :d])))
    if beta == 0.0:
        raise ValueError("beta (mean diagonal of W_KQ's x-block) is 0: the layer cannot be rescaled")
    return beta, W_KQ / beta, W_PV * beta


def construction_match(layer, construction, d):
    """How close a trained one-head layer is to a construction, up to the scale symmetry.

    Returns dict(beta, kq_rel_err, pv_rel_err, rel_err, eta_over_N,
    construction_eta_over_N, gamma_equiv) with
    kq_rel_err = ||W_KQ / beta - C_KQ||_F / ||C_KQ||_F and the same for W_PV * beta;
    rel_err is the larger of the two. The construction's own beta is 1 (Prop. 1).
    eta_over_N and gamma_equiv read the rescaled layer as a GD++ layer, whose W_PV is
    diag(-gamma I_d, -(eta/N) I_y): gamma = -mean diag of the x-block,
    eta/N = -mean diag of the y-block.
    """
    beta, KQ, PV = rescale_to_construction(layer, d)
    C_KQ, C_PV = (a[0].astype(np.float64) for a in layer_products(construction))
    kq = float(np.linalg.norm(KQ - C_KQ) / np.linalg.norm(C_KQ))
    pv = float(np.linalg.norm(PV - C_PV) / np.linalg.norm(C_PV))
    # the construction's y-block of W_PV is -(eta/N) I_y; its eta/N converts to eta via N
    c_yy = -float(np.mean(np.diag(C_PV[d:, d:])))
    return {"beta": beta, "kq_rel_err": kq, "pv_rel_err": pv, "rel_err": max(kq, pv),
            "eta_over_N": -float(np.mean(np.diag(PV[d:, d:]))), "construction_eta_over_N": c_yy,
            "gamma_equiv": -float(np.mean(np.diag(PV[:d, :d])))}


def readout_map(W_KQ, W_PV, d):
    """The part of a one-layer LSA the prediction depends on, summed over heads.

    For context-only attention the query's y-slot after the layer is
    sum_h W_PV,h[y, :] C W_KQ,h[:, :d] x_q with C = sum_i e_i e_i^T (the query's
    y-slot is 0), so the prediction is the bilinear form
    T[a, b, j] = sum_h W_PV,h[y, a] W_KQ,h[b, j] (a, b < D, j < d) applied to C and x_q.
    T is invariant to each head's scale symmetry and to how the heads split the work; it
    drops only the entries no prediction reads. ``W_KQ``, ``W_PV``: (H, D, D) or (D, D).
    d_y = 1 (the y row is the last). Returns T (D, D, d), float64."""
    KQ = np.asarray(W_KQ, dtype=np.float64)
    PV = np.asarray(W_PV, dtype=np.float64)
    if KQ.ndim == 2:
        KQ, PV = KQ[None], PV[None]
    if KQ.ndim != 3 or KQ.shape != PV.shape or KQ.shape[1] != KQ.shape[2] or not 0 < d < KQ.shape[1]:
        raise ValueError(f"W_KQ and W_PV must both be (H, D, D) with 0 < d < D; got {KQ.shape}, {PV.shape}, d={d}")
    return np.einsum("ha,hbj->abj", PV[:, -1, :], KQ[:, :, :d])


def readout_map_match(W_KQ, W_PV, construction, d):
    """||T - T_c||_F / ||T_c||_F for the readout maps (:func:`readout_map`) of trained
    products (any number of heads) and of a construction layer; per head, the same error of
    that head's own map against the best multiple of T_c (a head that alone did GD would
    score near 0). Returns dict(rel_err, per_head_rel_err)."""
    Tc = readout_map(*layer_products(construction), d)
    T = readout_map(W_KQ, W_PV, d)
    nc = np.linalg.norm(Tc)
    per_head = []
    KQ = np.asarray(W_KQ).reshape((-1,) + np.shape(W_KQ)[-2:])
    PV = np.asarray(W_PV).reshape(KQ.shape)
    for h in range(KQ.shape[0]):
        Th = readout_map(KQ[h], PV[h], d)
        c = float(np.sum(Th * Tc) / nc ** 2)
        per_head.append(float(np.linalg.norm(Th - c * Tc) / np.linalg.norm(c * Tc)) if c != 0 else float("inf"))
    return {"rel_err": float(np.linalg.norm(T - Tc) / nc), "per_head_rel_err": per_head}


def interpolate(layer, construction, d, t=0.5):
    """The merged layer (1 - t) * rescaled trained products + t * construction products.

    t = 0.5 is the paper's interpolated model. Returns :class:`MergedParams` (H = 1)
    in the construction's dtype."""
    t = check_float("t", t, 0.0, 1.0)
    _, KQ, PV = rescale_to_construction(layer, d)
    C_KQ, C_PV = (a[0].astype(np.float64) for a in layer_products(construction))
    dt = np.asarray(construction[0]).dtype
    return MergedParams(((1 - t) * KQ + t * C_KQ)[None].astype(dt), ((1 - t) * PV + t * C_PV)[None].astype(dt))


def gd_construction_layer(d, d_y, N, eta, dtype=np.float64):
    """The Prop. 1 layer (one GD step from W_0 = 0), for comparisons."""
    return gd_layer(d, d_y, N, eta, dtype=dtype)


def ood_tasks(rng, n_tasks, d, N, d_y, kind, alpha, dtype=np.float64, base_range=(-0.5, 0.5)):
    """Tasks for one point of an OOD sweep.

    kind 'input': x ~ U(alpha * low, alpha * high) with the training range
    (low, high) (the paper's U(-alpha/2, alpha/2)); kind 'teacher': W ~ alpha N(0, I).
    """
    alpha = check_float("alpha", alpha, 0.0, allow_equal_min=False)
    low, high = base_range
    if kind == "input":
        return sample_tasks(rng, n_tasks, d, N, d_y, x_range=(alpha * low, alpha * high), dtype=dtype)
    if kind == "teacher":
        return sample_tasks(rng, n_tasks, d, N, d_y, x_range=(low, high), w_scale=alpha, dtype=dtype)
    raise ValueError(f"kind must be 'input' or 'teacher', got {kind!r}")


def rollout_losses(layer, tasks, n_steps=50, damping=0.75, clip=None):
    """Apply one trained layer ``n_steps`` times, updating only the y-slots with a
    damped step: E_y <- E_y + damping * (lsa(E) - E)_y, the x-slots left as they are.

    Returns the loss of the readout after each application, (n_steps,) float64.
    With the Prop. 1 layer this is GD with step size damping * eta.
    """
    n_steps = check_int("n_steps", n_steps, 1)
    damping = check_float("damping", damping, 0.0, allow_equal_min=False)
    d = tasks.X.shape[2]
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)                           # (B, T, D)
    dt = E.dtype.type
    losses = np.empty(n_steps)
    for s in range(n_steps):
        out, _ = lsa_forward(E, layer, clip=clip)                           # (B, T, D)
        E = E.copy()
        E[:, :, d:] += dt(damping) * (out[:, :, d:] - E[:, :, d:])
        losses[s] = mean_loss(readout(E, d), tasks.y_q)
    return losses


def damped_gd_losses(tasks, eta, n_steps=50, damping=0.75):
    """Losses of GD with step size damping * eta after 1 .. n_steps steps, (n_steps,)."""
    n_steps = check_int("n_steps", n_steps, 1)
    X, Y, x_q = (np.asarray(a, np.float64) for a in (tasks.X, tasks.Y, tasks.x_q))
    B, N, d = X.shape
    W = np.zeros((B, Y.shape[2], d))                                        # (B, d_y, d)
    step = damping * eta
    losses = np.empty(n_steps)
    for s in range(n_steps):
        R = np.matmul(X, np.swapaxes(W, 1, 2)) - Y                          # (B, N, d_y)
        W = W - step * np.matmul(np.swapaxes(R, 1, 2), X) / N                # (B, d_y, d)
        losses[s] = mean_loss(np.einsum("bij,bj->bi", W, x_q), tasks.y_q)
    return losses


__all__ = ["COS_EPS", "INPUT_SCALES", "TEACHER_SCALES", "mean_loss", "sensitivity", "alignment",
           "gd_reference", "gdpp_reference", "layer_products", "rescale_to_construction",
           "construction_match", "interpolate", "gd_construction_layer", "ood_tasks", "rollout_losses",
           "damped_gd_losses", "construction_layers", "final_analyses", "interpolation", "ood_sweeps", "cast_tasks"]


# ---- the end-of-run analyses of a trained model (paper-settings.md section 6) ----------

def construction_layers(cfg, baselines, dtype):
    """The construction each trained parameter set is compared with: GD (Prop. 1) for one
    layer, the GD++ layer (meta-trained eta_k, gamma_k) for deeper models."""
    t = cfg.data
    if cfg.model.n_layers == 1:
        return [gd_construction_layer(t.d, t.d_y, t.N, baselines["gd_eta"], dtype=dtype)]
    etas, gammas = baselines["gdpp_etas"], baselines["gdpp_gammas"]
    n = cfg.arch().n_param_layers
    return [gdpp_layer(t.d, t.d_y, t.N, etas[k], gammas[k], dtype=dtype) for k in range(n)]


def final_analyses(cfg, params, baselines, evals):
    """Weights vs construction, interpolation, OOD sweeps, roll-out of a trained model
    (host params; ``evals`` the float64 eval tasks). Returns a dict (summary.json's).

    An analysis that cannot be computed for this model (its arithmetic overflows, a
    matrix is singular, the rescaling has beta = 0) is recorded as
    ``{"skipped": reason}`` under its name; the others are still computed."""
    out = {}
    dtype, lay = cfg.np_dtype, cfg.layout()
    if cfg.model.layers is not None:
        # the weight analyses read LSA products of the stack the LSA fields describe; OOD
        # sweeps go through the model itself
        why = {"skipped": f"the model is an explicit layer list (layer kinds {sorted(set(cfg.arch().kinds()))}): "
                          "this analysis reads the products W_K^T W_Q and P W_V of the lsa stack the model fields "
                          "describe"}
        ood = ({"skipped": "the OOD sweeps rescale the inputs and teachers of linear tasks; this run's task is "
                           f"{cfg.data.task!r}"} if cfg.data.task != "linear"
               else _attempt("ood", ood_sweeps, cfg, params, baselines))
        out.update(construction=None, weights=why, interpolation=why, products=why, ood=ood)
        if cfg.model.n_layers == 1:
            out["rollout"] = why
        return out
    evals_m = cast_tasks(evals, dtype)
    E = lay.build(evals_m.X, evals_m.Y, evals_m.x_q)
    consts = construction_layers(cfg, baselines, np.float64)
    out["construction"] = "gd" if cfg.model.n_layers == 1 else "gdpp"
    if cfg.model.heads == 1:
        out["weights"] = _attempt("weights", _weights, params, consts, lay.d)
        out["interpolation"] = _attempt("interpolation", interpolation, cfg, params, baselines, evals, E)
    else:
        out["weights"] = out["interpolation"] = {
            "skipped": f"the rescaling to the construction compares one-head layers; this model has "
                       f"{cfg.model.heads} heads (see products and the readout map instead)"}
    out["products"] = [{"W_KQ": layer_products(p)[0].tolist(), "W_PV": layer_products(p)[1].tolist()}
                       for p in params]
    out["ood"] = _attempt("ood", ood_sweeps, cfg, params, baselines)
    if cfg.model.n_layers == 1:
        out["rollout"] = _attempt("rollout", rollout, cfg, params, baselines)
    return out


def _attempt(name, fn, *args):
    """fn(*args), or {"skipped": reason} when it cannot be computed for this model."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return fn(*args)
    except (ValueError, ArithmeticError) as exc:      # LinAlgError is a ValueError
        return {"skipped": f"{name} could not be computed for this model: {type(exc).__name__}: {exc}"}


def _weights(params, consts, d):
    return [construction_match(p, c, d) for p, c in zip(params, consts)]


def rollout(cfg, params, baselines):
    """The damped roll-out of a one-layer model against damped GD, on ood_tasks tasks."""
    from .tasks import STREAM_ROLLOUT, stream_rng

    a = cfg.analysis
    rr = cfg.task_spec(a.ood_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_ROLLOUT))
    return {"model": rollout_losses(params[0], cast_tasks(rr, cfg.np_dtype), a.rollout_steps, a.rollout_damping,
                                    clip=cfg.model.token_clip).tolist(),
            "gd": damped_gd_losses(rr, baselines["gd_eta"], a.rollout_steps, a.rollout_damping).tolist(),
            "damping": a.rollout_damping}


def interpolation(cfg, params, baselines, evals, E):
    """Loss of the model averaged (t = 0.5) with its construction, evaluated in the model's
    arch; the construction's own loss (``loss_construction``) is taken in a plain LSA stack
    of the same depth and tying, without the model's clip.

    Only meaningful when the model's architecture can represent the construction: with
    token clipping the construction's tokens may exceed the clip (per-layer GD++ with
    large step sizes does), and then the construction inside the clipped arch is another
    function; the analysis is skipped with that reason."""
    arch, dtype, lay, clip = cfg.arch(), cfg.np_dtype, cfg.layout(), cfg.model.token_clip
    consts_m = tuple(construction_layers(cfg, baselines, dtype))
    out_c, cache_c = model_forward(E, consts_m, lsa_stack(arch.n_layers, recurrent=arch.recurrent))
    res = {"loss_construction": mean_loss(lay.readout(out_c), evals.y_q)}
    peak = max(float(np.max(np.abs(o))) for o in cache_c.outputs)
    if clip is not None and peak > clip:
        res["skipped"] = (f"the construction's tokens reach {peak:.3g}, beyond the token clip {clip:g}: the "
                          "clipped architecture cannot represent it")
        return res
    interp = tuple(interpolate(p, c, lay.d, 0.5) for p, c in zip(params, consts_m))
    pred_i, _ = sensitivity(E, interp, arch, lay)
    pred_m, _ = sensitivity(E, params, arch, lay)
    res.update(loss_interpolated=mean_loss(pred_i, evals.y_q), loss_model=mean_loss(pred_m, evals.y_q))
    return res


def ood_sweeps(cfg, params, baselines, input_scales=None, teacher_scales=None):
    """Loss of the model, GD-K, GD++ and least squares as the input range or the teacher
    scale is multiplied by alpha (the paper's grids by default), ood_tasks tasks each."""
    from .solvers import gdpp_predict, least_squares_predict
    from .tasks import STREAM_OOD, stream_rng

    input_scales = INPUT_SCALES if input_scales is None else np.asarray(input_scales)
    teacher_scales = TEACHER_SCALES if teacher_scales is None else np.asarray(teacher_scales)
    arch, dtype, K, lay, t = cfg.arch(), cfg.np_dtype, cfg.model.n_layers, cfg.layout(), cfg.data
    res = {}
    for ki, (kind, scales) in enumerate((("input", input_scales), ("teacher", teacher_scales))):
        rows = {"alpha": [float(a) for a in scales], "model": [], "gd": [], "gdpp": [], "lstsq": []}
        for ai, alpha in enumerate(scales):
            rng = stream_rng(cfg.eval.eval_seed, STREAM_OOD, ki + 1, ai + 1)
            tk = ood_tasks(rng, cfg.analysis.ood_tasks, t.d, t.N, t.d_y, kind, float(alpha), np.float64,
                           base_range=(t.x_low, t.x_high))
            tm = cast_tasks(tk, dtype)
            pred, _ = sensitivity(lay.build(tm.X, tm.Y, tm.x_q), params, arch, lay)
            rows["model"].append(mean_loss(pred, tk.y_q))
            rows["gd"].append(mean_loss(gd_reference(tk, baselines["gd_eta"], K)[0], tk.y_q))
            rows["gdpp"].append(mean_loss(gdpp_predict(tk.X, tk.Y, tk.x_q, baselines["gdpp_etas"],
                                                       baselines["gdpp_gammas"]), tk.y_q))
            rows["lstsq"].append(mean_loss(least_squares_predict(tk.X, tk.Y, tk.x_q), tk.y_q))
        res[kind] = rows
    return res


def cast_tasks(tasks, dtype):
    """The tasks with every array cast to ``dtype``."""
    return type(tasks)(*(a.astype(dtype) for a in tasks))
