"""The mesa layer's Sherman-Morrison recursion and the delta rule, proved as algebra.

von Oswald et al., "Uncovering mesa-optimization algorithms in Transformers" (arXiv
2309.05858), the mesa layer; Schlag et al. 2021 / Yang et al. 2024, the delta rule. The
reference is ``reference/layers/mesa.py`` and ``reference/layers/delta.py``. Each proof
takes the update it checks as a parameter (the reference's formula by default) so a test
can inject a wrong one and see the proof fail. All at explicit sizes with scalar symbols,
decided by residuals that cancel (rational functions) or expand (polynomials) to 0:

* ``mesa.sherman_morrison``: R' = (R - u u^T / (g + k^T u)) / g, u = R k, is the inverse
  of g R^{-1} + k k^T (checked as R' (g I + k k^T R) = R, R a symmetric symbol matrix);
* ``mesa.reverse_sherman_morrison``: g (R' - R' k k^T R' / (k^T R' k - 1)) = R;
* ``mesa.delta_is_gd``: S' = a S - b (a S k - v) k^T equals a S - b dl/dS'' at S'' = a S,
  l(S'') = 1/2 ||S'' k - v||^2 (SymPy's derivative entry by entry);
* ``mesa.small_lambda``: the mesa update y(lam) = M (I/lam + C)^{-1} q with C = sum k k^T,
  M = sum v k^T satisfies y(lam) / lam -> M q as lam -> 0 (causal linear attention, the
  LSA layer with the same W_Q, W_K, W_V, P), and d/dlam (y / lam) at 0 is -M C q: so
  y(lam) = lam M q - lam^2 M C q + O(lam^3);
* ``bridge.mesa``: the symbolic results evaluated at random points against the reference
  (``sm_queries`` one step, ``run_states`` one step, ``mesa_forward`` at lam = 1e-3 and
  its exact rational form, ``lsa_forward`` causal for the limit).
"""

import numpy as np
import sympy as sp

from . import algebra as A
from .core import Proof, theorem

SRC = "von Oswald et al. 2023 (arXiv 2309.05858), mesa layer"
SIZES = (1, 2, 3)                    # Kd of the Sherman-Morrison proofs
DELTA_SIZES = ((1, 1), (2, 3), (3, 2))   # (Vd, Kd)
LIMIT_SIZES = ((1, 1, 2), (2, 1, 2), (2, 2, 3))   # (Kd, Vd, T)
g, a, b, lam = sp.symbols("g a b lam", positive=True)


def sym_symmetric(name, n):
    return sp.Matrix(n, n, lambda i, j: sp.Symbol(f"{name}_{min(i, j)}{max(i, j)}", real=True))


def sm_update(R, k, g):
    """The reference's forward step (reference.layers.mesa.sm_queries)."""
    u = R * k
    return (R - u * u.T / (g + (k.T * u)[0, 0])) / g


def sm_reverse(Rn, k, g):
    """The reference's reverse step (reference.layers.mesa.reverse_sm_backward)."""
    w = Rn * k
    return g * (Rn - w * w.T / ((k.T * w)[0, 0] - 1))


def delta_update(S, k, v, a, b):
    """The reference's delta rule step (reference.layers.delta.run_states)."""
    Sh = a * S
    return Sh + b * (v - Sh * k) * k.T


def mesa_over_lam(Ks, Vs, q, lam):
    """y(lam) / lam = M (I/lam + C)^{-1} q / lam = M (I + lam C)^{-1} q (Ks, Vs: lists of
    column vectors)."""
    n = q.shape[0]
    C = sp.zeros(n, n)
    M = sp.zeros(Vs[0].shape[0], n)
    for k_, v_ in zip(Ks, Vs):
        C += k_ * k_.T
        M += v_ * k_.T
    return M * (sp.eye(n) + lam * C).LUsolve(q), M, C


def linear_attention(Ks, Vs, q):
    """sum_s v_s (k_s . q): the causal LSA layer's per-head sum at the last token."""
    out = sp.zeros(Vs[0].shape[0], 1)
    for k_, v_ in zip(Ks, Vs):
        out += v_ * (k_.T * q)[0, 0]
    return out


@theorem("mesa.sherman_morrison", source=f"{SRC}; Sherman-Morrison",
         statement="R' = (R - R k k^T R / (g + k^T R k)) / g is the inverse of g R^{-1} + k k^T: "
                   "R' (g I + k k^T R) = R for every symmetric R (the forward recursion of the mesa layer)",
         hypotheses="Kd in " + str(SIZES) + "; R symmetric with scalar-symbol entries, k a symbol vector, g > 0; "
                    "residuals cancelled as rational functions")
def prove_sherman_morrison(update=sm_update, sizes=SIZES):
    pf = Proof()
    for n in sizes:
        R, k = sym_symmetric("r", n), A.sym_matrix("k", n, 1)
        Rn = update(R, k, g)
        pf.entries_zero("R_t (g I + k k^T R_{t-1}) = R_{t-1}, i.e. R_t = (g R_{t-1}^{-1} + k k^T)^{-1}",
                        Rn * (g * sp.eye(n) + k * k.T * R), R, f"Kd={n}", reduce=sp.cancel)
    return pf


@theorem("mesa.reverse_sherman_morrison", source=f"{SRC}; memory-light backward",
         statement="The reverse step g (R_t - R_t k k^T R_t / (k^T R_t k - 1)) recovers R_{t-1} from R_t = the "
                   "forward step of R_{t-1}",
         hypotheses="Kd in " + str(SIZES) + "; R symmetric with scalar-symbol entries, k a symbol vector, g > 0; "
                    "residuals cancelled as rational functions")
def prove_reverse(reverse=sm_reverse, sizes=SIZES):
    pf = Proof()
    for n in sizes:
        R, k = sym_symmetric("r", n), A.sym_matrix("k", n, 1)
        pf.entries_zero("reverse(forward(R_{t-1})) = R_{t-1}", reverse(sm_update(R, k, g), k, g), R, f"Kd={n}",
                        reduce=sp.cancel)
    return pf


@theorem("mesa.delta_is_gd", source="Schlag et al. 2021; Yang et al. 2024 (DeltaNet, Gated DeltaNet)",
         statement="The delta rule S_t = a S_{t-1} - b (a S_{t-1} k - v) k^T is one gradient step of step size b on "
                   "l(S) = 1/2 ||S k - v||^2 from S = a S_{t-1}: S_t = a S_{t-1} - b dl/dS(a S_{t-1})",
         hypotheses="(Vd, Kd) in " + str(DELTA_SIZES) + "; S, k, v symbol matrices, a, b scalars; the derivative "
                    "by SymPy entry by entry; residuals expanded")
def prove_delta_is_gd(update=delta_update, sizes=DELTA_SIZES):
    pf = Proof()
    for vd, kd in sizes:
        S, k, v = A.sym_matrix("s", vd, kd), A.sym_matrix("k", kd, 1), A.sym_matrix("v", vd, 1)
        W = A.sym_matrix("w", vd, kd)                                   # the free variable of l
        r = W * k - v
        loss = (r.T * r)[0, 0] / 2
        grad = sp.Matrix(vd, kd, lambda i, j: sp.diff(loss, W[i, j]))
        at = {W[i, j]: a * S[i, j] for i in range(vd) for j in range(kd)}
        pf.entries_zero("S_t = a S_{t-1} - b grad l(a S_{t-1})", update(S, k, v, a, b), a * S - b * grad.subs(at),
                        f"Vd={vd}, Kd={kd}")
        pf.entries_zero("grad l(S) = (S k - v) k^T", grad, r * k.T, f"Vd={vd}, Kd={kd}")
    return pf


@theorem("mesa.small_lambda", source=f"{SRC}; the mesa layer and linear attention",
         statement="As lam -> 0 the mesa layer's update is lam times causal linear attention to first order: "
                   "y(lam) / lam -> sum_s v_s (k_s . q) (the LSA layer with the same weights) and "
                   "d/dlam (y / lam) at 0 = -M C q, so y(lam) = lam M q - lam^2 M C q + O(lam^3)",
         hypotheses="(Kd, Vd, T) in " + str(LIMIT_SIZES) + "; keys, values, query symbol vectors, no forgetting; "
                    "y / lam is a rational function of lam, regular at 0; residuals cancelled")
def prove_small_lambda(limit=linear_attention, sizes=LIMIT_SIZES):
    pf = Proof()
    for kd, vd, T in sizes:
        Ks = [A.sym_matrix(f"k{s}", kd, 1) for s in range(T)]
        Vs = [A.sym_matrix(f"v{s}", vd, 1) for s in range(T)]
        q = A.sym_matrix("q", kd, 1)
        y, M, C = mesa_over_lam(Ks, Vs, q, lam)
        where = f"Kd={kd}, Vd={vd}, T={T}"
        y0 = y.subs(lam, 0)                    # LUsolve's pivots are 1 + O(lam): regular at 0
        pf.entries_zero("lim_{lam->0} y(lam) / lam = causal linear attention", y0, limit(Ks, Vs, q), where,
                        reduce=sp.cancel)
        y1 = y.diff(lam).subs(lam, 0)
        pf.entries_zero("d/dlam (y / lam) at lam = 0 equals -M C q", y1, -M * C * q, where, reduce=sp.cancel)
    return pf


@theorem("bridge.mesa", source="numeric bridge: symbolic results vs the reference implementation", kind="bridge",
         statement="The symbolic Sherman-Morrison step, reverse step and delta rule step, and the small-lam forms, "
                   "evaluated at random points equal reference.layers.mesa (sm_queries, mesa_forward), "
                   "reference.layers.delta (run_states) and the causal lsa_forward",
         hypotheses="random symmetric positive definite R, keys, states; Kd = 3, Vd = 2, T = 3; float64")
def bridge_mesa(seed=0):
    import reference as R_
    from reference.layers.delta import run_states
    from reference.layers.mesa import MesaParams, mesa_forward, sm_queries

    pf = Proof()
    rng = np.random.default_rng([seed, 7])
    kd, vd, T = 3, 2, 3
    # one Sherman-Morrison step from R_0 = lam I: symbolic vs sm_queries (its R_T for T = 1)
    k = rng.standard_normal(kd)
    lam0, g0 = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 1.0))
    Rs, ks = sym_symmetric("r", kd), A.sym_matrix("k", kd, 1)
    f = sp.lambdify([list(Rs.free_symbols), list(ks), g], sm_update(Rs, ks, g), "numpy")
    syms = list(Rs.free_symbols)
    R0 = lam0 * np.eye(kd)
    vals = [R0[int(str(s)[2]), int(str(s)[3])] for s in syms]
    sym = np.asarray(f(vals, list(k), g0), dtype=np.float64)
    _, R_T, _ = sm_queries(np.zeros((1, 1, 1, kd)), k.reshape(1, 1, 1, kd), np.array([lam0]), g0)
    pf.close("symbolic SM step = reference sm_queries", sym, R_T[0, 0], f"Kd={kd}")
    # the reverse step recovers R_0
    fr = sp.lambdify([list(Rs.free_symbols), list(ks), g], sm_reverse(Rs, ks, g), "numpy")
    Rn = R_T[0, 0]
    back = np.asarray(fr([Rn[int(str(s)[2]), int(str(s)[3])] for s in syms], list(k), g0), dtype=np.float64)
    pf.close("symbolic reverse step of the reference's R_1 = R_0", back, R0, f"Kd={kd}")
    # one delta rule step: symbolic vs run_states
    S0, v = rng.standard_normal((vd, kd)), rng.standard_normal(vd)
    a0, b0 = float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.1, 1.0))
    sym_d = np.asarray(delta_update(sp.Matrix(S0), sp.Matrix(k), sp.Matrix(v), a0, b0), dtype=np.float64)
    ref_d = run_states(S0[None, None], k.reshape(1, 1, 1, kd), v.reshape(1, 1, 1, vd), np.full((1, 1, 1), b0),
                       np.full((1, 1, 1), a0), 0, 1)[0, 0, 0]
    pf.close("symbolic delta step = reference run_states", sym_d, ref_d, f"Vd={vd}, Kd={kd}")
    # the exact mesa update (symbolic rational form) vs mesa_forward; its limit vs causal lsa_forward
    E = rng.uniform(-1, 1, (1, T, 4))
    W_Q, W_K = rng.standard_normal((1, kd, 4)), rng.standard_normal((1, kd, 4))
    W_V, P = rng.standard_normal((1, vd, 4)), rng.standard_normal((1, 4, vd))
    Ks = [sp.Matrix(W_K[0] @ E[0, s]) for s in range(T)]
    Vs = [sp.Matrix(W_V[0] @ E[0, s]) for s in range(T)]
    q = sp.Matrix(W_Q[0] @ E[0, T - 1])
    y, _, _ = mesa_over_lam(Ks, Vs, q, lam)
    for l0 in (1e-3, 0.7):
        out, _ = mesa_forward(E, MesaParams(W_Q, W_K, W_V, P, np.array([l0])), form="direct")
        sym_y = l0 * np.asarray(y.subs(lam, l0), dtype=np.float64)[:, 0]
        pf.close(f"symbolic mesa update at lam={l0} = reference mesa_forward (last token)", P[0] @ sym_y,
                 out[0, -1] - E[0, -1], f"T={T}")
    lin, _ = R_.lsa_forward(E, R_.LSAParams(W_Q, W_K, W_V, P), causal=True)
    sym_lin = P[0] @ np.asarray(linear_attention(Ks, Vs, q), dtype=np.float64)[:, 0]
    pf.close("symbolic limit (linear attention) = reference causal lsa_forward (last token)", sym_lin,
             lin[0, -1] - E[0, -1], f"T={T}")
    return pf
