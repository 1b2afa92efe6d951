"""Backends: the same functions as the reference, run another way.

Each backend module exposes the reference's signatures for the hot path:

    sample_tasks(rng, B, d, N, d_y=1, **options) -> Tasks
    loss_and_grads(E, y_q, params, arch, d) -> (L, dparams, aux)
    model_forward(E, params, arch) -> (out, cache_or_None)
    train_step(params, state, tasks, arch, hp) -> StepResult

and is tested against ``reference`` (and through it against the loop oracle).
``get_backend(name)`` imports lazily, so a missing optional dependency (CuPy) only
matters when that backend is asked for, and then raises a clear error.
"""

import importlib

BACKENDS = {
    "numpy": "reference.backends.numpy_backend",
    "numba": "reference.backends.numba_backend",
    "cupy": "reference.backends.cupy_backend",
}


def get_backend(name):
    """Return the backend module called ``name`` ('numpy', 'numba' or 'cupy')."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKENDS[name])

# The backend `icgd train` uses unless told otherwise. Switched to the fastest
# backend only once that backend passes the same correctness tests as the reference.
DEFAULT_TRAIN_BACKEND = "numba"
