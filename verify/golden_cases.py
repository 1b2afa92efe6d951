"""The golden cases: which test vectors exist and how each one's inputs are drawn.

A case is a name, a kind (``verify/vector_kinds.py``: its keys, schema and reference
computation) and a builder that draws the kind's inputs from a seeded generator.
``CASES`` is the table in writing order; a case's index in it salts its generator
(``default_rng([SEED, index])``), so new cases are appended and earlier ones keep their
bytes. ``build_cases`` runs every builder and the reference. Writing the files and
checking them back is ``verify/golden.py``, which re-exports these names.
"""

from typing import Callable, NamedTuple

import numpy as np

import reference as R
from reference.layers.embed import EmbedParams
from reference.layers.mlp import MLPParams, mlp_forward
from reference.layers.softmax import SoftmaxParams, softmax_forward
from reference.optim import global_norm
from reference.tree import tree_map

from .vector_kinds import COMPUTE, DELTA_FORMS, MESA_FORMS, layer_arrays, read_params, stack_arrays

SEED = 20230712

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
        params = read_params(a, R.LayerSpec("pre_ln", options).param_type())
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
