"""Validation at the public entry points: clear errors naming the argument, the
expected shape or range, and what was given. Internal helpers trust their inputs."""

import numbers

import numpy as np

from .xp import get_xp

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# complex128 is accepted so complex-step differentiation can run through the same code.
ARRAY_DTYPES = FLOAT_DTYPES + (np.dtype(np.complex64), np.dtype(np.complex128))


class NonFiniteError(ValueError):
    """An array holds NaN or infinite values, or values beyond its dtype's data limit.
    A ValueError; training loops read it (raised inside a step) as divergence."""


def check_int(name, value, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name, value, minimum=None, maximum=None, allow_equal_min=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if allow_equal_min and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if not allow_equal_min and value <= minimum:
            raise ValueError(f"{name} must be > {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_dtype(name, dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from exc
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def data_limit(dtype):
    """The largest magnitude a task-data or token entry of ``dtype`` may have:
    sqrt(largest finite value) / 1e3, so that sums of up to 10^6 squared entries (the
    covariances, losses and attention products the model forms) stay finite. Data beyond
    it cannot be computed with in that dtype ("overflow-scale")."""
    return float(np.sqrt(np.finfo(np.dtype(dtype)).max)) * 1e-3     # finfo of complex is its real part's


def _is_cupy(a):
    return getattr(type(a), "__module__", "numpy").split(".")[0] == "cupy"


def _check_kind(name, a, allowed, allow_complex):
    if type(a) is not np.ndarray and (not hasattr(a, "shape") or not hasattr(a, "dtype")):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if a.dtype not in allowed:                                         # dtype == dtype: no conversion needed
        raise TypeError(
            f"{name} must have dtype float32 or float64"
            + (" (or complex for complex-step checks)" if allow_complex else "")
            + f", got {a.dtype}"
        )


def _check_shape(name, a, ndim, shape, dims):
    if dims is not None:
        ndim = len(dims)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if shape is not None and tuple(shape) != tuple(a.shape):
        if len(shape) != a.ndim or any(s is not None and s != t for s, t in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    if dims is not None and 0 in a.shape:
        dim = dims[list(a.shape).index(0)]
        raise ValueError(f"{name} must have {dim} >= 1 (axes ({', '.join(dims)})), got shape {tuple(a.shape)}")


def _finite(a):
    if type(a) is np.ndarray:
        return bool(np.isfinite(a).all())
    if _is_cupy(a):
        import cupy

        return bool(cupy.isfinite(a).all())
    return bool(np.isfinite(a).all())


def check_array(name, a, ndim=None, shape=None, allow_complex=True, dims=None, finite=True):
    """Check that ``a`` is a float (or complex) array of the given ndim and shape.

    ``shape`` may contain None for free axes; ``dims`` names every axis (e.g.
    ``("B", "N", "d")``, which also fixes ndim) and requires each to be >= 1. Non-finite
    values are rejected so a NaN is never carried silently into a result (``finite=False``
    leaves that to a later :func:`check_all_finite` over several arrays at once).
    """
    _check_kind(name, a, ARRAY_DTYPES if allow_complex else FLOAT_DTYPES, allow_complex)
    _check_shape(name, a, ndim, shape, dims)
    if finite and not _finite(a):
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return a


# Host arrays with at most this many entries in all are checked in one pass over their
# concatenation (one NumPy call instead of one per array: parameter trees are small).
_BATCH_ENTRIES = 1 << 15


def check_all_finite(names, arrays, nonneg_from=None):
    """Raise ValueError naming the first of ``arrays`` (already checked to be float or
    complex arrays) with a NaN or infinite entry, or, from index ``nonneg_from`` on, a
    negative one. ``names``: a sequence, or a function of the index (names are only made
    for the message). Small host arrays are checked in one pass over their concatenation."""
    if not arrays:
        return
    host, total, offset = True, 0, 0
    for k, a in enumerate(arrays):
        if type(a) is not np.ndarray:
            host = False
            break
        if k == nonneg_from:
            offset = total
        total += a.size
    if host and total <= _BATCH_ENTRIES:
        flat = np.concatenate([a.ravel() for a in arrays])
        if np.isfinite(flat).all() and (nonneg_from is None or offset == total or flat[offset:].min() >= 0):
            return
    for k, a in enumerate(arrays):
        name = names(k) if callable(names) else names[k]
        if not _finite(a):
            raise NonFiniteError(f"{name} contains NaN or infinite values")
        if nonneg_from is not None and k >= nonneg_from and a.size and not float(a.min()) >= 0:
            raise ValueError(f"{name} must be >= 0 (Adam's second moments), got entries down to {float(a.min()):.3g}")


def check_data(name, a, ndim=None, shape=None, allow_complex=True, dims=None):
    """:func:`check_array` for task data and tokens, which the model multiplies with
    themselves: entries must also lie within :func:`data_limit` of the dtype (NaN, inf
    and overflow-scale values are refused in the same pass)."""
    _check_kind(name, a, ARRAY_DTYPES if allow_complex else FLOAT_DTYPES, allow_complex)
    _check_shape(name, a, ndim, shape, dims)
    if a.size == 0:
        return a
    limit = data_limit(a.dtype)
    if np.dtype(a.dtype).kind == "c" or _is_cupy(a):
        big = float(get_xp(a).abs(a).max())                            # NaN propagates
    else:
        lo, hi = a.min(), a.max()                                      # one pass each, no temporary
        big = max(-float(lo), float(hi)) if lo == lo and hi == hi else float("nan")
    if not big <= limit:                                               # NaN, inf or overflow-scale
        if not _finite(a):
            raise NonFiniteError(f"{name} contains NaN or infinite values")
        raise NonFiniteError(f"{name} has entries of magnitude up to {big:.3g}, beyond the {a.dtype} data limit "
                         f"{limit:.3g} (sqrt of the largest {a.dtype} / 1e3, so that sums of squares of the data "
                         "stay finite); rescale the data or compute in float64")
    return a


def check_dout(dout, out_shape, out_dtype, name="dout"):
    """Check an upstream gradient for a backward: an array of the forward output's shape
    and dtype, with finite entries. A forward on exact numbers (NumPy object arrays, as
    the symbolic proofs build their caches) takes an object ``dout`` and no value check."""
    out_dtype = np.dtype(out_dtype)
    if out_dtype == np.dtype(object):
        if not hasattr(dout, "shape") or not hasattr(dout, "dtype") or np.dtype(dout.dtype) != out_dtype:
            raise TypeError(f"{name} must be an object array like the forward's (exact arithmetic), "
                            f"got {getattr(dout, 'dtype', type(dout).__name__)}")
        _check_shape(name, dout, None, tuple(out_shape), None)
        return dout
    _check_kind(name, dout, ARRAY_DTYPES, True)
    if np.dtype(dout.dtype) != out_dtype:
        raise TypeError(f"{name} must have the forward's dtype {out_dtype}, got {dout.dtype}")
    _check_shape(name, dout, None, tuple(out_shape), None)
    if not _finite(dout):
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return dout


def check_same_dtype(**arrays):
    """Raise TypeError unless the given arrays (None skipped) share one dtype, naming them."""
    dts = {k: np.dtype(v.dtype) for k, v in arrays.items() if v is not None}
    if len(set(dts.values())) > 1:
        names = list(dts)
        desc = ", ".join(f"{k}={v}" for k, v in dts.items())
        raise TypeError(f"{', '.join(names[:-1])} and {names[-1]} must share one dtype, got {desc}")
    return next(iter(dts.values()), None)


def check_W_0(W_0, shapes, data_dtype=None, allow_complex=True):
    """An initial linear model W_0 (optional): None, or a finite float array of one of
    ``shapes``. It may have another float precision than the data of ``data_dtype`` (it
    is cast to theirs), but is complex only when they are."""
    if W_0 is None:
        return None
    complex_ok = allow_complex and (data_dtype is None or np.dtype(data_dtype).kind == "c")
    _check_kind("W_0", W_0, ARRAY_DTYPES if complex_ok else FLOAT_DTYPES, complex_ok)
    if tuple(W_0.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"W_0 must have shape {' or '.join(str(tuple(s)) for s in shapes)}, got {tuple(W_0.shape)}")
    if not _finite(W_0):
        raise NonFiniteError("W_0 contains NaN or infinite values")
    return W_0
