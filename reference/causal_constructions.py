"""Causal hand constructions on sequence tokens (mesa-optimization paper, arXiv 2309.05858,
Prop. 1 and Prop. 2) and the per-time-step baselines they are compared with.

Every construction is a set of weights for the existing layer kind ``"lsa"`` with
``causal=True`` (``reference/layers/lsa.py``: token t attends to t' <= t, diagonal
included), one head, key and value size d. Token layouts and the loss are in
``reference/sequences.py``; 0-based time t = 0 .. T-1, x_{-1} = 0.

**Prop. 1 (causal), one GD step from Phi_0.** On the spec layout e_t = [Phi_0 x_t, x_t, x_{t-1}]:

    W_Q = [0, I, 0],  W_K = [0, 0, I],  W_V = [0, I, -Phi_0]  (d x 3d),  P = eta [I; 0; 0]  (3d x d)

so the first slot of token t becomes
Phi_0 x_t + eta sum_{t'<=t} (x_{t'} - Phi_0 x_{t'-1}) (x_{t'-1} . x_t) = Phi_1(t) x_t, where
Phi_1(t) = Phi_0 - eta grad L_t(Phi_0) for L_t(Phi) = 1/2 sum_{t'<=t} ||x_{t'} - Phi x_{t'-1}||^2
(no 1/t). The other slots are unchanged. On the code's layout [0, x_t, x_t, x_{t-1}] the
same weights read slots 2 (query, value) and 3 (key), so the code's masking of the first
2d input channels changes nothing; that layout has no Phi_0 slot (Phi_0 = 0 only).

**Prop. 2, preconditioned GD: K causal layers approximate A_t^{-1} x_t, then one GD layer.**
A_t = C_t + r I, C_t = sum_{t'<=t} x_{t'-1} x_{t'-1}^T, M_t = sum_{t'<=t} x_{t'} x_{t'-1}^T;
the exact ridge prediction is y_ridge_t = M_t A_t^{-1} x_t (the pairs (x_{t'-1}, x_{t'}) seen
up to token t; the first, (0, x_0), adds nothing). A causal LSA layer can only add
sum_{t'<=t} v_{t'} (k_{t'} . q_t) to a token: no token-local linear map (no "+ omega x_t",
no "- omega r u_t"). So the construction **needs K extra slots** and folds the ridge term
into known scalars: tokens e_t = [0, x_t, x_{t-1}, z_1, ..., z_K] of width (3 + K) d, every
z_j initialised to x_t (:func:`precond_tokens`); write z_0 = x_t (slot 1). Layer k = 1..K
(step gamma_k) reads the query from z_{k-1}, keys and values from x_{t-1}, and adds
-gamma_k C_t z_{k-1} to every slot z_j, j >= k:

    W_Q = select(z_{k-1}),  W_K = W_V = select(x_{t-1}),  P = -gamma_k [0; 0; 0; 0..0, I..I]

so after layer k slots z_j (j >= k) hold z_k = (I - gamma_k C_t) z_{k-1}, exactly. The last
layer is a GD step with the query u_t = sum_j c_j z_j (W_Q = sum_j c_j select(z_j)),
W_K = select(x_{t-1}), W_V = select(x_t), P = [I; 0; ...]: its first slot is M_t u_t.
Any polynomial u_t = p(A_t) x_t of degree <= K is reached by the coefficients c_j
(:func:`polynomial_coefficients`, a triangular change of basis since z_j = b_j(A_t) x_t
with b_j(lam) = prod_{i<=j} (1 - gamma_i (lam - r))). Instances:

* **Neumann** (stationary Richardson, step omega): u_k = omega sum_{j<=k} (I - omega A)^j x;
  gamma_i = omega / (1 - omega r), c_j = omega (1 - omega r)^j. Error
  A^{-1} x - u_k = (I - omega A)^{k+1} A^{-1} x, so ||err_k|| <= rho^{k+1} ||A^{-1} x||,
  rho = max_i |1 - omega lam_i(A_t)| < 1 for 0 < omega < 2 / lam_max.
* **Richardson** (non-stationary, steps omega_0 .. omega_K): u_{k+1} = u_k + omega_k (x - A u_k)
  from u_0 = 0; gamma_i = omega_{i-1} / (1 - omega_{i-1} r), c_j = omega_j prod_{i<j} (1 - omega_i r).
  ||err_k|| <= max_i |prod_{j<=k} (1 - omega_j lam_i)| ||A^{-1} x|| <= prod_{j<=k} rho_j ||A^{-1} x||.
* **Chebyshev-type (the code's coefficients)**: the official iteration normalises A by
  ||A_t||_F, a data-dependent scalar per token that no fixed weights compute; it is a
  baseline here (:func:`chebyshev_inverse`, as coded). With a fixed normaliser nu in
  place of ||A_t||_F the same recursion is a fixed polynomial and is realised by the
  layers above (:func:`chebyshev_polynomial`); it has no convergence guarantee.

Baselines per time step (:func:`causal_gd_predict`, :func:`ridge_predict`,
:func:`chebyshev_predict`): GD (Prop. 1, eta by line search), exact ridge with r = 1e-3
(the code's) on the pairs before t, and the code's normalised Chebyshev iteration.
"""

import numpy as np
from numpy.polynomial import Polynomial

from ._checks import check_dtype, check_float, check_int
from .layers.lsa import LSAParams
from .model import lsa_stack
from .sequences import check_inputs, check_phi0, check_targets, shifted

RIDGE = 1e-3
# The official code's learned coefficients (constructed, fully observed, lambda = 0.001).
CHEBYSHEV_6 = ((1.0257748, 3.2508426, 3.2583678, 3.2122886, 2.694414, 1.2727231),
               (0.0, 0.6787798, 0.30748147, 0.74470717, 1.8360422, 2.3438027))
CHEBYSHEV_2 = ((1.2316, 8.1996), (0.0, 4.9499))


def _select(d, D, slot, scale=1.0):
    """(d, D): scale * I in the columns of slot ``slot`` (slot s = channels s d .. (s+1) d - 1)."""
    S = np.zeros((d, D))
    S[:, slot * d:(slot + 1) * d] = scale * np.eye(d)
    return S


def _pack(W_Q, W_K, W_V, P, dtype):
    return LSAParams(*(a[None].astype(dtype) for a in (W_Q, W_K, W_V, P)))


# --------------------------------------------------------------------------------
# Prop. 1 (causal)
# --------------------------------------------------------------------------------

def causal_gd_layer(d, eta, Phi_0=None, *, layout="spec", dtype=np.float64):
    """One causal LSA layer doing one GD step from Phi_0 on L_t (module docstring).
    ``layout`` "spec" (width 3d) or "code" (width 4d, Phi_0 must be None). Returns LSAParams."""
    d = check_int("d", d, 1)
    eta = check_float("eta", eta)
    dtype = check_dtype("dtype", dtype)
    if layout not in ("spec", "code"):
        raise ValueError(f"layout must be 'spec' or 'code', got {layout!r}")
    if layout == "code" and Phi_0 is not None:
        raise ValueError("layout 'code' has no prediction slot for Phi_0 ([0, x_t, x_t, x_{t-1}]); pass Phi_0=None")
    if Phi_0 is not None:
        check_phi0(Phi_0, d, np.float64)
    n_slots, q, k = (3, 1, 2) if layout == "spec" else (4, 2, 3)
    D = n_slots * d
    W_V = _select(d, D, q)
    if Phi_0 is not None:
        W_V[:, k * d:(k + 1) * d] = -np.asarray(Phi_0, dtype=np.float64)
    P = eta * _select(d, D, 0).T                                        # (D, d): writes slot 0
    return _pack(_select(d, D, q), _select(d, D, k), W_V, P, dtype)


def causal_gd_predict(X, eta, Phi_0=None):
    """Explicit GD, per token: Phi_1(t) x_t with Phi_1(t) = Phi_0 + eta sum_{t'<=t} (x_{t'} -
    Phi_0 x_{t'-1}) x_{t'-1}^T. X (B, T, d) -> (B, T, d)."""
    B, T, d = check_inputs(X)
    eta = check_float("eta", eta)
    Phi_0 = np.zeros((d, d), X.dtype) if Phi_0 is None else check_phi0(Phi_0, d, X.dtype).astype(X.dtype)
    Xp = shifted(X)                                                     # (B, T, d) x_{t-1}
    R = X - Xp @ Phi_0.T                                                # (B, T, d) x_t' - Phi_0 x_t'-1
    G = np.cumsum(np.einsum("bti,btj->btij", R, Xp), axis=1)            # (B, T, d, d)
    return X @ Phi_0.T + eta * np.einsum("btij,btj->bti", G, X)


def line_search_eta(X, Y, grid=None, Phi_0=None):
    """The eta of ``grid`` (default arange(0.001, 1, 0.001)) with the smallest sequence loss
    of :func:`causal_gd_predict` (first on ties). Returns (eta, losses (len(grid),))."""
    check_targets(X, Y)
    grid = np.arange(0.001, 1.0, 0.001) if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
        raise ValueError(f"grid must be a non-empty 1-d array of finite values, got shape {grid.shape}")
    # the prediction is a + eta g, so the loss is quadratic in eta
    a = causal_gd_predict(X, 0.0, Phi_0) - Y                            # (B, T, d)
    g = causal_gd_predict(X, 1.0, Phi_0) - a - Y                        # (B, T, d)
    n = X.shape[0] * X.shape[1]
    aa, ag, gg = (float((u * w).sum()) / n for u, w in ((a, a), (a, g), (g, g)))
    losses = 0.5 * (aa + 2 * grid * ag + grid * grid * gg)
    return float(grid[int(np.argmin(losses))]), losses


# --------------------------------------------------------------------------------
# Ridge and its Krylov approximations
# --------------------------------------------------------------------------------

def ridge_system(X, ridge=RIDGE):
    """A_t = sum_{t'<=t} x_{t'-1} x_{t'-1}^T + ridge I and M_t = sum_{t'<=t} x_{t'} x_{t'-1}^T:
    (B, T, d, d) each."""
    B, T, d = check_inputs(X)
    ridge = check_float("ridge", ridge, 0.0)
    Xp = shifted(X)
    A = np.cumsum(np.einsum("bti,btj->btij", Xp, Xp), axis=1) + ridge * np.eye(d, dtype=X.dtype)
    M = np.cumsum(np.einsum("bti,btj->btij", X, Xp), axis=1)
    return A, M


def ridge_predict(X, ridge=RIDGE):
    """Exact ridge per token: M_t A_t^{-1} x_t (B, T, d); needs ridge > 0 (A_0 = ridge I)."""
    check_float("ridge", ridge, 0.0, allow_equal_min=False)
    A, M = ridge_system(X, ridge)
    return np.einsum("btij,btj->bti", M, np.linalg.solve(A, X[..., None])[..., 0])


def precond_tokens(X, K):
    """Prop. 2 tokens [0, x_t, x_{t-1}, z_1 .. z_K] with every z_j = x_t: (B, T, (3 + K) d)."""
    B, T, d = check_inputs(X)
    K = check_int("K", K, 0)
    E = np.zeros((B, T, (3 + K) * d), dtype=X.dtype)
    E[:, :, d:2 * d] = X
    E[:, :, 2 * d:3 * d] = shifted(X)
    for j in range(K):
        E[:, :, (3 + j) * d:(4 + j) * d] = X
    return E


def _z_slot(j):
    """Slot of z_j: z_0 = x_t is slot 1, z_j (j >= 1) slot 2 + j."""
    return 1 if j == 0 else 2 + j


def precond_layer(d, K, k, gamma, dtype=np.float64):
    """Layer k (1..K) of Prop. 2: z_j <- z_j - gamma C_t z_{k-1} for j >= k."""
    d, K = check_int("d", d, 1), check_int("K", K, 1)
    k = check_int("k", k, 1, K)
    gamma = check_float("gamma", gamma)
    D = (3 + K) * d
    P = np.zeros((D, d))
    for j in range(k, K + 1):
        P[_z_slot(j) * d:(_z_slot(j) + 1) * d] = -gamma * np.eye(d)
    return _pack(_select(d, D, _z_slot(k - 1)), _select(d, D, 2), _select(d, D, 2), P, dtype)


def readout_layer(d, K, coeffs, dtype=np.float64):
    """The final GD layer of Prop. 2: slot 0 += M_t u_t with u_t = sum_j coeffs[j] z_j (len <= K + 1)."""
    d, K = check_int("d", d, 1), check_int("K", K, 0)
    coeffs = np.asarray(coeffs, dtype=np.float64)
    if coeffs.ndim != 1 or not 1 <= coeffs.size <= K + 1 or not np.all(np.isfinite(coeffs)):
        raise ValueError(f"coeffs must be 1 to K+1={K + 1} finite numbers, got shape {coeffs.shape}")
    D = (3 + K) * d
    W_Q = sum(_select(d, D, _z_slot(j), c) for j, c in enumerate(coeffs))
    return _pack(W_Q, _select(d, D, 2), _select(d, D, 1), _select(d, D, 0).T, dtype)


def prop2_stack(d, gammas, coeffs, dtype=np.float64):
    """K = len(gammas) preconditioning layers and the readout layer: (params tuple, Arch)."""
    gammas = [float(g) for g in gammas]
    K = len(gammas)
    layers = tuple(precond_layer(d, K, k + 1, g, dtype) for k, g in enumerate(gammas)) if K else ()
    layers = layers + (readout_layer(d, K, coeffs, dtype),)
    return layers, lsa_stack(n_layers=len(layers), recurrent=False, causal=True)


def neumann_coefficients(omega, K, ridge=RIDGE):
    """(gammas (K,), coeffs (K+1,)) of the truncated Neumann series omega sum_{j<=K} (I - omega A)^j."""
    return richardson_coefficients([check_float("omega", omega)] * (check_int("K", K, 0) + 1), ridge)


def richardson_coefficients(omegas, ridge=RIDGE):
    """(gammas (K,), coeffs (K+1,)) of K+1 Richardson steps omega_0 .. omega_K from u = 0."""
    omegas = [float(w) for w in omegas]
    ridge = check_float("ridge", ridge, 0.0)
    if not omegas or any(w * ridge == 1.0 for w in omegas):
        raise ValueError(f"omegas must be non-empty with omega * ridge != 1, got {omegas}")
    gammas = [w / (1 - w * ridge) for w in omegas[:-1]]
    scale = np.cumprod([1.0] + [1 - w * ridge for w in omegas[:-1]])
    return np.asarray(gammas), np.asarray(omegas) * scale


def basis_polynomials(gammas, ridge=RIDGE):
    """b_j(lam) = prod_{i<=j} (1 - gamma_i (lam - ridge)), j = 0..K, with z_j = b_j(A_t) x_t."""
    out = [Polynomial([1.0])]
    for g in gammas:
        out.append(out[-1] * Polynomial([1 + g * ridge, -g]))
    return out


def polynomial_coefficients(p, gammas, ridge=RIDGE):
    """coeffs c with sum_j c_j b_j = p (p a Polynomial in lam = eigenvalue of A, degree <= K)."""
    basis = basis_polynomials(gammas, ridge)
    K = len(basis) - 1
    pc = np.zeros(K + 1)
    if p.degree() > K:
        raise ValueError(f"polynomial degree {p.degree()} exceeds the K={K} preconditioning layers")
    pc[:len(p.coef)] = p.coef
    Bm = np.zeros((K + 1, K + 1))
    for j, b in enumerate(basis):
        Bm[:len(b.coef), j] = b.coef
    return np.linalg.solve(Bm, pc)                                      # upper triangular


def chebyshev_polynomial(alphas, betas, nu, n_steps=None):
    """The code's iteration as a polynomial in lam with a fixed normaliser nu in place of
    ||A||_F: inv(lam / nu) / nu after ``n_steps`` (default all) coefficient pairs."""
    alphas, betas = _cheb_args(alphas, betas)
    nu = check_float("nu", nu, 0.0, allow_equal_min=False)
    n = len(alphas) if n_steps is None else check_int("n_steps", n_steps, 0, len(alphas))
    one = Polynomial([1.0])
    inv, term, prev = one, one, one
    for a, b in zip(alphas[:n], betas[:n]):
        term = term * Polynomial([1.0, -a])
        mom = b * (inv - prev)
        prev, inv = inv, inv + term + mom
    return Polynomial(inv.coef / nu ** np.arange(len(inv.coef))) / nu


def _cheb_args(alphas, betas):
    alphas, betas = [float(a) for a in alphas], [float(b) for b in betas]
    if len(alphas) != len(betas) or not alphas:
        raise ValueError(f"alphas and betas must be non-empty and of equal length, got {len(alphas)} and {len(betas)}")
    return alphas, betas


def chebyshev_inverse(A, alphas, betas):
    """The official normalised iteration on A (..., d, d): An = A / ||A||_F; inv = term = prev = I;
    per (alpha, beta): term <- term (I - alpha An); mom = beta (inv - prev); prev <- inv;
    inv <- inv + term + mom. Returns the list of inv / ||A||_F after 0, 1, .., K steps."""
    alphas, betas = _cheb_args(alphas, betas)
    nrm = np.linalg.norm(A, axis=(-2, -1), keepdims=True)              # (..., 1, 1)
    An = A / nrm
    eye = np.broadcast_to(np.eye(A.shape[-1]), A.shape)
    inv, term, prev = eye.copy(), eye.copy(), eye.copy()
    out = [inv / nrm]
    for a, b in zip(alphas, betas):
        term = term @ (eye - a * An)
        mom = b * (inv - prev)
        prev, inv = inv, inv + term + mom
        out.append(inv / nrm)
    return out


def chebyshev_predict(X, alphas, betas, ridge=RIDGE):
    """The code's Prop. 2 baseline per token: M_t inv_k(A_t) x_t for k = 0..K steps: (K+1, B, T, d)."""
    A, M = ridge_system(X, ridge)
    return np.stack([np.einsum("btij,btjk,btk->bti", M, inv, X) for inv in chebyshev_inverse(A, alphas, betas)])


__all__ = ["RIDGE", "CHEBYSHEV_6", "CHEBYSHEV_2", "causal_gd_layer", "causal_gd_predict", "line_search_eta",
           "ridge_system", "ridge_predict", "precond_tokens", "precond_layer", "readout_layer", "prop2_stack",
           "neumann_coefficients", "richardson_coefficients", "basis_polynomials", "polynomial_coefficients",
           "chebyshev_polynomial", "chebyshev_inverse", "chebyshev_predict"]
