"""Global-norm gradient clipping and Adam, as used to train the LSA models.

Official code (von Oswald et al. 2023): optax chain(clip_by_global_norm(c), adam(lr,
b1=0.9, b2=0.98, eps=1e-8)), no weight decay, no schedule. Equations, for a step
t = 1, 2, ... over every parameter array p with gradient g:

    n   = sqrt(sum over all arrays of sum g^2)          (global norm)
    g  <- g * min(1, c / n)                              (clip_by_global_norm)
    m  <- b1 m + (1 - b1) g
    v  <- b2 v + (1 - b2) g^2
    p  <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Parameters, gradients and both moments are parameter trees (``reference.tree``: a
tuple of per-layer NamedTuples such as LSAParams or MergedParams); these functions
map over them with ``tree_map`` / ``tree_leaves``.
"""

from typing import NamedTuple

from ._checks import check_float
from .tree import tree_leaves, tree_map
from .xp import get_xp


class AdamHP(NamedTuple):
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    clip_norm: object = None   # None: no clipping

    def validate(self):
        check_float("lr", self.lr, 0.0, allow_equal_min=False)
        check_float("b1", self.b1, 0.0, 1.0)
        check_float("b2", self.b2, 0.0, 1.0)
        check_float("eps", self.eps, 0.0)
        if self.clip_norm is not None:
            check_float("clip_norm", self.clip_norm, 0.0, allow_equal_min=False)
        return self


class AdamState(NamedTuple):
    m: tuple   # first moments, same structure as params
    v: tuple   # second moments
    t: int     # number of updates done


def global_norm(grads):
    """sqrt of the sum of squares of every gradient entry (a Python float)."""
    xp = get_xp(*tree_leaves(grads))
    return float(xp.sqrt(sum(xp.sum(g * g) for g in tree_leaves(grads))))


def clip_by_global_norm(grads, clip_norm):
    """Scale all gradients by min(1, clip_norm / global_norm). Returns (grads, norm)."""
    norm = global_norm(grads)
    if clip_norm is None or norm <= clip_norm:
        return grads, norm
    scale = clip_norm / norm
    return tree_map(lambda g: g * g.dtype.type(scale), grads), norm


def adam_init(params):
    xp = get_xp(*tree_leaves(params))
    zeros = tree_map(lambda p: xp.zeros_like(p), params)
    return AdamState(zeros, tree_map(lambda p: xp.zeros_like(p), params), 0)


def adam_update(params, grads, state, hp):
    """One clipped Adam step. Returns (new params, new state, global norm before clipping)."""
    grads, norm = clip_by_global_norm(grads, hp.clip_norm)
    t = state.t + 1
    b1, b2 = hp.b1, hp.b2
    m = tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, state.m, grads)
    v = tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, state.v, grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    xp = get_xp(*tree_leaves(params))
    new = tree_map(lambda p, m_, v_: (p - hp.lr * (m_ / c1) / (xp.sqrt(v_ / c2) + hp.eps)).astype(p.dtype),
                   params, m, v)
    m = tree_map(lambda a, p: a.astype(p.dtype), m, params)
    v = tree_map(lambda a, p: a.astype(p.dtype), v, params)
    return new, AdamState(m, v, t), norm
