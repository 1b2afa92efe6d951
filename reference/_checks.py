"""Validation at the public entry points: clear errors naming the argument, the
expected shape or range, and what was given. Internal helpers trust their inputs."""

import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# complex128 is accepted so complex-step differentiation can run through the same code.
ARRAY_DTYPES = FLOAT_DTYPES + (np.dtype(np.complex64), np.dtype(np.complex128))


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


def check_array(name, a, ndim=None, shape=None, allow_complex=True):
    """Check that ``a`` is a float (or complex) array of the given ndim and shape.

    ``shape`` may contain None for free axes. Non-finite values are rejected so a
    NaN is never carried silently into a result.
    """
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    allowed = ARRAY_DTYPES if allow_complex else FLOAT_DTYPES
    if np.dtype(a.dtype) not in allowed:
        raise TypeError(
            f"{name} must have dtype float32 or float64"
            + (" (or complex for complex-step checks)" if allow_complex else "")
            + f", got {a.dtype}"
        )
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != t for s, t in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    xp_isfinite = getattr(type(a), "__module__", "numpy").split(".")[0]
    if xp_isfinite == "cupy":
        import cupy

        finite = bool(cupy.isfinite(a).all())
    else:
        finite = bool(np.isfinite(a).all())
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def check_same_dtype(**arrays):
    dts = {k: np.dtype(v.dtype) for k, v in arrays.items() if v is not None}
    if len(set(dts.values())) > 1:
        desc = ", ".join(f"{k}={v}" for k, v in dts.items())
        raise TypeError(f"arrays must share one dtype, got {desc}")
