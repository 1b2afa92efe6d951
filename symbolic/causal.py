"""Causal Prop. 1 of the mesa-optimization paper (arXiv 2309.05858), proved as algebra:
one causal LSA layer with the weights of ``reference.causal_constructions.causal_gd_layer``
puts Phi_1(t) x_t into the first slot of every token t, Phi_1(t) one GD step from Phi_0 on
L_t(Phi) = 1/2 sum_{t'<=t} ||x_{t'} - Phi x_{t'-1}||^2 (no 1/t).

General dimensions: token t attends to the n = t + 1 tokens t' <= t (the causal mask at
row t, diagonal included), so row t of the causal layer is the layer with context rows
E_c = [[X_c Phi_0^T, X_c, X_p], [x Phi_0^T, x, x_p]] (n - 1 earlier tokens, then token t
itself) and query row e = [x Phi_0^T, x, x_p]; X_c, X_p ((n-1) x d), x, x_p (1 x d),
Phi_0 (d x d) are MatrixSymbols with d, n symbolic. The layer is ``algebra.lsa_layer``
(one head, no softmax, no 1/N); residuals are reduced blockwise. Explicit sizes: the whole
sequence as Matrices of scalar symbols through a transcription of the causal
``lsa_forward`` (mask tril(ones(T, T))), every token's entries expanded to 0.

Every proof takes the weights and the GD target as parameters so a test can inject a
wrong one (a 1/t factor, a sign) and see it fail.
"""

import numpy as np
import sympy as sp
from sympy import BlockMatrix, Identity, MatrixSymbol, Trace, ZeroMatrix

import reference as R
from reference import causal_constructions as CC
from reference import sequences as S

from . import algebra as A
from .core import Proof, theorem

SRC = "von Oswald et al. 2023b (arXiv 2309.05858), Prop. 1 (causal)"
d, n = sp.symbols("d n", integer=True, positive=True)
eta = A.eta
EXPLICIT_SIZES = ((1, 1), (1, 3), (2, 2), (2, 3), (3, 2))        # (d, T)


def causal_weights(dx, step, Phi_0):
    """W_Q = [0, I, 0], W_K = [0, 0, I], W_V = [0, I, -Phi_0] (d x 3d), P = eta [I; 0; 0] (3d x d)."""
    ex = isinstance(dx, int)
    I, Z = A._I(dx), A._Z(dx, dx)
    W_Q = A.blocks([[Z, I, Z]], ex)
    W_K = A.blocks([[Z, Z, I]], ex)
    W_V = A.blocks([[Z, I, -Phi_0]], ex)
    P = A.blocks([[step * I], [Z], [Z]], ex)
    return W_Q, W_K, W_V, P


def gd_step(Xa, Xpa, Phi_0, step, scale=1):
    """Phi_1 = Phi_0 - eta dL/dPhi(Phi_0), L = scale * 1/2 ||Xa - Xpa Phi^T||_F^2 (rows are tokens),
    dL/dPhi by SymPy (matrix calculus or scalar diff)."""
    if isinstance(Xa, sp.MatrixBase):
        Phi = A.sym_matrix("v", Xa.shape[1], Xa.shape[1])
        L = scale * sum((Xa - Xpa * Phi.T).applyfunc(lambda e: e ** 2)) / 2
        grad = sp.Matrix(Phi.shape[0], Phi.shape[1], lambda i, j: sp.diff(L, Phi[i, j])).subs(dict(zip(Phi, Phi_0)))
        return Phi_0 - step * grad
    # SymPy's matrix calculus on plain MatrixSymbols (n x d) for the stacked data, then the
    # stacked blocks substituted in: it does not differentiate through BlockMatrix
    Phi, Xs, Xps = MatrixSymbol("Phi", d, d), MatrixSymbol("X_all", n, d), MatrixSymbol("X_prev_all", n, d)
    Rm = Xs - Xps * Phi.T
    grad = sp.diff(scale * Trace(Rm.T * Rm) / 2, Phi).subs(Phi, Phi_0)
    return sp.block_collapse((Phi_0 - step * grad).xreplace({Xs: Xa, Xps: Xpa}))


def general_data():
    return (MatrixSymbol("X_c", n - 1, d), MatrixSymbol("X_p", n - 1, d), MatrixSymbol("x", 1, d),
            MatrixSymbol("x_p", 1, d), MatrixSymbol("Phi_0", d, d))


def general_row(weights=causal_weights):
    """Row t of the causal layer output, block-collapsed: (prediction, x, x_prev) blocks."""
    X_c, X_p, x, x_p, Phi_0 = general_data()
    E_c = BlockMatrix([[X_c * Phi_0.T, X_c, X_p], [x * Phi_0.T, x, x_p]])
    e = BlockMatrix([[x * Phi_0.T, x, x_p]])
    out = A.lsa_layer(e, E_c, *weights(d, eta, Phi_0))
    return out.blocks if isinstance(out, BlockMatrix) else None


@theorem("causal.gd_step.general", source=SRC,
         statement="One causal LSA layer with W_Q = [0, I, 0], W_K = [0, 0, I], W_V = [0, I, -Phi_0], P = eta [I; 0; 0] "
                   "on tokens [Phi_0 x_t, x_t, x_{t-1}] maps token t to [Phi_1(t) x_t, x_t, x_{t-1}], Phi_1(t) = Phi_0 - "
                   "eta grad L_t(Phi_0), L_t(Phi) = 1/2 sum_{t'<=t} ||x_{t'} - Phi x_{t'-1}||^2 (no 1/t), at every t",
         hypotheses="d, n = t + 1 symbolic positive integers; the n - 1 earlier tokens X_c, X_p ((n-1) x d), token t's "
                    "x, x_p (1 x d) and Phi_0 (d x d) MatrixSymbols; eta a real scalar")
def prove_causal_prop1_general(weights=causal_weights, loss_scale=1):
    pf = Proof()
    X_c, X_p, x, x_p, Phi_0 = general_data()
    blocks = general_row(weights)
    Xa = BlockMatrix([[X_c], [x]])
    Xpa = BlockMatrix([[X_p], [x_p]])
    Phi_1 = gd_step(Xa, Xpa, Phi_0, eta, loss_scale)
    pf.blocks_zero("token t's output = [Phi_1(t) x_t, x_t, x_{t-1}] with Phi_1(t) one GD step on L_t from Phi_0",
                   BlockMatrix([[blocks[0, 0], blocks[0, 1], blocks[0, 2]]]),
                   [[sp.block_collapse(x * Phi_1.T), x, x_p]])
    pf.matexpr_zero("with Phi_0 = 0 the prediction is eta sum_{t'<=t} x_{t'} (x_{t'-1} . x_t) (rows: eta x X_p'^T X')",
                    sp.block_collapse(x * (eta * (Xa.T * Xpa)).T).subs(Phi_0, ZeroMatrix(d, d))
                    - sp.block_collapse(x * gd_step(Xa, Xpa, ZeroMatrix(d, d), eta, loss_scale).T))
    return pf


def explicit_causal_layer(E, W_Q, W_K, W_V, P):
    """The causal lsa_forward on one sequence E (T x D) of scalar symbols: q = E W_Q^T,
    k = E W_K^T, v = E W_V^T, A = (q k^T) * tril(ones(T, T)), out = E + A v P^T."""
    T = E.shape[0]
    q, k, v = E * W_Q.T, E * W_K.T, E * W_V.T
    Am = (q * k.T).multiply_elementwise(sp.Matrix(T, T, lambda i, j: 1 if j <= i else 0))
    return E + Am * v * P.T


@theorem("causal.gd_step.explicit", source=SRC,
         statement="Causal Prop. 1 at explicit sizes over a whole sequence (scalar symbols; x_{-1} = 0): every token's "
                   "first slot after the causal layer equals Phi_1(t) x_t, Phi_1(t) from SymPy's derivative of L_t at "
                   "Phi_0; the x_t and x_{t-1} slots are unchanged",
         hypotheses="(d, T) in " + ", ".join(map(str, EXPLICIT_SIZES)) + "; every entry of the sequence, Phi_0 and eta "
                    "a real scalar symbol")
def prove_causal_prop1_explicit(weights=causal_weights, loss_scale=None, sizes=EXPLICIT_SIZES):
    pf = Proof()
    for dx, T in sizes:
        Xs = A.sym_matrix("x", T, dx)
        Xp = sp.Matrix.vstack(sp.zeros(1, dx), Xs[:T - 1, :]) if T > 1 else sp.zeros(1, dx)
        Phi_0 = A.sym_matrix("w", dx, dx)
        E = sp.Matrix.hstack(Xs * Phi_0.T, Xs, Xp)
        out = explicit_causal_layer(E, *weights(dx, eta, Phi_0))
        want = []
        for t in range(T):
            scale = 1 if loss_scale is None else loss_scale(t)
            want.append(Xs[t, :] * gd_step(Xs[:t + 1, :], Xp[:t + 1, :], Phi_0, eta, scale).T)
        where = f"d={dx}, T={T}"
        pf.entries_zero("first slot of token t = Phi_1(t) x_t for every t", out[:, :dx], sp.Matrix.vstack(*want), where)
        pf.entries_zero("x_t and x_{t-1} slots unchanged", out[:, dx:], E[:, dx:], where)
    return pf


@theorem("bridge.causal_gd_step", source="numeric bridge: symbolic results vs the reference implementation", kind="bridge",
         statement="The general-dimension causal Prop. 1 row (block-collapsed, at concrete sizes, for every t) equals "
                   "reference.lsa_forward(causal=True) with causal_constructions.causal_gd_layer on sequences.seq_tokens, "
                   "and causal_constructions.causal_gd_predict",
         hypotheses="4 random (d, T) with d <= 4, T <= 6; random sequences, Phi_0, eta; float64")
def bridge_causal_prop1(layer=CC.causal_gd_layer, seed=0):
    pf = Proof()
    rng = np.random.default_rng([seed, 41])
    X_c, X_p, x, x_p, Phi_0 = general_data()
    blocks = general_row()
    for _ in range(4):
        dx, T = int(rng.integers(1, 5)), int(rng.integers(2, 7))
        X = rng.uniform(-1, 1, (1, T, dx))
        P0 = 0.5 * rng.standard_normal((dx, dx))
        e = float(rng.uniform(0.05, 1.0))
        ref, _ = R.lsa_forward(S.seq_tokens(X, P0), layer(dx, e, P0), causal=True)
        Xp = S.shifted(X)[0]
        for t in range(1, T):
            sizes = {d: dx, n: t + 1}
            f = sp.lambdify([a.subs(sizes) for a in (X_c, X_p, x, x_p, Phi_0)] + [eta],
                            [b.subs(sizes) for b in blocks[0, :]], "numpy")
            row = np.hstack(f(X[0, :t], Xp[:t], X[0, t:t + 1], Xp[t:t + 1], P0, e))
            where = f"d={dx}, T={T}, t={t}"
            pf.close("symbolic row t = reference causal lsa_forward(causal_gd_layer) at token t", row, ref[0, t:t + 1],
                     where)
            pf.close("symbolic prediction = reference causal_gd_predict", row[:, :dx],
                     CC.causal_gd_predict(X, e, P0)[0, t:t + 1], where)
    return pf
