"""Analyses of models trained on the sine task (ICML'23 Sec. 5, paper-settings.md 7, 7a).

The paper compares the trained transformer (embedding, MLP, one LSA layer) with the
"MLP + GD" baseline (the same embedding and MLP meta-trained through a frozen GD layer)
by their losses and by the cosine between their sensitivities d y_hat / d x_q. With
scalar inputs (d = 1) one task's sensitivity at one query is a number, whose cosine
with another is only its sign; so here each task's sensitivity is the vector of
d y_hat / d x_q at ``M`` query points on a grid over the input range (the task's whole
learned function), and the cosine is taken per task and averaged over tasks
(:func:`partial_cosine`). The cosine of the single-query sensitivities across tasks (one
number per task, a vector over the tasks) is reported beside it
(:func:`across_task_cosine`).
"""

from typing import NamedTuple

import numpy as np

from ._checks import check_array, check_int
from .analysis import COS_EPS, sensitivity
from .model import model_forward
from .tasks import Tasks


class SineCurves(NamedTuple):
    grid: object     # (M,) query inputs
    pred: object     # (B, M) y_hat of each task at each query
    dpred: object    # (B, M) d y_hat / d x_q there
    truth: object    # (B, M) a sin(x + rho) there


def query_grid(x_range=(-5.0, 5.0), M=25):
    """M equally spaced query inputs over the closed input range."""
    M = check_int("M", M, 2)
    low, high = (float(v) for v in x_range)
    return np.linspace(low, high, M)


def sine_curves(params, arch, tasks, grid, dtype=np.float32):
    """The model's prediction and sensitivity at every query of ``grid`` (M,) for every
    task (the task's N context pairs kept, its query replaced). ``tasks``: sine tasks
    (``tasks.W`` holds each task's (a, rho)). Returns :class:`SineCurves` (float64)."""
    if not isinstance(tasks, Tasks):
        raise TypeError(f"tasks must be a reference.tasks.Tasks, got {type(tasks).__name__}")
    grid = np.asarray(grid, np.float64)
    check_array("grid", grid, ndim=1)
    B, N, d = tasks.X.shape
    if d != 1 or tasks.Y.shape[2] != 1 or tasks.W.shape[1:] != (1, 2):
        raise ValueError(f"sine_curves needs sine tasks (d = d_y = 1, W of shape (B, 1, 2) holding (a, rho)), got "
                         f"X {tuple(tasks.X.shape)}, W {tuple(tasks.W.shape)}")
    M = grid.shape[0]
    X = np.repeat(np.asarray(tasks.X, np.float64), M, axis=0)                 # (B M, N, 1)
    Y = np.repeat(np.asarray(tasks.Y, np.float64), M, axis=0)                 # (B M, N, 1)
    x_q = np.tile(grid, B)[:, None]                                           # (B M, 1)
    lay = arch.layout(1, 1)
    E = lay.build(X.astype(dtype), Y.astype(dtype), x_q.astype(dtype))        # (B M, T, 2)
    pred, g = sensitivity(E, params, arch, lay)                               # (B M, 1), (B M, 1, 1)
    a, rho = (np.asarray(tasks.W, np.float64)[:, 0, i][:, None] for i in (0, 1))
    truth = a * np.sin(grid[None, :] + rho)                                   # (B, M)
    return SineCurves(grid, pred.astype(np.float64).reshape(B, M), g.astype(np.float64).reshape(B, M), truth)


def partial_cosine(dpred_a, dpred_b):
    """Mean over tasks of cos(d y_hat_a / d x_q, d y_hat_b / d x_q), each a vector over
    the query grid (B, M); the paper's guard: g / (||g|| + 1e-8)."""
    a, b = np.asarray(dpred_a, np.float64), np.asarray(dpred_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"dpred_a and dpred_b must be (B, M) arrays of one shape, got {a.shape} and {b.shape}")
    na = a / (np.linalg.norm(a, axis=1, keepdims=True) + COS_EPS)
    nb = b / (np.linalg.norm(b, axis=1, keepdims=True) + COS_EPS)
    return float((na * nb).sum(axis=1).mean())


def across_task_cosine(g_a, g_b):
    """cos between the single-query sensitivities of B tasks, each (B,) one number per task."""
    a, b = np.ravel(np.asarray(g_a, np.float64)), np.ravel(np.asarray(g_b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"g_a and g_b must have one shape, got {a.shape} and {b.shape}")
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + COS_EPS))


def curve_losses(curves):
    """0.5 mean squared error of the predicted curves against the true sine, over tasks
    and grid points."""
    err = curves.pred - curves.truth
    return float(0.5 * (err * err).mean())


def learned_features(params, arch, x_grid, n_layers, y=0.0, dtype=np.float32):
    """The tokens after the first ``n_layers`` layers (the embedding and MLP of the sine
    models) for single tokens (x, y) over ``x_grid`` (M,): (M, width) float64, the
    features the last layer computes with."""
    n_layers = check_int("n_layers", n_layers, 1, arch.n_layers - 1)
    from .model import Arch

    head = Arch(arch.layers[:n_layers], arch.tie[:n_layers])
    x = np.asarray(x_grid, np.float64)
    E = np.stack([x, np.full_like(x, y)], axis=1)[:, None, :].astype(dtype)   # (M, 1, 2)
    out, _ = model_forward(E, tuple(params[: head.n_param_layers]), head)
    return np.asarray(out[:, 0, :], np.float64)
