"""The one tolerance table. Every numeric comparison in tests/ and verify/ takes its
tolerance from here, keyed by dtype and kind of check, each with its reason.

Comparison rule (:func:`allclose_report`): |actual - desired| <= atol + rtol * scale
elementwise, where ``scale`` is max|desired| over the whole array (a norm-wise
relative error: entries that are tiny by cancellation are judged against the array's
size, not their own).
"""

from typing import NamedTuple

import numpy as np

from .xp import get_xp, to_numpy


class Tol(NamedTuple):
    rtol: float
    atol: float
    reason: str


TOLERANCES = {
    # same function, different summation order: a few ulps times the depth of the sums
    ("float64", "algebra"): Tol(1e-12, 1e-14, "same polynomial, different summation order; float64 eps 2.2e-16 times sums of <= ~1e3 terms"),
    ("float32", "algebra"): Tol(2e-5, 1e-6, "same polynomial, different summation order; float32 eps 1.2e-7 times sums of <= ~1e2 terms"),
    # complex step is exact up to rounding (no subtraction), so it is as tight as algebra
    ("float64", "complex_step"): Tol(1e-10, 1e-13, "complex-step derivatives have no cancellation error; float64 rounding of the backward's sums"),
    # central differences: truncation O(h^2) ~ 1e-12 plus cancellation eps/h ~ 1e-10 at h = 1e-6
    ("float64", "central_diff"): Tol(1e-6, 1e-8, "central differences at h=1e-6: O(h^2) truncation and eps/h cancellation, ~1e-9 relative"),
    # an explicit solver against the token construction: many layers compound rounding
    ("float64", "construction"): Tol(1e-10, 1e-12, "construction vs explicit solver in float64; up to 100 layers of rounding"),
    ("float32", "construction"): Tol(1e-4, 1e-5, "construction vs explicit solver in float32; rounding compounds over layers (the official notebook saw ~1e-6 at 100 layers)"),
    # statistics from sampled tasks
    ("float64", "monte_carlo"): Tol(2e-2, 0.0, "Monte-Carlo mean over 1e5 tasks: standard error ~0.3% of the loss, 2% is > 5 standard errors"),
}


def tolerance(dtype, kind):
    """The :class:`Tol` for ``dtype`` (float32/float64; complex maps to its real part) and ``kind``."""
    dt = np.dtype(dtype)
    if dt.kind == "c":
        dt = np.dtype(np.float64) if dt == np.complex128 else np.dtype(np.float32)
    try:
        return TOLERANCES[(dt.name, kind)]
    except KeyError:
        raise KeyError(f"no tolerance for dtype {dt.name} and kind {kind!r}; known: {sorted(TOLERANCES)}") from None


class CloseReport(NamedTuple):
    ok: bool
    max_abs_err: float
    rel_err: float        # max |a - d| / max |d|
    worst_index: tuple
    actual_at_worst: complex
    desired_at_worst: complex
    tol: Tol

    def __str__(self):
        return (f"max abs err {self.max_abs_err:.3e}, rel err {self.rel_err:.3e} at {self.worst_index} "
                f"(actual {self.actual_at_worst!r}, desired {self.desired_at_worst!r}); "
                f"rtol {self.tol.rtol:g}, atol {self.tol.atol:g}: {self.tol.reason}")


def allclose_report(actual, desired, kind, dtype=None):
    """Compare after checking namespace, shape and dtype. Returns a :class:`CloseReport`."""
    if get_xp(actual) is not get_xp(desired):
        raise TypeError("actual and desired live in different array namespaces")
    if tuple(actual.shape) != tuple(desired.shape):
        raise AssertionError(f"shape mismatch: actual {tuple(actual.shape)} vs desired {tuple(desired.shape)}")
    if dtype is None:
        if np.dtype(actual.dtype) != np.dtype(desired.dtype):
            raise AssertionError(f"dtype mismatch: actual {actual.dtype} vs desired {desired.dtype}")
        dtype = actual.dtype
    tol = tolerance(dtype, kind)
    a = to_numpy(actual).astype(np.complex128 if np.iscomplexobj(actual) else np.float64)
    d = to_numpy(desired).astype(a.dtype)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(d))):
        return CloseReport(False, float("inf"), float("inf"), (), np.nan, np.nan, tol)
    diff = np.abs(a - d)
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    if d.size == 0:
        return CloseReport(True, 0.0, 0.0, (), 0, 0, tol)
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    max_abs = float(diff[idx])
    ok = bool(np.all(diff <= tol.atol + tol.rtol * scale))
    rel = max_abs / scale if scale > 0 else max_abs
    return CloseReport(ok, max_abs, rel, tuple(int(i) for i in idx), a[idx].item(), d[idx].item(), tol)


def assert_close(actual, desired, kind, dtype=None, what="arrays"):
    """Raise AssertionError with both values, the worst index and the tolerance if not close."""
    rep = allclose_report(actual, desired, kind, dtype)
    if not rep.ok:
        raise AssertionError(f"{what} differ: {rep}")
    return rep
