"""Golden test vectors: plain ``.npz`` files and a JSON manifest for ports.

``icgd vectors write [DIR]`` computes every case with the reference and writes
``DIR/<case>.npz`` plus ``DIR/manifest.json``; ``icgd vectors check [DIR]`` reads
them back, recomputes every case from its stored inputs with the reference and
compares the stored outputs, one verdict line per case, exit code 1 on any mismatch.
DIR defaults to this package's ``verify/vectors/`` (the committed vectors). Also
``python -m verify.golden write|check [DIR]``.

What this file is: the generator and the checker; what each kind is (its key format,
its reference computation and the schema of its inputs and outputs) is
``verify/vector_kinds.py``, re-exported here. What it is not: the independent
confirmation of the vectors, which lives in ``verify/claims_vectors.py`` (loop
oracle, complex-step derivatives, hand transcriptions) and runs in the tests.
Every key of every case is documented in SPEC.md (section "Golden vectors").

A case is a kind, a builder of inputs (seeded) and the reference function of that
kind mapping inputs to outputs. The builder runs only in ``write``; ``check``
recomputes outputs from the *stored* inputs, so a port needs only the npz. Each kind
(``KINDS``, written into the manifest) says which inputs are data and which are
configuration, with their dtypes and ranges, and which outputs it computes.

``check`` trusts nothing in the folder: the manifest's list of cases must be the
generator's (a case missing, repeated or unknown fails), a case's file is
``<name>.npz`` in the folder (no other path, no link), inputs must be what the kind
reads (dtypes, shapes, sizes, ranges: a forged file cannot ask for 10**9 tasks), and
the stored outputs must be exactly the ones the kind computes. Every problem is a FAIL
line of its own case; the other cases are still checked and nothing raises.
Format version: it changes only when the meaning of an existing case changes; new
cases are appended to the table (the case index salts its generator, so the earlier
cases keep their bytes) without a change.
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
from reference.files import OutputPathError, check_output_dir, write_bytes_atomic, write_text_atomic
from reference.layers.embed import EmbedParams
from reference.layers.mlp import MLPParams, mlp_forward
from reference.layers.softmax import SoftmaxParams, softmax_forward
from reference.optim import global_norm
from reference.tolerances import allclose_report, tolerance
from reference.tree import tree_map

from .vector_kinds import (  # noqa: F401  the kinds' schema and computations, re-exported
    COMPUTE, DELTA_FORMS, MESA_FORMS, Config, KINDS, LAYER_KEY, LIMITS, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, PLACEHOLDERS,
    _EMBEDDED, _fields, input_problems, key_pattern, kinds_table, layer_arrays, read_layer,
    read_stack, stack_arrays, tree_arrays, tree_keys,
)

FORMAT_VERSION = 1
SEED = 20230712
MANIFEST = "manifest.json"
DEFAULT_DIR = Path(__file__).resolve().parent / "vectors"
TOL_KIND = "algebra"   # the reference against its own vectors: same polynomial, maybe other summation order
FORMAT_RULE = ("format_version changes only when the meaning of an existing case changes (a key, a convention); new "
               "cases, of new or existing kinds, are added without a change. A port runs the cases of the kinds it "
               "knows and reports the others")
REGENERATE_HINT = "regenerate the vectors with `icgd vectors write` (or `python -m verify.golden write`)"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class Case(NamedTuple):
    name: str
    kind: str
    inputs: dict    # key -> ndarray, in writing order
    outputs: dict   # key -> ndarray



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


def build_layer_clip_edge(rng, H, causal):
    """A clipped layer with two pre-clip entries exactly at the clip level, +c and -c,
    where the gradient must pass (an autodiff clip that halves it there fails). Row 0 of
    every P_h is zero, so coordinate 0 of every token leaves the layer as it came
    (E + 0, exactly); two tokens get that coordinate = +c and -c. Every other pre-clip
    value keeps the usual safe distance from c."""
    d, d_y, N, B = 3, 1, 4, 2
    D = d + d_y
    E, _ = _tokens(rng, B, d, d_y, N, query_slot=True)                # (B, T, D)
    p = _random_layer(rng, D, H, False, Kd=3, Vd=5, scale=0.5)
    P = p.P.copy()
    P[:, 0, :] = 0.0                                                   # coordinate 0 of delta is 0
    p = p._replace(P=P)
    edges = [((0, 1, 0), 1.0), ((1, N, 0), -1.0)]                      # (entry of E, sign of the level there)
    flat = [int(np.ravel_multi_index(idx, E.shape)) for idx, _ in edges]

    def at_level(c):
        Ec = E.copy()
        for idx, sign in edges:
            Ec[idx] = sign * c
        return Ec

    def pre_values(c):                                                 # every pre-clip value but the two edges
        pre = R.lsa_forward(E if c is None else at_level(c), p, causal=causal, clip=c)[1].pre
        return [np.delete(pre.ravel(), flat)]

    c = _pick_clip(pre_values)
    E = at_level(c)
    pre = R.lsa_forward(E, p, causal=causal, clip=c)[1].pre
    if any(pre[idx] != sign * c for idx, sign in edges):
        raise RuntimeError("the edge entries moved off the clip level")
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


def build_train(rng, seed, n_steps, d, N, d_y, B, H, K=1, clip_norm=1e-3):
    """A separate K-layer stack from the initialiser (paper settings); ``clip_norm`` 1e-3
    never acts at this size (gradient norms ~1e-6), a smaller one may."""
    D = d + d_y
    init_rng = np.random.default_rng(seed)
    layers = tuple(R.init_lsa_params(init_rng, D, H=H, n_layers_for_scale=K, dtype=np.float64) for _ in range(K))
    return {"seed": _i(seed), "n_steps": _i(n_steps), "d": _i(d), "N": _i(N), "d_y": _i(d_y), "B": _i(B),
            "x_range": _f([-0.5, 0.5]), "w_scale": _f(1.0), "noise_std": _f(0.0), "n_distractors": _i(0),
            "K": _i(K), "recurrent": np.asarray(False), "causal": np.asarray(False), "clip": _f(np.inf),
            **stack_arrays(layers), **_hp_arrays(clip_norm=clip_norm)}


def build_tasks(rng, seed, step):
    return {"seed": _i(seed), "step": _i(step), "B": _i(2), "d": _i(3), "N": _i(4), "d_y": _i(2),
            "x_range": _f([-1.0, 1.0]), "w_scale": _f(1.5), "noise_std": _f(0.1), "n_distractors": _i(1)}


def build_init(rng, seed, H=1, key_size=3, value_size=4, merged=False):
    """D = 4, K = 2, scale 0.002. Merged cases store ``merged`` and no key or value size."""
    sizes = {} if merged else {"key_size": _i(key_size), "value_size": _i(value_size)}
    return {"seed": _i(seed), "D": _i(4), "H": _i(H), **sizes, "K": _i(2), "scale": _f(0.002),
            **({"merged": np.asarray(True)} if merged else {})}


def build_baselines(rng, eta=0.7):
    """Sampled tasks, GD-3 (``eta`` one value or one per step), the paper's eta grid."""
    t = R.sample_tasks(rng, 2, 3, 5, 1)
    return {"X": t.X, "Y": t.Y, "x_q": t.x_q, "y_q": t.y_q, "eta": _f(eta), "n_steps": _i(3), "ridge": _f(0.1),
            "eta_grid": R.ETA_GRID.copy()}


def build_line_search_tie(rng):
    """Tasks on which the line search meets an exact tie at its minimum. The context is
    e_1, e_2, -e_1, -e_2, so (1/N) X^T X = I/2 and GD-K from 0 leaves the error
    -(1 - eta/2)^K W x_q; with short dyadic teachers and queries every step is exact in
    float64. The grid's 1.5 and 2.5 give the same smallest loss; the first, 1.5, wins."""
    X = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]] * 2)   # (B, N, d)
    W = np.array([[[1.0, -0.5]], [[0.5, 0.25]]])                             # (B, d_y, d)
    x_q = np.array([[1.0, 0.5], [-1.0, 0.5]])                                # (B, d)
    Y, y_q = np.einsum("bij,bnj->bni", W, X), np.einsum("bij,bj->bi", W, x_q)
    return {"X": X, "Y": Y, "x_q": x_q, "y_q": y_q, "eta": _f(0.75), "n_steps": _i(2), "ridge": _f(0.5),
            "eta_grid": _f([0.5, 1.5, 2.5, 3.0])}


def build_eta(rng, d, N, d_y, x_range, w_scale, noise_std, eta):
    return {"d": _i(d), "N": _i(N), "d_y": _i(d_y), "x_range": _f(x_range), "w_scale": _f(w_scale),
            "noise_std": _f(noise_std), "eta": _f(eta)}


# ---- builders of the layer types after LSA (added in format version 1) -----------------

def _softmax_params(rng, D, H, Kd, Vd, scale):
    return SoftmaxParams(*_random_layer(rng, D, H, False, Kd=Kd, Vd=Vd, scale=scale))


def _mlp_params(rng, D, w, bias=True):
    W_1, b_1 = 1.5 * rng.standard_normal((w, D)), 0.3 * rng.standard_normal(w)
    W_2, b_2 = 0.5 * rng.standard_normal((D, w)), 0.1 * rng.standard_normal(D)
    if not bias:
        b_1, b_2 = np.zeros(w), np.zeros(D)
    return MLPParams(W_1, b_1, W_2, b_2)


def _ln_params(rng, D):
    return 1.0 + 0.3 * rng.standard_normal(D), 0.1 * rng.standard_normal(D)


def build_softmax_layer(rng, H, causal, clip, max_logit=None):
    """D = 4, Kd = 3, Vd = 5. ``max_logit``: W_Q rescaled so the largest |logit| is that
    (900: exp of it overflows float64, so only a max-subtracted softmax computes it)."""
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)                   # (B, T, D)
    p = _softmax_params(rng, 4, H, 3, 5, scale=1.0)
    if max_logit is not None:
        _, cache = softmax_forward(E, p, causal=causal)
        Z = np.matmul(cache.q, np.swapaxes(cache.k, -1, -2)) / np.sqrt(3)
        p = p._replace(W_Q=p.W_Q * (max_logit / np.abs(Z).max()))
    c = np.inf
    if clip:
        c = _pick_clip(lambda c: [softmax_forward(E, p, causal=causal, clip=c)[1].pre])
    return {"E": E, **layer_arrays(p), "causal": np.asarray(causal), "clip": _f(c), "dout": rng.standard_normal(E.shape)}


def build_mlp_layer(rng, gelu_erf, clip, bias=True):
    """D = 4, width 6; pre-activations of order one (GELU's curved part)."""
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)
    p = _mlp_params(rng, 4, 6, bias)
    gelu = "erf" if gelu_erf else "tanh"
    c = np.inf
    if clip:
        c = _pick_clip(lambda c: [mlp_forward(E, p, gelu_form=gelu, clip=c)[1].pre])
    return {"E": E, **layer_arrays(p), "gelu_erf": np.asarray(gelu_erf), "clip": _f(c),
            "dout": rng.standard_normal(E.shape)}


def build_layernorm(rng, spread):
    """Tokens 0.2 + spread * N(0, 1): spread 3e-3 puts the variance near eps = 1e-5."""
    E = 0.2 + spread * rng.standard_normal((2, 5, 4))
    scale, offset = _ln_params(rng, 4)
    return {"E": E, "ln_scale": scale, "ln_offset": offset, "eps": _f(1e-5), "dout": rng.standard_normal(E.shape)}


def build_pre_ln_attention(rng, softmax, causal, clip):
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)
    scale, offset = _ln_params(rng, 4)
    attn = _random_layer(rng, 4, 2 if softmax else 1, False, Kd=3, Vd=4, scale=0.6)
    a = {"E": E, "ln_scale": scale, "ln_offset": offset, **layer_arrays(attn), "softmax": np.asarray(softmax),
         "causal": np.asarray(causal), "eps": _f(1e-5), "clip": _f(np.inf)}
    if clip:
        options = (("block", "softmax" if softmax else "lsa"), ("block_options", (("causal", causal),)))
        params = _fields(a, R.LayerSpec("pre_ln", options).param_type())
        a["clip"] = _f(_pick_clip(lambda c: [R.LayerSpec("pre_ln", (*options, ("clip", c))).forward(E, params)[1].pre]))
    return {**a, "dout": rng.standard_normal(E.shape)}


def build_pre_ln_mlp(rng, gelu_erf):
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)
    scale, offset = _ln_params(rng, 4)
    return {"E": E, "ln_scale": scale, "ln_offset": offset, **layer_arrays(_mlp_params(rng, 4, 6)),
            "gelu_erf": np.asarray(gelu_erf), "eps": _f(1e-5), "clip": _f(np.inf), "dout": rng.standard_normal(E.shape)}


def build_posenc(rng, concat, width):
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)                   # (B, T = 5, D = 4)
    out_width = E.shape[2] + (width if concat else 0)
    return {"E": E, "concat": np.asarray(concat), "width": _i(width),
            "dout": rng.standard_normal(E.shape[:2] + (out_width,))}


def build_embedded_loss(rng, gelu_erf):
    """Tokens (x, y) of width 2 (d = d_y = 1, N = 4), embedded to width 4, MLP width 6."""
    E, t = _tokens(rng, 2, 1, 1, 4, query_slot=False)
    layers = (EmbedParams(1.0 * rng.standard_normal((4, 2)), 0.2 * rng.standard_normal(4)), _mlp_params(rng, 4, 6),
              _random_layer(rng, 4, 1, False, Kd=4, Vd=4, scale=0.5))
    return {"E": E, "y_q": t.y_q, **stack_arrays(layers), "gelu_erf": np.asarray(gelu_erf)}


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
    # Added later, in format version 1: appended, so the indices salting the cases above stay as they were.
    t.append(CaseSpec("layer-H2-causal-clipedge-factored", "layer", lambda r: build_layer_clip_edge(r, 2, True)))
    t.append(CaseSpec("init-H2-Vd3-redraw", "init", lambda r: build_init(r, seed=29, H=2, key_size=3, value_size=3)))
    t.append(CaseSpec("init-H2-merged-redraw", "init", lambda r: build_init(r, seed=20, H=2, merged=True)))
    t.append(CaseSpec("train-4steps-K2-H2-clipnorm", "train",
                      lambda r: build_train(r, seed=3, n_steps=4, d=2, N=3, d_y=1, B=2, H=2, K=2, clip_norm=3.3e-6)))
    t.append(CaseSpec("baselines-eta-per-step", "baselines", lambda r: build_baselines(r, eta=[1.1, 0.3, 0.7])))
    t.append(CaseSpec("baselines-line-search-tie", "baselines", build_line_search_tie))
    # Added with the layer types after LSA (format version 1, appended as well):
    t.append(CaseSpec("softmax-H1-ctx-noclip", "softmax_layer", lambda r: build_softmax_layer(r, 1, False, False)))
    t.append(CaseSpec("softmax-H2-causal-clip", "softmax_layer", lambda r: build_softmax_layer(r, 2, True, True)))
    t.append(CaseSpec("softmax-H2-ctx-large-logits", "softmax_layer",
                      lambda r: build_softmax_layer(r, 2, False, False, max_logit=900.0)))
    t.append(CaseSpec("mlp-tanh-noclip", "mlp_layer", lambda r: build_mlp_layer(r, False, False)))
    t.append(CaseSpec("mlp-erf-clip", "mlp_layer", lambda r: build_mlp_layer(r, True, True)))
    t.append(CaseSpec("mlp-tanh-nobias", "mlp_layer", lambda r: build_mlp_layer(r, False, False, bias=False)))
    t.append(CaseSpec("layernorm", "layernorm", lambda r: build_layernorm(r, 1.0)))
    t.append(CaseSpec("layernorm-variance-near-eps", "layernorm", lambda r: build_layernorm(r, 3e-3)))
    t.append(CaseSpec("pre_ln-lsa-ctx-noclip", "pre_ln_attention",
                      lambda r: build_pre_ln_attention(r, False, False, False)))
    t.append(CaseSpec("pre_ln-softmax-H2-causal-clip", "pre_ln_attention",
                      lambda r: build_pre_ln_attention(r, True, True, True)))
    t.append(CaseSpec("pre_ln-mlp-tanh", "pre_ln_mlp", lambda r: build_pre_ln_mlp(r, False)))
    t.append(CaseSpec("posenc-add", "posenc", lambda r: build_posenc(r, False, 4)))
    t.append(CaseSpec("posenc-concat-width3", "posenc", lambda r: build_posenc(r, True, 3)))
    t.append(CaseSpec("embedded-loss-tanh", "embedded_loss", lambda r: build_embedded_loss(r, False)))
    # Added with the sequence tasks of the mesa paper (SPEC.md section 15):
    t.append(CaseSpec("causal-gd-Phi0", "causal_gd", build_causal_gd))
    # Added with the sine-task models (issue #14): the erf GELU inside a pre-LN MLP block.
    t.append(CaseSpec("pre_ln-mlp-erf", "pre_ln_mlp", lambda r: build_pre_ln_mlp(r, True)))
    # Added with the mesa layer and the delta rule (issue #16, SPEC.md section 16):
    t.append(CaseSpec("mesa-H2-sm", "mesa_layer", lambda r: build_mesa_layer(r, 2, "sm", None)))
    t.append(CaseSpec("mesa-H2-sm-forget", "mesa_layer", lambda r: build_mesa_layer(r, 2, "sm", 0.8)))
    t.append(CaseSpec("mesa-H2-direct-forget", "mesa_layer", lambda r: build_mesa_layer(r, 2, "direct", 0.9)))
    t.append(CaseSpec("mesa-H1-cg", "mesa_layer", lambda r: build_mesa_layer(r, 1, "cg", None)))
    t.append(CaseSpec("delta-H2-recurrent-gate", "delta_layer",
                      lambda r: build_delta_layer(r, 2, "recurrent", None, gate=True)))
    t.append(CaseSpec("delta-H2-chunked2-gate", "delta_layer", lambda r: build_delta_layer(r, 2, "chunked", 2, gate=True)))
    t.append(CaseSpec("delta-H1-chunked3-beta0.6", "delta_layer",
                      lambda r: build_delta_layer(r, 1, "chunked", 3, gate=False, beta=0.6)))
    # Added with classic tokens and the Prop. 3 copy construction (issue #15, SPEC.md section 5b):
    t.append(CaseSpec("classic-loss-P4", "classic_loss", build_classic_loss))
    t.append(CaseSpec("copy-construction-N1-P4", "copy_construction", build_copy_construction))
    # Added with the Prop. 2 causal constructions and the LDS sampler (issue #16, SPEC.md section 15):
    # (d = 1, K = 2: tokens of width (3 + K) d = 5, the D <= 5 of section 12)
    t.append(CaseSpec("causal-prop2-neumann-K2", "causal_prop2", lambda r: build_causal_prop2(r, 0, 2, 1)))
    t.append(CaseSpec("causal-prop2-richardson-K2", "causal_prop2", lambda r: build_causal_prop2(r, 1, 2, 1)))
    t.append(CaseSpec("causal-prop2-chebyshev-K2", "causal_prop2", lambda r: build_causal_prop2(r, 2, 2, 1)))
    for k, v in enumerate(("linear", "contracting", "partial", "nonlinear", "fixed")):
        t.append(CaseSpec(f"lds-sampler-{v}", "lds_sampler", lambda r, k=k, v=v: build_lds_sampler(k, v)))
    return t


def build_classic_loss(rng):
    """B = 2 tasks, d = 3, d_y = 1, N = 2 (T = 5 classic tokens), encodings of width 4 (D = 7),
    random softmax and LSA layers. Drawn from its own generator default_rng([SEED, 15, 1]),
    not the index-salted ``rng``, so its bytes do not depend on where it sits in the table
    (added while other kinds were being appended)."""
    rng = np.random.default_rng([SEED, 15, 1])
    d, N = 3, 2
    W = rng.standard_normal((2, 1, d))
    X, x_q = rng.uniform(-1.0, 1.0, (2, N, d)), rng.uniform(-1.0, 1.0, (2, d))
    a = {"X": X, "Y": np.einsum("bij,bnj->bni", W, X), "x_q": x_q, "y_q": np.einsum("bij,bj->bi", W, x_q),
         "width": _i(4)}
    for k in (1, 2):
        for name, shape in (("W_Q", (1, 7, 7)), ("W_K", (1, 7, 7)), ("W_V", (1, 7, 7)), ("P", (1, 7, 7))):
            a[f"layer{k}.{name}"] = 0.5 * rng.standard_normal(shape)
    return a


def build_copy_construction(rng):
    """B = 2 tasks, d = 3, d_y = 1, N = 1, P = 4 (R1 and R2 hold, condition numbers < 10), eta 0.7;
    its own generator default_rng([SEED, 15, 2]) (as build_classic_loss)."""
    rng = np.random.default_rng([SEED, 15, 2])
    W = rng.standard_normal((2, 1, 3))
    X, x_q = rng.uniform(-1.0, 1.0, (2, 1, 3)), rng.uniform(-1.0, 1.0, (2, 3))
    return {"X": X, "Y": np.einsum("bij,bnj->bni", W, X), "x_q": x_q, "eta": _f(0.7), "width": _i(4)}


def build_causal_prop2(rng, iteration, K, d):
    """B = 2 sequences of T = 5 inputs x ~ U(-1, 1)^d, K preconditioning layers, ridge 0.05 (larger than the code's 1e-3 so
    that A_0 is well conditioned); Neumann: omega = 0.8 / lam_max(A_T); Richardson:
    omega_k = (1 + 0.6 cos((2k+1) pi / (2K + 2))) / lam_max(A_T); Chebyshev: the code's 2-step
    coefficients CHEBYSHEV_2 with nu = ||A_T||_F of sequence 0. Drawn from its own generator
    default_rng([SEED, 16, iteration]), not the index-salted ``rng``."""
    from reference import causal_constructions as CC

    rng = np.random.default_rng([SEED, 16, iteration])
    X = rng.uniform(-1.0, 1.0, (2, 5, d))
    r = 0.05
    A, _ = CC.ridge_system(X, r)
    lam_max = float(np.max(np.linalg.eigvalsh(A[:, -1])))
    a = {"X": X, "ridge": _f(r), "iteration": _i(iteration), "K": _i(K)}
    if iteration == 0:
        a["omega"] = _f(round(0.8 / lam_max, 6))
    elif iteration == 1:
        a["omegas"] = _f([round((1 + 0.6 * np.cos((2 * k + 1) * np.pi / (2 * K + 2))) / lam_max, 6)
                          for k in range(K + 1)])
    else:
        alphas, betas = CC.CHEBYSHEV_2
        a.update(alphas=_f(alphas), betas=_f(betas), nu=_f(round(float(np.linalg.norm(A[0, -1])), 6)))
    return a


def build_lds_sampler(k, variant):
    """B = 2, T = 5, d = 3 (partial: d_obs = 2), seed 5, step k; the variant's paper settings
    otherwise (noise 0.01; partial: obs noise 0.01; contracting: clip 2; nonlinear: h_1 in
    +-0.25, no clip; fixed: teacher_seed 3; nonlinear: mlp_seed 4). No draw from the salted rng."""
    a = {"seed": _i(5), "step": _i(k), "variant": _i(("linear", "partial", "nonlinear", "contracting",
                                                        "fixed").index(variant)),
         "B": _i(2), "T": _i(5), "d": _i(3), "d_obs": _i(2 if variant == "partial" else 3),
         "init_range": _f(0.25 if variant == "nonlinear" else 1.0), "noise_std": _f(0.01),
         "obs_noise_std": _f(0.01 if variant == "partial" else 0.0)}
    if variant != "nonlinear":
        a["clip"] = _f(2.0 if variant == "contracting" else 10.0)
    if variant == "nonlinear":
        a["mlp_seed"] = _i(4)
    if variant == "fixed":
        a["teacher_seed"] = _i(3)
    return a


def build_causal_gd(rng):
    """B = 2 sequences of T = 5 inputs in d = 1 (x ~ U(-1, 1); tokens of width 3 and 4), a random Phi_0 and eta."""
    X = rng.uniform(-1.0, 1.0, (2, 6, 1))
    return {"X": X[:, :5], "Y": X[:, 1:], "Phi_0": 0.5 * rng.standard_normal((1, 1)), "eta": _f(0.37)}


def build_mesa_layer(rng, H, form, forget):
    """D = 4, T = 5, Kd = Vd = 3, lam per head in (0.5, 2) (not the init 1); forget None: 1."""
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)                   # (B, T, D)
    attn = _random_layer(rng, 4, H, False, Kd=3, Vd=3, scale=0.6)
    lam = 0.5 + 1.5 * rng.uniform(size=H)                              # (H,)
    return {"E": E, **layer_arrays(attn), "lam": lam, "forget": _f(1.0 if forget is None else forget),
            "form": _i(MESA_FORMS.index(form)), "dout": rng.standard_normal(E.shape)}


def build_delta_layer(rng, H, form, chunk, gate, beta=None):
    """D = 4, T = 5, Kd = Vd = 3; beta None: learned (w_beta, b_beta); gate: w_alpha, b_alpha
    (alpha near sigmoid(1)); ``chunk`` stored only for the chunked form (T = 5 leaves a short
    last chunk)."""
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)                   # (B, T, D)
    a = {"E": E, **layer_arrays(_random_layer(rng, 4, H, False, Kd=3, Vd=3, scale=0.6))}
    if beta is None:
        a.update(w_beta=0.5 * rng.standard_normal((H, 4)), b_beta=0.3 * rng.standard_normal(H))
    if gate:
        a.update(w_alpha=0.5 * rng.standard_normal((H, 4)), b_alpha=1.0 + 0.3 * rng.standard_normal(H))
    if beta is not None:
        a["beta"] = _f(beta)
    a.update(gate=np.asarray(gate), form=_i(DELTA_FORMS.index(form)))
    if chunk is not None:
        a["chunk"] = _i(chunk)
    return {**a, "dout": rng.standard_normal(E.shape)}


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


def manifest_for(cases, files, seed=SEED):
    """The manifest dict: provenance (with the seed the cases were built from) plus, per
    case, kind, file, sha256, inputs and outputs."""
    tol = tolerance(np.float64, TOL_KIND)
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"module": "verify.golden", "function": "build_cases", "seed": seed},
        "package_version": R.__version__,
        "numpy_version": np.__version__,
        "dtype": "float64",
        "tolerance": {"kind": TOL_KIND, "rtol": tol.rtol, "atol": tol.atol,
                      "rule": "per array: |actual - expected| <= atol + rtol * max|expected| elementwise"},
        "format_rule": FORMAT_RULE,
        "limits": LIMITS,
        "placeholders": PLACEHOLDERS,
        "kinds": kinds_table(),
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
            listed = {e["file"] for e in json.loads(old.read_text())["cases"]}
        except (ValueError, KeyError, TypeError):
            listed = set()
        stale = {f for f in listed if isinstance(f, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.npz", f)}
    else:
        stale = set()
    # every file atomically, the manifest last, stale files only once the new manifest is in place
    for name, data in files.items():
        write_bytes_atomic(str(directory / f"{name}.npz"), data)
    man = manifest_for(cases, files, seed)
    write_text_atomic(str(directory / MANIFEST), manifest_text(man))
    for f in stale - {f"{n}.npz" for n in files}:                   # plain names in this folder only
        (directory / f).unlink(missing_ok=True)
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


class CaseError(ValueError):
    """A case's files or manifest entry are not what the format says (the message says how)."""


_NPZ_DTYPES = (np.dtype("<f8"), np.dtype("<i8"), np.dtype("|b1"))
_SHA256 = re.compile("[0-9a-f]{64}")


def _what(x):
    """A short description of a JSON value for a message (ASCII: any terminal prints it)."""
    text = ascii(x)
    return f"{type(x).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _field(entry, key):
    """How an entry's field reads in a message: "no 'kind'" or "'kind' NoneType None"."""
    return f"no {key!r}" if key not in entry else f"{key!r} {_what(entry[key])}"


def read_npz(data):
    """The arrays of an npz held in ``data`` (bytes), in file order. Refuses (CaseError)
    what a vector file is not: members other than ``<key>.npy``, a key twice, pickles,
    dtypes other than float64 / int64 / bool (little-endian, C order), arrays whose
    header does not match their bytes, more than MAX_FILE_BYTES unpacked."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise CaseError(f"not an npz (zip) file: {exc}") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CaseError(f"a key is stored twice: {sorted({n for n in names if names.count(n) > 1})}")
        if sum(i.file_size for i in infos) > MAX_FILE_BYTES:
            raise CaseError(f"arrays unpack to more than {MAX_FILE_BYTES} bytes")
        arrays = {}
        for info in infos:
            key = info.filename[:-4]
            if not info.filename.endswith(".npy") or not key or "/" in key:
                raise CaseError(f"member {info.filename!r} is not an array <key>.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise CaseError(f"{key}: .npy format version {version} (1.0 or 2.0 expected)")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                if dtype not in _NPZ_DTYPES or fortran:
                    raise CaseError(f"{key}: dtype {dtype}{' in Fortran order' if fortran else ''}; vector arrays are "
                                    "C-ordered float64, int64 or bool")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if f.tell() + nbytes != info.file_size:
                    raise CaseError(f"{key}: header says shape {shape} ({nbytes} bytes), the member holds "
                                    f"{info.file_size - f.tell()}")
                arrays[key] = np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape).copy()
    return arrays


def _descriptions(entry, part):
    """The entry's ``inputs`` or ``outputs``: {key: {"shape": [...], "dtype": str}}."""
    d = entry.get(part)
    if not isinstance(d, dict):
        raise CaseError(f"manifest entry has {_field(entry, part)}, not an object of array descriptions")
    for k, desc in d.items():
        if not (isinstance(desc, dict) and set(desc) == {"shape", "dtype"} and isinstance(desc["shape"], list)
                and all(type(n) is int and n >= 0 for n in desc["shape"]) and isinstance(desc["dtype"], str)):
            raise CaseError(f"manifest entry's {part}[{k!r}] is {_what(desc)}, not {{'shape': [...], 'dtype': ...}}")
    return d


def case_path(directory, entry):
    """The path of a case's npz: ``<name>.npz`` inside ``directory`` and nowhere else
    (no other name, no link out of the folder). Raises CaseError."""
    name, file = entry["name"], entry.get("file")
    if file != f"{name}.npz":
        raise CaseError(f"manifest entry has {_field(entry, 'file')}; a case's file is {name}.npz, in the vectors folder")
    path = Path(directory) / file
    if path.is_symlink() or path.resolve().parent != Path(directory).resolve():
        raise CaseError(f"{file} links out of the vectors folder; {REGENERATE_HINT}")
    if not path.is_file():
        raise CaseError(f"{file} is not a file in the vectors folder; {REGENERATE_HINT}")
    return path


def load_case(directory, entry):
    """The arrays of one manifest entry as (inputs dict, outputs dict). Raises CaseError
    (a ValueError) on a bad path, size, checksum, npz, or on keys, shapes or dtypes that
    differ from the manifest."""
    path = case_path(directory, entry)
    inputs, outputs = _descriptions(entry, "inputs"), _descriptions(entry, "outputs")
    if set(inputs) & set(outputs):
        raise CaseError(f"keys listed as both inputs and outputs: {sorted(set(inputs) & set(outputs))}")
    sha = entry.get("sha256")
    if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise CaseError(f"manifest entry has {_field(entry, 'sha256')}, not 64 lowercase hex digits; {REGENERATE_HINT}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CaseError(f"{path.name} has {size} bytes, more than a vector file may ({MAX_FILE_BYTES})")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise CaseError(f"sha256 of {path.name} does not match the manifest; {REGENERATE_HINT}")
    arrays = read_npz(data)
    want = {**inputs, **outputs}
    if set(arrays) != set(want):
        raise CaseError(f"{path.name} keys differ from the manifest: {sorted(set(arrays) ^ set(want))}; {REGENERATE_HINT}")
    for k, desc in want.items():
        if _describe(arrays[k]) != desc:
            raise CaseError(f"{path.name}: {k} is {_describe(arrays[k])}, manifest says {desc}; {REGENERATE_HINT}")
    return ({k: arrays[k] for k in inputs}, {k: arrays[k] for k in outputs})


def _listing(keys, n=6):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def compare_outputs(actual, expected, kind=TOL_KIND):
    """Compare output dicts array by array, in full: the same keys, dtypes and shapes,
    then the values. Returns (ok, worst rel err, worst key, detail)."""
    missing, extra = [k for k in actual if k not in expected], [k for k in expected if k not in actual]
    if missing or extra:
        detail = "; ".join(t for t in (missing and f"outputs the file lacks: {_listing(missing)}",
                                       extra and f"stored outputs the kind does not compute: {_listing(extra)}") if t)
        return False, float("inf"), (missing or extra)[0], detail
    ok, worst, worst_key, detail = True, 0.0, None, ""
    for k, e in expected.items():
        a = np.asarray(actual[k])
        if a.shape != e.shape or a.dtype != e.dtype:
            return False, float("inf"), k, f"{k}: computed {a.dtype.name} {a.shape}, stored {e.dtype.name} {e.shape}"
        if e.dtype.kind in "biu":
            good = bool(np.array_equal(a, e))
            rel = 0.0 if good else float("inf")
            msg = "" if good else f"{k}: {a!r} vs stored {e!r}"
        else:
            rep = allclose_report(a, e, kind, np.float64)
            good, rel, msg = rep.ok, rep.rel_err, f"{k}: {rep}"
        if rel >= worst:
            worst, worst_key = rel, k
        if not good:
            ok = False
            detail = detail or msg
    return ok, worst, worst_key, detail


def check_case(directory, entry):
    """One manifest entry (a dict with a known ``name`` and its ``kind``): load, check the
    inputs against the kind, recompute, compare. Every problem becomes a FAIL result;
    nothing raises."""
    name, kind = entry["name"], entry["kind"]
    try:
        inputs, expected = load_case(directory, entry)
        problems = input_problems(kind, inputs)
        if problems:
            return CaseResult(name, False, float("inf"), f"inputs refused for kind {kind}: {'; '.join(problems)}")
        actual = COMPUTE[kind](inputs)
    except CaseError as exc:
        return CaseResult(name, False, float("inf"), str(exc))
    except Exception as exc:  # noqa: BLE001 -- the reference refusing an input, or worse: a FAIL line, not a traceback
        return CaseResult(name, False, float("inf"), f"recomputing failed: {type(exc).__name__}: {exc}")
    ok, rel, key, detail = compare_outputs(actual, expected)
    return CaseResult(name, ok, rel, ("bit-exact" if rel == 0 else f"worst at {key}") if ok else detail)


def read_manifest(directory):
    """(manifest dict, None) or (None, why it cannot be read) for ``directory``."""
    path = Path(directory) / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"{path} has more than {MAX_MANIFEST_BYTES} bytes; {REGENERATE_HINT}"
        man = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path} not found; {REGENERATE_HINT}"
    except (OSError, ValueError) as exc:          # unreadable, not UTF-8, not JSON
        return None, f"{path} cannot be read as JSON ({exc}); {REGENERATE_HINT}"
    if not isinstance(man, dict):
        return None, f"{path} holds {_what(man)}, not a JSON object; {REGENERATE_HINT}"
    version = man.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        return None, (f"format version {version!r} in {path}, this checker reads version {FORMAT_VERSION}; "
                      f"{REGENERATE_HINT}")
    return man, None


def _entry_name(i, entry):
    """(the name to report entry ``i`` under, the problem with its name or None). An entry
    without a usable name is reported as ``cases[i]``."""
    if not isinstance(entry, dict):
        return f"cases[{i}]", f"manifest entry is {_what(entry)}, not an object"
    name = entry.get("name")
    if not isinstance(name, str):
        return f"cases[{i}]", f"manifest entry has {_field(entry, 'name')}, not a string"
    if not (name.isascii() and name.isprintable() and 0 < len(name) <= 80):
        return f"cases[{i}]", f"manifest entry has the unprintable or overlong name {_what(name)}"
    return name, None


def check_vectors(directory=DEFAULT_DIR):
    """Recompute every case from its stored inputs and compare. Returns (ok, [CaseResult]):
    one result per manifest entry and one per case of the generator that the manifest
    lacks; a manifest that cannot be read (or of another format version) is one result.
    The list of cases must be the generator's: a case missing, listed twice or unknown
    fails."""
    directory = Path(directory)
    man, problem = read_manifest(directory)
    if man is None:
        return False, [CaseResult("manifest", False, float("inf"), problem)]
    results = []
    entries = man.get("cases")
    if not isinstance(entries, list):
        results.append(CaseResult("manifest", False, float("inf"),
                                  f"'cases' is {_what(entries)}, not a list of case entries; {REGENERATE_HINT}"))
        entries = []
    known = {c.name: c.kind for c in CASES}
    first = {}                                                         # name -> index of its first entry
    for i, entry in enumerate(entries):
        name, problem = _entry_name(i, entry)
        if problem is None and name in first:
            problem = f"listed twice in the manifest (cases[{first[name]}] and cases[{i}])"
        elif problem is None and name not in known:
            problem = f"not a case of this generator (verify.golden); {REGENERATE_HINT}"
        elif problem is None and entry.get("kind") != known[name]:
            problem = f"manifest entry has {_field(entry, 'kind')}; this case's kind is {known[name]!r}"
        results.append(check_case(directory, entry) if problem is None else CaseResult(name, False, float("inf"), problem))
        if name in known:
            first.setdefault(name, i)
    results += [CaseResult(n, False, float("inf"), f"missing from the manifest; {REGENERATE_HINT}")
                for n in known if n not in first]
    return all(r.ok for r in results), results


def _verdict(r):
    tol = tolerance(np.float64, TOL_KIND)
    mark = "PASS" if r.ok else "FAIL"
    line = f"{mark}  {r.name:<44} rel err {r.rel_err:9.2e} (rtol {tol.rtol:g})  {r.message}"
    return line.encode("ascii", "backslashreplace").decode("ascii")     # keys and values quoted from a file


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
        try:
            check_output_dir(str(args.dir), "DIR")
        except OutputPathError as exc:
            print(f"icgd vectors write: {exc}", file=sys.stderr)
            return 2
        man = write_vectors(args.dir)
        size = sum(os.path.getsize(Path(args.dir) / e["file"]) for e in man["cases"])
        print(f"wrote {len(man['cases'])} cases ({size / 1024:.0f} KiB) and {MANIFEST} to {args.dir}")
        return 0
    ok, results = check_vectors(args.dir)
    for r in results:
        print(_verdict(r), flush=True)
    n_bad = sum(not r.ok for r in results)
    if ok:
        print(f"{len(results)} passed, 0 failed ({args.dir})")
    else:
        print(f"FAILED: {n_bad} of {len(results)} checks failed, {len(results) - n_bad} agree ({args.dir})")
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m verify.golden", description="Write or check the golden test vectors.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
