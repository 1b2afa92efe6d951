"""LayerNorm over each token's D features, with a learned scale and offset: the pure
pair that the ``"pre_ln"`` layer kind (``pre_ln.py``) applies to a block's input. Not a
layer kind by itself (the official code normalises only inside a residual block, which a
LayerNorm layer followed by a residual layer would not reproduce; see ``pre_ln.py``).

Equation (Ba et al. 2016; ``haiku.LayerNorm(axis=-1, create_scale=True,
create_offset=True)`` with its defaults, as the official code calls it), per token e:

    mu   = (1/D) sum_a e_a
    var  = (1/D) sum_a (e_a - mu)^2           (the biased variance; Haiku's default)
    xhat = (e - mu) / sqrt(var + eps)
    out  = scale * xhat + offset              (elementwise; scale, offset of shape (D,))

``eps`` = 1e-5 (Haiku's default, :data:`LN_EPS`); initial scale 1 and offset 0. The
variance is formed as sum (e - mu) * (e - mu), not |e - mu|^2, so the function stays
analytic and complex-step differentiation applies.

Backward (exact: it differentiates mu and var as functions of e, nothing is held fixed):

    dscale  = sum_{b,t} dout * xhat,   doffset = sum_{b,t} dout,   g = dout * scale
    dE      = (g - mean_a g - xhat * mean_a(g * xhat)) / sqrt(var + eps)

from d xhat_a / d e_c = r (delta_ac - 1/D) - r xhat_a xhat_c / D with r = 1/sqrt(var + eps)
(d var / d e_c = 2 (e_c - mu) / D: the term through mu drops out because the deviations
sum to zero).
"""

from typing import NamedTuple

from .._checks import check_array, check_data, check_dout, check_float, check_same_dtype
from ..xp import get_xp

LN_EPS = 1e-5


class LayerNormCache(NamedTuple):
    xhat: object    # (B, T, D)  (e - mu) / sqrt(var + eps)
    rstd: object    # (B, T, 1)  1 / sqrt(var + eps)
    scale: object   # (D,)


def layernorm_forward(E, scale, offset, eps=LN_EPS):
    """LayerNorm of every token of E (B, T, D). Returns (out (B, T, D), cache)."""
    check_layernorm_inputs(E, scale, offset, eps)
    xp = get_xp(E, scale, offset)
    mu = E.mean(axis=-1, keepdims=True)                                # (B, T, 1)
    xc = E - mu                                                        # (B, T, D)
    var = (xc * xc).mean(axis=-1, keepdims=True)                       # (B, T, 1)
    rstd = 1.0 / xp.sqrt(var + eps)                                    # (B, T, 1)
    xhat = xc * rstd                                                   # (B, T, D)
    out = xhat * scale + offset                                        # (B, T, D)
    return out, LayerNormCache(xhat, rstd, scale)


def layernorm_backward(dout, cache):
    """Backward of :func:`layernorm_forward`: (dE (B, T, D), dscale (D,), doffset (D,))."""
    if not isinstance(cache, LayerNormCache):
        raise TypeError(f"cache must be the LayerNormCache that layernorm_forward returned, got "
                        f"{type(cache).__name__}")
    xhat, rstd, scale = cache
    check_dout(dout, xhat.shape, xhat.dtype)
    # forward: out = scale * xhat + offset
    dscale = (dout * xhat).sum(axis=(0, 1))                            # (D,)
    doffset = dout.sum(axis=(0, 1))                                    # (D,)
    g = dout * scale                                                   # (B, T, D) dxhat
    # forward: xhat = (e - mu) * rstd, mu and var functions of e
    dE = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))     # (B, T, D)
    return dE, dscale, doffset


def check_layernorm_params(scale, offset, D):
    """scale and offset: arrays of shape (D,)."""
    check_array("ln_scale", scale, shape=(D,))
    check_array("ln_offset", offset, shape=(D,))


def check_layernorm_inputs(E, scale, offset, eps):
    check_data("E", E, dims=("B", "T", "D"))
    check_array("ln_scale", scale, ndim=1)
    if E.shape[2] != scale.shape[0]:
        raise ValueError(f"E must have token width D={scale.shape[0]} to match ln_scale and ln_offset, got shape "
                         f"{tuple(E.shape)}")
    check_layernorm_params(scale, offset, E.shape[2])
    check_float("eps", eps, 0.0, allow_equal_min=False)
    check_same_dtype(E=E, ln_scale=scale, ln_offset=offset)
