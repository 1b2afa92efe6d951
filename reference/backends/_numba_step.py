"""The fused batch driver and Adam of the Numba backend (private).

:func:`run_batch` is the whole forward/backward of a batch in one call: a ``prange``
over a fixed number of chunks of tasks; each chunk allocates its scratch once, then
for each block of L tasks (lanes) it draws or packs the tokens, runs the K layers
forward (storing what the backward needs), reads out the prediction, adds the loss,
and walks the layers backward adding the shared-weight gradients into the chunk's own
float64 accumulators. The caller adds the chunks' accumulators in chunk order, so the
result does not depend on the thread count.

:func:`adam_flat` is the reference's clip-by-global-norm + Adam
(``reference/optim.py``) on one flat vector of all parameters, in the working dtype
with the reference's order of operations.
"""

import numpy as np
from numba import njit, prange

from . import _numba_layers as K_
from ._numba_rng import sample_block
from .config import DRIVER, STRICT


def choose_lanes(T, D, itemsize, requested=0):
    """Lanes per block: ``requested`` if non-zero, else the largest of 64, 32, 16, 8
    whose token block (T * D * L * itemsize) fits in 64 KiB, at least 8."""
    if requested:
        return int(requested)
    for L in (64, 32, 16):
        if T * D * L * itemsize <= 65536:
            return L
    return 8


def n_chunks_for(n_blocks):
    """Chunks of the batch loop: a fixed partition (not the thread count), 8 at most."""
    return max(1, min(n_blocks, 8))


@njit(**STRICT)
def pack_block(E_in, yq_in, bidx, nvalid, E0, yq):
    """Lanes l < nvalid of E0 (T, D, L), yq (d_y, L) from tasks bidx[l]; zeros after."""
    T, D, L = E0.shape
    d_y = yq.shape[0]
    E0[:] = 0
    yq[:] = 0
    for t in range(T):
        for a in range(D):
            e = E0[t, a]
            for l in range(nvalid):
                e[l] = E_in[bidx[l], t, a]
    for r in range(d_y):
        for l in range(nvalid):
            yq[r, l] = yq_in[bidx[l], r]


@njit(**STRICT)
def unpack_block(X, b0, nvalid, out):
    """out[b0 + l] = X[..., l] for l < nvalid (X (T, D, L), out (B, T, D))."""
    T, D, L = X.shape
    for l in range(nvalid):
        for t in range(T):
            for a in range(D):
                out[b0 + l, t, a] = X[t, a, l]


@njit(**DRIVER)
def run_batch(sample, key, E_in, yq_in, tidx, d, N, d_y, low, high, w_scale, noise_std, n_dis, f32,
              A, Bm, lidx, causal, has_clip, clipv, Bf, full_last, need_grad, need_dE, need_pred,
              L, n_chunks, loss_out, dA_acc, dB_acc, pred_out, dE_out, out_tokens):
    """Forward (and backward) of the K layers on B tasks; see the module docstring.

    Runs tasks tidx[0 .. n-1] (global task indices): drawn from ``key`` (sample; E_in,
    yq_in unused) or read from E_in (B, T, D), yq_in (B, d_y). Per-task outputs go to
    position j of tidx. A, Bm (Lp, H, D, D): merged weights per parameter layer; lidx (K,):
    parameter layer of each layer. Outputs (filled when asked): loss_out (n_chunks,)
    sums of 0.5 * err^2; dA_acc, dB_acc (n_chunks, Lp, H, D, D) float64 gradient sums
    of dL/dA, dL/dB (L = the loss summed over tasks divided by Bf); pred_out (n, d_y);
    dE_out (n, T, D); out_tokens (n, T, D) (full_last: every token of the last layer).
    """
    K = lidx.shape[0]
    H = A.shape[1]
    D = A.shape[2]
    T = N + 1
    dt = A.dtype
    nS = T if causal else N
    n = tidx.shape[0]
    n_blocks = (n + L - 1) // L
    for ch in prange(n_chunks):
        blk0 = ch * n_blocks // n_chunks
        blk1 = (ch + 1) * n_blocks // n_chunks
        # ---- scratch of this chunk
        Ein = np.empty((K + 1, T, D, L), dt)                   # layer inputs; Ein[k+1] = out of layer k
        Pre = np.empty((K, T, D, L), dt)                       # residual outputs before clipping
        yq = np.empty((d_y, L), dt)
        if causal:
            Cs = np.empty((1, 1, 1, 1), dt)
            CBs = np.empty((1, 1, 1, 1, 1), dt)
            Ms = np.empty((1, 1, 1, 1), dt)
            Qs = np.empty((K, H, T, D, L), dt)
            Ss = np.empty((K, H, T, T, L), dt)
            Os = np.empty((K, H, T, D, L), dt)
        else:
            Cs = np.empty((K, D, D, L), dt)
            CBs = np.empty((K, H, D, D, L), dt)
            Ms = np.empty((K, D, D, L), dt)
            Qs = np.empty((1, 1, 1, 1, 1), dt)
            Ss = np.empty((1, 1, 1, 1, 1), dt)
            Os = np.empty((1, 1, 1, 1, 1), dt)
        tmp = np.empty((D, D, L), dt)
        u = np.empty((H, D, L), dt)
        s = np.empty((H, T, L), dt)
        w = np.empty((H, D, L), dt)
        preq = np.empty((D, L), dt)
        g = np.empty((D, L), dt)
        r = np.empty((D, L), dt)
        du = np.empty((D, L), dt)
        ds = np.empty((T, L), dt)
        dEa = np.empty((T, D, L), dt)
        dEb = np.empty((T, D, L), dt)
        G = np.empty((D, D, L), dt)
        V = np.empty((D, D, L), dt)
        Vt = np.empty((D, D, L), dt)
        dCt = np.empty((D, D, L), dt)
        Sy = np.empty((D, D, L), dt)
        if causal:
            dO = np.empty((T, D, L), dt)
            dQ = np.empty((T, D, L), dt)
            dS = np.empty((T, T, L), dt)
            tA = np.empty((D, T, L), dt)
            tB = np.empty((D, T, L), dt)
            ET = np.empty((D, T, L), dt)
        else:
            dO = np.empty((1, 1, 1), dt)
            dQ = np.empty((1, 1, 1), dt)
            dS = np.empty((1, 1, 1), dt)
            tA = np.empty((1, 1, 1), dt)
            tB = np.empty((1, 1, 1), dt)
            ET = np.empty((1, 1, 1), dt)
        nL = L if sample else 1
        Wt = np.empty((d_y, d, nL), dt)
        U = np.empty((N * d + d, nL), np.float64)
        ukeys = np.empty(nL, np.uint64)
        nbuf = np.empty(max(d_y * d, N * d_y) + 2, np.float64)
        bidx = np.empty(L, np.int64)
        loss_sum = 0.0
        for blk in range(blk0, blk1):
            b0 = blk * L
            nvalid = min(L, n - b0)
            for l in range(nvalid):
                bidx[l] = tidx[b0 + l]
            E0 = Ein[0]
            if sample:
                sample_block(key, bidx, nvalid, d, N, d_y, low, high, w_scale, noise_std, n_dis, f32,
                             E0, yq, Wt, U, ukeys, nbuf)
            else:
                pack_block(E_in, yq_in, bidx, nvalid, E0, yq)
            # ---- forward, layer by layer
            for k in range(K):
                p = lidx[k]
                if k == K - 1 and not full_last:
                    K_.query_last_forward(Ein[k], A[p], Bm[p], nS, d, u, s, w, preq)
                elif causal:
                    K_.causal_full_forward(Ein[k], A[p], Bm[p], has_clip, clipv, Qs[k], Ss[k], Os[k],
                                           Pre[k], Ein[k + 1])
                else:
                    K_.ctx_full_forward(Ein[k], A[p], Bm[p], N, has_clip, clipv, Cs[k], CBs[k], Ms[k], tmp,
                                        Pre[k], Ein[k + 1])
            if full_last:
                unpack_block(Ein[K], b0, nvalid, out_tokens)
                continue
            # ---- readout y_hat = -clip(pre_q)[d:], loss 0.5 * mean ||y_hat - y_q||^2
            g[:] = 0
            for rr in range(d_y):
                for l in range(nvalid):
                    v = preq[d + rr, l]
                    o = v
                    inside = True
                    if has_clip:
                        if v > clipv:
                            o = clipv
                            inside = False
                        elif v < -clipv:
                            o = -clipv
                            inside = False
                    pred = -o
                    err = pred - yq[rr, l]
                    loss_sum += 0.5 * np.float64(err) * np.float64(err)
                    if need_pred:
                        pred_out[b0 + l, rr] = pred
                    # backward: dpred = err / B; y_hat = -out_q[y], so dout_q[y] = -dpred; clip mask
                    if inside:
                        g[d + rr, l] = -(err / Bf)
            if not need_grad:
                continue
            # ---- backward, layers in reverse
            kl = K - 1
            p = lidx[kl]
            cur = dEa
            nxt = dEb
            K_.query_last_backward(g, Ein[kl], A[p], Bm[p], nS, d, u, s, w, need_dE or K > 1, cur,
                                   dA_acc[ch, p], dB_acc[ch, p], r, ds, du)
            for k in range(K - 2, -1, -1):
                p = lidx[k]
                nde = need_dE or k > 0
                if causal:
                    K_.causal_full_backward(cur, Ein[k], A[p], Bm[p], has_clip, clipv, Qs[k], Ss[k], Os[k],
                                            Pre[k], nde, nxt, dA_acc[ch, p], dB_acc[ch, p],
                                            dO, dS, dQ, tA, tB, ET)
                else:
                    K_.ctx_full_backward(cur, Ein[k], A[p], Bm[p], N, has_clip, clipv, Cs[k], CBs[k], Ms[k],
                                         Pre[k], nde, nxt, dA_acc[ch, p], dB_acc[ch, p], G, V, Vt, dCt, Sy)
                tswap = cur
                cur = nxt
                nxt = tswap
            if need_dE:
                unpack_block(cur, b0, nvalid, dE_out)
        loss_out[ch] = loss_sum


@njit(**STRICT)
def sample_to_arrays(key, B, d, N, d_y, low, high, w_scale, noise_std, n_dis, f32, L, X, Y, xq, yq_out, W):
    """The tasks :func:`run_batch` draws in sample mode, in the reference's layout."""
    T = N + 1
    D = d + d_y
    dt = X.dtype
    E0 = np.empty((T, D, L), dt)
    yq = np.empty((d_y, L), dt)
    Wt = np.empty((d_y, d, L), dt)
    U = np.empty((N * d + d, L), np.float64)
    ukeys = np.empty(L, np.uint64)
    nbuf = np.empty(max(d_y * d, N * d_y) + 2, np.float64)
    bidx = np.empty(L, np.int64)
    for b0 in range(0, B, L):
        nvalid = min(L, B - b0)
        for l in range(nvalid):
            bidx[l] = b0 + l
        sample_block(key, bidx, nvalid, d, N, d_y, low, high, w_scale, noise_std, n_dis, f32, E0, yq, Wt, U, ukeys, nbuf)
        for l in range(nvalid):
            b = b0 + l
            for i in range(N):
                for a in range(d):
                    X[b, i, a] = E0[i, a, l]
                for rr in range(d_y):
                    Y[b, i, rr] = E0[i, d + rr, l]
            for a in range(d):
                xq[b, a] = E0[N, a, l]
            for rr in range(d_y):
                yq_out[b, rr] = yq[rr, l]
                for a in range(d):
                    W[b, rr, a] = Wt[rr, a, l]


@njit(**STRICT)
def adam_flat(p, g, m, v, t, lr, b1, b2, eps, omb1, omb2, c1, c2, clip_norm, has_clip):
    """Clip-by-global-norm then Adam, in place on flat vectors of the working dtype.

    Scalars lr, b1, b2, eps, omb1 = 1 - b1, omb2 = 1 - b2, c1 = 1 - b1^t, c2 = 1 - b2^t
    arrive already cast to the dtype, as the reference's NumPy arithmetic casts them.
    Returns the global norm before clipping (float64).
    """
    ss = 0.0
    for i in range(g.size):
        ss += np.float64(g[i]) * np.float64(g[i])
    norm = np.sqrt(ss)
    if has_clip and norm > clip_norm:
        sc = np.empty(1, g.dtype)
        sc[0] = clip_norm / norm          # the reference: g * g.dtype.type(clip_norm / norm)
        scale = sc[0]
        for i in range(g.size):
            g[i] = g[i] * scale
    for i in range(p.size):
        m[i] = b1 * m[i] + omb1 * g[i]
        v[i] = b2 * v[i] + omb2 * g[i] * g[i]
        p[i] = p[i] - lr * (m[i] / c1) / (np.sqrt(v[i] / c2) + eps)
    return norm
