"""Explicit in-context learners, written without attention: the baselines the LSA
models are compared with, and the right-hand sides of the equivalence claims.

* GD-K: K gradient steps on L(W) = 1/(2N) sum_i ||W x_i - y_i||^2 from W_0.
* GD++: the token recursion of the GD++ construction written as matrix algebra.
* least squares / ridge: W = Y^T X (X^T X + lambda I)^{-1} (pseudo-inverse at 0).
* eta line search over the paper's grid arange(0.001, 25, 0.1) (official code).
* the closed-form optimal step size of one GD step from W_0 = 0 and its expected loss,
  for i.i.d. zero-mean input coordinates with second moment m2 and fourth moment m4
  (derivation in the docstring of :func:`expected_one_step_loss`);
* GD++ meta-training: (eta, gamma) fitted by Adam through the GD++ construction, with
  the hand-derived gradient of :func:`gdpp_loss_and_grads`.
"""

from typing import NamedTuple

import numpy as np

from ._checks import check_data, check_float, check_int, check_same_dtype, check_W_0
from .constructions import gdpp_model
from .errors import TrainingDiverged
from .model import loss_and_grads
from .optim import AdamHP, adam_init, adam_update
from .tasks import STREAM_GDPP, stream_rng
from .tokens import TokenLayout, build_tokens, check_task_data
from .xp import get_xp

ETA_GRID = np.arange(0.001, 25, 0.1)


def _check_data(X, Y, x_q):
    """X (B, N, d), Y (B, N, d_y), x_q (B, d): task data of one float dtype, every size
    >= 1 (the 1/N of the GD loss and the mean over tasks need both), within the data
    limit. Returns (B, N, d, d_y)."""
    return check_task_data(X, Y, x_q)


def gd_predict(X, Y, x_q, eta, n_steps=1, W_0=None):
    """K = n_steps GD steps from W_0 (default 0); eta scalar or one per step.

    W_{k+1} = W_k - eta_k * (1/N) sum_i (W_k x_i - y_i) x_i^T.
    Returns (y_hat (B, d_y) = W_K x_q, W_K (B, d_y, d)).
    """
    B, N, d, d_y = _check_data(X, Y, x_q)
    n_steps = check_int("n_steps", n_steps, 0)
    etas = _per_step("eta", eta, n_steps)
    check_W_0(W_0, ((d_y, d), (B, d_y, d)), X.dtype)
    xp = get_xp(X, Y, x_q)
    W = xp.zeros((B, d_y, d), dtype=X.dtype) if W_0 is None else xp.broadcast_to(xp.asarray(W_0, dtype=X.dtype), (B, d_y, d)).copy()
    for k in range(n_steps):
        R = xp.matmul(X, xp.swapaxes(W, 1, 2)) - Y                    # (B, N, d_y) residuals W x_i - y_i
        grad = xp.matmul(xp.swapaxes(R, 1, 2), X) / N                  # (B, d_y, d)
        W = W - etas[k] * grad
    return xp.einsum("bij,bj->bi", W, x_q), W


def gdpp_predict(X, Y, x_q, etas, gammas, W_0=None):
    """GD++ as matrix algebra on (inputs, label slots), one (eta_k, gamma_k) per layer.

    State: context inputs X_k (B, N, d), context label slots r (B, N, d_y) (starting at
    Y), query input x_q,k and query label slot r_q (starting at -W_0 x_q). Each layer,
    from the pre-update state, with C = X_k^T X_k and U = X_k W_0^T - r:
        r   <- r   + (eta_k/N) X_k X_k^T U        r_q <- r_q + (eta_k/N) U^T X_k x_q,k
        X_k <- X_k (I - gamma_k C)                x_q <- (I - gamma_k C) x_q
    Prediction y_hat = -r_q. With every gamma_k = 0 this is GD-K.
    """
    B, N, d, d_y = _check_data(X, Y, x_q)
    etas, gammas = _as_list("etas", etas), _as_list("gammas", gammas)
    if len(etas) != len(gammas):
        raise ValueError(f"etas and gammas must have equal length, got {len(etas)} and {len(gammas)}")
    etas = [check_float(f"etas[{k}]", e) for k, e in enumerate(etas)]
    gammas = [check_float(f"gammas[{k}]", g) for k, g in enumerate(gammas)]
    check_W_0(W_0, ((d_y, d),), X.dtype)
    xp = get_xp(X, Y, x_q)
    W0 = xp.zeros((d_y, d), dtype=X.dtype) if W_0 is None else xp.asarray(W_0, dtype=X.dtype)
    Xk, r, xq = X, Y, x_q
    rq = -xp.einsum("ij,bj->bi", W0, x_q)                              # (B, d_y)
    for eta, gamma in zip(etas, gammas):
        C = xp.matmul(xp.swapaxes(Xk, 1, 2), Xk)                       # (B, d, d)
        U = xp.matmul(Xk, W0.T) - r                                    # (B, N, d_y)
        XU = xp.matmul(xp.swapaxes(Xk, 1, 2), U)                       # (B, d, d_y)
        r = r + (eta / N) * xp.matmul(Xk, XU)                          # (B, N, d_y)
        rq = rq + (eta / N) * xp.einsum("bij,bi->bj", XU, xq)          # (B, d_y)
        Xk = Xk - gamma * xp.matmul(Xk, C)                             # (B, N, d)
        xq = xq - gamma * xp.einsum("bij,bj->bi", C, xq)               # (B, d)
    return -rq


def least_squares_predict(X, Y, x_q, ridge=0.0):
    """Ridge regression on the context, evaluated at the query.

    W = Y^T X (X^T X + ridge I)^{-1}; ridge = 0 uses the pseudo-inverse (minimum-norm
    least squares). Returns y_hat (B, d_y).
    """
    B, N, d, d_y = _check_data(X, Y, x_q)
    ridge = check_float("ridge", ridge, 0.0)
    xp = get_xp(X, Y, x_q)
    C = xp.matmul(xp.swapaxes(X, 1, 2), X)                             # (B, d, d)
    XtY = xp.matmul(xp.swapaxes(X, 1, 2), Y)                           # (B, d, d_y)
    try:
        if ridge > 0:
            Wt = xp.linalg.solve(C + ridge * xp.eye(d, dtype=X.dtype), XtY)  # (B, d, d_y)
        else:
            Wt = xp.matmul(xp.linalg.pinv(C), XtY)
    except xp.linalg.LinAlgError as exc:   # finite data within the limit: not expected
        raise ValueError(f"least squares on X of shape {tuple(X.shape)} failed ({exc}); check X's conditioning "
                         "or pass ridge > 0") from exc
    return xp.einsum("bij,bi->bj", Wt, x_q)


def line_search_eta(X, Y, x_q, y_q, n_steps=1, grid=None):
    """The eta of the grid (default the paper's arange(0.001, 25, 0.1)) minimising the
    mean GD-K loss 0.5 * mean ||y_hat - y_q||^2 on the given tasks; etas whose GD
    iterates overflow (a non-finite loss) are passed over, and ValueError is raised when
    every eta of the grid does. Returns (eta, losses (len(grid),), non-finite entries kept)."""
    B, N, d, d_y = _check_data(X, Y, x_q)
    check_data("y_q", y_q, shape=(B, d_y))
    check_same_dtype(X=X, y_q=y_q)
    n_steps = check_int("n_steps", n_steps, 0)
    try:
        grid = ETA_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"grid must be a 1-d array of step sizes, got {grid!r}") from exc
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"grid must be a non-empty 1-d array, got shape {grid.shape}")
    etas = [check_float(f"grid[{n}]", eta) for n, eta in enumerate(grid)]
    losses = np.empty(grid.size)
    for n, eta in enumerate(etas):
        pred, _ = gd_predict(X, Y, x_q, eta, n_steps)
        err = pred - y_q
        losses[n] = float(0.5 * (err * err).sum(axis=1).mean())
    finite = np.isfinite(losses)
    if not finite.any():
        raise ValueError(f"line_search_eta: every eta of the grid ({grid.min():g} .. {grid.max():g}) gives a "
                         f"non-finite loss after n_steps={n_steps} GD steps on these tasks (the iterates overflow "
                         f"{np.dtype(X.dtype)}); use a grid of smaller step sizes or fewer steps")
    return float(grid[int(np.argmin(np.where(finite, losses, np.inf)))]), losses


def _one_step_coeffs(d, N, m2, m4, w_scale, d_y, noise_std):
    d = check_int("d", d, 1)
    N = check_int("N", N, 1)
    d_y = check_int("d_y", d_y, 1)
    m2 = check_float("m2", m2, 0.0, allow_equal_min=False)
    m4 = check_float("m4", m4, m2 * m2)
    w_scale = check_float("w_scale", w_scale, 0.0)
    noise_std = check_float("noise_std", noise_std, 0.0)
    if w_scale == 0 and noise_std == 0:
        raise ValueError("w_scale and noise_std cannot both be 0 (the loss would be identically 0)")
    s2, n2 = w_scale ** 2, noise_std ** 2
    T2 = (d * m4 + d * (d - 1) * m2 ** 2) / N + (N - 1) / N * d * m2 ** 2  # E tr(A^2)
    a = s2 * m2 * T2 + n2 * d * m2 ** 2 / N
    b = s2 * m2 * d * m2
    c = s2 * m2 * d
    return a, b, c, d_y


def expected_one_step_loss(eta, d, N, m2, m4, w_scale=1.0, d_y=1, noise_std=0.0):
    """Expected loss E[0.5 ||y_hat - W x_q||^2] of one GD step from W_0 = 0.

    Derivation. y_hat = eta W A x_q + (eta/N) sum_i eps_i x_i^T x_q with
    A = (1/N) sum_i x_i x_i^T, W ~ w_scale N(0, I), inputs with i.i.d. zero-mean
    coordinates of moments m2 = E x^2, m4 = E x^4, label noise eps ~ N(0, noise_std^2).
    Per label dim, averaging over x_q then W:
        E err^2 = w_scale^2 m2 (eta^2 E tr(A^2) - 2 eta E tr(A) + d) + eta^2 noise_std^2 d m2^2 / N
    with E tr(A) = d m2 and
        E tr(A^2) = (d m4 + d (d-1) m2^2) / N + (N-1)/N * d m2^2
    (E ||x||^4 for i = j terms, E (x_i . x_j)^2 = d m2^2 for i != j).
    So L(eta) = 0.5 d_y (a eta^2 - 2 b eta + c) with the coefficients above.
    """
    eta = check_float("eta", eta)
    a, b, c, d_y = _one_step_coeffs(d, N, m2, m4, w_scale, d_y, noise_std)
    return 0.5 * d_y * (a * eta * eta - 2 * b * eta + c)


def optimal_one_step_eta(d, N, m2, m4, w_scale=1.0, d_y=1, noise_std=0.0):
    """The step size minimising :func:`expected_one_step_loss`, eta* = b / a, and the
    loss there, L* = 0.5 d_y (c - b^2 / a). Returns (eta*, L*).

    For the paper's defaults (d = N = 10, x ~ U(-0.5, 0.5): m2 = 1/12, m4 = 1/80)
    this gives eta* = 6.06 and L* = 0.206.
    """
    a, b, c, d_y = _one_step_coeffs(d, N, m2, m4, w_scale, d_y, noise_std)
    return b / a, 0.5 * d_y * (c - b * b / a)


def _as_list(name, values):
    if np.ndim(values) != 1:
        raise TypeError(f"{name} must be a sequence of numbers (one per layer), got {type(values).__name__}")
    return list(values)


def _per_step(name, eta, n_steps):
    if np.ndim(eta) == 0:
        return [check_float(name, eta)] * n_steps
    etas = [check_float(f"{name}[{k}]", e) for k, e in enumerate(eta)]
    if len(etas) != n_steps:
        raise ValueError(f"{name} must be a scalar or have n_steps={n_steps} entries, got {len(etas)}")
    return etas


# ---- GD++ meta-training (paper-settings.md section 4) ----------------------------------

class GDPPParams(NamedTuple):
    """What Adam meta-trains for GD++: the entries of the construction's P."""
    a: object      # (L,) a = eta / N, the y-block of P; L = 1 (shared) or K
    gamma: object  # (L,) curvature corrections, minus the x-block of P


def gdpp_loss_and_grads(tasks, etas, gammas, recurrent, loss_and_grads_fn=None):
    """Loss of the GD++ construction on ``tasks`` and its gradient in (eta, gamma).

    Forward: the model of ``constructions.gdpp_model`` (gdpp_layer weights); backward:
    the hand-written model backward gives dP per layer, chained through
    P = diag(-gamma I_d, (eta/N) I_y), which is linear in both:

        dL/deta = (1/N) tr(dP[d:, d:])        dL/dgamma = -tr(dP[:d, :d])

    ``recurrent``: one shared layer applied len(etas) times (all etas and gammas
    equal); its dP already sums the applications, so deta and dgamma have length 1.
    ``loss_and_grads_fn``: the reference's (default) or a backend's, same signature.
    Returns (L, deta (L,), dgamma (L,)).
    """
    fn = loss_and_grads if loss_and_grads_fn is None else loss_and_grads_fn
    B, N, d = tasks.X.shape
    d_y = tasks.Y.shape[2]
    params, arch = gdpp_model(d, d_y, N, etas, gammas, recurrent, dtype=tasks.X.dtype)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)                                # (B, T, D)
    L, dparams, _ = fn(E, tasks.y_q, params, arch, TokenLayout(d, d_y))
    deta = np.array([np.trace(g.P[0, d:, d:]) / N for g in dparams])             # (L,)
    dgamma = np.array([-np.trace(g.P[0, :d, :d]) for g in dparams])              # (L,)
    return float(L), deta, dgamma


def meta_train_gdpp(spec, n_layers, eta0, *, shared, steps, lr, b2, seed, loss_and_grads_fn=None, log=None):
    """Adam on GD++'s (eta, gamma), in float64: the GD++ baseline of a K-layer model.

    ``spec``: the TaskSpec of one meta-training batch. Shared (one pair for every
    layer) when ``shared``, one pair per layer otherwise. Initialised at eta = eta0
    (the GD-K line search), gamma = eta0 / N^2. Adam (b1 0.9, ``b2``, eps 1e-8, no
    clipping) acts on the entries of P, a = eta / N and gamma (dL/da = N dL/deta):
    Adam moves every coordinate by about lr per step whatever its scale, so with eta
    itself as the coordinate 1000 steps at lr 1e-3 move eta by at most about 1, too
    little to leave the line-search value. Tasks of step s come from
    ``stream_rng(seed, STREAM_GDPP, s + 1)`` (``seed`` = the run's eval_seed, so the
    baseline does not depend on the training seed). ``log(step, loss)`` is called every
    max(1, steps // 10) steps. Returns (etas (K,), gammas (K,), last loss); raises TrainingDiverged on a
    non-finite loss.
    """
    K, N = check_int("n_layers", n_layers, 1), spec.N
    n = 1 if shared else K
    p = (GDPPParams(np.full(n, float(eta0) / N), np.full(n, float(eta0) / N ** 2)),)
    hp = AdamHP(lr=lr, b1=0.9, b2=b2, eps=1e-8, clip_norm=None)
    state = adam_init(p)
    L = float("nan")
    for s in range(steps):
        t = spec.sample(stream_rng(seed, STREAM_GDPP, s + 1))
        etas, gammas = gdpp_expand(p[0], K, N)
        L, de, dg = gdpp_loss_and_grads(t, etas, gammas, recurrent=shared, loss_and_grads_fn=loss_and_grads_fn)
        if not np.isfinite(L):
            raise TrainingDiverged(f"GD++ meta-training diverged at step {s + 1} (loss {L})", s + 1)
        # chain rule to P's entries: a = eta / N, so dL/da = N dL/deta
        p, state, _ = adam_update(p, (GDPPParams(N * de, dg),), state, hp)
        if log is not None and (s + 1) % max(1, steps // 10) == 0:
            log(s + 1, L)
    etas, gammas = gdpp_expand(p[0], K, N)
    return np.asarray(etas), np.asarray(gammas), L


def gdpp_expand(p, K, N):
    """Per-step (etas, gammas) lists of length K from shared (length-1) or per-layer GDPPParams."""
    eta, gamma = N * np.asarray(p.a), np.asarray(p.gamma)
    if eta.size == 1:
        return [float(eta[0])] * K, [float(gamma[0])] * K
    return [float(e) for e in eta], [float(g) for g in gamma]
