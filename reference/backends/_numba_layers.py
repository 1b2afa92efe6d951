"""LSA layer kernels of the Numba backend, on blocks of tasks in "lane" layout (private).

The readable spec is ``reference/lsa.py``; these kernels compute the same function and
are tested against it and the loop oracle (``tests/test_numba_backend.py``).

Layout. A block holds L tasks ("lanes"); every per-task array carries the task as its
LAST axis: tokens E (T, D, L), a per-task matrix C (D, D, L). Each formula below is a
loop nest whose innermost loop runs over the L lanes (or over a contiguous run of
lanes and columns), which LLVM vectorises. Shared weights (the same for every task)
are plain (D, D) matrices read as scalars.

Algebra (merged form, per head h, A_h = P_h W_V,h = W_PV,h and B_h = W_K,h^T W_Q,h =
W_KQ,h; factored parameters are merged by the caller and their gradients recovered by
the chain rule, ``numba_backend``):

    delta_j = sum_h A_h sum_{i in ctx(j)} e_i (e_i . B_h e_j)

* context-only layers whose every token is needed ("full"), covariance form:
  C = E_ctx^T E_ctx (D x D per task), M = sum_h A_h C B_h, pre_j = e_j + M e_j. Costs
  O(N D^2 + H D^3) per task instead of the attention form's O(T N D + H T D^2).
* causal full layers, attention form: S_h[j, i] = e_i . B_h e_j (i <= j), O_h = S_h E,
  pre_j = e_j + sum_h A_h O_h[j].
* the LAST layer when only the prediction is needed ("query-only"): only the query
  token's y-slot is read, so u_h = B_h e_q, s_h[i] = e_i . u_h, w_h = sum_i s_h[i] e_i,
  pre_q[y] = e_q[y] + sum_h A_h[y, :] w_h: O(S D + D^2) per task. (Context-only: S =
  the N context tokens; causal: the query attends to all T tokens, itself included.)

Each backward walks its forward in reverse and quotes the line it differentiates.
Gradients of the shared weights are summed over the lanes into float64 accumulators.
"""

from numba import njit

from .config import KERNEL


# ---------------------------------------------------------------- primitives --------
# X, Y, Z below are lane arrays (rows, cols, L), C-contiguous; W a shared matrix.

@njit(**KERNEL)
def sl(W, Y2, Z2, acc):
    """Shared-left product on flattened rows: Z2[r] (+)= sum_k W[r, k] Y2[k].

    Y2 (K, n), Z2 (R, n) contiguous (n = columns * lanes); W (R, K) any layout.
    """
    R, K = W.shape
    n = Y2.shape[1]
    for r in range(R):
        z = Z2[r]
        if not acc:
            for t in range(n):
                z[t] = 0
        k = 0
        while k + 4 <= K:
            w0 = W[r, k]
            w1 = W[r, k + 1]
            w2 = W[r, k + 2]
            w3 = W[r, k + 3]
            y0 = Y2[k]
            y1 = Y2[k + 1]
            y2 = Y2[k + 2]
            y3 = Y2[k + 3]
            for t in range(n):
                z[t] += w0 * y0[t] + w1 * y1[t] + w2 * y2[t] + w3 * y3[t]
            k += 4
        while k < K:
            w0 = W[r, k]
            y0 = Y2[k]
            for t in range(n):
                z[t] += w0 * y0[t]
            k += 1


@njit(**KERNEL)
def sl3(W, Y, Z, acc):
    """Z[r] (+)= sum_k W[r, k] Y[k] for lane matrices Y (K, J, L), Z (R, J, L)."""
    K, J, L = Y.shape
    sl(W, Y.reshape((K, J * L)), Z.reshape((Z.shape[0], J * L)), acc)


@njit(**KERNEL)
def tok_sl(W, X, Z, acc):
    """Per token t: Z[t, a] (+)= sum_c W[a, c] X[t, c]   (X (T, C, L), Z (T, A, L))."""
    T = X.shape[0]
    for t in range(T):
        sl(W, X[t], Z[t], acc)


@njit(**KERNEL)
def lmm(X, Y, Z, acc):
    """Per lane: Z[i, j] (+)= sum_k X[i, k] Y[k, j]   (X (I, K, L), Y (K, J, L))."""
    I, K, L = X.shape
    J = Y.shape[1]
    for i in range(I):
        zi = Z[i]
        if not acc:
            zi[:] = 0
        k = 0
        while k + 4 <= K:
            x0 = X[i, k]
            x1 = X[i, k + 1]
            x2 = X[i, k + 2]
            x3 = X[i, k + 3]
            for j in range(J):
                z = zi[j]
                a0 = Y[k, j]
                a1 = Y[k + 1, j]
                a2 = Y[k + 2, j]
                a3 = Y[k + 3, j]
                for l in range(L):
                    z[l] += x0[l] * a0[l] + x1[l] * a1[l] + x2[l] * a2[l] + x3[l] * a3[l]
            k += 4
        while k < K:
            x0 = X[i, k]
            for j in range(J):
                z = zi[j]
                a0 = Y[k, j]
                for l in range(L):
                    z[l] += x0[l] * a0[l]
            k += 1


@njit(**KERNEL)
def lmm_tn(X, Y, Z, acc):
    """Per lane: Z[i, j] (+)= sum_k X[k, i] Y[k, j]   (X (K, I, L), Y (K, J, L))."""
    K, I, L = X.shape
    J = Y.shape[1]
    if not acc:
        Z[:] = 0
    k = 0
    while k + 4 <= K:
        for i in range(I):
            zi = Z[i]
            x0 = X[k, i]
            x1 = X[k + 1, i]
            x2 = X[k + 2, i]
            x3 = X[k + 3, i]
            for j in range(J):
                z = zi[j]
                a0 = Y[k, j]
                a1 = Y[k + 1, j]
                a2 = Y[k + 2, j]
                a3 = Y[k + 3, j]
                for l in range(L):
                    z[l] += x0[l] * a0[l] + x1[l] * a1[l] + x2[l] * a2[l] + x3[l] * a3[l]
        k += 4
    while k < K:
        for i in range(I):
            zi = Z[i]
            x0 = X[k, i]
            for j in range(J):
                z = zi[j]
                a0 = Y[k, j]
                for l in range(L):
                    z[l] += x0[l] * a0[l]
        k += 1


@njit(**KERNEL)
def lmm_nt(X, Y, Z, acc):
    """Per lane: Z[i, j] (+)= sum_k X[i, k] Y[j, k]   (X (I, K, L), Y (J, K, L))."""
    I, K, L = X.shape
    J = Y.shape[0]
    for i in range(I):
        for j in range(J):
            z = Z[i, j]
            if not acc:
                z[:] = 0
            k = 0
            while k + 4 <= K:
                x0 = X[i, k]
                x1 = X[i, k + 1]
                x2 = X[i, k + 2]
                x3 = X[i, k + 3]
                a0 = Y[j, k]
                a1 = Y[j, k + 1]
                a2 = Y[j, k + 2]
                a3 = Y[j, k + 3]
                for l in range(L):
                    z[l] += x0[l] * a0[l] + x1[l] * a1[l] + x2[l] * a2[l] + x3[l] * a3[l]
                k += 4
            while k < K:
                x0 = X[i, k]
                a0 = Y[j, k]
                for l in range(L):
                    z[l] += x0[l] * a0[l]
                k += 1


@njit(**KERNEL)
def gacc(X, Y, Out):
    """Sum over lanes into a shared gradient: Out[i, j] += sum_{k, l} X[i, k, l] Y[j, k, l].

    X (I, K, L), Y (J, K, L) contiguous; Out (I, J) float64. The inner sum runs over
    the contiguous K*L entries of a row (a vectorised dot product).
    """
    I, K, L = X.shape
    J = Y.shape[0]
    n = K * L
    X2 = X.reshape((I, n))
    Y2 = Y.reshape((J, n))
    for i in range(I):
        x = X2[i]
        for j in range(J):
            y = Y2[j]
            s = x[0] * y[0]
            for t in range(1, n):
                s += x[t] * y[t]
            Out[i, j] += s


@njit(**KERNEL)
def ltrans(X, Z):
    """Per lane transpose: Z[j, i] = X[i, j]   (X (I, J, L), Z (J, I, L))."""
    I, J, L = X.shape
    for i in range(I):
        for j in range(J):
            x = X[i, j]
            z = Z[j, i]
            for l in range(L):
                z[l] = x[l]


@njit(**KERNEL)
def clip_into(pre, out, has_clip, c):
    """out = clip(pre, -c, c) (or a copy): the reference's ``clip_tokens``."""
    p = pre.ravel()
    o = out.ravel()
    if has_clip:
        for t in range(p.size):
            v = p[t]
            if v > c:
                v = c
            elif v < -c:
                v = -c
            o[t] = v
    else:
        for t in range(p.size):
            o[t] = p[t]


@njit(**KERNEL)
def clip_mask_inplace(dout, pre, has_clip, c):
    """dpre = dout where -c <= pre <= c else 0: the reference's ``clip_backward``."""
    if has_clip:
        g = dout.ravel()
        p = pre.ravel()
        for t in range(g.size):
            v = p[t]
            if v > c or v < -c:
                g[t] = 0


# ------------------------------------------------- context-only full layer (cov form)

@njit(**KERNEL)
def ctx_full_forward(E, A, Bm, N, has_clip, c, C, CB, M, tmp, pre, out):
    """One context-only layer, every token out. E (T, D, L); A, Bm (H, D, D).

    Stores C (D, D, L), CB (H, D, D, L) = C B_h, M (D, D, L), pre (T, D, L) for the backward.
    """
    H = A.shape[0]
    # C = E_ctx^T E_ctx                                               (D, D, L)
    lmm_tn(E[:N], E[:N], C, False)
    M[:] = 0
    for h in range(H):
        # C B_h = (B_h^T C)^T since C is symmetric                    (D, D, L)
        sl3(Bm[h].T, C, tmp, False)
        ltrans(tmp, CB[h])
        # M += A_h (C B_h)                                            (D, D, L)
        sl3(A[h], CB[h], M, True)
    # pre_j = e_j + M e_j, i.e. pre = E + E M^T                       (T, D, L)
    lmm_nt(E, M, pre, False)
    pe = pre.ravel()
    ee = E.ravel()
    for t in range(pe.size):
        pe[t] += ee[t]
    clip_into(pre, out, has_clip, c)


@njit(**KERNEL)
def ctx_full_backward(dout, E, A, Bm, N, has_clip, c, C, CB, M, pre, need_dE, dE, dA, dB,
                      G, V, Vt, dCt, S):
    """Backward of :func:`ctx_full_forward`. ``dout`` is overwritten (it becomes dpre).

    Adds this block's dA_h, dB_h (float64 (H, D, D)); writes dE (T, D, L) if need_dE.
    """
    H = A.shape[0]
    T, D, L = E.shape
    # forward: out = clip(pre), so dpre = dout where -c <= pre <= c
    clip_mask_inplace(dout, pre, has_clip, c)
    dpre = dout
    # forward: pre = E + E M^T, so dM = G = dpre^T E                  (D, D, L)
    lmm_tn(dpre, E, G, False)
    if need_dE:
        # ... and dE = dpre + dpre M                                   (T, D, L)
        lmm(dpre, M, dE, False)
        de = dE.ravel()
        dp = dpre.ravel()
        for t in range(de.size):
            de[t] += dp[t]
        S[:] = 0
    for h in range(H):
        # forward: M += A_h (C B_h), so dA_h = G (C B_h)^T              (shared, summed over lanes)
        gacc(G, CB[h], dA[h])
        # ... and dB_h = (A_h C)^T G = C V with V = A_h^T G             (D, D, L)
        sl3(A[h].T, G, V, False)
        ltrans(V, Vt)
        gacc(C, Vt, dB[h])
        if need_dE:
            # ... and dC = A_h^T G B_h^T = V B_h^T; dCt = B_h V^T = dC^T   (D, D, L)
            sl3(Bm[h], Vt, dCt, False)
            for a in range(D):
                for b in range(D):
                    s = S[a, b]
                    x = dCt[a, b]
                    y = dCt[b, a]
                    for l in range(L):
                        s[l] += x[l] + y[l]
    if need_dE:
        # forward: C = E_ctx^T E_ctx, so dE_ctx += E_ctx (dC + dC^T)    (N, D, L)
        lmm_nt(E[:N], S, dE[:N], True)


# ---------------------------------------------------- causal full layer (attention form)

@njit(**KERNEL)
def causal_full_forward(E, A, Bm, has_clip, c, Q, Sc, O, pre, out):
    """One causal layer (token j attends to i <= j), every token out.

    Stores Q, O (H, T, D, L), Sc (H, T, T, L) (masked), pre (T, D, L).
    """
    H = A.shape[0]
    T, D, L = E.shape
    pre[:] = E
    for h in range(H):
        # q_j = B_h e_j                                                (T, D, L)
        tok_sl(Bm[h], E, Q[h], False)
        # S[j, i] = e_i . q_j for i <= j, 0 above the diagonal          (T, T, L)
        lmm_nt(Q[h], E, Sc[h], False)
        for j in range(T):
            for i in range(j + 1, T):
                Sc[h, j, i] = 0
        # O = S E                                                      (T, D, L)
        lmm(Sc[h], E, O[h], False)
        # pre_j += A_h O[j]                                            (T, D, L)
        tok_sl(A[h], O[h], pre, True)
    clip_into(pre, out, has_clip, c)


@njit(**KERNEL)
def causal_full_backward(dout, E, A, Bm, has_clip, c, Q, Sc, O, pre, need_dE, dE, dA, dB,
                         dO, dS, dQ, tA, tB, ET):
    """Backward of :func:`causal_full_forward`. ``dout`` becomes dpre. Scratch: dO, dQ
    (T, D, L), dS (T, T, L), tA, tB, ET (D, T, L)."""
    H = A.shape[0]
    T, D, L = E.shape
    # forward: out = clip(pre)
    clip_mask_inplace(dout, pre, has_clip, c)
    dpre = dout
    # forward: pre = E + sum_h ..., so dE = dpre (residual)
    if need_dE:
        dE[:] = dpre
    ltrans(dpre, tA)                                                  # (D, T, L)
    ltrans(E, ET)                                                     # (D, T, L)
    for h in range(H):
        # forward: pre_j += A_h O[j], so dA_h = sum_j dpre_j O_j^T and dO_j = A_h^T dpre_j
        ltrans(O[h], tB)
        gacc(tA, tB, dA[h])
        tok_sl(A[h].T, dpre, dO, False)
        # forward: O = S E, so dS = dO E^T (masked like S) and dE += S^T dO (value path)
        lmm_nt(dO, E, dS, False)
        for j in range(T):
            for i in range(j + 1, T):
                dS[j, i] = 0
        if need_dE:
            lmm_tn(Sc[h], dO, dE, True)
        # forward: S[j, i] = e_i . q_j, so dq_j = sum_i dS[j, i] e_i, dE_i += sum_j dS[j, i] q_j
        lmm(dS, E, dQ, False)
        if need_dE:
            lmm_tn(dS, Q[h], dE, True)
        # forward: q_j = B_h e_j, so dB_h = sum_j dq_j e_j^T and dE_j += B_h^T dq_j
        ltrans(dQ, tB)
        gacc(tB, ET, dB[h])
        if need_dE:
            tok_sl(Bm[h].T, dQ, dE, True)


# ------------------------------------------------------------- query-only last layer

@njit(**KERNEL)
def query_last_forward(E, A, Bm, nS, d, u, s, w, preq):
    """The last layer when only the prediction is read. E (T, D, L), query = E[T-1].

    u, w (H, D, L), s (H, T, L); preq (D, L): rows d.. hold the query's y-slot before
    clipping (rows < d are not computed).
    """
    H = A.shape[0]
    T, D, L = E.shape
    q = E[T - 1]
    for r in range(d, D):
        preq[r, :] = q[r, :]
    for h in range(H):
        # u = B_h e_q                                                  (D, L)
        sl(Bm[h], q, u[h], False)
        # s[i] = e_i . u  for the nS key tokens                        (nS, L)
        for i in range(nS):
            si = s[h, i]
            si[:] = 0
            for a in range(D):
                ea = E[i, a]
                ua = u[h, a]
                for l in range(L):
                    si[l] += ea[l] * ua[l]
        # w = sum_i s[i] e_i                                           (D, L)
        for a in range(D):
            wa = w[h, a]
            wa[:] = 0
            for i in range(nS):
                ea = E[i, a]
                si = s[h, i]
                for l in range(L):
                    wa[l] += si[l] * ea[l]
        # pre_q[y] += A_h[y, :] w                                      (d_y, L)
        sl(A[h][d:], w[h], preq[d:], True)


@njit(**KERNEL)
def query_last_backward(g, E, A, Bm, nS, d, u, s, w, need_dE, dE, dA, dB, r, ds, du):
    """Backward of :func:`query_last_forward` for g = dL/dpre_q (D, L), zero in rows < d.

    Adds dA_h, dB_h (float64); if need_dE writes dE (T, D, L) (zero outside the key
    tokens and the query). Scratch: r, du (D, L), ds (T, L).
    """
    H = A.shape[0]
    T, D, L = E.shape
    q = E[T - 1]
    if need_dE:
        dE[:] = 0
        # forward: pre_q = e_q + ..., residual
        dq = dE[T - 1]
        for a in range(d, D):
            dq[a, :] = g[a, :]
    for h in range(H):
        # forward: pre_q[y] += A_h[y, :] w, so dA_h[y, :] = sum_l g[y] w^T and dw = A_h[y, :]^T g[y]
        gacc(g[d:].reshape((D - d, 1, L)), w[h].reshape((D, 1, L)), dA[h][d:])
        sl(A[h][d:].T, g[d:], r, False)
        # forward: w = sum_i s[i] e_i, so ds[i] = r . e_i (and dE_i += s[i] r: value path)
        for i in range(nS):
            dsi = ds[i]
            dsi[:] = 0
            for a in range(D):
                ea = E[i, a]
                ra = r[a]
                for l in range(L):
                    dsi[l] += ea[l] * ra[l]
        # forward: s[i] = e_i . u, so du = sum_i ds[i] e_i (and dE_i += ds[i] u: key path)
        for a in range(D):
            dua = du[a]
            dua[:] = 0
            for i in range(nS):
                ea = E[i, a]
                dsi = ds[i]
                for l in range(L):
                    dua[l] += dsi[l] * ea[l]
        if need_dE:
            for i in range(nS):
                si = s[h, i]
                dsi = ds[i]
                for a in range(D):
                    de = dE[i, a]
                    ra = r[a]
                    ua = u[h, a]
                    for l in range(L):
                        de[l] += si[l] * ra[l] + dsi[l] * ua[l]
        # forward: u = B_h e_q, so dB_h = sum_l du e_q^T and de_q += B_h^T du
        gacc(du.reshape((D, 1, L)), q.reshape((D, 1, L)), dB[h])
        if need_dE:
            sl(Bm[h].T, du, dE[T - 1], True)
