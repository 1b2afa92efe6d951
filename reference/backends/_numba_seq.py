"""Sequence training (the mesa paper's lds task) on the Numba backend: causal LSA stacks
with the sequence loss, every token read (private).

The readable spec is ``reference/sequences.py`` (tokens, mask, the loss with its
per-time-step terms, ``seq_loss_and_grads``) with ``reference/seq_training.py`` (the
step: ``seq_train_step``); this module computes the same function and is tested against
it (``tests/test_numba_seq.py``). What is different from the reference, and why it is
exact:

* the layers are the fused LSA kernels' causal full layers (``_numba_layers``:
  ``causal_full_forward`` / ``causal_full_backward``, attention form in merged weights
  A_h = P_h W_V,h, B_h = W_K,h^T W_Q,h, token clip), on blocks of L sequences with the
  sequence as the innermost ("lane") axis. The regression driver (``_numba_step``) runs
  its last layer for the query token only; here every layer, the last included, runs on
  every token, since the sequence readout reads the first d channels of every token t;
* the loss L = (1/(B T)) sum_{b,t} 1/2 ||y_hat_t - y_t||^2 and the per-time-step terms
  l_t are summed in float64 per chunk (a fixed partition of the batch, added in chunk
  order: results do not depend on the thread count); the backward starts from
  dout_t = (y_hat_t - y_t) / (B T) in the first d channels, 0 elsewhere;
* tokens ``code_tokens(X)`` and the input mask are built on the host (cheap); the
  update is the reference's own ``optim.adam_apply`` (element-wise clip, AdamW) on the
  gradients of the factored parameters (``numba_backend.factored_grads``).

:func:`seq_reason` says which Archs this path computes: uniform stacks of causal ``lsa``
layers (one clip value, any heads, key and value sizes, weight tying). Everything else
(the mesa layer, non-causal or mixed stacks) is refused with the reason and trains on the
NumPy reference.
"""

import numpy as np
from numba import njit, prange

from . import _numba_layers as K_
from ._lsa_stack import lsa_stack_reason
from ._numba_step import n_chunks_for
from .config import DRIVER, KERNEL, LANES, STRICT


def seq_reason(arch, backend="numba"):
    """None when the sequence kernels compute ``arch`` (a uniform causal LSA stack), else
    the reason."""
    reason = lsa_stack_reason(arch, backend)
    if reason is not None:
        return (f"the {backend} backend's sequence kernels run uniform stacks of causal 'lsa' layers; "
                f"{reason.split('; ', 1)[-1] if 'layer kinds' in reason else reason}")
    if arch.option("causal") is not True:
        return (f"the {backend} backend's sequence kernels run causal 'lsa' layers only; this stack has "
                "causal=False (use backend 'numpy', the reference)")
    return None


@njit(**STRICT)
def _pack(E_in, Y_in, b0, nvalid, E0, Yb):
    """Lanes l < nvalid of E0 (T, D, L), Yb (T, d, L) from sequences b0 + l; zeros after."""
    T, D, L = E0.shape
    d = Yb.shape[1]
    E0[:] = 0
    Yb[:] = 0
    for t in range(T):
        for a in range(D):
            e = E0[t, a]
            for l in range(nvalid):
                e[l] = E_in[b0 + l, t, a]
        for a in range(d):
            y = Yb[t, a]
            for l in range(nvalid):
                y[l] = Y_in[b0 + l, t, a]


@njit(**DRIVER)
def seq_batch(E_in, Y_in, A, Bm, lidx, has_clip, clipv, BT, L, n_chunks, need_grad, need_pred,
              per_t_out, dA_acc, dB_acc, pred_out):
    """Forward, sequence loss and backward of the K causal layers on sequences E_in
    (B, T, D) (masked tokens) against Y_in (B, T, d). A, Bm (Lp, H, D, D) merged weights
    per parameter layer; lidx (K,) the parameter layer of each layer; ``BT`` = B T in the
    dtype. Outputs: per_t_out (n_chunks, T) float64 sums of 1/2 ||err_t||^2;
    dA_acc, dB_acc (n_chunks, Lp, H, D, D) float64 sums of dL/dA, dL/dB; pred_out
    (B, T, d) (need_pred)."""
    K = lidx.shape[0]
    H = A.shape[1]
    D = A.shape[2]
    B, T, _ = E_in.shape
    d = Y_in.shape[2]
    dt = A.dtype
    n_blocks = (B + L - 1) // L
    for ch in prange(n_chunks):
        blk0 = ch * n_blocks // n_chunks
        blk1 = (ch + 1) * n_blocks // n_chunks
        Ein = np.empty((K + 1, T, D, L), dt)                   # layer inputs; Ein[k+1] = out of layer k
        Pre = np.empty((K, T, D, L), dt)
        Qs = np.empty((K, H, T, D, L), dt)
        Ss = np.empty((K, H, T, T, L), dt)
        Os = np.empty((K, H, T, D, L), dt)
        Yb = np.empty((T, d, L), dt)
        dEa = np.empty((T, D, L), dt)
        dEb = np.empty((T, D, L), dt)
        dO = np.empty((T, D, L), dt)
        dQ = np.empty((T, D, L), dt)
        dS = np.empty((T, T, L), dt)
        tA = np.empty((D, T, L), dt)
        tB = np.empty((D, T, L), dt)
        ET = np.empty((D, T, L), dt)
        per_t = per_t_out[ch]
        for blk in range(blk0, blk1):
            b0 = blk * L
            nvalid = min(L, B - b0)
            _pack(E_in, Y_in, b0, nvalid, Ein[0], Yb)
            for k in range(K):
                p = lidx[k]
                K_.causal_full_forward(Ein[k], A[p], Bm[p], has_clip, clipv, Qs[k], Ss[k], Os[k], Pre[k], Ein[k + 1])
            # readout y_hat_t = out_t[:d]; loss terms 1/2 ||y_hat_t - y_t||^2
            out = Ein[K]
            dEa[:] = 0
            for t in range(T):
                acc = 0.0
                for a in range(d):
                    o = out[t, a]
                    y = Yb[t, a]
                    g = dEa[t, a]
                    for l in range(nvalid):
                        err = o[l] - y[l]
                        acc += 0.5 * np.float64(err) * np.float64(err)
                        # backward: L = sum 1/2 err^2 / (B T), so dout_t[:d] = err / (B T)
                        g[l] = err / BT
                        if need_pred:
                            pred_out[b0 + l, t, a] = o[l]
                per_t[t] += acc
            if not need_grad:
                continue
            cur = dEa
            nxt = dEb
            for k in range(K - 1, -1, -1):
                p = lidx[k]
                K_.causal_full_backward(cur, Ein[k], A[p], Bm[p], has_clip, clipv, Qs[k], Ss[k], Os[k], Pre[k],
                                        k > 0, nxt, dA_acc[ch, p], dB_acc[ch, p], dO, dS, dQ, tA, tB, ET)
                tswap = cur
                cur = nxt
                nxt = tswap


def lanes(B):
    """Sequences per block: ``ICGD_NUMBA_LANES`` if set, else the largest of 64, 32, 16, 8
    that leaves at least 4 blocks (the batch of 256: 64; a block's arrays are laid out per
    lane, and longer lane runs vectorise better). Depends on B only, never on the thread
    count, so the partition and the sums' order are fixed."""
    if LANES:
        return LANES
    for L in (64, 32, 16):
        if B >= 4 * L:
            return L
    return 8


def loss_and_merged_grads(E, Y, A, Bm, lidx, clip, need_grad=True, need_pred=False):
    """(L in float64, per_t (T,) float64, dA, dB float64 (Lp, H, D, D), pred (B, T, d) or
    None) of the stack on masked tokens E (B, T, D) against Y (B, T, d). Unchecked."""
    dt = np.dtype(E.dtype)
    B, T, D = E.shape
    L = lanes(B)
    nch = n_chunks_for((B + L - 1) // L)
    per_t = np.zeros((nch, T))
    dA = np.zeros((nch,) + A.shape)
    dB = np.zeros((nch,) + A.shape)
    pred = np.empty(Y.shape if need_pred else (1, 1, 1), dt)
    seq_batch(np.ascontiguousarray(E), np.ascontiguousarray(Y), A, Bm, lidx, clip is not None,
              dt.type(0.0 if clip is None else clip), dt.type(B * T), L, nch, need_grad, need_pred,
              per_t, dA, dB, pred)
    per_t = per_t.sum(axis=0) / B
    return float(per_t.mean()), per_t, dA.sum(axis=0), dB.sum(axis=0), (pred if need_pred else None)


# ============================================================ factored heads, stacked ====
# The path for factored parameters (``merged=False``, the lds configs): per layer the
# heads' projections are stacked, W_Q (H K, D), W_K (H K, D), W_V (H V, D) and
# P_all (D, H V) with P_all[:, h V + v] = P_h[:, v], and a block's tokens are kept
# feature-major, E (D, T, L), so each projection is one shared-left product over all
# T L columns (``_numba_layers.sl``):
#
#     q = W_Q e,  k = W_K e,  v = W_V e                       (H K | H K | H V, T, L)
#     s_h[j, i] = q_h,j . k_h,i  (i <= j),   o_h,j = sum_{i <= j} s_h[j, i] v_h,i
#     pre = e + P_all o,   out = clip(pre)
#
# the reference's layer (``reference.layers.lsa``) with only the causal half of S formed.

@njit(**KERNEL)
def heads_forward(Q, Kk, V, H, Kd, Vd, S, O):
    """s_h[j, i] and o_h,j for i <= j (S (H, T, T, L): the upper half is not written)."""
    T = Q.shape[1]
    L = Q.shape[2]
    for h in range(H):
        for j in range(T):
            for i in range(j + 1):
                s = S[h, j, i]
                for l in range(L):
                    s[l] = 0
                for k in range(Kd):
                    q = Q[h * Kd + k, j]
                    kk = Kk[h * Kd + k, i]
                    for l in range(L):
                        s[l] += q[l] * kk[l]
            for v in range(Vd):
                o = O[h * Vd + v, j]
                for l in range(L):
                    o[l] = 0
                for i in range(j + 1):
                    s = S[h, j, i]
                    vv = V[h * Vd + v, i]
                    for l in range(L):
                        o[l] += s[l] * vv[l]


@njit(**KERNEL)
def heads_backward(dO, Q, Kk, V, S, H, Kd, Vd, dS, dQ, dK, dV):
    """Backward of :func:`heads_forward` from dO (H V, T, L): dQ, dK (H K, T, L), dV
    (H V, T, L). Scratch dS (T, T, L)."""
    T = Q.shape[1]
    L = Q.shape[2]
    for h in range(H):
        # forward: o_j = sum_{i<=j} s[j, i] v_i, so ds[j, i] = do_j . v_i and dv_i = sum_{j>=i} s[j, i] do_j
        for j in range(T):
            for i in range(j + 1):
                ds = dS[j, i]
                for l in range(L):
                    ds[l] = 0
                for v in range(Vd):
                    g = dO[h * Vd + v, j]
                    vv = V[h * Vd + v, i]
                    for l in range(L):
                        ds[l] += g[l] * vv[l]
        for v in range(Vd):
            for i in range(T):
                dv = dV[h * Vd + v, i]
                for l in range(L):
                    dv[l] = 0
                for j in range(i, T):
                    s = S[h, j, i]
                    g = dO[h * Vd + v, j]
                    for l in range(L):
                        dv[l] += s[l] * g[l]
        # forward: s[j, i] = q_j . k_i, so dq_j = sum_{i<=j} ds[j, i] k_i and dk_i = sum_{j>=i} ds[j, i] q_j
        for k in range(Kd):
            for j in range(T):
                dq = dQ[h * Kd + k, j]
                for l in range(L):
                    dq[l] = 0
                for i in range(j + 1):
                    ds = dS[j, i]
                    kk = Kk[h * Kd + k, i]
                    for l in range(L):
                        dq[l] += ds[l] * kk[l]
            for i in range(T):
                dk = dK[h * Kd + k, i]
                for l in range(L):
                    dk[l] = 0
                for j in range(i, T):
                    ds = dS[j, i]
                    q = Q[h * Kd + k, j]
                    for l in range(L):
                        dk[l] += ds[l] * q[l]


@njit(**STRICT)
def _pack_fm(E_in, Y_in, b0, nvalid, E0, Yb):
    """Lanes l < nvalid of E0 (D, T, L) (feature-major), Yb (T, d, L); zeros after."""
    D, T, L = E0.shape
    d = Yb.shape[1]
    E0[:] = 0
    Yb[:] = 0
    for a in range(D):
        for t in range(T):
            e = E0[a, t]
            for l in range(nvalid):
                e[l] = E_in[b0 + l, t, a]
    for t in range(T):
        for a in range(d):
            y = Yb[t, a]
            for l in range(nvalid):
                y[l] = Y_in[b0 + l, t, a]


@njit(**DRIVER)
def seq_batch_factored(E_in, Y_in, WQ, WK, WV, PA, H, Kd, Vd, lidx, has_clip, clipv, BT, L, n_chunks, need_grad,
                       need_pred, per_t_out, gQ, gK, gV, gP, pred_out):
    """:func:`seq_batch` for stacked factored heads: WQ, WK (Lp, H Kd, D), WV (Lp, H Vd, D),
    PA (Lp, D, H Vd). Gradient sums (float64, per chunk): gQ, gK (n_chunks, Lp, H Kd, D),
    gV (n_chunks, Lp, H Vd, D), gP (n_chunks, Lp, D, H Vd)."""
    K = lidx.shape[0]
    D = WQ.shape[2]
    HK = WQ.shape[1]
    HV = WV.shape[1]
    B, T, _ = E_in.shape
    d = Y_in.shape[2]
    dt = WQ.dtype
    n_blocks = (B + L - 1) // L
    TL = T * L
    for ch in prange(n_chunks):
        blk0 = ch * n_blocks // n_chunks
        blk1 = (ch + 1) * n_blocks // n_chunks
        Ein = np.empty((K + 1, D, T, L), dt)
        Pre = np.empty((K, D, T, L), dt)
        Qs = np.empty((K, HK, T, L), dt)
        Ks = np.empty((K, HK, T, L), dt)
        Vs = np.empty((K, HV, T, L), dt)
        Os = np.empty((K, HV, T, L), dt)
        Ss = np.empty((K, H, T, T, L), dt)
        Yb = np.empty((T, d, L), dt)
        dEa = np.empty((D, T, L), dt)
        dEb = np.empty((D, T, L), dt)
        dO = np.empty((HV, T, L), dt)
        dV = np.empty((HV, T, L), dt)
        dQ = np.empty((HK, T, L), dt)
        dK = np.empty((HK, T, L), dt)
        dS = np.empty((T, T, L), dt)
        per_t = per_t_out[ch]
        for blk in range(blk0, blk1):
            b0 = blk * L
            nvalid = min(L, B - b0)
            _pack_fm(E_in, Y_in, b0, nvalid, Ein[0], Yb)
            for k in range(K):
                p = lidx[k]
                E2 = Ein[k].reshape((D, TL))
                K_.sl(WQ[p], E2, Qs[k].reshape((HK, TL)), False)
                K_.sl(WK[p], E2, Ks[k].reshape((HK, TL)), False)
                K_.sl(WV[p], E2, Vs[k].reshape((HV, TL)), False)
                heads_forward(Qs[k], Ks[k], Vs[k], H, Kd, Vd, Ss[k], Os[k])
                Pre[k] = Ein[k]
                K_.sl(PA[p], Os[k].reshape((HV, TL)), Pre[k].reshape((D, TL)), True)
                K_.clip_into(Pre[k], Ein[k + 1], has_clip, clipv)
            out = Ein[K]
            dEa[:] = 0
            for t in range(T):
                acc = 0.0
                for a in range(d):
                    o = out[a, t]
                    y = Yb[t, a]
                    g = dEa[a, t]
                    for l in range(nvalid):
                        err = o[l] - y[l]
                        acc += 0.5 * np.float64(err) * np.float64(err)
                        # backward: L = sum 1/2 err^2 / (B T), so dout_t[:d] = err / (B T)
                        g[l] = err / BT
                        if need_pred:
                            pred_out[b0 + l, t, a] = o[l]
                per_t[t] += acc
            if not need_grad:
                continue
            cur = dEa
            nxt = dEb
            for k in range(K - 1, -1, -1):
                p = lidx[k]
                # forward: out = clip(pre)
                K_.clip_mask_inplace(cur, Pre[k], has_clip, clipv)
                # forward: pre = e + P_all o, so dP_all = sum dpre o^T and do = P_all^T dpre
                K_.gacc(cur, Os[k], gP[ch, p])
                K_.sl(PA[p].T, cur.reshape((D, TL)), dO.reshape((HV, TL)), False)
                heads_backward(dO, Qs[k], Ks[k], Vs[k], Ss[k], H, Kd, Vd, dS, dQ, dK, dV)
                # forward: q = W_Q e (k, v alike), so dW_Q = sum dq e^T and de += W_Q^T dq
                K_.gacc(dQ, Ein[k], gQ[ch, p])
                K_.gacc(dK, Ein[k], gK[ch, p])
                K_.gacc(dV, Ein[k], gV[ch, p])
                if k > 0:
                    nxt[:] = cur                                       # the residual
                    n2 = nxt.reshape((D, TL))
                    K_.sl(WQ[p].T, dQ.reshape((HK, TL)), n2, True)
                    K_.sl(WK[p].T, dK.reshape((HK, TL)), n2, True)
                    K_.sl(WV[p].T, dV.reshape((HV, TL)), n2, True)
                    tswap = cur
                    cur = nxt
                    nxt = tswap


def factored_loss_and_grads(E, Y, params, lidx, clip, need_grad=True, need_pred=False):
    """(L float64, per_t (T,) float64, grads (LSAParams per parameter set, dtype of E),
    pred or None) of a causal LSA stack with factored params on masked tokens E (B, T, D)
    against Y (B, T, d). Unchecked."""
    from ..layers.lsa import LSAParams

    dt = np.dtype(E.dtype)
    B, T, D = E.shape
    H = max(p.W_Q.shape[0] for p in params)
    Kd = max(p.W_Q.shape[1] for p in params)
    Vd = max(p.W_V.shape[1] for p in params)
    Lp = len(params)
    WQ = np.zeros((Lp, H, Kd, D), dt)
    WK = np.zeros((Lp, H, Kd, D), dt)
    WV = np.zeros((Lp, H, Vd, D), dt)
    PA = np.zeros((Lp, D, H, Vd), dt)
    for i, p in enumerate(params):                                     # zero padding adds nothing
        h, kd, vd = p.W_Q.shape[0], p.W_Q.shape[1], p.W_V.shape[1]
        WQ[i, :h, :kd] = p.W_Q
        WK[i, :h, :kd] = p.W_K
        WV[i, :h, :vd] = p.W_V
        PA[i, :, :h, :vd] = np.swapaxes(p.P, 0, 1)                    # P_all[:, h V + v] = P_h[:, v]
    WQ, WK, WV = (a.reshape(Lp, H * a.shape[2], D) for a in (WQ, WK, WV))
    PA = PA.reshape(Lp, D, H * Vd)
    L = lanes(B)
    nch = n_chunks_for((B + L - 1) // L)
    per_t = np.zeros((nch, T))
    gQ = np.zeros((nch,) + WQ.shape)
    gK = np.zeros((nch,) + WK.shape)
    gV = np.zeros((nch,) + WV.shape)
    gP = np.zeros((nch,) + PA.shape)
    pred = np.empty(Y.shape if need_pred else (1, 1, 1), dt)
    seq_batch_factored(np.ascontiguousarray(E), np.ascontiguousarray(Y), WQ, WK, WV, PA, H, Kd, Vd, lidx,
                       clip is not None, dt.type(0.0 if clip is None else clip), dt.type(B * T), L, nch, need_grad,
                       need_pred, per_t, gQ, gK, gV, gP, pred)
    per_t = per_t.sum(axis=0) / B
    grads = None
    if need_grad:
        gQ, gK, gV = (g.sum(axis=0).reshape(Lp, H, -1, D) for g in (gQ, gK, gV))
        gP = np.swapaxes(gP.sum(axis=0).reshape(Lp, D, H, Vd), 1, 2)   # (Lp, H, D, Vd)
        grads = []
        for i, p in enumerate(params):
            h, kd, vd = p.W_Q.shape[0], p.W_Q.shape[1], p.W_V.shape[1]
            grads.append(LSAParams(gQ[i, :h, :kd].astype(dt), gK[i, :h, :kd].astype(dt), gV[i, :h, :vd].astype(dt),
                                   np.ascontiguousarray(gP[i, :h, :, :vd]).astype(dt)))
        grads = tuple(grads)
    return float(per_t.mean()), per_t, grads, (pred if need_pred else None)
