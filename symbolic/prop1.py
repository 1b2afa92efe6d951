"""Prop. 1 (one LSA layer = one GD step) and K layers = K GD steps, proved as algebra.

von Oswald et al., ICML 2023, Prop. 1 and Sec. 3. The layer is ``algebra.lsa_layer``
(a line-by-line transcription of ``reference.layers.lsa.lsa_forward``), the weights are
``algebra.gd_weights`` (``reference.constructions.gd_layer``). Every proof takes the
weights as a parameter (the correct construction by default) so a test can inject a
wrong one and see the proof fail.

General dimensions: X (N x d), Y (N x d_y), queries X_q (M x d), Y_q (M x d_y),
W_0 (d_y x d) are MatrixSymbols with d, d_y, N, M symbolic; the weights are block
matrices of Identity / ZeroMatrix / W_0; the output is reduced with block_collapse
and every block residual must expand to ZeroMatrix. Explicit sizes: the same code
on Matrices of scalar symbols, every entry of the residual expanded to 0.
"""

import sympy as sp
from sympy import MatrixSymbol, Trace, ZeroMatrix

from . import algebra as A
from .algebra import N, M, d, d_y, eta
from .core import Proof, theorem

SRC = "von Oswald et al. ICML'23"

# Explicit sizes (d, d_y, N) for the scalar-symbol proofs (one query token, as in the reference).
PROP1_SIZES = ((1, 1, 1), (2, 1, 3), (2, 2, 2), (3, 1, 2))
KLAYER_SIZES = ((1, 1, 2, 3), (2, 1, 2, 2), (2, 1, 2, 3), (1, 2, 2, 2))   # (d, d_y, N, K)


def general_data():
    """The data of the general-dimension proofs as MatrixSymbols of symbolic size."""
    return (MatrixSymbol("X", N, d), MatrixSymbol("Y", N, d_y), MatrixSymbol("X_q", M, d),
            MatrixSymbol("Y_q", M, d_y), MatrixSymbol("W_0", d_y, d))


def explicit_data(dx, dy, n):
    """The same data as Matrices of scalar symbols at explicit sizes (one query)."""
    return (A.sym_matrix("x", n, dx), A.sym_matrix("y", n, dy), A.sym_matrix("xq", 1, dx),
            A.sym_matrix("yq", 1, dy), A.sym_matrix("w", dy, dx))


def _gd_gradient_matexpr(X, Y, W):
    """dL/dW of L(W) = 1/(2N) ||X W^T - Y||_F^2, by SymPy's matrix calculus."""
    R = X * W.T - Y
    return sp.diff(Trace(R.T * R) / (2 * N), W)


@theorem("prop1.general", source=f"{SRC}, Prop. 1",
         statement="One LSA layer with W_K = W_Q = [[I,0],[0,0]], W_V = [[0,0],[W_0,-I]], P = (eta/N) I maps every "
                   "token (x, y) to (x, y - DeltaW x), DeltaW = -(eta/N) sum_i (W_0 x_i - y_i) x_i^T = -eta dL/dW(W_0); "
                   "with the query's y-slot at -W_0 x_q the readout is (W_0 + DeltaW) x_q, and (eta/N) sum_i y_i x_i^T x_q "
                   "when W_0 = 0",
         hypotheses="d, d_y, N, M symbolic positive integers; X (N x d), Y (N x d_y), X_q (M x d), Y_q (M x d_y), "
                    "W_0 (d_y x d) MatrixSymbols; eta a real scalar")
def prove_prop1_general(weights=A.gd_weights):
    pf = Proof()
    X, Y, X_q, Y_q, W_0 = general_data()
    W = weights(d, d_y, N, eta, W_0)
    out = A.apply_layer((X, Y, X_q, Y_q), W, N, d)
    want = A.gd_token_update(X, Y, X_q, Y_q, W_0, eta, N)
    pf.blocks_zero("layer output = (x, y - DeltaW x) for every context and query token",
                   sp.BlockMatrix([[out[0], out[1]], [out[2], out[3]]]), [[want[0], want[1]], [want[2], want[3]]])
    pf.matexpr_zero("DeltaW = -eta dL/dW at W_0 for L(W) = 1/(2N) ||X W^T - Y||_F^2 (SymPy matrix derivative)",
                    A.gd_delta(X, Y, W_0, eta, N) + eta * _gd_gradient_matexpr(X, Y, W_0))
    out_q = A.apply_layer((X, Y, X_q, -X_q * W_0.T), W, N, d)
    W_1 = W_0 + A.gd_delta(X, Y, W_0, eta, N)
    pf.matexpr_zero("readout -y_q' = (W_0 + DeltaW) x_q when the query's y-slot starts at -W_0 x_q",
                    -out_q[3] - X_q * W_1.T)
    Z = ZeroMatrix(d_y, d)
    out_0 = A.apply_layer((X, Y, X_q, ZeroMatrix(M, d_y)), weights(d, d_y, N, eta, Z), N, d)
    pf.matexpr_zero("with W_0 = 0 the readout is (eta/N) sum_i y_i x_i^T x_q (rows: (eta/N) X_q X^T Y)",
                    -out_0[3] - (eta / N) * X_q * X.T * Y)
    return pf


@theorem("prop1.explicit", source=f"{SRC}, Prop. 1",
         statement="Prop. 1 at explicit sizes with scalar symbols: the layer output equals (x, y - DeltaW x) entrywise, "
                   "DeltaW equals -eta times SymPy's derivative of 1/(2N) sum_i ||W x_i - y_i||^2, and the readout equals "
                   "the one-step GD prediction",
         hypotheses="(d, d_y, N) in " + ", ".join(map(str, PROP1_SIZES)) + "; one query token; every entry of X, Y, x_q, "
                    "y_q, W_0 and eta a real scalar symbol")
def prove_prop1_explicit(weights=A.gd_weights, sizes=PROP1_SIZES):
    pf = Proof()
    for dx, dy, n in sizes:
        X, Y, X_q, Y_q, W_0 = explicit_data(dx, dy, n)
        where = f"d={dx}, d_y={dy}, N={n}"
        W = weights(dx, dy, n, eta, W_0)
        out = A.apply_layer((X, Y, X_q, Y_q), W, n, dx)
        want = A.gd_token_update(X, Y, X_q, Y_q, W_0, eta, n)
        pf.entries_zero("layer output = (x, y - DeltaW x) for every token",
                        sp.Matrix.vstack(sp.Matrix.hstack(out[0], out[1]), sp.Matrix.hstack(out[2], out[3])),
                        sp.Matrix.vstack(sp.Matrix.hstack(want[0], want[1]), sp.Matrix.hstack(want[2], want[3])), where)
        Wsym = A.sym_matrix("v", dy, dx)
        L = sum((X * Wsym.T - Y).applyfunc(lambda e: e ** 2)) / (2 * n)
        grad = sp.Matrix(dy, dx, lambda i, j: sp.diff(L, Wsym[i, j])).subs(dict(zip(Wsym, W_0)))
        pf.entries_zero("DeltaW = -eta dL/dW(W_0) (scalar sympy.diff of the GD loss)",
                        A.gd_delta(X, Y, W_0, eta, n), -eta * grad, where)
        out_q = A.apply_layer((X, Y, X_q, -X_q * W_0.T), W, n, dx)
        W_1 = A.gd_steps(X, Y, W_0, eta, n, 1)[1]
        pf.entries_zero("readout -y_q' = W_1 x_q, W_1 one GD step from W_0", -out_q[3], X_q * W_1.T, where)
    return pf


def _residual_tokens(X, Y, X_q, W_0, W_k):
    """The tokens after k layers (claim): context y-slots Y - X (W_k - W_0)^T, query
    y-slot -x_q W_k^T, x-slots unchanged."""
    return X, Y - X * (W_k - W_0).T, X_q, -X_q * W_k.T


@theorem("klayers.step.general", source=f"{SRC}, Sec. 3 (K layers = K GD steps)",
         statement="Induction step: if the tokens entering a Prop. 1 layer (same W_0, eta in every layer) are "
                   "(x_i, y_i - (W_k - W_0) x_i) and (x_q, -W_k x_q), the layer outputs the same form with "
                   "W_{k+1} = W_k - (eta/N) sum_i (W_k x_i - y_i) x_i^T, one GD step; with the base case k = 0 "
                   "(the input tokens), K stacked layers perform K GD steps for every K",
         hypotheses="d, d_y, N, M symbolic; X, Y, X_q, W_0, W_k MatrixSymbols (W_k arbitrary, d_y x d); eta a real scalar")
def prove_klayers_step(weights=A.gd_weights):
    pf = Proof()
    X, Y, X_q, _, W_0 = general_data()
    W_k = MatrixSymbol("W_k", d_y, d)
    pf.blocks_zero("base case: the input tokens (X, Y), (x_q, -W_0 x_q) have the claimed form at k = 0",
                   sp.BlockMatrix([[X, Y], [X_q, -X_q * W_0.T]]),
                   [[a, b] for a, b in zip(_residual_tokens(X, Y, X_q, W_0, W_0)[::2],
                                           _residual_tokens(X, Y, X_q, W_0, W_0)[1::2])])
    out = A.apply_layer(_residual_tokens(X, Y, X_q, W_0, W_k), weights(d, d_y, N, eta, W_0), N, d)
    W_next = W_k + A.gd_delta(X, Y, W_k, eta, N)
    want = _residual_tokens(X, Y, X_q, W_0, W_next)
    pf.blocks_zero("step: one layer maps the k-th residual tokens to the (k+1)-th with W_{k+1} = W_k + DeltaW(W_k)",
                   sp.BlockMatrix([[out[0], out[1]], [out[2], out[3]]]), [[want[0], want[1]], [want[2], want[3]]])
    return pf


@theorem("klayers.k23.general", source=f"{SRC}, Sec. 3 (K layers = K GD steps)",
         statement="Two and three stacked Prop. 1 layers, composed without the induction hypothesis, give the "
                   "readout W_K x_q of K = 2, 3 GD steps from W_0 and context y-slots y_i - (W_K - W_0) x_i",
         hypotheses="d, d_y, N, M symbolic; X, Y, X_q, W_0 MatrixSymbols; eta a real scalar; K in {2, 3}")
def prove_klayers_k23(weights=A.gd_weights, Ks=(2, 3)):
    pf = Proof()
    X, Y, X_q, _, W_0 = general_data()
    W = weights(d, d_y, N, eta, W_0)
    tokens = (X, Y, X_q, -X_q * W_0.T)
    Ws = A.gd_steps(X, Y, W_0, eta, N, max(Ks))
    for k in range(1, max(Ks) + 1):
        tokens = A.apply_layer(tokens, W, N, d)
        if k in Ks:
            want = _residual_tokens(X, Y, X_q, W_0, Ws[k])
            pf.blocks_zero(f"{k} layers = {k} GD steps (all four token blocks)",
                           sp.BlockMatrix([[tokens[0], tokens[1]], [tokens[2], tokens[3]]]),
                           [[want[0], want[1]], [want[2], want[3]]], where=f"symbolic dimensions, K={k}")
    return pf


@theorem("klayers.explicit", source=f"{SRC}, Sec. 3 (K layers = K GD steps)", slow=True,
         statement="K stacked Prop. 1 layers at explicit sizes: the readout equals W_K x_q of K GD steps from W_0 "
                   "(with one eta) and the context y-slots equal y_i - (W_K - W_0) x_i, entrywise",
         hypotheses="(d, d_y, N, K) in " + ", ".join(map(str, KLAYER_SIZES)) + "; one query token; all entries and "
                    "eta real scalar symbols")
def prove_klayers_explicit(weights=A.gd_weights, sizes=KLAYER_SIZES):
    pf = Proof()
    for dx, dy, n, K in sizes:
        X, Y, X_q, _, W_0 = explicit_data(dx, dy, n)
        W = weights(dx, dy, n, eta, W_0)
        tokens = (X, Y, X_q, -X_q * W_0.T)
        for _ in range(K):
            tokens = A.apply_layer(tokens, W, n, dx)
        W_K = A.gd_steps(X, Y, W_0, eta, n, K)[K]
        where = f"d={dx}, d_y={dy}, N={n}, K={K}"
        pf.entries_zero(f"readout after {K} layers = W_{K} x_q", -tokens[3], X_q * W_K.T, where)
        pf.entries_zero(f"context y-slots after {K} layers = y_i - (W_{K} - W_0) x_i", tokens[1],
                        Y - X * (W_K - W_0).T, where)
    return pf
