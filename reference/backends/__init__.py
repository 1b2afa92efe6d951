"""Backends: the reference's functions computed another way, behind one protocol.

A backend is a module in this folder, listed in ``BACKENDS``, that provides:

    NAME                      its name
    HOST_ARRAYS               True when it takes and returns host NumPy arrays
    check_available()         raise RuntimeError saying what is missing (a device, a library)
    supports(arch)            None if it computes this Arch exactly, else the reason (str)
    sample_tasks(rng, B, d, N, d_y=1, **options) -> Tasks
    model_forward(E, params, arch) -> (out, cache_or_None)
    loss_and_grads(E, y_q, params, arch, layout) -> (L, dparams, aux)
    train_step(params, state, tasks, arch, hp) -> StepResult
    make_stepper(arch, hp, spec, seed, dtype) -> a stepper with .step(params, state, step),
                              .step_on(params, state, tasks) and .sample(step)
                              (with a ``layout=`` keyword too where LAYOUT_KINDS lists
                              a kind beyond the regression layouts)

A backend that trains the lds task's sequences (``reference.seq_training``) also provides

    seq_supports(arch)        None if its sequence step computes this Arch, else the reason
    make_seq_stepper(arch, hp, spec, seed, dtype, mask) -> a stepper with .step, .step_on(params,
                              state, seqs) and .sample, as ``seq_training.SeqStepper``

(``SEQ_BACKENDS`` lists them; :func:`seq_backend` picks one and checks the Arch).

Each is tested against ``reference`` (and through it against the loop oracle). A
backend asked for an Arch it does not support raises ValueError with the reason
(:func:`require_support`) instead of computing something else. ``get_backend(name)``
imports lazily, so a missing optional dependency (CuPy) only matters when that
backend is asked for, and then raises a clear error. Nothing outside this folder
picks a backend by its name or knows which ones take host arrays.
"""

import importlib

BACKENDS = {
    "numpy": "reference.backends.numpy_backend",
    "numba": "reference.backends.numba_backend",
    "cupy": "reference.backends.cupy_backend",
}

PROTOCOL = ("NAME", "HOST_ARRAYS", "check_available", "supports", "sample_tasks", "model_forward",
            "loss_and_grads", "train_step", "make_stepper")

# The backend `icgd train` uses unless told otherwise. Switched to the fastest
# backend only once that backend passes the same correctness tests as the reference.
DEFAULT_TRAIN_BACKEND = "numba"


# The token layouts (``TokenLayout.kind``) each backend's stepper trains with. A backend
# not listed trains the regression layouts only; its make_stepper takes no ``layout``.
# ``make_stepper(..., layout=...)`` is passed only for the other kinds ("classic").
LAYOUT_KINDS = {
    "numpy": ("regression", "embedded", "classic"),
    "numba": ("regression", "embedded", "classic"),
    "cupy": ("regression", "embedded"),
}


# The backends with a sequence step (the lds task; ``seq_supports``, ``make_seq_stepper``).
SEQ_BACKENDS = ("numpy", "numba")


def seq_support(name, arch):
    """None if backend ``name`` trains the lds task's sequences on ``arch``, else the reason."""
    if name not in SEQ_BACKENDS:
        return f"backend {name!r} has no sequence step (the lds task trains on the backends {list(SEQ_BACKENDS)})"
    return get_backend(name).seq_supports(arch)


def seq_backend(name, arch):
    """The backend module ``name`` for a sequence run of ``arch``; ValueError with the reason
    when it cannot run it."""
    reason = seq_support(name, arch)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot train this sequence model: {reason}")
    return get_backend(name)


def layout_support(name, kind):
    """None if backend ``name`` trains with layouts of ``kind``, else the reason (str)."""
    kinds = LAYOUT_KINDS.get(name, ("regression", "embedded"))
    if kind in kinds:
        return None
    return (f"backend {name!r} trains the layouts {list(kinds)} only, not {kind!r} tokens; use backend 'numpy' "
            f"(the backends that train {kind!r}: {[n for n, k in LAYOUT_KINDS.items() if kind in k]})")


def backend_names():
    return sorted(BACKENDS)


def get_backend(name):
    """Return the backend module called ``name`` (one of :func:`backend_names`)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    mod = importlib.import_module(BACKENDS[name])
    missing = [n for n in PROTOCOL if not hasattr(mod, n)]
    if missing:
        raise ImportError(f"backend {name!r} does not provide {missing} of the backend protocol")
    return mod


def require_support(backend, arch):
    """Raise ValueError with the backend's reason unless ``backend`` (a module) computes ``arch``."""
    reason = backend.supports(arch)
    if reason is not None:
        raise ValueError(f"backend {backend.NAME!r} cannot run this model: {reason}")


def host_loss_and_grads(name):
    """The backend's ``loss_and_grads`` when it takes host arrays, else the reference's
    (for host-side loops such as GD++ meta-training)."""
    mod = get_backend(name)
    if mod.HOST_ARRAYS:
        return mod.loss_and_grads
    from ..model import loss_and_grads

    return loss_and_grads
