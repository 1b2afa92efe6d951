"""Global-norm gradient clipping and Adam, as used to train the LSA models; element-wise
clipping and AdamW's decoupled weight decay for the mesa paper's sequence models.

Official code (von Oswald et al. 2023): optax chain(clip_by_global_norm(c), adam(lr,
b1=0.9, b2=0.98, eps=1e-8)), no weight decay, no schedule. Equations, for a step
t = 1, 2, ... over every parameter array p with gradient g:

    n   = sqrt(sum over all arrays of sum g^2)          (global norm)
    g  <- g * min(1, c / n)                              (clip_by_global_norm)
    m  <- b1 m + (1 - b1) g
    v  <- b2 v + (1 - b2) g^2
    p  <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

The mesa paper's code (arXiv 2309.05858; paper-settings.md 8a) trains with
optax chain(clip(c_e), adamw(lr, b1, b2, eps, weight_decay=wd)): before everything the
gradient is clipped element-wise, g <- clip(g, -c_e, c_e) (``clip_value``; None = off),
and the update gains the decoupled decay term, applied with the learning rate after the
Adam direction (optax.adamw: updates = m_hat / (sqrt(v_hat) + eps) + wd p, p <- p - lr updates):

    p  <- p - lr * ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)

With the defaults (clip_value None, weight_decay 0) the update is the Adam above,
computed by the same expressions (bit-identical). The reported norm ``n`` is always that
of the raw gradient (before either clip); with both clips set, the element-wise clip comes
first and the global norm of the clipped gradient decides the global clip.

Parameters, gradients and both moments are parameter trees (``reference.tree``: a
tuple of per-layer NamedTuples such as LSAParams or MergedParams); these functions
map over them with ``tree_map`` / ``tree_leaves``.

The public functions check their inputs first (``check_adam_inputs``: float32 / float64
trees of one structure, finite, v >= 0) and :func:`adam_update` refuses a gradient
whose sum of squares overflows its dtype (v would be inf and the update silently zero).
:func:`adam_apply` is the same update without checks, for training steps whose
gradients come from checked inputs: there an overflowing norm is returned as inf and
the training loop reports divergence.
"""

from typing import NamedTuple

import numpy as np

from ._checks import FLOAT_DTYPES, check_all_finite, check_float, check_int
from .tree import tree_leaves, tree_map
from .xp import get_xp


class AdamHP(NamedTuple):
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    clip_norm: object = None   # None: no clipping
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: Adam)
    clip_value: object = None  # element-wise clip |g| <= clip_value before everything (None: off)

    def validate(self):
        check_float("lr", self.lr, 0.0, allow_equal_min=False)
        for name in ("b1", "b2"):
            v = check_float(name, getattr(self, name), 0.0, 1.0)
            if v == 1.0:   # the bias correction 1 - b^t would be 0
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        check_float("eps", self.eps, 0.0, allow_equal_min=False)   # eps = 0 gives 0/0 on a zero gradient
        if self.clip_norm is not None:
            check_float("clip_norm", self.clip_norm, 0.0, allow_equal_min=False)
        check_float("weight_decay", self.weight_decay, 0.0)
        if self.clip_value is not None:
            check_float("clip_value", self.clip_value, 0.0, allow_equal_min=False)
        return self


class AdamState(NamedTuple):
    m: tuple   # first moments, same structure as params
    v: tuple   # second moments
    t: int     # number of updates done


# ---- checks: what the public functions below (and every backend's step) refuse ---------

_VALID_HP = set()   # (type, value) of every field of AdamHPs already validated (a small cache)


def check_hp(hp):
    """Raise unless ``hp`` is a valid :class:`AdamHP`. Returns it."""
    if not isinstance(hp, AdamHP):
        raise TypeError(f"hp must be an AdamHP, got {type(hp).__name__}")
    key = tuple((type(x), x) for x in hp)     # the types too: True == 1.0, but is no valid lr
    try:
        if key in _VALID_HP:
            return hp
    except TypeError:                          # an unhashable field: validate() says what is wrong
        return hp.validate()
    hp.validate()
    if len(_VALID_HP) < 256:
        _VALID_HP.add(key)
    return hp


def _check_tree_leaves(name, tree, like):
    """Structure, dtypes and shapes of a tree's leaves (no values): returns the leaves
    (None fields skipped) and a function of a leaf's index giving its name, ``name[i].field``."""
    if not isinstance(tree, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of per-layer NamedTuples of arrays, got {type(tree).__name__}")
    if like is not None and len(tree) != len(like):
        raise ValueError(f"{name} must have the same structure as the params (layer count and types): "
                         f"{len(tree)} layer(s) for {len(like)}")
    leaves, names = [], []
    for i, layer in enumerate(tree):
        if not (isinstance(layer, tuple) and hasattr(layer, "_fields")):
            raise TypeError(f"{name}[{i}] must be a NamedTuple of arrays, got {type(layer).__name__}")
        ref = None if like is None else like[i]
        if ref is not None and type(layer) is not type(ref):
            raise ValueError(f"{name} must have the same structure as the params (layer count and types): "
                             f"{name}[{i}] is a {type(layer).__name__}, params[{i}] a {type(ref).__name__}")
        for j, a in enumerate(layer):
            r = None if ref is None else ref[j]
            if ref is not None and (a is None) != (r is None):
                f = layer._fields[j]
                raise TypeError(f"{name}[{i}].{f} must be {'None' if r is None else 'an array'}, as params[{i}].{f} is "
                                f"(the same structure as the params), got {type(a).__name__}")
            if a is None:
                continue                                               # a field the tree does not use
            if type(a) is not np.ndarray and not (hasattr(a, "shape") and hasattr(a, "dtype")):
                raise TypeError(f"{name}[{i}].{layer._fields[j]} must be an array, got {type(a).__name__}")
            if a.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}[{i}].{layer._fields[j]} must have dtype float32 or float64, got {a.dtype}")
            if r is not None:
                if a.shape != r.shape:
                    raise ValueError(f"{name}[{i}].{layer._fields[j]} must have shape {tuple(r.shape)} (the params'), "
                                     f"got {tuple(a.shape)}")
                if a.dtype != r.dtype:
                    raise TypeError(f"{name}[{i}].{layer._fields[j]} must have dtype {r.dtype} (the params'), "
                                    f"got {a.dtype}")
            leaves.append(a)
            names.append((i, j))
    return leaves, lambda k: f"{name}[{names[k][0]}].{tree[names[k][0]]._fields[names[k][1]]}"


def check_tree(name, tree, like=None, *, nonneg=False):
    """Raise unless ``tree`` is a parameter tree (``reference.tree``: a tuple of per-layer
    NamedTuples) of finite float32 / float64 arrays; with ``like``, of its structure
    (layer count and types) with every leaf of its shape and dtype; ``nonneg``: every
    entry >= 0. Messages name the leaf, ``name[i].field``."""
    leaves, names = _check_tree_leaves(name, tree, like)
    check_all_finite(names, leaves, nonneg_from=0 if nonneg else None)
    return tree


def check_adam_state(params, state):
    """Raise unless ``state`` is an :class:`AdamState` for ``params``: t an int >= 0, m and
    v trees of the params' structure, shapes and dtypes, finite, v >= 0."""
    if not isinstance(state, AdamState):
        raise TypeError(f"state must be an AdamState (reference.optim.adam_init), got {type(state).__name__}")
    check_int("state.t", state.t, 0)
    m, m_name = _check_tree_leaves("state.m", state.m, params)
    v, v_name = _check_tree_leaves("state.v", state.v, params)
    check_all_finite(lambda k: m_name(k) if k < len(m) else v_name(k - len(m)), m + v, nonneg_from=len(m))
    return state


def check_adam_inputs(params, grads, state, hp):
    """What :func:`adam_update` refuses before any work: ``hp`` an AdamHP, ``params`` a
    tree of finite float arrays, ``grads`` and the state's moments of its structure,
    shapes and dtypes (finite, v >= 0), ``state.t`` an int >= 0."""
    check_hp(hp)
    check_tree("params", params)
    check_tree("grads", grads, params)
    check_adam_state(params, state)


def grad_norm_in_dtype(norm, dtype):
    """The global norm as ``dtype`` would have it: inf when the sum of squares overflows
    ``dtype`` (norm above sqrt of its largest value), so a norm computed in float64 for
    float32 gradients reports the overflow the reference's float32 sum does."""
    return float("inf") if not norm <= np.sqrt(np.finfo(np.dtype(dtype)).max) else norm


def check_grad_norm(norm, dtype):
    """Raise unless the global norm is finite in ``dtype``: otherwise g^2 overflows, so
    Adam's v = b2 v + (1 - b2) g^2 would be inf and the update silently zero."""
    if not grad_norm_in_dtype(norm, dtype) < np.inf:
        raise ValueError(f"grads: the global gradient norm overflows {np.dtype(dtype)} (the sum of squares exceeds "
                         f"{np.finfo(np.dtype(dtype)).max:.3g}): Adam's second moment v = b2 v + (1 - b2) g^2 would be "
                         "inf and the update zero. Lower the learning rate, clip smaller gradients, or compute in float64")


# ---- the math ----------------------------------------------------------------------------

def _global_norm(grads):
    xp = get_xp(*tree_leaves(grads))
    return float(xp.sqrt(sum(xp.sum(g * g) for g in tree_leaves(grads))))


def _clip(grads, clip_norm, norm):
    if clip_norm is None or norm <= clip_norm:
        return grads
    scale = clip_norm / norm
    return tree_map(lambda g: g * g.dtype.type(scale), grads)


def _tree_dtype(tree):
    return np.result_type(*[np.dtype(a.dtype) for a in tree_leaves(tree)])


def global_norm(grads):
    """sqrt of the sum of squares of every gradient entry (a Python float), summed in the
    gradients' dtype (inf when that overflows)."""
    return _global_norm(check_tree("grads", grads))


def clip_by_global_norm(grads, clip_norm):
    """Scale all gradients by min(1, clip_norm / global_norm). Returns (grads, norm)."""
    check_tree("grads", grads)
    if clip_norm is not None:
        check_float("clip_norm", clip_norm, 0.0, allow_equal_min=False)
    norm = _global_norm(grads)
    return _clip(grads, clip_norm, norm), norm


def adam_init(params):
    xp = get_xp(*tree_leaves(params))
    zeros = tree_map(lambda p: xp.zeros_like(p), params)
    return AdamState(zeros, tree_map(lambda p: xp.zeros_like(p), params), 0)


def clip_by_value(grads, clip_value):
    """Element-wise clip (optax.clip): every entry g <- min(max(g, -c), c)."""
    check_tree("grads", grads)
    c = check_float("clip_value", clip_value, 0.0, allow_equal_min=False)
    return _clip_value(grads, c)


def _clip_value(grads, c):
    if c is None:
        return grads
    xp = get_xp(*tree_leaves(grads))
    return tree_map(lambda g: xp.clip(g, g.dtype.type(-c), g.dtype.type(c)), grads)


def _clipped(grads, hp, norm):
    """The gradient Adam sees: element-wise clip (if set), then the global-norm clip.
    ``norm`` is the raw gradient's global norm."""
    if hp.clip_value is None:
        return _clip(grads, hp.clip_norm, norm)
    grads = _clip_value(grads, hp.clip_value)
    return _clip(grads, hp.clip_norm, norm if hp.clip_norm is None else _global_norm(grads))


def adam_apply(params, grads, state, hp):
    """One clipped Adam step without checks, for training steps whose gradients come from
    checked inputs. A gradient norm that overflows the dtype is returned as it is (inf),
    which the training loop reports as divergence. Returns (params, state, norm)."""
    norm = _global_norm(grads)
    return _adam(params, _clipped(grads, hp, norm), state, hp) + (norm,)


def adam_update(params, grads, state, hp):
    """One clipped Adam step. Returns (new params, new state, global norm before clipping).
    Refuses bad input (:func:`check_adam_inputs`) and a gradient whose global norm
    overflows its dtype (:func:`check_grad_norm`) before updating anything."""
    check_adam_inputs(params, grads, state, hp)
    with np.errstate(over="ignore"):                                   # an overflow is refused just below
        norm = _global_norm(grads)
    check_grad_norm(norm, _tree_dtype(grads))
    return _adam(params, _clipped(grads, hp, norm), state, hp) + (norm,)


def _adam(params, grads, state, hp):
    t = state.t + 1
    b1, b2 = hp.b1, hp.b2
    m = tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, state.m, grads)
    v = tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, state.v, grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    xp = get_xp(*tree_leaves(params))
    wd = hp.weight_decay
    if wd == 0:
        new = tree_map(lambda p, m_, v_: (p - hp.lr * (m_ / c1) / (xp.sqrt(v_ / c2) + hp.eps)).astype(p.dtype),
                       params, m, v)
    else:   # AdamW (optax.adamw): the decay joins the update direction, both scaled by lr
        new = tree_map(lambda p, m_, v_: (p - hp.lr * ((m_ / c1) / (xp.sqrt(v_ / c2) + hp.eps) + wd * p))
                       .astype(p.dtype), params, m, v)
    m = tree_map(lambda a, p: a.astype(p.dtype), m, params)
    v = tree_map(lambda a, p: a.astype(p.dtype), v, params)
    return new, AdamState(m, v, t)
