"""The CuPy backend's LSA model math: the covariance form, a few batched matmuls per layer.

Generic over the array namespace (``xp``): the CuPy backend runs it on the device
(cuBLAS batched GEMMs), and the CPU tests run the very same code on NumPy against
``reference.lsa`` / ``reference.model``, which in turn are tested against the loop
oracle. Context-only attention (the paper's regression setting) only; the causal mask
does not factor this way, so causal stacks stay on the reference code.

The rewrite (von Oswald et al. 2023, Eq. 6 with keys/values from the N context
tokens). With merged heads KQ_h = W_K,h^T W_Q,h and PV_h = P_h W_V,h (both D x D),

    delta_j = sum_h PV_h (sum_i e_i e_i^T) KQ_h e_j = M e_j,
    C = E_ctx^T E_ctx                 (B, D, D)   the per-task context covariance
    M = sum_h PV_h C KQ_h             (B, D, D)
    pre = E + E M^T                   (B, T, D)   (tokens as rows)

so a layer costs O(B (N D^2 + H D^3)) instead of O(B H T N D) for the attention form,
and no (B, H, T, N) score array is ever made. The backward, walking that in reverse
(dM is dL/dM etc.; C is symmetric):

    dE   = dpre + dpre M                        (residual and E M^T)
    dM_b = dpre_b^T E_b
    dPV_h = sum_b dM_b (C_b KQ_h)^T = sum_b dM_b Z_bh^T     with Z_bh = C_b KQ_h
    dZ_bh = PV_h^T dM_b
    dKQ_h = sum_b C_b dZ_bh
    dC_b  = sum_h dZ_bh KQ_h^T
    dE_ctx += E_ctx (dC + dC^T)

and for factored heads, from KQ = W_K^T W_Q and PV = P W_V:
dW_Q = W_K dKQ, dW_K = W_Q dKQ^T, dP = dPV W_V^T, dW_V = P^T dPV.

The last layer of a training step only needs the query token (the readout), so its
``pre`` is computed for that row alone (``query_only``).
"""

from typing import NamedTuple

from ..layers.lsa import MergedParams


class Merged(NamedTuple):
    KQ: object  # (H, D, D)
    PV: object  # (H, D, D)


def merge(layer, xp):
    """Merged head products of one layer's params (LSAParams or MergedParams)."""
    if isinstance(layer, MergedParams):
        return Merged(layer.W_KQ, layer.W_PV)
    KQ = xp.matmul(xp.swapaxes(layer.W_K, 1, 2), layer.W_Q)            # (H, D, D)
    PV = xp.matmul(layer.P, layer.W_V)                                 # (H, D, D)
    return Merged(KQ, PV)


def unmerge_grads(layer, dKQ, dPV, xp):
    """Gradients of the layer's own params from dKQ, dPV (H, D, D): the chain rule
    through KQ = W_K^T W_Q and PV = P W_V. Returns the params' type."""
    if isinstance(layer, MergedParams):
        return MergedParams(dKQ, dPV)
    W_Q, W_K, W_V, P = layer
    dW_Q = xp.matmul(W_K, dKQ)                                         # (H, Kd, D)
    dW_K = xp.matmul(W_Q, xp.swapaxes(dKQ, 1, 2))                      # (H, Kd, D)
    dW_V = xp.matmul(xp.swapaxes(P, 1, 2), dPV)                        # (H, Vd, D)
    dP = xp.matmul(dPV, xp.swapaxes(W_V, 1, 2))                        # (H, D, Vd)
    return type(layer)(dW_Q, dW_K, dW_V, dP)


class CovCache(NamedTuple):
    E: object     # (B, T, D) layer input
    C: object     # (B, D, D) context covariance
    Z: object     # (B, H, D, D) C_b KQ_h
    M: object     # (B, D, D)
    pre: object   # (B, T, D), or (B, D) when query_only: before clipping (None if no clip)
    query_only: bool


def layer_forward(E, mp, clip, query_only, xp):
    """One context-only LSA layer in covariance form.

    Returns (out, cache): out (B, T, D), or the query token (B, D) if ``query_only``.
    """
    N = E.shape[1] - 1
    Ec = E[:, :N]                                                      # (B, N, D)
    C = xp.matmul(xp.swapaxes(Ec, 1, 2), Ec)                           # (B, D, D)
    Z = xp.matmul(C[:, None], mp.KQ[None])                             # (B, H, D, D)
    M = xp.matmul(mp.PV[None], Z).sum(axis=1)                          # (B, D, D)
    if query_only:
        e_q = E[:, N]                                                  # (B, D)
        pre = e_q + xp.matmul(M, e_q[:, :, None])[:, :, 0]             # (B, D)
    else:
        pre = E + xp.matmul(E, xp.swapaxes(M, 1, 2))                   # (B, T, D)
    if clip is None:
        return pre, CovCache(E, C, Z, M, None, query_only)
    return xp.clip(pre, -clip, clip), CovCache(E, C, Z, M, pre, query_only)


def layer_backward(dout, cache, mp, clip, need_dE, xp):
    """Backward of :func:`layer_forward`. ``dout`` has the forward output's shape.

    Returns (dE (B, T, D) or None, dKQ (H, D, D), dPV (H, D, D)).
    """
    E, C, Z, M, pre, query_only = cache
    N = E.shape[1] - 1
    # forward: out = clip(pre), so dpre = dout where -c <= pre <= c, else 0
    dpre = dout if clip is None else dout * ((pre >= -clip) & (pre <= clip))
    # forward: pre = E + E M^T, so dM = dpre^T E and dE = dpre + dpre M
    if query_only:
        e_q = E[:, N]                                                  # (B, D)
        dM = dpre[:, :, None] * e_q[:, None, :]                        # (B, D, D)
    else:
        dM = xp.matmul(xp.swapaxes(dpre, 1, 2), E)                     # (B, D, D)
    # forward: M = sum_h PV_h Z_h, Z_h = C KQ_h
    dPV = xp.tensordot(dM, Z, axes=([0, 2], [0, 3])).transpose(1, 0, 2)  # (H, D, D)
    dZ = xp.matmul(xp.swapaxes(mp.PV, 1, 2)[None], dM[:, None])        # (B, H, D, D)
    dKQ = xp.tensordot(C, dZ, axes=([0, 2], [0, 2])).transpose(1, 0, 2)  # (H, D, D)
    if not need_dE:
        return None, dKQ, dPV
    if query_only:
        dE = xp.zeros(E.shape, dtype=E.dtype)                          # (B, T, D)
        dE[:, N] = dpre + xp.matmul(dpre[:, None, :], M)[:, 0]
    else:
        dE = dpre + xp.matmul(dpre, M)                                 # (B, T, D)
    # forward: C = E_ctx^T E_ctx, so dE_ctx = E_ctx (dC + dC^T)
    dC = xp.matmul(dZ, xp.swapaxes(mp.KQ, 1, 2)[None]).sum(axis=1)     # (B, D, D)
    Ec = E[:, :N]
    dE[:, :N] += xp.matmul(Ec, dC + xp.swapaxes(dC, 1, 2))             # (B, N, D)
    return dE, dKQ, dPV


def model_forward(E, layers, arch, xp, query_only_last=False):
    """K layers (``arch.n_layers``; layer k uses ``layers[arch.layer_index(k)]``).

    Returns (out, caches, merged): out (B, T, D), or the final query token (B, D)
    when ``query_only_last``."""
    merged = [merge(p, xp) for p in layers]
    caches = []
    h = E
    K = arch.n_layers
    for k in range(K):
        h, c = layer_forward(h, merged[arch.layer_index(k)], arch.clip, query_only_last and k == K - 1, xp)
        caches.append(c)
    return h, caches, merged


def loss_and_grads(E, y_q, layers, arch, d, xp, half_mean_sumsq, need_dE=False):
    """Loss L = 0.5 mean_b ||y_hat_b - y_q,b||^2 (y_hat = -query y-slot) and the
    gradients of every layer's params, by the covariance form.

    ``half_mean_sumsq(err)`` computes the loss (a fused kernel on the device).
    Returns (L 0-d, grads tuple like ``layers``, pred (B, d_y), dE or None).
    """
    out_q, caches, merged = model_forward(E, layers, arch, xp, query_only_last=True)
    pred = -out_q[:, d:]                                               # (B, d_y)
    err = pred - y_q                                                   # (B, d_y)
    L = half_mean_sumsq(err)
    # backward: L = 0.5 mean ||err||^2 -> dpred = err / B -> readout: dout_q[d:] = -dpred
    dout = xp.zeros(out_q.shape, dtype=out_q.dtype)                    # (B, D)
    dout[:, d:] = err * (-1.0 / err.shape[0])
    dKQ = [None] * len(layers)
    dPV = [None] * len(layers)
    for k in reversed(range(arch.n_layers)):
        i = arch.layer_index(k)
        dout, gKQ, gPV = layer_backward(dout, caches[k], merged[i], arch.clip, need_dE or k > 0, xp)
        dKQ[i] = gKQ if dKQ[i] is None else dKQ[i] + gKQ
        dPV[i] = gPV if dPV[i] is None else dPV[i] + gPV
    grads = tuple(unmerge_grads(p, a, b, xp) for p, a, b in zip(layers, dKQ, dPV))
    return L, grads, pred, dout if need_dE else None
