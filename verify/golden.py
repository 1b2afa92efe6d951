"""Golden test vectors: plain ``.npz`` files and a JSON manifest for ports.

``icgd vectors write [DIR]`` computes every case with the reference and writes
``DIR/<case>.npz`` plus ``DIR/manifest.json``; ``icgd vectors check [DIR]`` reads
them back, recomputes every case from its stored inputs with the reference and
compares the stored outputs, one verdict line per case, exit code 1 on any mismatch.
DIR defaults to this package's ``verify/vectors/`` (the committed vectors). Also
``python -m verify.golden write|check [DIR]``.

What this file is: the generator and the checker. What it is not: the independent
confirmation of the vectors, which lives in ``verify/claims_vectors.py`` (loop
oracle, complex-step derivatives, hand transcriptions) and runs in the tests.
Every key of every case is documented in SPEC.md (section "Golden vectors").

A case is a kind, a builder of inputs (seeded) and the reference function of that
kind mapping inputs to outputs. The builder runs only in ``write``; ``check``
recomputes outputs from the *stored* inputs, so a port needs only the npz.
Conventions inside an npz: every float is float64; configuration is stored as 0-d
arrays (``causal``, ``recurrent`` bool; ``K``, ``d``, ``seed`` int64); ``clip`` and
``clip_norm`` = +inf mean "no clipping" (clip(x, -inf, inf) = x exactly); per-layer
parameters of a stack are ``layer<k>.<name>``, gradients ``d<name>`` (the leaf of
path ``<k>.<name>`` of the parameter tree, ``reference.tree``; see ``STACK_KEY``).
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

import reference as R
from reference.backends.numpy_backend import make_stepper
from reference.optim import AdamHP, AdamState, adam_init, adam_update, global_norm
from reference.tolerances import allclose_report, tolerance
from reference.tree import tree_leaves, tree_map, tree_paths, tree_unflatten

FORMAT_VERSION = 1
SEED = 20230712
MANIFEST = "manifest.json"
DEFAULT_DIR = Path(__file__).resolve().parent / "vectors"
TOL_KIND = "algebra"   # the reference against its own vectors: same polynomial, maybe other summation order
REGENERATE_HINT = "regenerate the vectors with `icgd vectors write` (or `python -m verify.golden write`)"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class Case(NamedTuple):
    name: str
    kind: str
    inputs: dict    # key -> ndarray, in writing order
    outputs: dict   # key -> ndarray


# --------------------------------------------------------------------------------
# Parameter naming: parameter trees (reference.tree) <-> npz keys
# --------------------------------------------------------------------------------
# A tree's leaves are walked and named by reference.tree (tree_leaves, tree_paths
# "<i>.<field>", tree_unflatten); the vector files spell the path of leaf <i>.<field>
# with one of these formats (g = "d" for gradients, "" otherwise):

STACK_KEY = "{prefix}layer{i}.{g}{field}"   # a stack's tree: layer0.W_Q, m.layer1.P, layer0.dW_Q
LAYER_KEY = "{prefix}{g}{field}"            # a one-layer case: W_Q, dW_Q (the tree (p,))


def tree_keys(tree, prefix="", grad=False, key=STACK_KEY):
    """The npz key of each of ``tree_leaves(tree)``, from its path ``"<i>.<field>"``."""
    keys = []
    for path in tree_paths(tree):
        i, field = path.split(".", 1)
        keys.append(key.format(prefix=prefix, i=i, g="d" if grad else "", field=field))
    return keys


def tree_arrays(tree, prefix="", grad=False, key=STACK_KEY):
    """``{npz key: leaf}`` for a parameter tree, in ``tree_leaves`` order."""
    return dict(zip(tree_keys(tree, prefix, grad, key), tree_leaves(tree)))


def read_tree(arrays, types, prefix="", grad=False, key=STACK_KEY):
    """The tree with one layer of each NamedTuple class in ``types`` stored by
    :func:`tree_arrays`. The skeleton's leaves are its field names (only its structure
    is used: the keys and the order)."""
    like = tuple(tp(*tp._fields) for tp in types)
    return tree_unflatten(like, [np.asarray(arrays[k]) for k in tree_keys(like, prefix, grad, key)])


def _stored_type(arrays, prefix, grad, key, i=0):
    """MergedParams if layer ``i`` is stored merged (``W_KQ``), else LSAParams."""
    merged = key.format(prefix=prefix, i=i, g="d" if grad else "", field="W_KQ") in arrays
    return R.MergedParams if merged else R.LSAParams


def layer_arrays(p, prefix="", grad=False):
    """Keys ``<prefix>W_Q`` ... (``<prefix>dW_Q`` ... for gradients) for one layer."""
    return tree_arrays((p,), prefix, grad, LAYER_KEY)


def stack_arrays(layers, prefix="", grad=False):
    """Keys ``<prefix>layer<k>.<name>`` (``.d<name>`` for gradients) for a tuple of layers."""
    return tree_arrays(layers, prefix, grad, STACK_KEY)


def read_layer(arrays, prefix="", grad=False):
    """One layer from keys ``<prefix>W_Q`` ... (factored) or ``<prefix>W_KQ`` ... (merged)."""
    return read_tree(arrays, [_stored_type(arrays, prefix, grad, LAYER_KEY)], prefix, grad, LAYER_KEY)[0]


def read_stack(arrays, prefix="", grad=False):
    """The tuple of layers stored under ``<prefix>layer0.``, ``<prefix>layer1.``, ..."""
    pat = re.compile(re.escape(prefix) + r"layer(\d+)\.")
    n = 1 + max(int(m.group(1)) for m in (pat.match(k) for k in arrays) if m)
    types = [_stored_type(arrays, prefix, grad, STACK_KEY, i) for i in range(n)]
    return read_tree(arrays, types, prefix, grad, STACK_KEY)


def _scalar(x):
    return np.asarray(x)[()]


def _clip_arg(x):
    """Stored clip (+inf = none) -> the reference's argument (None = none)."""
    c = float(x)
    return None if np.isinf(c) else c


def _arch(a):
    return R.lsa_stack(int(a["K"]), recurrent=bool(a["recurrent"]), causal=bool(a["causal"]), clip=_clip_arg(a["clip"]))


# --------------------------------------------------------------------------------
# The reference computation of each kind: stored inputs -> outputs
# --------------------------------------------------------------------------------

def compute_layer(a):
    """One LSA layer and its backward for the upstream gradient ``dout``."""
    p = read_layer(a)
    out, cache = R.lsa_forward(a["E"], p, causal=bool(a["causal"]), clip=_clip_arg(a["clip"]))
    dE, dp = R.lsa_backward(a["dout"], cache)
    return {"out": out, "dE": dE, **layer_arrays(dp, grad=True)}


def compute_stack(a):
    """A K-layer stack and its backward for the upstream gradient ``dout`` on E_K."""
    out, cache = R.model_forward(a["E"], read_stack(a), _arch(a))
    dE, grads = R.model_backward(a["dout"], cache)
    return {"out": out, "dE": dE, **stack_arrays(grads, grad=True)}


def compute_loss(a):
    """Readout, 0.5 * MSE loss and the loss gradient for E and every parameter."""
    layout = R.TokenLayout(int(a["d"]), a["y_q"].shape[1])
    L, grads, aux = R.loss_and_grads(a["E"], a["y_q"], read_stack(a), _arch(a), layout)
    return {"pred": aux["pred"], "L": np.asarray(L, dtype=np.float64), "dE": aux["dE"], **stack_arrays(grads, grad=True)}


def compute_gd(a):
    """The Prop. 1 construction (K layers, recurrent or separate) against explicit GD-K."""
    X, Y, x_q, W_0 = a["X"], a["Y"], a["x_q"], a["W_0"]
    B, N, d = X.shape
    d_y = Y.shape[2]
    eta, K = float(a["eta"]), int(a["K"])
    params, arch = R.gd_stack(K, d, d_y, N, eta, W_0, recurrent=bool(a["recurrent"]))
    layout = R.TokenLayout(d, d_y)
    E = layout.build(X, Y, x_q, W_0=W_0)                               # (B, T, D)
    out, _ = R.model_forward(E, params, arch)
    pred_gd, W_gd = R.gd_predict(X, Y, x_q, eta, K, W_0=W_0)
    return {"E": E, **stack_arrays(params), "out": out, "pred": layout.readout(out), "pred_gd": pred_gd, "W_gd": W_gd}


def compute_gdpp(a):
    """The GD++ construction (separate layers, one (eta_k, gamma_k) each) against its recursion."""
    X, Y, x_q, W_0 = a["X"], a["Y"], a["x_q"], a["W_0"]
    B, N, d = X.shape
    etas, gammas = [float(e) for e in a["etas"]], [float(g) for g in a["gammas"]]
    params, arch = R.gdpp_stack(d, Y.shape[2], N, etas, gammas, W_0)
    layout = R.TokenLayout(d, Y.shape[2])
    E = layout.build(X, Y, x_q, W_0=W_0)                               # (B, T, D)
    out, _ = R.model_forward(E, params, arch)
    pred_gdpp = R.gdpp_predict(X, Y, x_q, etas, gammas, W_0=W_0)
    return {"E": E, **stack_arrays(params), "out": out, "pred": layout.readout(out), "pred_gdpp": pred_gdpp}


def _hp(a):
    return AdamHP(lr=float(a["lr"]), b1=float(a["b1"]), b2=float(a["b2"]), eps=float(a["eps"]),
                  clip_norm=_clip_arg(a["clip_norm"])).validate()


def compute_adam(a):
    """One global-norm-clipped Adam step from a given state."""
    params, grads = read_stack(a), read_stack(a, grad=True)
    state = AdamState(read_stack(a, "m."), read_stack(a, "v."), int(a["t"]))
    new, st, norm = adam_update(params, grads, state, _hp(a))
    return {**stack_arrays(new, "new."), **stack_arrays(st.m, "new_m."), **stack_arrays(st.v, "new_v."),
            "new_t": np.asarray(st.t, dtype=np.int64), "grad_norm": np.asarray(norm, dtype=np.float64)}


def compute_train(a):
    """``n_steps`` steps of the numpy backend's stepper (float64), tasks of step s from
    default_rng([seed, s]); records each step's tasks, loss and pre-clip gradient norm."""
    spec = R.TaskSpec(d=int(a["d"]), N=int(a["N"]), d_y=int(a["d_y"]), B=int(a["B"]),
                      x_range=tuple(float(v) for v in a["x_range"]), w_scale=float(a["w_scale"]),
                      noise_std=float(a["noise_std"]), n_distractors=int(a["n_distractors"]))
    stepper = make_stepper(_arch(a), _hp(a), spec, int(a["seed"]), dtype=np.float64)
    params = read_stack(a)
    state = adam_init(params)
    out, losses, norms = {}, [], []
    for s in range(int(a["n_steps"])):
        t = stepper.sample(s)
        out.update({f"step{s}.{f}": getattr(t, f) for f in ("X", "Y", "x_q", "y_q")})
        res = stepper.step(params, state, s)
        params, state = res.params, res.state
        losses.append(res.loss)
        norms.append(res.grad_norm)
    return {"losses": np.array(losses), "grad_norms": np.array(norms), **out, **stack_arrays(params, "final.")}


def compute_tasks(a):
    """sample_tasks(step_rng(seed, step), ...): the sampler's draw order, bit for bit."""
    t = R.sample_tasks(R.step_rng(int(a["seed"]), int(a["step"])), int(a["B"]), int(a["d"]), int(a["N"]), int(a["d_y"]),
                       x_range=tuple(float(v) for v in a["x_range"]), w_scale=float(a["w_scale"]),
                       noise_std=float(a["noise_std"]), n_distractors=int(a["n_distractors"]))
    return dict(zip(t._fields, t))


def compute_init(a):
    """init_lsa_params(default_rng(seed), D, ...) in float64."""
    p = R.init_lsa_params(np.random.default_rng(int(a["seed"])), int(a["D"]), H=int(a["H"]), key_size=int(a["key_size"]),
                          value_size=int(a["value_size"]), n_layers_for_scale=int(a["K"]), scale=float(a["scale"]),
                          dtype=np.float64)
    return layer_arrays(p)


def compute_baselines(a):
    """GD-K, least squares, ridge and the eta line search on the same tasks."""
    X, Y, x_q, y_q = a["X"], a["Y"], a["x_q"], a["y_q"]
    n = int(a["n_steps"])
    pred_gd, W_gd = R.gd_predict(X, Y, x_q, float(a["eta"]), n)
    eta_ls, losses = R.line_search_eta(X, Y, x_q, y_q, n_steps=n, grid=a["eta_grid"])
    return {"pred_gd": pred_gd, "W_gd": W_gd, "pred_ls": R.least_squares_predict(X, Y, x_q),
            "pred_ridge": R.least_squares_predict(X, Y, x_q, ridge=float(a["ridge"])),
            "eta_ls": np.asarray(eta_ls), "losses_ls": losses}


def compute_eta(a):
    """Moments of U(low, high), the closed-form optimal one-step eta and the expected loss."""
    d, N, d_y = int(a["d"]), int(a["N"]), int(a["d_y"])
    w_scale, noise = float(a["w_scale"]), float(a["noise_std"])
    m2, m4 = R.uniform_moments(tuple(float(v) for v in a["x_range"]))
    eta_star, L_star = R.optimal_one_step_eta(d, N, m2, m4, w_scale, d_y, noise)
    L_eta = R.expected_one_step_loss(float(a["eta"]), d, N, m2, m4, w_scale, d_y, noise)
    return {"m2": np.asarray(m2), "m4": np.asarray(m4), "eta_star": np.asarray(eta_star),
            "L_star": np.asarray(L_star), "L_eta": np.asarray(L_eta)}


COMPUTE = {"layer": compute_layer, "stack": compute_stack, "loss": compute_loss, "gd": compute_gd,
           "gdpp": compute_gdpp, "adam": compute_adam, "train": compute_train, "tasks": compute_tasks,
           "init": compute_init, "baselines": compute_baselines, "eta": compute_eta}


# --------------------------------------------------------------------------------
# Builders: the seeded inputs of each case (write only)
# --------------------------------------------------------------------------------

def _f(x):
    return np.asarray(x, dtype=np.float64)


def _i(x):
    return np.asarray(x, dtype=np.int64)


def _random_layer(rng, D, H, merged, Kd, Vd, scale):
    if merged:
        return R.MergedParams(scale * rng.standard_normal((H, D, D)), scale * rng.standard_normal((H, D, D)))
    return R.LSAParams(scale * rng.standard_normal((H, Kd, D)), scale * rng.standard_normal((H, Kd, D)),
                       scale * rng.standard_normal((H, Vd, D)), scale * rng.standard_normal((H, D, Vd)))


def _tokens(rng, B, d, d_y, N, query_slot):
    """Tokens from sampled tasks; ``query_slot`` puts -W_0 x_q (random W_0) in the query's y-slot."""
    t = R.sample_tasks(rng, B, d, N, d_y)
    W_0 = rng.standard_normal((d_y, d)) if query_slot else None
    return R.build_tokens(t.X, t.Y, t.x_q, W_0=W_0), t


def _pick_clip(pre_values, margin=1e-3):
    """A clip level that clips some token entries and not others, at a relative
    distance > ``margin`` from every pre-clip value, so rounding in a port cannot flip
    which entries are clipped. ``pre_values(c)`` returns the pre-clip arrays of every
    layer when the stack runs with clip c (None: no clipping)."""
    mags = np.sort(np.abs(np.concatenate([p.ravel() for p in pre_values(None)])))
    lo, hi = int(0.5 * mags.size), int(0.8 * mags.size)
    mids = [(mags[i] + mags[i + 1]) / 2 for i in range(lo, hi)]
    gaps = [mags[i + 1] - mags[i] for i in range(lo, hi)]
    for n in np.argsort(gaps)[::-1]:
        c = float(f"{mids[n]:.4g}")                                   # a short decimal a port can type in
        vals = np.abs(np.concatenate([p.ravel() for p in pre_values(c)]))
        if np.min(np.abs(vals - c)) > margin * c and np.any(vals > c):
            return c
    raise RuntimeError("no clip level with a safe margin found")


def build_layer(rng, H, causal, clip, merged):
    d, d_y, N, B = 3, 1, 4, 2
    D = d + d_y
    E, _ = _tokens(rng, B, d, d_y, N, query_slot=True)                # (B, T, D)
    p = _random_layer(rng, D, H, merged, Kd=3, Vd=5, scale=0.5)
    c = np.inf
    if clip:
        c = _pick_clip(lambda c: [R.lsa_forward(E, p, causal=causal, clip=c)[1].pre])
    dout = rng.standard_normal(E.shape)                                # (B, T, D) random upstream
    return {"E": E, **layer_arrays(p), "causal": np.asarray(causal), "clip": _f(c), "dout": dout}


def _stack_inputs(rng, K, recurrent, H, causal, clip, merged, d, d_y, N, scale, query_slot):
    D = d + d_y
    E, t = _tokens(rng, 2, d, d_y, N, query_slot)                      # (B, T, D)
    n_param = 1 if recurrent else K
    layers = tuple(_random_layer(rng, D, H, merged, Kd=3, Vd=4, scale=scale) for _ in range(n_param))
    c = np.inf
    if clip:
        def pre_values(cl):
            _, cache = R.model_forward(E, layers, R.lsa_stack(K, recurrent=recurrent, causal=causal, clip=cl))
            return [lc.pre for lc in cache.layer_caches]
        c = _pick_clip(pre_values)
    cfg = {"K": _i(K), "recurrent": np.asarray(recurrent), "causal": np.asarray(causal), "clip": _f(c)}
    return E, t, layers, cfg


def build_stack(rng, K, recurrent, H, causal, clip, merged):
    E, _, layers, cfg = _stack_inputs(rng, K, recurrent, H, causal, clip, merged, d=2, d_y=2, N=4,
                                      scale=0.4, query_slot=True)
    return {"E": E, **stack_arrays(layers), **cfg, "dout": rng.standard_normal(E.shape)}


def build_loss(rng, K, recurrent, H, causal, clip, merged, d, d_y, N, scale):
    E, t, layers, cfg = _stack_inputs(rng, K, recurrent, H, causal, clip, merged, d, d_y, N,
                                      scale=scale, query_slot=False)
    return {"E": E, "y_q": t.y_q, "d": _i(d), **stack_arrays(layers), **cfg}


def build_gd(rng, d, d_y, N, eta, K, recurrent, with_W0):
    t = R.sample_tasks(rng, 2, d, N, d_y)
    W_0 = rng.standard_normal((d_y, d)) if with_W0 else np.zeros((d_y, d))
    return {"X": t.X, "Y": t.Y, "x_q": t.x_q, "W_0": W_0, "eta": _f(eta), "K": _i(K), "recurrent": np.asarray(recurrent)}


def build_gdpp(rng, d, d_y, N, etas, gammas):
    t = R.sample_tasks(rng, 2, d, N, d_y)
    return {"X": t.X, "Y": t.Y, "x_q": t.x_q, "W_0": rng.standard_normal((d_y, d)), "etas": _f(etas), "gammas": _f(gammas)}


def _hp_arrays(lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, clip_norm=np.inf):
    return {"lr": _f(lr), "b1": _f(b1), "b2": _f(b2), "eps": _f(eps), "clip_norm": _f(clip_norm)}


def build_adam(rng, n_layers, H, merged, clip):
    D = 3
    params = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.1) for _ in range(n_layers))
    grads = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.1) for _ in range(n_layers))
    m = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.01) for _ in range(n_layers))
    v_root = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.01) for _ in range(n_layers))
    v = tree_map(lambda a: a * a, v_root)                               # second moments are >= 0
    norm = global_norm(grads)
    clip_norm = float(f"{0.5 * norm:.3g}") if clip else np.inf         # clip = active: half the gradient's norm
    return {**stack_arrays(params), **stack_arrays(grads, grad=True), **stack_arrays(m, "m."), **stack_arrays(v, "v."),
            "t": _i(4), **_hp_arrays(clip_norm=clip_norm)}


def build_train(rng, seed, n_steps, d, N, d_y, B, H):
    D = d + d_y
    p = R.init_lsa_params(np.random.default_rng(seed), D, H=H, dtype=np.float64)
    return {"seed": _i(seed), "n_steps": _i(n_steps), "d": _i(d), "N": _i(N), "d_y": _i(d_y), "B": _i(B),
            "x_range": _f([-0.5, 0.5]), "w_scale": _f(1.0), "noise_std": _f(0.0), "n_distractors": _i(0),
            "K": _i(1), "recurrent": np.asarray(False), "causal": np.asarray(False), "clip": _f(np.inf),
            **stack_arrays((p,)), **_hp_arrays(clip_norm=1e-3)}


def build_tasks(rng, seed, step):
    return {"seed": _i(seed), "step": _i(step), "B": _i(2), "d": _i(3), "N": _i(4), "d_y": _i(2),
            "x_range": _f([-1.0, 1.0]), "w_scale": _f(1.5), "noise_std": _f(0.1), "n_distractors": _i(1)}


def build_init(rng, seed):
    return {"seed": _i(seed), "D": _i(4), "H": _i(1), "key_size": _i(3), "value_size": _i(4), "K": _i(2),
            "scale": _f(0.002)}


def build_baselines(rng):
    t = R.sample_tasks(rng, 2, 3, 5, 1)
    return {"X": t.X, "Y": t.Y, "x_q": t.x_q, "y_q": t.y_q, "eta": _f(0.7), "n_steps": _i(3), "ridge": _f(0.1),
            "eta_grid": R.ETA_GRID.copy()}


def build_eta(rng, d, N, d_y, x_range, w_scale, noise_std, eta):
    return {"d": _i(d), "N": _i(N), "d_y": _i(d_y), "x_range": _f(x_range), "w_scale": _f(w_scale),
            "noise_std": _f(noise_std), "eta": _f(eta)}


class CaseSpec(NamedTuple):
    name: str
    kind: str
    build: Callable   # build(rng) -> inputs dict


def _case_table():
    """Every case, in order. The case's index salts its generator: default_rng([SEED, index])."""
    t = []
    for H in (1, 2):
        for causal in (False, True):
            for clip in (False, True):
                for merged in (False, True):
                    name = (f"layer-H{H}-{'causal' if causal else 'ctx'}-{'clip' if clip else 'noclip'}-"
                            f"{'merged' if merged else 'factored'}")
                    t.append(CaseSpec(name, "layer", lambda r, H=H, c=causal, cl=clip, m=merged: build_layer(r, H, c, cl, m)))
    for name, K, rec, H, causal, clip, merged in [
            ("stack-recurrent-K3-H1-ctx-clip-factored", 3, True, 1, False, True, False),
            ("stack-separate-K2-H2-ctx-noclip-factored", 2, False, 2, False, False, False),
            ("stack-separate-K2-H1-causal-clip-merged", 2, False, 1, True, True, True)]:
        t.append(CaseSpec(name, "stack", lambda r, a=(K, rec, H, causal, clip, merged): build_stack(r, *a)))
    for name, args in [
            ("loss-K1-H1-ctx-noclip-factored", (1, False, 1, False, False, False, 3, 1, 5, 0.6)),
            ("loss-recurrent-K3-H1-ctx-clip-factored", (3, True, 1, False, True, False, 2, 2, 4, 0.3)),
            ("loss-separate-K2-H2-causal-noclip-merged", (2, False, 2, True, False, True, 2, 2, 4, 0.4))]:
        t.append(CaseSpec(name, "loss", lambda r, a=args: build_loss(r, *a)))
    t.append(CaseSpec("gd-1step-W0", "gd", lambda r: build_gd(r, 3, 1, 5, 0.9, 1, False, True)))
    t.append(CaseSpec("gd-3steps-recurrent", "gd", lambda r: build_gd(r, 2, 2, 5, 0.6, 3, True, False)))
    t.append(CaseSpec("gd-2steps-separate-W0", "gd", lambda r: build_gd(r, 2, 1, 4, 1.3, 2, False, True)))
    t.append(CaseSpec("gdpp-2layers-W0", "gdpp", lambda r: build_gdpp(r, 2, 1, 5, [0.8, 0.5], [0.1, 0.05])))
    t.append(CaseSpec("adam-clip-2layers-factored", "adam", lambda r: build_adam(r, 2, 1, False, True)))
    t.append(CaseSpec("adam-noclip-H2-merged", "adam", lambda r: build_adam(r, 1, 2, True, False)))
    t.append(CaseSpec("train-5steps-K1-H1", "train", lambda r: build_train(r, seed=7, n_steps=5, d=2, N=4, d_y=1, B=2, H=1)))
    t.append(CaseSpec("tasks-noise-distractors", "tasks", lambda r: build_tasks(r, seed=11, step=3)))
    t.append(CaseSpec("init-H1", "init", lambda r: build_init(r, seed=5)))
    t.append(CaseSpec("baselines", "baselines", build_baselines))
    t.append(CaseSpec("eta-paper-defaults", "eta", lambda r: build_eta(r, 10, 10, 1, [-0.5, 0.5], 1.0, 0.0, 3.0)))
    t.append(CaseSpec("eta-noise-dy2", "eta", lambda r: build_eta(r, 5, 20, 2, [-1.0, 1.0], 1.5, 0.3, 1.0)))
    return t


CASES = _case_table()


def build_cases(seed=SEED):
    """Every :class:`Case`: inputs from its builder, outputs from the reference."""
    cases = []
    for i, spec in enumerate(CASES):
        inputs = spec.build(np.random.default_rng([seed, i]))
        outputs = COMPUTE[spec.kind](inputs)
        cases.append(Case(spec.name, spec.kind, inputs, {k: np.asarray(v) for k, v in outputs.items()}))
    return cases


# --------------------------------------------------------------------------------
# Files: deterministic npz bytes, manifest
# --------------------------------------------------------------------------------

def npz_bytes(arrays):
    """An uncompressed .npz (readable by numpy.load) whose bytes depend only on the
    arrays and their order: fixed zip timestamps and attributes, no pickles."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            b = io.BytesIO()
            np.lib.format.write_array(b, np.array(a, order="C"), allow_pickle=False)   # 0-d stays 0-d
            zf.writestr(info, b.getvalue())
    return buf.getvalue()


def _describe(a):
    return {"shape": list(a.shape), "dtype": np.dtype(a.dtype).name}


def manifest_for(cases, files):
    """The manifest dict: provenance plus, per case, kind, file, sha256, inputs and outputs."""
    tol = tolerance(np.float64, TOL_KIND)
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"module": "verify.golden", "function": "build_cases", "seed": SEED},
        "package_version": R.__version__,
        "numpy_version": np.__version__,
        "dtype": "float64",
        "tolerance": {"kind": TOL_KIND, "rtol": tol.rtol, "atol": tol.atol,
                      "rule": "per array: |actual - expected| <= atol + rtol * max|expected| elementwise"},
        "cases": [{"name": c.name, "kind": c.kind, "file": f"{c.name}.npz",
                   "sha256": hashlib.sha256(files[c.name]).hexdigest(),
                   "inputs": {k: _describe(a) for k, a in c.inputs.items()},
                   "outputs": {k: _describe(a) for k, a in c.outputs.items()}} for c in cases],
    }


def write_vectors(directory=DEFAULT_DIR, seed=SEED):
    """Write every case's npz and the manifest into ``directory``. Files of cases that an
    earlier manifest there listed and this one does not are removed. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cases = build_cases(seed)
    files = {c.name: npz_bytes({**c.inputs, **c.outputs}) for c in cases}
    old = directory / MANIFEST
    if old.exists():
        try:
            stale = {e["file"] for e in json.loads(old.read_text())["cases"]} - {f"{n}.npz" for n in files}
        except (ValueError, KeyError, TypeError):
            stale = set()
        for f in stale:
            (directory / f).unlink(missing_ok=True)
    for name, data in files.items():
        (directory / f"{name}.npz").write_bytes(data)
    man = manifest_for(cases, files)
    (directory / MANIFEST).write_text(manifest_text(man))
    return man


def manifest_text(x, indent=""):
    """JSON with one line per array description (a dict or list of scalars and flat
    lists is written inline), so the manifest reads as a table."""
    inner = indent + "  "
    if isinstance(x, dict) and any(isinstance(v, dict) or (isinstance(v, list) and any(isinstance(i, (dict, list)) for i in v))
                                   for v in x.values()):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {manifest_text(v, inner)}" for k, v in x.items())
        text = "{\n" + body + "\n" + indent + "}"
    elif isinstance(x, list) and any(isinstance(v, dict) for v in x):
        text = "[\n" + ",\n".join(inner + manifest_text(v, inner) for v in x) + "\n" + indent + "]"
    else:
        text = json.dumps(x)
    return text + ("\n" if indent == "" else "")


# --------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------

class CaseResult(NamedTuple):
    name: str
    ok: bool
    rel_err: float      # worst relative error over the case's outputs (inf on a structural failure)
    message: str


def load_case(directory, entry):
    """The arrays of one manifest entry as (inputs dict, outputs dict); raises ValueError
    on a checksum, key, shape or dtype mismatch with the manifest."""
    path = Path(directory) / entry["file"]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"sha256 of {path.name} does not match the manifest; {REGENERATE_HINT}")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    want = {**entry["inputs"], **entry["outputs"]}
    if set(arrays) != set(want):
        raise ValueError(f"{path.name} keys differ from the manifest: {sorted(set(arrays) ^ set(want))}; {REGENERATE_HINT}")
    for k, desc in want.items():
        if _describe(arrays[k]) != desc:
            raise ValueError(f"{path.name}: {k} is {_describe(arrays[k])}, manifest says {desc}; {REGENERATE_HINT}")
    return ({k: arrays[k] for k in entry["inputs"]}, {k: arrays[k] for k in entry["outputs"]})


def compare_outputs(actual, expected, kind=TOL_KIND):
    """Compare output dicts array by array. Returns (ok, worst rel err, worst key, detail)."""
    ok, worst, worst_key, detail = True, 0.0, None, ""
    for k, e in expected.items():
        if k not in actual:
            return False, float("inf"), k, f"{k}: not computed"
        a = np.asarray(actual[k])
        if a.shape != e.shape:
            return False, float("inf"), k, f"{k}: shape {a.shape} vs stored {e.shape}"
        if e.dtype.kind in "biu":
            good = bool(np.array_equal(a, e))
            rel = 0.0 if good else float("inf")
            msg = "" if good else f"{k}: {a!r} vs stored {e!r}"
        else:
            rep = allclose_report(a.astype(np.float64), e, kind, np.float64)
            good, rel, msg = rep.ok, rep.rel_err, f"{k}: {rep}"
        if rel >= worst:
            worst, worst_key = rel, k
        if not good:
            ok = False
            detail = detail or msg
    return ok, worst, worst_key, detail


def check_vectors(directory=DEFAULT_DIR):
    """Recompute every case from its stored inputs and compare. Returns (ok, [CaseResult])."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        return False, [CaseResult("manifest", False, float("inf"), f"{path} not found; {REGENERATE_HINT}")]
    try:
        man = json.loads(path.read_text())
    except ValueError as exc:
        return False, [CaseResult("manifest", False, float("inf"), f"{path} is not valid JSON ({exc}); {REGENERATE_HINT}")]
    if man.get("format_version") != FORMAT_VERSION:
        return False, [CaseResult("manifest", False, float("inf"),
                                  f"format version {man.get('format_version')!r} in {path}, this checker reads "
                                  f"version {FORMAT_VERSION}; {REGENERATE_HINT}")]
    results = []
    known = {c.name: c.kind for c in CASES}
    listed = [e["name"] for e in man["cases"]]
    missing = [n for n in known if n not in listed]
    if missing:
        results.append(CaseResult("manifest", False, float("inf"),
                                  f"cases missing from the manifest: {missing}; {REGENERATE_HINT}"))
    for entry in man["cases"]:
        name = entry["name"]
        if known.get(name) != entry["kind"]:
            results.append(CaseResult(name, False, float("inf"),
                                      f"unknown case or kind {entry['kind']!r} for this checker; {REGENERATE_HINT}"))
            continue
        try:
            inputs, expected = load_case(directory, entry)
            actual = COMPUTE[entry["kind"]](inputs)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            results.append(CaseResult(name, False, float("inf"), str(exc)))
            continue
        ok, rel, key, detail = compare_outputs(actual, expected)
        results.append(CaseResult(name, ok, rel, ("bit-exact" if rel == 0 else f"worst at {key}") if ok else detail))
    return all(r.ok for r in results), results


def _verdict(r):
    tol = tolerance(np.float64, TOL_KIND)
    mark = "PASS" if r.ok else "FAIL"
    return f"{mark}  {r.name:<44} rel err {r.rel_err:9.2e} (rtol {tol.rtol:g})  {r.message}"


# --------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("action", choices=["write", "check"],
                   help="write: compute the cases and write DIR/*.npz and DIR/manifest.json; "
                        "check: recompute every case from its stored inputs and compare")
    p.add_argument("dir", nargs="?", default=str(DEFAULT_DIR), metavar="DIR",
                   help=f"vectors directory (default: the package's {DEFAULT_DIR})")


def run(args):
    if args.action == "write":
        man = write_vectors(args.dir)
        size = sum(os.path.getsize(Path(args.dir) / e["file"]) for e in man["cases"])
        print(f"wrote {len(man['cases'])} cases ({size / 1024:.0f} KiB) and {MANIFEST} to {args.dir}")
        return 0
    ok, results = check_vectors(args.dir)
    for r in results:
        print(_verdict(r), flush=True)
    n_bad = sum(not r.ok for r in results)
    print(f"{len(results) - n_bad} passed, {n_bad} failed ({args.dir})")
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m verify.golden", description="Write or check the golden test vectors.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
