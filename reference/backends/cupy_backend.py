"""The CuPy backend: the training step on an NVIDIA GPU (``--backend cupy``).

Same interface as :mod:`.numpy_backend` (sample_tasks, loss_and_grads, model_forward,
train_step, make_stepper) and tested against it (``tests/test_cupy_backend.py``).
What is different, and why:

* LSA layers in covariance form (``_cupy_lsa``): per task C = E_ctx^T E_ctx and
  M = sum_h P_h W_V,h C W_K,h^T W_Q,h, a handful of cuBLAS batched matmuls per layer
  instead of the attention form's (B, H, T, N) scores; exact for context-only
  attention. Causal stacks fall back to the reference code (run on CuPy arrays).
* the loss, the global gradient norm and clipped Adam are fused CUDA kernels
  (``_cupy_kernels``), Adam as ONE elementwise kernel over a flat vector of all
  parameters;
* ``stepper.step`` draws its tasks on the device with cuRAND (Philox), reseeded from
  (seed, step): no host round trip per step. These tasks are NOT the ones the NumPy
  backend draws for the same (seed, step) (different generator); ``step_on`` with
  given tasks is how the backends are compared.
* results stay on the device: ``StepResult.loss`` and ``.grad_norm`` are 0-d CuPy
  arrays (``float()`` reads them, and synchronises), params are CuPy arrays
  (``reference.to_numpy`` copies them to the host).

Importing this module never needs CuPy; every public function checks for CuPy and a
CUDA device first and raises a RuntimeError saying which is missing and how to
install it (``pip install icgd[gpu]``).

STATUS: written and tested on machines WITHOUT a GPU. Everything except the CUDA
kernel bodies and CuPy's own calls is exercised on the CPU (the same step code driven
by NumPy and the kernels' NumPy twins); the device run itself is in the tests marked
``gpu`` (``pytest -m gpu``), which skip, with the reason, where no GPU is present.
"""

import numpy as np

from ..model import check_loss_inputs, check_model_inputs, model_forward as reference_model_forward
from ..tasks import TaskSpec, sample_tasks as reference_sample_tasks
from ..train_step import check_step_inputs
from . import _cupy_lsa
from ._lsa_stack import lsa_stack_of, lsa_stack_reason
from ._cupy_step import DeviceDraw, FusedEngine, FusedStepper, device_tokens, seed_for, tokens_of

NAME = "cupy"
HOST_ARRAYS = False
INSTALL_HINT = "pip install icgd[gpu]"


def supports(arch):
    """None for uniform stacks of ``lsa`` layers (one causal and clip value), else the reason."""
    return lsa_stack_reason(arch, NAME)


def require_cupy():
    """Return the ``cupy`` module, or raise RuntimeError saying what is missing."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or CUDA libraries failing to load
        raise RuntimeError(
            f"the 'cupy' backend needs CuPy, which could not be imported ({type(exc).__name__}: {exc}). "
            f"Install the GPU extra on a machine with an NVIDIA GPU: {INSTALL_HINT} "
            "(CuPy for CUDA 12, cupy-cuda12x), or use --backend numpy."
        ) from exc
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no device, driver too old
        raise RuntimeError(
            f"the 'cupy' backend found CuPy but no usable CUDA device ({type(exc).__name__}: {exc}). "
            "It needs an NVIDIA GPU with a working driver (check nvidia-smi); "
            f"install with {INSTALL_HINT}, or use --backend numpy."
        ) from exc
    if n < 1:
        raise RuntimeError(
            "the 'cupy' backend found CuPy but no CUDA device is visible (getDeviceCount() == 0; "
            "check CUDA_VISIBLE_DEVICES and nvidia-smi), or use --backend numpy."
        )
    return cupy


def check_available():
    """Raise RuntimeError (what is missing, how to install) unless CuPy and a CUDA device
    are usable; a training loop can call it before any work."""
    require_cupy()


_KERNELS = {}


def _kernels(cupy):
    if "device" not in _KERNELS:
        from ._cupy_kernels import DeviceKernels

        _KERNELS["device"] = DeviceKernels(cupy)
    return _KERNELS["device"]


def _to_device(cupy, *arrays):
    return tuple(None if a is None else cupy.asarray(a) for a in arrays)


def _params_to_device(cupy, params):
    return tuple(type(p)(*(cupy.asarray(a) for a in p)) for p in params)


def device_rng(seed, step=0):
    """A device generator (cuRAND Philox) seeded from (seed, step), for :func:`sample_tasks`."""
    cupy = require_cupy()
    draw = DeviceDraw(cupy)
    draw.reseed(seed_for(seed, step))
    return draw


def sample_tasks(rng, B, d, N, d_y=1, *, x_range=(-0.5, 0.5), w_scale=1.0, noise_std=0.0,
                 n_distractors=0, dtype=np.float64):
    """B regression tasks as device arrays.

    ``rng`` a numpy.random.Generator: the reference's draws (identical tasks to the
    NumPy backend), copied to the device. ``rng`` from :func:`device_rng`: drawn on
    the device (different draws, same distribution)."""
    cupy = require_cupy()
    if isinstance(rng, np.random.Generator):
        return reference_sample_tasks(rng, B, d, N, d_y, x_range=x_range, w_scale=w_scale, noise_std=noise_std,
                                      n_distractors=n_distractors, dtype=dtype, xp=cupy)
    if not isinstance(rng, DeviceDraw):
        raise TypeError("rng must be a numpy.random.Generator or a device generator from "
                        f"cupy_backend.device_rng(seed, step), got {type(rng).__name__}")
    spec = TaskSpec(d=d, N=N, d_y=d_y, B=B, x_range=tuple(x_range), w_scale=w_scale, noise_std=noise_std,
                    n_distractors=n_distractors)
    return device_tokens(rng, spec, spec.B, np.dtype(dtype), cupy)[2]


def _check_inputs(E, params, arch):
    """The reference's checks (``model.check_model_inputs``: same exceptions and
    messages), on host or device arrays."""
    stack = lsa_stack_of(arch, NAME)
    check_model_inputs(E, params, arch)
    return stack


def model_forward(E, params, arch):
    """The K layers on tokens E (B, T, D). Returns (out (B, T, D) on the device, None)."""
    cupy = require_cupy()
    stack = _check_inputs(E, params, arch)
    (E,) = _to_device(cupy, E)
    params = _params_to_device(cupy, params)
    if stack.causal:
        out, _ = reference_model_forward(E, params, arch)
        return out, None
    out, _, _ = _cupy_lsa.model_forward(E, params, stack, cupy)
    return out, None


def loss_and_grads(E, y_q, params, arch, layout):
    """Loss and gradients, like ``reference.model.loss_and_grads``: (L 0-d device array,
    dparams, aux dict(pred, dE)), all on the device."""
    cupy = require_cupy()
    lsa_stack_of(arch, NAME)
    d = check_loss_inputs(E, y_q, params, arch, layout).d
    E, y_q = _to_device(cupy, E, y_q)
    params = _params_to_device(cupy, params)
    engine = FusedEngine(arch, _hp_default(), np.dtype(E.dtype), cupy, _kernels(cupy))
    L, grads, pred, dE = engine.loss_and_grads(E, y_q, params, d, need_dE=True)
    return L, grads, {"pred": pred, "dE": dE}


def _hp_default():
    from ..optim import AdamHP

    return AdamHP()


_ENGINES = {}


def train_step(params, state, tasks, arch, hp):
    """One clipped Adam step on ``tasks`` (host or device arrays), like
    ``reference.train_step.train_step`` (its checks first). Loss and grad_norm are 0-d
    device arrays."""
    cupy = require_cupy()
    lsa_stack_of(arch, NAME)
    layout, dtype = check_step_inputs(params, state, tasks, arch, hp)
    key = (arch, hp, dtype)
    if key not in _ENGINES:
        _ENGINES.clear()   # one engine at a time: it caches the last flat vectors
        _ENGINES[key] = FusedEngine(arch, hp, dtype, cupy, _kernels(cupy))
    E, y_q = tokens_of(tasks, cupy, dtype)
    return _ENGINES[key].update(params, state, E, y_q, layout.d)


def make_stepper(arch, hp, spec, seed, dtype=np.float32):
    """A stepper (``.step(params, state, step)``, ``.step_on(params, state, tasks)``,
    ``.sample(step)``) running on the current CUDA device."""
    cupy = require_cupy()
    return FusedStepper(arch, hp, spec, seed, dtype, cupy, _kernels(cupy), DeviceDraw(cupy))


__all__ = ["NAME", "HOST_ARRAYS", "supports", "INSTALL_HINT", "require_cupy", "check_available", "device_rng", "sample_tasks", "loss_and_grads",
           "model_forward", "train_step", "make_stepper"]
