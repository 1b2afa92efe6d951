"""JIT flags of the Numba backend, in one place (read once, at import).

Every ``@njit`` in ``reference/backends/_numba_*.py`` takes its options from here,
never from literals on the decorator. Environment variables (read when the backend is
first imported; set them before that):

``ICGD_NUMBA_PARALLEL`` (default ``1``)
    ``1``: the batch loop is a ``prange`` over chunks of tasks, run on Numba's
    threads (``NUMBA_NUM_THREADS`` sets how many). ``0``: one thread. The results do
    not depend on this flag or on the thread count: chunks are a fixed partition of
    the tasks and their partial sums are added in chunk order.
``ICGD_NUMBA_FASTMATH`` (default ``1``)
    ``1``: the LLVM flags ``reassoc`` and ``contract`` on the math kernels (sums may be
    reordered and fused into FMAs, which is what lets LLVM vectorise the reductions).
    Never ``nnan``/``ninf``/``afn``: NaN checks and libm accuracy are kept. The task
    sampler and Adam never use fastmath. ``0``: strict IEEE order everywhere.
``ICGD_NUMBA_CACHE`` (default ``1``)
    ``1``: compiled kernels are cached on disk (``__pycache__`` next to the source, or
    ``NUMBA_CACHE_DIR``), so a second process starts in about a second instead of
    recompiling. ``0``: compile in memory only.
``ICGD_NUMBA_LANES`` (default ``0`` = automatic)
    Tasks are processed in blocks of this many "lanes" (the innermost, vectorised
    axis of every per-block array). ``0`` picks 64, 32, 16 or 8 from the token
    count so one block's tokens stay in the core's cache.

``ICGD_NUMBA_PATH`` (default ``auto``)
    How context-only stacks of K >= 2 layers with one label are computed when only the
    loss and the weight gradients are needed (the training step): ``tokens`` (every
    layer on the tokens, ``_numba_layers``), ``dspace`` (in D x D space,
    ``_numba_dspace``, with an exact fallback to the token path for tasks whose tokens
    could be clipped), or ``auto``: ``dspace`` when D >= 24 and N + 1 >= D (there the
    D x D products are cheaper than the token products and long enough to vectorise
    per task), else ``tokens``.

``NUMBA_DISABLE_JIT=1`` (Numba's own switch) runs every kernel as plain Python: slow,
but the tests use it on tiny sizes to check the kernels' Python semantics.
"""

import os


def _flag(name, default):
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 0 or 1, got {raw!r}")


def _int(name, default, allowed):
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value not in allowed:
        raise ValueError(f"environment variable {name} must be one of {sorted(allowed)}, got {value}")
    return value


PARALLEL = _flag("ICGD_NUMBA_PARALLEL", True)
FASTMATH = _flag("ICGD_NUMBA_FASTMATH", True)
CACHE = _flag("ICGD_NUMBA_CACHE", True)
LANES = _int("ICGD_NUMBA_LANES", 0, {0, 1, 2, 4, 8, 16, 32, 64, 128})


def _choice(name, default, allowed):
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw not in allowed:
        raise ValueError(f"environment variable {name} must be one of {sorted(allowed)}, got {raw!r}")
    return raw


PATH = _choice("ICGD_NUMBA_PATH", "auto", {"auto", "tokens", "dspace"})

#: LLVM fast-math flags for the math kernels (a set Numba understands), or False.
FASTMATH_FLAGS = {"reassoc", "contract"} if FASTMATH else False

#: options of the per-block math kernels (called from the parallel driver).
KERNEL = dict(cache=CACHE, fastmath=FASTMATH_FLAGS, nogil=True, error_model="numpy")
#: options of the parallel driver (the prange over chunks of tasks).
DRIVER = dict(cache=CACHE, fastmath=FASTMATH_FLAGS, nogil=True, error_model="numpy", parallel=PARALLEL)
#: options of the random-number and Adam kernels: strict IEEE arithmetic.
STRICT = dict(cache=CACHE, fastmath=False, nogil=True, error_model="numpy")


def describe():
    """The effective flags, for benchmark records and error messages."""
    return {"parallel": PARALLEL, "fastmath": sorted(FASTMATH_FLAGS) if FASTMATH_FLAGS else False,
            "cache": CACHE, "lanes": LANES or "auto", "path": PATH}
