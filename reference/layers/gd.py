"""A frozen gradient-descent layer: the Prop. 1 construction as a layer with no parameters.

The official sine-regression baseline "MLP + GD" (paper-settings.md 7a) meta-trains an
embedding and an MLP through an attention layer whose weights are frozen at the GD
construction; this layer is that attention layer. Registered as layer kind ``"gd"``
(:class:`GD`); tested against the loop oracle ``reference.oracle.oracle_gd_layer`` and
complex-step derivatives.

For tokens E (B, T, D) read as e_i = (x_i, y_i) with x_i the first d = D - d_y features
and y_i the last d_y, N = T - 1 context tokens and the query last, every token becomes

    out_i = e_i + (0, -(eta / N) sum_{j < N} y_j (x_j . x_i))

which is one LSA layer (context-only, one head) with the weights of
``reference.constructions.gd_layer(d, d_y, N, eta)``: W_Q = W_K = [[I_d, 0], [0, 0]],
W_V = [[0, 0], [0, -I]], P = (eta / N) I. On the query this is one gradient step from
W = 0 on 1/(2N) sum_j ||W x_j - y_j||^2 with step eta, read out as minus the y-slot
(the query's y-slot enters the prediction with its sign flipped, as in any LSA readout).
The official baseline uses eta = 0.1 at N = 10 (eta / N = 0.01).

Options: ``eta`` (float, the step; N is read from the tokens) and ``d_y`` (the label
width at the end of each token, default 1). No parameters; the backward passes dE
through the frozen layer (``lsa_backward``) and returns no gradients.
"""

from typing import NamedTuple

from .._checks import check_data, check_float, check_int
from ..constructions import gd_layer
from . import LayerType
from .lsa import lsa_backward, lsa_forward


class GDParams(NamedTuple):
    """No parameters: the weights are the fixed GD construction."""


class GDCache(NamedTuple):
    lsa: object        # the LSACache of the frozen LSA layer


def gd_weights(D, T, eta, d_y, dtype):
    """The frozen layer's LSA weights for tokens of width D and T tokens (N = T - 1)."""
    p = gd_layer(D - d_y, d_y, T - 1, eta)                             # LSAParams, float64
    return type(p)(*(a.astype(dtype) for a in p))


def check_gd_inputs(E, eta, d_y):
    check_data("E", E, dims=("B", "T", "D"))
    check_gd_options(eta, d_y)
    B, T, D = E.shape
    if T < 2:
        raise ValueError(f"E needs at least 2 tokens (context + query) for a gd layer, got T={T}")
    check_gd_width(D, d_y)


def check_gd_width(D, d_y):
    if D <= d_y:
        raise ValueError(f"E must have token width D > d_y={d_y} for a gd layer (x features, then d_y label "
                         f"features), got D={D}")


def check_gd_options(eta, d_y):
    check_float("eta", eta)
    check_int("d_y", d_y, 1)


def gd_forward(E, *, eta=0.1, d_y=1):
    """The frozen GD layer. Returns (out (B, T, D), cache)."""
    check_gd_inputs(E, eta, d_y)
    _, T, D = E.shape
    out, cache = lsa_forward(E, gd_weights(D, T, eta, d_y, E.dtype))
    return out, GDCache(cache)


def gd_backward(dout, cache):
    """Backward of :func:`gd_forward`: (dE (B, T, D), GDParams()); the frozen weights get
    no gradient."""
    if not isinstance(cache, GDCache):
        raise TypeError(f"cache must be the GDCache that gd_forward returned, got {type(cache).__name__}")
    dE, _ = lsa_backward(dout, cache.lsa)
    return dE, GDParams()


class GD(LayerType):
    """Layer kind ``"gd"``: the frozen Prop. 1 layer. Options ``eta`` (default 0.1, the
    official sine baseline's step) and ``d_y`` (default 1)."""

    kind = "gd"
    OPTIONS = {"eta": 0.1, "d_y": 1}

    def check_options(self, options):
        o = super().check_options(options)
        o["eta"] = check_float("eta", o["eta"])
        o["d_y"] = check_int("d_y", o["d_y"], 1)
        return o

    def param_type(self, **_):
        return GDParams

    def init(self, rng, D_in, settings, **_):
        return GDParams()

    def out_width(self, D_in, *, d_y=1, **_):
        check_gd_width(D_in, d_y)
        return D_in

    def forward(self, E, params, *, eta=0.1, d_y=1):
        self.check_params(params, None)
        return gd_forward(E, eta=eta, d_y=d_y)

    def backward(self, dout, cache):
        return gd_backward(dout, cache)

    def oracle(self, E, params, *, eta=0.1, d_y=1):
        from ..oracle import oracle_gd_layer

        return oracle_gd_layer(E, eta=eta, d_y=d_y)

    def cache_floats(self, T, D_in, **_):
        """The frozen LSA layer's cache (one head, key and value size D)."""
        from .lsa import attention_cache_floats

        return attention_cache_floats(T, D_in, 1, D_in, D_in, False, None)

    def check_tokens(self, T, **_):
        if T < 2:
            raise ValueError(f"E needs at least 2 tokens (context + query) for a gd layer, got T={T}")

    def check_params(self, params, D_in, **_):
        if not isinstance(params, GDParams):
            raise TypeError(f"gd params must be the empty GDParams(), got {type(params).__name__}")

    def param_floats(self, D_in, **_):
        return 0
