"""Prop. 3 (ICML'23 App. A.5): a copy layer then one GD step on classic tokens, proved as algebra.

The construction is ``reference/copy_construction.py`` (its module docstring states it):
posenc concat -> copy layer (merged linear attention) -> Prop. 1 layer on the copied
labels. Each proof takes what it checks as a parameter (the correct construction by
default) so a test can inject a wrong one and see the proof fail.

* ``copy.realise.general``: with PE (T x P) and PE_c (S x P) of full row rank, the
  pe x pe block M^T = PE^T (PE PE^T)^-1 A (PE_c PE_c^T)^-1 PE_c gives logits
  PE M^T PE_c^T = A for every pattern A (R1: any attention pattern is realisable from the
  encodings; this is the pseudo-inverse the reference uses, for full row rank);
* ``copy.two_layers.general``: symbolic N, d, d_y and encoding widths, the context
  tokens grouped as the N x tokens and the N y tokens (attention over context keys is a
  sum, so the order of the keys does not matter once the pattern travels with them);
  given the realised pattern (x token j -> y token j, query -> the x tokens with weights
  a, y rows 0) and encodings whose copy channels are linear in the other channels on the
  context (R2, C = O G^T), the x tokens' layer-2 values are -(eta/N) Y, the y tokens'
  are 0, and the readout is (eta/N) x_q X^T Y + (s - 1) pe_q[L] with s = a (PE_x r):
  one GD step exactly when s = 1 (the reference picks a = e_0, r = pe_0 / |pe_0|^2);
* ``copy.two_layers.explicit``: at explicit sizes, the reference's weight formulas
  (``copy_blocks``, ``gd_blocks``) transcribed in exact arithmetic on an exact rational
  encoding table of full rank, token by token through two merged LSA layers (the
  SPEC section 4 equation), every entry of readout - GD and of the y tokens' values
  expanded to 0;
* ``bridge.copy``: the reference's weight builders on the same rational tables equal
  the exact weights, and the reference's two-layer prediction on sinusoidal tables that
  meet R1 and R2 equals the symbolic readout at random points.
"""

from fractions import Fraction

import numpy as np
import sympy as sp
from sympy import Identity, MatrixSymbol, ZeroMatrix

from . import algebra as A
from .algebra import N, eta
from .core import Proof, theorem

SRC = "von Oswald et al. ICML'23, Prop. 3 (App. A.5)"
df, dl, m = sp.symbols("d_f d_y m", positive=True, integer=True)   # content first/last widths, |O|
Pw = sp.Symbol("P", positive=True, integer=True)
EXPLICIT_SIZES = ((1, 1, 1), (2, 1, 1), (2, 1, 2), (1, 1, 2), (2, 2, 1))   # (d, d_y, N)
BRIDGE_SIZES = ((2, 1, 1, 4), (3, 2, 1, 6), (3, 1, 1, 5), (4, 1, 1, 6))  # (d, d_y, N, P): d > d_y, N = 1 (tables of condition < 10, so the "algebra" rtol applies; larger N in claims copy.*)


# ---- the realisation lemma --------------------------------------------------------------

@theorem("copy.realise.general", source=SRC,
         statement="For encodings PE (T x P) and PE_c (S x P) of full row rank and any pattern A (T x S), the pe x pe "
                   "block M^T = PE^T (PE PE^T)^-1 A (PE_c PE_c^T)^-1 PE_c of W_KQ gives the logits PE M^T PE_c^T = A",
         hypotheses="T, S, P symbolic; PE PE^T and PE_c PE_c^T invertible (full row rank: R1)")
def prove_realise(realiser=None):
    pf = Proof()
    T_, S_ = sp.symbols("T S", positive=True, integer=True)
    PE, PEc, Ap = MatrixSymbol("PE", T_, Pw), MatrixSymbol("PE_c", S_, Pw), MatrixSymbol("A", T_, S_)
    Mt = (PE.T * (PE * PE.T).I * Ap * (PEc * PEc.T).I * PEc) if realiser is None else realiser(PE, PEc, Ap)
    pf.matexpr_zero("PE M^T PE_c^T = A (the pattern is realised exactly)", PE * Mt * PEc.T - Ap)
    return pf


# ---- general sizes: the two layers in blocks ---------------------------------------------

def general_tokens():
    """Channel blocks (content first d_f, content last d_y, O, C, L) of the x tokens
    (N rows), the y tokens (N rows) and the query (1 row), with R2 built in:
    C = O G^T on the context."""
    G = MatrixSymbol("G", dl, m)
    Xf, Xl, Y = MatrixSymbol("X_f", N, df), MatrixSymbol("X_l", N, dl), MatrixSymbol("Y", N, dl)
    Ox, Oy, Lx, Ly = MatrixSymbol("O_x", N, m), MatrixSymbol("O_y", N, m), MatrixSymbol("L_x", N, dl), MatrixSymbol("L_y", N, dl)
    xq_f, xq_l = MatrixSymbol("xq_f", 1, df), MatrixSymbol("xq_l", 1, dl)
    oq, cq, lq = MatrixSymbol("o_q", 1, m), MatrixSymbol("c_q", 1, dl), MatrixSymbol("l_q", 1, dl)
    x = [Xf, Xl, Ox, Ox * G.T, Lx]
    y = [ZeroMatrix(N, df), Y, Oy, Oy * G.T, Ly]
    q = [xq_f, xq_l, oq, cq, lq]
    return x, y, q, G


def copy_values(tok, r, lq):
    """Layer 1's values (W_PV e)^T per channel block: C <- content last, L <- -(pe r) l_q."""
    rO, rC, rL = r
    rows = tok[0].shape[0]
    pe_r = tok[2] * rO + tok[3] * rC + tok[4] * rL                       # (rows, 1)
    return [ZeroMatrix(rows, df), ZeroMatrix(rows, dl), ZeroMatrix(rows, m), tok[1], -pe_r * lq]


def gd_values(tok, G):
    """Layer 2's values: L <- -(eta/N) (C - O G^T), the rest 0."""
    rows = tok[0].shape[0]
    return [ZeroMatrix(rows, df), ZeroMatrix(rows, dl), ZeroMatrix(rows, m), ZeroMatrix(rows, dl),
            -(eta / N) * (tok[3] - tok[2] * G.T)]


def _add(tok, A_blocks, vals):
    """tok + sum_k A_k vals_k, blockwise (A_k: (rows x key rows) or None)."""
    out = list(tok)
    for Ak, vk in zip(A_blocks, vals):
        if Ak is None:
            continue
        out = [o + Ak * v for o, v in zip(out, vk)]
    return out


def two_layers_general(values1=copy_values, values2=gd_values):
    """(x tokens after layer 1, y tokens after layer 1, layer-2 values of x and y, readout)."""
    x, y, q, G = general_tokens()
    a = MatrixSymbol("a", 1, N)                                          # the query's weights over the x tokens
    r = (MatrixSymbol("r_O", m, 1), MatrixSymbol("r_C", dl, 1), MatrixSymbol("r_L", dl, 1))
    lq = q[4]
    vx, vy = values1(x, r, lq), values1(y, r, lq)
    # the realised pattern (copy.realise): x rows -> y token j (I_N), y rows 0, query -> a over the x tokens
    x1 = _add(x, (None, Identity(N)), (vx, vy))
    y1 = list(y)
    q1 = _add(q, (a, None), (vx, vy))
    # layer 2: logits = content . content with the query (W_KQ = the content identity)
    lx = x1[0] * q1[0].T + x1[1] * q1[1].T                               # (N, 1)
    ly = y1[0] * q1[0].T + y1[1] * q1[1].T                               # (N, 1)
    wx, wy = values2(x1, G), values2(y1, G)
    q2 = _add(q1, (lx.T, ly.T), (wx, wy))
    s = a * (x[2] * r[0] + x[3] * r[1] + x[4] * r[2])                     # (1, 1)
    return x1, y1, wx, wy, -q2[4], s, lq


@theorem("copy.two_layers.general", source=SRC,
         statement="On classic tokens with concatenated encodings whose copy channels are linear in the other channels "
                   "on the context (R2: C = O G^T), the copy layer (pattern x_j -> (0, y_j), y rows 0, query -> a; "
                   "values C <- content's label features, L <- -(pe r) pe_q[L]) followed by the layer with logits "
                   "c_i . c_q and values -(eta/N)(C - O G^T) into L gives every x token the value -(eta/N) y_j, every y "
                   "token the value 0, and the readout (eta/N) x_q X^T Y + (s - 1) pe_q[L], s = a PE_x r: one GD step "
                   "from W = 0 exactly when s = 1",
         hypotheses="N, d_f = d - d_y, d_y, m = P - 2 d_y symbolic; X, Y, x_q, the encodings' blocks, G, r, a "
                    "MatrixSymbols; eta a real scalar; the layer-1 pattern realised (copy.realise.general, R1)")
def prove_two_layers_general(values1=copy_values, values2=gd_values):
    pf = Proof()
    x1, y1, wx, wy, pred, s, lq = two_layers_general(values1, values2)
    Y = MatrixSymbol("Y", N, dl)
    pf.matexpr_zero("layer 1 writes y_j into the x token's copy channels: C_x' = O_x G^T + Y",
                    x1[3] - (x1[2] * MatrixSymbol("G", dl, m).T + Y))
    pf.matexpr_zero("the x tokens' layer-2 values are -(eta/N) Y", wx[4] + (eta / N) * Y)
    pf.matexpr_zero("the y tokens' layer-2 values are 0 (their copy channels are their encoding's, removed by G)", wy[4])
    X = sp.BlockMatrix([[MatrixSymbol("X_f", N, df), MatrixSymbol("X_l", N, dl)]])
    xq = sp.BlockMatrix([[MatrixSymbol("xq_f", 1, df), MatrixSymbol("xq_l", 1, dl)]])
    gd = sp.block_collapse((eta / N) * xq * X.T * Y)
    pf.matexpr_zero("readout = (eta/N) x_q X^T Y + (s - 1) pe_q[L]", pred - gd - (s - Identity(1)) * lq)
    return pf


# ---- explicit sizes, exact arithmetic --------------------------------------------------

def rational_table(N_, P_, seed=0):
    """A (2N+1, P) table of small rationals meeting R1 and R2 (exact ranks), found by
    seeded draws."""
    rng = np.random.default_rng([seed, N_, P_])
    for _ in range(100):
        pe = sp.Matrix(2 * N_ + 1, P_, lambda i, j: sp.Rational(int(rng.integers(-4, 5)), int(rng.integers(1, 4))))
        if pe.rank() == 2 * N_ + 1 and pe[: 2 * N_, : P_ - 2].rank() == 2 * N_:
            return pe
    raise RuntimeError("no full-rank rational table found")


def exact_weights(pe, dx, dy, eta_):
    """The reference's ``copy_blocks`` (linear pattern) and ``gd_blocks``, in exact arithmetic:
    (W_KQ1, W_PV1, W_KQ2, W_PV2)."""
    T_, P_ = pe.shape
    n = (T_ - 1) // 2
    D = dx + P_
    Apat = sp.zeros(T_, 2 * n)
    for j in range(n):
        Apat[2 * j, 2 * j + 1] = 1
    Apat[2 * n, 0] = 1
    pc = pe[: 2 * n, :]
    Mt = pe.pinv() * Apat * pc.pinv().T
    W_KQ1, W_PV1 = sp.zeros(D, D), sp.zeros(D, D)
    W_KQ1[dx:, dx:] = Mt.T
    for k in range(dy):
        W_PV1[D - 2 * dy + k, dx - dy + k] = 1
    r = pe[0, :].T / (pe[0, :] * pe[0, :].T)[0, 0]
    for k in range(dy):
        for c in range(P_):
            W_PV1[D - dy + k, dx + c] = -pe[2 * n, P_ - dy + k] * r[c]
    G = (pc[:, : P_ - 2 * dy].pinv() * pc[:, P_ - 2 * dy: P_ - dy]).T
    W_KQ2, W_PV2 = sp.zeros(D, D), sp.zeros(D, D)
    W_KQ2[:dx, :dx] = sp.eye(dx)
    for k in range(dy):
        W_PV2[D - dy + k, D - 2 * dy + k] = -eta_ / n
        for c in range(P_ - 2 * dy):
            W_PV2[D - dy + k, dx + c] = (eta_ / n) * G[k, c]
    return W_KQ1, W_PV1, W_KQ2, W_PV2


def merged_layer(E, W_KQ, W_PV, S):
    """SPEC section 4 (context-only, merged): out_p = e_p + sum_{i<S} (W_PV e_i)(e_i^T W_KQ e_p); E rows = tokens."""
    out = []
    for p in range(E.rows):
        ep = E[p, :].T
        acc = ep.copy()
        for i in range(S):
            ei = E[i, :].T
            acc += (W_PV * ei) * (ei.T * W_KQ * ep)[0, 0]
        out.append(acc.T)
    return sp.Matrix.vstack(*out)


def classic_symbolic_tokens(dx, dy, n, pe):
    """(E (2n+1, dx + P) with symbolic x, y, x_q and the table pe, X, Y, x_q)."""
    X, Y, xq = A.sym_matrix("x", n, dx), A.sym_matrix("y", n, dy), A.sym_matrix("xq", 1, dx)
    rows = []
    for j in range(n):
        rows.append(X[j, :])
        rows.append(sp.Matrix.hstack(sp.zeros(1, dx - dy), Y[j, :]))
    rows.append(xq)
    C = sp.Matrix.vstack(*rows)
    return sp.Matrix.hstack(C, pe), X, Y, xq


@theorem("copy.two_layers.explicit", source=SRC,
         statement="At explicit sizes, the reference's copy and GD weight formulas (exact arithmetic) on an exact "
                   "rational encoding table meeting R1 and R2, applied token by token as two merged LSA layers: the "
                   "readout equals (eta/N) sum_j y_j x_j^T x_q and every y token's layer-2 value is 0, entrywise",
         hypotheses="(d, d_y, N) in " + ", ".join(map(str, EXPLICIT_SIZES)) + "; P = 2N + 2 d_y; x, y, x_q, eta "
                    "scalar symbols; a seeded rational table of full row rank (R1) whose first P - 2 d_y columns on the "
                    "context have rank 2N (R2)")
def prove_two_layers_explicit(weights=exact_weights, sizes=EXPLICIT_SIZES):
    pf = Proof()
    for dx, dy, n in sizes:
        P_ = 2 * n + 2 * dy
        pe = rational_table(n, P_)
        where = f"d={dx}, d_y={dy}, N={n}, P={P_}"
        W_KQ1, W_PV1, W_KQ2, W_PV2 = weights(pe, dx, dy, eta)
        E, X, Y, xq = classic_symbolic_tokens(dx, dy, n, pe)
        E1 = merged_layer(E, W_KQ1, W_PV1, 2 * n)
        vals = [(W_PV2 * E1[2 * j + 1, :].T).T for j in range(n)]
        pf.entries_zero("the y tokens' layer-2 values are 0", sp.Matrix.vstack(*vals), sp.zeros(n, E.cols), where)
        E2 = merged_layer(E1, W_KQ2, W_PV2, 2 * n)
        pred = -E2[2 * n, E.cols - dy:]
        gd = (eta / n) * xq * X.T * Y
        pf.entries_zero("readout = (eta/N) sum_j y_j x_j^T x_q (one GD step from 0, no offset)", pred, gd, where)
    return pf


# ---- numeric bridge ---------------------------------------------------------------------

@theorem("bridge.copy", source="numeric bridge: symbolic results vs the reference implementation", kind="bridge",
         statement="The reference's copy_blocks / gd_blocks on the exact rational tables equal the exact weights; the "
                   "reference's two-layer prediction (posenc concat -> copy layer -> GD layer) on sinusoidal tables "
                   "meeting R1 and R2 equals the symbolic readout (eta/N) x_q X^T Y + (s - 1) pe_q[L] (s = 1) at random points",
         hypotheses="the sizes of copy.two_layers.explicit for the weights; (d, d_y, N, P) in " + str(BRIDGE_SIZES)
                    + " for the prediction, 5 random tasks each; float64")
def bridge_copy(seed=0, blocks=None, predict_fn=None):
    import reference as R
    from reference import copy_construction as CC

    blocks = (CC.copy_blocks, CC.gd_blocks) if blocks is None else blocks
    pf = Proof()
    for dx, dy, n in EXPLICIT_SIZES:
        P_ = 2 * n + 2 * dy
        pe = rational_table(n, P_)
        e_ = Fraction(7, 10)
        W = exact_weights(pe, dx, dy, sp.Rational(e_.numerator, e_.denominator))
        pe_f = np.array(pe.tolist(), dtype=np.float64)
        Apat = CC.copy_pattern(n, "linear")
        got = (*blocks[0](pe_f, dx, dy, Apat), *blocks[1](pe_f, dx, dy, float(e_)))
        want = [np.array(w.tolist(), dtype=np.float64) for w in W]
        pf.close("reference copy_blocks / gd_blocks = the exact weights", np.concatenate([g.ravel() for g in got]),
                 np.concatenate([w.ravel() for w in want]), f"d={dx}, d_y={dy}, N={n}, P={P_}")
    from .bridge import lambdify_at

    _, _, _, _, pred_sym, s, lq = two_layers_general()
    gd_part = pred_sym - (s - Identity(1)) * lq                        # s = 1 in the reference (a = e_0, r . pe_0 = 1)
    args = [MatrixSymbol("X_f", N, df), MatrixSymbol("X_l", N, dl), MatrixSymbol("Y", N, dl),
            MatrixSymbol("xq_f", 1, df), MatrixSymbol("xq_l", 1, dl), eta]
    rng = np.random.default_rng(seed)
    for dx, dy, n, P_ in BRIDGE_SIZES:
        t = R.sample_tasks(rng, 5, dx, n, dy)
        eta_ = float(rng.uniform(0.2, 2.0))
        arch, params = CC.fit_copy_layers(dx, n, P_, dy, eta=eta_)
        lay = R.classic_layout(arch, dx, dy)
        got = (R.predict if predict_fn is None else predict_fn)(lay.build(t.X, t.Y, t.x_q), params, arch, lay)
        sizes = {N: n, df: dx - dy, dl: dy, m: P_ - 2 * dy}
        extra = sorted((e for e in gd_part.free_symbols if isinstance(e, MatrixSymbol) and e not in args), key=str)
        f = lambdify_at([gd_part], args + extra, sizes)
        # the encodings' blocks, G, r and a cancel from the GD part: random values for them
        fill = [rng.standard_normal(tuple(int(k) for k in e.subs(sizes).shape)) for e in extra]
        want = np.array([np.asarray(f(t.X[b, :, : dx - dy], t.X[b, :, dx - dy:], t.Y[b], t.x_q[b:b + 1, : dx - dy],
                                      t.x_q[b:b + 1, dx - dy:], eta_, *fill)[0], dtype=np.float64).ravel()
                         for b in range(5)])
        pf.close("reference two-layer prediction = symbolic readout (s = 1)", got.ravel(), want.ravel(),
                 f"d={dx}, d_y={dy}, N={n}, P={P_}")
    return pf
