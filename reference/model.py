"""A stack of K LSA layers, its readout and loss: forward and hand-written backward.

Architecture (:class:`Arch`): K layers, recurrent (one weight-tied layer applied K
times) or separate (K layers with their own weights); context-only or causal
attention; optional token clipping after every layer (the official code clips to
[-10, 10] when K > 3).

Loss (official code; the paper's Eq. 5 drops the 1/2):

    L = 0.5 * mean_b || y_hat_b - y_q,b ||^2,   y_hat = -E_K[:, N, d:]

(squared error summed over the d_y label dims, averaged over the B tasks).
The model backward walks the layers in reverse; for a recurrent stack the gradients
of the K applications of the shared layer are summed.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

from ._checks import check_array, check_float, check_int
from .lsa import LSAParams, MergedParams, lsa_backward, lsa_forward
from .tokens import readout, readout_backward


@dataclass(frozen=True)
class Arch:
    """How the layers are stacked. ``n_layers`` = K."""

    n_layers: int = 1
    recurrent: bool = False
    causal: bool = False
    clip: Optional[float] = None

    def __post_init__(self):
        check_int("n_layers", self.n_layers, 1)
        if not isinstance(self.recurrent, bool):
            raise TypeError(f"recurrent must be a bool, got {self.recurrent!r}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        if self.clip is not None:
            check_float("clip", self.clip, 0.0, allow_equal_min=False)

    @property
    def n_param_layers(self):
        """How many distinct layer parameter sets the model has (1 if recurrent)."""
        return 1 if self.recurrent else self.n_layers

    def layer_index(self, k):
        """Index into the params tuple used by layer k (0-based)."""
        return 0 if self.recurrent else k


class ModelCache(NamedTuple):
    layer_caches: list   # K LSACache
    outputs: list        # K arrays (B, T, D): tokens after each layer
    arch: Arch


def _check_model_params(params, arch):
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    if not isinstance(params, (tuple, list)):
        raise TypeError("params must be a tuple of per-layer LSAParams/MergedParams, "
                        f"got {type(params).__name__}")
    if len(params) != arch.n_param_layers:
        kind = "recurrent" if arch.recurrent else "separate"
        raise ValueError(f"params must hold {arch.n_param_layers} layer(s) for a {kind} "
                         f"stack of K={arch.n_layers}, got {len(params)}")
    for p in params:
        if not isinstance(p, (LSAParams, MergedParams)):
            raise TypeError(f"each layer's params must be LSAParams or MergedParams, got {type(p).__name__}")


def model_forward(E, params, arch):
    """Apply the K layers to tokens E (B, T, D). Returns (E_K (B, T, D), cache)."""
    _check_model_params(params, arch)
    caches, outputs = [], []
    h = E
    for k in range(arch.n_layers):
        h, c = lsa_forward(h, params[arch.layer_index(k)], causal=arch.causal, clip=arch.clip)
        caches.append(c)
        outputs.append(h)
    return h, ModelCache(caches, outputs, arch)


def model_backward(dout, cache):
    """Backward of :func:`model_forward`, walking the layers in reverse.
    Returns (dE (B, T, D), dparams tuple matching params)."""
    arch = cache.arch
    grads = [None] * arch.n_param_layers
    dh = dout
    for k in reversed(range(arch.n_layers)):
        dh, g = lsa_backward(dh, cache.layer_caches[k])
        i = arch.layer_index(k)
        grads[i] = g if grads[i] is None else type(g)(*(a + b for a, b in zip(grads[i], g)))
    return dh, tuple(grads)


def layer_predictions(cache, d):
    """Readout after every layer: list of K arrays (B, d_y)."""
    return [readout(h, d) for h in cache.outputs]


def predict(E, params, arch, d):
    """Prediction y_hat (B, d_y) of the model for tokens E."""
    out, _ = model_forward(E, params, arch)
    return readout(out, d)


class LossCache(NamedTuple):
    err: object  # (B, d_y) y_hat - y_q


def loss_forward(pred, y_q):
    """L = 0.5 * mean over tasks of ||pred - y_q||^2. Returns (L (0-d array), cache)."""
    check_array("pred", pred, ndim=2)
    check_array("y_q", y_q, shape=tuple(pred.shape))
    err = pred - y_q                                                   # (B, d_y)
    L = (err * err).sum(axis=1).mean() * err.dtype.type(0.5)          # typed 0.5: float32 stays float32 on NumPy 1.x too
    return L, LossCache(err)


def loss_backward(cache, dL=1.0):
    """Backward of :func:`loss_forward`: dpred = dL * err / B."""
    return dL * cache.err / cache.err.shape[0]                         # (B, d_y)


def loss_and_grads(E, y_q, params, arch, d):
    """Loss of the model on tokens E against targets y_q, and its gradients.

    Returns (L, dparams, aux) with aux = dict(pred=y_hat, dE=dL/dE).
    """
    out, mcache = model_forward(E, params, arch)
    pred = readout(out, d)                                             # (B, d_y)
    L, lcache = loss_forward(pred, y_q)
    # backward: loss -> readout -> layers in reverse
    dpred = loss_backward(lcache)
    dout = readout_backward(dpred, out.shape, d)
    dE, dparams = model_backward(dout, mcache)
    return L, dparams, {"pred": pred, "dE": dE}
