"""The numeric bridge: every symbolic result, evaluated (lambdify) at random points,
against the reference implementation, so the proofs and the code cannot drift apart.

The symbolic side is the very expression the proofs reduce (the block-collapsed layer
output for general dimensions, substituted at concrete sizes; the derivatives of the
symbolic loss; the closed forms of the step size). The numeric side is the reference:
``lsa_forward`` with ``gd_layer`` / ``gdpp_layer``, ``predict`` with ``gd_stack`` /
``gdpp_stack``, ``gd_predict``, ``gdpp_predict``, ``loss_and_grads``,
``expected_one_step_loss``, ``optimal_one_step_eta``, ``uniform_moments``. Each
comparison is a float64 relative error max|a - b| / max|b| judged against the tolerance
table (``reference.tolerances``, kind "algebra": the same polynomial, summed in a
different order).
"""

from fractions import Fraction
from functools import lru_cache

import numpy as np
import sympy as sp

import reference as R
from reference.tree import tree_leaves, tree_map

from . import algebra as A
from . import gradients as G
from . import step_size as S
from .algebra import M, N, d, d_y, eta, gamma
from .core import Proof, theorem
from .gdpp import eigen_map, lam
from .prop1 import general_data

SRC = "numeric bridge: symbolic results vs the reference implementation"
KIND = "algebra"


def _configs(rng, n, max_d=4, max_dy=3, max_N=6):
    return [(int(rng.integers(1, max_d + 1)), int(rng.integers(1, max_dy + 1)), int(rng.integers(1, max_N + 1)))
            for _ in range(n)]


def lambdify_at(exprs, args, sizes):
    """lambdify matrix expressions of symbolic size after substituting concrete sizes."""
    return sp.lambdify([a.subs(sizes) if hasattr(a, "shape") else a for a in args],
                       [e.subs(sizes) for e in exprs], "numpy")


@lru_cache(maxsize=None)
def gd_composed(K):
    """Token blocks after K general-dimension Prop. 1 layers from (X, Y), (x_q, -W_0 x_q)."""
    X, Y, X_q, _, W_0 = general_data()
    tokens = (X, Y, X_q, -X_q * W_0.T)
    for _ in range(K):
        tokens = A.apply_layer(tokens, A.gd_weights(d, d_y, N, eta, W_0), N, d)
    return tokens


@lru_cache(maxsize=None)
def gdpp_composed(K):
    """Token blocks after K general GD++ layers with their own (eta_k, gamma_k)."""
    X, Y, X_q, _, W_0 = general_data()
    etas = sp.symbols(f"eta_1:{K + 1}", real=True)
    gammas = sp.symbols(f"gamma_1:{K + 1}", real=True)
    tokens = (X, Y, X_q, -X_q * W_0.T)
    for e, g in zip(etas, gammas):
        tokens = A.apply_layer(tokens, A.gdpp_weights(d, d_y, N, e, W_0, g), N, d)
    return tokens, etas, gammas


def _task(rng, dx, dy, n):
    t = R.sample_tasks(rng, 1, dx, n, dy)
    W_0 = rng.standard_normal((dy, dx))
    return t, W_0


@theorem("bridge.prop1", source=SRC, kind="bridge",
         statement="The general-dimension Prop. 1 layer output (block-collapsed, at concrete sizes) equals "
                   "reference.lsa_forward with reference.gd_layer, and its readout equals reference.gd_predict (one step)",
         hypotheses="6 random (d, d_y, N) with d <= 4, d_y <= 3, N <= 6; random tasks, W_0, eta; float64")
def bridge_prop1(layer=R.gd_layer, seed=0):
    pf = Proof()
    rng = np.random.default_rng([seed, 1])
    X, Y, X_q, _, W_0 = general_data()
    out = gd_composed(1)
    for dx, dy, n in _configs(rng, 6):
        f = lambdify_at(out, (X, Y, X_q, W_0, eta), {d: dx, d_y: dy, N: n, M: 1})
        t, W0 = _task(rng, dx, dy, n)
        e = float(rng.uniform(0.1, 3.0))
        blocks = f(t.X[0], t.Y[0], t.x_q, W0, e)
        sym = np.block([[blocks[0], blocks[1]], [blocks[2], blocks[3]]])
        ref, _ = R.lsa_forward(R.build_tokens(t.X, t.Y, t.x_q, W_0=W0), layer(dx, dy, n, e, W0))
        where = f"d={dx}, d_y={dy}, N={n}"
        pf.close("symbolic layer output = reference lsa_forward(gd_layer)", sym, ref[0], where, KIND)
        pf.close("symbolic readout = reference gd_predict (1 step)", -blocks[3][0],
                 R.gd_predict(t.X, t.Y, t.x_q, e, 1, W_0=W0)[0][0], where, KIND)
    return pf


@theorem("bridge.klayers", source=SRC, kind="bridge",
         statement="The general-dimension composition of K = 2, 3 Prop. 1 layers equals reference.predict with "
                   "reference.gd_stack (weight-tied) and reference.gd_predict with K steps",
         hypotheses="3 random (d, d_y, N) per K; random tasks, W_0, eta; float64")
def bridge_klayers(stack=R.gd_stack, seed=0):
    pf = Proof()
    rng = np.random.default_rng([seed, 2])
    X, Y, X_q, _, W_0 = general_data()
    for K in (2, 3):
        out = gd_composed(K)
        for dx, dy, n in _configs(rng, 3):
            f = lambdify_at(out[3:], (X, Y, X_q, W_0, eta), {d: dx, d_y: dy, N: n, M: 1})
            t, W0 = _task(rng, dx, dy, n)
            e = float(rng.uniform(0.1, 1.0))
            pred = -f(t.X[0], t.Y[0], t.x_q, W0, e)[0][0]
            params, arch = stack(K, dx, dy, n, e, W0, recurrent=True)
            layout = R.TokenLayout(dx, dy)
            where = f"d={dx}, d_y={dy}, N={n}, K={K}"
            pf.close("symbolic K-layer readout = reference predict(gd_stack)", pred,
                     R.predict(layout.build(t.X, t.Y, t.x_q, W_0=W0), params, arch, layout)[0], where, KIND)
            pf.close("symbolic K-layer readout = reference gd_predict (K steps)", pred,
                     R.gd_predict(t.X, t.Y, t.x_q, e, K, W_0=W0)[0][0], where, KIND)
    return pf


@theorem("bridge.gdpp", source=SRC, kind="bridge",
         statement="The general-dimension GD++ layer output equals reference.lsa_forward with reference.gdpp_layer; "
                   "two composed GD++ layers equal reference.predict with two gdpp_layer and reference.gdpp_predict",
         hypotheses="4 random (d, d_y, N); random tasks, W_0, eta_k, gamma_k; float64")
def bridge_gdpp(layer=R.gdpp_layer, seed=0):
    pf = Proof()
    rng = np.random.default_rng([seed, 3])
    X, Y, X_q, _, W_0 = general_data()
    one, (e1,), (g1,) = gdpp_composed(1)
    two, etas2, gammas2 = gdpp_composed(2)
    for dx, dy, n in _configs(rng, 4):
        sizes = {d: dx, d_y: dy, N: n, M: 1}
        t, W0 = _task(rng, dx, dy, n)
        where = f"d={dx}, d_y={dy}, N={n}"
        e, g = float(rng.uniform(0.1, 2.0)), float(rng.uniform(0.0, 0.3))
        b = lambdify_at(one, (X, Y, X_q, W_0, e1, g1), sizes)(t.X[0], t.Y[0], t.x_q, W0, e, g)
        ref, _ = R.lsa_forward(R.build_tokens(t.X, t.Y, t.x_q, W_0=W0), layer(dx, dy, n, e, g, W0))
        pf.close("symbolic GD++ layer output = reference lsa_forward(gdpp_layer)",
                 np.block([[b[0], b[1]], [b[2], b[3]]]), ref[0], where, KIND)
        es, gs = rng.uniform(0.1, 2.0, 2), rng.uniform(0.0, 0.3, 2)
        f2 = lambdify_at(two[3:], (X, Y, X_q, W_0, *etas2, *gammas2), sizes)
        pred = -f2(t.X[0], t.Y[0], t.x_q, W0, *es, *gs)[0][0]
        params = tuple(layer(dx, dy, n, float(ek), float(gk), W0) for ek, gk in zip(es, gs))
        layout = R.TokenLayout(dx, dy)
        pf.close("symbolic 2-layer GD++ readout = reference predict(two gdpp_layer)", pred,
                 R.predict(layout.build(t.X, t.Y, t.x_q, W_0=W0), params, R.lsa_stack(2), layout)[0], where, KIND)
        pf.close("symbolic 2-layer GD++ readout = reference gdpp_predict", pred,
                 R.gdpp_predict(t.X, t.Y, t.x_q, es, gs, W_0=W0)[0], where, KIND)
    return pf


@theorem("bridge.eigen", source=SRC, kind="bridge",
         statement="For data transformed by the reference GD++ layer, the eigenvectors U of C = X^T X diagonalise "
                   "C' = X'^T X' with eigenvalues given by the symbolic map lambda (1 - gamma lambda)^2",
         hypotheses="4 random (d, N) with N >= d; x ~ U(-0.5, 0.5); gamma in (0, 1/lambda_max); float64")
def bridge_eigen(layer=R.gdpp_layer, seed=0):
    pf = Proof()
    rng = np.random.default_rng([seed, 4])
    p = sp.lambdify([lam, gamma], eigen_map(lam, gamma), "numpy")
    for dx, _, n in _configs(rng, 4):
        n = max(n, dx)
        t = R.sample_tasks(rng, 1, dx, n, 1)
        C = t.X[0].T @ t.X[0]
        lams, U = np.linalg.eigh(C)
        g = float(rng.uniform(0.1, 0.9) / lams[-1])
        out, _ = R.lsa_forward(R.build_tokens(t.X, t.Y, t.x_q), layer(dx, 1, n, 1.0, g))
        Xp = out[0, :n, :dx]                                           # transformed context inputs
        pf.close("U^T C' U = diag(lambda (1 - gamma lambda)^2)", U.T @ (Xp.T @ Xp) @ U,
                 np.diag(p(lams, g)), f"d={dx}, N={n}", KIND)
    return pf


def _numeric(arr_sym, rng):
    """Numeric values for an object array: random normals rounded to multiples of 1/256
    for symbols (dyadic, so the exact rational evaluation below stays cheap), the fixed
    rationals as floats."""
    out = np.empty(arr_sym.shape)
    for idx in np.ndindex(*arr_sym.shape):
        x = arr_sym[idx]
        out[idx] = np.round(rng.standard_normal() * 256) / 256 if isinstance(x, sp.Symbol) else float(x)
    return out


def eval_poly(p, point):
    """Evaluate a ring polynomial exactly at a float point (one value per generator):
    every float is converted to the rational it represents and the polynomial summed
    in exact rational arithmetic, then rounded once. (Summing monomials in floating
    point loses accuracy by cancellation for the high-degree stack losses, and lambdify
    cannot compile sums of thousands of terms.) The bridge's error is then the
    reference's float64 rounding alone."""
    xs = [Fraction(float(v)) for v in point]
    powers = [{} for _ in xs]

    def pw(i, k):
        if k not in powers[i]:
            powers[i][k] = xs[i] ** k
        return powers[i][k]

    total = Fraction(0)
    for monom, coeff in p.terms():
        term = Fraction(int(coeff.numerator), int(coeff.denominator))
        for i, k in enumerate(monom):
            if k:
                term *= pw(i, k)
        total += term
    return float(total)


BRIDGE_GRAD_CASES = tuple(("merged", s) for s in G.MERGED_SIZES) + tuple(("factored", s) for s in G.FACTORED_SIZES) \
    + tuple(("stack", s) for s in G.STACK_SIZES)


@theorem("bridge.gradients", source=SRC, kind="bridge", slow=True,
         statement="The symbolic loss (the forward transcription) and its exact derivatives, evaluated at random "
                   "points, equal reference.loss_and_grads (loss, parameter gradients, dE)",
         hypotheses="the configurations of the gradient proofs (merged, factored, stacks, fixed parts at their "
                    "rationals); 2 random points each (normals rounded to multiples of 1/256); the polynomials evaluated "
                    "exactly in rationals and rounded once; float64 reference")
def bridge_gradients(loss_and_grads=R.loss_and_grads, seed=0):
    pf = Proof()
    rng = np.random.default_rng([seed, 5])
    for kind, size in BRIDGE_GRAD_CASES:
        prob = G.problem(kind, size)
        derivs = [(name, prob.derivative(a)) for name, a in prob.compared()]
        for _ in range(2):
            E = _numeric(prob.E_sym, rng)
            y_q = _numeric(prob.y_sym, rng)
            params = tree_map(lambda a: _numeric(a, rng), prob.params_sym)
            value = {}
            for arr, val in [(prob.E_sym, E), (prob.y_sym, y_q), *zip(tree_leaves(prob.params_sym), tree_leaves(params))]:
                value.update((s, v) for s, v in zip(arr.ravel(), val.ravel()) if isinstance(s, sp.Symbol))
            point = [value[s] for s in prob.S.symbols]
            L, dparams, aux = loss_and_grads(E, y_q, params, prob.arch, prob.layout)
            ref = {"E": aux["dE"], **dict(G.named_leaves(dparams))}
            where = f"{kind} {size}"
            pf.close("symbolic loss = reference loss", eval_poly(prob.L, point), L, where, KIND)
            for name, dv in derivs:
                pf.close(f"exact dL/d{name} = reference gradient", [eval_poly(q, point) for q in dv.ravel()],
                         np.asarray(ref[name]).ravel(), where, KIND)
    return pf


@theorem("bridge.step_size", source=SRC, kind="bridge",
         statement="The symbolic expected loss L(eta), eta* and L* equal reference.expected_one_step_loss and "
                   "reference.optimal_one_step_eta; the exact expectations at explicit sizes equal "
                   "expected_one_step_loss; the uniform moments equal reference.uniform_moments",
         hypotheses="8 random (d, N, d_y, m2, m4 >= m2^2, w_scale, noise_std, eta); the explicit sizes of "
                    "step_size.expected_loss.explicit; 3 random ranges r; float64")
def bridge_step_size(expected_loss=R.expected_one_step_loss, optimal=R.optimal_one_step_eta, seed=0):
    pf = Proof()
    rng = np.random.default_rng([seed, 6])
    args = (S.eta, S.d_s, S.N_s, S.dy_s, S.m2, S.m4, S.s2, S.n2)
    a, b, c = S.one_step_coeffs(S.d_s, S.N_s)
    f = sp.lambdify(args, [S.expected_loss_formula(S.eta, S.d_s, S.N_s, S.dy_s), S.optimal_eta(a, b, c),
                           S.optimal_loss(a, b, c, S.dy_s)], "numpy")
    for _ in range(8):
        dd, nn, dy = int(rng.integers(1, 21)), int(rng.integers(1, 51)), int(rng.integers(1, 4))
        mm2 = float(rng.uniform(0.05, 2.0))
        mm4 = mm2 ** 2 * float(rng.uniform(1.0, 4.0))
        w, ns, e = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 10.0))
        L, es, Ls = f(e, dd, nn, dy, mm2, mm4, w * w, ns * ns)
        where = f"d={dd}, N={nn}, d_y={dy}"
        pf.close("symbolic L(eta) = reference expected_one_step_loss", L,
                 expected_loss(e, dd, nn, mm2, mm4, w_scale=w, d_y=dy, noise_std=ns), where, KIND)
        pf.close("symbolic (eta*, L*) = reference optimal_one_step_eta", [es, Ls],
                 list(optimal(dd, nn, mm2, mm4, w_scale=w, d_y=dy, noise_std=ns)), where, KIND)
    for dd, nn, dy in S.LOSS_SIZES:
        g = sp.lambdify([S.eta, S.m2, S.m3, S.m4, S.s2, S.n2], S.expected_loss_explicit(dd, nn, dy), "numpy")
        mm2 = float(rng.uniform(0.05, 2.0))
        mm4 = mm2 ** 2 * float(rng.uniform(1.0, 4.0))
        w, ns, e = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 10.0))
        pf.close("exact expectation at explicit sizes = reference expected_one_step_loss",
                 g(e, mm2, float(rng.standard_normal()), mm4, w * w, ns * ns),
                 expected_loss(e, dd, nn, mm2, mm4, w_scale=w, d_y=dy, noise_std=ns), f"d={dd}, N={nn}, d_y={dy}", KIND)
    r = sp.Symbol("r", positive=True)
    x = sp.Symbol("x", real=True)
    mom = sp.lambdify(r, [sp.integrate(x ** k / (2 * r), (x, -r, r)) for k in (2, 4)], "numpy")
    for _ in range(3):
        rr = float(rng.uniform(0.1, 3.0))
        pf.close("exact U(-r, r) moments (m2, m4) = reference uniform_moments", mom(rr),
                 list(R.uniform_moments((-rr, rr))), f"r={rr:.3f}", KIND)
    return pf
