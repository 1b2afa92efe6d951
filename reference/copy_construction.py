"""Prop. 3 (von Oswald et al. ICML 2023, App. A.5): a copy layer, then one GD step, on
classic tokens with concatenated positional encodings, constructed by hand.

The model: ``posenc`` (concat, width P) -> layer 1 (the copy; ``lsa`` linear, or
``softmax``) -> layer 2 (``lsa``, the Prop. 1 step), one head each, merged
parameterisation for the linear layers, context-only keys and values (every token but
the query), no clipping. Tokens (``reference/classic_tokens.py``) at positions
t = 0 .. 2N: x_j at 2j, (0, y_j) at 2j+1, x_q at 2N; after the encodings a token is
e_t = (c_t, pe_t) of width D = d + P. Encoding channels, in the token's coordinates:

    L = D - d_y .. D - 1            the readout channels (the layout reads minus these at the query)
    C = D - 2 d_y .. D - d_y - 1    the copy channels (layer 1 writes y_j here)
    O = d .. D - 2 d_y - 1          the other P - 2 d_y encoding channels (never written)

**Layer 1 (copy), linear form.** Logits from the encodings only,
``A[p, i] = e_i^T W_KQ e_p = pe_i^T M pe_p`` (W_KQ zero outside its pe x pe block M), so
the (2N+1) x 2N pattern is ``A = PE M^T PE_ctx^T`` (PE the (2N+1) x P table, PE_ctx its
first 2N rows). The target pattern A* has ``A*[2j, 2j+1] = 1`` (every x token looks at its
label's token), ``A*[2N, 0] = 1`` (the query looks at token 0) and 0 elsewhere (the y
tokens' rows are 0); ``M^T = PE^+ A* (PE_ctx^+)^T`` realises it exactly when PE has full row
rank 2N + 1 (then PE PE^+ = I and PE_ctx PE_ctx^+ = I). Values ``W_PV e_i``: the last d_y
content features of e_i into C (so the x token at 2j receives y_j), and
``-pe[2N, L] (r . pe_i)`` into L with ``r = pe_0 / |pe_0|^2`` (so the query, which looks
at token 0 only, receives exactly ``-pe[2N, L]`` and its readout channels become 0). The
y tokens are unchanged; every token keeps its content and its O channels.

**Layer 2 (one GD step).** ``W_KQ`` the identity on the content block (logit c_i . c_p);
value ``W_PV e_i = -(eta/N) (e_i[C] - G e_i[O])`` into L, where G (d_y x (P - 2 d_y))
solves ``G pe_t[O] = pe_t[C]`` for the 2N context positions: ``G^T = PE_O^+ PE_C``, exact
when the 2N x (P - 2 d_y) table PE_O has full row rank 2N. Then an x token's value is
``-(eta/N) y_j`` and a y token's value is exactly 0, and the query's readout channels
become ``-(eta/N) sum_j y_j x_j^T x_q``.

**Statement (exact).** If (R1) ``rank pe[0 .. 2N, :] = 2N + 1`` and (R2)
``rank pe[0 .. 2N-1, O] = 2N`` (so P >= 2N + 2 d_y), then for every task the two layers'
prediction is ``(eta/N) sum_j y_j x_j^T x_q``: one GD step from W = 0 with step eta,
exactly (no offset). In floating point the weights are as large as the encodings'
inverse singular values, so the error is of order eps times the condition numbers
(:func:`copy_conditions`); sinusoidal tables are badly conditioned beyond N ~ 3.

**Softmax form.** Layer 1 ``softmax`` with the same values and logits ``beta * H[p, i]``
(realised as above), H the one-hot pattern x row 2j -> 2j+1, y row 2j+1 -> 2j+1 (itself),
query -> 0. A softmax row sums to 1, so the y rows cannot be 0; this is not a choice of
construction: for any number of softmax heads, the total weight of the content features
in a row is the same for every row, but a copy needs it 1 on the x rows and 0 on the y
rows (the value map of layer 2 must see -y_j on the x token and 0 on the y token). In the
hard limit (beta -> inf) the y token of pair j carries y_j in C like its x token, and the
prediction is ``GD + rho``, ``rho = (eta/N) sum_j y_j y_j^T x_q[d-d_y:]`` (the y token's key
is its content (0, y_j)). For finite beta each weight row is within
``||a - h||_1 <= 2 (S-1) e^-beta / (1 + (S-1) e^-beta)`` of its hard row (S = 2N keys, logit
gap 1), and since layer 1 writes only C and L, which layer 2 reads linearly, the
prediction is within :func:`softmax_copy_bound` of ``GD + rho``.

**The official width** (P = 10, N = 10: 21 positions in 10 dimensions) satisfies neither
R1 nor R2; :func:`fit_copy_layers` builds the least-squares version (truncated
pseudo-inverses) whose distance from GD the claims report. :func:`shift_copy_layer` needs
no rank condition: it uses the encodings' rotation pe[t+1] = R pe[t], logits
beta pe_i . pe_{p+1}, a shift-invariant pattern whose largest entry in every x row is the
next token; with layer 2's least-squares G it comes close to GD at the official width.

Not here: the classic layout (``classic_tokens.py``), the analyses (``copy_analysis.py``).
"""

from typing import NamedTuple

import numpy as np

from ._checks import check_float, check_int
from .layers import LayerSpec
from .layers.lsa import MergedParams
from .layers.posenc import PosEncParams, positional_encoding
from .layers.softmax import SoftmaxParams
from .model import Arch


COPY_FORMS = ("linear", "softmax", "shift")


class CopyChannels(NamedTuple):
    """Token-coordinate index arrays of the encoding channels (module docstring)."""
    L: np.ndarray   # (d_y,) readout channels
    C: np.ndarray   # (d_y,) copy channels
    O: np.ndarray   # (P - 2 d_y,) other encoding channels
    y: np.ndarray   # (d_y,) the label features of the content (d - d_y .. d - 1)


def check_copy_sizes(d, N, P, d_y=1):
    """Raise unless the sizes make the construction's channels: d >= d_y >= 1, N >= 1,
    P >= 2 d_y + 1 (readout, copy and at least one other encoding channel)."""
    d, N, P = check_int("d", d, 1), check_int("N", N, 1), check_int("P", P, 1)
    d_y = check_int("d_y", d_y, 1, d)
    if P < 2 * d_y + 1:
        raise ValueError(f"P (the encoding width) must be >= 2 d_y + 1 = {2 * d_y + 1} (readout, copy and other "
                         f"channels), got {P}")
    return d, N, P, d_y


def copy_channels(d, P, d_y=1):
    D = d + P
    return CopyChannels(np.arange(D - d_y, D), np.arange(D - 2 * d_y, D - d_y), np.arange(d, D - 2 * d_y),
                        np.arange(d - d_y, d))


def copy_pattern(N, kind="linear"):
    """The target pattern (2N+1, 2N): ``"linear"`` A* (x rows -> next, query -> 0, y rows 0),
    ``"hard"`` H (as A*, and each y row -> itself)."""
    N = check_int("N", N, 1)
    if kind not in ("linear", "hard"):
        raise ValueError(f"kind must be 'linear' or 'hard', got {kind!r}")
    A = np.zeros((2 * N + 1, 2 * N))
    for j in range(N):
        A[2 * j, 2 * j + 1] = 1.0
        if kind == "hard":
            A[2 * j + 1, 2 * j + 1] = 1.0
    A[2 * N, 0] = 1.0
    return A


ROUNDING_FACTOR = 64   # ulps per unit of kappa allowed by copy_rounding_bound (observed <= ~40 on the test grids)


def copy_rounding_bound(N, P, d_y=1):
    """The float64 error the exact construction may show, relative to 1 + max|GD|:
    ``ROUNDING_FACTOR * eps * kappa``, kappa = cond(PE) cond(PE_ctx) + cond(PE_O). The
    pattern is realised through M^T = PE^+ A* (PE_ctx^+)^T, whose size is
    1 / (sigma_min(PE) sigma_min(PE_ctx)), and layer 2's G through PE_O^+; rounding in the
    logits and values is amplified by those factors (the query's constant cancels
    pe[2N, L] ~ 1, hence the 1 +). inf when R1 or R2 fails."""
    c = copy_conditions(N, P, d_y)
    if not (c["R1"] and c["R2"]):
        return float("inf")
    pe = positional_encoding(2 * N + 1, P)
    kappa = c["cond_all"] * float(np.linalg.cond(pe[: 2 * N])) + c["cond_O"]
    return ROUNDING_FACTOR * float(np.finfo(np.float64).eps) * kappa


def copy_conditions(N, P, d_y=1):
    """The exactness conditions (module docstring) for N pairs and encoding width P:
    dict(R1, R2 (bool: full row rank, numerically, at NumPy's default rank tolerance),
    cond_all, cond_O (the 2-norm condition numbers of pe[0..2N] and pe[0..2N-1, O]; inf
    when rank-deficient), rank_all, rank_O)."""
    N, P = check_int("N", N, 1), check_int("P", P, 2 * d_y + 1)
    pe = positional_encoding(2 * N + 1, P)
    O = pe[: 2 * N, : P - 2 * d_y]
    r_all, r_O = int(np.linalg.matrix_rank(pe)), int(np.linalg.matrix_rank(O))
    R1, R2 = r_all == 2 * N + 1, r_O == 2 * N
    return {"R1": R1, "R2": R2, "rank_all": r_all, "rank_O": r_O,
            "cond_all": float(np.linalg.cond(pe)) if R1 else float("inf"),
            "cond_O": float(np.linalg.cond(O)) if R2 else float("inf")}


def _pinv(a, keep=None):
    """Pseudo-inverse keeping the ``keep`` largest singular values (None: all above
    NumPy's default cutoff)."""
    if keep is None:
        return np.linalg.pinv(a)
    U, s, Vt = np.linalg.svd(a, full_matrices=False)
    k = min(int(keep), int(np.sum(s > 0)))
    return (Vt[:k].T / s[:k]) @ U[:, :k].T


def copy_blocks(pe, d, d_y, pattern, keep=None):
    """(W_KQ (D, D), W_PV (D, D)) of the copy layer for an encoding table ``pe``
    (2N+1, P) and a target ``pattern`` (2N+1, 2N), D = d + P (module docstring):
    M^T = PE^+ pattern (PE_ctx^+)^T in the pe x pe block of W_KQ; W_PV moves the content's
    last d_y features to C and writes -pe[2N, L] (r . pe_i) to L, r = pe_0 / |pe_0|^2.
    Takes any table, so a proof can run it on exact encodings."""
    pe = np.asarray(pe, dtype=np.float64)
    T, P = pe.shape
    N = (T - 1) // 2
    D, ch = d + P, copy_channels(d, P, d_y)
    Mt = _pinv(pe, keep) @ pattern @ _pinv(pe[: 2 * N], keep).T        # (P, P)  M^T
    W_KQ = np.zeros((D, D))
    W_KQ[d:, d:] = Mt.T                                                # logit pe_i^T M pe_p
    W_PV = np.zeros((D, D))
    W_PV[ch.C, ch.y] = 1.0                                             # content's label features -> C
    r = pe[0] / (pe[0] @ pe[0])                                        # (P,) r . pe_0 = 1
    W_PV[np.ix_(ch.L, np.arange(d, D))] = -np.outer(pe[2 * N, P - d_y:], r)
    return W_KQ, W_PV


def gd_blocks(pe, d, d_y, eta, keep=None):
    """(W_KQ (D, D), W_PV (D, D)) of layer 2 for an encoding table ``pe`` (2N+1, P):
    the content identity in W_KQ; W_PV = -(eta/N) (e[C] - G e[O]) into L with
    G^T = PE_O^+ PE_C over the 2N context rows."""
    pe = np.asarray(pe, dtype=np.float64)
    T, P = pe.shape
    N = (T - 1) // 2
    D, ch = d + P, copy_channels(d, P, d_y)
    ctx = pe[: 2 * N]                                                  # (S, P) context positions
    G = (_pinv(ctx[:, : P - 2 * d_y], keep) @ ctx[:, P - 2 * d_y: P - d_y]).T   # (d_y, P - 2 d_y)
    W_KQ = np.zeros((D, D))
    W_KQ[:d, :d] = np.eye(d)
    W_PV = np.zeros((D, D))
    W_PV[np.ix_(ch.L, ch.C)] = -(eta / N) * np.eye(d_y)
    W_PV[np.ix_(ch.L, ch.O)] = (eta / N) * G
    return W_KQ, W_PV


def copy_layer(d, N, P, d_y=1, keep=None):
    """Layer 1, linear form: ``MergedParams`` (1, D, D) of the copy (module docstring).
    ``keep``: singular values kept in the pseudo-inverses (None: all; the official
    width's least-squares fit)."""
    d, N, P, d_y = check_copy_sizes(d, N, P, d_y)
    W_KQ, W_PV = copy_blocks(positional_encoding(2 * N + 1, P), d, d_y, copy_pattern(N, "linear"), keep)
    return MergedParams(W_KQ[None], W_PV[None])


def softmax_copy_layer(d, N, P, d_y=1, beta=20.0, keep=None):
    """Layer 1, softmax form: ``SoftmaxParams`` with logits beta * H (H the hard
    pattern), W_K = I, W_Q = beta sqrt(D) W_KQ (the layer divides by sqrt(Kd) = sqrt(D)),
    W_V = the copy values, P = I."""
    d, N, P, d_y = check_copy_sizes(d, N, P, d_y)
    beta = check_float("beta", beta, 0.0)
    W_KQ, W_PV = copy_blocks(positional_encoding(2 * N + 1, P), d, d_y, copy_pattern(N, "hard"), keep)
    D = d + P
    # logit z[p, i] = (W_Q e_p) . (W_K e_i) / sqrt(D) = e_p^T W_Q^T e_i / sqrt(D); want beta e_i^T W_KQ e_p
    return SoftmaxParams((beta * np.sqrt(D) * W_KQ)[None], np.eye(D)[None], W_PV[None], np.eye(D)[None])


def rotation(P):
    """(P, P) block rotation with pe[t + 1] = R pe[t] for the sinusoidal table (each
    (sin, cos) pair turned by its frequency; for odd P the last sine column maps to
    itself times cos, which the table does not satisfy, so P must be even)."""
    P = check_int("P", P, 2)
    if P % 2:
        raise ValueError(f"P must be even for the rotation of the sin/cos pairs, got {P}")
    R = np.zeros((P, P))
    for k, om in enumerate(np.exp(np.arange(0, P, 2) * (-np.log(10000.0) / P))):
        c, s = np.cos(om), np.sin(om)
        # sin(om (t+1)) = c sin(om t) + s cos(om t);  cos(om (t+1)) = c cos(om t) - s sin(om t)
        R[2 * k, 2 * k], R[2 * k, 2 * k + 1], R[2 * k + 1, 2 * k], R[2 * k + 1, 2 * k + 1] = c, s, -s, c
    return R


def shift_copy_layer(d, N, P, d_y=1, beta=100.0):
    """Layer 1, softmax form at any even width (no rank condition): logits
    ``beta pe_i . pe_{p+1} = beta pe_i^T R pe_p`` (:func:`rotation`), the shift-invariant
    pattern sum_k cos(omega_k (i - p - 1)), largest at i = p + 1 for every x row; the
    values of :func:`copy_layer`, with the query's constant taken from the key its row
    picks. As beta grows each row tends to one-hot on its largest logit; how close the
    two layers come to GD is measured (the y rows and, when R2 fails, layer 2's G are
    not exact)."""
    d, N, P, d_y = check_copy_sizes(d, N, P, d_y)
    beta = check_float("beta", beta, 0.0)
    D, ch = d + P, copy_channels(d, P, d_y)
    pe = positional_encoding(2 * N + 1, P)
    R = rotation(P)
    W_KQ = np.zeros((D, D))
    W_KQ[d:, d:] = R                                                   # logit e_i^T W_KQ e_p = pe_i^T R pe_p
    t_q = int(np.argmax(pe[: 2 * N] @ R @ pe[2 * N]))                  # the key the query's row picks
    W_PV = np.zeros((D, D))
    W_PV[ch.C, ch.y] = 1.0
    W_PV[np.ix_(ch.L, np.arange(d, D))] = -np.outer(pe[2 * N, P - d_y:], pe[t_q] / (pe[t_q] @ pe[t_q]))
    return SoftmaxParams((beta * np.sqrt(D) * W_KQ)[None], np.eye(D)[None], W_PV[None], np.eye(D)[None])


def gd_after_copy_layer(d, N, P, d_y=1, eta=1.0, keep=None):
    """Layer 2: ``MergedParams`` (1, D, D) of one GD step on the copied labels (module
    docstring). ``keep``: singular values kept in PE_O's pseudo-inverse (None: all)."""
    d, N, P, d_y = check_copy_sizes(d, N, P, d_y)
    eta = check_float("eta", eta)
    W_KQ, W_PV = gd_blocks(positional_encoding(2 * N + 1, P), d, d_y, eta, keep)
    return MergedParams(W_KQ[None], W_PV[None])


def copy_arch(P, form="linear"):
    """posenc (concat, width P) -> layer 1 (``form`` "linear": lsa merged; "softmax" or
    "shift": softmax) -> layer 2 (lsa merged), one head, context-only, no clipping."""
    check_int("P", P, 1)
    if form not in COPY_FORMS:
        raise ValueError(f"form must be one of {COPY_FORMS}, got {form!r}")
    first = (LayerSpec("lsa", {"merged": True}) if form == "linear"
             else LayerSpec("softmax", {}))
    return Arch((LayerSpec("posenc", {"mode": "concat", "width": P}), first, LayerSpec("lsa", {"merged": True})))


def copy_params(d, N, P, d_y=1, eta=1.0, form="linear", beta=20.0, keep=None):
    """The parameters of :func:`copy_arch` (posenc, layer 1, layer 2)."""
    if form not in COPY_FORMS:
        raise ValueError(f"form must be one of {COPY_FORMS}, got {form!r}")
    first = {"linear": lambda: copy_layer(d, N, P, d_y, keep),
             "softmax": lambda: softmax_copy_layer(d, N, P, d_y, beta, keep),
             "shift": lambda: shift_copy_layer(d, N, P, d_y, beta)}[form]()
    return (PosEncParams(), first, gd_after_copy_layer(d, N, P, d_y, eta, keep))


def fit_copy_layers(d, N, P, d_y=1, eta=1.0, keep=None, form="linear", beta=20.0):
    """(arch, params) of the least-squares construction at any width: the exact one
    when R1 and R2 hold and ``keep`` is None; otherwise the pseudo-inverse fits (the
    pattern fitted in the Frobenius norm within the encodings' span)."""
    return copy_arch(P, form), copy_params(d, N, P, d_y, eta, form, beta, keep)


def pattern_fit_error(N, P, d_y=1, keep=None):
    """||PE M^T PE_ctx^T - A*||_F / ||A*||_F of the fitted copy pattern (0 when R1 holds)."""
    pe = positional_encoding(2 * N + 1, P)
    A = copy_pattern(N, "linear")
    fit = pe @ (_pinv(pe, keep) @ A @ _pinv(pe[: 2 * N], keep).T) @ pe[: 2 * N].T
    return float(np.linalg.norm(fit - A) / np.linalg.norm(A))


def hard_limit_residual(X, Y, x_q, eta):
    """rho (B, d_y) = (eta/N) sum_j y_j y_j^T x_q[d-d_y:]: the softmax form's hard limit
    minus one GD step (module docstring)."""
    N, d_y = X.shape[1], Y.shape[2]
    return (eta / N) * np.einsum("bni,bnk,bk->bi", Y, Y, x_q[:, x_q.shape[1] - d_y:])


def softmax_copy_bound(X, Y, x_q, eta, P, beta):
    """Per-task bound (B,) on max_i |pred_beta - (GD + rho)|_i for the softmax form
    (module docstring): with w = 2 (S-1) e^-beta / (1 + (S-1) e^-beta) the l1 distance of
    every weight row from its hard row, layer 1's error at token p in a channel is at most
    w max_i |v_i| over that channel's values; the query's L error enters the readout once,
    each context token's C error enters through layer 2 times (eta/N) |c_i . x_q|."""
    B, N, d = X.shape
    d_y = Y.shape[2]
    S = 2 * N
    e = np.exp(-beta)
    w = 2 * (S - 1) * e / (1 + (S - 1) * e)
    pe = positional_encoding(2 * N + 1, P)
    r = pe[0] / (pe[0] @ pe[0])
    vL = np.max(np.abs(pe[2 * N, P - d_y:])) * np.max(np.abs(pe[: 2 * N] @ r))           # max |value in L|
    vC = np.maximum(np.max(np.abs(X[:, :, d - d_y:]), axis=(1, 2)), np.max(np.abs(Y), axis=(1, 2)))  # (B,)
    c_dot = np.concatenate([np.einsum("bnk,bk->bn", X, x_q),
                            np.einsum("bnk,bk->bn", Y, x_q[:, d - d_y:])], axis=1)       # (B, S) |c_i . x_q|
    return w * (vL + (eta / N) * vC * np.sum(np.abs(c_dot), axis=1))
