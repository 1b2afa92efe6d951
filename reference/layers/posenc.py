"""Sinusoidal positional encodings, added to or concatenated with the tokens.

The readable spec (no fast backend runs it); tested against the loop oracle
``reference.oracle.oracle_posenc_layer``. Registered as layer kind ``"posenc"``
(:class:`PosEnc`). It has no parameters (its parameter set is the empty
:class:`PosEncParams`), so a model needs another layer with parameters to be trained.

The encoding (the official code's ``create_pos_encoding``, Vaswani et al. 2017), for
token positions t = 0 .. T-1 (context tokens first, the query last) and columns
c = 0 .. P-1, with frequency index i = floor(c / 2):

    pe[t, c] = sin(t * 10000^(-2i / P))   for even c
    pe[t, c] = cos(t * 10000^(-2i / P))   for odd c

computed in float64 (as the official code, with exp(-2i ln(10000) / P)) and rounded to
the tokens' dtype. For an odd P the last column is a sine (the official code accepts even
P only). Two modes (the official ``concat_pe`` flag):

* ``mode="add"`` (the official default): out = E + pe, P = D (width unchanged);
* ``mode="concat"``: out = [E, pe] along the features, width D + P, ``width`` = P
  (None: P = D). The classic-token experiment concatenates P = 10 to tokens of width 10.

Backward: dE = dout (add) or dout[..., :D] (concat); nothing else.
"""

import math
from typing import NamedTuple

import numpy as np

from .._checks import check_data, check_dout, check_int
from ..xp import get_xp
from . import LayerType

POSENC_MODES = ("add", "concat")


class PosEncParams(NamedTuple):
    """No parameters: the encoding is fixed."""


class PosEncCache(NamedTuple):
    out_shape: tuple   # (B, T, D_out)
    dtype: object
    D_in: int          # the input token width
    mode: str


def positional_encoding(T, P):
    """The (T, P) float64 table ``pe`` of the module docstring."""
    T, P = check_int("T", T, 1), check_int("P", P, 1)
    pe = np.zeros((T, P))
    t = np.arange(T, dtype=np.float64)[:, None]                        # (T, 1)
    freq = np.exp(np.arange(0, P, 2) * (-math.log(10000.0) / P))        # (ceil(P/2),) 10000^(-2i/P)
    pe[:, 0::2] = np.sin(t * freq)
    pe[:, 1::2] = np.cos(t * freq[: P // 2])
    return pe


def posenc_forward(E, *, mode="add", width=None):
    """Add or concatenate the encoding. Returns (out (B, T, D_out), cache)."""
    check_data("E", E, dims=("B", "T", "D"))
    check_posenc_options(mode, width)
    xp = get_xp(E)
    B, T, D = E.shape
    P = D if (mode == "add" or width is None) else width
    pe = xp.asarray(positional_encoding(T, P).astype(E.dtype))         # (T, P)
    if mode == "add":
        out = E + pe                                                   # (B, T, D)
    else:
        out = xp.concatenate([E, xp.broadcast_to(pe, (B, T, P))], axis=2)   # (B, T, D + P)
    return out, PosEncCache(tuple(out.shape), out.dtype, D, mode)


def posenc_backward(dout, cache):
    """Backward of :func:`posenc_forward`: (dE (B, T, D), PosEncParams())."""
    if not isinstance(cache, PosEncCache):
        raise TypeError(f"cache must be the PosEncCache that posenc_forward returned, got {type(cache).__name__}")
    check_dout(dout, cache.out_shape, cache.dtype)
    if cache.mode == "add":
        # forward: out = E + pe
        return dout.copy(), PosEncParams()
    # forward: out = [E, pe], so dE is the first D columns of dout
    return dout[:, :, : cache.D_in].copy(), PosEncParams()


def check_posenc_options(mode, width):
    if mode not in POSENC_MODES:
        raise ValueError(f"posenc mode must be one of {POSENC_MODES}, got {mode!r}")
    if width is not None:
        check_int("width", width, 1)
        if mode == "add":
            raise ValueError("posenc width is the token width in mode 'add'; give a width only with mode 'concat'")


class PosEnc(LayerType):
    """Layer kind ``"posenc"``. Options ``mode`` ("add" or "concat") and ``width`` (the
    encoding's width P in concat mode; None: the token width)."""

    kind = "posenc"
    OPTIONS = {"mode": "add", "width": None}

    def check_options(self, options):
        o = super().check_options(options)
        check_posenc_options(o["mode"], o["width"])
        return o

    def param_type(self, **_):
        return PosEncParams

    def init(self, rng, D_in, settings, **_):
        return PosEncParams()

    def out_width(self, D_in, *, mode="add", width=None):
        if mode == "add":
            return D_in
        return D_in + (D_in if width is None else width)

    def forward(self, E, params, *, mode="add", width=None):
        self.check_params(params, None)
        return posenc_forward(E, mode=mode, width=width)

    def backward(self, dout, cache):
        return posenc_backward(dout, cache)

    def oracle(self, E, params, *, mode="add", width=None):
        from ..oracle import oracle_posenc_layer

        return oracle_posenc_layer(E, mode=mode, width=width)

    def cache_floats(self, T, D_in, *, mode="add", width=None):
        """The output (T D_out); the table (T P) is made again by each forward, not kept."""
        return T * self.out_width(D_in, mode=mode, width=width)

    def check_params(self, params, D_in, **_):
        if not isinstance(params, PosEncParams):
            raise TypeError(f"posenc params must be the empty PosEncParams(), got {type(params).__name__}")

    def param_floats(self, D_in, **_):
        return 0
