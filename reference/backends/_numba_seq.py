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
* mesa layers (form "sm", no forgetting; section "mesa layers" below) in the same
  blocks, the reference's guards included;
* tokens ``code_tokens(X)`` and the input mask are built on the host (cheap); the
  update is the reference's own ``optim.adam_apply`` (element-wise clip, AdamW) on the
  gradients of the factored parameters (``numba_backend.factored_grads``).

:func:`seq_reason` says which Archs this path computes: uniform stacks of causal ``lsa``
layers (one clip value, any heads, key and value sizes, weight tying) and stacks of mesa
layers with form "sm" and no forgetting. Everything else (other mesa forms, forgetting,
non-causal or mixed stacks) is refused with the reason and trains on the NumPy reference.
"""

import numpy as np
from numba import njit, prange

from . import _numba_layers as K_
from ._lsa_stack import lsa_stack_reason
from ._numba_step import n_chunks_for
from .config import DRIVER, KERNEL, LANES, STRICT


def seq_reason(arch, backend="numba"):
    """None when the sequence kernels compute ``arch`` (a uniform causal LSA stack, or a
    stack of mesa layers with form "sm" and no forgetting), else the reason."""
    kinds = sorted(set(arch.kinds()))
    if kinds == ["mesa"]:
        for name, want in (("form", "sm"), ("forget", None)):
            vals = [s.opts[name] for s in arch.layers]
            if any(v != want for v in vals):
                return (f"the {backend} backend's sequence kernels run mesa layers with {name}={want!r} only, got "
                        f"{vals} (use backend 'numpy', the reference)")
        return None
    reason = lsa_stack_reason(arch, backend)
    if reason is not None:
        return (f"the {backend} backend's sequence kernels run uniform stacks of causal 'lsa' layers or of mesa "
                f"layers; {reason.split('; ', 1)[-1] if 'layer kinds' in reason else reason}")
    if arch.option("causal") is not True:
        return (f"the {backend} backend's sequence kernels run causal 'lsa' layers only; this stack has "
                "causal=False (use backend 'numpy', the reference)")
    return None


def is_mesa(arch):
    return set(arch.kinds()) == {"mesa"}


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


@njit(**KERNEL)
def _loss_block(out, Yb, b0, nvalid, BT, need_pred, pred_out, per_t, dEa):
    """Readout y_hat_t = out[:d, t] (out (D, T, L)), per_t[t] += sum 1/2 err^2 (float64),
    dEa (D, T, L) = err / (B T) in the first d channels, 0 elsewhere."""
    T, d, L = Yb.shape
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
            _loss_block(Ein[K], Yb, b0, nvalid, BT, need_pred, pred_out, per_t, dEa)
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


def _stack_heads(params, dt):
    """WQ, WK (Lp, H Kd, D), WV (Lp, H Vd, D), PA (Lp, D, H Vd) in ``dt``, every parameter
    set zero-padded to the largest H, Kd, Vd (zero rows and columns add nothing)."""
    D = params[0].W_Q.shape[2]
    H = max(p.W_Q.shape[0] for p in params)
    Kd = max(p.W_Q.shape[1] for p in params)
    Vd = max(p.W_V.shape[1] for p in params)
    Lp = len(params)
    WQ = np.zeros((Lp, H, Kd, D), dt)
    WK = np.zeros((Lp, H, Kd, D), dt)
    WV = np.zeros((Lp, H, Vd, D), dt)
    PA = np.zeros((Lp, D, H, Vd), dt)
    for i, p in enumerate(params):
        h, kd, vd = p.W_Q.shape[0], p.W_Q.shape[1], p.W_V.shape[1]
        WQ[i, :h, :kd] = p.W_Q
        WK[i, :h, :kd] = p.W_K
        WV[i, :h, :vd] = p.W_V
        PA[i, :, :h, :vd] = np.swapaxes(p.P, 0, 1)                    # P_all[:, h V + v] = P_h[:, v]
    WQ, WK, WV = (a.reshape(Lp, H * a.shape[2], D) for a in (WQ, WK, WV))
    return WQ, WK, WV, PA.reshape(Lp, D, H * Vd), H, Kd, Vd


def _unstack_grads(params, gQ, gK, gV, gP, H, Vd, dt):
    """Per parameter set (W_Q, W_K, W_V, P) gradients in ``dt`` from the per-chunk float64 sums."""
    Lp, D = len(params), gQ.shape[-1]
    gQ, gK, gV = (g.sum(axis=0).reshape(Lp, H, -1, D) for g in (gQ, gK, gV))
    gP = np.swapaxes(gP.sum(axis=0).reshape(Lp, D, H, Vd), 1, 2)       # (Lp, H, D, Vd)
    out = []
    for i, p in enumerate(params):
        h, kd, vd = p.W_Q.shape[0], p.W_Q.shape[1], p.W_V.shape[1]
        out.append((gQ[i, :h, :kd].astype(dt), gK[i, :h, :kd].astype(dt), gV[i, :h, :vd].astype(dt),
                    np.ascontiguousarray(gP[i, :h, :, :vd]).astype(dt)))
    return out


def _buffers(B, T, Y, WQ, WK, WV, PA, dt, need_pred):
    L = lanes(B)
    nch = n_chunks_for((B + L - 1) // L)
    bufs = dict(per_t=np.zeros((nch, T)), gQ=np.zeros((nch,) + WQ.shape), gK=np.zeros((nch,) + WK.shape),
                gV=np.zeros((nch,) + WV.shape), gP=np.zeros((nch,) + PA.shape),
                pred=np.empty(Y.shape if need_pred else (1, 1, 1), dt))
    return L, nch, bufs


def factored_loss_and_grads(E, Y, params, lidx, clip, need_grad=True, need_pred=False):
    """(L float64, per_t (T,) float64, grads (LSAParams per parameter set, dtype of E),
    pred or None) of a causal LSA stack with factored params on masked tokens E (B, T, D)
    against Y (B, T, d). Unchecked."""
    from ..layers.lsa import LSAParams

    dt = np.dtype(E.dtype)
    B, T, D = E.shape
    WQ, WK, WV, PA, H, Kd, Vd = _stack_heads(params, dt)
    L, nch, b = _buffers(B, T, Y, WQ, WK, WV, PA, dt, need_pred)
    seq_batch_factored(np.ascontiguousarray(E), np.ascontiguousarray(Y), WQ, WK, WV, PA, H, Kd, Vd, lidx,
                       clip is not None, dt.type(0.0 if clip is None else clip), dt.type(B * T), L, nch, need_grad,
                       need_pred, b["per_t"], b["gQ"], b["gK"], b["gV"], b["gP"], b["pred"])
    per_t = b["per_t"].sum(axis=0) / B
    grads = None
    if need_grad:
        grads = tuple(LSAParams(*g) for g in _unstack_grads(params, b["gQ"], b["gK"], b["gV"], b["gP"], H, Vd, dt))
    return float(per_t.mean()), per_t, grads, (b["pred"] if need_pred else None)


def mesa_loss_and_grads(E, Y, params, lidx, need_grad=True, need_pred=False):
    """:func:`factored_loss_and_grads` for a stack of mesa layers (form "sm", no
    forgetting): MesaParams gradients, lam's included. Refuses with the reference's
    ``NonFiniteError`` where its guards would (module section "mesa layers")."""
    from .._checks import NonFiniteError
    from ..layers.mesa import PD_SLACK, REVERSE_RTOL, MesaParams

    dt = np.dtype(E.dtype)
    B, T, D = E.shape
    WQ, WK, WV, PA, H, Kd, Vd = _stack_heads(params, dt)
    LAM = np.ones((len(params), H), dt)                                # padded heads: lam 1 (their keys are 0)
    for i, p in enumerate(params):
        LAM[i, :p.lam.shape[0]] = p.lam
    L, nch, b = _buffers(B, T, Y, WQ, WK, WV, PA, dt, need_pred)
    gL = np.zeros((nch,) + LAM.shape)
    guards = np.zeros((nch, 4))
    guards[:, 0] = np.inf
    slack = float(PD_SLACK * np.finfo(dt).eps)
    seq_batch_mesa(np.ascontiguousarray(E), np.ascontiguousarray(Y), WQ, WK, WV, PA, LAM, H, Kd, Vd, lidx, slack,
                   dt.type(B * T), L, nch, need_grad, need_pred, b["per_t"], b["gQ"], b["gK"], b["gV"], b["gP"], gL,
                   b["pred"], guards)
    if not (guards[:, 0].min() >= 0.0) or guards[:, 1].any():
        raise NonFiniteError("mesa layer (form 'sm'): R_t lost positive definiteness (k^T R k < 0 beyond rounding, "
                             "a diagonal entry <= 0 or a non-finite R): the keys are too large or lam too far from "
                             "1 for this dtype; use float64 or form='direct'")
    worst, drift = float(guards[:, 2].max()), float(guards[:, 3].max())
    if need_grad and not (worst <= REVERSE_RTOL and drift <= REVERSE_RTOL):
        raise NonFiniteError(f"mesa layer backward (form 'sm'): the reverse Sherman-Morrison walk lost its precision "
                             f"(denominators off by {worst:.3g} relative, R_0 drift {drift:.3g}; allowed "
                             f"{REVERSE_RTOL:g}): use float64, or form='direct' whose backward solves directly")
    per_t = b["per_t"].sum(axis=0) / B
    grads = None
    if need_grad:
        gl = gL.sum(axis=0)
        grads = tuple(MesaParams(*g, gl[i, :p.lam.shape[0]].astype(dt))
                      for i, (p, g) in enumerate(zip(params, _unstack_grads(params, b["gQ"], b["gK"], b["gV"], b["gP"],
                                                                             H, Vd, dt))))
    return float(per_t.mean()), per_t, grads, (b["pred"] if need_pred else None)


# ======================================================================== mesa layers ====
# A uniform stack of mesa layers (``reference.layers.mesa``, form "sm", no forgetting) in
# the same feature-major blocks: q, k, v as above; per head the Sherman-Morrison
# recursion R_0 = lam I, u = R_{t-1} k_t, c_t = 1 + k_t . u, R_t = R_{t-1} - u u^T / c_t,
# qt_t = R_t q_t (per lane, R (Kd, Kd, L)); then causal linear attention with queries qt
# (:func:`heads_forward`) and pre = e + P_all o (no clip). Backward: :func:`heads_backward`
# gives dqt, dk, dv; the reverse Sherman-Morrison walk (the reference's
# ``reverse_sm_backward``) gives dq, the keys' gradient through R and dlam. The
# reference's guards are computed per chunk (the forward's positive-definiteness margin,
# the reverse denominators' relative error, R_0's drift) and refused on the host with its
# NonFiniteError before anything is returned.

@njit(**KERNEL)
def sm_forward(Q, Kk, lam, H, Kd, slack, R, c, QT, u, guard):
    """Per head: the Sherman-Morrison queries QT (H Kd, T, L), the final R (H, Kd, Kd, L)
    and the denominators c (H, T, L). guard[0] = min of the PD margins and diagonals of R
    (the reference's), guard[1] = 1 where qt is not finite."""
    T = Q.shape[1]
    L = Q.shape[2]
    for h in range(H):
        Rh = R[h]
        Rh[:] = 0
        for a in range(Kd):
            for l in range(L):
                Rh[a, a, l] = lam[h]
        for t in range(T):
            for a in range(Kd):
                ua = u[a]
                for l in range(L):
                    ua[l] = 0
                for b in range(Kd):
                    r = Rh[a, b]
                    kb = Kk[h * Kd + b, t]
                    for l in range(L):
                        ua[l] += r[l] * kb[l]
            for l in range(L):
                s = 0.0 * u[0, l]
                kk = 0.0 * u[0, l]
                tr = 0.0 * u[0, l]
                for a in range(Kd):
                    ka = Kk[h * Kd + a, t, l]
                    s += ka * u[a, l]
                    kk += ka * ka
                    tr += Rh[a, a, l]
                    if Rh[a, a, l] < guard[0]:
                        guard[0] = Rh[a, a, l]
                m = s + slack * kk * tr
                if m < guard[0]:
                    guard[0] = m
                if not (m == m):
                    guard[0] = -np.inf
                c[h, t, l] = 1.0 + s
            for a in range(Kd):
                ua = u[a]
                for b in range(Kd):
                    r = Rh[a, b]
                    ub = u[b]
                    cc = c[h, t]
                    for l in range(L):
                        r[l] = r[l] - ua[l] * ub[l] / cc[l]
            for a in range(Kd):
                qa = QT[h * Kd + a, t]
                for l in range(L):
                    qa[l] = 0
                for b in range(Kd):
                    r = Rh[a, b]
                    qb = Q[h * Kd + b, t]
                    for l in range(L):
                        qa[l] += r[l] * qb[l]
                for l in range(L):
                    if not np.isfinite(qa[l]):
                        guard[1] = 1.0


@njit(**KERNEL)
def sm_backward(dQT, QT, Kk, R_T, c, lam, H, Kd, R, Abar, a_, w, dQ, dK, dlam, guard):
    """The reverse Sherman-Morrison walk per head: dQ (H Kd, T, L) = R_t dqt_t; dK += the
    keys' gradient through R; dlam[h] += Tr(dL/dR_0) over the lanes (float64).
    guard[2] = max relative error of the reverse denominators, guard[3] = max R_0 drift."""
    T = QT.shape[1]
    L = QT.shape[2]
    for h in range(H):
        R[:] = R_T[h]
        Abar[:] = 0
        for t in range(T - 1, -1, -1):
            # forward: qt_t = R_t q_t, so dq_t = R_t dqt_t
            for a in range(Kd):
                aa = a_[a]
                for l in range(L):
                    aa[l] = 0
                for b in range(Kd):
                    r = R[a, b]
                    db = dQT[h * Kd + b, t]
                    for l in range(L):
                        aa[l] += r[l] * db[l]
                dq = dQ[h * Kd + a, t]
                for l in range(L):
                    dq[l] = aa[l]
            # Abar_t = g Abar_{t+1} - a_t qt_t^T (g = 1)
            for a in range(Kd):
                aa = a_[a]
                for b in range(Kd):
                    ab = Abar[a, b]
                    qb = QT[h * Kd + b, t]
                    for l in range(L):
                        ab[l] -= aa[l] * qb[l]
            # forward: A_t = A_{t-1} + k_t k_t^T, so dk_t += (Abar_t + Abar_t^T) k_t
            for a in range(Kd):
                dk = dK[h * Kd + a, t]
                for b in range(Kd):
                    x = Abar[a, b]
                    y = Abar[b, a]
                    kb = Kk[h * Kd + b, t]
                    for l in range(L):
                        dk[l] += (x[l] + y[l]) * kb[l]
            # reverse Sherman-Morrison: R_{t-1} = R_t - R_t k k^T R_t / (k^T R_t k - 1)
            for a in range(Kd):
                wa = w[a]
                for l in range(L):
                    wa[l] = 0
                for b in range(Kd):
                    r = R[a, b]
                    kb = Kk[h * Kd + b, t]
                    for l in range(L):
                        wa[l] += r[l] * kb[l]
            for l in range(L):
                den = -1.0 + 0.0 * w[0, l]
                for a in range(Kd):
                    den += Kk[h * Kd + a, t, l] * w[a, l]
                want = -1.0 / c[h, t, l]
                e = abs(den - want) / abs(want)
                if not (e <= guard[2]):
                    guard[2] = e if e == e else np.inf
                a_[0, l] = den                                         # reuse a_[0] for the denominators
            for a in range(Kd):
                wa = w[a]
                for b in range(Kd):
                    r = R[a, b]
                    wb = w[b]
                    dn = a_[0]
                    for l in range(L):
                        r[l] = r[l] - wa[l] * wb[l] / dn[l]
        # R_0 drift and dL/dlam = Tr(-Abar_1 / lam^2)
        for l in range(L):
            for a in range(Kd):
                for b in range(Kd):
                    want = lam[h] if a == b else 0.0
                    e = abs(R[a, b, l] - want) / lam[h]
                    if not (e <= guard[3]):
                        guard[3] = e if e == e else np.inf
        acc = 0.0
        for a in range(Kd):
            for l in range(L):
                acc += -np.float64(Abar[a, a, l])
        dlam[h] += acc / (np.float64(lam[h]) * np.float64(lam[h]))


@njit(**DRIVER)
def seq_batch_mesa(E_in, Y_in, WQ, WK, WV, PA, LAM, H, Kd, Vd, lidx, slack, BT, L, n_chunks, need_grad, need_pred,
                   per_t_out, gQ, gK, gV, gP, gL, pred_out, guards):
    """:func:`seq_batch_factored` for a stack of mesa layers (form "sm", no forgetting):
    LAM (Lp, H) the ridge parameters; gL (n_chunks, Lp, H) float64 their gradient sums;
    guards (n_chunks, 4): per chunk the forward's worst PD margin, a non-finite qt flag,
    the worst reverse denominator error and R_0 drift."""
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
        Qs = np.empty((K, HK, T, L), dt)
        QTs = np.empty((K, HK, T, L), dt)
        Ks = np.empty((K, HK, T, L), dt)
        Vs = np.empty((K, HV, T, L), dt)
        Os = np.empty((K, HV, T, L), dt)
        Ss = np.empty((K, H, T, T, L), dt)
        RT = np.empty((K, H, Kd, Kd, L), dt)
        Cs = np.empty((K, H, T, L), dt)
        R = np.empty((Kd, Kd, L), dt)
        Abar = np.empty((Kd, Kd, L), dt)
        u = np.empty((Kd, L), dt)
        w = np.empty((Kd, L), dt)
        Yb = np.empty((T, d, L), dt)
        dEa = np.empty((D, T, L), dt)
        dEb = np.empty((D, T, L), dt)
        dO = np.empty((HV, T, L), dt)
        dV = np.empty((HV, T, L), dt)
        dQT = np.empty((HK, T, L), dt)
        dQ = np.empty((HK, T, L), dt)
        dK = np.empty((HK, T, L), dt)
        dS = np.empty((T, T, L), dt)
        gd = guards[ch]
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
                sm_forward(Qs[k], Ks[k], LAM[p], H, Kd, slack, RT[k], Cs[k], QTs[k], u, gd)
                heads_forward(QTs[k], Ks[k], Vs[k], H, Kd, Vd, Ss[k], Os[k])
                Ein[k + 1][:] = Ein[k]
                K_.sl(PA[p], Os[k].reshape((HV, TL)), Ein[k + 1].reshape((D, TL)), True)
            _loss_block(Ein[K], Yb, b0, nvalid, BT, need_pred, pred_out, per_t, dEa)
            if not need_grad:
                continue
            cur = dEa
            nxt = dEb
            for k in range(K - 1, -1, -1):
                p = lidx[k]
                # forward: pre = e + P_all o, so dP_all = sum dout o^T and do = P_all^T dout
                K_.gacc(cur, Os[k], gP[ch, p])
                K_.sl(PA[p].T, cur.reshape((D, TL)), dO.reshape((HV, TL)), False)
                heads_backward(dO, QTs[k], Ks[k], Vs[k], Ss[k], H, Kd, Vd, dS, dQT, dK, dV)
                sm_backward(dQT, QTs[k], Ks[k], RT[k], Cs[k], LAM[p], H, Kd, R, Abar, u, w, dQ, dK, gL[ch, p], gd)
                K_.gacc(dQ, Ein[k], gQ[ch, p])
                K_.gacc(dK, Ein[k], gK[ch, p])
                K_.gacc(dV, Ein[k], gV[ch, p])
                if k > 0:
                    nxt[:] = cur
                    n2 = nxt.reshape((D, TL))
                    K_.sl(WQ[p].T, dQ.reshape((HK, TL)), n2, True)
                    K_.sl(WK[p].T, dK.reshape((HK, TL)), n2, True)
                    K_.sl(WV[p].T, dV.reshape((HV, TL)), n2, True)
                    tswap = cur
                    cur = nxt
                    nxt = tswap
