"""Sequence tasks of the mesa-optimization paper (von Oswald et al. 2023b, arXiv
2309.05858, Sec. 2-4 and App.; the official code's data generators): linear dynamical
systems, their constructed tokens, the readout and the sequence loss with its backward.

This is the readable spec of the data and the token layouts; the causal constructions
that act on these tokens live in ``reference/causal_constructions.py``.

**Data** (per sequence b, all draws float64 from one ``numpy.random.Generator``, in the
order of :func:`sample_sequences`):

    W        Haar-random orthogonal (d x d): Q of the QR of a Gaussian matrix, columns
             multiplied by sign(diag(R)) (without the sign fix Q is not Haar)
    h_1      ~ U(-r, r)^d                                   (r = 1; nonlinear: 0.25)
    h_{t+1}  = clip(W f(h_t) + sigma eps_t, -c, c)           (sigma = 0.01, c = 10)
    o_t      = C h_t + sigma_o nu_t                           (fully observed: C = I, sigma_o = 0)

for t = 1 .. T (T + 1 states). Inputs x_t = o_t and targets y_t = o_{t+1}, t = 1 .. T:
**token t predicts the next observation**. Variants (paper-settings 8b): ``partial``
(d = 15 hidden, 5 observed, C = 0.5 N(0, 1) per sequence, sigma_o = 0.01); ``nonlinear``
(f(h) = g(h) / ||g(h)||, g(h) = B^T gelu(A^T h) with A (d x 40), B (40 x d) drawn once
as 1.1 N(0, 1) from ``default_rng([mlp_seed, STREAM_NONLINEAR])``, h_1 ~ U(-0.25, 0.25),
no clipping); ``contracting`` (W = U diag(lam) U^{-1}, U ~ N(0, 1), lam = d - 1 values
U(0.3, 0.9) and one 0.9, randomly permuted; c = 2); ``fixed`` (one Haar W for every
sequence, drawn from ``default_rng([teacher_seed, STREAM_FIXED_TEACHER])``).

**Tokens** (0-based time t = 0 .. T-1 in the arrays, x_{-1} = 0):

    spec layout, width 3d:   e_t = [p_t, x_t, x_{t-1}],   p_t = Phi_0 x_t (0 by default)
    code layout, width 4d:   e_t = [0, x_t, x_t, x_{t-1}]   (the official constructed tokens)

The prediction for y_t is read **with a plus sign** from the first d channels of token t
after the last layer: y_hat_t = E_K[:, t, :d]. The code's one-layer models mask the first
2d input channels (:func:`mask_forward`: zero them, so a layer sees [0, 0, x_t, x_{t-1}]).

**Loss** (the code's): L = (1 / (B T)) sum_{b, t} 1/2 ||y_hat_t - y_t||^2 (summed over the
d channels, averaged over batch and time); per-time-step losses l_t = (1/B) sum_b 1/2 ||.||^2,
so L = mean_t l_t.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._checks import check_data, check_dout, check_dtype, check_float, check_int, check_same_dtype
from .layers.mlp import gelu
from .tasks import stream_rng

# Streams of the fixed objects (far from any step index, distinct from tasks.py's tags).
STREAM_NONLINEAR, STREAM_FIXED_TEACHER = 2 ** 32 - 101, 2 ** 32 - 102

VARIANTS = ("linear", "partial", "nonlinear", "contracting", "fixed")
# Paper defaults per variant: (d_hidden, d_obs, init_range, clip, obs_noise_std)
_DEFAULTS = {"linear": (10, 10, 1.0, 10.0, 0.0), "partial": (15, 5, 1.0, 10.0, 0.01),
             "nonlinear": (10, 10, 0.25, None, 0.0), "contracting": (10, 10, 1.0, 2.0, 0.0),
             "fixed": (10, 10, 1.0, 10.0, 0.0)}
NONLINEAR_WIDTH = 40


class Sequences(NamedTuple):
    X: object   # (B, T, d_obs)     inputs x_t = o_t
    Y: object   # (B, T, d_obs)     targets y_t = o_{t+1}
    H: object   # (B, T + 1, d)     hidden states h_1 .. h_{T+1}
    W: object   # (B, d, d)         transition matrix of each sequence
    C: object   # (B, d_obs, d)     observation matrix (identity when fully observed)


def haar_orthogonal(rng, B, d):
    """B Haar-random orthogonal (d x d) matrices: QR of a Gaussian, columns of Q times
    sign(diag(R)) (Mezzadri 2007). Returns (B, d, d) float64."""
    G = rng.standard_normal((B, d, d))                                 # (B, d, d)
    Q, Rm = np.linalg.qr(G)                                            # (B, d, d) each
    s = np.sign(np.diagonal(Rm, axis1=1, axis2=2))                     # (B, d)
    s[s == 0] = 1.0
    return Q * s[:, None, :]                                           # column j times s_j


def nonlinear_mlp(seed=0, d=10, width=NONLINEAR_WIDTH):
    """The fixed MLP of the nonlinear variant: (A (d, width), B (width, d)), 1.1 N(0, 1) each."""
    rng = stream_rng(seed, STREAM_NONLINEAR, d, width)
    A = 1.1 * rng.standard_normal((d, width))
    Bm = 1.1 * rng.standard_normal((width, d))
    return A, Bm


def nonlinear_features(h, A, Bm):
    """f(h) = g / ||g||, g = gelu(h A) B (tanh GELU), rows of h (..., d) -> (..., d)."""
    g = gelu(h @ A) @ Bm                                               # (..., d)
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def _contracting(rng, B, d):
    U = rng.standard_normal((B, d, d))                                 # (B, d, d)
    lam = np.concatenate([rng.uniform(0.3, 0.9, (B, d - 1)), np.full((B, 1), 0.9)], axis=1)
    lam = rng.permuted(lam, axis=1)                                    # (B, d)
    # W = U diag(lam) U^{-1}: solve U^T W^T = (U diag(lam))^T
    return np.swapaxes(np.linalg.solve(np.swapaxes(U, 1, 2), np.swapaxes(U * lam[:, None, :], 1, 2)), 1, 2)


@dataclass(frozen=True)
class SequenceSpec:
    """What sequences a run draws. ``None`` fields take the variant's paper default
    (``_DEFAULTS``); ``clip`` None after that means no clipping."""

    variant: str = "linear"
    T: int = 50
    B: int = 256
    d: int = None              # hidden dimension
    d_obs: int = None          # observed dimension (d unless partial)
    init_range: float = None   # h_1 ~ U(-init_range, init_range)
    noise_std: float = 0.01
    obs_noise_std: float = None
    clip: float = None
    mlp_seed: int = 0          # nonlinear: seed of the fixed MLP
    teacher_seed: int = 0      # fixed: seed of the shared W

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        d, d_obs, r, c, so = _DEFAULTS[self.variant]
        fill = {"d": d, "d_obs": d_obs if self.variant == "partial" else None, "init_range": r,
                "obs_noise_std": so}
        for k, v in fill.items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        if self.d_obs is None:
            object.__setattr__(self, "d_obs", self.d)
        if self.clip is None and self.variant != "nonlinear":
            object.__setattr__(self, "clip", c)
        check_int("T", self.T, 1)
        check_int("B", self.B, 1)
        check_int("d", self.d, 1 if self.variant != "contracting" else 2)
        check_int("d_obs", self.d_obs, 1)
        if self.variant != "partial" and self.d_obs != self.d:
            raise ValueError(f"d_obs must equal d={self.d} unless variant is 'partial', got d_obs={self.d_obs}")
        check_float("init_range", self.init_range, 0.0, allow_equal_min=False)
        check_float("noise_std", self.noise_std, 0.0)
        check_float("obs_noise_std", self.obs_noise_std, 0.0)
        if self.clip is not None:
            check_float("clip", self.clip, 0.0, allow_equal_min=False)
        check_int("mlp_seed", self.mlp_seed, 0)
        check_int("teacher_seed", self.teacher_seed, 0)

    def sample(self, rng, B=None, dtype=np.float64):
        return sample_sequences(rng, self, self.B if B is None else B, dtype=dtype)


def sample_sequences(rng, spec, B, dtype=np.float64):
    """Draw B sequences of ``spec`` (a :class:`SequenceSpec`). Draw order: W (not for
    ``fixed``), h_1, the state noise (B, T, d), C (partial), the observation noise
    (B, T + 1, d_obs) when obs_noise_std > 0. Returns :class:`Sequences` in ``dtype``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)), "
                        f"got {type(rng).__name__}")
    if not isinstance(spec, SequenceSpec):
        raise TypeError(f"spec must be a SequenceSpec, got {type(spec).__name__}")
    B = check_int("B", B, 1)
    dtype = check_dtype("dtype", dtype)
    d, T, v = spec.d, spec.T, spec.variant
    if v == "fixed":
        W = np.broadcast_to(haar_orthogonal(stream_rng(spec.teacher_seed, STREAM_FIXED_TEACHER, d), 1, d), (B, d, d))
    elif v == "contracting":
        W = _contracting(rng, B, d)
    else:
        W = haar_orthogonal(rng, B, d)                                 # (B, d, d)
    h = rng.uniform(-spec.init_range, spec.init_range, (B, d))         # (B, d)
    eps = rng.standard_normal((B, T, d))                               # (B, T, d)
    mlp = nonlinear_mlp(spec.mlp_seed, d) if v == "nonlinear" else None
    H = np.empty((B, T + 1, d))                                        # (B, T+1, d)
    H[:, 0] = h
    for t in range(T):
        f = h if mlp is None else nonlinear_features(h, *mlp)
        h = np.einsum("bij,bj->bi", W, f) + spec.noise_std * eps[:, t]
        if spec.clip is not None:
            h = np.clip(h, -spec.clip, spec.clip)
        H[:, t + 1] = h
    if v == "partial":
        C = 0.5 * rng.standard_normal((B, spec.d_obs, d))              # (B, d_obs, d)
    else:
        C = np.broadcast_to(np.eye(d), (B, d, d))
    O = np.einsum("bij,btj->bti", C, H)                                # (B, T+1, d_obs)
    if spec.obs_noise_std > 0:
        O = O + spec.obs_noise_std * rng.standard_normal(O.shape)
    return Sequences(*(np.ascontiguousarray(a).astype(dtype) for a in (O[:, :T], O[:, 1:], H, W, C)))


# --------------------------------------------------------------------------------
# Tokens and readout
# --------------------------------------------------------------------------------

def check_inputs(X, name="X"):
    """X (B, T, d): float32/float64 sequence inputs, finite, within the data limit."""
    check_data(name, X, dims=("B", "T", "d"), allow_complex=False)
    return X.shape


def shifted(X):
    """x_{t-1} for every t, with x_{-1} = 0: (B, T, d) -> (B, T, d)."""
    S = np.zeros_like(X)
    S[:, 1:] = X[:, :-1]
    return S


def seq_tokens(X, Phi_0=None):
    """The spec layout e_t = [Phi_0 x_t, x_t, x_{t-1}] (B, T, 3d); Phi_0 (d, d), default 0."""
    B, T, d = check_inputs(X)
    E = np.zeros((B, T, 3 * d), dtype=X.dtype)                          # (B, T, 3d)
    if Phi_0 is not None:
        check_phi0(Phi_0, d, X.dtype)
        E[:, :, :d] = X @ Phi_0.T.astype(X.dtype)
    E[:, :, d:2 * d] = X
    E[:, :, 2 * d:] = shifted(X)
    return E


def code_tokens(X):
    """The official code's constructed layout e_t = [0, x_t, x_t, x_{t-1}] (B, T, 4d)."""
    B, T, d = check_inputs(X)
    E = np.zeros((B, T, 4 * d), dtype=X.dtype)                          # (B, T, 4d)
    E[:, :, d:2 * d] = X
    E[:, :, 2 * d:3 * d] = X
    E[:, :, 3 * d:] = shifted(X)
    return E


def check_phi0(Phi_0, d, dtype):
    if not isinstance(Phi_0, np.ndarray):
        raise TypeError(f"Phi_0 must be a NumPy array ({d}, {d}), got {type(Phi_0).__name__}")
    check_data("Phi_0", Phi_0, shape=(d, d), allow_complex=False)
    return Phi_0


def mask_forward(E, n_masked):
    """The code's input masking: the first ``n_masked`` channels set to 0. Returns (out, n_masked)."""
    check_data("E", E, dims=("B", "T", "D"))
    n = check_int("n_masked", n_masked, 0, E.shape[2])
    out = E.copy()
    out[:, :, :n] = 0
    return out, n


def mask_backward(dout, n_masked):
    """forward: out = E with channels < n set to 0, so dE = dout with those channels 0."""
    dE = dout.copy()
    dE[:, :, :n_masked] = 0
    return dE


def seq_readout(E_out, d):
    """y_hat_t = E_out[:, t, :d] for every t (plus sign): (B, T, D) -> (B, T, d)."""
    check_data("E_out", E_out, dims=("B", "T", "D"))
    d = check_int("d", d, 1, E_out.shape[2])
    return E_out[:, :, :d]


def seq_readout_backward(dpred, E_shape):
    """forward: pred = E_out[..., :d], so dE_out = dpred in the first d channels, 0 elsewhere."""
    dE = np.zeros(E_shape, dtype=dpred.dtype)
    dE[:, :, :dpred.shape[2]] = dpred
    return dE


# --------------------------------------------------------------------------------
# The sequence loss
# --------------------------------------------------------------------------------

class SeqLossCache(NamedTuple):
    err: object   # (B, T, d)  y_hat - y


def seq_loss_forward(pred, Y):
    """L = (1/(B T)) sum_{b,t} 1/2 ||pred - y||^2 and the per-time-step losses l (T,),
    l_t = (1/B) sum_b 1/2 ||pred_t - y_t||^2. Returns (L, l, cache)."""
    check_data("pred", pred, dims=("B", "T", "d"), allow_complex=True)
    check_data("Y", Y, shape=tuple(pred.shape), allow_complex=False)
    check_same_dtype(pred=pred.real, Y=Y)
    err = pred - Y                                                      # (B, T, d)
    half = err.real.dtype.type(0.5)
    per_t = (err * err).sum(axis=2).mean(axis=0) * half                 # (T,)
    return per_t.mean(), per_t, SeqLossCache(err)


def seq_loss_backward(cache, dL=1.0):
    """forward: L = mean_{b,t} 1/2 ||err||^2, so dpred = dL err / (B T)."""
    B, T, _ = cache.err.shape
    return dL * cache.err / (B * T)                                     # (B, T, d)


def seq_loss_and_grads(E, Y, params, arch, d=None, mask=0):
    """Loss of a model (``reference.model``: params, arch) on sequence tokens E (B, T, D)
    against targets Y (B, T, d), reading the first d channels; ``mask``: input channels
    zeroed before the first layer (the code's one-layer masking, 2d). Returns
    (L, dparams, aux) with aux = dict(pred, per_t, dE)."""
    from .model import model_backward, model_forward

    d, Em, n = check_seq_loss_inputs(E, Y, params, arch, d, mask)
    out, mcache = model_forward(Em, params, arch)
    pred = out[:, :, :d]                                                # (B, T, d)
    L, per_t, lcache = seq_loss_forward(pred, Y)
    # backward: loss -> readout -> layers in reverse -> mask
    dout = seq_readout_backward(seq_loss_backward(lcache), out.shape)
    dEm, dparams = model_backward(dout, mcache)
    return L, dparams, {"pred": pred, "per_t": per_t, "dE": mask_backward(dEm, n)}


def check_seq_loss_inputs(E, Y, params, arch, d=None, mask=0):
    """What :func:`seq_loss_and_grads` refuses before any work (every backend's sequence
    loss runs it): E (B, T, D), Y (B, T, d) of one dtype, d <= D, the mask, the model's
    inputs. Returns (d, the masked tokens, the number of masked channels)."""
    from .model import check_model_inputs

    check_data("E", E, dims=("B", "T", "D"))
    check_data("Y", Y, dims=("B", "T", "d"))
    if Y.shape[:2] != E.shape[:2]:
        raise ValueError(f"Y must have shape ({E.shape[0]}, {E.shape[1]}, d) to match E, got {tuple(Y.shape)}")
    d = Y.shape[2] if d is None else check_int("d", d, 1)
    if d != Y.shape[2] or d > E.shape[2]:
        raise ValueError(f"d must equal Y's width {Y.shape[2]} and be <= E's width {E.shape[2]}, got {d}")
    check_same_dtype(E=E, Y=Y)
    Em, n = mask_forward(E, mask)
    check_model_inputs(Em, params, arch)
    return d, Em, n


def check_targets(X, Y):
    """X, Y (B, T, d) of one shape and dtype."""
    check_inputs(X)
    check_data("Y", Y, shape=tuple(X.shape), allow_complex=False)
    check_same_dtype(X=X, Y=Y)


__all__ = ["Sequences", "SequenceSpec", "VARIANTS", "sample_sequences", "haar_orthogonal", "nonlinear_mlp",
           "nonlinear_features", "seq_tokens", "code_tokens", "shifted", "mask_forward", "mask_backward",
           "seq_readout", "seq_readout_backward", "seq_loss_forward", "seq_loss_backward", "seq_loss_and_grads",
           "check_seq_loss_inputs",
           "check_dout"]
