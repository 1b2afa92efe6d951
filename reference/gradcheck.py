"""Gradient checking in float64 for the hand-written backward passes.

Two numerical derivatives of a scalar function f of a list of arrays:

* complex step: d/dt f(x + t v)|_0 = Im f(x + i h v) / h, exact up to rounding for
  analytic code (LSA is a polynomial; clipping decides on the real part), h = 1e-30;
* central differences: (f(x + h v) - f(x - h v)) / (2 h), h = 1e-6.

Checked two ways: along random directions v over all arguments at once (catches any
wrong block cheaply, at any size), and entry by entry on tiny shapes (finds the
index). Upstream gradients are random, never all ones: a ones upstream hides
transposed gradients. On failure the report holds both values and the worst index.
"""

from typing import NamedTuple

import numpy as np

from .layers.lsa import lsa_backward, lsa_forward
from .model import loss_and_grads, loss_forward, model_backward, model_forward
from .tokens import as_layout
from .tolerances import allclose_report, tolerance
from .tree import tree_leaves, tree_unflatten

COMPLEX_STEP_H = 1e-30
CENTRAL_H = 1e-6


def directional_derivative(f, arrays, directions, method="complex_step"):
    """d/dt f([a + t v for a, v]) at t = 0."""
    if method == "complex_step":
        h = COMPLEX_STEP_H
        z = [np.asarray(a, dtype=np.complex128) + 1j * h * v for a, v in zip(arrays, directions)]
        return float(np.imag(f(z)) / h)
    if method == "central_diff":
        h = CENTRAL_H
        plus = [np.asarray(a, dtype=np.float64) + h * v for a, v in zip(arrays, directions)]
        minus = [np.asarray(a, dtype=np.float64) - h * v for a, v in zip(arrays, directions)]
        return float((np.real(f(plus)) - np.real(f(minus))) / (2 * h))
    raise ValueError(f"method must be 'complex_step' or 'central_diff', got {method!r}")


def numerical_gradient(f, arrays, method="complex_step"):
    """Entrywise gradient of f with respect to every array (tiny shapes only)."""
    grads = []
    for n, a in enumerate(arrays):
        g = np.zeros(a.shape)
        for idx in np.ndindex(*a.shape):
            dirs = [np.zeros(b.shape) for b in arrays]
            dirs[n][idx] = 1.0
            g[idx] = directional_derivative(f, arrays, dirs, method)
        grads.append(g)
    return grads


class GradCheck(NamedTuple):
    ok: bool
    rel_err: float      # worst relative error over directions / entries
    detail: str


def check_gradients(f, arrays, analytic, rng, method="complex_step", n_directions=4, entrywise=False):
    """Compare analytic gradients (list matching ``arrays``) with numerical ones.

    Directional: for random unit-variance directions v, numeric d/dt f(x + t v) must
    equal sum_n <analytic_n, v_n>. Entrywise (if asked): full numerical gradients.
    """
    tol = tolerance(np.float64, method)
    worst, details, ok = 0.0, [], True
    for _ in range(n_directions):
        dirs = [rng.standard_normal(a.shape) for a in arrays]
        num = directional_derivative(f, arrays, dirs, method)
        ana = float(sum(np.sum(np.asarray(g, dtype=np.float64) * v) for g, v in zip(analytic, dirs)))
        with np.errstate(over="ignore", invalid="ignore"):
            scale = max(abs(num), float(np.sqrt(sum(np.sum(np.asarray(g, dtype=np.float64) ** 2) for g in analytic))))
        err = abs(num - ana)
        rel = err / scale if scale > 0 else err
        if not (np.isfinite(num) and np.isfinite(ana) and np.isfinite(scale)):
            rel = float("inf")  # a non-finite derivative is a failure, never a NaN that max() ignores
        worst = max(worst, rel)
        if not np.isfinite(rel) or err > tol.atol + tol.rtol * scale:
            ok = False
            details.append(f"direction: numeric {num!r} vs analytic {ana!r} (rel {rel:.3e})")
    if entrywise:
        nums = numerical_gradient(f, arrays, method)
        for n, (g, ng) in enumerate(zip(analytic, nums)):
            rep = allclose_report(np.asarray(g, dtype=np.float64), ng, method, np.float64)
            worst = max(worst, rep.rel_err)
            if not rep.ok:
                ok = False
                details.append(f"argument {n}: {rep}")
    if ok and worst == 0.0 and all(not np.any(np.asarray(g)) for g in analytic):
        ok, details = False, ["every analytic gradient is exactly zero: the check would be vacuous"]
    detail = "; ".join(details) if details else f"worst rel err {worst:.3e} ({method}, rtol {tol.rtol:g})"
    return GradCheck(ok, worst, detail)


def lsa_layer_gradcheck(E, params, rng, *, causal=False, clip=None, method="complex_step", entrywise=False):
    """Check :func:`lsa_backward` against numerical derivatives of f = sum(G * out)
    for a random upstream gradient G, with respect to E and every parameter."""
    kind = type(params)
    out, cache = lsa_forward(E, params, causal=causal, clip=clip)
    G = rng.standard_normal(out.shape)                                 # (B, T, D) random upstream
    dE, dparams = lsa_backward(G, cache)

    def f(args):
        o, _ = lsa_forward(args[0], kind(*args[1:]), causal=causal, clip=clip)
        return np.sum(G * o)

    return check_gradients(f, [E, *params], [dE, *dparams], rng, method, entrywise=entrywise)


def model_gradcheck(E, y_q, params, arch, layout, rng, *, method="complex_step", entrywise=False):
    """Check the model backward twice: the loss gradient (readout and loss included)
    and f = sum(G * E_K) for a random upstream G on the last layer's tokens.

    ``layout``: a :class:`reference.tokens.TokenLayout` (or the regression layout's d).
    The parameters enter the numerical derivatives as the leaves of the tree
    (``reference.tree``), in :func:`tree_leaves` order."""
    leaves = tree_leaves(params)
    _, dparams, aux = loss_and_grads(E, y_q, params, arch, layout)

    def f_loss(args):
        out, _ = model_forward(args[0], tree_unflatten(params, args[1:]), arch)
        L, _ = loss_forward(as_layout(layout, out.shape[2]).readout(out), y_q.astype(args[0].dtype))
        return L

    r1 = check_gradients(f_loss, [E, *leaves], [aux["dE"], *tree_leaves(dparams)], rng, method, entrywise=entrywise)

    out, mcache = model_forward(E, params, arch)
    G = rng.standard_normal(out.shape)                                 # (B, T, D_K) random upstream
    dE2, dparams2 = model_backward(G, mcache)

    def f_out(args):
        o, _ = model_forward(args[0], tree_unflatten(params, args[1:]), arch)
        return np.sum(G * o)

    r2 = check_gradients(f_out, [E, *leaves], [dE2, *tree_leaves(dparams2)], rng, method, entrywise=entrywise)
    return GradCheck(r1.ok and r2.ok, max(r1.rel_err, r2.rel_err), f"loss: {r1.detail}; tokens: {r2.detail}")
