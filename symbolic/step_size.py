"""The closed-form step size of one GD step and its expected loss, proved as algebra.

``reference/solvers.py`` (expected_one_step_loss, optimal_one_step_eta): for one GD step
from W_0 = 0 on tasks with i.i.d. zero-mean input coordinates (moments m2, m4), teacher
W ~ w_scale N(0, I) and label noise N(0, noise_std^2),

    L(eta) = 0.5 d_y (a eta^2 - 2 b eta + c),
    a = s2 m2 T2 + n2 d m2^2 / N,   b = s2 m2 d m2,   c = s2 m2 d,   (s2 = w_scale^2, n2 = noise_std^2)
    T2 = E tr(A^2) = (d m4 + d (d-1) m2^2) / N + (N-1)/N d m2^2,   A = (1/N) sum_i x_i x_i^T,

so eta* = b / a and L(eta*) = 0.5 d_y (c - b^2 / a).

Proved here: the optimum in general symbols (a > 0); the moment formula T2 by exact
expectation at explicit sizes (expand the polynomial, replace every monomial by the
product of the moments of its independent coordinates); and the whole expected loss,
from the model y_hat = (eta/N) sum_i y_i x_i^T x_q, by the same exact expectation.
"""

import sympy as sp

from .core import Proof, theorem

SRC = "reference/solvers.py (expected_one_step_loss, optimal_one_step_eta)"
MOMENT_SIZES = tuple((dd, nn) for dd in (1, 2, 3) for nn in (1, 2, 3))
LOSS_SIZES = ((1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 2, 1), (3, 2, 1), (2, 3, 1), (3, 3, 1), (1, 1, 2), (2, 2, 2))  # (d, N, d_y)

eta = sp.Symbol("eta", real=True)
m2, m4, s2, n2 = sp.symbols("m2 m4 s2 n2", positive=True)
m3 = sp.Symbol("m3", real=True)
d_s, N_s, dy_s = sp.symbols("d N d_y", integer=True, positive=True)


# --- transcription of reference/solvers.py ---------------------------------------------

def trace_A2_formula(d, N, m2=m2, m4=m4):
    """T2 = E tr(A^2) = (d m4 + d (d-1) m2^2) / N + (N-1)/N d m2^2  (solvers._one_step_coeffs)."""
    return (d * m4 + d * (d - 1) * m2 ** 2) / N + sp.Rational(1) * (N - 1) / N * d * m2 ** 2


def one_step_coeffs(d, N, T2=None):
    """(a, b, c) of solvers._one_step_coeffs, line by line, with s2 = w_scale^2, n2 = noise_std^2."""
    T2 = trace_A2_formula(d, N) if T2 is None else T2
    a = s2 * m2 * T2 + n2 * d * m2 ** 2 / N
    b = s2 * m2 * d * m2
    c = s2 * m2 * d
    return a, b, c


def expected_loss_formula(e, d, N, d_y):
    """0.5 d_y (a eta^2 - 2 b eta + c)  (solvers.expected_one_step_loss)."""
    a, b, c = one_step_coeffs(d, N)
    return sp.Rational(1, 2) * d_y * (a * e ** 2 - 2 * b * e + c)


def optimal_eta(a, b, c):
    """eta* = b / a  (solvers.optimal_one_step_eta)."""
    return b / a


def optimal_loss(a, b, c, d_y):
    """L* = 0.5 d_y (c - b^2 / a)  (solvers.optimal_one_step_eta)."""
    return sp.Rational(1, 2) * d_y * (c - b ** 2 / a)


# --- exact expectation over independent coordinates --------------------------------------

def x_moment(k):
    """E x^k of one input coordinate: zero mean (m1 = 0); m3 kept as a free symbol so a
    result free of m3 holds for any third moment; m_k symbols beyond 4."""
    table = {0: sp.S.One, 1: sp.S.Zero, 2: m2, 3: m3, 4: m4}
    return table[k] if k in table else sp.Symbol(f"m{k}", real=True)


def gaussian_moment(var):
    """E z^k for z ~ N(0, var): 0 for odd k, (k-1)!! var^(k/2) for even k."""
    def mom(k):
        return sp.S.Zero if k % 2 else sp.factorial2(k - 1) * var ** (k // 2)
    return mom


def expectation(expr, families):
    """E[expr] for independent variables: ``families`` is a list of (variables, moment
    function). The polynomial is expanded and each monomial replaced by the product of
    the moments of its variables' powers (independence)."""
    variables = [v for vs, _ in families for v in vs]
    moment_of = {v: mom for vs, mom in families for v in vs}
    P = sp.Poly(sp.expand(expr), *variables)
    total = sp.S.Zero
    for powers, coeff in P.terms():
        term = coeff
        for v, k in zip(variables, powers):
            if k:
                term *= moment_of[v](k)
        total += term
    return total


def _syms(name, rows, cols):
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{i}{j}", real=True))


# --- theorems ------------------------------------------------------------------------------

@theorem("step_size.optimum.general", source=SRC,
         statement="For L(eta) = 0.5 d_y (a eta^2 - 2 b eta + c) with a > 0: dL/deta = 0 at eta* = b/a, "
                   "L(eta*) = 0.5 d_y (c - b^2/a), L(eta) - L(eta*) = 0.5 d_y a (eta - eta*)^2 (so eta* is the global "
                   "minimum); with the reference's a, b, c: eta* = d m2 / T2 when there is no label noise",
         hypotheses="a, d_y > 0, b, c, eta real symbols; the coefficients of solvers._one_step_coeffs in symbols "
                    "d, N, m2, m4, s2 = w_scale^2 > 0, n2 = noise_std^2 > 0")
def prove_optimum(eta_star=optimal_eta, loss_star=optimal_loss):
    pf = Proof()
    a, dy = sp.symbols("a d_y", positive=True)
    b, c = sp.symbols("b c", real=True)
    L = sp.Rational(1, 2) * dy * (a * eta ** 2 - 2 * b * eta + c)
    es = eta_star(a, b, c)
    pf.entries_zero("dL/deta = 0 at eta* = b/a", sp.diff(L, eta).subs(eta, es), 0, "general a, b, c, d_y",
                    reduce=sp.cancel)
    pf.entries_zero("L(eta*) = 0.5 d_y (c - b^2/a)", L.subs(eta, es), loss_star(a, b, c, dy), "general a, b, c, d_y",
                    reduce=sp.cancel)
    pf.entries_zero("L(eta) - L(eta*) = 0.5 d_y a (eta - eta*)^2", L - loss_star(a, b, c, dy),
                    sp.Rational(1, 2) * dy * a * (eta - es) ** 2, "general a, b, c, d_y", reduce=sp.cancel)
    second = sp.diff(L, eta, 2)
    pf.holds("d^2L/deta^2 = d_y a > 0, so eta* is the unique minimiser",
             sp.cancel(second - dy * a) == 0 and second.is_positive is True,
             "second derivative reduced to d_y a, positive by the assumptions a > 0, d_y > 0")
    A_, B_, C_ = one_step_coeffs(d_s, N_s)
    pf.holds("the reference's a is positive (so the optimum applies)", A_.is_positive is True,
             "a = s2 m2 T2 + n2 d m2^2/N with T2 = (d m4 + d(d-1) m2^2)/N + (N-1)/N d m2^2 > 0 for positive symbols")
    pf.entries_zero("no label noise: eta* = b/a = d m2 / T2", eta_star(A_, B_, C_).subs(n2, 0),
                    d_s * m2 / trace_A2_formula(d_s, N_s), "symbolic d, N, m2, m4, s2", reduce=sp.cancel)
    return pf


@theorem("step_size.moment.explicit", source=SRC,
         statement="E tr(A^2) = (d m4 + d(d-1) m2^2)/N + (N-1)/N d m2^2 for A = (1/N) sum_i x_i x_i^T with i.i.d. "
                   "zero-mean coordinates, by exact expectation of the expanded polynomial; E tr(A) = d m2; and for "
                   "x ~ U(-r, r): m1 = m3 = 0, m2 = r^2/3, m4 = r^4/5 (tasks.uniform_moments)",
         hypotheses="(d, N) in {1,2,3} x {1,2,3}; coordinates independent with E x = 0, E x^2 = m2, E x^3 = m3 (free), "
                    "E x^4 = m4; r > 0 symbolic for the uniform moments")
def prove_moment(formula=trace_A2_formula, sizes=MOMENT_SIZES):
    pf = Proof()
    for d, N in sizes:
        X = _syms("x", N, d)
        A = sum((X[i, :].T * X[i, :] for i in range(N)), sp.zeros(d, d)) / N
        fam = [(list(X), x_moment)]
        pf.entries_zero("E tr(A^2) = (d m4 + d(d-1) m2^2)/N + (N-1)/N d m2^2", expectation((A * A).trace(), fam),
                        formula(d, N), f"d={d}, N={N}")
        pf.entries_zero("E tr(A) = d m2", expectation(A.trace(), fam), d * m2, f"d={d}, N={N}")
    r, x = sp.symbols("r x", positive=True)
    mom = [sp.integrate(x ** k / (2 * r), (x, -r, r)) for k in range(5)]
    pf.entries_zero("U(-r, r) moments: (1, 0, r^2/3, 0, r^4/5)", sp.Matrix(mom),
                    sp.Matrix([1, 0, r ** 2 / 3, 0, r ** 4 / 5]), "symbolic r > 0 (exact integrals)")
    return pf


def expected_loss_explicit(d, N, d_y):
    """E[0.5 ||y_hat - W x_q||^2] of one GD step from W_0 = 0, by exact expectation:
    y_i = W x_i + eps_i, y_hat = (eta/N) sum_i y_i x_i^T x_q, W entries ~ N(0, s2),
    eps entries ~ N(0, n2), input coordinates with moments (0, m2, m3, m4)."""
    X, xq = _syms("x", N, d), _syms("q", d, 1)
    W, eps = _syms("w", d_y, d), _syms("n", d_y, N)
    Y = W * X.T + eps                                                  # (d_y, N): columns y_i
    y_hat = (eta / N) * Y * X * xq                                     # (d_y, 1) = (eta/N) sum_i y_i x_i^T x_q
    err = y_hat - W * xq
    L = sp.Rational(1, 2) * (err.T * err)[0, 0]
    fams = [(list(X) + list(xq), x_moment), (list(W), gaussian_moment(s2)), (list(eps), gaussian_moment(n2))]
    return expectation(L, fams)


@theorem("step_size.expected_loss.explicit", source=SRC,
         statement="The expected loss of one GD step from W_0 = 0, E[0.5 ||(eta/N) sum_i y_i x_i^T x_q - W x_q||^2] "
                   "with y_i = W x_i + eps_i, equals 0.5 d_y (a eta^2 - 2 b eta + c) with the reference's a, b, c, "
                   "for any third moment m3 of the inputs",
         hypotheses="(d, N, d_y) in " + ", ".join(map(str, LOSS_SIZES)) + "; independent W ~ N(0, s2), eps ~ N(0, n2), "
                    "input coordinates with E x = 0, m2, m3 (free), m4; eta symbolic")
def prove_expected_loss(loss=expected_loss_formula, sizes=LOSS_SIZES):
    pf = Proof()
    for d, N, d_y in sizes:
        pf.entries_zero("E[L(eta)] = 0.5 d_y (a eta^2 - 2 b eta + c)", expected_loss_explicit(d, N, d_y),
                        loss(eta, d, N, d_y), f"d={d}, N={N}, d_y={d_y}")
    return pf
