"""The delta rule layer (DeltaNet; Gated DeltaNet with ``gate=True``): forward and
hand-written backward.

The readable spec (no fast backend runs it: the Numba and CuPy backends refuse it in
``supports()``); tested against the loop oracle ``reference.oracle.oracle_delta_layer``
and complex-step derivatives. Registered as layer kind ``"delta"`` (:class:`Delta`).

Equation (Schlag, Irie and Schmidhuber 2021, "Linear Transformers are secretly fast weight
programmers"; Yang et al. 2024, DeltaNet; Yang, Kautz and Hatamizadeh 2024, Gated
DeltaNet), per head, for every token t (causal, the diagonal included), S_0 = 0 (Vd x Kd):

    S_t = alpha_t S_{t-1} - beta_t (alpha_t S_{t-1} k_t - v_t) k_t^T
    e_t <- e_t + sum_h P_h S_{h,t} q_{h,t}

with q, k, v = W_Q e, W_K e, W_V e; beta_t = sigmoid(w_beta . e_t + b_beta) per head
(``beta=None``, DeltaNet's learned step) or the constant ``beta``; alpha_t =
sigmoid(w_alpha . e_t + b_alpha) per head with ``gate=True``, else 1. Keys are not
normalised (DeltaNet L2-normalises them; here that is left to the model).

The identity with gradient descent: with the per-token loss l_t(S) = 1/2 ||S k_t - v_t||^2,
grad l_t(S) = (S k_t - v_t) k_t^T, so S_t = S' - beta_t grad l_t(S') at S' = alpha_t S_{t-1}:
one SGD step of step size beta_t per token on the online regression loss, from the
decayed previous state (alpha_t: weight decay by (1 - alpha_t)). Proved symbolically in
``symbolic/mesa.py`` (theorem ``mesa.delta_is_gd``). The step contracts along k_t when
0 < beta_t |k_t|^2 < 2 (eigenvalue 1 - beta_t |k_t|^2 of I - beta_t k_t k_t^T).

Two forms, equal in exact arithmetic:

* ``form="recurrent"``: the recursion above, one token at a time; keeps every state S_t;
* ``form="chunked"``: chunks of ``chunk`` tokens, inside each the UT transform (the WY
  representation of the product of the generalised Householder steps). With
  Gm[t, i] = prod_{i<j<=t} alpha_j and g_t = prod_{j<=t} alpha_j inside the chunk (from the
  cumulative sum of log alpha, so no underflow), the pseudo-values u_t (rows of U) solve
  (I + L) U = diag(beta) (V - diag(g) K S_0^T), L[t, i] = beta_t Gm[t, i] k_t . k_i for
  i < t; Tm = (I + L)^{-1} by forward substitution (the UT transform); then
  O = diag(g) Q S_0^T + (Gm o tril(Q K^T)) U and S_end = g_C S_0 + U^T diag(Gm[C, :]) K.
  Keeps the chunk-boundary states only.

Backward: through the recurrence, in reverse, from the states S_{t-1} (the recurrent form
keeps them; the chunked form recomputes each chunk's states from its boundary state, one
chunk at a time). A state that overflows (beta |k|^2 far beyond 2 over many tokens) is
refused with ``NonFiniteError``.

Shapes: E (B, T, D); W_Q, W_K (H, Kd, D); W_V (H, Vd, D); P (H, D, Vd); w_beta, w_alpha
(H, D); b_beta, b_alpha (H,); S (B, H, Vd, Kd).
"""

from typing import NamedTuple

import numpy as np

from .._checks import (NonFiniteError, check_all_finite, check_array, check_data, check_dout, check_float,
                       check_int, check_same_dtype)
from ..xp import get_xp
from . import LayerType
from .lsa import attention_param_floats, check_factored_shapes, check_head_options, init_lsa_params

FORMS = ("recurrent", "chunked")
ALPHA_BIAS_INIT = 2.0     # b_alpha at init: alpha = sigmoid(2) = 0.88, a mild decay


class DeltaParams(NamedTuple):            # beta learned, no gate (DeltaNet)
    W_Q: object     # (H, Kd, D)
    W_K: object     # (H, Kd, D)
    W_V: object     # (H, Vd, D)
    P: object       # (H, D, Vd)
    w_beta: object  # (H, D)
    b_beta: object  # (H,)


class DeltaFixedParams(NamedTuple):       # beta a fixed option, no gate
    W_Q: object
    W_K: object
    W_V: object
    P: object


class GatedDeltaParams(NamedTuple):       # beta learned, gate (Gated DeltaNet)
    W_Q: object
    W_K: object
    W_V: object
    P: object
    w_beta: object  # (H, D)
    b_beta: object  # (H,)
    w_alpha: object  # (H, D)
    b_alpha: object  # (H,)


class GatedDeltaFixedParams(NamedTuple):  # beta a fixed option, gate
    W_Q: object
    W_K: object
    W_V: object
    P: object
    w_alpha: object  # (H, D)
    b_alpha: object  # (H,)


PARAM_TYPES = {(False, False): DeltaParams, (True, False): DeltaFixedParams,
               (False, True): GatedDeltaParams, (True, True): GatedDeltaFixedParams}   # (beta fixed, gate)


class DeltaCache(NamedTuple):
    E: object       # (B, T, D)      layer input
    q: object       # (B, H, T, Kd)
    k: object       # (B, H, T, Kd)
    v: object       # (B, H, T, Vd)
    beta: object    # (B, H, T)
    alpha: object   # (B, H, T) with a gate, else None
    o: object       # (B, H, T, Vd)  S_t q_t
    states: object  # recurrent: (B, H, T, Vd, Kd) every S_t; chunked: (B, H, n_chunks, Vd, Kd) S at each chunk start
    params: object
    form: str
    chunk: int


def param_type_for(beta, gate):
    return PARAM_TYPES[(beta is not None, bool(gate))]


def sigmoid(z):
    """1 / (1 + exp(-z)) without overflow, branch on the real part (complex-step safe)."""
    xp = get_xp(z)
    pos = z.real >= 0
    e = xp.exp(xp.where(pos, -z, z))                                    # real part <= 0
    return xp.where(pos, 1.0 / (1.0 + e), e / (1.0 + e))


def log_sigmoid(z):
    """log sigmoid(z) = -log(1 + exp(-z)) without overflow (branch on the real part)."""
    xp = get_xp(z)
    pos = z.real >= 0
    e = xp.exp(xp.where(pos, -z, z))
    return xp.where(pos, 0.0, z) - xp.log1p(e)


def _proj(E, W):
    """Per-head projection: E (B, T, D), W (H, k, D) -> (B, H, T, k)."""
    return get_xp(E, W).matmul(E[:, None, :, :], W.swapaxes(-1, -2)[None])


def _gate_logits(E, w, b):
    """w . e_t + b per head: (B, H, T)."""
    return get_xp(E, w).einsum("btd,hd->bht", E, w) + b[None, :, None]


def _mv(S, x):
    """S (..., m, n) times x (..., n) -> (..., m)."""
    return get_xp(S, x).matmul(S, x[..., None])[..., 0]


def run_states(S, k, v, beta, alpha, t0, t1):
    """The recursion from state S (before token t0) over tokens t0 .. t1-1: the states
    after each token, (B, H, t1 - t0, Vd, Kd)."""
    xp = get_xp(S, k)
    B, H, _, Kd = k.shape
    out = xp.zeros((B, H, t1 - t0) + S.shape[-2:], dtype=k.dtype)
    for t in range(t0, t1):
        Sh = S if alpha is None else alpha[:, :, t, None, None] * S      # (B, H, Vd, Kd) alpha_t S_{t-1}
        r = v[:, :, t] - _mv(Sh, k[:, :, t])                            # (B, H, Vd) v_t - Sh k_t
        S = Sh + beta[:, :, t, None, None] * r[..., :, None] * k[:, :, t][..., None, :]
        out[:, :, t - t0] = S
    return out


def chunked_outputs(q, k, v, beta, log_alpha, chunk):
    """The chunked (UT-transform) form: (o (B, H, T, Vd), boundary states (B, H, n, Vd, Kd))."""
    xp = get_xp(q, k)
    B, H, T, Kd = k.shape
    Vd = v.shape[-1]
    n = -(-T // chunk)
    S = xp.zeros((B, H, Vd, Kd), dtype=k.dtype)
    o = xp.zeros((B, H, T, Vd), dtype=k.dtype)
    starts = xp.zeros((B, H, n, Vd, Kd), dtype=k.dtype)
    for c in range(n):
        t0, t1 = c * chunk, min(T, (c + 1) * chunk)
        C = t1 - t0
        starts[:, :, c] = S
        Kc, Vc, Qc, bc = k[:, :, t0:t1], v[:, :, t0:t1], q[:, :, t0:t1], beta[:, :, t0:t1]
        lower = np.tril(np.ones((C, C), dtype=bool))                    # i <= t
        if log_alpha is None:
            Gm = xp.asarray(lower.astype(k.real.dtype))                 # (C, C)
            g = xp.ones((B, H, C), dtype=k.dtype)
            g_end = xp.ones((B, H, C), dtype=k.dtype)
        else:
            lg = xp.cumsum(log_alpha[:, :, t0:t1], axis=-1)             # (B, H, C) log g_t
            diff = lg[..., :, None] - lg[..., None, :]                  # (B, H, C, C) log Gm[t, i]
            Gm = xp.exp(xp.where(lower, diff, 0.0)) * lower
            g = xp.exp(lg)
            g_end = xp.exp(lg[..., -1:] - lg)                           # (B, H, C) Gm[C, i]
        KK = xp.matmul(Kc, Kc.swapaxes(-1, -2))                         # (B, H, C, C) k_t . k_i
        L = bc[..., :, None] * Gm * KK * np.tril(np.ones((C, C)), -1)   # strictly lower
        # the UT transform: Tm = (I + L)^{-1} by forward substitution, row by row
        Tm = xp.zeros_like(L)
        eye = np.eye(C)
        for t in range(C):
            Tm[..., t, :] = eye[t] - xp.matmul(L[..., t:t + 1, :t], Tm[..., :t, :])[..., 0, :]
        rhs = bc[..., None] * (Vc - g[..., None] * xp.matmul(Kc, S.swapaxes(-1, -2)))   # (B, H, C, Vd)
        U = xp.matmul(Tm, rhs)                                          # (B, H, C, Vd) pseudo-values u_t
        A = Gm * xp.matmul(Qc, Kc.swapaxes(-1, -2))                     # (B, H, C, C) incl. the diagonal
        o[:, :, t0:t1] = g[..., None] * xp.matmul(Qc, S.swapaxes(-1, -2)) + xp.matmul(A, U)
        S = g[..., -1, None, None] * S + xp.matmul(U.swapaxes(-1, -2), g_end[..., None] * Kc)   # S_end
    return o, starts


def delta_forward(E, params, *, beta=None, gate=False, form="recurrent", chunk=16):
    """Apply one delta rule layer. Returns (out (B, T, D), cache)."""
    check_delta_inputs(E, params, beta, gate, form, chunk)
    xp = get_xp(E, *params)
    B, T, D = E.shape
    q = _proj(E, params.W_Q)                                            # (B, H, T, Kd)
    k = _proj(E, params.W_K)                                            # (B, H, T, Kd)
    v = _proj(E, params.W_V)                                            # (B, H, T, Vd)
    H, Vd, Kd = params.W_V.shape[0], params.W_V.shape[1], params.W_Q.shape[1]
    if beta is None:
        b = sigmoid(_gate_logits(E, params.w_beta, params.b_beta))      # (B, H, T)
    else:
        b = xp.full((B, H, T), beta, dtype=E.dtype)
    za = _gate_logits(E, params.w_alpha, params.b_alpha) if gate else None
    alpha = None if za is None else sigmoid(za)                         # (B, H, T)
    if form == "recurrent":
        states = run_states(xp.zeros((B, H, Vd, Kd), dtype=E.dtype), k, v, b, alpha, 0, T)   # (B, H, T, Vd, Kd)
        o = xp.matmul(states, q[..., None])[..., 0]                     # (B, H, T, Vd) S_t q_t
    else:
        o, states = chunked_outputs(q, k, v, b, None if za is None else log_sigmoid(za), chunk)
    if not bool(xp.isfinite(o).all()):
        raise NonFiniteError("delta layer: the state S_t overflowed (beta_t |k_t|^2 far beyond 2 makes the delta "
                             "rule's step expand): smaller keys or beta")
    delta = xp.matmul(o, params.P.swapaxes(-1, -2)[None]).sum(axis=1)   # (B, T, D)
    out = E + delta
    return out, DeltaCache(E, q, k, v, b, alpha, o, states, params, form, chunk)


def delta_backward(dout, cache):
    """Backward of :func:`delta_forward`: (dE (B, T, D), dparams of the params' type).
    Walks the recurrence in reverse (module docstring)."""
    if not isinstance(cache, DeltaCache):
        raise TypeError(f"cache must be the DeltaCache that delta_forward returned, got {type(cache).__name__}")
    check_dout(dout, cache.E.shape, cache.E.dtype)
    E, q, k, v, b, alpha, o, states, params, form, chunk = cache
    xp = get_xp(dout, E)
    B, T, D = E.shape
    # forward: out = E + delta, delta = sum_h o_h P_h^T
    dE = dout.copy()                                                    # (B, T, D)
    dP = xp.einsum("btd,bhtv->hdv", dout, o)                            # (H, D, Vd)
    do = xp.matmul(dout[:, None], params.P[None])                       # (B, H, T, Vd)
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    db = xp.zeros_like(b)
    da = None if alpha is None else xp.zeros_like(alpha)
    dS = xp.zeros(states.shape[:2] + states.shape[-2:], dtype=E.dtype)   # (B, H, Vd, Kd) adjoint of S_t
    zero = xp.zeros_like(dS)
    bounds = [(0, T)] if form == "recurrent" else [(c * chunk, min(T, (c + 1) * chunk))
                                                   for c in range(states.shape[2])]
    for ci in range(len(bounds) - 1, -1, -1):
        t0, t1 = bounds[ci]
        if form == "recurrent":
            seg = states                                                # S_t for t in [0, T)
        else:                                                           # recompute the chunk from its start
            seg = run_states(states[:, :, ci], k, v, b, alpha, t0, t1)
        for t in range(t1 - 1, t0 - 1, -1):
            S_t = seg[:, :, t - t0]
            S_prev = (seg[:, :, t - t0 - 1] if t > t0 else
                      (zero if form == "recurrent" else states[:, :, ci]))
            kt, vt = k[:, :, t], v[:, :, t]
            # forward: o_t = S_t q_t, so dS_t += do_t q_t^T and dq_t = S_t^T do_t
            dS = dS + do[:, :, t][..., :, None] * q[:, :, t][..., None, :]
            dq[:, :, t] = _mv(S_t.swapaxes(-1, -2), do[:, :, t])
            # forward: Sh = alpha_t S_{t-1}; r = v_t - Sh k_t; S_t = Sh + beta_t r k_t^T
            Sh = S_prev if alpha is None else alpha[:, :, t, None, None] * S_prev
            r = vt - _mv(Sh, kt)                                        # (B, H, Vd)
            dSk = _mv(dS, kt)                                           # (B, H, Vd) dS_t k_t
            db[:, :, t] = (r * dSk).sum(axis=-1)                        # dbeta_t = r . (dS_t k_t)
            dr = b[:, :, t, None] * dSk                                 # (B, H, Vd)
            dk[:, :, t] = b[:, :, t, None] * _mv(dS.swapaxes(-1, -2), r) - _mv(Sh.swapaxes(-1, -2), dr)
            dv[:, :, t] = dr
            dSh = dS - dr[..., :, None] * kt[..., None, :]              # (B, H, Vd, Kd)
            if alpha is None:
                dS = dSh
            else:
                da[:, :, t] = (dSh * S_prev).sum(axis=(-1, -2))         # dalpha_t = <dSh, S_{t-1}>
                dS = alpha[:, :, t, None, None] * dSh
    # forward: q, k, v = E W^T per head
    grads = {"W_Q": xp.einsum("bhtk,btd->hkd", dq, E), "W_K": xp.einsum("bhtk,btd->hkd", dk, E),
             "W_V": xp.einsum("bhtv,btd->hvd", dv, E), "P": dP}
    dE += (xp.matmul(dq, params.W_Q[None]) + xp.matmul(dk, params.W_K[None])
           + xp.matmul(dv, params.W_V[None])).sum(axis=1)
    # forward: beta = sigmoid(w_beta . e + b_beta), alpha = sigmoid(w_alpha . e + b_alpha)
    for name, val, dval in (("beta", b, db), ("alpha", alpha, da)):
        if hasattr(params, f"w_{name}"):
            dz = dval * val * (1.0 - val)                               # (B, H, T)
            grads[f"w_{name}"] = xp.einsum("bht,btd->hd", dz, E)        # (H, D)
            grads[f"b_{name}"] = dz.sum(axis=(0, 2))                    # (H,)
            dE += xp.einsum("bht,hd->btd", dz, getattr(params, f"w_{name}"))
    return dE, type(params)(**{f: grads[f] for f in type(params)._fields})


# ---- checks, init and the layer type ---------------------------------------------------------

def check_delta_params(params, beta=None, gate=False):
    """Shapes, dtypes and finiteness; the params' type must fit (beta, gate). Returns D."""
    want = param_type_for(beta, gate)
    if not isinstance(params, want):
        raise TypeError(f"delta params must be {want.__name__} for beta={beta!r}, gate={gate!r}, "
                        f"got {type(params).__name__}")
    D = check_factored_shapes(params)
    H = params.W_Q.shape[0]
    for name in ("beta", "alpha"):
        if hasattr(params, f"w_{name}"):
            check_array(f"w_{name}", getattr(params, f"w_{name}"), shape=(H, D), finite=False)
            check_array(f"b_{name}", getattr(params, f"b_{name}"), shape=(H,), finite=False)
    check_same_dtype(**params._asdict())
    check_all_finite(params._fields, params)
    return D


def check_delta_options(beta, gate, form, chunk):
    if beta is not None:
        check_float("beta", beta, 0.0, allow_equal_min=False)
    if not isinstance(gate, bool):
        raise TypeError(f"delta option gate must be a bool, got {gate!r}")
    if form not in FORMS:
        raise ValueError(f"delta option form must be one of {FORMS}, got {form!r}")
    check_int("chunk", chunk, 1)


def check_delta_inputs(E, params, beta, gate, form, chunk):
    """Raise unless :func:`delta_forward` can run on tokens E (B, T, D) with ``params``."""
    check_data("E", E, dims=("B", "T", "D"))
    check_delta_options(beta, gate, form, chunk)
    D = check_delta_params(params, beta, gate)
    if E.shape[2] != D:
        raise ValueError(f"E must have token width D={D} to match the delta params, got shape {tuple(E.shape)}")
    check_same_dtype(E=E, W_Q=params.W_Q)


class Delta(LayerType):
    """Layer kind ``"delta"``. Options: ``beta`` (None: learned per token; a float: fixed
    step size) and ``gate`` (the Gated DeltaNet decay) change the function and the
    parameters' type; ``form`` and ``chunk`` how it is computed; ``heads``,
    ``key_size``, ``value_size`` (None: D) shape the parameters. Always causal."""

    kind = "delta"
    OPTIONS = {"beta": None, "gate": False, "form": "recurrent", "chunk": 16,
               "heads": 1, "key_size": None, "value_size": None}
    PARAM_OPTIONS = ("heads", "key_size", "value_size")

    def check_options(self, options):
        o = super().check_options(options)
        check_delta_options(o["beta"], o["gate"], o["form"], o["chunk"])
        if o["beta"] is not None:
            o["beta"] = float(o["beta"])
        o["chunk"] = int(o["chunk"])
        check_head_options(o)
        return o

    def param_type(self, *, beta=None, gate=False, **_):
        return param_type_for(beta, gate)

    def init(self, rng, D_in, settings, *, beta=None, gate=False, heads=1, key_size=None, value_size=None, **_):
        """LSA's draws for W_Q, W_K, W_V, P (``init_lsa_params``); then w_beta, w_alpha
        normal with std sqrt(scale / K / D), b_beta = 0 (beta = 1/2 at e = 0) and
        b_alpha = ALPHA_BIAS_INIT."""
        p = init_lsa_params(rng, D_in, H=heads, key_size=key_size, value_size=value_size,
                            n_layers_for_scale=settings.n_layers, scale=settings.scale, dtype=settings.dtype,
                            xp=settings.xp)
        std = np.sqrt(settings.scale / settings.n_layers / D_in)
        extra = {}
        for name, b0, used in (("beta", 0.0, beta is None), ("alpha", ALPHA_BIAS_INIT, gate)):
            if used:
                extra[f"w_{name}"] = settings.xp.asarray((std * rng.standard_normal((heads, D_in))).astype(settings.dtype))
                extra[f"b_{name}"] = settings.xp.full(heads, b0, dtype=settings.dtype)
        return param_type_for(beta, gate)(*p, **extra)

    def forward(self, E, params, *, beta=None, gate=False, form="recurrent", chunk=16):
        return delta_forward(E, params, beta=beta, gate=gate, form=form, chunk=chunk)

    def backward(self, dout, cache):
        return delta_backward(dout, cache)

    def oracle(self, E, params, *, beta=None, gate=False, form="recurrent", chunk=16):
        from ..oracle import oracle_delta_layer

        return oracle_delta_layer(E, params, beta=beta)

    def cache_floats(self, T, D_in, *, beta=None, gate=False, form="recurrent", chunk=16, heads=1, key_size=None,
                     value_size=None):
        """q, k (H T Kd), v, o (H T Vd), beta (H T), alpha (H T, gated), out (T D), and
        the states: every S_t (H T Vd Kd, recurrent) or one per chunk (chunked)."""
        Kd = D_in if key_size is None else key_size
        Vd = D_in if value_size is None else value_size
        n_states = T if form == "recurrent" else -(-T // chunk)
        per_head = 2 * T * Kd + 2 * T * Vd + T * (2 if gate else 1) + n_states * Vd * Kd
        return heads * per_head + T * D_in

    def check_params(self, params, D_in, *, beta=None, gate=False, **_):
        D = check_delta_params(params, beta, gate)
        if D != D_in:
            raise ValueError(f"delta params have token width D={D}, the layer's input has width {D_in}")

    def param_floats(self, D_in, *, beta=None, gate=False, heads=1, key_size=None, value_size=None, **_):
        """LSA's W_Q, W_K, W_V, P; (w_beta, b_beta) when beta is learned, (w_alpha,
        b_alpha) with a gate: H (D + 1) each."""
        n = attention_param_floats(D_in, heads, D_in if key_size is None else key_size,
                                   D_in if value_size is None else value_size)
        return n + heads * (D_in + 1) * ((beta is None) + bool(gate))
