"""One linear self-attention (LSA) layer: forward and hand-written backward.

The readable spec; the Numba and CuPy paths live in ``reference.backends`` and are
tested against this file, which is tested against the loop oracle in
``reference/oracle.py``. Registered as layer kind ``"lsa"`` (:class:`LSA` at the end).

Equation (von Oswald et al. 2023, Eq. 6 and the official code), for every token j:

    e_j <- e_j + sum_h P_h sum_{i in ctx(j)} (W_V,h e_i) (W_K,h e_i)^T (W_Q,h e_j)

* no softmax, no 1/sqrt(key size), no 1/N (the 1/N lives in the constructions);
* context-only mode (the paper's regression setting, ``causal=False``): keys and
  values come from the N context tokens E[:, :N] only; queries from all T = N + 1
  tokens; the query token is never a key or value;
* causal mode (``causal=True``, for sequence work): keys and values from all T tokens,
  token j attends to tokens i <= j (lower-triangular mask including the diagonal);
* optional token clipping after the residual: out = clip(e, -c, c). Its backward is
  exact: the gradient passes where -c <= e <= c and is zero elsewhere.

Two parameterisations of the same function:

* factored :class:`LSAParams` (W_Q, W_K, W_V, P), one entry per head;
* merged :class:`MergedParams` (W_KQ = W_K^T W_Q, W_PV = P W_V), which is all the
  function depends on. Merged is the factored layer with W_K = I and P = I.

Shapes: E (B, T, D); W_Q, W_K (H, Kd, D); W_V (H, Vd, D); P (H, D, Vd);
W_KQ, W_PV (H, D, D). S = number of key/value tokens (N or T).
"""

from typing import NamedTuple

import numpy as np

from .._checks import (check_all_finite, check_array, check_data, check_dout, check_dtype, check_float, check_int,
                       check_same_dtype)
from ..xp import get_xp
from . import LayerType


class LSAParams(NamedTuple):
    W_Q: object  # (H, Kd, D)
    W_K: object  # (H, Kd, D)
    W_V: object  # (H, Vd, D)
    P: object    # (H, D, Vd)


class MergedParams(NamedTuple):
    W_KQ: object  # (H, D, D)  = W_K^T W_Q per head
    W_PV: object  # (H, D, D)  = P W_V per head


class LSACache(NamedTuple):
    E: object       # (B, T, D)      layer input
    Ec: object      # (B, S, D)      key/value tokens
    q: object       # (B, H, T, Kd)
    k: object       # (B, H, S, Kd)
    v: object       # (B, H, S, Vd)
    A: object       # (B, H, T, S)   attention weights (masked)
    o: object       # (B, H, T, Vd)
    pre: object     # (B, T, D)      residual output before clipping
    params: object
    causal: bool
    clip: object


def to_merged(params):
    """Merged products of factored params: W_KQ = W_K^T W_Q, W_PV = P W_V, per head."""
    if isinstance(params, MergedParams):
        return params
    _check_params(params)
    xp = get_xp(*params)
    W_KQ = xp.matmul(xp.swapaxes(params.W_K, -1, -2), params.W_Q)     # (H, D, D)
    W_PV = xp.matmul(params.P, params.W_V)                             # (H, D, D)
    return MergedParams(W_KQ, W_PV)


def _factored_view(params):
    """(W_Q, W_K, W_V, P) with None standing for the identity (merged params)."""
    if isinstance(params, MergedParams):
        return params.W_KQ, None, params.W_PV, None
    return params.W_Q, params.W_K, params.W_V, params.P


def _T(a):
    return None if a is None else a.swapaxes(-1, -2)


def _proj(Et, W):
    """Per-head projection of tokens: Et (B, S, D), W (H, k, D) -> (B, H, S, k); W None = identity."""
    if W is None:
        return Et[:, None, :, :]
    return get_xp(Et, W).matmul(Et[:, None, :, :], _T(W)[None])


def causal_mask(T, xp=np, dtype=np.float64):
    """(T, T) lower-triangular mask including the diagonal: token j sees tokens i <= j."""
    return xp.tril(xp.ones((T, T), dtype=dtype))


def lsa_forward(E, params, *, causal=False, clip=None):
    """Apply one LSA layer. Returns (out (B, T, D), cache)."""
    check_layer_inputs(E, params, causal, clip)
    xp = get_xp(E, *params)
    W_Q, W_K, W_V, P = _factored_view(params)
    B, T, D = E.shape
    Ec = E if causal else E[:, : T - 1, :]                             # (B, S, D)
    q = _proj(E, W_Q)                                                  # (B, H, T, Kd)
    k = _proj(Ec, W_K)                                                 # (B, H, S, Kd)
    v = _proj(Ec, W_V)                                                 # (B, H, S, Vd)
    A = xp.matmul(q, xp.swapaxes(k, -1, -2))                           # (B, H, T, S)
    if causal:
        A = A * causal_mask(T, xp, A.real.dtype)
    o = xp.matmul(A, v)                                                # (B, H, T, Vd)
    if P is None:
        delta = o.sum(axis=1)                                          # (B, T, D)
    else:
        delta = xp.matmul(o, _T(P)[None]).sum(axis=1)                  # (B, T, D)
    pre = E + delta                                                    # (B, T, D)
    out = pre if clip is None else clip_tokens(pre, clip)
    return out, LSACache(E, Ec, q, k, v, A, o, pre, params, causal, clip)


def lsa_backward(dout, cache):
    """Backward of :func:`lsa_forward`: returns (dE (B, T, D), dparams), dparams of
    the same type as the forward's params. Walks the forward in reverse. ``dout``
    (B, T, D): the gradient of the output, of its shape and dtype, finite."""
    if not isinstance(cache, LSACache):
        raise TypeError(f"cache must be the LSACache that lsa_forward returned, got {type(cache).__name__}")
    check_dout(dout, cache.pre.shape, cache.pre.dtype)
    E, Ec, q, k, v, A, o, pre, params, causal, clip = cache
    xp = get_xp(dout, E)
    W_Q, W_K, W_V, P = _factored_view(params)
    B, T, D = E.shape
    S = Ec.shape[1]
    # forward: out = clip(pre), so dpre = dout where -c <= pre <= c, else 0
    dpre = dout if clip is None else clip_backward(dout, pre, clip)    # (B, T, D)
    # forward: pre = E + delta, so dE = dpre (residual path) and ddelta = dpre
    dE = dpre.copy()                                                   # (B, T, D)
    # forward: delta = sum_h o_h P_h^T, so dP_h = sum_bt ddelta^T o_h and do_h = ddelta P_h
    if P is None:
        do = xp.broadcast_to(dpre[:, None], o.shape)                   # (B, H, T, Vd)
        dP = None
    else:
        dP = xp.einsum("btd,bhtv->hdv", dpre, o)                       # (H, D, Vd)
        do = xp.matmul(dpre[:, None], P[None])                         # (B, H, T, Vd)
    # forward: o = A v, so dA = do v^T and dv = A^T do
    dA = xp.matmul(do, xp.swapaxes(v, -1, -2))                         # (B, H, T, S)
    dv = xp.matmul(xp.swapaxes(A, -1, -2), do)                         # (B, H, S, Vd)
    # forward: A = mask * (q k^T), so dA <- mask * dA; dq = dA k, dk = dA^T q
    if causal:
        dA = dA * causal_mask(T, xp, dA.real.dtype)
    dq = xp.matmul(dA, k)                                              # (B, H, T, Kd)
    dk = xp.matmul(xp.swapaxes(dA, -1, -2), q)                         # (B, H, S, Kd)
    # forward: q = E W_Q^T, k = Ec W_K^T, v = Ec W_V^T (per head)
    dW_Q = xp.einsum("bhtk,btd->hkd", dq, E)                           # (H, Kd, D)
    dE += _unproj(dq, W_Q, xp)
    dEc = _unproj(dv, W_V, xp)                                         # (B, S, D)
    if W_K is None:
        dEc = dEc + dk.sum(axis=1)
        dW_K = None
    else:
        dW_K = xp.einsum("bhsk,bsd->hkd", dk, Ec)                      # (H, Kd, D)
        dEc = dEc + _unproj(dk, W_K, xp)
    dW_V = xp.einsum("bhsv,bsd->hvd", dv, Ec)                          # (H, Vd, D)
    # forward: Ec = E[:, :S], so its gradient adds into the first S rows of dE
    dE[:, :S] += dEc
    if isinstance(params, MergedParams):
        return dE, MergedParams(dW_Q, dW_V)
    return dE, LSAParams(dW_Q, dW_K, dW_V, dP)


def _unproj(dproj, W, xp):
    """Backward of a per-head projection to its tokens: sum_h dproj_h W_h -> (B, S, D)."""
    if W is None:
        return dproj.sum(axis=1)
    return xp.matmul(dproj, W[None]).sum(axis=1)


def clip_tokens(x, c):
    """clip(x, -c, c), decided on the real part so complex-step differentiation works."""
    xp = get_xp(x)
    r = x.real
    return xp.where(r > c, xp.asarray(c, dtype=x.dtype), xp.where(r < -c, xp.asarray(-c, dtype=x.dtype), x))


def clip_backward(dout, pre, c):
    """Backward of :func:`clip_tokens`: gradient passes where -c <= pre <= c."""
    r = pre.real
    return dout * ((r >= -c) & (r <= c))


def init_lsa_params(rng, D, *, H=1, key_size=None, value_size=None, n_layers_for_scale=1,
                    scale=0.002, dtype=np.float32, merged=False, xp=np):
    """Initial parameters as in the official code: variance scaling with
    ``scale / K`` over each matrix's fan-in, truncated normal at two standard
    deviations: std = sqrt(scale / K / fan_in) / 0.8796 before truncation (the
    constant makes the truncated distribution's std equal to the target). Fan-in is D
    for W_Q, W_K, W_V (and both merged products) and H * Vd for P, the projection of
    the concatenated heads. The paper's text says "std 0.002/K"; the code's
    variance-scaling form is the default here.
    """
    D = check_int("D", D, 2)
    H = check_int("H", H, 1)
    Kd = D if key_size is None else check_int("key_size", key_size, 1)
    Vd = D if value_size is None else check_int("value_size", value_size, 1)
    K = check_int("n_layers_for_scale", n_layers_for_scale, 1)
    scale = check_float("scale", scale, 0.0, allow_equal_min=False)
    dtype = check_dtype("dtype", dtype)
    def tn(shape, fan_in):
        std = np.sqrt(scale / K / fan_in) / 0.87962566103423978
        out = rng.standard_normal(shape)
        bad = np.abs(out) > 2.0
        while bad.any():
            out[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(out) > 2.0
        return xp.asarray((std * out).astype(dtype))

    if merged:
        return MergedParams(tn((H, D, D), D), tn((H, D, D), D))
    return LSAParams(tn((H, Kd, D), D), tn((H, Kd, D), D), tn((H, Vd, D), D), tn((H, D, Vd), H * Vd))


def check_factored_shapes(params):
    """Shapes of factored attention params (W_Q, W_K (H, Kd, D), W_V (H, Vd, D), P (H, D,
    Vd)), shared by lsa and softmax; returns the token width D."""
    check_array("W_Q", params.W_Q, ndim=3, finite=False)
    H, Kd, D = params.W_Q.shape
    check_array("W_K", params.W_K, shape=(H, Kd, D), finite=False)
    check_array("W_V", params.W_V, ndim=3, finite=False)
    Vd = params.W_V.shape[1]
    check_array("W_V", params.W_V, shape=(H, Vd, D), finite=False)
    check_array("P", params.P, shape=(H, D, Vd), finite=False)
    return D


def attention_cache_floats(T, D, H, Kd, Vd, causal, clip):
    """Floats per task an attention forward keeps: q (H T Kd), k (H S Kd), v (H S Vd),
    A (H T S), o (H T Vd), pre (T D), and out (T D) when clipping (lsa and softmax)."""
    S = T if causal else T - 1
    return H * (T * Kd + S * Kd + S * Vd + T * S + T * Vd) + T * D * (2 if clip is not None else 1)


def attention_param_floats(D, H, Kd, Vd):
    """W_Q, W_K (H Kd D), W_V (H Vd D), P (H D Vd)."""
    return H * (2 * Kd * D + 2 * Vd * D)


def _check_params(params):
    """Shapes, dtypes and finiteness of one layer's params; returns the token width D."""
    if isinstance(params, MergedParams):
        check_array("W_KQ", params.W_KQ, ndim=3, finite=False)
        H, D, _ = params.W_KQ.shape
        check_array("W_KQ", params.W_KQ, shape=(H, D, D), finite=False)
        check_array("W_PV", params.W_PV, shape=(H, D, D), finite=False)
    elif isinstance(params, LSAParams):
        D = check_factored_shapes(params)
    else:
        raise TypeError(f"params must be LSAParams or MergedParams, got {type(params).__name__}")
    if len({a.dtype for a in params}) > 1:
        check_same_dtype(**params._asdict())
    check_all_finite(params._fields, params)
    return D


def check_layer_inputs(E, params, causal, clip):
    """Raise unless :func:`lsa_forward` can run on tokens E (B, T, D) with ``params``."""
    check_data("E", E, dims=("B", "T", "D"))
    D = _check_params(params)
    if E.shape[2] != D:
        raise ValueError(f"E must have token width D={D} to match params, got shape {tuple(E.shape)}")
    check_tokens(E.shape[1], causal)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if clip is not None:
        check_float("clip", clip, 0.0, allow_equal_min=False)
    dts = {np.dtype(a.dtype) for a in (E, *params)}
    if len(dts) > 1:
        raise TypeError(f"E and params must share one dtype, got {sorted(str(t) for t in dts)}")


def check_head_options(o):
    """Validate (in place) the options that shape an attention layer's heads: ``heads``
    >= 1, ``key_size`` and ``value_size`` >= 1 or None (= D). Shared by every attention
    kind (lsa, softmax, mesa, delta)."""
    o["heads"] = check_int("heads", o["heads"], 1)
    for name in ("key_size", "value_size"):
        if o[name] is not None:
            o[name] = check_int(name, o[name], 1)
    return o


def check_tokens(T, causal):
    """Context-only layers need a context token and the query (T >= 2)."""
    if not causal and T < 2:
        raise ValueError(f"E needs at least 2 tokens (context + query) in context-only mode, got T={T}")


class LSA(LayerType):
    """Layer kind ``"lsa"``. Options: ``causal``, ``clip`` (change the function) and
    ``heads``, ``key_size``, ``value_size`` (None: D), ``merged`` (shape the parameters
    ``init`` draws; the forward reads heads and sizes from the params it is given and
    takes factored or merged params alike)."""

    kind = "lsa"
    OPTIONS = {"causal": False, "clip": None, "heads": 1, "key_size": None, "value_size": None, "merged": False}
    PARAM_OPTIONS = ("heads", "key_size", "value_size", "merged")

    def check_options(self, options):
        o = super().check_options(options)
        if not isinstance(o["causal"], bool):
            raise TypeError(f"lsa option causal must be a bool, got {o['causal']!r}")
        if not isinstance(o["merged"], bool):
            raise TypeError(f"lsa option merged must be a bool, got {o['merged']!r}")
        if o["clip"] is not None:
            o["clip"] = check_float("clip", o["clip"], 0.0, allow_equal_min=False)
        check_head_options(o)
        return o

    def param_type(self, *, merged=False, **_):
        return MergedParams if merged else LSAParams

    def init(self, rng, D_in, settings, *, heads=1, key_size=None, value_size=None, merged=False, **_):
        return init_lsa_params(rng, D_in, H=heads, key_size=key_size, value_size=value_size,
                               n_layers_for_scale=settings.n_layers, scale=settings.scale, dtype=settings.dtype,
                               merged=merged, xp=settings.xp)

    def forward(self, E, params, *, causal=False, clip=None):
        return lsa_forward(E, params, causal=causal, clip=clip)

    def backward(self, dout, cache):
        return lsa_backward(dout, cache)

    def oracle(self, E, params, *, causal=False, clip=None):
        from ..oracle import oracle_lsa_layer

        return oracle_lsa_layer(E, params, causal=causal, clip=clip)

    def cache_floats(self, T, D_in, *, causal=False, clip=None, heads=1, key_size=None, value_size=None,
                     merged=False):
        """Floats per task the forward allocates and keeps (cache and output; E and its
        key/value rows are the input's memory): q (H T Kd), k (H S Kd), v (H S Vd),
        A (H T S), o (H T Vd), pre (T D), and out (T D) when clipping."""
        Kd = D_in if (merged or key_size is None) else key_size
        Vd = D_in if (merged or value_size is None) else value_size
        return attention_cache_floats(T, D_in, heads, Kd, Vd, causal, clip)

    def check_tokens(self, T, *, causal=False, **_):
        check_tokens(T, causal)

    def check_params(self, params, D_in, **_):
        D = _check_params(params)
        if D != D_in:
            raise ValueError(f"lsa params have token width D={D}, the layer's input has width {D_in}")

    def param_floats(self, D_in, *, heads=1, key_size=None, value_size=None, merged=False, **_):
        """W_Q, W_K (H Kd D), W_V (H Vd D), P (H D Vd); merged: W_KQ, W_PV (H D D)."""
        if merged:
            return 2 * heads * D_in * D_in
        return attention_param_floats(D_in, heads, D_in if key_size is None else key_size,
                                      D_in if value_size is None else value_size)
