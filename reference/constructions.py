"""Hand constructions: LSA weights that implement gradient descent exactly.

von Oswald et al. 2023, Prop. 1 (one GD step), Sec. 3 (K layers = K steps) and
Sec. 4 / App. A.5 (GD++). Token layout (x, y) of width D = d + d_y.

* GD step (Prop. 1):  W_K = W_Q = [[I_d, 0], [0, 0]],  W_V = [[0, 0], [W_0, -I_y]],
  P = (eta / N) I_D.  Every token (x_j, y_j) -> (x_j, y_j - DeltaW x_j) with
  DeltaW = -(eta/N) sum_i (W_0 x_i - y_i) x_i^T, one GD step on
  L(W) = 1/(2N) sum_i ||W x_i - y_i||^2 from W_0. With the query's y-slot at
  -W_0 x_q (``build_tokens(..., W_0=W_0)``) the readout is (W_0 + DeltaW) x_q.
* K stacked copies: K GD steps from W_0 with the same eta (context y-slots carry
  y_i - (W_k - W_0) x_i, which are the residuals y_i - W_k x_i when W_0 = 0, and
  the query y-slot carries -W_k x_q).
* GD++:  W_K = W_Q as above, W_V = [[I_d, 0], [W_0, -I_y]],
  P = [[-gamma I_d, 0], [0, (eta/N) I_y]].  Every token: x_j <- (I - gamma X^T X) x_j
  (X^T X = sum over context of x_i x_i^T) and y_j <- y_j - DeltaW x_j, both computed
  from the pre-update tokens.
"""

import numpy as np

from ._checks import check_dtype, check_float, check_int, check_W_0
from .layers.lsa import LSAParams
from .model import lsa_stack
from .xp import to_numpy


def _blocks(d, d_y, dtype, xp):
    check_int("d", d, 1)
    check_int("d_y", d_y, 1)
    D = d + d_y
    WKQ = np.zeros((D, D))
    WKQ[:d, :d] = np.eye(d)
    return D, WKQ


def _W0(W_0, d, d_y):
    if W_0 is None:
        return np.zeros((d_y, d))
    check_W_0(W_0, ((d_y, d),), allow_complex=False)
    return np.asarray(to_numpy(W_0), dtype=np.float64)


def gd_layer(d, d_y, N, eta, W_0=None, *, dtype=np.float64, xp=np):
    """One-head LSA params performing one GD step (Prop. 1). Returns :class:`LSAParams`."""
    dtype = check_dtype("dtype", dtype)
    N = check_int("N", N, 1)
    eta = check_float("eta", eta)
    D, WKQ = _blocks(d, d_y, dtype, xp)
    W_V = np.zeros((D, D))
    W_V[d:, :d] = _W0(W_0, d, d_y)
    W_V[d:, d:] = -np.eye(d_y)
    P = (eta / N) * np.eye(D)
    return _pack(WKQ, WKQ, W_V, P, dtype, xp)


def gdpp_layer(d, d_y, N, eta, gamma, W_0=None, *, dtype=np.float64, xp=np):
    """One-head LSA params performing one GD++ step (curvature-corrected GD)."""
    dtype = check_dtype("dtype", dtype)
    N = check_int("N", N, 1)
    eta = check_float("eta", eta)
    gamma = check_float("gamma", gamma)
    D, WKQ = _blocks(d, d_y, dtype, xp)
    W_V = np.zeros((D, D))
    W_V[:d, :d] = np.eye(d)
    W_V[d:, :d] = _W0(W_0, d, d_y)
    W_V[d:, d:] = -np.eye(d_y)
    P = np.zeros((D, D))
    P[:d, :d] = -gamma * np.eye(d)
    P[d:, d:] = (eta / N) * np.eye(d_y)
    return _pack(WKQ, WKQ, W_V, P, dtype, xp)


def _pack(W_Q, W_K, W_V, P, dtype, xp):
    return LSAParams(*(xp.asarray(a[None].astype(dtype)) for a in (W_Q, W_K, W_V, P)))


def gd_stack(K, d, d_y, N, eta, W_0=None, *, recurrent=False, dtype=np.float64, xp=np):
    """K layers doing K GD steps from W_0. Returns (params tuple, Arch)."""
    K = check_int("K", K, 1)
    layer = gd_layer(d, d_y, N, eta, W_0, dtype=dtype, xp=xp)
    arch = lsa_stack(n_layers=K, recurrent=recurrent)
    return (layer,) * arch.n_param_layers, arch


def gdpp_stack(d, d_y, N, etas, gammas, W_0=None, *, dtype=np.float64, xp=np):
    """Separate layers, layer k doing a GD++ step with (etas[k], gammas[k]).
    Returns (params tuple, Arch)."""
    etas, gammas = list(etas), list(gammas)
    if len(etas) != len(gammas) or not etas:
        raise ValueError(f"etas and gammas must be non-empty and of equal length, got {len(etas)} and {len(gammas)}")
    layers = tuple(gdpp_layer(d, d_y, N, e, g, W_0, dtype=dtype, xp=xp) for e, g in zip(etas, gammas))
    return layers, lsa_stack(n_layers=len(layers), recurrent=False)


def gdpp_model(d, d_y, N, etas, gammas, recurrent, *, dtype=np.float64, xp=np):
    """The GD++ construction as model params: (params tuple, Arch). ``recurrent``: one
    shared layer applied len(etas) times (all etas and gammas must then be equal);
    otherwise :func:`gdpp_stack`."""
    etas, gammas = [float(e) for e in etas], [float(g) for g in gammas]
    if not recurrent:
        return gdpp_stack(d, d_y, N, etas, gammas, dtype=dtype, xp=xp)
    if not etas or len(etas) != len(gammas) or len(set(etas)) != 1 or len(set(gammas)) != 1:
        raise ValueError("a recurrent GD++ stack needs one (eta, gamma) repeated for every layer, "
                         f"got etas {etas} and gammas {gammas}")
    return (gdpp_layer(d, d_y, N, etas[0], gammas[0], dtype=dtype, xp=xp),), lsa_stack(len(etas), recurrent=True)
