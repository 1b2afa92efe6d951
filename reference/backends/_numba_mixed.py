"""Mixed stacks on the Numba backend: forward and hand-written backward of any order of
the layer kinds ``embed``, ``mlp``, ``lsa``, ``softmax``, ``gd``, ``posenc`` and
``pre_ln`` (around lsa, softmax or mlp), with weight tying (private).

The readable spec is ``reference/layers/`` with ``reference/model.py``; this module
computes the same function and is tested against it and the loop oracle
(``tests/test_numba_mixed.py`` and the conformance suite). The uniform LSA stacks keep
their own fused kernels (``_numba_step``); ``numba_backend`` routes only the other
Archs here. What is different from the reference, and why it is exact:

* attention in merged form, for lsa, gd and softmax alike. Per head h, with
  A_h = P_h W_V,h and B_h = W_K,h^T W_Q,h (times 1/sqrt(Kd) for softmax):

      u_j = B_h e_j,   s_ji = e_i . u_j  (i in ctx(j)),   a_j = s_j (lsa) or softmax(s_j)
      w_j = sum_i a_ji e_i,   pre_j = r_j + sum_h A_h w_j

  which is the reference's q_j . k_i = e_i^T W_K^T W_Q e_j with the products
  reassociated (r = the residual: the layer input, or the un-normalised tokens of a
  pre-LN block). Gradients of factored parameters by the chain rule
  (``numba_backend.factored_grads``). One kernel per direction, a ``prange`` over tasks;
* only what the readout reads: the readout takes the query token after the last layer,
  so from the last attention layer on (from the first layer when there is none) only
  the query row is computed: the last attention layer still reads every row as keys
  and values, its output and every later (token-wise) layer run on the query row only.
  The other rows' outputs never reach the loss, so loss and gradients are unchanged;
  ``model_forward`` computes every row;
* token-wise linear maps (embed, the MLP's two matrices) run on every row of the batch
  (B T rows, or B query rows) through one shared matrix (:func:`rows_times`), in Numba
  like everything else, so no second threading runtime (BLAS) competes with Numba's
  threads. Weight gradients are summed in the dtype over a few rows at a time and
  flushed into per-chunk float64 accumulators, added in chunk order (a fixed partition:
  results do not depend on the thread count);
* an embedding that widens narrow tokens followed by a plain MLP runs as one op: the
  MLP's first product is taken at the tokens' width r through W_1 W_e (exact algebra:
  h = W_1 (W_e x + b_e) + b_1), and the embedding's and MLP's gradients come from
  sums at width r (see the section "embedding then MLP, fused");
* GELU and its derivative in one pass, the derivative kept for the backward: the tanh
  form takes NumPy's tanh (the reference's; vectorised, far faster than a scalar libm
  call per entry) of an argument computed here; the erf form uses ``math.erf`` (the
  reference's series agrees with it to 4e-15). LayerNorm forward and backward per
  token in Numba;
* softmax logits that are not finite are refused with the reference's
  ``NonFiniteError``: when a norm bound cannot exclude an overflow, the reference's own
  logits of that layer are formed and checked.

Layers this module does not know (any other registered kind) are refused by
:func:`mixed_reason` naming the layer; nothing is computed for them.
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..layers.embed import EmbedParams
from ..layers.gd import gd_weights
from ..layers.lsa import LSAParams, MergedParams
from ..layers.mlp import MLPParams
from ..layers.posenc import positional_encoding
from ..layers.pre_ln import block_spec, split_params
from ..layers.softmax import SoftmaxParams, check_logits
from . import _numba_layers as K_
from .config import DRIVER, KERNEL

KINDS = ("embed", "mlp", "lsa", "softmax", "gd", "posenc", "pre_ln")
ATTENTION = ("lsa", "softmax", "gd")


def mixed_reason(arch, backend):
    """None when every layer of ``arch`` is a kind this module computes, else the reason
    naming the first layer it does not."""
    for k, s in enumerate(arch.layers):
        if s.kind not in KINDS:
            return (f"the {backend} backend's mixed-stack kernels compute the layer kinds {list(KINDS)}; layer {k} "
                    f"has kind {s.kind!r} (use backend 'numpy', the reference)")
    return None


def _is_attention(spec):
    return spec.kind in ATTENTION or (spec.kind == "pre_ln" and spec.opts["block"] in ("lsa", "softmax"))


def _n_chunks(n):
    """A fixed partition of n tasks or rows into chunks (not the thread count), 8 at most."""
    return max(1, min(n, 8))


# =================================================================== Numba kernels ====

@njit(**DRIVER)
def attention_forward(X, R, A, Bm, softmax, causal, q0, has_clip, clipv, out, pre, S, U, W, bad):
    """Rows j = q0 .. T-1 of one attention layer in merged form (module docstring).

    X (B, T, D) the layer's (normalised) input, read as queries, keys and values; R
    (B, T, D) the residual; A, Bm (H, D, D). Writes, for jr = j - q0: pre, out (B, Tq, D);
    S (B, H, Tq, T) the attention weights a_ji (0 beyond ctx(j)); U, W (B, H, Tq, D)
    u_j and w_j; bad[b] = True where a softmax logit is not finite.
    """
    B, T, D = X.shape
    H = A.shape[0]
    Tq = T - q0
    zero = np.zeros(1, X.dtype)[0]
    for b in prange(B):
        for jr in range(Tq):
            j = q0 + jr
            nk = j + 1 if causal else T - 1
            for a in range(D):
                pre[b, jr, a] = R[b, j, a]
            for h in range(H):
                u = U[b, h, jr]
                s = S[b, h, jr]
                w = W[b, h, jr]
                # u = Bm e_j
                for a in range(D):
                    acc = zero
                    for c in range(D):
                        acc += Bm[h, a, c] * X[b, j, c]
                    u[a] = acc
                # s_i = e_i . u
                for i in range(nk):
                    acc = zero
                    for c in range(D):
                        acc += X[b, i, c] * u[c]
                    s[i] = acc
                for i in range(nk, T):
                    s[i] = zero
                if softmax:
                    # a = softmax(s) over ctx(j), max-subtracted
                    m = s[0]
                    for i in range(nk):
                        if not np.isfinite(s[i]):
                            bad[b] = True
                        if s[i] > m:
                            m = s[i]
                    tot = zero
                    for i in range(nk):
                        e = np.exp(s[i] - m)
                        s[i] = e
                        tot += e
                    for i in range(nk):
                        s[i] = s[i] / tot
                # w = sum_i a_i e_i
                for c in range(D):
                    w[c] = zero
                for i in range(nk):
                    si = s[i]
                    for c in range(D):
                        w[c] += si * X[b, i, c]
                # pre_j += A w
                for a in range(D):
                    acc = zero
                    for c in range(D):
                        acc += A[h, a, c] * w[c]
                    pre[b, jr, a] += acc
            for a in range(D):
                v = pre[b, jr, a]
                if has_clip:
                    if v > clipv:
                        v = clipv
                    elif v < -clipv:
                        v = -clipv
                out[b, jr, a] = v


@njit(**DRIVER)
def attention_backward(dout, X, pre, S, U, W, A, Bm, softmax, causal, q0, has_clip, clipv, n_chunks,
                       dX, dpre, dA_acc, dB_acc):
    """Backward of :func:`attention_forward`, walking it in reverse. dout (B, Tq, D).
    Writes dpre (B, Tq, D) (the residual's gradient, clip mask applied), dX (B, T, D)
    (the gradient of X through queries, keys and values, residual excluded) and adds
    dL/dA, dL/dBm into the float64 accumulators dA_acc, dB_acc (n_chunks, H, D, D)."""
    B, T, D = X.shape
    H = A.shape[0]
    Tq = T - q0
    dt = X.dtype
    zero = np.zeros(1, dt)[0]
    for ch in prange(n_chunks):
        b0 = ch * B // n_chunks
        b1 = (ch + 1) * B // n_chunks
        dw = np.empty(D, dt)
        r = np.empty(D, dt)
        ds = np.empty(T, dt)
        dAc = dA_acc[ch]
        dBc = dB_acc[ch]
        for b in range(b0, b1):
            for i in range(T):
                for c in range(D):
                    dX[b, i, c] = zero
            for jr in range(Tq):
                j = q0 + jr
                nk = j + 1 if causal else T - 1
                # forward: out = clip(pre), so dpre = dout where -c <= pre <= c, else 0
                for a in range(D):
                    g = dout[b, jr, a]
                    if has_clip and (pre[b, jr, a] > clipv or pre[b, jr, a] < -clipv):
                        g = zero
                    dpre[b, jr, a] = g
                g = dpre[b, jr]
                for h in range(H):
                    u = U[b, h, jr]
                    s = S[b, h, jr]
                    w = W[b, h, jr]
                    # forward: pre_j += A w, so dA += g w^T and dw = A^T g
                    for c in range(D):
                        dw[c] = zero
                    for a in range(D):
                        ga = g[a]
                        if ga != 0:
                            for c in range(D):
                                dAc[h, a, c] += np.float64(ga) * np.float64(w[c])
                                dw[c] += A[h, a, c] * ga
                    # forward: w = sum_i a_i e_i, so da_i = dw . e_i (and de_i += a_i dw below)
                    for i in range(nk):
                        acc = zero
                        for c in range(D):
                            acc += dw[c] * X[b, i, c]
                        ds[i] = acc
                    # forward: a = softmax(s), so ds = a * (da - sum_k a_k da_k)
                    if softmax:
                        dot = zero
                        for i in range(nk):
                            dot += s[i] * ds[i]
                        for i in range(nk):
                            ds[i] = s[i] * (ds[i] - dot)
                    # forward: s_i = e_i . u, so de_i += ds_i u and du = sum_i ds_i e_i
                    for c in range(D):
                        r[c] = zero
                    for i in range(nk):
                        si = s[i]
                        di = ds[i]
                        for c in range(D):
                            dX[b, i, c] += si * dw[c] + di * u[c]
                            r[c] += di * X[b, i, c]
                    # forward: u = Bm e_j, so dBm += du e_j^T and de_j += Bm^T du
                    for a in range(D):
                        ra = r[a]
                        for c in range(D):
                            dBc[h, a, c] += np.float64(ra) * np.float64(X[b, j, c])
                            dX[b, j, c] += Bm[h, a, c] * ra


@njit(**DRIVER)
def rows_times(X, M, bias, has_bias, mul, has_mul, out):
    """out[r] = (sum_c X[r, c] M[c] (+ bias)) (* mul[r]) for X (R, C), M (C, O): every
    row of a batch through one shared matrix (X W^T with M = W^T; dout W with M = W),
    blocks of rows in parallel, each block one ``_numba_layers.sl`` product (vectorised
    over O, four rows of M per pass)."""
    R = X.shape[0]
    O = M.shape[1]
    n = max(1, min(R // 64, 64))
    zero = np.zeros(1, X.dtype)[0]
    for ch in prange(n):
        r0 = ch * R // n
        r1 = (ch + 1) * R // n
        for r in range(r0, r1):
            for k in range(O):
                out[r, k] = bias[k] if has_bias else zero
        K_.sl(X[r0:r1], M, out[r0:r1], True)
        if has_mul:
            for r in range(r0, r1):
                for k in range(O):
                    out[r, k] *= mul[r, k]


@njit(**KERNEL)
def _flush(part, partb, acc, acc_b, colsum):
    O, C = part.shape
    for o in range(O):
        for c in range(C):
            acc[o, c] += part[o, c]
            part[o, c] = 0
        if colsum:
            acc_b[o] += partb[o]
        partb[o] = 0


@njit(**DRIVER)
def outer_sum(G, X, n_chunks, flush, acc, colsum, acc_b):
    """acc[ch] += sum_r G[r]^T X[r] and (colsum) acc_b[ch] += sum_r G[r] over the rows of
    chunk ch (a fixed partition), four rows per pass: partial sums in the dtype over
    ``flush`` rows at a time, added into the float64 accumulators acc (n_chunks, O, C),
    acc_b (n_chunks, O)."""
    R, O = G.shape
    C = X.shape[1]
    dt = G.dtype
    for ch in prange(n_chunks):
        r0 = ch * R // n_chunks
        r1 = (ch + 1) * R // n_chunks
        part = np.zeros((O, C), dt)
        partb = np.zeros(O, dt)
        cnt = 0
        r = r0
        while r + 4 <= r1:
            x0 = X[r]
            x1 = X[r + 1]
            x2 = X[r + 2]
            x3 = X[r + 3]
            for o in range(O):
                g0 = G[r, o]
                g1 = G[r + 1, o]
                g2 = G[r + 2, o]
                g3 = G[r + 3, o]
                po = part[o]
                for c in range(C):
                    po[c] += g0 * x0[c] + g1 * x1[c] + g2 * x2[c] + g3 * x3[c]
                partb[o] += (g0 + g1) + (g2 + g3)
            r += 4
            cnt += 4
            if cnt >= flush:
                _flush(part, partb, acc[ch], acc_b[ch], colsum)
                cnt = 0
        while r < r1:
            x0 = X[r]
            for o in range(O):
                g0 = G[r, o]
                po = part[o]
                for c in range(C):
                    po[c] += g0 * x0[c]
                partb[o] += g0
            r += 1
        _flush(part, partb, acc[ch], acc_b[ch], colsum)


@njit(**DRIVER)
def gelu_tanh_arg(h, consts, y):
    """y = sqrt(2/pi) (x + 0.044715 x^3) for x = h, the argument of the tanh GELU (0 where
    |x| > 10, where GELU saturates); rows in parallel. consts: :func:`_gelu_consts`."""
    R, w = h.shape
    k0, k1, sat = consts[0], consts[1], consts[6]
    zero = np.zeros(1, h.dtype)[0]
    for r in prange(R):
        for c in range(w):
            x = h[r, c]
            y[r, c] = k0 * (x + k1 * x * x * x) if (x <= sat and x >= -sat) else zero


@njit(**DRIVER)
def gelu_finish(h, t, erf_form, consts):
    """In place: h <- gelu(h) and t <- gelu'(h), given t = tanh(gelu_tanh_arg(h)) (tanh
    form; NumPy's tanh, the reference's) or anything (erf form: math.erf here);
    ``reference.layers.mlp``'s formulas, saturated beyond |x| > 10."""
    R, w = h.shape
    k0, k2, k3, half, one, sat, k4 = consts[0], consts[2], consts[3], consts[4], consts[5], consts[6], consts[7]
    zero = one - one
    for r in prange(R):
        for c in range(w):
            x = h[r, c]
            if x > sat:
                t[r, c] = one
            elif x < -sat:
                h[r, c] = zero
                t[r, c] = zero
            elif erf_form:
                ef = math.erf(x * k2)
                h[r, c] = half * x * (one + ef)
                t[r, c] = half * (one + ef) + x * np.exp(-half * x * x) * k3
            else:
                tt = t[r, c]
                h[r, c] = half * x * (one + tt)
                t[r, c] = half * (one + tt) + half * x * (one - tt * tt) * k0 * (one + k4 * x * x)


@njit(**DRIVER)
def layernorm_forward(X, scale, offset, eps, inv_D, n, xhat, rstd):
    """n = LN(x) per row of X (R, D) (``reference.layers.layernorm``: biased variance);
    keeps xhat (R, D) and rstd (R,). eps and inv_D = 1/D in the dtype."""
    R, D = X.shape
    zero = np.zeros(1, X.dtype)[0]
    one = zero + 1
    for r in prange(R):
        mu = zero
        for c in range(D):
            mu += X[r, c]
        mu = mu * inv_D
        var = zero
        for c in range(D):
            xc = X[r, c] - mu
            var += xc * xc
        var = var * inv_D
        rs = one / np.sqrt(var + eps)
        rstd[r] = rs
        for c in range(D):
            xh = (X[r, c] - mu) * rs
            xhat[r, c] = xh
            n[r, c] = xh * scale[c] + offset[c]


@njit(**DRIVER)
def layernorm_backward(dn, xhat, rstd, scale, inv_D, n_chunks, dX, dscale_acc, doffset_acc):
    """Backward of :func:`layernorm_forward`: dX (R, D) = rstd (g - mean g - xhat
    mean(g xhat)) with g = dn * scale; dscale, doffset summed into the float64
    accumulators (n_chunks, D)."""
    R, D = dn.shape
    zero = np.zeros(1, dn.dtype)[0]
    for ch in prange(n_chunks):
        r0 = ch * R // n_chunks
        r1 = (ch + 1) * R // n_chunks
        for r in range(r0, r1):
            mg = zero
            mgx = zero
            for c in range(D):
                # forward: n = scale * xhat + offset
                dscale_acc[ch, c] += np.float64(dn[r, c]) * np.float64(xhat[r, c])
                doffset_acc[ch, c] += dn[r, c]
                g = dn[r, c] * scale[c]
                mg += g
                mgx += g * xhat[r, c]
            mg = mg * inv_D
            mgx = mgx * inv_D
            # forward: xhat = (x - mu) rstd, mu and var functions of x
            for c in range(D):
                dX[r, c] = rstd[r] * (dn[r, c] * scale[c] - mg - xhat[r, c] * mgx)


# =============================================================== NumPy-side helpers ====

FLUSH_ROWS = {4: 64, 8: 1 << 30}     # rows summed in the dtype before a float64 flush, by item size


def linear(X2, M, bias=None, mul=None):
    """(sum_c X2[r, c] M[c] (+ bias)) (* mul) for every row (kernel :func:`rows_times`)."""
    out = np.empty((X2.shape[0], M.shape[1]), X2.dtype)
    dummy = np.zeros((1, 1), X2.dtype)
    rows_times(X2, np.ascontiguousarray(M), bias if bias is not None else dummy[0], bias is not None,
               mul if mul is not None else dummy, mul is not None, out)
    return out


def gram(G2, X2, colsum=False):
    """(sum_r G2[r]^T X2[r], sum_r G2[r] or None) in float64 (kernel :func:`outer_sum`,
    whose inner loop runs over the wider of the two)."""
    R, O = G2.shape
    if X2.shape[1] < O:
        C = X2.shape[1]
        if colsum:                                                     # a column of ones gives sum_r G2[r]
            X2 = np.concatenate([X2, np.ones((R, 1), X2.dtype)], axis=1)
        acc = gram(X2, G2)[0]                                          # (C (+ 1), O)
        return acc[:C].T, (acc[C] if colsum else None)
    n = _n_chunks(R)
    acc = np.zeros((n, O, X2.shape[1]))
    acc_b = np.zeros((n, O))
    outer_sum(G2, X2, n, FLUSH_ROWS[G2.dtype.itemsize], acc, colsum, acc_b)
    return acc.sum(axis=0), (acc_b.sum(axis=0) if colsum else None)


def _clip(pre, clip):
    return pre if clip is None else np.clip(pre, -clip, clip)


def _clip_mask(dout, pre, clip):
    return dout if clip is None else dout * ((pre >= -clip) & (pre <= clip))


# ------------------------------------------------------------------ attention layers --

class AttnWeights(NamedTuple):
    A: object         # (H, D, D) dtype, P W_V per head
    Bm: object        # (H, D, D) dtype, W_K^T W_Q per head (times scale)
    scale: float      # 1/sqrt(Kd) for softmax, 1 for lsa and gd
    softmax: bool
    causal: bool


def attention_weights(kind, p, opts, D, T, dt):
    """Merged weights of an lsa, softmax or gd layer (its params p; its options)."""
    if kind == "gd":
        p = gd_weights(D, T, opts["eta"], opts["d_y"], np.float64)
        causal = False
    else:
        causal = opts["causal"]
    if isinstance(p, MergedParams):
        A, Bm, scale = p.W_PV.astype(np.float64), p.W_KQ.astype(np.float64), 1.0
    else:
        W_Q, W_K, W_V, P = (a.astype(np.float64) for a in p)
        scale = 1.0 / math.sqrt(W_Q.shape[1]) if kind == "softmax" else 1.0
        A = np.matmul(P, W_V)                                          # (H, D, D)
        Bm = np.matmul(np.swapaxes(W_K, -1, -2), W_Q) * scale          # (H, D, D)
    return AttnWeights(np.ascontiguousarray(A, dt), np.ascontiguousarray(Bm, dt), scale, kind == "softmax", causal)


def attention_param_grads(kind, p, dA, dB, scale, dt):
    """Gradients of the layer's own parameters from dL/dA, dL/dBm (float64 (H, D, D))."""
    from .numba_backend import factored_grads                        # its chain rule (imports this module)

    if kind == "gd":
        return None
    if isinstance(p, MergedParams):
        return MergedParams(dB.astype(dt), dA.astype(dt))
    # forward: Bm = scale W_K^T W_Q, so dL/d(W_K^T W_Q) = scale dBm
    g = factored_grads((LSAParams(*p),), dA[None], (scale * dB)[None], dt)[0]
    return SoftmaxParams(*g) if kind == "softmax" else g


def check_softmax_logits(X, p, kind, causal):
    """Raise the reference's NonFiniteError when a logit of this softmax layer would not be
    finite: a norm bound first (|q . k| <= |W_Q| |W_K| |e|^2, Frobenius norms over all
    heads), the reference's own logits when the bound cannot decide."""
    if kind != "softmax":
        return
    quarter = 0.25 * float(np.finfo(X.dtype).max)
    with np.errstate(over="ignore"):
        emax = float(np.sqrt(np.max(np.sum(X.astype(np.float64) ** 2, axis=-1))))
        nq = float(np.linalg.norm(p.W_Q.astype(np.float64)))
        nk = float(np.linalg.norm(p.W_K.astype(np.float64)))
        bounds = (emax * emax * nq * nk, emax * nq * nk, emax * nq, emax * nk)
    if max(bounds) < quarter:
        return
    Ec = X if causal else X[:, : X.shape[1] - 1]                        # the reference's key rows
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.matmul(X[:, None], np.swapaxes(p.W_Q, -1, -2)[None])
        k = np.matmul(Ec[:, None], np.swapaxes(p.W_K, -1, -2)[None])
        Z = np.matmul(q, np.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(p.W_Q.shape[1]))
    check_logits(Z)


class AttnCache(NamedTuple):
    X: object
    pre: object
    S: object
    U: object
    W: object
    w: AttnWeights
    q0: int
    clip: object


def attn_forward(X, R, w, q0, clip):
    """One attention layer on rows q0 .. T-1 (kernel :func:`attention_forward`)."""
    B, T, D = X.shape
    H = w.A.shape[0]
    Tq = T - q0
    dt = X.dtype
    out = np.empty((B, Tq, D), dt)
    pre = np.empty((B, Tq, D), dt)
    S = np.empty((B, H, Tq, T), dt)
    U = np.empty((B, H, Tq, D), dt)
    W = np.empty((B, H, Tq, D), dt)
    bad = np.zeros(B, np.bool_)
    attention_forward(X, R, w.A, w.Bm, w.softmax, w.causal, q0, clip is not None,
                      dt.type(0.0 if clip is None else clip), out, pre, S, U, W, bad)
    if bad.any():
        check_logits(np.array([np.inf]))                               # the reference's NonFiniteError
    return out, AttnCache(X, pre, S, U, W, w, q0, clip)


def attn_backward(dout, c):
    """(dX (B, T, D), dpre (B, Tq, D), dA, dBm float64 (H, D, D)) of :func:`attn_forward`."""
    B, T, D = c.X.shape
    H = c.w.A.shape[0]
    dt = c.X.dtype
    nch = _n_chunks(B)
    dX = np.empty((B, T, D), dt)
    dpre = np.empty(dout.shape, dt)
    dA = np.zeros((nch, H, D, D))
    dB = np.zeros((nch, H, D, D))
    attention_backward(np.ascontiguousarray(dout), c.X, c.pre, c.S, c.U, c.W, c.w.A, c.w.Bm, c.w.softmax,
                       c.w.causal, c.q0, c.clip is not None, dt.type(0.0 if c.clip is None else c.clip), nch,
                       dX, dpre, dA, dB)
    return dX, dpre, dA.sum(axis=0), dB.sum(axis=0)


# ------------------------------------------------------------------------ the MLP ----

class MLPCache(NamedTuple):
    X2: object     # (R, D) block input rows
    a: object      # (R, w) gelu(h)
    gp: object     # (R, w) gelu'(h)
    pre: object    # (R, D)
    clip: object


def _gelu_consts(dt):
    return np.array([math.sqrt(2.0 / math.pi), 0.044715, 1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0 * math.pi),
                     0.5, 1.0, 10.0, 3.0 * 0.044715], dt)


def mlp_forward(X, R, p, opts, first=None):
    """Residual MLP on rows: pre = R + gelu(X W_1^T + b_1) W_2^T + b_2, out = clip(pre).
    ``first`` = (M_1 (C, w), c_1 (w,) or None): h = X M_1 + c_1 instead (the fused
    embedding, :func:`embed_mlp_forward`)."""
    shape = R.shape
    D = shape[-1]
    dt = X.dtype
    X2 = X.reshape(-1, X.shape[-1])
    bias = isinstance(p, MLPParams)
    consts = _gelu_consts(dt)
    M_1, c_1 = (p.W_1.T, p.b_1 if bias else None) if first is None else first
    a = linear(X2, M_1, c_1)                                           # (R, w) h = X W_1^T + b_1
    gp = np.empty_like(a)
    erf_form = opts["gelu"] == "erf"
    if not erf_form:
        gelu_tanh_arg(a, consts, gp)
        np.tanh(gp, out=gp)                                            # NumPy's tanh, as the reference's
    gelu_finish(a, gp, erf_form, consts)                               # a = gelu(h), gp = gelu'(h)
    pre = linear(a, p.W_2.T, p.b_2 if bias else None)                  # (R, D) delta = a W_2^T + b_2
    pre += R.reshape(-1, D)                                            # pre = R + delta
    return _clip(pre, opts["clip"]).reshape(shape), MLPCache(X2, a, gp, pre, opts["clip"])


def mlp_backward(dout, c, p, need_dX, first_T=None, sum_dh=False):
    """(dX or None, dpre, float64 grads by field name) of :func:`mlp_forward`; with
    ``first_T`` (= M_1^T) the "W_1" entry is sum_r dh^T X and dX = dh M_1^T (the fused
    embedding's); ``sum_dh``: "b_1" = sum_r dh even without biases."""
    D = c.pre.shape[1]
    bias = isinstance(p, MLPParams)
    # forward: out = clip(pre)
    dpre = np.ascontiguousarray(_clip_mask(dout.reshape(-1, D), c.pre, c.clip))   # (R, D)
    # forward: delta = a W_2^T + b_2, so dW_2 = sum dpre^T a, db_2 = sum dpre, da = dpre W_2
    g = {}
    g["W_2"], db_2 = gram(dpre, c.a, bias)
    # forward: a = gelu(h), so dh = da * gelu'(h)
    dh = linear(dpre, p.W_2, mul=c.gp)                                 # (R, w)
    # forward: h = X W_1^T + b_1, so dW_1 = sum dh^T X, db_1 = sum dh, dX = dh W_1
    g["W_1"], db_1 = gram(dh, c.X2, bias or sum_dh)
    if bias:
        g["b_2"] = db_2
    if bias or sum_dh:
        g["b_1"] = db_1
    dX = linear(dh, p.W_1 if first_T is None else first_T) if need_dX else None
    return dX, dpre, g


# -------------------------------------------------------- embedding then MLP, fused ----
# A bias-free or biased embedding e = W_e x + b_e of narrow tokens x (width r < D) followed
# by a residual MLP computes h = W_1 e + b_1 = (W_1 W_e) x + (W_1 b_e + b_1): the first
# product at width r instead of D. Backward with G = sum dh x^T and g_1 = sum dh:
# dW_1 = sum dh e^T = G W_e^T + g_1 b_e^T; the MLP's input gradient de = dpre + dh W_1 is
# never formed: dW_e = sum de x^T = sum dpre x^T + W_1^T G, db_e = sum dpre + W_1^T g_1,
# dx = de W_e = dpre W_e + dh (W_1 W_e).

def fusable_embed_mlp(L, L_next, D_in):
    """True when layer L (an embed of tokens of width D_in) and L_next (a plain mlp) run
    as one fused op: the embedding widens the tokens."""
    return (L.kind == "embed" and L_next is not None and L_next.kind == "mlp"
            and L.opts["width"] is not None and D_in < L.opts["width"])


def embed_mlp_forward(x, pe, pm, opts):
    """embed (params pe) then mlp (params pm) on tokens x (B, t, r): (out, cache)."""
    B, t, r = x.shape
    dt = x.dtype
    x2 = x.reshape(-1, r)
    e_bias = isinstance(pe, EmbedParams)
    W_e = pe.W.astype(np.float64)                                      # (D, r)
    W_1 = pm.W_1.astype(np.float64)                                    # (w, D)
    M_1 = W_1 @ W_e                                                    # (w, r)
    c_1 = pm.b_1.astype(np.float64) if isinstance(pm, MLPParams) else np.zeros(W_1.shape[0])
    if e_bias:
        c_1 = c_1 + W_1 @ pe.b.astype(np.float64)
    has_c = e_bias or isinstance(pm, MLPParams)
    e = linear(x2, pe.W.T, pe.b if e_bias else None)                   # (R, D) the embedding: the residual
    M_1 = np.ascontiguousarray(M_1.astype(dt))
    first = (np.ascontiguousarray(M_1.T), c_1.astype(dt) if has_c else None)
    out, c = mlp_forward(x2, e, pm, opts, first=first)
    return out.reshape(B, t, -1), ("embed_mlp", c, x.shape, M_1)


def embed_mlp_backward(dout, cache, pe, pm, acc_e, acc_m, need_dx):
    """Backward of :func:`embed_mlp_forward`: adds both layers' gradients (float64) into
    acc_e, acc_m; returns dx (B, t, r) or None."""
    _, c, shape, M_1 = cache
    e_bias = isinstance(pe, EmbedParams)
    dX_h, dpre, g = mlp_backward(dout, c, pm, need_dx, first_T=M_1, sum_dh=e_bias)
    G = g.pop("W_1")                                                   # (w, r) sum dh x^T
    W_e = pe.W.astype(np.float64)
    W_1 = pm.W_1.astype(np.float64)
    dW_1 = G @ W_e.T                                                   # (w, D)
    if e_bias:
        dW_1 += np.outer(g["b_1"], pe.b.astype(np.float64))
    _add(acc_m, "W_1", dW_1)
    for name in pm._fields:
        if name in g:
            _add(acc_m, name, g[name])
    dW_e, db_e = gram(dpre, c.X2, e_bias)                              # sum dpre x^T, sum dpre
    _add(acc_e, "W", dW_e + W_1.T @ G)
    if e_bias:
        _add(acc_e, "b", db_e + W_1.T @ g["b_1"])
    if not need_dx:
        return None
    return (linear(dpre, pe.W) + dX_h).reshape(shape)


# ------------------------------------------------------------------ the model ----

class Layer(NamedTuple):
    k: int
    kind: str            # the op: a kind of KINDS
    block: str           # the block kind of a pre_ln layer, else the kind
    opts: dict           # the options (a pre_ln block's: its block options)
    ln_eps: object       # pre_ln: LayerNorm's eps; else None
    clip: object         # the clip after the residual


def _layers(arch):
    out = []
    for k, s in enumerate(arch.layers):
        o = s.opts
        if s.kind == "pre_ln":
            bspec = block_spec(o["block"], o["block_options"])
            out.append(Layer(k, "pre_ln", bspec.kind, bspec.opts, o["eps"], o["clip"]))
        else:
            out.append(Layer(k, s.kind, s.kind, o, None, o.get("clip")))
    return out


class Forward(NamedTuple):
    out: object          # (B, Tq, D_K) the last layer's output rows
    caches: list
    q_rows: int          # rows after the query-only point (1) or T


def forward(E, params, arch, *, full):
    """The K layers on tokens E (B, T, D). ``full``: every row of every layer; else rows
    as the module docstring says (the last output holds the query row only)."""
    B, T, _ = E.shape
    layers = _layers(arch)
    att = [L.k for L in layers if _is_attention(arch.layers[L.k])]
    qk = 0 if full else (att[-1] if att else 0)       # first layer whose output is the query row only
    x = np.ascontiguousarray(E)
    if not full and not att:
        x = np.ascontiguousarray(x[:, T - 1:])                          # only token-wise layers: the query row
    caches = []
    for L in layers:
        p = params[arch.tie[L.k]]
        if caches and caches[-1][0] == "embed_head":                  # the mlp of a fused pair: done
            caches.append(fused)
            continue
        nxt = layers[L.k + 1] if L.k + 1 < len(layers) else None
        if fusable_embed_mlp(L, nxt, x.shape[2]):
            x, fused = embed_mlp_forward(x, p, params[arch.tie[L.k + 1]], {"gelu": nxt.opts["gelu"],
                                                                            "clip": nxt.clip})
            caches.append(("embed_head",))
            continue
        q0 = T - 1 if (not full and L.k == qk and L.block in ATTENTION) else 0
        x, c = _layer_forward(L, x, p, T, q0)
        caches.append(c)
    return Forward(x, caches, x.shape[1])


def _layer_forward(L, x, p, T, q0):
    dt = x.dtype
    B, t, D = x.shape
    if L.kind == "embed":
        out = linear(x.reshape(-1, D), p.W.T, p.b if isinstance(p, EmbedParams) else None)   # (R, D_out)
        return out.reshape(B, t, -1), ("embed", x)
    if L.kind == "posenc":
        mode, width = L.opts["mode"], L.opts["width"]
        P = D if (mode == "add" or width is None) else width
        pe = positional_encoding(T, P).astype(dt)[T - t:]             # rows of these tokens' positions
        if mode == "add":
            return x + pe, ("posenc", D, mode)
        return np.concatenate([x, np.broadcast_to(pe, (B, t, P))], axis=2), ("posenc", D, mode)
    ln = None
    if L.kind == "pre_ln":
        scale, offset, p = split_params(p)
        n = np.empty_like(x)
        xhat = np.empty_like(x)
        rstd = np.empty(B * t, dt)
        layernorm_forward(x.reshape(-1, D), scale, offset, dt.type(L.ln_eps), dt.type(1.0 / D), n.reshape(-1, D),
                          xhat.reshape(-1, D), rstd)
        ln = (xhat, rstd, scale)
        X = n
    else:
        X = x
    if L.block == "mlp":
        out, c = mlp_forward(X, x, p, {"gelu": L.opts["gelu"], "clip": L.clip})
        return out, ("mlp", c, ln)
    check_softmax_logits(X, p, L.block, L.opts.get("causal", False))
    w = attention_weights(L.block, p, L.opts, D, T, dt)
    out, c = attn_forward(X, x, w, q0, L.clip)
    return out, ("attn", c, ln)


def backward(dout, fwd, params, arch, *, need_dE):
    """Walk the layers in reverse from dout (the gradient of fwd.out). Returns (dE or
    None, float64 gradient accumulators per parameter set)."""
    layers = _layers(arch)
    acc = [dict() for _ in range(arch.n_param_layers)]
    dx = dout
    for L in reversed(layers):
        i = arch.tie[L.k]
        cache = fwd.caches[L.k]
        if cache[0] == "embed_head":                                   # done with its mlp, below
            continue
        if cache[0] == "embed_mlp":
            j = arch.tie[L.k - 1]
            dx = embed_mlp_backward(dx, cache, params[j], params[i], acc[j], acc[i], need_dE or L.k > 1)
            continue
        dx = _layer_backward(L, dx, cache, params[i], acc[i], need_dE or L.k > 0)
    return dx, acc


def _add(acc, name, g):
    acc[name] = g if name not in acc else acc[name] + g


def _layer_backward(L, dout, cache, p, acc, need_dX):
    tag = cache[0]
    if tag == "embed":
        x = cache[1]
        B, t, D = x.shape
        d2 = np.ascontiguousarray(dout).reshape(-1, dout.shape[-1])
        bias = isinstance(p, EmbedParams)
        # forward: out = x W^T + b, so dW = sum dout^T x, db = sum dout, dx = dout W
        dW, db = gram(d2, x.reshape(-1, D), bias)
        _add(acc, "W", dW)
        if bias:
            _add(acc, "b", db)
        return linear(d2, p.W).reshape(B, t, D) if need_dX else None
    if tag == "posenc":
        _, D, mode = cache
        # forward: out = x + pe, or [x, pe]
        return dout if mode == "add" else np.ascontiguousarray(dout[:, :, :D])
    _, c, ln = cache
    block_p = split_params(p)[2] if L.kind == "pre_ln" else p
    need_branch_dX = need_dX or ln is not None
    if tag == "mlp":
        dX, dpre, g = mlp_backward(dout, c, block_p, need_branch_dX)
        for name, v in g.items():
            _add(acc, name, v)
        shape = dout.shape
        dpre = dpre.reshape(shape)
        dX = None if dX is None else dX.reshape(shape)
    else:
        dX, dpre, dA, dB = attn_backward(dout, c)
        _add(acc, "dA", dA)
        _add(acc, "dB", dB)
        acc["_attn"] = (L.block, block_p, c.w.scale)
        q0 = c.q0
        if q0:                                                         # the residual reaches the query row only
            full = np.zeros_like(dX)
            full[:, q0:] = dpre
            dpre = full
    if ln is None:
        # forward: pre = x + branch(x): dx = dpre + dX
        return dpre + dX if need_dX else None
    # forward: pre = x + branch(LN(x)): dx = dpre + LN backward of dX
    xhat, rstd, scale = ln
    B, t, D = xhat.shape
    dt = xhat.dtype
    nch = _n_chunks(B * t)
    dxl = np.empty_like(xhat)
    dsc = np.zeros((nch, D))
    doff = np.zeros((nch, D))
    layernorm_backward(np.ascontiguousarray(dX).reshape(-1, D), xhat.reshape(-1, D), rstd, scale, dt.type(1.0 / D), nch,
                       dxl.reshape(-1, D), dsc, doff)
    _add(acc, "ln_scale", dsc.sum(axis=0))
    _add(acc, "ln_offset", doff.sum(axis=0))
    return dpre + dxl if need_dX else None


def param_grads(acc, params, arch, dt):
    """Gradients of the params' types, in ``dt``, from the float64 accumulators."""
    out = []
    for i, spec in enumerate(arch.param_specs()):
        p, a = params[i], acc[i]
        if spec.kind in ("posenc", "gd"):
            out.append(type(p)())
            continue
        block_p = split_params(p)[2] if spec.kind == "pre_ln" else p
        if "_attn" in a:
            kind, bp, scale = a["_attn"]
            bg = attention_param_grads(kind, bp, a["dA"], a["dB"], scale, dt)
        else:
            bg = type(block_p)(*(a[f].astype(dt) for f in block_p._fields))
        if spec.kind == "pre_ln":
            out.append(type(p)(a["ln_scale"].astype(dt), a["ln_offset"].astype(dt), *bg))
        else:
            out.append(bg)
    return tuple(out)


def model_forward(E, params, arch):
    """Every token after the last layer (unchecked; the caller checked the inputs)."""
    return forward(E, params, arch, full=True).out


def loss_and_grads(E, y_q, params, arch, d_y, *, need_grad=True, need_dE=True):
    """(L, grads or None, pred (B, d_y), dE (B, T, D) or None) of the model on tokens E
    against y_q; the readout is minus the last d_y features of the query token (every
    layout's). Unchecked: the caller ran the reference's checks."""
    dt = E.dtype
    B, T, D0 = E.shape
    fwd = forward(E, params, arch, full=False)
    out_q = fwd.out[:, -1]                                             # (B, D_K) the query token
    pred = -out_q[:, out_q.shape[1] - d_y:]                            # (B, d_y)
    err = pred - y_q                                                   # (B, d_y)
    L = (err * err).sum(axis=1).mean() * dt.type(0.5)                 # the reference's loss, in dt
    if not need_grad:
        return L, None, pred, None
    # backward: dpred = err / B; pred = -out_q[-d_y:]
    dout = np.zeros(fwd.out.shape, dt)                                 # (B, Tq, D_K)
    dout[:, -1, out_q.shape[1] - d_y:] = -(err / B)
    dx, acc = backward(dout, fwd, params, arch, need_dE=need_dE)
    grads = param_grads(acc, params, arch, dt)
    dE = None
    if need_dE:
        if dx.shape[1] == T:
            dE = dx
        else:                                                          # only token-wise layers: the query row
            dE = np.zeros((B, T, D0), dt)
            dE[:, T - 1:] = dx
    return L, grads, pred, dE
