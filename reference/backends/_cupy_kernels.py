"""The CuPy backend's hand-written CUDA kernels, and their NumPy twins.

Three small kernels replace chains of elementwise CuPy calls in the training step:

* ``adam``: one ElementwiseKernel over the flat vector of ALL parameters, doing the
  global-norm clip and the bias-corrected Adam update of ``reference/optim.py`` in one
  pass (p, g, m, v in; p', m', v' out);
* ``l2norm``: one ReductionKernel, sqrt(sum g^2) over the flat gradient (the global
  norm of ``reference.optim.global_norm``), left on the device;
* ``half_mean_sumsq``: one ReductionKernel, 0.5 / B * sum err^2 (the loss of
  ``reference.model.loss_forward``).

Each kernel has a NumPy twin (:class:`HostKernels`) with the same signature that
evaluates the same expressions in the same order and precision. The CPU tests drive
the CuPy backend's step code with the twins and compare it with the reference; only
the CUDA C bodies below are left to the GPU tests (``pytest -m gpu``).

STATUS: the CUDA bodies were written without access to a GPU and have not been
compiled or run yet; ``tests/test_cupy_backend.py`` (marked ``gpu``) checks them
against the NumPy reference on a device.

Adam, per entry (clip <= 0 means no clipping; c1 = 1 - b1^t, c2 = 1 - b2^t):

    s  = clip / |g|  if 0 < clip < |g|  else 1         (|g| = global norm)
    gs = g * s
    m' = b1 m + (1 - b1) gs
    v' = b2 v + (1 - b2) gs gs
    p' = p - lr (m' / c1) / (sqrt(v' / c2) + eps)
"""

import numpy as np

_ADAM_IN = ("T p, T g, T m, T v, raw T gnorm, float64 clip, float64 lr, float64 b1, "
            "float64 b2, float64 eps, float64 c1, float64 c2")
_ADAM_OUT = "T p_out, T m_out, T v_out"
_ADAM_BODY = """
    T s = (T)1;
    if (clip > 0.0) {
        double n = (double)gnorm[0];
        if (n > clip) { s = (T)(clip / n); }
    }
    T gs = g * s;
    T m1 = (T)b1 * m + (T)(1.0 - b1) * gs;
    T v1 = (T)b2 * v + (T)(1.0 - b2) * gs * gs;
    p_out = p - (T)lr * (m1 / (T)c1) / (sqrt(v1 / (T)c2) + (T)eps);
    m_out = m1;
    v_out = v1;
"""


class DeviceKernels:
    """The CUDA kernels, compiled by CuPy on first use (needs CuPy and a GPU)."""

    def __init__(self, cupy):
        self.xp = cupy
        self._adam = cupy.ElementwiseKernel(_ADAM_IN, _ADAM_OUT, _ADAM_BODY, "icgd_adam_clip")
        self._l2norm = cupy.ReductionKernel("T x", "T y", "x * x", "a + b", "y = sqrt(a)", "0",
                                            "icgd_l2norm")
        self._half_mean_sumsq = cupy.ReductionKernel("T x, float64 scale", "T y", "x * x", "a + b",
                                                     "y = (T)(a * scale)", "0", "icgd_half_mean_sumsq")

    def adam(self, p, g, m, v, gnorm, clip, lr, b1, b2, eps, c1, c2):
        """(p', m', v'): one clipped Adam step over flat arrays; ``gnorm`` a 0-d device array."""
        return self._adam(p, g, m, v, gnorm.reshape(1), float(clip), float(lr), float(b1), float(b2),
                          float(eps), float(c1), float(c2))

    def l2norm(self, x):
        """sqrt(sum x^2) as a 0-d device array (no host sync)."""
        return self._l2norm(x)

    def half_mean_sumsq(self, err):
        """0.5 * sum(err^2) / err.shape[0] as a 0-d device array (the loss)."""
        return self._half_mean_sumsq(err, 0.5 / err.shape[0])


class HostKernels:
    """NumPy twins of :class:`DeviceKernels`: the same expressions, in the same order and
    dtype, so the step code around the kernels can be tested on the CPU."""

    xp = np

    def adam(self, p, g, m, v, gnorm, clip, lr, b1, b2, eps, c1, c2):
        T = p.dtype.type
        s = T(1)
        n = float(gnorm)
        if clip > 0.0 and n > clip:
            s = T(clip / n)
        gs = g * s
        m1 = T(b1) * m + T(1.0 - b1) * gs
        v1 = T(b2) * v + T(1.0 - b2) * gs * gs
        p1 = p - T(lr) * (m1 / T(c1)) / (np.sqrt(v1 / T(c2)) + T(eps))
        return p1, m1, v1

    def l2norm(self, x):
        return np.sqrt(np.sum(x * x))

    def half_mean_sumsq(self, err):
        return np.asarray(np.sum(err * err) * (0.5 / err.shape[0]), dtype=err.dtype)
