"""Context-only LSA stacks in D x D space: the Numba backend's path for wide tokens (private).

Why it is exact. In a context-only layer every token, context and query alike, is
mapped by the same per-task matrix (merged form, ``_numba_layers``):

    e_j -> L e_j,   L = I + M,   M = sum_h A_h C B_h,   C = E_ctx^T E_ctx   (D x D).

So when no token is clipped, the next layer's second-moment matrix and query are

    C' = L C L^T,   q' = L q,

and the whole stack is a function of (C_0, q_0): each layer costs O(H D^3) per task,
whatever N is (the token path costs O(N D^2 + T D^2) more per layer). The last two
layers need even less: with L = L_{K-2}, C = C_{K-2} and the last layer's heads
(A'_h, B'_h), the prediction's pre-clip value is

    pre_y = q1[d] + sum_h alpha_h^T C beta_h,   q1 = L q,
            alpha_h = L^T A'_h[d, :]^T,   beta_h = L^T B'_h q1,

where L x = x + sum_h A_h (C (B_h x)) and L^T x = x + sum_h B_h^T (C (A_h^T x)) are
matrix-vector products: the "tail" is O(H D^2) per task, and its backward is a handful
of rank-1 terms. Layers 0 .. K-3 are "dense" (D^3 products).

Clipping. Clipped tokens break the linearity, so a task stays on this path only if no
token can reach the clip value c in layers 0 .. K-2 (the last layer's clip acts on the
readout only, and is applied exactly). The query is tracked exactly; the context tokens
through a per-coordinate bound m (m_0[a] = max_i |E_ctx[i, a]|; m' = |L| m for a dense
layer, m' = m + sum_h |A_h| (|C| (|B_h| m)) for the tail, both valid since
|(L e)_a| <= sum_c |L_ac| |e_c|). A task whose bound exceeds c is flagged and the
caller runs it through the token path (``_numba_step.run_batch``), so the result is
always the reference's function.

Backward, dense layer (S' = dC' + dC'^T, symmetric, and dq' from the layer above):

    dL = S' (L C) + dq' q^T,   dM = dL,
    dA_h += dM (C B_h)^T,   V_h = A_h^T dM,   dB_h += C V_h,      (shared weights)
    S = L^T S' L + sum_h (V_h B_h^T + B_h V_h^T),   dq = L^T dq'  (skipped for layer 0).

Low rank near the end. The gradient reaching C_{K-2} from the tail is a sum of
2H(H + 1) rank-1 pairs, so layer K-3's backward (and earlier ones while that stays
cheaper than the dense products) runs on the pairs by matrix-vector products
(:func:`factored_layer_backward`); the dense backward takes over once the pairs are many.

Layout: one task at a time (row-major (D, D) matrices), the products by a small
register-blocked kernel (:func:`mm`), whose inner loop runs over a contiguous row.
Only d_y = 1 (one label) is handled here; the backend uses the token path otherwise.
"""

import numpy as np
from numba import njit, prange

from ._numba_rng import sample_block
from ._numba_step import pack_block
from .config import DRIVER, KERNEL


# ------------------------------------------------------------------ small kernels ----

@njit(**KERNEL)
def mm(X, Y, Z, acc):
    """Z (+)= X @ Y for (I, K) @ (K, J); X read as scalars (any layout), Y and Z with
    contiguous rows. Blocks of 4 rows of Z and 4 steps of K per pass over a row."""
    I, K = X.shape
    J = Y.shape[1]
    i = 0
    while i + 4 <= I:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        if not acc:
            for j in range(J):
                z0[j] = 0
                z1[j] = 0
                z2[j] = 0
                z3[j] = 0
        k = 0
        while k + 4 <= K:
            y0 = Y[k]
            y1 = Y[k + 1]
            y2 = Y[k + 2]
            y3 = Y[k + 3]
            a00 = X[i, k]
            a01 = X[i, k + 1]
            a02 = X[i, k + 2]
            a03 = X[i, k + 3]
            a10 = X[i + 1, k]
            a11 = X[i + 1, k + 1]
            a12 = X[i + 1, k + 2]
            a13 = X[i + 1, k + 3]
            a20 = X[i + 2, k]
            a21 = X[i + 2, k + 1]
            a22 = X[i + 2, k + 2]
            a23 = X[i + 2, k + 3]
            a30 = X[i + 3, k]
            a31 = X[i + 3, k + 1]
            a32 = X[i + 3, k + 2]
            a33 = X[i + 3, k + 3]
            for j in range(J):
                b0 = y0[j]
                b1 = y1[j]
                b2 = y2[j]
                b3 = y3[j]
                z0[j] += a00 * b0 + a01 * b1 + a02 * b2 + a03 * b3
                z1[j] += a10 * b0 + a11 * b1 + a12 * b2 + a13 * b3
                z2[j] += a20 * b0 + a21 * b1 + a22 * b2 + a23 * b3
                z3[j] += a30 * b0 + a31 * b1 + a32 * b2 + a33 * b3
            k += 4
        while k < K:
            y0 = Y[k]
            a0 = X[i, k]
            a1 = X[i + 1, k]
            a2 = X[i + 2, k]
            a3 = X[i + 3, k]
            for j in range(J):
                b0 = y0[j]
                z0[j] += a0 * b0
                z1[j] += a1 * b0
                z2[j] += a2 * b0
                z3[j] += a3 * b0
            k += 1
        i += 4
    while i < I:
        z0 = Z[i]
        if not acc:
            for j in range(J):
                z0[j] = 0
        for k in range(K):
            a0 = X[i, k]
            y0 = Y[k]
            for j in range(J):
                z0[j] += a0 * y0[j]
        i += 1


@njit(**KERNEL)
def transpose_into(X, Z):
    n, m = X.shape
    for i in range(n):
        for j in range(m):
            Z[j, i] = X[i, j]


@njit(**KERNEL)
def mv(W, x, y, acc):
    """y (+)= W x (W any layout)."""
    n, m = W.shape
    for i in range(n):
        s = W[i, 0] * x[0]
        for j in range(1, m):
            s += W[i, j] * x[j]
        if acc:
            y[i] += s
        else:
            y[i] = s


@njit(**KERNEL)
def mtv(W, x, y, acc):
    """y (+)= W^T x (W with contiguous rows)."""
    n, m = W.shape
    if not acc:
        for j in range(m):
            y[j] = 0
    for i in range(n):
        xi = x[i]
        w = W[i]
        for j in range(m):
            y[j] += xi * w[j]


@njit(**KERNEL)
def outer_acc(u, v, Z, s):
    """Z += s * u v^T."""
    for i in range(u.shape[0]):
        a = s * u[i]
        z = Z[i]
        for j in range(v.shape[0]):
            z[j] += a * v[j]


@njit(**KERNEL)
def add_to64(X, acc):
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            acc[i, j] += X[i, j]


# ----------------------------------------------------------------- one task ----

@njit(**KERNEL)
def pair_capacity(D, H):
    """Rows of the pair buffers: the tail leaves P = 2H(H + 1) pairs, layer K-3 (always
    factored) turns them into P + H(2P + 1); later layers go factored only while the count
    stays within this capacity."""
    P = 2 * H * (H + 1)
    return max(2 * D + 8 * H, P + H * (2 * P + 1))


@njit(**KERNEL)
def abs_mv(W, x, out, plus_identity):
    """out = |W| x (or |I + W| x) for x >= 0, in float64."""
    n, m = W.shape
    for i in range(n):
        s = 0.0
        for j in range(m):
            w = np.float64(W[i, j])
            if plus_identity and i == j:
                w += 1.0
            s += abs(w) * x[j]
        out[i] = s


@njit(**KERNEL)
def L_apply(A, Bm, C, x, out, w):
    """out = L x = x + sum_h A_h (C (B_h x)) for the merged layer A, Bm (H, D, D). Scratch w (2, D)."""
    out[:] = x
    for h in range(A.shape[0]):
        mv(Bm[h], x, w[0], False)
        mv(C, w[0], w[1], False)
        mv(A[h], w[1], out, True)


@njit(**KERNEL)
def LT_apply(A, Bm, C, x, out, w):
    """out = L^T x = x + sum_h B_h^T (C (A_h^T x)). Scratch w (2, D)."""
    out[:] = x
    for h in range(A.shape[0]):
        mtv(A[h], x, w[0], False)
        mv(C, w[0], w[1], False)
        mtv(Bm[h], w[1], out, True)


@njit(**KERNEL)
def pairs_to_dense(PX, PY, P, S):
    """S = sum_t (x_t y_t^T + y_t x_t^T) for the P pairs (PX[t], PY[t])."""
    S[:] = 0
    for t in range(P):
        outer_acc(PX[t], PY[t], S, 1.0)
        outer_acc(PY[t], PX[t], S, 1.0)


@njit(**KERNEL)
def factored_layer_backward(PX, PY, P, C, M, q, dq, A, Bm, first, dA, dB, QX, QY, TU, TV, w1, w2, w3, w4):
    """Backward of one layer when S' = sum_t (x_t y_t^T + y_t x_t^T) has few pairs.

    The dense equations (module docstring) applied to rank-1 terms:
    dM = S' (L C) + dq' q^T = sum_t [x_t (C L^T y_t)^T + y_t (C L^T x_t)^T] + dq' q^T, and
    for each term u v^T and head h: dA_h += u (C B_h v)^T, dB_h += (C A_h^T u) v^T,
    dC += (A_h^T u)(B_h v)^T. Unless ``first``: the new S as pairs in (QX, QY) (returns
    their count): (L^T x_t, L^T y_t) for L^T S' L and (A_h^T u, B_h v) for dC + dC^T;
    and dq <- L^T dq. dA, dB: float64 (H, D, D) accumulators; TU, TV (>= 2P + 1, D).
    """
    H = A.shape[0]
    D = C.shape[0]
    nt = 0
    for t in range(P):
        mtv(M, PX[t], w1, False)                                       # L^T x = x + M^T x
        mtv(M, PY[t], w2, False)
        for a in range(D):
            w1[a] += PX[t, a]
            w2[a] += PY[t, a]
        if not first:
            QX[t, :] = w1
            QY[t, :] = w2
        TU[nt, :] = PX[t]
        mv(C, w2, TV[nt], False)                                       # x (C L^T y)^T
        nt += 1
        TU[nt, :] = PY[t]
        mv(C, w1, TV[nt], False)                                       # y (C L^T x)^T
        nt += 1
    TU[nt, :] = dq
    TV[nt, :] = q
    nt += 1
    nq = P
    for s_ in range(nt):
        for h in range(H):
            mv(Bm[h], TV[s_], w1, False)                               # B_h v
            mv(C, w1, w2, False)                                       # C B_h v
            outer_acc(TU[s_], w2, dA[h], 1.0)                          # dA_h += u (C B_h v)^T
            mtv(A[h], TU[s_], w3, False)                               # A_h^T u
            mv(C, w3, w4, False)                                       # C A_h^T u
            outer_acc(w4, TV[s_], dB[h], 1.0)                          # dB_h += (C A_h^T u) v^T
            if not first:
                QX[nq, :] = w3
                QY[nq, :] = w1
                nq += 1
    if not first:
        mtv(M, dq, w1, False)                                          # dq = L^T dq'
        for a in range(D):
            dq[a] += w1[a]
    return nq


@njit(**KERNEL)
def task_dspace(Et, N, d, yq, A, Bm, Bt, lidx, has_clip, clipv, Bf, need_grad,
                Cs, CBs, Ms, LCs, qs, Wk, Vv, HV, ms, TU, TV, PP, dA_acc, dB_acc):
    """Forward, loss and backward of one task in D x D space.

    Et (T, D): the task's tokens; yq: its target (d_y = 1). Returns (loss, pred, ok):
    ok False means a token could be clipped; then nothing was added to dA_acc, dB_acc
    (float64 (Lp, H, D, D)). With nd = K - 2: layers 0 .. nd-1 are dense, layers nd, nd+1
    the tail. Scratch: Cs (nd + 1, D, D), CBs (max(nd, 1), H, D, D), Ms, LCs (max(nd, 1),
    D, D); qs (nd + 1, D); Wk (8, D, D); Vv (10, D); HV (5, H, D); ms (4, D) float64; TU, TV (2 Pmax + 1, D); PP (4, Pmax, D)
    with Pmax = pair_capacity(D, H).
    """
    K = lidx.shape[0]
    T, D = Et.shape
    H = A.shape[1]
    nd = K - 2
    Mt, W1, W2, W3, Sa, Sb, Gt, dCm = Wk[0], Wk[1], Wk[2], Wk[3], Wk[4], Wk[5], Wk[6], Wk[7]
    dq, dq2, tq, v1, v2, v3, v4 = Vv[0], Vv[1], Vv[2], Vv[3], Vv[4], Vv[5], Vv[6]
    ws = Vv[8:10]
    al, be, bb, dal, dbe = HV[0], HV[1], HV[2], HV[3], HV[4]
    m = ms[0]
    mb = ms[1]
    mc = ms[2]
    md = ms[3]
    # ---- C_0 = E_ctx^T E_ctx, q_0, and the context bound m_0
    mm(Et[:N].T, Et[:N], Cs[0], False)
    qs[0, :] = Et[N]
    if has_clip:
        for a in range(D):
            mx = 0.0
            for i in range(N):
                v = abs(np.float64(Et[i, a]))
                if v > mx:
                    mx = v
            m[a] = mx
    # ---- layers 0 .. nd-1: M = sum_h A_h C B_h, q' = L q, C' = L C L^T
    for k in range(nd):
        p = lidx[k]
        C = Cs[k]
        M = Ms[k]
        for h in range(H):
            mm(C, Bm[p, h], CBs[k, h], False)                          # C B_h
            mm(A[p, h], CBs[k, h], M, h > 0)                           # M += A_h (C B_h)
        mv(M, qs[k], qs[k + 1], False)                                 # q' = q + M q
        qs[k + 1] += qs[k]
        if has_clip:
            for a in range(D):
                if abs(qs[k + 1, a]) > clipv:
                    return 0.0, 0.0, False
            abs_mv(M, m, mb, True)                                     # m' = |I + M| m
            for a in range(D):
                m[a] = mb[a]
                if m[a] > clipv:
                    return 0.0, 0.0, False
        LC = LCs[k]
        mm(M, C, LC, False)                                            # LC = C + M C
        LC += C
        transpose_into(M, Mt)
        mm(LC, Mt, Cs[k + 1], False)                                   # C' = LC + LC M^T
        Cs[k + 1] += LC
    # ---- tail: layer K-2 by matrix-vector products, layer K-1 (the last) read out
    C = Cs[nd]
    p = lidx[K - 2]
    pl = lidx[K - 1]
    q = qs[nd]
    L_apply(A[p], Bm[p], C, q, tq, ws)                  # q1 = L q
    if has_clip:
        for a in range(D):
            if abs(tq[a]) > clipv:
                return 0.0, 0.0, False
        for h in range(H):                                             # m' = m + sum_h |A_h| |C| |B_h| m
            abs_mv(Bm[p, h], m, mb, False)
            abs_mv(C, mb, mc, False)
            abs_mv(A[p, h], mc, md, False)
            for a in range(D):
                m[a] += md[a]
        for a in range(D):
            if m[a] > clipv:
                return 0.0, 0.0, False
    pre = tq[d]
    for h in range(H):
        for c in range(D):
            v1[c] = A[pl, h, d, c]
        LT_apply(A[p], Bm[p], C, v1, al[h], ws)         # alpha = L^T A'_h[d]^T
        mv(Bm[pl, h], tq, bb[h], False)                                # b = B'_h q1
        LT_apply(A[p], Bm[p], C, bb[h], be[h], ws)      # beta = L^T b
        mv(C, be[h], v2, False)                                        # C beta
        s = al[h, 0] * v2[0]
        for c in range(1, D):
            s += al[h, c] * v2[c]
        pre += s
    # ---- readout and loss (the last layer's clip acts on the readout only)
    o = pre
    inside = True
    if has_clip:
        if pre > clipv:
            o = clipv
            inside = False
        elif pre < -clipv:
            o = -clipv
            inside = False
    pred = -o
    err = pred - yq
    loss = 0.5 * np.float64(err) * np.float64(err)
    if not need_grad or not inside:
        return loss, pred, True
    g = -(err / Bf)                                                    # dL/dpre_y
    # ---- backward, tail. dM of layer K-2 collects rank-1 terms u v^T (TU, TV); S = dC + dC^T
    # of C_{K-2} is kept as pairs (x, y) meaning x y^T + y x^T
    PX, PY, QX, QY = PP[0], PP[1], PP[2], PP[3]
    Pmax = PX.shape[0]
    nt = 0
    P = 0
    dq[:] = 0
    dq[d] = g                                                          # dq1 (residual of the readout)
    for h in range(H):
        mv(C, be[h], v2, False)                                        # C beta
        mv(C, al[h], v3, False)                                        # C alpha
        # pre += alpha^T C beta: dalpha = g C beta, dbeta = g C alpha, dC += g alpha beta^T
        for c in range(D):
            dal[h, c] = g * v2[c]
            dbe[h, c] = g * v3[c]
            PX[P, c] = g * al[h, c]
            PY[P, c] = be[h, c]
        P += 1
        # alpha = L^T a: dM term a dalpha^T, da = L dalpha -> dA'_h[d, :]
        for c in range(D):
            TU[nt, c] = A[pl, h, d, c]
            TV[nt, c] = dal[h, c]
        nt += 1
        L_apply(A[p], Bm[p], C, dal[h], v4, ws)
        for c in range(D):
            dA_acc[pl, h, d, c] += v4[c]
        # beta = L^T b: dM term b dbeta^T, db = L dbeta; b = B'_h q1: dB'_h += db q1^T, dq1 += B'_h^T db
        for c in range(D):
            TU[nt, c] = bb[h, c]
            TV[nt, c] = dbe[h, c]
        nt += 1
        L_apply(A[p], Bm[p], C, dbe[h], v4, ws)
        outer_acc(v4, tq, dB_acc[pl, h], 1.0)
        mtv(Bm[pl, h], v4, dq, True)
    # q1 = L q: dM term dq1 q^T, dq_{K-2} = L^T dq1
    for c in range(D):
        TU[nt, c] = dq[c]
        TV[nt, c] = q[c]
    nt += 1
    LT_apply(A[p], Bm[p], C, dq, dq2, ws)
    # M = sum_h A_h C B_h with dM = sum_t u_t v_t^T
    for t in range(nt):
        for h in range(H):
            mv(Bm[p, h], TV[t], v1, False)                             # B_h v
            mv(C, v1, v2, False)                                       # C B_h v
            outer_acc(TU[t], v2, dA_acc[p, h], 1.0)                    # dA_h += u (C B_h v)^T
            mtv(A[p, h], TU[t], v3, False)                             # A_h^T u
            mv(C, v3, v4, False)                                       # C A_h^T u
            outer_acc(v4, TV[t], dB_acc[p, h], 1.0)                    # dB_h += (C A_h^T u) v^T
            if nd > 0:
                PX[P, :] = v3                                          # dC += (A_h^T u)(B_h v)^T
                PY[P, :] = v1
                P += 1
    if nd == 0:
        return loss, pred, True
    dq[:] = dq2
    # ---- backward, layers nd-1 .. 0: layer nd-1 factored (S' has 2H(H + 1) pairs), the others
    # factored while that is cheaper than dense, then dense
    S = Sa
    Snext = Sb
    dense = False
    for k in range(nd - 1, -1, -1):
        p = lidx[k]
        C = Cs[k]
        M = Ms[k]
        if not dense:
            # cost in D^2 multiply-adds: factored ~ 4P + 6H(2P + 1); dense ~ D (3 + 4H)
            # products (D (1 + 3H) for layer 0) plus 2P to build S
            f_cost = 4 * P + 6 * H * (2 * P + 1)
            d_cost = D * ((1 + 3 * H) if k == 0 else (3 + 4 * H)) + 2 * P
            P_new = 0 if k == 0 else P + H * (2 * P + 1)
            if k == nd - 1 or (f_cost < d_cost and P_new <= Pmax):
                P = factored_layer_backward(PX, PY, P, C, M, qs[k], dq, A[p], Bm[p], k == 0,
                                            dA_acc[p], dB_acc[p], QX, QY, TU, TV, v1, v2, v3, v4)
                tX = PX
                tY = PY
                PX = QX
                PY = QY
                QX = tX
                QY = tY
                continue
            pairs_to_dense(PX, PY, P, S)
            dense = True
        LC = LCs[k]
        dL = W1
        mm(S, LC, dL, False)                                           # dL = S' (L C) + dq' q^T
        outer_acc(dq, qs[k], dL, 1.0)
        if k > 0:
            dCm[:] = 0
        for h in range(H):
            transpose_into(CBs[k, h], W2)
            mm(dL, W2, Gt, False)                                      # dA_h += dM (C B_h)^T
            add_to64(Gt, dA_acc[p, h])
            mm(A[p, h].T, dL, W2, False)                               # V = A_h^T dM
            mm(C, W2, Gt, False)                                       # dB_h += C V
            add_to64(Gt, dB_acc[p, h])
            if k > 0:
                mm(W2, Bt[p, h], dCm, True)                            # dC += V B_h^T
        if k == 0:
            break
        # S = L^T S' L + dC + dC^T with L = I + M, i.e. S' + S'M + (S'M)^T + M^T (S'M) + dC + dC^T;
        # dq = L^T dq'
        mm(S, M, W2, False)                                            # S' M
        transpose_into(M, Mt)
        mm(Mt, W2, W3, False)                                          # M^T S' M
        for a in range(D):
            for c in range(D):
                Snext[a, c] = S[a, c] + W2[a, c] + W2[c, a] + W3[a, c] + dCm[a, c] + dCm[c, a]
        mtv(M, dq, v1, False)
        for a in range(D):
            dq[a] += v1[a]
        tmp = S
        S = Snext
        Snext = tmp
    return loss, pred, True


# ------------------------------------------------------------------ the driver ----

@njit(**DRIVER)
def run_batch_dspace(sample, key, E_in, yq_in, tidx, d, N, low, high, w_scale, noise_std, n_dis, f32,
                     A, Bm, Bt, lidx, has_clip, clipv, Bf, need_grad, need_pred, L, n_chunks,
                     loss_out, dA_acc, dB_acc, pred_out, failed):
    """The batch in D x D space (context-only, d_y = 1, K >= 2); see the module docstring.

    Tasks tidx[0 .. n-1] (global indices; drawn from ``key`` or read from E_in (B, T, D),
    yq_in (B, 1)). Adds per-chunk loss sums and float64 gradient sums like
    ``run_batch``; failed[j] = True for tasks that must go through the token path
    (their loss and gradients are not included).
    """
    K = lidx.shape[0]
    H = A.shape[1]
    D = A.shape[2]
    T = N + 1
    dt = A.dtype
    n = tidx.shape[0]
    n_blocks = (n + L - 1) // L
    nd = K - 2
    nm = max(nd, 1)
    Pmax = pair_capacity(D, H)
    for ch in prange(n_chunks):
        blk0 = ch * n_blocks // n_chunks
        blk1 = (ch + 1) * n_blocks // n_chunks
        E0 = np.empty((T, D, L), dt)
        yq = np.empty((1, L), dt)
        nL = L if sample else 1
        Wt = np.empty((1, d, nL), dt)
        U = np.empty((N * d + d, nL), np.float64)
        ukeys = np.empty(nL, np.uint64)
        nbuf = np.empty(max(d, N) + 2, np.float64)
        bidx = np.empty(L, np.int64)
        Et = np.empty((T, D), dt)
        Cs = np.empty((nd + 1, D, D), dt)
        CBs = np.empty((nm, H, D, D), dt)
        Ms = np.empty((nm, D, D), dt)
        LCs = np.empty((nm, D, D), dt)
        qs = np.empty((nd + 1, D), dt)
        Wk = np.empty((8, D, D), dt)
        Vv = np.empty((10, D), dt)
        HV = np.empty((5, H, D), dt)
        ms = np.empty((4, D), np.float64)
        TU = np.empty((2 * Pmax + 1, D), dt)
        TV = np.empty((2 * Pmax + 1, D), dt)
        PP = np.empty((4, Pmax, D), dt)
        loss_sum = 0.0
        for blk in range(blk0, blk1):
            j0 = blk * L
            nvalid = min(L, n - j0)
            for l in range(nvalid):
                bidx[l] = tidx[j0 + l]
            if sample:
                sample_block(key, bidx, nvalid, d, N, 1, low, high, w_scale, noise_std, n_dis, f32,
                             E0, yq, Wt, U, ukeys, nbuf)
            else:
                pack_block(E_in, yq_in, bidx, nvalid, E0, yq)
            for l in range(nvalid):
                for i in range(T):
                    for a in range(D):
                        Et[i, a] = E0[i, a, l]
                loss, pred, ok = task_dspace(Et, N, d, yq[0, l], A, Bm, Bt, lidx, has_clip, clipv, Bf, need_grad,
                                             Cs, CBs, Ms, LCs, qs, Wk, Vv, HV, ms, TU, TV, PP,
                                             dA_acc[ch], dB_acc[ch])
                if ok:
                    loss_sum += loss
                    if need_pred:
                        pred_out[j0 + l, 0] = pred
                else:
                    failed[j0 + l] = True
        loss_out[ch] = loss_sum
