"""A linear token embedding (no residual): forward and hand-written backward.

The readable spec (no fast backend runs it); tested against the loop oracle
``reference.oracle.oracle_embed_layer`` and complex-step derivatives. Registered as layer
kind ``"embed"`` (:class:`Embed`). It changes the token width: the official sine-task
model maps tokens (x, y) of width 2 to width 40 (``hk.Linear(embedding_size)``, the
"input mapping"), and the readout then reads the model's last token at that width
(``reference.tokens.EmbeddedLayout``).

Equation, for every token e (D_in,):

    out = W e + b          W (D_out, D_in), b (D_out,)

``width`` = D_out (None: D_in); ``bias`` (default False: the official code's embedding
follows its ``use_bias`` flag, off in the paper's experiments). Init: W by variance
scaling over fan-in D_in, b = 0.
"""

from typing import NamedTuple

from .._checks import check_all_finite, check_array, check_data, check_dout, check_int, check_same_dtype
from ..xp import get_xp
from . import LayerType
from .initializers import variance_scaling, zeros


class EmbedParams(NamedTuple):
    W: object  # (D_out, D_in)
    b: object  # (D_out,)


class EmbedNoBiasParams(NamedTuple):
    W: object  # (D_out, D_in)


class EmbedCache(NamedTuple):
    E: object       # (B, T, D_in) layer input
    params: object


def embed_forward(E, params, *, width=None):
    """out = E W^T (+ b). Returns (out (B, T, D_out), cache). ``width``: the D_out the
    params must map to (None: the input width D_in, as the layer option)."""
    check_embed_inputs(E, params, width)
    xp = get_xp(E, *params)
    out = xp.matmul(E, params.W.T)                                     # (B, T, D_out)
    if isinstance(params, EmbedParams):
        out = out + params.b
    return out, EmbedCache(E, params)


def embed_backward(dout, cache):
    """Backward of :func:`embed_forward`: (dE (B, T, D_in), gradients of the params' type)."""
    if not isinstance(cache, EmbedCache):
        raise TypeError(f"cache must be the EmbedCache that embed_forward returned, got {type(cache).__name__}")
    E, params = cache
    B, T, _ = E.shape
    check_dout(dout, (B, T, params.W.shape[0]), E.dtype)
    xp = get_xp(dout, E)
    # forward: out = E W^T + b, so dW = sum_bt dout^T E, db = sum_bt dout, dE = dout W
    dW = xp.einsum("bto,bti->oi", dout, E)                             # (D_out, D_in)
    dE = xp.matmul(dout, params.W)                                     # (B, T, D_in)
    if isinstance(params, EmbedParams):
        return dE, EmbedParams(dW, dout.sum(axis=(0, 1)))
    return dE, EmbedNoBiasParams(dW)


def check_embed_params(params):
    """Shapes, dtypes and finiteness; returns (D_out, D_in)."""
    if not isinstance(params, (EmbedParams, EmbedNoBiasParams)):
        raise TypeError(f"embed params must be EmbedParams or EmbedNoBiasParams, got {type(params).__name__}")
    check_array("W", params.W, ndim=2, finite=False)
    D_out, D_in = params.W.shape
    if isinstance(params, EmbedParams):
        check_array("b", params.b, shape=(D_out,), finite=False)
    check_same_dtype(**params._asdict())
    check_all_finite(params._fields, params)
    return D_out, D_in


def check_embed_inputs(E, params, width=None):
    check_data("E", E, dims=("B", "T", "D"))
    D_out, D_in = check_embed_params(params)
    if E.shape[2] != D_in:
        raise ValueError(f"E must have token width D={D_in} to match the embed params, got shape {tuple(E.shape)}")
    want = D_in if width is None else width
    if D_out != want:
        raise ValueError(f"embed params W map to width {D_out}, the layer's width is {want}")
    check_same_dtype(E=E, W=params.W)


class Embed(LayerType):
    """Layer kind ``"embed"``. Options ``width`` (D_out; None: D_in; the forward checks
    the params against it) and ``bias`` (shapes the parameters; the forward reads it from
    their type)."""

    kind = "embed"
    OPTIONS = {"width": None, "bias": False}
    PARAM_OPTIONS = ("bias",)

    def check_options(self, options):
        o = super().check_options(options)
        if o["width"] is not None:
            o["width"] = check_int("width", o["width"], 1)
        if not isinstance(o["bias"], bool):
            raise TypeError(f"embed option bias must be a bool, got {o['bias']!r}")
        return o

    def param_type(self, *, bias=False, **_):
        return EmbedParams if bias else EmbedNoBiasParams

    def init(self, rng, D_in, settings, *, width=None, bias=False):
        D_out = self.out_width(D_in, width=width)
        W = variance_scaling(rng, (D_out, D_in), D_in, settings)
        return EmbedParams(W, zeros((D_out,), settings)) if bias else EmbedNoBiasParams(W)

    def out_width(self, D_in, *, width=None, **_):
        return D_in if width is None else width

    def forward(self, E, params, *, width=None):
        return embed_forward(E, params, width=width)

    def backward(self, dout, cache):
        return embed_backward(dout, cache)

    def oracle(self, E, params, *, width=None):
        from ..oracle import oracle_embed_layer

        return oracle_embed_layer(E, params)

    def cache_floats(self, T, D_in, *, width=None, bias=False):
        """The output (T D_out); the cache holds the input and the params."""
        return T * self.out_width(D_in, width=width)

    def check_params(self, params, D_in, *, width=None, **_):
        D_out, D = check_embed_params(params)
        if D != D_in:
            raise ValueError(f"embed params take token width D={D}, the layer's input has width {D_in}")
        if D_out != self.out_width(D_in, width=width):
            raise ValueError(f"embed params map to width {D_out}, the layer's width option is "
                             f"{self.out_width(D_in, width=width)}")

    def param_floats(self, D_in, *, width=None, bias=False):
        D_out = self.out_width(D_in, width=width)
        return D_out * D_in + (D_out if bias else 0)
