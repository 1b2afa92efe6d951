"""GD++ (curvature-corrected GD): the token update of the construction and the
eigenvalue map of the transformed data's second moment, proved as algebra.

von Oswald et al., ICML 2023, Sec. 4 / App. A.5. Weights ``algebra.gdpp_weights``
(``reference.constructions.gdpp_layer``): W_K = W_Q = [[I,0],[0,0]],
W_V = [[I,0],[W_0,-I]], P = [[-gamma I,0],[0,(eta/N) I]]. Every token, from the
pre-update tokens: x <- (I - gamma X^T X) x, y <- y - DeltaW x. In rows (one token per
row, as in the reference) the x-update reads X (I - gamma C), C = X^T X, using C^T = C.

Eigenvalue map: X' = X (I - gamma C) has C' = X'^T X' = (I - gamma C) C (I - gamma C),
a polynomial in C, so an eigenvector u of C with eigenvalue lambda is an eigenvector of
C' with eigenvalue lambda (1 - gamma lambda)^2.
"""

import sympy as sp
from sympy import Identity, MatrixSymbol

from . import algebra as A
from .algebra import N, d, d_y, eta, gamma
from .core import Proof, theorem
from .prop1 import explicit_data, general_data

SRC = "von Oswald et al. ICML'23, Sec. 4 (GD++)"
GDPP_SIZES = ((1, 1, 2), (2, 1, 2), (2, 2, 3))
EIGEN_SIZES = (2, 3)
lam = sp.Symbol("lambda", real=True)


def eigen_map(l, g):
    """The claimed map of eigenvalues of C = X^T X under X -> X (I - g C)."""
    return l * (1 - g * l) ** 2


def gdpp_transform(X, g):
    """The x-part of the GD++ update in rows: X -> X (I - g X^T X)."""
    C = X.T * X
    I = sp.eye(X.shape[1]) if isinstance(X, sp.MatrixBase) else Identity(X.shape[1])
    return X * (I - g * C)


def _four(t):
    return sp.BlockMatrix([[t[0], t[1]], [t[2], t[3]]])


@theorem("gdpp.general", source=SRC,
         statement="The GD++ layer maps every token (x, y), query included, to ((I - gamma X^T X) x, y - DeltaW x) "
                   "computed from the pre-update tokens; this is one step of the attention-free GD++ recursion "
                   "(solvers.gdpp_predict), and two stacked layers with (eta_1, gamma_1), (eta_2, gamma_2) are two steps",
         hypotheses="d, d_y, N, M symbolic; X, Y, X_q, Y_q, W_0 MatrixSymbols; eta, gamma (and eta_2, gamma_2) real scalars")
def prove_gdpp_general(weights=A.gdpp_weights):
    pf = Proof()
    X, Y, X_q, Y_q, W_0 = general_data()
    out = A.apply_layer((X, Y, X_q, Y_q), weights(d, d_y, N, eta, W_0, gamma), N, d)
    pf.matexpr_zero("C = X^T X is symmetric (used to write (I - gamma C) x in rows as x^T (I - gamma C))",
                    (X.T * X).T - X.T * X)
    want = A.gdpp_token_update(X, Y, X_q, Y_q, W_0, eta, gamma, N)
    pf.blocks_zero("layer output = (x (I - gamma C), y - DeltaW x) for every token", _four(out),
                   [[want[0], want[1]], [want[2], want[3]]])
    rec = A.gdpp_recursion_step(X, Y, X_q, Y_q, W_0, eta, gamma, N)
    pf.blocks_zero("layer output = one step of the GD++ recursion of solvers.gdpp_predict", _four(out),
                   [[rec[0], rec[1]], [rec[2], rec[3]]])
    eta2, gamma2 = sp.symbols("eta_2 gamma_2", real=True)
    Y0 = -X_q * W_0.T
    two = A.apply_layer(A.apply_layer((X, Y, X_q, Y0), weights(d, d_y, N, eta, W_0, gamma), N, d),
                        weights(d, d_y, N, eta2, W_0, gamma2), N, d)
    rec2 = A.gdpp_recursion_step(*A.gdpp_recursion_step(X, Y, X_q, Y0, W_0, eta, gamma, N), W_0, eta2, gamma2, N)
    pf.blocks_zero("two GD++ layers (eta_1, gamma_1), (eta_2, gamma_2) = two recursion steps", _four(two),
                   [[rec2[0], rec2[1]], [rec2[2], rec2[3]]], where="symbolic dimensions, K=2")
    return pf


@theorem("gdpp.explicit", source=SRC,
         statement="The GD++ token update at explicit sizes: every entry of the layer output equals "
                   "((I - gamma X^T X) x, y - DeltaW x) for the context and query tokens",
         hypotheses="(d, d_y, N) in " + ", ".join(map(str, GDPP_SIZES)) + "; one query token; all entries, eta, gamma "
                    "real scalar symbols")
def prove_gdpp_explicit(weights=A.gdpp_weights, sizes=GDPP_SIZES):
    pf = Proof()
    for dx, dy, n in sizes:
        X, Y, X_q, Y_q, W_0 = explicit_data(dx, dy, n)
        out = A.apply_layer((X, Y, X_q, Y_q), weights(dx, dy, n, eta, W_0, gamma), n, dx)
        C = X.T * X
        # column form, as the paper writes it: x_j <- (I - gamma C) x_j
        x_new = ((sp.eye(dx) - gamma * C) * sp.Matrix.vstack(X, X_q).T).T
        dW = A.gd_delta(X, Y, W_0, eta, n)
        y_new = (sp.Matrix.vstack(Y, Y_q).T - dW * sp.Matrix.vstack(X, X_q).T).T
        pf.entries_zero("layer output = ((I - gamma C) x_j, y_j - DeltaW x_j) for every token j",
                        sp.Matrix.vstack(sp.Matrix.hstack(out[0], out[1]), sp.Matrix.hstack(out[2], out[3])),
                        sp.Matrix.hstack(x_new, y_new), f"d={dx}, d_y={dy}, N={n}")
    return pf


def eigen_coefficient(expr, C, u):
    """Given a matrix expression that expands to sum_k s_k C^k u, return the scalar
    sum_k s_k lambda^k, i.e. apply the hypothesis C u = lambda u (by induction,
    C^k u = C^(k-1) (lambda u) = lambda C^(k-1) u = lambda^k u). Raises if a term is not
    of the form scalar * C^k * u (then the rewrite does not apply and the proof fails)."""
    e = sp.expand(expr.doit())
    terms = e.args if isinstance(e, sp.MatAdd) else (e,)
    total = sp.S.Zero
    for t in terms:
        coeff, mats = t.as_coeff_matrices() if hasattr(t, "as_coeff_matrices") else (sp.S.One, [t])
        # structural identification of the factors (pattern matching for the rewrite),
        # not a decision of the theorem: that is the scalar residual afterwards
        if not mats or mats[-1] != u:
            raise ValueError(f"term {t} does not end in the eigenvector {u}")
        k = 0
        for m in mats[:-1]:
            if m == C:
                k += 1
            elif isinstance(m, sp.MatPow) and m.base == C and m.exp.is_Integer and m.exp >= 0:
                k += int(m.exp)
            else:
                raise ValueError(f"term {t}: factor {m} is not a power of {C}")
        total += coeff * lam ** k
    return total


@theorem("gdpp.eigen.general", source=SRC,
         statement="If C = X^T X and X' = X (I - gamma C) then C' = X'^T X' = (I - gamma C) C (I - gamma C) = "
                   "C - 2 gamma C^2 + gamma^2 C^3; hence C u = lambda u implies C' u = lambda (1 - gamma lambda)^2 u",
         hypotheses="d, N symbolic; X (N x d) MatrixSymbol; C (d x d) with C u = lambda u for u (d x 1); gamma, lambda "
                    "real scalars (C^T = C holds for C = X^T X; the eigen step needs only that C' is a polynomial in C)")
def prove_eigen_general(transform=gdpp_transform, claimed=eigen_map):
    pf = Proof()
    X = MatrixSymbol("X", N, d)
    C = X.T * X
    I = Identity(d)
    Xp = transform(X, gamma)
    pf.matexpr_zero("C' = X'^T X' = (I - gamma C)^T C (I - gamma C) = (I - gamma C) C (I - gamma C)  (C^T = C)",
                    Xp.T * Xp - (I - gamma * C) * C * (I - gamma * C))
    pf.matexpr_zero("C' = C - 2 gamma C^2 + gamma^2 C^3, a polynomial in C (C commutes with itself)",
                    Xp.T * Xp - (C - 2 * gamma * C * C + gamma ** 2 * C * C * C))
    Cs, u = MatrixSymbol("C", d, d), MatrixSymbol("u", d, 1)
    # C' written with a generic C: the first step shows this is X'^T X' for C = X^T X.
    Cp_u = (I - gamma * Cs) * Cs * (I - gamma * Cs) * u
    s = eigen_coefficient(Cp_u, Cs, u)
    pf.entries_zero("C u = lambda u  =>  C' u = lambda (1 - gamma lambda)^2 u  (C^k u -> lambda^k u, then the scalar "
                    "residual)", s, claimed(lam, gamma), "symbolic d (scalar coefficient of u)")
    return pf


def _sym_symmetric(n):
    return sp.Matrix(n, n, lambda i, j: sp.Symbol(f"c_{min(i, j)}{max(i, j)}", real=True))


def _rem(e, ch):
    return sp.rem(sp.expand(e), ch, lam)


@theorem("gdpp.eigen.explicit", source=SRC, slow=True,
         statement="At explicit sizes: X'^T X' = (I - gamma C) C (I - gamma C) entrywise; for a symmetric C, every root "
                   "lambda of det(C - lambda I) is a root of det(C' - lambda (1 - gamma lambda)^2 I), and the "
                   "eigenvector u(lambda) of C (a null vector of C - lambda I) satisfies C' u = lambda (1 - gamma lambda)^2 u",
         hypotheses="d in " + str(EIGEN_SIZES) + " (N = d + 1 for the data step); X and the symmetric C with scalar "
                    "symbol entries; residuals reduced modulo the characteristic polynomial of C in lambda")
def prove_eigen_explicit(transform=gdpp_transform, claimed=eigen_map, sizes=EIGEN_SIZES):
    pf = Proof()
    for n in sizes:
        X = A.sym_matrix("x", n + 1, n)
        C = X.T * X
        I = sp.eye(n)
        Xp = transform(X, gamma)
        pf.entries_zero("X'^T X' = (I - gamma C) C (I - gamma C)", Xp.T * Xp, (I - gamma * C) * C * (I - gamma * C),
                        f"d={n}, N={n + 1}")
        Cg = _sym_symmetric(n)
        Cp = (I - gamma * Cg) * Cg * (I - gamma * Cg)
        ch = sp.expand((Cg - lam * I).det(method="berkowitz"))
        pf.entries_zero("det(C' - p(lambda) I) = 0 mod det(C - lambda I): p maps the spectrum of C into that of C'",
                        _rem((Cp - claimed(lam, gamma) * I).det(method="berkowitz"), ch), 0,
                        f"d={n}, symmetric C, remainder in lambda")
        Mx = Cg - lam * I
        u = sp.Matrix([Cg[0, 1], lam - Cg[0, 0]]) if n == 2 else Mx[0, :].cross(Mx[1, :]).T
        pf.entries_zero("u(lambda) is an eigenvector of C: C u - lambda u = 0 mod det(C - lambda I)",
                        (Cg * u - lam * u).applyfunc(lambda e: _rem(e, ch)), sp.zeros(n, 1), f"d={n}")
        pf.entries_zero("C' u = lambda (1 - gamma lambda)^2 u mod det(C - lambda I)",
                        (Cp * u - claimed(lam, gamma) * u).applyfunc(lambda e: _rem(e, ch)), sp.zeros(n, 1), f"d={n}")
    return pf
