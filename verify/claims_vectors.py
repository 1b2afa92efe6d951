"""Claims about the golden test vectors (issue #5): the reference reproduces the
committed vectors, and a second, independent computation confirms them.

The independent recomputation lives here (the tests call it case by case). It uses
none of the vectorised reference code whose results the vectors record:

* forwards: the loop-level oracle (reference/oracle.py);
* gradients: complex-step derivatives, entry by entry, of the *oracle* forward and
  loss (reference/gradcheck.numerical_gradient), against the stored upstream ``dout``;
* constructions: weights built here from the block formulas, tokens built by loops,
  explicit GD by loops (oracle_gd), GD++ by a token-by-token recursion written here;
* Adam and global-norm clipping: a few-line transcription of the equations;
* the sampler and the initialiser: the documented draws, redone here by hand (the
  truncated-normal constant from the error function, the redraws position by position
  in C order, the fan-in H * Vd of P);
* baselines: explicit GD loops (one eta or one per step), numpy.linalg.lstsq (ridge as
  an augmented least-squares problem), the line search by loops over the stored grid
  (the first of equal smallest losses); the closed-form eta from SPEC.md's formula;
* the layer types after LSA (softmax attention, MLP, LayerNorm, pre-LN blocks,
  positional encodings, the width-changing embedded model): their loop oracles composed
  by hand (no Arch, no layer registry), the encoding table by loops over its formula,
  gradients by complex step of the oracles;
* the mesa layer and the delta rule: their loop oracles (reference/oracle.py: the ridge
  matrices summed out and solved by Gaussian elimination per token; the delta recursion
  entry by entry), which know no forms, and complex-step gradients of them.
"""

import json
import math
from collections import namedtuple
from pathlib import Path

import numpy as np

import reference as R
from reference.gradcheck import numerical_gradient
from reference.oracle import (oracle_delta_layer, oracle_embed_layer, oracle_gd, oracle_layernorm, oracle_loss,
                              oracle_lsa_layer, oracle_mesa_layer, oracle_mlp_layer, oracle_model, oracle_posenc_layer,
                              oracle_pre_ln_residual, oracle_softmax_layer)
from reference.tolerances import allclose_report, tolerance
from reference.tree import tree_leaves, tree_unflatten

from . import golden
from .registry import Outcome, claim


# --------------------------------------------------------------------------------
# Small independent helpers
# --------------------------------------------------------------------------------

def _clip(a):
    c = float(a["clip"])
    return None if np.isinf(c) else c


def _arch(a):
    return R.lsa_stack(int(a["K"]), recurrent=bool(a["recurrent"]), causal=bool(a["causal"]), clip=_clip(a))


def _oracle_readout(h, d):
    return -h[:, -1, d:]


def _tokens_by_loops(X, Y, x_q, W_0):
    B, N, d = X.shape
    d_y = Y.shape[2]
    E = np.zeros((B, N + 1, d + d_y))
    for b in range(B):
        for i in range(N):
            E[b, i, :d], E[b, i, d:] = X[b, i], Y[b, i]
        E[b, N, :d] = x_q[b]
        E[b, N, d:] = -W_0 @ x_q[b]
    return E


def _gd_blocks(d, d_y, N, eta, W_0, gamma=None):
    """(W_Q, W_K, W_V, P) of Prop. 1 (gamma None) or of GD++ (gamma given), one head."""
    D = d + d_y
    WKQ = np.zeros((D, D))
    for i in range(d):
        WKQ[i, i] = 1.0
    W_V, P = np.zeros((D, D)), np.zeros((D, D))
    W_V[d:, :d] = W_0
    for i in range(d_y):
        W_V[d + i, d + i] = -1.0
    if gamma is None:
        for i in range(D):
            P[i, i] = eta / N
    else:
        for i in range(d):
            W_V[i, i] = 1.0
            P[i, i] = -gamma
        for i in range(d_y):
            P[d + i, d + i] = eta / N
    return {"W_Q": WKQ[None], "W_K": WKQ[None].copy(), "W_V": W_V[None], "P": P[None]}


def _gd_weights(X, Y, eta, n_steps, W_0):
    """W_K per task by explicit loops: W <- W - (eta_k/N) sum_i (W x_i - y_i) x_i^T, with
    ``eta`` one value or a list of one per step."""
    B, N, d = X.shape
    etas = [float(eta)] * n_steps if np.ndim(eta) == 0 else [float(e) for e in eta]
    out = np.zeros((B, Y.shape[2], d))
    for b in range(B):
        W = np.array(W_0, dtype=np.float64)
        for k in range(n_steps):
            G = np.zeros_like(W)
            for i in range(N):
                G += np.outer(W @ X[b, i] - Y[b, i], X[b, i])
            W = W - (etas[k] / N) * G
        out[b] = W
    return out


def _gdpp_by_tokens(X, Y, x_q, W_0, etas, gammas):
    """GD++ as a token recursion, from the formulas (not from attention):
    C = sum_i x_i x_i^T and DeltaW = -(eta/N) sum_i (W_0 x_i - y_i) x_i^T over the
    context's current slots; every token x <- x - gamma C x, y <- y - DeltaW x."""
    B, N, d = X.shape
    preds = np.zeros((B, Y.shape[2]))
    for b in range(B):
        xs = [X[b, i].copy() for i in range(N)] + [x_q[b].copy()]
        ys = [Y[b, i].copy() for i in range(N)] + [-W_0 @ x_q[b]]
        for eta, gamma in zip(etas, gammas):
            C = sum(np.outer(xs[i], xs[i]) for i in range(N))
            dW = -(eta / N) * sum(np.outer(W_0 @ xs[i] - ys[i], xs[i]) for i in range(N))
            ys = [ys[j] - dW @ xs[j] for j in range(N + 1)]
            xs = [xs[j] - gamma * C @ xs[j] for j in range(N + 1)]
        preds[b] = -ys[N]
    return preds


def _adam_step(params, grads, m, v, t, lr, b1, b2, eps, clip_norm):
    """Dicts of arrays keyed alike. Global-norm clip, then Adam with bias correction."""
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    s = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    t = t + 1
    new_p, new_m, new_v = {}, {}, {}
    for k in params:
        g = s * grads[k]
        new_m[k] = b1 * m[k] + (1 - b1) * g
        new_v[k] = b2 * v[k] + (1 - b2) * g * g
        new_p[k] = params[k] - lr * (new_m[k] / (1 - b1 ** t)) / (np.sqrt(new_v[k] / (1 - b2 ** t)) + eps)
    return new_p, new_m, new_v, t, norm


def _draw_tasks(rng, B, d, N, d_y, lo, hi, w_scale, noise_std, n_distractors):
    """The documented draw order: W, X, x_q, label noise, distractor labels (float64)."""
    W = w_scale * rng.standard_normal((B, d_y, d))
    X = rng.uniform(lo, hi, size=(B, N, d))
    x_q = rng.uniform(lo, hi, size=(B, d))
    Y = np.zeros((B, N, d_y))
    y_q = np.zeros((B, d_y))
    for b in range(B):
        for i in range(N):
            Y[b, i] = W[b] @ X[b, i]
        y_q[b] = W[b] @ x_q[b]
    if noise_std > 0:
        Y = Y + noise_std * rng.standard_normal((B, N, d_y))
    if n_distractors > 0:
        Y[:, :n_distractors, :] = rng.standard_normal((B, n_distractors, d_y))
    return {"X": X, "Y": Y, "x_q": x_q, "y_q": y_q, "W": W}


def truncated_normal(rng, shape):
    """SPEC.md section 7's draw, written out: z = rng.standard_normal(shape); then, round
    after round, the positions with |z| > 2, in C order, get the values of one call
    rng.standard_normal(count), in that order, until none is left. Returns (z, the
    count of each round), so a test can see that a case really redraws."""
    z = rng.standard_normal(shape)
    rounds = []
    while True:
        bad = [idx for idx in np.ndindex(*shape) if abs(z[idx]) > 2]   # C order
        if not bad:
            return z, rounds
        rounds.append(len(bad))
        for idx, value in zip(bad, rng.standard_normal(len(bad))):
            z[idx] = value


def _truncated_std():
    """Standard deviation of N(0, 1) truncated to [-2, 2]: sqrt(1 - 2 * 2 phi(2) / (2 Phi(2) - 1))."""
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    return math.sqrt(1 - 4 * phi2 / mass)


def _one_step_loss(eta, d, N, m2, m4, w_scale, d_y, noise_std):
    """SPEC.md's expected loss of one GD step from 0, written out again."""
    E_trA = d * m2
    E_trA2 = (d * m4 + d * (d - 1) * m2 ** 2) / N + (N - 1) * d * m2 ** 2 / N
    per_dim = w_scale ** 2 * m2 * (eta ** 2 * E_trA2 - 2 * eta * E_trA + d) + eta ** 2 * noise_std ** 2 * d * m2 ** 2 / N
    return 0.5 * d_y * per_dim


# --------------------------------------------------------------------------------
# Independent expected outputs per kind: returns [(key, expected, tolerance kind)]
# --------------------------------------------------------------------------------

def _grad_rows(f, args, names):
    nums = numerical_gradient(f, args, "complex_step")
    return [(k, g, "complex_step") for k, g in zip(names, nums)]


def _ind_layer(a):
    p = golden.read_layer(a)
    causal, clip = bool(a["causal"]), _clip(a)
    dout = a["dout"]

    def f(args):
        return np.sum(dout * oracle_lsa_layer(args[0], type(p)(*args[1:]), causal, clip))

    rows = [("out", oracle_lsa_layer(a["E"], p, causal, clip), "algebra")]
    return rows + _grad_rows(f, [a["E"], *p], ["dE"] + golden.tree_keys((p,), grad=True, key=golden.LAYER_KEY))


def _ind_stack(a):
    layers, arch, dout = golden.read_stack(a), _arch(a), a["dout"]

    def f(args):
        return np.sum(dout * oracle_model(args[0], tree_unflatten(layers, args[1:]), arch))

    rows = [("out", oracle_model(a["E"], layers, arch), "algebra")]
    return rows + _grad_rows(f, [a["E"], *tree_leaves(layers)], ["dE"] + golden.tree_keys(layers, grad=True))


def _ind_loss(a):
    layers, arch, d, y_q = golden.read_stack(a), _arch(a), int(a["d"]), a["y_q"]

    def loss(E, ls):
        pred = _oracle_readout(oracle_model(E, ls, arch), d)
        return pred, oracle_loss(pred, y_q)

    pred, L = loss(a["E"], layers)
    rows = [("pred", pred, "algebra"), ("L", np.asarray(L), "algebra")]
    f = lambda args: loss(args[0], tree_unflatten(layers, args[1:]))[1]  # noqa: E731
    return rows + _grad_rows(f, [a["E"], *tree_leaves(layers)], ["dE"] + golden.tree_keys(layers, grad=True))


def _ind_construction(a, gdpp):
    X, Y, x_q, W_0 = a["X"], a["Y"], a["x_q"], a["W_0"]
    B, N, d = X.shape
    d_y = Y.shape[2]
    E = _tokens_by_loops(X, Y, x_q, W_0)
    rows = [("E", E, "algebra")]
    if gdpp:
        etas, gammas = [float(e) for e in a["etas"]], [float(g) for g in a["gammas"]]
        blocks = [_gd_blocks(d, d_y, N, e, W_0, g) for e, g in zip(etas, gammas)]
        arch = R.lsa_stack(len(blocks))
        target = _gdpp_by_tokens(X, Y, x_q, W_0, etas, gammas)
        rows.append(("pred_gdpp", target, "algebra"))
    else:
        eta, K = float(a["eta"]), int(a["K"])
        arch = R.lsa_stack(K, recurrent=bool(a["recurrent"]))
        blocks = [_gd_blocks(d, d_y, N, eta, W_0)] * arch.n_param_layers
        target = oracle_gd(X, Y, x_q, eta, K, W_0)
        rows += [("pred_gd", target, "algebra"), ("W_gd", _gd_weights(X, Y, eta, K, W_0), "algebra")]
    layers = tuple(R.LSAParams(**blk) for blk in blocks)
    rows += [(k, m, "algebra") for k, m in golden.stack_arrays(layers).items()]
    out = oracle_model(E, layers, arch)
    rows += [("out", out, "algebra"), ("pred", target, "construction")]
    return rows


def _ind_adam(a):
    params = golden.read_stack(a)
    keys = golden.tree_keys(params)                                    # layer<k>.<name>, in tree order

    def by_key(tree):
        return dict(zip(keys, tree_leaves(tree)))

    new_p, new_m, new_v, t, norm = _adam_step(by_key(params), by_key(golden.read_stack(a, grad=True)),
                                              by_key(golden.read_stack(a, "m.")), by_key(golden.read_stack(a, "v.")),
                                              int(a["t"]), float(a["lr"]), float(a["b1"]), float(a["b2"]),
                                              float(a["eps"]), float(a["clip_norm"]))
    rows = [("new_t", np.asarray(t, dtype=np.int64), "exact"), ("grad_norm", np.asarray(norm), "algebra")]
    for k in keys:
        rows += [(f"new.{k}", new_p[k], "algebra"), (f"new_m.{k}", new_m[k], "algebra"), (f"new_v.{k}", new_v[k], "algebra")]
    return rows


def _ind_train(a):
    layers, arch = golden.read_stack(a), _arch(a)
    params = golden.tree_arrays(layers)                                # layer<k>.<name> -> array, in tree order
    keys = list(params)
    m = {k: np.zeros_like(x) for k, x in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    t, rows, losses, norms = 0, [], [], []
    d, N, d_y, B = (int(a[k]) for k in ("d", "N", "d_y", "B"))
    lo, hi = (float(x) for x in a["x_range"])
    for s in range(int(a["n_steps"])):
        tk = _draw_tasks(np.random.default_rng([int(a["seed"]), s]), B, d, N, d_y, lo, hi, float(a["w_scale"]),
                         float(a["noise_std"]), int(a["n_distractors"]))
        rows += [(f"step{s}.{n}", tk[n], "algebra") for n in ("X", "Y", "x_q", "y_q")]
        E = _tokens_by_loops(tk["X"], tk["Y"], tk["x_q"], np.zeros((d_y, d)))

        def f(args):
            # the oracle's output takes E's dtype: give E the arguments' (complex during the complex step)
            Ez = E.astype(np.result_type(E, *args))
            return oracle_loss(_oracle_readout(oracle_model(Ez, tree_unflatten(layers, args), arch), d), tk["y_q"])

        losses.append(f(list(params.values())))
        g = dict(zip(keys, numerical_gradient(f, list(params.values()), "complex_step")))
        params, m, v, t, norm = _adam_step(params, g, m, v, t, float(a["lr"]), float(a["b1"]), float(a["b2"]),
                                           float(a["eps"]), float(a["clip_norm"]))
        norms.append(norm)
    rows += [("losses", np.array(losses), "complex_step"), ("grad_norms", np.array(norms), "complex_step")]
    return rows + [(f"final.{k}", x, "complex_step") for k, x in params.items()]


def _ind_tasks(a):
    lo, hi = (float(x) for x in a["x_range"])
    tk = _draw_tasks(np.random.default_rng([int(a["seed"]), int(a["step"])]), int(a["B"]), int(a["d"]), int(a["N"]),
                     int(a["d_y"]), lo, hi, float(a["w_scale"]), float(a["noise_std"]), int(a["n_distractors"]))
    return [(k, x, "algebra") for k, x in tk.items()]


def init_draws(a):
    """[(name, shape, fan-in)] of an init case, in drawing order (SPEC.md section 7): the
    fan-in is a matrix's input width, D for W_Q, W_K, W_V and both merged products, and
    H * Vd for P (it maps the concatenated heads back to D)."""
    D, H, K = int(a["D"]), int(a["H"]), int(a["K"])
    if "merged" in a and bool(a["merged"]):
        return [("W_KQ", (H, D, D), D), ("W_PV", (H, D, D), D)]
    Kd = int(a["key_size"]) if "key_size" in a else D
    Vd = int(a["value_size"]) if "value_size" in a else D
    return [("W_Q", (H, Kd, D), D), ("W_K", (H, Kd, D), D), ("W_V", (H, Vd, D), D), ("P", (H, D, Vd), H * Vd)]


def _ind_init(a):
    rng = np.random.default_rng(int(a["seed"]))
    rows = []
    for name, shape, fan_in in init_draws(a):
        std = math.sqrt(float(a["scale"]) / int(a["K"]) / fan_in) / _truncated_std()
        rows.append((name, std * truncated_normal(rng, shape)[0], "algebra"))
    return rows


def _ind_baselines(a):
    X, Y, x_q, y_q = a["X"], a["Y"], a["x_q"], a["y_q"]
    B, N, d = X.shape
    d_y = Y.shape[2]
    n, ridge = int(a["n_steps"]), float(a["ridge"])
    eta = float(a["eta"]) if a["eta"].ndim == 0 else [float(e) for e in a["eta"]]   # one eta, or one per step
    grid = [float(g) for g in a["eta_grid"]]
    paper_grid = 0.001 + 0.1 * np.arange(250)                          # the paper's arange(0.001, 25, 0.1)
    ls, rdg = np.zeros((B, d_y)), np.zeros((B, d_y))
    for b in range(B):
        ls[b] = np.linalg.lstsq(X[b], Y[b], rcond=None)[0].T @ x_q[b]
        Xa = np.vstack([X[b], math.sqrt(ridge) * np.eye(d)])
        Ya = np.vstack([Y[b], np.zeros((d, d_y))])
        rdg[b] = np.linalg.lstsq(Xa, Ya, rcond=None)[0].T @ x_q[b]
    W_gd = _gd_weights(X, Y, eta, n, np.zeros((d_y, d)))
    pred_gd = np.array([[sum(W_gd[b, i, j] * x_q[b, j] for j in range(d)) for i in range(d_y)] for b in range(B)])
    losses = [oracle_loss(oracle_gd(X, Y, x_q, e, n), y_q) for e in grid]
    best = 0
    for i, loss in enumerate(losses):                                  # the first of equal smallest losses
        if loss < losses[best]:
            best = i
    rows = [("pred_gd", pred_gd, "algebra"), ("W_gd", W_gd, "algebra"), ("pred_ls", ls, "algebra"),
            ("pred_ridge", rdg, "algebra"), ("losses_ls", np.array(losses), "algebra"),
            ("eta_ls", np.asarray(grid[best]), "exact")]
    if len(grid) == paper_grid.size:                                   # a 250-value grid is meant to be the paper's
        rows.append(("input:eta_grid", paper_grid, "algebra"))
    return rows


def _ind_eta(a):
    lo, hi = (float(x) for x in a["x_range"])
    m2 = (hi ** 3 - lo ** 3) / (3 * (hi - lo))                         # E x^2 for x ~ U(lo, hi)
    m4 = (hi ** 5 - lo ** 5) / (5 * (hi - lo))                         # E x^4
    args = (int(a["d"]), int(a["N"]), m2, m4, float(a["w_scale"]), int(a["d_y"]), float(a["noise_std"]))
    # the loss is a quadratic in eta: read its coefficients off three evaluations
    L0, L1, L2 = (_one_step_loss(e, *args) for e in (0.0, 1.0, 2.0))
    qa, qb = (L2 - 2 * L1 + L0) / 2, (4 * L1 - 3 * L0 - L2) / 2       # L = qa eta^2 + qb eta + L0
    eta_star = -qb / (2 * qa)
    return [("m2", np.asarray(m2), "algebra"), ("m4", np.asarray(m4), "algebra"),
            ("eta_star", np.asarray(eta_star), "algebra"), ("L_star", np.asarray(_one_step_loss(eta_star, *args)), "algebra"),
            ("L_eta", np.asarray(_one_step_loss(float(a["eta"]), *args)), "algebra")]


# ---- the layer types after LSA: loop oracles composed by hand ----------------------------

_Attn = namedtuple("_Attn", "W_Q W_K W_V P")
_MLPp = namedtuple("_MLPp", "W_1 b_1 W_2 b_2")
_Embed = namedtuple("_Embed", "W b")


def _gelu_form(a):
    return "erf" if bool(a["gelu_erf"]) else "tanh"


def _one_layer_rows(a, keys, forward):
    """("out", forward(E, *a[keys])) and the complex-step gradients of sum(dout * out)
    with respect to E and every key (``d`` + key)."""
    dout = a["dout"]
    args = [a["E"], *(a[k] for k in keys)]
    rows = [("out", forward(args), "algebra")]
    return rows + _grad_rows(lambda z: np.sum(dout * forward(z)), args, ["dE"] + [f"d{k}" for k in keys])


def _ind_softmax_layer(a):
    causal, clip = bool(a["causal"]), _clip(a)
    return _one_layer_rows(a, _Attn._fields, lambda z: oracle_softmax_layer(z[0], _Attn(*z[1:]), causal, clip))


def _ind_mlp_layer(a):
    form, clip = _gelu_form(a), _clip(a)
    return _one_layer_rows(a, _MLPp._fields, lambda z: oracle_mlp_layer(z[0], _MLPp(*z[1:]), form, clip))


def _ind_layernorm(a):
    eps = float(a["eps"])
    return _one_layer_rows(a, ("ln_scale", "ln_offset"), lambda z: oracle_layernorm(z[0], z[1], z[2], eps))


def _pre_ln(z, eps, clip, block):
    """e + (block(n) - n), n = LN(e), by the oracles; z = [E, ln_scale, ln_offset, *block params]."""
    n = oracle_layernorm(z[0], z[1], z[2], eps)
    return oracle_pre_ln_residual(z[0], n, block(n, z[3:]), clip)


def _ind_pre_ln_attention(a):
    causal, eps, clip = bool(a["causal"]), float(a["eps"]), _clip(a)
    attend = oracle_softmax_layer if bool(a["softmax"]) else oracle_lsa_layer
    return _one_layer_rows(a, ("ln_scale", "ln_offset", *_Attn._fields),
                           lambda z: _pre_ln(z, eps, clip, lambda n, p: attend(n, _Attn(*p), causal)))


def _ind_pre_ln_mlp(a):
    form, eps, clip = _gelu_form(a), float(a["eps"]), _clip(a)
    return _one_layer_rows(a, ("ln_scale", "ln_offset", *_MLPp._fields),
                           lambda z: _pre_ln(z, eps, clip, lambda n, p: oracle_mlp_layer(n, _MLPp(*p), form)))


def _ind_posenc(a):
    E, P, concat = a["E"], int(a["width"]), bool(a["concat"])
    T = E.shape[1]
    pe = np.zeros((T, P))
    for t in range(T):
        for c in range(P):
            angle = t * math.exp(-(2 * (c // 2)) * math.log(10000.0) / P)
            pe[t, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    mode = "concat" if concat else "add"
    rows = [("pe", pe, "algebra"), ("out", oracle_posenc_layer(E, mode, P if concat else None), "algebra")]
    dout = a["dout"]
    f = lambda z: np.sum(dout * oracle_posenc_layer(z[0], mode, P if concat else None))  # noqa: E731
    return rows + _grad_rows(f, [E], ["dE"])


def _ind_embedded_loss(a):
    keys = list(golden._EMBEDDED)
    form, y_q = _gelu_form(a), a["y_q"]
    d_y = y_q.shape[1]

    def loss(z):
        h = oracle_embed_layer(z[0], _Embed(z[1], z[2]))
        h = oracle_mlp_layer(h, _MLPp(*z[3:7]), form)
        h = oracle_lsa_layer(h, _Attn(*z[7:11]))
        pred = -h[:, -1, h.shape[2] - d_y:]
        return pred, oracle_loss(pred, y_q)

    args = [a["E"], *(a[k] for k in keys)]
    pred, L = loss(args)
    rows = [("pred", pred, "algebra"), ("L", np.asarray(L), "algebra")]
    return rows + _grad_rows(lambda z: loss(z)[1], args, ["dE"] + [k.replace(".", ".d", 1) for k in keys])


INDEPENDENT = {"layer": _ind_layer, "stack": _ind_stack, "loss": _ind_loss,
               "gd": lambda a: _ind_construction(a, gdpp=False), "gdpp": lambda a: _ind_construction(a, gdpp=True),
               "adam": _ind_adam, "train": _ind_train, "tasks": _ind_tasks, "init": _ind_init,
               "baselines": _ind_baselines, "eta": _ind_eta, "softmax_layer": _ind_softmax_layer,
               "mlp_layer": _ind_mlp_layer, "layernorm": _ind_layernorm, "pre_ln_attention": _ind_pre_ln_attention,
               "pre_ln_mlp": _ind_pre_ln_mlp, "posenc": _ind_posenc, "embedded_loss": _ind_embedded_loss}


def _ind_causal_gd(a):
    """Tokens, weights and outputs by loops (verify.claims_sequences' helpers), never the
    vectorised sequence code."""
    from . import claims_sequences as V

    X, Y, P0, eta = a["X"], a["Y"], a["Phi_0"], float(a["eta"])
    B, T, d = X.shape
    E = np.zeros((B, T, 3 * d))
    E_code = np.zeros((B, T, 4 * d))
    for b in range(B):
        for t in range(T):
            prev = V.loop_prev(X, b, t)
            E[b, t] = np.concatenate([P0 @ X[b, t], X[b, t], prev])
            E_code[b, t] = np.concatenate([np.zeros(d), X[b, t], X[b, t], prev])
    Z, I = np.zeros((d, d)), np.eye(d)
    blocks = {"W_Q": np.hstack([Z, I, Z])[None], "W_K": np.hstack([Z, Z, I])[None],
              "W_V": np.hstack([Z, I, -P0])[None], "P": (eta * np.vstack([I, Z, Z]))[None]}
    out = oracle_lsa_layer(E, R.LSAParams(**blocks), causal=True)
    pred = V.loop_causal_gd(X, eta, P0)
    per_t = np.array([np.mean([0.5 * np.sum((out[b, t, :d] - Y[b, t]) ** 2) for b in range(B)]) for t in range(T)])
    return ([("E", E, "algebra"), ("E_code", E_code, "algebra"), ("out", out, "algebra"), ("pred", pred, "construction"),
             ("pred_gd", pred, "algebra"), ("pred_code", V.loop_causal_gd(X, eta), "construction"),
             ("per_t", per_t, "algebra"), ("L", np.asarray(per_t.mean()), "algebra")]
            + [(k, v, "algebra") for k, v in blocks.items()])


INDEPENDENT["causal_gd"] = _ind_causal_gd


# ---- the mesa layer and the delta rule (SPEC.md section 16): their loop oracles -----------

_Mesa = namedtuple("_Mesa", "W_Q W_K W_V P lam")


def _ind_mesa_layer(a):
    """The loop oracle (A_t, M_t summed out, Gaussian elimination per token; one answer
    for every form) and complex-step gradients of it, dlam included."""
    forget = float(a["forget"])
    return _one_layer_rows(a, _Mesa._fields, lambda z: oracle_mesa_layer(z[0], _Mesa(*z[1:]), forget))


def _ind_delta_layer(a):
    """The loop oracle of the recursion (one answer for both forms) and complex-step
    gradients of it; the oracle sees a gate when the params have w_alpha."""
    beta = float(a["beta"]) if "beta" in a else None
    fields = _Attn._fields + tuple(k for k in ("w_beta", "b_beta", "w_alpha", "b_alpha") if k in a)
    assert ("w_alpha" in a) == bool(a["gate"]) and ("w_beta" in a) == (beta is None), fields
    params = namedtuple("_Delta", fields)
    return _one_layer_rows(a, fields, lambda z: oracle_delta_layer(z[0], params(*z[1:]), beta))


INDEPENDENT["mesa_layer"] = _ind_mesa_layer
INDEPENDENT["delta_layer"] = _ind_delta_layer


def _ind_classic_loss(a):
    """Tokens by loops, the loop oracles of posenc, softmax and LSA composed, the loss by
    oracle_loss, gradients by numerical differentiation of that composition."""
    X, Y, x_q, y_q, P = a["X"], a["Y"], a["x_q"], a["y_q"], int(a["width"])
    B, N, d = X.shape
    d_y = Y.shape[2]
    E = np.zeros((B, 2 * N + 1, d))
    for b in range(B):
        for j in range(N):
            E[b, 2 * j] = X[b, j]
            E[b, 2 * j + 1, d - d_y:] = Y[b, j]
        E[b, 2 * N] = x_q[b]
    keys1 = [f"layer1.{k}" for k in _Attn._fields]
    keys2 = [f"layer2.{k}" for k in _Attn._fields]

    def loss(z):
        h = oracle_posenc_layer(z[0], "concat", P)
        h = oracle_softmax_layer(h, _Attn(*z[1:5]), False, None)
        h = oracle_lsa_layer(h, _Attn(*z[5:9]))
        pred = -h[:, -1, h.shape[2] - d_y:]
        return pred, oracle_loss(pred, y_q)

    args = [E, *(a[k] for k in keys1 + keys2)]
    pred, L = loss(args)
    rows = [("E", E, "algebra"), ("pred", pred, "algebra"), ("L", np.asarray(L), "algebra")]
    return rows + _grad_rows(lambda z: loss(z)[1], args, ["dE"] + [k.replace(".", ".d", 1) for k in keys1 + keys2])


def _ind_copy_construction(a):
    """The weights by the normal-equation formulas (not pseudo-inverses), the encodings by
    math.sin/cos, the two layers by the loop oracle, pred_gd by the GD loop oracle."""
    X, Y, x_q, P, eta = a["X"], a["Y"], a["x_q"], int(a["width"]), float(a["eta"])
    B, N, d = X.shape
    d_y = Y.shape[2]
    T, S, D = 2 * N + 1, 2 * N, d + P
    pe = np.array([[math.sin(t * math.exp(-(2 * (c // 2)) * math.log(10000.0) / P)) if c % 2 == 0 else
                    math.cos(t * math.exp(-(2 * (c // 2)) * math.log(10000.0) / P)) for c in range(P)] for t in range(T)])
    A = np.zeros((T, S))
    for j in range(N):
        A[2 * j, 2 * j + 1] = 1.0
    A[2 * N, 0] = 1.0
    pc = pe[:S]
    Mt = pe.T @ np.linalg.solve(pe @ pe.T, A) @ np.linalg.solve(pc @ pc.T, pc)      # PE^T (PE PE^T)^-1 A (Pc Pc^T)^-1 Pc
    K1, V1 = np.zeros((D, D)), np.zeros((D, D))
    K1[d:, d:] = Mt.T
    for k in range(d_y):
        V1[D - 2 * d_y + k, d - d_y + k] = 1.0
        V1[D - d_y + k, d:] = -pe[2 * N, P - d_y + k] * pe[0] / (pe[0] @ pe[0])
    O, C = pc[:, : P - 2 * d_y], pc[:, P - 2 * d_y: P - d_y]
    G = (O.T @ np.linalg.solve(O @ O.T, C)).T                                           # G O_t = C_t on the context
    K2, V2 = np.zeros((D, D)), np.zeros((D, D))
    K2[:d, :d] = np.eye(d)
    for k in range(d_y):
        V2[D - d_y + k, D - 2 * d_y + k] = -eta / N
        V2[D - d_y + k, d: D - 2 * d_y] = (eta / N) * G[k]
    E = np.zeros((B, T, d))
    for b in range(B):
        for j in range(N):
            E[b, 2 * j] = X[b, j]
            E[b, 2 * j + 1, d - d_y:] = Y[b, j]
        E[b, 2 * N] = x_q[b]
    h = oracle_posenc_layer(E, "concat", P)
    h = oracle_lsa_layer(h, R.MergedParams(K1[None], V1[None]))
    out = oracle_lsa_layer(h, R.MergedParams(K2[None], V2[None]))
    pred = -out[:, -1, D - d_y:]
    gd = oracle_gd(X, Y, x_q, eta, 1)
    gd = gd[0] if isinstance(gd, tuple) else gd
    return [("E", E, "algebra"), ("layer1.W_KQ", K1[None], "construction"), ("layer1.W_PV", V1[None], "construction"),
            ("layer2.W_KQ", K2[None], "construction"), ("layer2.W_PV", V2[None], "construction"),
            ("out", out, "construction"), ("pred", pred, "construction"), ("pred_gd", gd, "algebra")]


INDEPENDENT["classic_loss"] = _ind_classic_loss
INDEPENDENT["copy_construction"] = _ind_copy_construction


def _ind_causal_prop2(a):
    """The scalars by their closed forms (Chebyshev: the coefficients by interpolation at K + 1
    points of the scalar recursion, no numpy.polynomial), the tokens and weights by hand, the
    layers by the loop oracle, pred by the iteration written out per t (verify.claims_sequences'
    loop helpers: A_t, M_t by sums, u by the Richardson / Neumann / Chebyshev recursion), never
    the layer machinery; pred_ridge by one solve per t."""
    from . import claims_sequences as V

    X, K, r, it = a["X"], int(a["K"]), float(a["ridge"]), int(a["iteration"])
    B, T, d = X.shape
    D = (3 + K) * d
    if it in (0, 1):
        om = [float(a["omega"])] * (K + 1) if it == 0 else [float(w) for w in a["omegas"]]
        gammas = [om[i] / (1 - om[i] * r) for i in range(K)]
        coeffs = []
        for j in range(K + 1):
            c = om[j]
            for i in range(j):
                c *= 1 - om[i] * r
            coeffs.append(c)
    else:
        alphas, betas, nu = [float(x) for x in a["alphas"]], [float(x) for x in a["betas"]], float(a["nu"])
        gammas = [1.0 / nu] * K
        lams = [r + (j + 0.5) * nu / (K + 1) for j in range(K + 1)]       # K + 1 distinct points
        Bm = np.array([[math.prod(1 - g * (lam - r) for g in gammas[:j]) for j in range(K + 1)] for lam in lams])
        pv = np.array([V.loop_chebyshev(np.array([[lam]]), alphas, betas, nu)[-1][0, 0] for lam in lams])
        coeffs = list(np.linalg.solve(Bm, pv))

    def sel(slot, scale=1.0):
        S = np.zeros((d, D))
        S[:, slot * d:(slot + 1) * d] = scale * np.eye(d)
        return S

    zs = lambda j: 1 if j == 0 else 2 + j
    layers = []
    for k in range(1, K + 1):
        P = np.zeros((D, d))
        for j in range(k, K + 1):
            P[zs(j) * d:(zs(j) + 1) * d] = -gammas[k - 1] * np.eye(d)
        layers.append((sel(zs(k - 1)), sel(2), sel(2), P))
    layers.append((sum(sel(zs(j), c) for j, c in enumerate(coeffs)), sel(2), sel(1), sel(0).T))
    E = np.zeros((B, T, D))
    for b in range(B):
        for t in range(T):
            E[b, t, d:2 * d] = X[b, t]
            E[b, t, 2 * d:3 * d] = V.loop_prev(X, b, t)
            for j in range(1, K + 1):
                E[b, t, zs(j) * d:(zs(j) + 1) * d] = X[b, t]
    h, outs = E, []
    for q, k_, v, P in layers:
        h = oracle_lsa_layer(h, R.LSAParams(q[None], k_[None], v[None], P[None]), causal=True)
        outs.append(h)
    pred, ridge = np.zeros((B, T, d)), np.zeros((B, T, d))
    for b in range(B):
        for t in range(T):
            A, M = V.loop_system(X, b, t, r)
            x = X[b, t]
            if it in (0, 1):
                u = V.loop_richardson(A, x, om)[-1]
            else:
                u = V.loop_chebyshev(A, alphas, betas, nu)[-1] @ x
            pred[b, t] = M @ u
            ridge[b, t] = M @ np.linalg.solve(A, x)
    rows = [("E", E, "algebra"), ("gammas", np.array(gammas), "algebra"),
            ("coeffs", np.array(coeffs), "algebra" if it in (0, 1) else "construction"),
            ("outs", np.stack(outs), "algebra" if it in (0, 1) else "construction"), ("pred", pred, "construction"),
            ("pred_ridge", ridge, "algebra")]
    for k, (q, k_, v, P) in enumerate(layers):
        kt = "algebra" if it in (0, 1) or k < K else "construction"
        rows += [(f"layer{k}.W_Q", q[None], kt), (f"layer{k}.W_K", k_[None], "algebra"),
                 (f"layer{k}.W_V", v[None], "algebra"), (f"layer{k}.P", P[None], "algebra")]
    return rows


_LDS_VARIANTS = ("linear", "partial", "nonlinear", "contracting", "fixed")
_LDS_CLIP = {"linear": 10.0, "partial": 10.0, "nonlinear": None, "contracting": 2.0, "fixed": 10.0}


def _haar_by_hand(rng, n, d):
    """n Haar matrices: G ~ N(0, 1) (n, d, d), each QR'd alone, column j of Q times sign(R[j, j])."""
    G = rng.standard_normal((n, d, d))
    out = np.zeros((n, d, d))
    for b in range(n):
        Q, Rm = np.linalg.qr(G[b])
        for j in range(d):
            out[b, :, j] = Q[:, j] * (1.0 if Rm[j, j] >= 0 else -1.0)
    return out


def _gelu_tanh(x):
    if abs(x) > 10.0:
        return x if x > 0 else 0.0
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _ind_lds_sampler(a):
    """SPEC.md section 15's draw order re-drawn by hand from numpy.random.default_rng([seed, step]):
    W (Haar per matrix; contracting U, lam, permuted, W = U diag(lam) inv(U); fixed: its own
    stream), h_1, the state noise, C (partial), the observation noise; the recursion by loops."""
    v = _LDS_VARIANTS[int(a["variant"])]
    B, T, d, d_obs = int(a["B"]), int(a["T"]), int(a["d"]), int(a["d_obs"])
    rng = np.random.default_rng([int(a["seed"]), int(a["step"])])
    if v == "fixed":
        W1 = _haar_by_hand(np.random.default_rng([int(a.get("teacher_seed", 0)), 2 ** 32 - 102, d]), 1, d)
        W = np.repeat(W1, B, axis=0)
    elif v == "contracting":
        U = rng.standard_normal((B, d, d))
        lam = np.concatenate([rng.uniform(0.3, 0.9, (B, d - 1)), np.full((B, 1), 0.9)], axis=1)
        lam = rng.permuted(lam, axis=1)
        W = np.stack([U[b] @ np.diag(lam[b]) @ np.linalg.inv(U[b]) for b in range(B)])
    else:
        W = _haar_by_hand(rng, B, d)
    r = float(a["init_range"])
    h1 = rng.uniform(-r, r, (B, d))
    eps = rng.standard_normal((B, T, d))
    clip = float(a["clip"]) if "clip" in a else _LDS_CLIP[v]
    if v == "nonlinear":
        mrng = np.random.default_rng([int(a.get("mlp_seed", 0)), 2 ** 32 - 101, d, 40])
        Am, Bm = 1.1 * mrng.standard_normal((d, 40)), 1.1 * mrng.standard_normal((40, d))
    H = np.zeros((B, T + 1, d))
    for b in range(B):
        h = h1[b].copy()
        H[b, 0] = h
        for t in range(T):
            if v == "nonlinear":
                g = np.array([sum(_gelu_tanh(sum(h[i] * Am[i, m] for i in range(d))) * Bm[m, j] for m in range(40))
                              for j in range(d)])
                f = g / math.sqrt(sum(x * x for x in g))
            else:
                f = h
            h = np.array([sum(W[b, i, j] * f[j] for j in range(d)) + float(a["noise_std"]) * eps[b, t, i]
                          for i in range(d)])
            if clip is not None:
                h = np.minimum(np.maximum(h, -clip), clip)
            H[b, t + 1] = h
    C = 0.5 * rng.standard_normal((B, d_obs, d)) if v == "partial" else np.repeat(np.eye(d)[None], B, axis=0)
    O = np.einsum("bij,btj->bti", C, H)
    if float(a["obs_noise_std"]) > 0:
        O = O + float(a["obs_noise_std"]) * rng.standard_normal((B, T + 1, d_obs))
    return [("X", O[:, :T], "algebra"), ("Y", O[:, 1:], "algebra"), ("H", H, "algebra"), ("W", W, "algebra"),
            ("C", C, "algebra")]


INDEPENDENT["causal_prop2"] = _ind_causal_prop2
INDEPENDENT["lds_sampler"] = _ind_lds_sampler


def load_committed(directory=golden.DEFAULT_DIR):
    """[(manifest entry, inputs, outputs)] of the vectors in ``directory``."""
    man = json.loads((Path(directory) / golden.MANIFEST).read_text())
    return [(e, *golden.load_case(directory, e)) for e in man["cases"]]


def independent_reports(kind, inputs, outputs):
    """Compare the stored arrays with the independent recomputation.
    Returns [(key, tolerance kind, ok, rel err, ratio, detail)], ratio = worst error / allowed."""
    stored = {**outputs, **{f"input:{k}": v for k, v in inputs.items()}}
    rows = []
    for key, expected, kind_tol in INDEPENDENT[kind](inputs):
        actual = stored[key]
        expected = np.asarray(expected)
        if kind_tol == "exact":
            ok = bool(np.array_equal(actual, expected))
            rows.append((key, kind_tol, ok, 0.0 if ok else float("inf"), 0.0 if ok else float("inf"),
                         f"{actual!r} vs {expected!r}"))
            continue
        rep = allclose_report(np.asarray(actual, dtype=np.float64), expected.astype(np.float64), kind_tol, np.float64)
        allowed = rep.tol.atol + rep.tol.rtol * float(np.max(np.abs(expected), initial=0.0))
        rows.append((key, kind_tol, rep.ok, rep.rel_err, rep.max_abs_err / allowed, str(rep)))
    covered = {r[0] for r in rows}
    rows += [(key, "-", False, float("inf"), float("inf"), "stored output not confirmed by any independent computation")
             for key in outputs if key not in covered]
    return rows


# --------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------

@claim("vectors.check", source="golden vectors (verify/vectors/, SPEC.md)",
       statement="The reference reproduces every committed golden vector (icgd vectors check): checksums, "
                 "manifest format version, keys, shapes and dtypes match, and every stored output is recomputed "
                 "from the stored inputs",
       method="verify.golden.check_vectors on the package's vectors; measured = worst relative error over all "
              "cases and outputs (inf on any structural failure)")
def _(ctx):
    ok, results = golden.check_vectors(golden.DEFAULT_DIR)
    worst = max(r.rel_err for r in results) if ok else float("inf")
    tol = tolerance(np.float64, golden.TOL_KIND)
    failed = {r.name: r.message for r in results if not r.ok}
    return Outcome.at_most(worst, tol.rtol, tol.reason, cases=len(results), failed=failed)


@claim("vectors.independent", source="golden vectors (verify/vectors/, SPEC.md)",
       statement="Every committed golden vector is confirmed by a second, independent computation: loop oracle "
                 "forwards, complex-step gradients of the oracle, explicit GD / GD++ token recursions, a hand "
                 "transcription of Adam, hand draws of the sampler and initialiser, lstsq baselines",
       method="verify.claims_vectors.independent_reports on every case; measured = worst error divided by the "
              "tolerance of its kind (algebra, complex_step, construction); details list the worst per kind")
def _(ctx):
    worst, per_kind, failed = 0.0, {}, []
    for entry, inputs, outputs in load_committed():
        for key, kind_tol, ok, rel, ratio, detail in independent_reports(entry["kind"], inputs, outputs):
            worst = max(worst, ratio if ok else float("inf"))
            per_kind[kind_tol] = max(per_kind.get(kind_tol, 0.0), rel)
            if not ok:
                failed.append(f"{entry['name']}:{key}: {detail}")
    return Outcome.at_most(worst, 1.0, "worst error as a fraction of the tolerance of its kind (reference/tolerances.py)",
                           worst_rel_err_per_kind=per_kind, failed=failed)
