"""Parameter trees: the one structure that a model's parameters, its gradients and
Adam's moments share, and the one set of utilities that walks it.

A tree is a tuple with one entry per distinct parameter set of the model (one per
layer, or one for a weight-tied stack); each entry is a NamedTuple of arrays, e.g.
``LSAParams(W_Q, W_K, W_V, P)``. Entries may be ``None`` fields (skipped).

Used by Adam (``optim``), the gradient checks (``gradcheck``), the backends' flat
vectors, checkpoints and golden vectors. Names of leaves are ``"{i}.{field}"``, so a
checkpoint or vector file stores ``{prefix}.{i}.{field}`` arrays that any framework
can read.
"""

import numpy as np

from .xp import get_xp, to_numpy


def _check_tree(tree, what="tree"):
    if not isinstance(tree, (tuple, list)):
        raise TypeError(f"{what} must be a tuple of per-layer NamedTuples of arrays, got {type(tree).__name__}")
    for i, layer in enumerate(tree):
        if not (isinstance(layer, tuple) and hasattr(layer, "_fields")):
            raise TypeError(f"{what}[{i}] must be a NamedTuple of arrays, got {type(layer).__name__}")


def tree_map(fn, *trees):
    """Apply ``fn`` leaf by leaf over trees of the same structure; None leaves stay None."""
    _check_tree(trees[0])
    for t in trees[1:]:
        _check_tree(t)
        if len(t) != len(trees[0]) or any(type(a) is not type(b) for a, b in zip(t, trees[0])):
            raise ValueError("trees must have the same structure (layer count and types)")
    return tuple(type(layers[0])(*(None if leaves[0] is None else fn(*leaves) for leaves in zip(*layers)))
                 for layers in zip(*trees))


def tree_leaves(tree):
    """The arrays of a tree in order (layer by layer, field by field), None skipped."""
    return [a for layer in tree for a in layer if a is not None]


def tree_paths(tree):
    """Names of :func:`tree_leaves`' arrays: ``"{layer index}.{field}"``."""
    return [f"{i}.{name}" for i, layer in enumerate(tree) for name, a in zip(layer._fields, layer) if a is not None]


def tree_unflatten(like, leaves):
    """The tree of ``like``'s structure holding ``leaves`` (in :func:`tree_leaves` order)."""
    leaves = list(leaves)
    if len(leaves) != len(tree_leaves(like)):
        raise ValueError(f"expected {len(tree_leaves(like))} leaves for this tree, got {len(leaves)}")
    it = iter(leaves)
    return tuple(type(layer)(*(None if a is None else next(it) for a in layer)) for layer in like)


def tree_add(a, b):
    """Leafwise a + b (gradients of a shared layer used several times are summed)."""
    return tree_map(lambda x, y: x + y, a, b)


def tree_size(tree):
    """Total number of entries over all leaves."""
    return int(sum(a.size for a in tree_leaves(tree)))


def to_vector(tree, dtype):
    """All leaves raveled and concatenated into one host vector of ``dtype``."""
    return np.concatenate([np.asarray(to_numpy(a), dtype).ravel() for a in tree_leaves(tree)])


def from_vector(vec, like):
    """The inverse of :func:`to_vector`: views of ``vec`` shaped like ``like``'s leaves."""
    out, i = [], 0
    for a in tree_leaves(like):
        out.append(vec[i:i + a.size].reshape(a.shape))
        i += a.size
    if i != vec.size:
        raise ValueError(f"vector has {vec.size} entries, the tree needs {i}")
    return tree_unflatten(like, out)


def to_host(tree):
    """The tree with every leaf a host NumPy array (CuPy leaves copied, NumPy ones kept)."""
    return tree_map(to_numpy, tree)


def all_finite(tree):
    """True when every leaf is finite. NumPy leaves are checked one by one (no stacking:
    this runs every training step); CuPy leaves with a single device-to-host transfer."""
    leaves = tree_leaves(tree)
    xp = get_xp(*leaves)
    if xp is np:
        return all(bool(np.isfinite(a).all()) for a in leaves)
    return bool(xp.stack([xp.isfinite(a).all() for a in leaves]).all())


def to_arrays(tree, prefix):
    """``{f"{prefix}.{i}.{field}": host array}`` for an npz file."""
    return {f"{prefix}.{p}": to_numpy(a) for p, a in zip(tree_paths(tree), tree_leaves(tree))}


def from_arrays(arrays, prefix, types):
    """The tree stored by :func:`to_arrays` under ``prefix``; ``types`` gives the
    NamedTuple class of each layer. Raises KeyError naming a missing array."""
    out = []
    for i, tp in enumerate(types):
        fields = []
        for f in tp._fields:
            key = f"{prefix}.{i}.{f}"
            if key not in arrays:
                raise KeyError(f"missing array {key!r}")
            fields.append(np.array(arrays[key]))
        out.append(tp(*fields))
    return tuple(out)
