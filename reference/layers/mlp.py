"""The residual MLP block and GELU: forward and hand-written backward.

The readable spec (no fast backend runs it); tested against the loop oracle
``reference.oracle.oracle_mlp_layer`` and complex-step derivatives. Registered as layer
kind ``"mlp"`` (:class:`MLP`).

Equation (the official code's ``MLP`` module, one hidden layer, and its residual use
``e <- e + MLP(e)``), for every token e (D,):

    h   = W_1 e + b_1                 (w,)     W_1 (w, D), b_1 (w,)
    a   = gelu(h)                     (w,)
    out = clip(e + W_2 a + b_2)       (D,)     W_2 (D, w), b_2 (D,)

* ``width`` w defaults to 4 D (the official widening factor 4); ``bias`` (default True,
  as the sine experiment's MLP) adds b_1 and b_2 (``bias=False``: the same function with
  both biases 0 and no bias parameters); ``clip`` clips after the residual, as the
  official code does after the MLP block.
* GELU. ``gelu="tanh"`` (default) is the tanh approximation

      gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

  which is what ``jax.nn.gelu`` computes by default (``approximate=True``), hence what
  the official code ran. ``gelu="erf"`` is the exact form 0.5 x (1 + erf(x / sqrt 2)),
  with :func:`erf` written here (NumPy has none): the series
  erf(z) = (2/sqrt(pi)) exp(-z^2) sum_n 2^n z^(2n+1) / (1 * 3 * ... * (2n+1)), whose
  terms are all positive for real z (no cancellation), summed until the next term is
  below half an ulp of the sum; |Re z| > 6 gives +-1 (erfc(6) < 1e-16). It is a
  polynomial times exp, so analytic, and complex-step differentiation applies.
  Accuracy (tested against ``math.erf`` on a grid): absolute error <= 4e-15 in
  float64, <= 2e-6 in float32. The tanh form differs from the exact GELU by at most
  about 5e-4 (tested).
* Both GELUs saturate for |Re x| > 10: gelu(x) = x above, 0 below (the neglected
  terms are below 1e-20 relative), so neither x^3 nor tanh can overflow.
* Derivatives, used by the backward (analytic, exact):
  tanh form: 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(...);
  erf form: Phi(x) + x phi(x) = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi).
"""

import math
from typing import NamedTuple

import numpy as np

from .._checks import check_all_finite, check_array, check_data, check_dout, check_float, check_int, check_same_dtype
from ..xp import get_xp
from . import LayerType
from .initializers import variance_scaling, zeros
from .lsa import clip_backward, clip_tokens

GELU_FORMS = ("tanh", "erf")
GELU_SATURATION = 10.0           # |Re x| beyond which gelu(x) is x (x > 0) or 0 (x < 0)
ERF_SATURATION = 6.0             # |Re z| beyond which erf(z) is +-1
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---- GELU and erf ---------------------------------------------------------------------

def erf(z):
    """The error function of a float or complex array (see the module docstring)."""
    xp = get_xp(z)
    r = z.real
    inside = abs(r) <= ERF_SATURATION
    zi = xp.where(inside, z, 0.0)                                      # the series runs on |Re z| <= 6 only
    w = zi * zi
    term = zi                                                          # n = 0 term: z
    total = zi
    eps = float(np.finfo(r.dtype).eps)
    n = 0
    while True:
        term = term * (2.0 * w) / (2 * n + 3)                          # term_{n+1} = term_n 2 z^2 / (2n + 3)
        total = total + term
        n += 1
        if not bool((abs(term) > 0.5 * eps * abs(total)).any()):
            break
    series = _TWO_OVER_SQRT_PI * xp.exp(-w) * total
    sign = xp.where(r > 0, 1.0, -1.0).astype(z.dtype)
    return xp.where(inside, series, sign)


def gelu(x, form="tanh"):
    """GELU of a float or complex array: ``form`` "tanh" (jax.nn.gelu's default) or "erf"."""
    xp = get_xp(x)
    r = x.real
    inside = abs(r) <= GELU_SATURATION
    xi = xp.where(inside, x, 0.0)                                      # formulas on |Re x| <= 10 only
    if form == "tanh":
        g = 0.5 * xi * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (xi + _TANH_CUBIC * xi * xi * xi)))
    else:
        g = 0.5 * xi * (1.0 + erf(xi * _INV_SQRT_2))
    return xp.where(inside, g, xp.where(r > 0, x, 0.0 * x))


def gelu_grad(x, form="tanh"):
    """d gelu(x) / dx, elementwise (see the module docstring)."""
    xp = get_xp(x)
    r = x.real
    inside = abs(r) <= GELU_SATURATION
    xi = xp.where(inside, x, 0.0)
    if form == "tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (xi + _TANH_CUBIC * xi * xi * xi))
        g = 0.5 * (1.0 + t) + 0.5 * xi * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * xi * xi)
    else:
        g = 0.5 * (1.0 + erf(xi * _INV_SQRT_2)) + xi * xp.exp(-0.5 * xi * xi) * _INV_SQRT_2PI
    one = xp.ones_like(x)
    return xp.where(inside, g, xp.where(r > 0, one, 0.0 * one))


# ---- the layer ------------------------------------------------------------------------

class MLPParams(NamedTuple):
    W_1: object  # (w, D)
    b_1: object  # (w,)
    W_2: object  # (D, w)
    b_2: object  # (D,)


class MLPNoBiasParams(NamedTuple):
    W_1: object  # (w, D)
    W_2: object  # (D, w)


class MLPCache(NamedTuple):
    E: object       # (B, T, D)  layer input
    h: object       # (B, T, w)  hidden pre-activations
    a: object       # (B, T, w)  gelu(h)
    pre: object     # (B, T, D)  residual output before clipping
    params: object
    gelu: str
    clip: object


def mlp_forward(E, params, *, gelu_form="tanh", clip=None):
    """Apply the residual MLP block. Returns (out (B, T, D), cache)."""
    check_mlp_inputs(E, params, gelu_form, clip)
    xp = get_xp(E, *params)
    bias = isinstance(params, MLPParams)
    h = xp.matmul(E, params.W_1.T)                                     # (B, T, w)
    if bias:
        h = h + params.b_1
    a = gelu(h, gelu_form)                                             # (B, T, w)
    delta = xp.matmul(a, params.W_2.T)                                 # (B, T, D)
    if bias:
        delta = delta + params.b_2
    pre = E + delta                                                    # (B, T, D)
    out = pre if clip is None else clip_tokens(pre, clip)
    return out, MLPCache(E, h, a, pre, params, gelu_form, clip)


def mlp_backward(dout, cache):
    """Backward of :func:`mlp_forward`: (dE (B, T, D), gradients of the params' type)."""
    if not isinstance(cache, MLPCache):
        raise TypeError(f"cache must be the MLPCache that mlp_forward returned, got {type(cache).__name__}")
    check_dout(dout, cache.pre.shape, cache.pre.dtype)
    E, h, a, pre, params, gelu_form, clip = cache
    xp = get_xp(dout, E)
    # forward: out = clip(pre), so dpre = dout where -c <= pre <= c, else 0
    dpre = dout if clip is None else clip_backward(dout, pre, clip)    # (B, T, D)
    # forward: pre = E + delta, so dE = dpre (residual path) and ddelta = dpre
    dE = dpre.copy()                                                   # (B, T, D)
    # forward: delta = a W_2^T + b_2
    dW_2 = xp.einsum("btd,btw->dw", dpre, a)                           # (D, w)
    db_2 = dpre.sum(axis=(0, 1))                                       # (D,)
    da = xp.matmul(dpre, params.W_2)                                   # (B, T, w)
    # forward: a = gelu(h)
    dh = da * gelu_grad(h, gelu_form)                                  # (B, T, w)
    # forward: h = E W_1^T + b_1
    dW_1 = xp.einsum("btw,btd->wd", dh, E)                             # (w, D)
    db_1 = dh.sum(axis=(0, 1))                                         # (w,)
    dE += xp.matmul(dh, params.W_1)
    if isinstance(params, MLPParams):
        return dE, MLPParams(dW_1, db_1, dW_2, db_2)
    return dE, MLPNoBiasParams(dW_1, dW_2)


def check_mlp_params(params):
    """Shapes, dtypes and finiteness of the MLP params; returns the token width D."""
    if not isinstance(params, (MLPParams, MLPNoBiasParams)):
        raise TypeError(f"mlp params must be MLPParams or MLPNoBiasParams, got {type(params).__name__}")
    check_array("W_1", params.W_1, ndim=2, finite=False)
    w, D = params.W_1.shape
    check_array("W_2", params.W_2, shape=(D, w), finite=False)
    if isinstance(params, MLPParams):
        check_array("b_1", params.b_1, shape=(w,), finite=False)
        check_array("b_2", params.b_2, shape=(D,), finite=False)
    check_same_dtype(**params._asdict())
    check_all_finite(params._fields, params)
    return D


def check_gelu_form(form):
    if form not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, got {form!r}")
    return form


def check_mlp_inputs(E, params, gelu_form, clip):
    check_data("E", E, dims=("B", "T", "D"))
    D = check_mlp_params(params)
    if E.shape[2] != D:
        raise ValueError(f"E must have token width D={D} to match the mlp params, got shape {tuple(E.shape)}")
    check_gelu_form(gelu_form)
    if clip is not None:
        check_float("clip", clip, 0.0, allow_equal_min=False)
    check_same_dtype(E=E, W_1=params.W_1)


class MLP(LayerType):
    """Layer kind ``"mlp"``. Options: ``gelu`` ("tanh" or "erf"), ``clip`` (change the
    function); ``width`` (None: 4 D) and ``bias`` shape the parameters ``init`` draws
    (the forward reads them from the params)."""

    kind = "mlp"
    OPTIONS = {"gelu": "tanh", "clip": None, "width": None, "bias": True}
    PARAM_OPTIONS = ("width", "bias")

    def check_options(self, options):
        o = super().check_options(options)
        check_gelu_form(o["gelu"])
        if o["clip"] is not None:
            o["clip"] = check_float("clip", o["clip"], 0.0, allow_equal_min=False)
        if o["width"] is not None:
            o["width"] = check_int("width", o["width"], 1)
        if not isinstance(o["bias"], bool):
            raise TypeError(f"mlp option bias must be a bool, got {o['bias']!r}")
        return o

    def param_type(self, *, bias=True, **_):
        return MLPParams if bias else MLPNoBiasParams

    def init(self, rng, D_in, settings, *, width=None, bias=True, **_):
        """W_1 (fan-in D) then W_2 (fan-in w) by variance scaling; biases 0."""
        w = 4 * D_in if width is None else width
        W_1 = variance_scaling(rng, (w, D_in), D_in, settings)
        W_2 = variance_scaling(rng, (D_in, w), w, settings)
        if not bias:
            return MLPNoBiasParams(W_1, W_2)
        return MLPParams(W_1, zeros((w,), settings), W_2, zeros((D_in,), settings))

    def forward(self, E, params, *, gelu="tanh", clip=None):
        return mlp_forward(E, params, gelu_form=gelu, clip=clip)

    def backward(self, dout, cache):
        return mlp_backward(dout, cache)

    def oracle(self, E, params, *, gelu="tanh", clip=None):
        from ..oracle import oracle_mlp_layer

        return oracle_mlp_layer(E, params, gelu=gelu, clip=clip)

    def cache_floats(self, T, D_in, *, gelu="tanh", clip=None, width=None, bias=True):
        """h and a (T w each), pre (T D), and out (T D) when clipping."""
        w = 4 * D_in if width is None else width
        return 2 * T * w + T * D_in * (2 if clip is not None else 1)

    def check_params(self, params, D_in, **_):
        D = check_mlp_params(params)
        if D != D_in:
            raise ValueError(f"mlp params have token width D={D}, the layer's input has width {D_in}")

    def param_floats(self, D_in, *, width=None, bias=True, **_):
        w = 4 * D_in if width is None else width
        return 2 * w * D_in + ((w + D_in) if bias else 0)
