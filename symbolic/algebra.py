"""SymPy transcriptions of the reference's equations, written once and used by every
proof: the LSA layer (``reference/layers/lsa.py``), the hand constructions
(``reference/constructions.py``) and the GD / GD++ updates (``reference/solvers.py``).

Each function works on two kinds of matrices with the same code:

* matrix expressions: ``MatrixSymbol`` data and ``BlockMatrix`` weights whose blocks
  are ``Identity``/``ZeroMatrix``/``W_0`` of symbolic sizes d, d_y, N (general
  dimensions; reduce the result with ``block_collapse``);
* explicit ``sympy.Matrix`` objects whose entries are scalar symbols (small sizes).

Row convention as in the reference: a token matrix E has one token per ROW,
E = [[X, Y], [X_q, Y_q]] with the N context tokens first. The layer (lsa.py) is

    q = E W_Q^T,  k = E_c W_K^T,  v = E_c W_V^T,  A = q k^T,  o = A v,  out = E + o P^T

(one head, keys and values from the context rows E_c only, no softmax, no 1/N).
"""

import sympy as sp
from sympy import BlockMatrix, Identity, ZeroMatrix, block_collapse

# The general-dimension symbols: d input width, d_y label width, N context tokens,
# M query tokens (the reference has M = 1; any M is the same row-wise statement).
d, d_y, N, M = sp.symbols("d d_y N M", integer=True, positive=True)
eta, gamma = sp.symbols("eta gamma", real=True)


def sym_matrix(name, rows, cols):
    """An explicit rows x cols Matrix of real scalar symbols name_{i,j}."""
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{i}{j}", real=True))


def is_explicit(*ms):
    return all(isinstance(m, sp.MatrixBase) for m in ms)


def blocks(rows, explicit):
    """A 2-D arrangement of blocks: a BlockMatrix, or an explicit Matrix when the blocks
    are explicit."""
    if explicit:
        return sp.Matrix(sp.BlockMatrix(rows).as_explicit())
    return BlockMatrix(rows)


def _I(n):
    return sp.eye(n) if isinstance(n, int) else Identity(n)


def _Z(r, c):
    return sp.zeros(r, c) if isinstance(r, int) and isinstance(c, int) else ZeroMatrix(r, c)


# --- the constructions (reference/constructions.py) ---------------------------------

def gd_weights(dx, dy, n_ctx, step, W_0):
    """Prop. 1: W_K = W_Q = [[I_d, 0], [0, 0]], W_V = [[0, 0], [W_0, -I_y]], P = (eta/N) I.
    Returns (W_Q, W_K, W_V, P); explicit Matrices when dx, dy are ints."""
    ex = isinstance(dx, int)
    W_KQ = blocks([[_I(dx), _Z(dx, dy)], [_Z(dy, dx), _Z(dy, dy)]], ex)
    W_V = blocks([[_Z(dx, dx), _Z(dx, dy)], [W_0, -_I(dy)]], ex)
    P = blocks([[(step / n_ctx) * _I(dx), _Z(dx, dy)], [_Z(dy, dx), (step / n_ctx) * _I(dy)]], ex)
    return W_KQ, W_KQ, W_V, P


def gdpp_weights(dx, dy, n_ctx, step, W_0, curv=gamma):
    """GD++: W_K = W_Q as Prop. 1, W_V = [[I_d, 0], [W_0, -I_y]], P = [[-gamma I_d, 0], [0, (eta/N) I_y]]."""
    ex = isinstance(dx, int)
    W_KQ = blocks([[_I(dx), _Z(dx, dy)], [_Z(dy, dx), _Z(dy, dy)]], ex)
    W_V = blocks([[_I(dx), _Z(dx, dy)], [W_0, -_I(dy)]], ex)
    P = blocks([[-curv * _I(dx), _Z(dx, dy)], [_Z(dy, dx), (step / n_ctx) * _I(dy)]], ex)
    return W_KQ, W_KQ, W_V, P


# --- the layer (reference/layers/lsa.py, lsa_forward, one head, context-only) -------------

def lsa_layer(E, E_c, W_Q, W_K, W_V, P):
    """out = E + ((E W_Q^T)(E_c W_K^T)^T)(E_c W_V^T) P^T, line by line as lsa_forward.
    Block matrices are collapsed blockwise; explicit matrices are multiplied out."""
    q = E * W_Q.T                 # (T, Kd)   forward: q = E W_Q^T
    k = E_c * W_K.T               # (N, Kd)   forward: k = E_c W_K^T
    v = E_c * W_V.T               # (N, Vd)   forward: v = E_c W_V^T
    A = q * k.T                   # (T, N)    forward: A = q k^T   (no softmax, no 1/N)
    o = A * v                     # (T, Vd)   forward: o = A v
    out = E + o * P.T             # (T, D)    forward: pre = E + o P^T
    if isinstance(out, sp.MatrixBase):
        return out
    return block_collapse(out)


def token_blocks(X, Y, X_q, Y_q):
    """E = [[X, Y], [X_q, Y_q]] (block rows: context, queries) and its context rows."""
    if is_explicit(X, Y, X_q, Y_q):
        E = sp.Matrix.vstack(sp.Matrix.hstack(X, Y), sp.Matrix.hstack(X_q, Y_q))
        return E, E[: X.shape[0], :]
    return BlockMatrix([[X, Y], [X_q, Y_q]]), BlockMatrix([[X, Y]])


def split(out, n_ctx, dx):
    """(X', Y', X_q', Y_q') of a layer output (BlockMatrix 2 x 2 or explicit Matrix)."""
    if isinstance(out, sp.MatrixBase):
        return out[:n_ctx, :dx], out[:n_ctx, dx:], out[n_ctx:, :dx], out[n_ctx:, dx:]
    b = out.blocks
    if b.shape != (2, 2):
        raise ValueError(f"expected a 2 x 2 block output, got block shape {b.shape}")
    return b[0, 0], b[0, 1], b[1, 0], b[1, 1]


def apply_layer(tokens, weights, n_ctx, dx):
    """One layer on tokens (X, Y, X_q, Y_q) -> the output's four blocks."""
    E, E_c = token_blocks(*tokens)
    return split(lsa_layer(E, E_c, *weights), n_ctx, dx)


# --- gradient descent (reference/solvers.py) -------------------------------------------

def gd_delta(X, Y, W, step, n_ctx):
    """DeltaW = -(eta/N) sum_i (W x_i - y_i) x_i^T = -(eta/N) (X W^T - Y)^T X   (d_y x d)."""
    return -(step / n_ctx) * (X * W.T - Y).T * X


def gd_token_update(X, Y, X_q, Y_q, W_0, step, n_ctx):
    """Prop. 1's right-hand side: every token (x, y) -> (x, y - DeltaW x), in rows:
    Y - X DeltaW^T, with DeltaW the GD step from W_0."""
    dW = gd_delta(X, Y, W_0, step, n_ctx)
    return X, Y - X * dW.T, X_q, Y_q - X_q * dW.T


def gd_steps(X, Y, W_0, step, n_ctx, K):
    """W_0, W_1, ..., W_K of K GD steps: W_{k+1} = W_k + DeltaW(W_k)."""
    Ws = [W_0]
    for _ in range(K):
        Ws.append(Ws[-1] + gd_delta(X, Y, Ws[-1], step, n_ctx))
    return Ws


def gdpp_token_update(X, Y, X_q, Y_q, W_0, step, curv, n_ctx):
    """GD++ right-hand side (constructions.py docstring): from the pre-update tokens,
    x <- (I - gamma C) x with C = X^T X, y <- y - DeltaW x. In rows: X (I - gamma C)
    (C is symmetric), Y - X DeltaW^T."""
    C = X.T * X
    dx = X.shape[1]
    I = _I(dx)
    dW = gd_delta(X, Y, W_0, step, n_ctx)
    return X * (I - curv * C), Y - X * dW.T, X_q * (I - curv * C), Y_q - X_q * dW.T


def gdpp_recursion_step(Xk, r, xq, rq, W_0, step, curv, n_ctx):
    """One step of solvers.gdpp_predict, transcribed (rows are tokens):
    C = X_k^T X_k, U = X_k W_0^T - r, r <- r + (eta/N) X_k X_k^T U,
    r_q <- r_q + (eta/N) x_q X_k^T U, X_k <- X_k (I - gamma C), x_q <- x_q (I - gamma C)."""
    C = Xk.T * Xk
    U = Xk * W_0.T - r
    XU = Xk.T * U
    return (Xk - curv * Xk * C, r + (step / n_ctx) * Xk * XU,
            xq - curv * xq * C, rq + (step / n_ctx) * xq * XU)
