"""Pre-LN residual blocks: a LayerNorm on the block's input, inside its residual.

Registered as layer kind ``"pre_ln"`` (:class:`PreLN`): a wrapper around one residual
block kind (``block``: "lsa", "softmax" or "mlp", with its options ``block_options``).
The official code's pre-LN transformer block computes (``Transformer.trans_block``)

    e <- clip(e + f(LN(e)))                       f: the block's residual branch

where the block alone would compute clip(n + f(n)). The normalised tokens n = LN(e) feed
the queries, keys and values (context-only keys and values are taken from n, as the code
takes them from its normalised input), while the residual carries the un-normalised e.
A LayerNorm layer followed by a residual layer would instead give LN(e) + f(LN(e)), a
different function; so LayerNorm is an option of the block, not a layer of its own. The
wrapper runs the block's own forward on n and takes its residual branch as
f(n) = block(n) - n, then adds e:

    n   = LN(e; ln_scale, ln_offset, eps)          (reference/layers/layernorm.py)
    y   = block(n)                                 (the block without clipping)
    pre = e + (y - n)
    out = clip(pre, -c, c)                         (``clip`` of the wrapper)

Clipping belongs to the wrapper (the code clips after the outer residual); the block
must not clip. Backward, in reverse: dpre = dout where unclipped; de = dpre (residual);
(dn_block, dblock) = the block's backward of dpre; dn = dn_block - dpre; then the
LayerNorm backward of dn adds into de.

Parameters: one flat NamedTuple ``PreLN<BlockParams>(ln_scale, ln_offset, <the block's
fields>)`` (:func:`pre_ln_params_type`), so checkpoints and vectors store
``ln_scale``, ``ln_offset`` next to the block's arrays. Init: ln_scale = 1, ln_offset = 0
(Haiku's defaults; nothing drawn), then the block's own draws (the same numbers as the
block without LayerNorm). Placement in a stack ("no LayerNorm before the first attention
layer of a non-recurrent stack, one before every later one; the MLP block always
normalised") is the stack builder's, ``reference.model.transformer_stack``.
"""

import functools
from typing import NamedTuple

from .._checks import check_dout, check_float
from . import LayerSpec, LayerType
from .layernorm import LN_EPS, check_layernorm_params, layernorm_backward, layernorm_forward
from .lsa import clip_backward, clip_tokens
from .initializers import ones, zeros

RESIDUAL_BLOCKS = ("lsa", "softmax", "mlp")

_PARAM_TYPES = {}    # block params class -> its PreLN params class
_BLOCK_TYPES = {}    # PreLN params class -> block params class


def pre_ln_params_type(block_type):
    """The flat params class ``PreLN<name>(ln_scale, ln_offset, *block_type._fields)``
    of a block's params class (one class per block class, made once)."""
    if block_type not in _PARAM_TYPES:
        fields = [("ln_scale", object), ("ln_offset", object)] + [(f, object) for f in block_type._fields]
        cls = NamedTuple(f"PreLN{block_type.__name__}", fields)
        cls.__module__ = __name__
        cls.__doc__ = f"ln_scale (D,), ln_offset (D,), then the fields of {block_type.__name__}."
        _PARAM_TYPES[block_type], _BLOCK_TYPES[cls] = cls, block_type
    return _PARAM_TYPES[block_type]


def split_params(params):
    """(ln_scale, ln_offset, block params) of a PreLN params tuple."""
    if type(params) not in _BLOCK_TYPES:
        raise TypeError(f"pre_ln params must be a PreLN<BlockParams> NamedTuple (ln_scale, ln_offset, then the "
                        f"block's fields), got {type(params).__name__}")
    return params[0], params[1], _BLOCK_TYPES[type(params)](*params[2:])


class PreLNCache(NamedTuple):
    E: object             # (B, T, D) layer input
    n: object             # (B, T, D) LN(E), the block's input
    ln_cache: object      # LayerNormCache
    block_cache: object   # the block's cache
    pre: object           # (B, T, D) E + (y - n), before clipping
    block: object         # the block's LayerSpec
    param_type: type
    clip: object


@functools.lru_cache(maxsize=None)
def block_spec(block, block_options):
    """The block's :class:`LayerSpec` (validated: a residual block kind, no clipping)."""
    if block not in RESIDUAL_BLOCKS:
        raise ValueError(f"pre_ln block must be one of {RESIDUAL_BLOCKS} (a residual block of the same width), "
                         f"got {block!r}")
    spec = LayerSpec(block, tuple(block_options))
    if spec.opts.get("clip") is not None:
        raise ValueError("pre_ln clips after its own residual (as the official code): give clip to pre_ln, not in "
                         "block_options")
    return spec


def pre_ln_forward(E, params, block, *, eps=LN_EPS, clip=None):
    """Apply the pre-LN block (``block``: the block's LayerSpec). Returns (out, cache)."""
    ln_scale, ln_offset, p = split_params(params)
    if clip is not None:
        check_float("clip", clip, 0.0, allow_equal_min=False)
    n, ln_cache = layernorm_forward(E, ln_scale, ln_offset, eps)       # (B, T, D)
    y, block_cache = block.forward(n, p)                               # (B, T, D) n + f(n)
    pre = E + (y - n)                                                  # (B, T, D)
    out = pre if clip is None else clip_tokens(pre, clip)
    return out, PreLNCache(E, n, ln_cache, block_cache, pre, block, type(params), clip)


def pre_ln_backward(dout, cache):
    """Backward of :func:`pre_ln_forward`: (dE (B, T, D), gradients of the params' type)."""
    if not isinstance(cache, PreLNCache):
        raise TypeError(f"cache must be the PreLNCache that pre_ln_forward returned, got {type(cache).__name__}")
    E, n, ln_cache, block_cache, pre, block, param_type, clip = cache
    check_dout(dout, pre.shape, pre.dtype)
    # forward: out = clip(pre), so dpre = dout where -c <= pre <= c, else 0
    dpre = dout if clip is None else clip_backward(dout, pre, clip)    # (B, T, D)
    # forward: pre = E + (y - n): dE = dpre (residual path), dy = dpre, dn = -dpre
    dE = dpre.copy()                                                   # (B, T, D)
    # forward: y = block(n)
    dn_block, dblock = block.backward(dpre, block_cache)               # (B, T, D), block params
    dn = dn_block - dpre                                               # (B, T, D)
    # forward: n = LN(E)
    dE_ln, dscale, doffset = layernorm_backward(dn, ln_cache)
    dE += dE_ln
    return dE, param_type(dscale, doffset, *dblock)


class PreLN(LayerType):
    """Layer kind ``"pre_ln"``. Options: ``block`` (a residual kind, "lsa" by default),
    ``block_options`` (its options, as pairs or a dict; stored with its defaults filled
    in; no ``clip``), ``eps`` (LayerNorm's, 1e-5) and ``clip`` (after the residual)."""

    kind = "pre_ln"
    OPTIONS = {"block": "lsa", "block_options": (), "eps": LN_EPS, "clip": None}

    def check_options(self, options):
        o = super().check_options(options)
        bo = o["block_options"]
        if isinstance(bo, dict):
            bo = tuple(bo.items())
        if not isinstance(bo, (tuple, list)) or not all(isinstance(kv, (tuple, list)) and len(kv) == 2 for kv in bo):
            raise TypeError(f"pre_ln option block_options must be a dict or (name, value) pairs, got {bo!r}")
        if not isinstance(o["block"], str):
            raise TypeError(f"pre_ln option block must be a str, got {o['block']!r}")
        o["block_options"] = block_spec(o["block"], tuple((k, v) for k, v in bo)).options
        o["eps"] = check_float("eps", o["eps"], 0.0, allow_equal_min=False)
        if o["clip"] is not None:
            o["clip"] = check_float("clip", o["clip"], 0.0, allow_equal_min=False)
        return o

    @staticmethod
    def _block(block, block_options):
        return block_spec(block, block_options)

    def param_type(self, *, block="lsa", block_options=(), **_):
        return pre_ln_params_type(self._block(block, block_options).param_type())

    def init(self, rng, D_in, settings, *, block="lsa", block_options=(), **_):
        p = self._block(block, block_options).init(rng, D_in, settings)
        return pre_ln_params_type(type(p))(ones((D_in,), settings), zeros((D_in,), settings), *p)

    def forward(self, E, params, *, block="lsa", block_options=(), eps=LN_EPS, clip=None):
        return pre_ln_forward(E, params, self._block(block, block_options), eps=eps, clip=clip)

    def backward(self, dout, cache):
        return pre_ln_backward(dout, cache)

    def oracle(self, E, params, *, block="lsa", block_options=(), eps=LN_EPS, clip=None):
        from ..oracle import oracle_layernorm, oracle_pre_ln_residual

        ln_scale, ln_offset, p = split_params(params)
        n = oracle_layernorm(E, ln_scale, ln_offset, eps)
        y = self._block(block, block_options).oracle(n, p)             # the block's loop oracle on LN(E)
        return oracle_pre_ln_residual(E, n, y, clip)

    def cache_floats(self, T, D_in, *, block="lsa", block_options=(), eps=LN_EPS, clip=None):
        """LayerNorm's xhat (T D) and rstd (T), its output n (T D), what the block keeps
        (its output included), pre (T D), and out (T D) when clipping."""
        inner = self._block(block, block_options).cache_floats(T, D_in)
        return 2 * T * D_in + T + inner + T * D_in * (2 if clip is not None else 1)

    def check_tokens(self, T, *, block="lsa", block_options=(), **_):
        self._block(block, block_options).check_tokens(T)

    def check_params(self, params, D_in, *, block="lsa", block_options=(), **_):
        ln_scale, ln_offset, p = split_params(params)
        self._block(block, block_options).check_params(p, D_in)        # first: it names the width
        check_layernorm_params(ln_scale, ln_offset, D_in)

    def param_floats(self, D_in, *, block="lsa", block_options=(), **_):
        return 2 * D_in + self._block(block, block_options).param_floats(D_in)
