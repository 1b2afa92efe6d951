"""Array-namespace helpers: the only place that knows NumPy from CuPy.

Math code calls ``xp = get_xp(*arrays)`` and then uses ``xp.matmul`` and friends, so
one implementation runs on host (NumPy) and device (CuPy) arrays. Mixing host and
device arrays in one call is an error, never a silent copy.
"""

import numpy as np


def _is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def get_xp(*arrays):
    """Return the array namespace (numpy or cupy) shared by ``arrays``.

    Non-array arguments (None, Python scalars) are ignored. Raises TypeError when
    host and device arrays are mixed.
    """
    kinds = set()
    for a in arrays:
        if a is None or isinstance(a, (int, float, complex, bool)):
            continue
        if _is_cupy(a):
            kinds.add("cupy")
        elif isinstance(a, (np.ndarray, np.generic)):
            kinds.add("numpy")
    if len(kinds) > 1:
        raise TypeError(
            "arrays mix NumPy (host) and CuPy (device) namespaces; move them to one "
            "device first (reference.to_numpy or cupy.asarray)"
        )
    if kinds == {"cupy"}:
        import cupy

        return cupy
    return np


def to_numpy(a):
    """Copy an array (NumPy or CuPy) to a host NumPy array; NumPy input is returned as is."""
    if a is None:
        return None
    if _is_cupy(a):
        return a.get()
    return np.asarray(a)
