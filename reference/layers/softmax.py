"""One multi-head softmax self-attention layer: forward and hand-written backward.

The readable spec (no fast backend runs it: the Numba and CuPy backends refuse it in
``supports()``); tested against the loop oracle ``reference.oracle.oracle_softmax_layer``
and complex-step derivatives. Registered as layer kind ``"softmax"`` (:class:`Softmax`).

Equation (the official code's ``MultiHeadAttention(use_softmax=True)``, no biases), for
every token j:

    e_j <- e_j + sum_h P_h sum_{i in ctx(j)} a_h[j, i] (W_V,h e_i)
    a_h[j, :] = softmax_i( (W_Q,h e_j) . (W_K,h e_i) / sqrt(Kd) )     over i in ctx(j)

* context-only mode (``causal=False``, the paper's regression setting): keys and values
  from the N context tokens, queries from all T = N + 1 tokens, the softmax over the N
  context keys; causal mode: keys and values from all T tokens, token j sees i <= j
  (diagonal included), the softmax over those keys only;
* optional token clipping after the residual, as in ``lsa.py``;
* the parameters and their initialisation are LSA's (``init_lsa_params``: the same draws).

Numerics. The softmax subtracts each row's largest logit (its real part under complex
step, so the function stays analytic) before exp: every exp argument is <= 0, the row sum
is >= 1, and no finite logits give NaN or inf, up to the float's largest value (logits
more than the float's range below the row's largest are set to that bound before the
subtraction; their weight is exp(< -max) = 0 either way, so this is exact). Large logits
saturate: the weights tend to one-hot on the largest logit and their gradient to zero. A
logit that is not finite (q . k overflowed: weights of magnitude ~sqrt(max)) is refused
with ``NonFiniteError`` naming the layer, which a training run reads as divergence.

Shapes: E (B, T, D); W_Q, W_K (H, Kd, D); W_V (H, Vd, D); P (H, D, Vd); S key tokens.
"""

import math
from typing import NamedTuple

import numpy as np

from .._checks import NonFiniteError, check_all_finite, check_data, check_dout, check_float, check_same_dtype
from ..xp import get_xp
from . import LayerType
from .lsa import (attention_cache_floats, attention_param_floats, causal_mask, check_factored_shapes, check_head_options,
                  check_tokens, clip_backward, clip_tokens, init_lsa_params)


class SoftmaxParams(NamedTuple):
    W_Q: object  # (H, Kd, D)
    W_K: object  # (H, Kd, D)
    W_V: object  # (H, Vd, D)
    P: object    # (H, D, Vd)


class SoftmaxCache(NamedTuple):
    E: object       # (B, T, D)      layer input
    Ec: object      # (B, S, D)      key/value tokens
    q: object       # (B, H, T, Kd)
    k: object       # (B, H, S, Kd)
    v: object       # (B, H, S, Vd)
    A: object       # (B, H, T, S)   attention weights (0 where masked)
    o: object       # (B, H, T, Vd)
    pre: object     # (B, T, D)      residual output before clipping
    params: object
    causal: bool
    clip: object


def masked_softmax(Z, mask=None):
    """Softmax of logits Z (..., S) over the last axis, over the entries where ``mask``
    (S' x S, 1 = key visible, 0 = masked; None: all visible) is 1; masked weights are 0.
    Max-subtracted on real parts (see the module docstring); every row needs one key."""
    xp = get_xp(Z)
    r = Z.real
    if mask is not None:
        r = xp.where(mask > 0, r, -xp.inf)
    m = r.max(axis=-1, keepdims=True)                                  # (..., 1) the row's largest logit
    big = float(np.finfo(r.dtype).max)
    floor = xp.maximum(m, 0.0) - big                                   # m - big (-big if m < 0): no overflow
    Zs = xp.where(r < floor, floor.astype(Z.dtype), Z) - m             # (..., S) real part in [-big, 0]
    if mask is not None:
        Zs = xp.where(mask > 0, Zs, 0.0)
    w = xp.exp(Zs)                                                     # (..., S) in (0, 1]
    if mask is not None:
        w = w * mask
    return w / w.sum(axis=-1, keepdims=True)


def softmax_backward_rows(dA, A):
    """Backward of :func:`masked_softmax` given its output A: per row
    dZ = A * (dA - sum_s A_s dA_s) (the Jacobian diag(A) - A A^T applied, never formed;
    masked entries have A = 0 and get 0). The max subtraction has no gradient: the
    softmax does not change when one number is subtracted from a whole row."""
    return A * (dA - (A * dA).sum(axis=-1, keepdims=True))


def _proj(Et, W):
    """Per-head projection: Et (B, S, D), W (H, k, D) -> (B, H, S, k)."""
    return get_xp(Et, W).matmul(Et[:, None, :, :], W.swapaxes(-1, -2)[None])


def softmax_forward(E, params, *, causal=False, clip=None):
    """Apply one softmax attention layer. Returns (out (B, T, D), cache)."""
    check_softmax_inputs(E, params, causal, clip)
    xp = get_xp(E, *params)
    W_Q, W_K, W_V, P = params
    B, T, D = E.shape
    Kd = W_Q.shape[1]
    Ec = E if causal else E[:, : T - 1, :]                             # (B, S, D)
    q = _proj(E, W_Q)                                                  # (B, H, T, Kd)
    k = _proj(Ec, W_K)                                                 # (B, H, S, Kd)
    v = _proj(Ec, W_V)                                                 # (B, H, S, Vd)
    Z = xp.matmul(q, k.swapaxes(-1, -2)) * (1.0 / math.sqrt(Kd))       # (B, H, T, S) logits
    check_logits(Z)
    mask = causal_mask(T, xp, Z.real.dtype) if causal else None        # (T, T)
    A = masked_softmax(Z, mask)                                        # (B, H, T, S)
    o = xp.matmul(A, v)                                                # (B, H, T, Vd)
    delta = xp.matmul(o, P.swapaxes(-1, -2)[None]).sum(axis=1)         # (B, T, D)
    pre = E + delta                                                    # (B, T, D)
    out = pre if clip is None else clip_tokens(pre, clip)
    return out, SoftmaxCache(E, Ec, q, k, v, A, o, pre, params, causal, clip)


def softmax_backward(dout, cache):
    """Backward of :func:`softmax_forward`: (dE (B, T, D), SoftmaxParams of gradients).
    Walks the forward in reverse; no (T, T, T) array is formed."""
    if not isinstance(cache, SoftmaxCache):
        raise TypeError(f"cache must be the SoftmaxCache that softmax_forward returned, got {type(cache).__name__}")
    check_dout(dout, cache.pre.shape, cache.pre.dtype)
    E, Ec, q, k, v, A, o, pre, params, causal, clip = cache
    xp = get_xp(dout, E)
    W_Q, W_K, W_V, P = params
    S, Kd = Ec.shape[1], W_Q.shape[1]
    # forward: out = clip(pre), so dpre = dout where -c <= pre <= c, else 0
    dpre = dout if clip is None else clip_backward(dout, pre, clip)    # (B, T, D)
    # forward: pre = E + delta, so dE = dpre (residual path) and ddelta = dpre
    dE = dpre.copy()                                                   # (B, T, D)
    # forward: delta = sum_h o_h P_h^T, so dP_h = sum_bt ddelta^T o_h and do_h = ddelta P_h
    dP = xp.einsum("btd,bhtv->hdv", dpre, o)                           # (H, D, Vd)
    do = xp.matmul(dpre[:, None], P[None])                             # (B, H, T, Vd)
    # forward: o = A v, so dA = do v^T and dv = A^T do
    dA = xp.matmul(do, v.swapaxes(-1, -2))                             # (B, H, T, S)
    dv = xp.matmul(A.swapaxes(-1, -2), do)                             # (B, H, S, Vd)
    # forward: A = softmax(Z) over the visible keys of each row
    dZ = softmax_backward_rows(dA, A)                                  # (B, H, T, S)
    # forward: Z = q k^T / sqrt(Kd), so dq = dZ k / sqrt(Kd) and dk = dZ^T q / sqrt(Kd)
    dZ = dZ * (1.0 / math.sqrt(Kd))
    dq = xp.matmul(dZ, k)                                              # (B, H, T, Kd)
    dk = xp.matmul(dZ.swapaxes(-1, -2), q)                             # (B, H, S, Kd)
    # forward: q = E W_Q^T, k = Ec W_K^T, v = Ec W_V^T (per head)
    dW_Q = xp.einsum("bhtk,btd->hkd", dq, E)                           # (H, Kd, D)
    dW_K = xp.einsum("bhsk,bsd->hkd", dk, Ec)                          # (H, Kd, D)
    dW_V = xp.einsum("bhsv,bsd->hvd", dv, Ec)                          # (H, Vd, D)
    dE += xp.matmul(dq, W_Q[None]).sum(axis=1)
    dEc = xp.matmul(dk, W_K[None]).sum(axis=1) + xp.matmul(dv, W_V[None]).sum(axis=1)   # (B, S, D)
    # forward: Ec = E[:, :S], so its gradient adds into the first S rows of dE
    dE[:, :S] += dEc
    return dE, SoftmaxParams(dW_Q, dW_K, dW_V, dP)


def check_logits(Z):
    """Raise NonFiniteError unless every attention logit is finite (q . k / sqrt(Kd)
    overflows only for weights or tokens near the float's range)."""
    if not bool(get_xp(Z).isfinite(Z).all()):
        raise NonFiniteError("softmax attention logits overflowed (q . k / sqrt(key size) is not finite): the "
                             "weights W_Q, W_K or the tokens are too large for this dtype")


def check_softmax_params(params):
    """Shapes, dtypes and finiteness of one layer's params; returns the token width D."""
    if not isinstance(params, SoftmaxParams):
        raise TypeError(f"softmax params must be SoftmaxParams, got {type(params).__name__}")
    D = check_factored_shapes(params)
    check_same_dtype(**params._asdict())
    check_all_finite(params._fields, params)
    return D


def check_softmax_inputs(E, params, causal, clip):
    """Raise unless :func:`softmax_forward` can run on tokens E (B, T, D) with ``params``."""
    check_data("E", E, dims=("B", "T", "D"))
    D = check_softmax_params(params)
    if E.shape[2] != D:
        raise ValueError(f"E must have token width D={D} to match the softmax params, got shape {tuple(E.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    check_tokens(E.shape[1], causal)
    if clip is not None:
        check_float("clip", clip, 0.0, allow_equal_min=False)
    check_same_dtype(E=E, W_Q=params.W_Q)


class Softmax(LayerType):
    """Layer kind ``"softmax"``. Options: ``causal``, ``clip`` (change the function) and
    ``heads``, ``key_size``, ``value_size`` (None: D; shape the parameters ``init`` draws,
    which are LSA's draws; the forward reads them from the params)."""

    kind = "softmax"
    OPTIONS = {"causal": False, "clip": None, "heads": 1, "key_size": None, "value_size": None}
    PARAM_OPTIONS = ("heads", "key_size", "value_size")

    def check_options(self, options):
        o = super().check_options(options)
        if not isinstance(o["causal"], bool):
            raise TypeError(f"softmax option causal must be a bool, got {o['causal']!r}")
        if o["clip"] is not None:
            o["clip"] = check_float("clip", o["clip"], 0.0, allow_equal_min=False)
        check_head_options(o)
        return o

    def param_type(self, **_):
        return SoftmaxParams

    def init(self, rng, D_in, settings, *, heads=1, key_size=None, value_size=None, **_):
        p = init_lsa_params(rng, D_in, H=heads, key_size=key_size, value_size=value_size,
                            n_layers_for_scale=settings.n_layers, scale=settings.scale, dtype=settings.dtype,
                            xp=settings.xp)
        return SoftmaxParams(*p)

    def forward(self, E, params, *, causal=False, clip=None):
        return softmax_forward(E, params, causal=causal, clip=clip)

    def backward(self, dout, cache):
        return softmax_backward(dout, cache)

    def oracle(self, E, params, *, causal=False, clip=None):
        from ..oracle import oracle_softmax_layer

        return oracle_softmax_layer(E, params, causal=causal, clip=clip)

    def cache_floats(self, T, D_in, *, causal=False, clip=None, heads=1, key_size=None, value_size=None):
        """q (H T Kd), k (H S Kd), v (H S Vd), A (H T S), o (H T Vd), pre (T D), and out
        (T D) when clipping: what LSA keeps (the logits are not kept)."""
        return attention_cache_floats(T, D_in, heads, D_in if key_size is None else key_size,
                                      D_in if value_size is None else value_size, causal, clip)

    def check_tokens(self, T, *, causal=False, **_):
        check_tokens(T, causal)

    def check_params(self, params, D_in, **_):
        D = check_softmax_params(params)
        if D != D_in:
            raise ValueError(f"softmax params have token width D={D}, the layer's input has width {D_in}")

    def param_floats(self, D_in, *, heads=1, key_size=None, value_size=None, **_):
        return attention_param_floats(D_in, heads, D_in if key_size is None else key_size,
                                      D_in if value_size is None else value_size)
