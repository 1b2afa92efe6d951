"""The slow, loop-level oracle: explicit sums over tasks, tokens and heads.

Nothing clever happens here: each output token is accumulated one context token at
a time, exactly as the equation reads. Every vectorised path (NumPy, Numba, CuPy)
is tested against this file. Use it at tiny sizes only. Each registered layer type
(``reference.layers``) names its oracle here; this file imports no layer module (it
reads parameters by their field names), so the oracles stay independent of the code
they check.
"""

import numpy as np


def oracle_lsa_layer(E, params, causal=False, clip=None):
    """e_j <- e_j + sum_h P_h sum_{i in ctx(j)} (W_V,h e_i) <W_K,h e_i, W_Q,h e_j>, then clip."""
    E = np.asarray(E)
    if hasattr(params, "W_KQ"):                 # merged params (W_KQ, W_PV): W_K = P = identity
        H, D, _ = params.W_KQ.shape
        eye = np.eye(D, dtype=E.dtype)
        heads = [(params.W_KQ[h], eye, params.W_PV[h], eye) for h in range(H)]
    else:
        heads = [(params.W_Q[h], params.W_K[h], params.W_V[h], params.P[h])
                 for h in range(params.W_Q.shape[0])]
    B, T, D = E.shape
    dt = np.result_type(E, *params)           # complex params with real E keep their imaginary part
    out = E.astype(dt)
    for b in range(B):
        for j in range(T):
            ctx = range(j + 1) if causal else range(T - 1)
            for W_Q, W_K, W_V, P in heads:
                q = W_Q @ E[b, j]
                acc = np.zeros(P.shape[1], dtype=dt)
                for i in ctx:
                    score = 0.0
                    k = W_K @ E[b, i]
                    for a in range(q.shape[0]):
                        score = score + k[a] * q[a]
                    acc = acc + score * (W_V @ E[b, i])
                out[b, j] = out[b, j] + P @ acc
            if clip is not None:
                for a in range(D):
                    if out[b, j, a].real > clip:
                        out[b, j, a] = clip
                    elif out[b, j, a].real < -clip:
                        out[b, j, a] = -clip
    return out


def oracle_model(E, params, arch):
    """The K layers of ``arch``, each through its layer type's loop oracle (the
    parameter set ``arch.layer_index(k)`` for layer k)."""
    h = np.asarray(E)
    for k, spec in enumerate(arch.layers):
        h = spec.oracle(h, params[arch.layer_index(k)])
    return h


def oracle_gd(X, Y, x_q, eta, n_steps=1, W_0=None):
    """GD-K by explicit loops: W <- W - (eta/N) sum_i (W x_i - y_i) x_i^T. Returns y_hat (B, d_y)."""
    X, Y, x_q = (np.asarray(a) for a in (X, Y, x_q))
    B, N, d = X.shape
    d_y = Y.shape[2]
    preds = np.zeros((B, d_y), dtype=X.dtype)
    for b in range(B):
        W = np.zeros((d_y, d), dtype=X.dtype) if W_0 is None else np.array(W_0, dtype=X.dtype)
        for _ in range(n_steps):
            grad = np.zeros((d_y, d), dtype=X.dtype)
            for i in range(N):
                r = W @ X[b, i] - Y[b, i]
                grad = grad + np.outer(r, X[b, i])
            W = W - (eta / N) * grad
        preds[b] = W @ x_q[b]
    return preds


def oracle_loss(pred, y_q):
    """0.5 * mean over tasks of the squared error summed over label dims."""
    pred, y_q = np.asarray(pred), np.asarray(y_q)
    total = 0.0
    for b in range(pred.shape[0]):
        for a in range(pred.shape[1]):
            total = total + 0.5 * (pred[b, a] - y_q[b, a]) ** 2
    return total / pred.shape[0]


# ---- the layer types after LSA (reference/layers/softmax.py, mlp.py, embed.py, posenc.py,
# pre_ln.py with layernorm.py): one token, one head, one feature at a time ---------------

def oracle_softmax_layer(E, params, causal=False, clip=None):
    """e_j <- e_j + sum_h P_h sum_{i in ctx(j)} a_h[j, i] (W_V,h e_i), with
    a_h[j, :] = softmax over i in ctx(j) of <W_Q,h e_j, W_K,h e_i> / sqrt(Kd); the
    largest real part of the row's logits subtracted before exp; then clip."""
    E = np.asarray(E)
    B, T, D = E.shape
    H, Kd, _ = params.W_Q.shape
    dt = np.result_type(E, *params)
    out = E.astype(dt)
    for b in range(B):
        for j in range(T):
            ctx = list(range(j + 1)) if causal else list(range(T - 1))
            for h in range(H):
                q = params.W_Q[h] @ E[b, j]
                logits = []
                for i in ctx:
                    k = params.W_K[h] @ E[b, i]
                    score = 0.0
                    for a in range(Kd):
                        score = score + q[a] * k[a]
                    logits.append(score / np.sqrt(Kd))
                top = max(z.real for z in logits)
                weights = [np.exp(z - top) for z in logits]
                total = sum(weights)
                acc = np.zeros(params.W_V.shape[1], dtype=dt)
                for w, i in zip(weights, ctx):
                    acc = acc + (w / total) * (params.W_V[h] @ E[b, i])
                out[b, j] = out[b, j] + params.P[h] @ acc
            out[b, j] = _oracle_clip(out[b, j], clip)
    return out


def _oracle_clip(e, clip):
    """clip(e, -c, c) entry by entry, decided on real parts."""
    e = e.copy()
    if clip is not None:
        for a in range(e.shape[0]):
            if e[a].real > clip:
                e[a] = clip
            elif e[a].real < -clip:
                e[a] = -clip
    return e


def oracle_erf(z):
    """erf of one (real or complex) number: (2/sqrt(pi)) exp(-z^2) sum_n 2^n z^(2n+1) /
    (1 * 3 * ... * (2n+1)), terms added until they stop changing the sum; +-1 for
    |Re z| > 6."""
    if abs(z.real) > 6.0:
        return 1.0 if z.real > 0 else -1.0
    term, total, n = z, z, 0
    while True:
        term = term * 2 * z * z / (2 * n + 3)
        n += 1
        if total + term == total:
            return 2 / np.sqrt(np.pi) * np.exp(-z * z) * total
        total = total + term


def oracle_gelu(x, form="tanh"):
    """GELU of one number: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) or
    0.5 x (1 + erf(x / sqrt 2)); x above 10 (real part) stays, below -10 gives 0."""
    if x.real > 10.0:
        return x
    if x.real < -10.0:
        return 0.0 * x
    if form == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1 + oracle_erf(x / np.sqrt(2)))


def oracle_mlp_layer(E, params, gelu="tanh", clip=None):
    """e <- clip(e + W_2 gelu(W_1 e + b_1) + b_2), every token; no biases for
    params without b_1, b_2."""
    E = np.asarray(E)
    B, T, D = E.shape
    w = params.W_1.shape[0]
    bias = hasattr(params, "b_1")
    dt = np.result_type(E, *params)
    out = E.astype(dt)
    for b in range(B):
        for j in range(T):
            hidden = []
            for u in range(w):
                s = params.b_1[u] if bias else 0.0
                for a in range(D):
                    s = s + params.W_1[u, a] * E[b, j, a]
                hidden.append(oracle_gelu(np.asarray(s, dtype=dt)[()], gelu))
            for a in range(D):
                s = params.b_2[a] if bias else 0.0
                for u in range(w):
                    s = s + params.W_2[a, u] * hidden[u]
                out[b, j, a] = out[b, j, a] + s
            out[b, j] = _oracle_clip(out[b, j], clip)
    return out


def oracle_embed_layer(E, params):
    """out_j = W e_j (+ b), every token."""
    E = np.asarray(E)
    B, T, D = E.shape
    D_out = params.W.shape[0]
    out = np.zeros((B, T, D_out), dtype=np.result_type(E, *params))
    for b in range(B):
        for j in range(T):
            for o in range(D_out):
                s = params.b[o] if hasattr(params, "b") else 0.0
                for a in range(D):
                    s = s + params.W[o, a] * E[b, j, a]
                out[b, j, o] = s
    return out


def oracle_posenc_layer(E, mode="add", width=None):
    """Tokens plus (or followed by) pe[t, c] = sin or cos (c even or odd) of
    t / 10000^(2 floor(c/2) / P), token position t = 0 .. T-1."""
    E = np.asarray(E)
    B, T, D = E.shape
    P = D if (mode == "add" or width is None) else width
    pe = np.zeros((T, P))
    for t in range(T):
        for c in range(P):
            angle = t / 10000.0 ** (2 * (c // 2) / P)
            pe[t, c] = np.sin(angle) if c % 2 == 0 else np.cos(angle)
    if mode == "add":
        return E + pe.astype(E.dtype)
    out = np.zeros((B, T, D + P), dtype=E.dtype)
    for b in range(B):
        for t in range(T):
            out[b, t, :D] = E[b, t]
            out[b, t, D:] = pe[t]
    return out


def oracle_layernorm(E, scale, offset, eps=1e-5):
    """Per token: scale * (e - mean) / sqrt(mean((e - mean)^2) + eps) + offset."""
    E = np.asarray(E)
    B, T, D = E.shape
    out = np.zeros(E.shape, dtype=np.result_type(E, scale, offset))
    for b in range(B):
        for t in range(T):
            mu = sum(E[b, t, a] for a in range(D)) / D
            var = sum((E[b, t, a] - mu) * (E[b, t, a] - mu) for a in range(D)) / D
            for a in range(D):
                out[b, t, a] = scale[a] * (E[b, t, a] - mu) / np.sqrt(var + eps) + offset[a]
    return out


def oracle_pre_ln_residual(E, n, y, clip=None):
    """The pre-LN residual: e + (y - n), then clip, token by token (n = LN(e) and
    y = the block's oracle output on n)."""
    E = np.asarray(E)
    out = np.zeros(y.shape, dtype=np.result_type(E, n, y))
    for b in range(E.shape[0]):
        for t in range(E.shape[1]):
            out[b, t] = _oracle_clip(E[b, t] + (y[b, t] - n[b, t]), clip)
    return out


def oracle_gd_layer(E, eta=0.1, d_y=1):
    """Loop oracle of the frozen GD layer (layer kind ``"gd"``): every token's last d_y
    features get -(eta / N) sum_j y_j (x_j . x_i) over the N = T - 1 context tokens."""
    B, T, D = E.shape
    N, d = T - 1, D - d_y
    out = E.copy()
    for b in range(B):
        for i in range(T):
            for j in range(N):
                dot = 0.0
                for a in range(d):
                    dot = dot + E[b, j, a] * E[b, i, a]
                for c in range(d_y):
                    out[b, i, d + c] = out[b, i, d + c] - (eta / N) * E[b, j, d + c] * dot
    return out


# ---- the mesa layer and the delta rule (reference/layers/mesa.py, delta.py): one head,
# one token at a time, the ridge solve by Gaussian elimination ---------------------------

def _oracle_solve(A, b):
    """x with A x = b by Gaussian elimination without pivoting (A symmetric positive
    definite), entry by entry."""
    n = len(b)
    M = [[A[i][j] for j in range(n)] + [b[i]] for i in range(n)]
    for col in range(n):
        for row in range(col + 1, n):
            f = M[row][col] / M[col][col]
            for j in range(col, n + 1):
                M[row][j] = M[row][j] - f * M[col][j]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        s = M[i][n]
        for j in range(i + 1, n):
            s = s - M[i][j] * x[j]
        x[i] = s / M[i][i]
    return x


def oracle_mesa_layer(E, params, forget=None):
    """e_t <- e_t + sum_h P_h Phi_t q_t with Phi_t = M_t A_t^{-1},
    M_t = sum_{s<=t} g^(t-s) v_s k_s^T, A_t = g^t I / lam_h + sum_{s<=t} g^(t-s) k_s k_s^T
    (t counted from 1; g = forget, 1 when None), every sum written out."""
    E = np.asarray(E)
    B, T, D = E.shape
    H, Kd, _ = params.W_Q.shape
    Vd = params.W_V.shape[1]
    g = 1.0 if forget is None else forget
    dt = np.result_type(E, *params)
    out = E.astype(dt)
    for b in range(B):
        for h in range(H):
            ks = [params.W_K[h] @ E[b, s] for s in range(T)]
            vs = [params.W_V[h] @ E[b, s] for s in range(T)]
            for t in range(T):
                A = [[(g ** (t + 1) / params.lam[h] if i == j else 0.0) for j in range(Kd)] for i in range(Kd)]
                M = [[0.0] * Kd for _ in range(Vd)]
                for s in range(t + 1):
                    w = g ** (t - s)
                    for i in range(Kd):
                        for j in range(Kd):
                            A[i][j] = A[i][j] + w * ks[s][i] * ks[s][j]
                    for i in range(Vd):
                        for j in range(Kd):
                            M[i][j] = M[i][j] + w * vs[s][i] * ks[s][j]
                x = _oracle_solve(A, list(params.W_Q[h] @ E[b, t]))
                y = [sum(M[i][j] * x[j] for j in range(Kd)) for i in range(Vd)]
                out[b, t] = out[b, t] + params.P[h] @ np.array(y, dtype=dt)
    return out


def _oracle_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def oracle_delta_layer(E, params, beta=None):
    """S_t = a_t S_{t-1} - b_t (a_t S_{t-1} k_t - v_t) k_t^T from S_0 = 0, e_t <- e_t +
    sum_h P_h S_t q_t; b_t = sigmoid(w_beta . e_t + b_beta) (or the fixed beta), a_t =
    sigmoid(w_alpha . e_t + b_alpha) when the params have a gate, else 1."""
    E = np.asarray(E)
    B, T, D = E.shape
    H, Kd, _ = params.W_Q.shape
    Vd = params.W_V.shape[1]
    gated = hasattr(params, "w_alpha")
    dt = np.result_type(E, *params)
    out = E.astype(dt)
    for b in range(B):
        for h in range(H):
            S = np.zeros((Vd, Kd), dtype=dt)
            for t in range(T):
                e = E[b, t]
                q, k, v = params.W_Q[h] @ e, params.W_K[h] @ e, params.W_V[h] @ e
                bt = beta if beta is not None else _oracle_sigmoid(params.w_beta[h] @ e + params.b_beta[h])
                at = _oracle_sigmoid(params.w_alpha[h] @ e + params.b_alpha[h]) if gated else 1.0
                new = np.zeros((Vd, Kd), dtype=dt)
                for i in range(Vd):
                    pred = 0.0
                    for j in range(Kd):
                        pred = pred + at * S[i, j] * k[j]
                    for j in range(Kd):
                        new[i, j] = at * S[i, j] - bt * (pred - v[i]) * k[j]
                S = new
                o = np.zeros(Vd, dtype=dt)
                for i in range(Vd):
                    for j in range(Kd):
                        o[i] = o[i] + S[i, j] * q[j]
                out[b, t] = out[b, t] + params.P[h] @ o
    return out
