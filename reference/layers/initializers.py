"""The initialiser the official code gives every weight matrix, shared by the layer types
written after LSA (softmax attention, MLP, embedding). Not a layer type.

``haiku.initializers.VarianceScaling(scale)`` with its defaults (fan-in mode, truncated
normal at two standard deviations), the scale divided by the model's depth K as the
spec's :class:`InitSettings` say (SPEC.md section 7):

    std = sqrt(scale / K / fan_in) / 0.87962566103423978,   entry = std * z,  |z| <= 2

with the rejections of one array redrawn in rounds, in C order, before the next array
is drawn: the same draws as ``reference.layers.lsa.init_lsa_params`` makes for each of
its matrices (tested). Biases start at zero and LayerNorm at scale 1, offset 0 (Haiku's
defaults), drawing nothing.
"""

import numpy as np

from .._checks import check_int

# Standard deviation of N(0, 1) truncated to [-2, 2]: dividing by it makes the truncated
# draw's standard deviation the target sqrt(scale / K / fan_in).
TRUNCATED_STD = 0.87962566103423978


def variance_scaling(rng, shape, fan_in, settings):
    """An array of ``shape`` drawn from ``rng`` (truncated normal, std sqrt(scale / K /
    fan_in) with ``settings`` an :class:`reference.layers.InitSettings`), in its dtype
    and namespace."""
    fan_in = check_int("fan_in", fan_in, 1)
    std = np.sqrt(settings.scale / settings.n_layers / fan_in) / TRUNCATED_STD
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():                                                   # redraw the rejections, in C order
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2.0
    return settings.xp.asarray((std * z).astype(settings.dtype))


def zeros(shape, settings):
    return settings.xp.zeros(shape, dtype=settings.dtype)


def ones(shape, settings):
    return settings.xp.ones(shape, dtype=settings.dtype)
