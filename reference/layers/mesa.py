"""The mesa layer: causal softmax-free attention that solves a ridge regression per token.

The readable spec (the Numba and CuPy backends refuse it in ``supports()``; the Numba
backend's sequence step for the lds task runs form "sm" without forgetting,
``reference/backends/_numba_seq.py``, tested against this module); tested against the
loop oracle ``reference.oracle.oracle_mesa_layer`` (explicit sums and Gaussian
elimination per token) and complex-step derivatives.
Registered as layer kind ``"mesa"`` (:class:`Mesa` at the end).

Equation (von Oswald et al., "Uncovering mesa-optimization algorithms in Transformers",
arXiv 2309.05858, Sec. 5 / App. "mesa layer"), for every token t (causal, the diagonal
included), with q, k, v = W_Q e, W_K e, W_V e per head h:

    e_t <- e_t + sum_h P_h Phi_hat_{h,t} q_{h,t}
    Phi_hat_{h,t} = argmin_Phi 1/2 sum_{s<=t} g^(t-s) ||v_s - Phi k_s||^2 + g^t ||Phi||_F^2 / (2 lam_h)
                  = M_t A_t^{-1},   M_t = sum_{s<=t} g^(t-s) v_s k_s^T,
                                    A_t = g^t I / lam_h + sum_{s<=t} g^(t-s) k_s k_s^T

(the forget factor g in (0, 1]; ``forget=None`` is g = 1, the paper's layer). With
qt_t = A_t^{-1} q_t the output is causal linear attention with queries qt and a decay
mask: Phi_hat_t q_t = sum_{s<=t} g^(t-s) v_s (k_s . qt_t).

Three forms of qt_t = R_t q_t (R_t = A_t^{-1}), equal in exact arithmetic:

* ``form="sm"`` (the paper's): Sherman-Morrison, R_0 = lam I,
  R_t = (R_{t-1} - u u^T / c_t) / g with u = R_{t-1} k_t, c_t = g + k_t^T u; keeps R_T
  and the denominators c_t only (O(Kd^2) per head besides the tokens);
* ``form="direct"``: A_t built and solved per token (``numpy.linalg.solve``, LU);
* ``form="cg"``: conjugate gradients on A_t x = q_t, ``cg_iters`` iterations at most
  (None: 2 Kd) until the relative residual ||A x - q|| / ||q|| <= tol, where
  tol = max(``cg_tol``, CG_FLOOR eps) (``cg_tol`` None: 1e-12; the floor, 1000 times the
  dtype's eps, is what a CG in that dtype can certify: 2.2e-13 in float64, 1.2e-4 in
  float32); the worst residual is kept in the cache (``cg_residual``) and a CG that does
  not reach tol is refused.

Backward. ``form="sm"``: the memory-light reverse Sherman-Morrison walk (the paper's),
t = T .. 1: a_t = R_t dqt_t is dq_t; the adjoint of A_t accumulates
Abar_t = g Abar_{t+1} - a_t qt_t^T and dk_t += (Abar_t + Abar_t^T) k_t; then
R_{t-1} = g (R_t - R_t k_t k_t^T R_t / (k_t^T R_t k_t - 1)). At the end
dL/dR_0 = -g Abar_1 / lam^2 and dL/dlam = Tr(dL/dR_0). ``form="direct"`` and ``"cg"``:
the plain backward through the solves (z_t = A_t^{-1} dqt_t, Abar_t = -z_t qt_t^T,
dk_s = sum_{t>=s} g^(t-s) (Abar_t + Abar_t^T) k_s, dlam = sum_t g^t z_t . qt_t / lam^2),
an independent computation the reverse walk is checked against.

Parameterisation: lam is the raw ridge parameter (the paper's), one per head, init 1;
it must be > 0 (the prior I / lam is then positive definite) and is refused otherwise
before any work. Numerical guards (decided on real parts, so complex-step runs through):
the SM form refuses (``NonFiniteError``) a key whose k^T R k is negative beyond rounding
or a non-positive diagonal of R (R lost positive definiteness), and its backward refuses a
reverse denominator k^T R_t k - 1 that is not negative or disagrees with the forward's
-g / c_t by more than 1e-3 relative (the reverse walk has cancelled away its precision),
and a reverse walk that does not return to R_0 = lam I within 1e-3 relative (R_0 drift):
both are cheap O(Kd^2) checks. The measured float32 behaviour is
``verify/results/mesa-float32.md`` (``python -m verify.mesa_study``).

Shapes: E (B, T, D); W_Q, W_K (H, Kd, D); W_V (H, Vd, D); P (H, D, Vd); lam (H,).
"""

from typing import NamedTuple

import numpy as np

from .._checks import (NonFiniteError, check_all_finite, check_array, check_data, check_dout, check_float,
                       check_int, check_same_dtype)
from ..xp import get_xp
from . import LayerType
from .lsa import attention_param_floats, check_factored_shapes, check_head_options, init_lsa_params

FORMS = ("sm", "direct", "cg")
CG_TOL = 1e-12           # default cg_tol
CG_FLOOR = 1000.0        # tol is at least CG_FLOOR * eps of the dtype (what its CG can certify)
REVERSE_RTOL = 1e-3      # reverse-SM denominators and R_0 drift allowed before the backward refuses
PD_SLACK = 64.0          # k^T R k may be negative by PD_SLACK * eps * |k|^2 tr(R) (rounding) at most


class MesaParams(NamedTuple):
    W_Q: object  # (H, Kd, D)
    W_K: object  # (H, Kd, D)
    W_V: object  # (H, Vd, D)
    P: object    # (H, D, Vd)
    lam: object  # (H,)  ridge parameter lam_h > 0 (prior I / lam_h)


class MesaCache(NamedTuple):
    E: object       # (B, T, D)      layer input
    q: object       # (B, H, T, Kd)
    k: object       # (B, H, T, Kd)
    v: object       # (B, H, T, Vd)
    qt: object      # (B, H, T, Kd)  R_t q_t
    S: object       # (B, H, T, T)   decayed scores g^(t-s) k_s . qt_t (0 for s > t)
    o: object       # (B, H, T, Vd)
    R_T: object     # (B, H, Kd, Kd) form "sm": R after the last token (else None)
    c: object       # (B, H, T)      form "sm": the denominators c_t = g + k_t^T R_{t-1} k_t (else None)
    A: object       # (B, H, T, Kd, Kd) forms "direct"/"cg": A_t (else None)
    params: object
    forget: float   # g
    form: str
    cg_residual: float   # form "cg": the worst relative residual ||A x - q|| / ||q|| (else 0.0)


def _proj(E, W):
    """Per-head projection: E (B, T, D), W (H, k, D) -> (B, H, T, k)."""
    return get_xp(E, W).matmul(E[:, None, :, :], W.swapaxes(-1, -2)[None])


def decay_mask(T, g, xp=np, dtype=np.float64):
    """(T, T) mask Gamma[t, s] = g^(t-s) for s <= t, else 0 (g = 1: the causal mask)."""
    i = np.arange(T)
    diff = i[:, None] - i[None, :]
    m = np.where(diff >= 0, np.power(float(g), np.maximum(diff, 0)), 0.0)
    return xp.asarray(m.astype(dtype))


def _eye_like(k, Kd):
    xp = get_xp(k)
    return xp.eye(Kd, dtype=k.dtype)


def _sum_last(a, b):
    """sum over the last axis of a * b (bilinear, no conjugation: complex-step safe)."""
    return (a * b).sum(axis=-1)


# ---- the three forms of qt_t = R_t q_t -----------------------------------------------------

def sm_queries(q, k, lam, g):
    """Sherman-Morrison: qt (B, H, T, Kd), R_T (B, H, Kd, Kd), c (B, H, T).
    Refuses (NonFiniteError) when R loses positive definiteness (see the module docstring)."""
    xp = get_xp(q, k)
    B, H, T, Kd = q.shape
    eps = float(np.finfo(q.real.dtype).eps)
    R = lam[None, :, None, None] * _eye_like(k, Kd)[None, None]          # (B, H, Kd, Kd) R_0 = lam I
    R = xp.broadcast_to(R, (B, H, Kd, Kd)).copy()
    qt = xp.zeros_like(q)                                               # (B, H, T, Kd)
    c = xp.zeros((B, H, T), dtype=q.dtype)                              # (B, H, T)
    worst = np.inf                                                      # min over t of the PD margins
    for t in range(T):
        kt = k[:, :, t]                                                 # (B, H, Kd)
        u = xp.matmul(R, kt[..., None])[..., 0]                         # (B, H, Kd) R_{t-1} k_t
        s = _sum_last(kt, u)                                            # (B, H) k^T R_{t-1} k
        trR = xp.trace(R, axis1=-2, axis2=-1).real                      # (B, H)
        margin = s.real + PD_SLACK * eps * _sum_last(kt, kt).real * trR
        worst = min(worst, float(margin.min()), float(xp.diagonal(R, axis1=-2, axis2=-1).real.min()))
        c[:, :, t] = g + s                                              # (B, H)
        R = (R - u[..., :, None] * u[..., None, :] / (g + s)[..., None, None]) / g
        qt[:, :, t] = xp.matmul(R, q[:, :, t][..., None])[..., 0]       # (B, H, Kd) R_t q_t
    if not worst >= 0.0 or not bool(xp.isfinite(qt).all()):
        raise NonFiniteError("mesa layer (form 'sm'): R_t lost positive definiteness (k^T R k < 0 beyond rounding, "
                             "a diagonal entry <= 0 or a non-finite R): the keys are too large or lam too far from "
                             "1 for this dtype; use float64 or form='direct'")
    return qt, R, c


def ridge_matrices(k, lam, g):
    """A_t = g^t I / lam + sum_{s<=t} g^(t-s) k_s k_s^T for every t: (B, H, T, Kd, Kd)."""
    xp = get_xp(k)
    B, H, T, Kd = k.shape
    A = xp.zeros((B, H, T, Kd, Kd), dtype=k.dtype)
    prev = xp.broadcast_to((1.0 / lam)[None, :, None, None] * _eye_like(k, Kd), (B, H, Kd, Kd))
    for t in range(T):
        kt = k[:, :, t]
        prev = g * prev + kt[..., :, None] * kt[..., None, :]            # (B, H, Kd, Kd)
        A[:, :, t] = prev
    return A


def direct_queries(q, A):
    """qt_t = solve(A_t, q_t) for every (b, h, t): (B, H, T, Kd)."""
    xp = get_xp(q, A)
    return xp.linalg.solve(A, q[..., None])[..., 0]


def cg_solve(A, b, iters, tol):
    """Conjugate gradients on A x = b for every system at once (A (..., Kd, Kd) symmetric
    positive definite, b (..., Kd)); returns (x, worst relative residual). Bilinear
    products (no conjugation) and stopping decided on real parts, so complex-step runs
    through; a system stops when ||r|| <= tol ||b|| (b = 0: x = 0)."""
    xp = get_xp(A, b)
    x = xp.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = _sum_last(r, r)                                                 # (...)
    stop = (tol ** 2) * _sum_last(b, b).real                            # (...)
    for _ in range(iters):
        active = rr.real > stop
        if not bool(active.any()):
            break
        Ap = xp.matmul(A, p[..., None])[..., 0]
        pAp = _sum_last(p, Ap)
        alpha = xp.where(active, rr / xp.where(active, pAp, 1.0), 0.0)
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * Ap
        rr_new = _sum_last(r, r)
        beta = xp.where(active, rr_new / xp.where(active, rr, 1.0), 0.0)
        p = r + beta[..., None] * p
        rr = xp.where(active, rr_new, rr)
    res = b - xp.matmul(A, x[..., None])[..., 0]                        # the true residual
    nb = xp.sqrt(_sum_last(b, b).real)
    rel = xp.where(nb > 0, xp.sqrt(_sum_last(res, res).real) / xp.where(nb > 0, nb, 1.0), 0.0)
    return x, float(rel.max()) if rel.size else 0.0


def cg_tolerance(cg_tol, dtype):
    """The relative residual CG must reach: max(cg_tol (None: CG_TOL), CG_FLOOR * eps)."""
    eps = float(np.finfo(np.dtype(dtype)).eps)
    return max(CG_TOL if cg_tol is None else cg_tol, CG_FLOOR * eps)


# ---- forward and backward ----------------------------------------------------------------

def mesa_forward(E, params, *, forget=None, form="sm", cg_iters=None, cg_tol=None):
    """Apply one mesa layer. Returns (out (B, T, D), cache)."""
    check_mesa_inputs(E, params, forget, form, cg_iters, cg_tol)
    xp = get_xp(E, *params)
    W_Q, W_K, W_V, P, lam = params
    B, T, D = E.shape
    Kd = W_Q.shape[1]
    g = 1.0 if forget is None else float(forget)
    q = _proj(E, W_Q)                                                   # (B, H, T, Kd)
    k = _proj(E, W_K)                                                   # (B, H, T, Kd)
    v = _proj(E, W_V)                                                   # (B, H, T, Vd)
    R_T = c = A = None
    residual = 0.0
    if form == "sm":
        qt, R_T, c = sm_queries(q, k, lam, g)
    else:
        A = ridge_matrices(k, lam, g)                                   # (B, H, T, Kd, Kd)
        if form == "direct":
            qt = direct_queries(q, A)
        else:
            tol = cg_tolerance(cg_tol, E.dtype)
            qt, residual = cg_solve(A, q, 2 * Kd if cg_iters is None else cg_iters, tol)
            if not residual <= tol:
                raise NonFiniteError(f"mesa layer (form 'cg'): conjugate gradients reached a relative residual "
                                     f"{residual:.3g} > cg_tol {tol:g} after {2 * Kd if cg_iters is None else cg_iters}"
                                     " iterations: raise cg_iters or cg_tol, or use form='sm' or 'direct'")
        if not bool(xp.isfinite(qt).all()):
            raise NonFiniteError(f"mesa layer (form {form!r}): the ridge solve gave non-finite values")
    S = xp.matmul(qt, k.swapaxes(-1, -2)) * decay_mask(T, g, xp, qt.real.dtype)   # (B, H, T, T)
    o = xp.matmul(S, v)                                                 # (B, H, T, Vd)
    delta = xp.matmul(o, P.swapaxes(-1, -2)[None]).sum(axis=1)          # (B, T, D)
    out = E + delta                                                     # (B, T, D)
    return out, MesaCache(E, q, k, v, qt, S, o, R_T, c, A, params, g, form, residual)


def mesa_backward(dout, cache):
    """Backward of :func:`mesa_forward`: (dE (B, T, D), MesaParams of gradients). Walks
    the forward in reverse; form "sm" by the reverse Sherman-Morrison recursion, the
    other forms through the solves."""
    if not isinstance(cache, MesaCache):
        raise TypeError(f"cache must be the MesaCache that mesa_forward returned, got {type(cache).__name__}")
    check_dout(dout, cache.E.shape, cache.E.dtype)
    E, q, k, v, qt, S, o, R_T, c, A, params, g, form, _ = cache
    xp = get_xp(dout, E)
    W_Q, W_K, W_V, P, lam = params
    T = E.shape[1]
    # forward: out = E + delta, so dE = dout (residual path) and ddelta = dout
    dE = dout.copy()                                                    # (B, T, D)
    # forward: delta = sum_h o_h P_h^T, so dP_h = sum_bt dout^T o_h and do_h = dout P_h
    dP = xp.einsum("btd,bhtv->hdv", dout, o)                            # (H, D, Vd)
    do = xp.matmul(dout[:, None], P[None])                              # (B, H, T, Vd)
    # forward: o = S v, so dS = do v^T and dv = S^T do
    dS = xp.matmul(do, v.swapaxes(-1, -2)) * decay_mask(T, g, xp, do.real.dtype)   # (B, H, T, T)
    dv = xp.matmul(S.swapaxes(-1, -2), do)                              # (B, H, T, Vd)
    # forward: S = Gamma * (qt k^T), so dqt = dS k and dk = dS^T qt
    dqt = xp.matmul(dS, k)                                              # (B, H, T, Kd)
    dk = xp.matmul(dS.swapaxes(-1, -2), qt)                             # (B, H, T, Kd)
    # forward: qt_t = R_t q_t with R_t = A_t^{-1}
    if form == "sm":
        dq, dk_R, dlam = reverse_sm_backward(dqt, qt, k, R_T, c, lam, g)
    else:
        dq, dk_R, dlam = solve_backward(dqt, qt, k, A, lam, g)
    dk = dk + dk_R
    # forward: q = E W_Q^T, k = E W_K^T, v = E W_V^T (per head)
    dW_Q = xp.einsum("bhtk,btd->hkd", dq, E)                            # (H, Kd, D)
    dW_K = xp.einsum("bhtk,btd->hkd", dk, E)                            # (H, Kd, D)
    dW_V = xp.einsum("bhtv,btd->hvd", dv, E)                            # (H, Vd, D)
    dE += (xp.matmul(dq, W_Q[None]) + xp.matmul(dk, W_K[None]) + xp.matmul(dv, W_V[None])).sum(axis=1)
    return dE, MesaParams(dW_Q, dW_K, dW_V, dP, dlam)


def reverse_sm_backward(dqt, qt, k, R_T, c, lam, g):
    """The reverse Sherman-Morrison walk (module docstring): (dq (B, H, T, Kd), the keys'
    gradient through R (B, H, T, Kd), dlam (H,)). Keeps one R and one Abar per (b, h)."""
    xp = get_xp(dqt, R_T)
    B, H, T, Kd = qt.shape
    R = R_T.copy()                                                      # (B, H, Kd, Kd)
    Abar = xp.zeros_like(R)                                             # (B, H, Kd, Kd) adjoint of A_{t+1}
    dq = xp.zeros_like(qt)
    dk = xp.zeros_like(k)
    worst = 0.0
    for t in range(T - 1, -1, -1):
        kt = k[:, :, t]                                                 # (B, H, Kd)
        # forward: qt_t = R_t q_t, so dq_t = R_t dqt_t and dR_t = dqt_t q_t^T
        a = xp.matmul(R, dqt[:, :, t][..., None])[..., 0]               # (B, H, Kd)
        dq[:, :, t] = a
        # forward: R_t = A_t^{-1} and A_{t+1} = g A_t + k k^T: Abar_t = -R_t dR_t R_t + g Abar_{t+1}
        Abar = g * Abar - a[..., :, None] * qt[:, :, t][..., None, :]
        # forward: A_t = g A_{t-1} + k_t k_t^T, so dk_t = (Abar_t + Abar_t^T) k_t
        dk[:, :, t] = xp.matmul(Abar + Abar.swapaxes(-1, -2), kt[..., None])[..., 0]
        # reverse Sherman-Morrison: R_{t-1} = g (R_t - R_t k k^T R_t / (k^T R_t k - 1))
        w = xp.matmul(R, kt[..., None])[..., 0]                         # (B, H, Kd)
        den = _sum_last(kt, w) - 1.0                                    # (B, H), exact -g / c_t
        want = -g / c[:, :, t]
        worst = max(worst, float((xp.abs(den - want).real / xp.abs(want).real).max()))
        R = g * (R - w[..., :, None] * w[..., None, :] / den[..., None, None])
    lamI = lam[None, :, None, None] * _eye_like(k, Kd)
    drift = float((xp.abs(R - lamI).real.max(axis=(-1, -2)) / lam.real[None]).max())
    if not (worst <= REVERSE_RTOL and drift <= REVERSE_RTOL):
        raise NonFiniteError(f"mesa layer backward (form 'sm'): the reverse Sherman-Morrison walk lost its precision "
                             f"(denominators off by {worst:.3g} relative, R_0 drift {drift:.3g}; allowed "
                             f"{REVERSE_RTOL:g}): use float64, or form='direct' whose backward solves directly")
    # forward: A_1 = g A_0 + k_1 k_1^T with A_0 = I / lam = R_0^{-1}: dR_0 = -A_0 (g Abar_1) A_0
    dR0 = -g * Abar / (lam[None, :, None, None] ** 2)                   # (B, H, Kd, Kd)
    dlam = xp.trace(dR0, axis1=-2, axis2=-1).sum(axis=0)                # (H,) R_0 = lam I
    return dq, dk, dlam


def solve_backward(dqt, qt, k, A, lam, g):
    """The plain backward through qt_t = solve(A_t, q_t): (dq, the keys' gradient through
    A, dlam). z_t = A_t^{-1} dqt_t (A symmetric); Abar_t = -z_t qt_t^T."""
    xp = get_xp(dqt, A)
    T = qt.shape[2]
    z = xp.linalg.solve(A, dqt[..., None])[..., 0]                      # (B, H, T, Kd)
    # A_t = g^t I / lam + sum_{s<=t} g^(t-s) k_s k_s^T:
    # dk_s = -sum_{t>=s} g^(t-s) ((k_s . qt_t) z_t + (k_s . z_t) qt_t)
    Gam = decay_mask(T, g, xp, qt.real.dtype)                           # (T, T) [t, s]
    Kq = xp.matmul(k, qt.swapaxes(-1, -2)) * Gam.T                      # (B, H, T, T) [s, t]
    Kz = xp.matmul(k, z.swapaxes(-1, -2)) * Gam.T
    dk = -(xp.matmul(Kq, z) + xp.matmul(Kz, qt))                        # (B, H, T, Kd)
    # dlam = sum_t Tr(Abar_t) d(g^t / lam)/dlam = sum_t g^t (z_t . qt_t) / lam^2
    gt = xp.asarray(np.power(float(g), np.arange(1, T + 1)).astype(qt.real.dtype))
    dlam = (_sum_last(z, qt) * gt).sum(axis=(0, 2)) / lam ** 2          # (H,)
    return z, dk, dlam


# ---- checks, init and the layer type ---------------------------------------------------------

def check_mesa_params(params):
    """Shapes, dtypes, finiteness and lam > 0; returns the token width D."""
    if not isinstance(params, MesaParams):
        raise TypeError(f"mesa params must be MesaParams, got {type(params).__name__}")
    D = check_factored_shapes(params)
    check_array("lam", params.lam, shape=(params.W_Q.shape[0],), finite=False)
    check_same_dtype(**params._asdict())
    check_all_finite(params._fields, params)
    if not bool((params.lam.real > 0).all()):
        raise ValueError(f"mesa lam must be > 0 per head (the ridge prior I / lam), got {params.lam.real.tolist()}")
    return D


def check_mesa_options(forget, form, cg_iters, cg_tol):
    if forget is not None:
        check_float("forget", forget, 0.0, 1.0, allow_equal_min=False)
    if form not in FORMS:
        raise ValueError(f"mesa option form must be one of {FORMS}, got {form!r}")
    if cg_iters is not None:
        check_int("cg_iters", cg_iters, 1)
    if cg_tol is not None:
        check_float("cg_tol", cg_tol, 0.0, 1.0, allow_equal_min=False)


def check_mesa_inputs(E, params, forget, form, cg_iters, cg_tol):
    """Raise unless :func:`mesa_forward` can run on tokens E (B, T, D) with ``params``."""
    check_data("E", E, dims=("B", "T", "D"))
    D = check_mesa_params(params)
    if E.shape[2] != D:
        raise ValueError(f"E must have token width D={D} to match the mesa params, got shape {tuple(E.shape)}")
    check_mesa_options(forget, form, cg_iters, cg_tol)
    check_same_dtype(E=E, W_Q=params.W_Q)


class Mesa(LayerType):
    """Layer kind ``"mesa"``. Options: ``forget`` (None: no forgetting), ``form``,
    ``cg_iters``, ``cg_tol`` (change how or what is computed) and ``heads``,
    ``key_size``, ``value_size`` (None: D; shape the parameters ``init`` draws). Always
    causal (the diagonal included)."""

    kind = "mesa"
    OPTIONS = {"forget": None, "form": "sm", "cg_iters": None, "cg_tol": None,
               "heads": 1, "key_size": None, "value_size": None}
    PARAM_OPTIONS = ("heads", "key_size", "value_size")

    def check_options(self, options):
        o = super().check_options(options)
        check_mesa_options(o["forget"], o["form"], o["cg_iters"], o["cg_tol"])
        for name in ("forget", "cg_tol"):
            if o[name] is not None:
                o[name] = float(o[name])
        if o["cg_iters"] is not None:
            o["cg_iters"] = int(o["cg_iters"])
        check_head_options(o)
        return o

    def param_type(self, **_):
        return MesaParams

    def init(self, rng, D_in, settings, *, heads=1, key_size=None, value_size=None, **_):
        """LSA's draws for W_Q, W_K, W_V, P (``init_lsa_params``), then lam = 1 per head."""
        p = init_lsa_params(rng, D_in, H=heads, key_size=key_size, value_size=value_size,
                            n_layers_for_scale=settings.n_layers, scale=settings.scale, dtype=settings.dtype,
                            xp=settings.xp)
        return MesaParams(*p, settings.xp.ones(heads, dtype=settings.dtype))

    def forward(self, E, params, *, forget=None, form="sm", cg_iters=None, cg_tol=None):
        return mesa_forward(E, params, forget=forget, form=form, cg_iters=cg_iters, cg_tol=cg_tol)

    def backward(self, dout, cache):
        return mesa_backward(dout, cache)

    def oracle(self, E, params, *, forget=None, form="sm", cg_iters=None, cg_tol=None):
        from ..oracle import oracle_mesa_layer

        return oracle_mesa_layer(E, params, forget=forget)

    def cache_floats(self, T, D_in, *, forget=None, form="sm", cg_iters=None, cg_tol=None, heads=1, key_size=None,
                     value_size=None):
        """q, k, qt (H T Kd), v, o (H T Vd), S (H T T), out (T D); form "sm": R_T
        (H Kd^2) and c (H T); forms "direct", "cg": A (H T Kd^2)."""
        Kd = D_in if key_size is None else key_size
        Vd = D_in if value_size is None else value_size
        per_head = 3 * T * Kd + 2 * T * Vd + T * T
        per_head += Kd * Kd + T if form == "sm" else T * Kd * Kd
        return heads * per_head + T * D_in

    def check_params(self, params, D_in, **_):
        D = check_mesa_params(params)
        if D != D_in:
            raise ValueError(f"mesa params have token width D={D}, the layer's input has width {D_in}")

    def param_floats(self, D_in, *, heads=1, key_size=None, value_size=None, **_):
        """LSA's W_Q, W_K, W_V, P and lam (H)."""
        return attention_param_floats(D_in, heads, D_in if key_size is None else key_size,
                                      D_in if value_size is None else value_size) + heads
