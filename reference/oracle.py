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
