"""Shared test configuration: Hypothesis profiles and the array-namespace fixture.

Hypothesis profile from the environment variable ICGD_HYPOTHESIS_PROFILE:
``dev`` (few examples, fast), ``ci`` (the default: more examples, no deadline) or
``deterministic`` (ci with derandomize=True, for reproducing a run exactly).
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deterministic", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("ICGD_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """Under pytest-xdist (``-n auto``) each worker process runs its Numba kernels on one
    thread, so that W workers on W cores do not oversubscribe them. NUMBA_NUM_THREADS is
    left as it was, so the thread-independence tests still compare one thread with two.
    A test run started with SIGINT ignored (``nohup``, or ``cmd &`` in a script) passes
    that on to every process it starts; the Ctrl-C tests need Python's handler in this
    process and in their subprocesses, so it is put back."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import numba
        numba.set_num_threads(1)


def _cupy_or_reason():
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        return None, f"CuPy is not installed ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy is installed but no CUDA device is visible"
    except Exception as exc:  # noqa: BLE001
        return None, f"CuPy is installed but CUDA is unusable ({type(exc).__name__}: {exc})"
    return cupy, None


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array namespace a test body runs on: NumPy always, CuPy when a GPU is present
    (skipped with the reason otherwise, never a false pass)."""
    if request.param == "numpy":
        return np
    cupy, reason = _cupy_or_reason()
    if cupy is None:
        pytest.skip(reason)
    return cupy
