"""A model: a stack of registered layers, its readout and loss, forward and
hand-written backward.

Architecture (:class:`Arch`): K layer specs (:class:`reference.layers.LayerSpec`, a
registered kind plus its options) and the weight tying, ``tie[k]`` = the index of the
parameter set layer k uses. Today's recurrent (looped) stack of one LSA layer applied
K times is ``tie = (0, 0, ..., 0)``; separate layers are ``tie = (0, 1, ..., K-1)``.
:func:`lsa_stack` builds every LSA configuration of the paper. Parameters are a tuple
with one entry per distinct parameter set (a parameter tree, ``reference.tree``).

Readout and loss (official code; the paper's Eq. 5 drops the 1/2), for the token
layout :class:`reference.tokens.TokenLayout`:

    L = 0.5 * mean_b || y_hat_b - y_q,b ||^2,   y_hat = layout.readout(E_K)

(squared error summed over the d_y label dims, averaged over the B tasks; for the
regression layout y_hat = -E_K[:, N, d:]). The model backward walks the layers in
reverse; the gradients of the applications of a shared parameter set are summed.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from ._checks import check_data, check_dout, check_int, check_same_dtype
from .layers import LayerSpec
from .tokens import as_layout, layout_for_width
from .tree import tree_add


@dataclass(frozen=True)
class Arch:
    """K layer specs and their weight tying. ``tie`` defaults to separate weights."""

    layers: tuple
    tie: Optional[tuple] = None

    def __post_init__(self):
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("an Arch needs at least one layer")
        for k, s in enumerate(layers):
            if not isinstance(s, LayerSpec):
                raise TypeError(f"layers[{k}] must be a LayerSpec, got {type(s).__name__}")
        tie = tuple(range(len(layers))) if self.tie is None else tuple(self.tie)
        if len(tie) != len(layers):
            raise ValueError(f"tie must have one entry per layer ({len(layers)}), got {len(tie)}")
        seen = []
        for k, i in enumerate(tie):
            check_int(f"tie[{k}]", i, 0)
            if i > len(seen):
                raise ValueError(f"tie must number parameter sets in order of first use (0, 1, ...), got {tie}")
            if i == len(seen):
                seen.append(layers[k])
            elif layers[k] != seen[i]:
                raise ValueError(f"layers {tie.index(i)} and {k} share parameter set {i} but have different "
                                 f"specs ({seen[i]!r} vs {layers[k]!r})")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "tie", tie)

    @property
    def n_layers(self):
        """K, the number of layer applications."""
        return len(self.layers)

    @property
    def n_param_layers(self):
        """How many distinct parameter sets the model has (1 for a recurrent stack)."""
        return max(self.tie) + 1

    @property
    def recurrent(self):
        """True when every layer uses parameter set 0 (a looped, weight-tied stack)."""
        return self.n_param_layers == 1 and self.n_layers > 1

    def layer_index(self, k):
        """Index into the params tuple used by layer k (0-based)."""
        return self.tie[k]

    def param_specs(self):
        """The spec of each parameter set, in order."""
        return [self.layers[self.tie.index(i)] for i in range(self.n_param_layers)]

    def kinds(self):
        return tuple(s.kind for s in self.layers)

    def option(self, name):
        """The value of option ``name`` shared by every layer (ValueError if they differ
        or a layer lacks it): for backends that run uniform stacks only."""
        vals = {s.opts.get(name, _MISSING) for s in self.layers}
        if len(vals) != 1 or _MISSING in vals:
            raise ValueError(f"the layers do not share one value of option {name!r}: "
                             f"{[s.opts.get(name, '-') for s in self.layers]}")
        return vals.pop()

    def widths(self, D_in):
        """Token widths before each layer and after the last: K + 1 ints."""
        out = [check_int("D_in", D_in, 1)]
        for s in self.layers:
            out.append(s.out_width(out[-1]))
        return out

    def layout(self, d, d_y=1):
        """The regression layout of this model on tasks (d, d_y): tokens of width
        d + d_y in, the prediction read from the last layer's width
        (``tokens.layout_for_width``)."""
        return layout_for_width(d, d_y, self.widths(d + d_y)[-1])

    def init(self, rng, D_in, settings):
        """Initial parameters: each parameter set drawn in order from ``rng``."""
        widths = self.widths(D_in)
        return tuple(self.layers[k].init(rng, widths[k], settings)
                     for k in (self.tie.index(i) for i in range(self.n_param_layers)))

    def param_types(self):
        return [s.param_type() for s in self.param_specs()]

    def cache_floats(self, T, D_in):
        """Floats per task that a model forward holds: its input tokens and what every
        layer keeps (``LayerType.cache_floats``)."""
        widths = self.widths(D_in)
        return T * widths[0] + sum(s.cache_floats(T, widths[k]) for k, s in enumerate(self.layers))

    def param_floats(self, D_in):
        """Numbers in the model's parameters (each parameter set once; no array is made)."""
        widths = self.widths(D_in)
        return sum(self.layers[self.tie.index(i)].param_floats(widths[self.tie.index(i)])
                   for i in range(self.n_param_layers))

    def to_dict(self):
        return {"layers": [s.to_dict() for s in self.layers], "tie": list(self.tie)}

    @classmethod
    def from_dict(cls, d):
        return cls(tuple(LayerSpec.from_dict(s) for s in d["layers"]), tuple(d["tie"]))


_MISSING = object()


def lsa_stack(n_layers=1, recurrent=False, causal=False, clip=None, **options):
    """K LSA layers (``layers.lsa``), weight-tied when ``recurrent``: every LSA
    configuration of the paper. ``options`` are further LSA options (heads,
    key_size, value_size, merged)."""
    K = check_int("n_layers", n_layers, 1)
    if not isinstance(recurrent, bool):
        raise TypeError(f"recurrent must be a bool, got {recurrent!r}")
    spec = LayerSpec("lsa", (("causal", causal), ("clip", clip), *options.items()))
    return Arch((spec,) * K, (0,) * K if recurrent else None)


class ModelCache(NamedTuple):
    layer_caches: list   # K layer caches
    outputs: list        # K arrays (B, T, D_k): tokens after each layer
    arch: Arch


def check_model_params(params, arch, D_in=None):
    """Raise unless ``params`` is a tuple with one entry per parameter set of ``arch``,
    each of a type the layer takes (and, with ``D_in``, of the right widths)."""
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    if not isinstance(params, (tuple, list)):
        raise TypeError("params must be a tuple with one parameter NamedTuple per parameter set, "
                        f"got {type(params).__name__}")
    if len(params) != arch.n_param_layers:
        kind = "recurrent" if arch.recurrent else "separate"
        raise ValueError(f"params must hold {arch.n_param_layers} layer(s) for a {kind} "
                         f"stack of K={arch.n_layers}, got {len(params)}")
    widths = None if D_in is None else arch.widths(D_in)
    for i, spec in enumerate(arch.param_specs()):
        p = params[i]
        if not (isinstance(p, tuple) and hasattr(p, "_fields")):
            raise TypeError(f"params[{i}] must be a parameter NamedTuple of layer {spec.kind!r}, "
                            f"got {type(p).__name__}")
        if widths is not None:
            spec.check_params(p, widths[arch.tie.index(i)])


def check_model_inputs(E, params, arch):
    """Raise unless the model can run on tokens E: ``arch`` an Arch, E (B, T, D) tokens
    (every size >= 1, entries within the data limit), ``params`` one finite parameter
    set per distinct layer, fitting the widths (each layer's ``check_params``), a token
    count every layer takes (``check_tokens``) and one dtype for E and every parameter.
    What :func:`model_forward` checks before any layer runs; the backends call it too."""
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    check_data("E", E, dims=("B", "T", "D"))
    check_model_params(params, arch, E.shape[2])
    for spec in dict.fromkeys(arch.layers):                            # each distinct spec once, in order
        spec.check_tokens(E.shape[1])
    dts = {np.dtype(E.dtype)} | {np.dtype(a.dtype) for p in params for a in p if a is not None}
    if len(dts) > 1:
        raise TypeError(f"E and params must share one dtype, got {sorted(str(t) for t in dts)}")


def check_loss_inputs(E, y_q, params, arch, layout):
    """:func:`check_model_inputs`, then the layout against the tokens' width and y_q
    (B, d_y) targets of E's dtype, within the data limit: what :func:`loss_and_grads`
    checks before any work. Returns the :class:`TokenLayout`."""
    check_model_inputs(E, params, arch)
    lay = as_layout(layout, E.shape[2])
    D_out = arch.widths(E.shape[2])[-1]
    if D_out != lay.D:
        raise ValueError(f"E must have token width D={lay.D} for this layout after the last layer, "
                         f"got {D_out} (tokens of shape {tuple(E.shape)})")
    check_data("y_q", y_q, shape=(E.shape[0], lay.d_y))
    check_same_dtype(E=E, y_q=y_q)
    return lay


def model_forward(E, params, arch):
    """Apply the K layers to tokens E (B, T, D). Returns (E_K (B, T, D_K), cache)."""
    check_model_inputs(E, params, arch)
    return _model_forward(E, params, arch)


def _model_forward(E, params, arch):
    caches, outputs = [], []
    h = E
    for k, spec in enumerate(arch.layers):
        h, c = spec.forward(h, params[arch.layer_index(k)])
        caches.append(c)
        outputs.append(h)
    return h, ModelCache(caches, outputs, arch)


def model_backward(dout, cache):
    """Backward of :func:`model_forward`, walking the layers in reverse.
    Returns (dE (B, T, D), dparams tuple matching params). ``dout`` (B, T, D_K): the
    gradient of the last layer's output, of its shape and dtype, finite."""
    if not isinstance(cache, ModelCache):
        raise TypeError(f"cache must be the ModelCache that model_forward returned, got {type(cache).__name__}")
    check_dout(dout, cache.outputs[-1].shape, cache.outputs[-1].dtype)
    arch = cache.arch
    grads = [None] * arch.n_param_layers
    dh = dout
    for k in reversed(range(arch.n_layers)):
        dh, g = arch.layers[k].backward(dh, cache.layer_caches[k])
        i = arch.layer_index(k)
        grads[i] = g if grads[i] is None else tree_add((grads[i],), (g,))[0]
    return dh, tuple(grads)


def layer_predictions(cache, layout):
    """Readout after every layer: list of K arrays (B, d_y)."""
    return [as_layout(layout, h.shape[2]).readout(h) for h in cache.outputs]


def predict(E, params, arch, layout):
    """Prediction y_hat (B, d_y) of the model for tokens E."""
    out, _ = model_forward(E, params, arch)
    return as_layout(layout, out.shape[2]).readout(out)


class LossCache(NamedTuple):
    err: object  # (B, d_y) y_hat - y_q


def loss_forward(pred, y_q):
    """L = 0.5 * mean over tasks of ||pred - y_q||^2. Returns (L (0-d array), cache)."""
    check_data("pred", pred, dims=("B", "d_y"))
    check_data("y_q", y_q, shape=tuple(pred.shape))
    check_same_dtype(pred=pred, y_q=y_q)
    return _loss_forward(pred, y_q)


def _loss_forward(pred, y_q):
    err = pred - y_q                                                   # (B, d_y)
    L = (err * err).sum(axis=1).mean() * err.dtype.type(0.5)          # typed 0.5: float32 stays float32 on NumPy 1.x too
    return L, LossCache(err)


def loss_backward(cache, dL=1.0):
    """Backward of :func:`loss_forward`: dpred = dL * err / B."""
    return dL * cache.err / cache.err.shape[0]                         # (B, d_y)


def loss_and_grads(E, y_q, params, arch, layout):
    """Loss of the model on tokens E against targets y_q, and its gradients.

    ``layout``: a :class:`reference.tokens.TokenLayout` (or the regression layout's
    input width d, an int). Returns (L, dparams, aux) with aux = dict(pred=y_hat, dE=dL/dE).
    """
    lay = check_loss_inputs(E, y_q, params, arch, layout)
    out, mcache = _model_forward(E, params, arch)
    pred = lay.readout(out)                                            # (B, d_y)
    L, lcache = _loss_forward(pred, y_q)                               # y_q checked above; pred is the model's
    # backward: loss -> readout -> layers in reverse
    dpred = loss_backward(lcache)
    dout = lay.readout_backward(dpred, out.shape)
    dE, dparams = model_backward(dout, mcache)
    return L, dparams, {"pred": pred, "dE": dE}


def transformer_stack(n_layers=1, recurrent=False, *, attention="lsa", first_softmax=False, layer_norm=False,
                      ln_eps=1e-5, mlp=False, mlp_width=None, mlp_bias=True, gelu="tanh", causal=False, clip=None,
                      front=(), **attention_options):
    """The official code's transformer stack (``Transformer.trans_block``, no dropout,
    no output map) as an :class:`Arch` of registered layers.

    For layer l = 0 .. K-1: an attention block of kind ``attention`` ("lsa" or
    "softmax"; "softmax" for layer 0 alone with ``first_softmax``, as the classic-token
    experiment), then, with ``mlp``, a residual MLP block (``mlp_width`` (None: 4 D),
    ``mlp_bias``, ``gelu``). Every block clips to [-clip, clip] after its residual
    (``clip``) and attends with ``causal`` and ``attention_options`` (heads, key_size,
    value_size; merged for LSA).

    ``layer_norm`` (pre-LN, ``layers.pre_ln``, eps ``ln_eps``): in a non-recurrent stack
    no LayerNorm before the attention of layer 0 and one before every later attention; a
    recurrent stack normalises before every application of its one attention block; an
    MLP block is always normalised. ``recurrent``: one attention (and one MLP) parameter
    set applied K times (the official ``deq``). ``front``: layer specs run first, each
    with its own parameters (the embedding, input MLP and positional encodings of the
    official model, e.g. ``(LayerSpec("embed", (("width", 40),)), LayerSpec("mlp"))``).
    """
    K = check_int("n_layers", n_layers, 1)
    if not isinstance(recurrent, bool):
        raise TypeError(f"recurrent must be a bool, got {recurrent!r}")
    if attention not in ("lsa", "softmax"):
        raise ValueError(f"attention must be 'lsa' or 'softmax', got {attention!r}")
    if recurrent and first_softmax:
        raise ValueError("first_softmax needs separate layers (a recurrent stack applies one attention block)")
    front = tuple(front)

    def block(kind, options, normalised):
        if not normalised:
            return LayerSpec(kind, (*options.items(), ("clip", clip)))
        return LayerSpec("pre_ln", (("block", kind), ("block_options", tuple(options.items())), ("eps", ln_eps),
                                    ("clip", clip)))

    layers = []
    for nl in range(K):
        kind = "softmax" if (attention == "softmax" or (first_softmax and nl == 0)) else "lsa"
        layers.append(block(kind, {"causal": causal, **attention_options}, layer_norm and (recurrent or nl > 0)))
        if mlp:
            layers.append(block("mlp", {"width": mlp_width, "bias": mlp_bias, "gelu": gelu}, layer_norm))
    per_layer = 2 if mlp else 1
    if recurrent:
        tie = tuple(range(len(front))) + tuple(len(front) + (k % per_layer) for k in range(len(layers)))
    else:
        tie = None
    return Arch(front + tuple(layers), tie)
