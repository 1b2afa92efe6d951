"""Layer types of the spec, one module per kind, found by name in one registry.

A model (:class:`reference.model.Arch`) is a sequence of :class:`LayerSpec` (a kind
plus its options); ``model_forward`` / ``model_backward`` look each kind up here. To
add a layer type, write one module in this folder with a :class:`LayerType` subclass
(see ``lsa.py``, the first one) and its loop oracle in ``reference/oracle.py``, and
register it at the bottom of this file; the conformance tests pick it up from
:func:`layer_types`.

The kinds: ``"lsa"`` (``lsa.py``), ``"softmax"`` (``softmax.py``: multi-head softmax
attention), ``"mlp"`` (``mlp.py``: the residual GELU MLP), ``"embed"`` (``embed.py``: a
linear embedding that may change the width), ``"posenc"`` (``posenc.py``: sinusoidal
positional encodings, added or concatenated) and ``"pre_ln"`` (``pre_ln.py``: LayerNorm
on a residual block's input, inside its residual; LayerNorm itself is ``layernorm.py``)
and ``"gd"`` (``gd.py``: the Prop. 1 construction as a frozen layer with no parameters,
the attention of the sine task's "MLP + GD" baseline).
``"mesa"`` (``mesa.py``: the mesa layer, a causal ridge regression solved per token) and
``"delta"`` (``delta.py``: the delta rule, DeltaNet and Gated DeltaNet) are causal only.
``initializers.py`` holds the official code's variance-scaling draw they share.

What a layer type provides (all methods take the layer's options as keywords; the
spec fills every option with its default, so a method sees them all):

* ``OPTIONS``: ``{name: default}``, every option the layer takes; ``PARAM_OPTIONS``:
  the names among them that only shape the parameters (``init``) and are not passed
  to ``forward`` / ``oracle``;
* ``check_options(options) -> options``: validate (clear errors naming the option);
* ``param_type(**options)``: the NamedTuple class ``init`` returns;
* ``init(rng, D_in, settings, **options) -> params``: ``settings`` is
  :class:`InitSettings`, the model-level scale (``scale / n_layers``) and dtype;
* ``out_width(D_in, **options) -> D_out``;
* ``forward(E, params, **call_options) -> (out, cache)`` and
  ``backward(dout, cache) -> (dE, dparams)``: the pure pair;
* ``oracle(E, params, **call_options) -> out``: the slow loop-level forward;
* ``cache_floats(T, D_in, **options)``: the floats per task that a forward keeps
  (cache and output), so a run can check memory before it starts;
* ``check_params(params, D_in, **options)``: raise unless ``params`` fit a layer of
  input width ``D_in`` (arrays of the right shapes, finite);
* ``check_tokens(T, **options)`` (optional; the default takes any T >= 1): raise unless
  the layer runs on T tokens. ``model.check_model_inputs`` calls both before any layer
  runs, so the backends refuse what the reference refuses.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class InitSettings(NamedTuple):
    """Model-level initialisation settings handed to every layer's ``init``."""

    scale: float = 0.002      # variance-scaling scale; a layer uses scale / n_layers
    n_layers: int = 1         # K, the depth the scale is divided by
    dtype: object = np.float32
    xp: object = np


class LayerType:
    """Base class of a layer type. Subclasses set ``kind``, ``OPTIONS``,
    ``PARAM_OPTIONS`` and implement the methods listed in the module docstring."""

    kind = None
    OPTIONS = {}
    PARAM_OPTIONS = ()

    def check_options(self, options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"layer {self.kind!r} has no option(s) {unknown}; its options are "
                             f"{sorted(self.OPTIONS)}")
        return {**self.OPTIONS, **options}

    def call_options(self, options):
        """The options that change the function (passed to forward and oracle)."""
        return {k: v for k, v in options.items() if k not in self.PARAM_OPTIONS}

    def param_type(self, **options):
        raise NotImplementedError

    def init(self, rng, D_in, settings, **options):
        raise NotImplementedError

    def out_width(self, D_in, **options):
        return D_in

    def forward(self, E, params, **options):
        raise NotImplementedError

    def backward(self, dout, cache):
        raise NotImplementedError

    def oracle(self, E, params, **options):
        raise NotImplementedError

    def cache_floats(self, T, D_in, **options):
        """Floats per task that the forward allocates and keeps in its cache and output
        (not its input E); multiply by B and the item size for bytes."""
        raise NotImplementedError

    def check_params(self, params, D_in, **options):
        raise NotImplementedError

    def check_tokens(self, T, **options):
        """Raise unless the layer runs on T tokens (any T >= 1 by default)."""

    def param_floats(self, D_in, **options):
        """Numbers in the parameters ``init`` draws (no array is made)."""
        raise NotImplementedError


_REGISTRY = {}


def register(layer_type):
    """Add a :class:`LayerType` instance to the registry under its ``kind``."""
    if not isinstance(layer_type, LayerType) or not isinstance(layer_type.kind, str):
        raise TypeError(f"register() takes a LayerType instance with a str kind, got {layer_type!r}")
    if layer_type.kind in _REGISTRY:
        raise ValueError(f"layer kind {layer_type.kind!r} is registered twice")
    _REGISTRY[layer_type.kind] = layer_type
    return layer_type


def unregister(kind):
    """Remove a layer kind (for tests and plug-ins that registered one temporarily)."""
    if kind not in _REGISTRY:
        raise ValueError(f"layer kind {kind!r} is not registered")
    del _REGISTRY[kind]


def get_layer(kind):
    """The registered :class:`LayerType` called ``kind``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown layer kind {kind!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[kind]


def layer_types():
    """Every registered layer type, by kind (a copy)."""
    return dict(_REGISTRY)


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a model: its kind and its options (every option, defaults filled in,
    stored as sorted (name, value) pairs so a spec is hashable and compares by value)."""

    kind: str
    options: tuple = ()

    def __post_init__(self):
        if not isinstance(self.kind, str):
            raise TypeError(f"kind must be a str, got {type(self.kind).__name__}")
        opts = dict(self.options)
        full = get_layer(self.kind).check_options(opts)
        object.__setattr__(self, "options", tuple(sorted(full.items())))

    @property
    def layer(self):
        return get_layer(self.kind)

    @property
    def opts(self):
        """All options as a dict."""
        return dict(self.options)

    @property
    def call_opts(self):
        """The options passed to forward and oracle."""
        return self.layer.call_options(self.opts)

    def param_type(self):
        return self.layer.param_type(**self.opts)

    def init(self, rng, D_in, settings):
        return self.layer.init(rng, D_in, settings, **self.opts)

    def forward(self, E, params):
        return self.layer.forward(E, params, **self.call_opts)

    def backward(self, dout, cache):
        return self.layer.backward(dout, cache)

    def oracle(self, E, params):
        return self.layer.oracle(E, params, **self.call_opts)

    def out_width(self, D_in):
        return self.layer.out_width(D_in, **self.opts)

    def cache_floats(self, T, D_in):
        return self.layer.cache_floats(T, D_in, **self.opts)

    def check_params(self, params, D_in):
        return self.layer.check_params(params, D_in, **self.opts)

    def check_tokens(self, T):
        return self.layer.check_tokens(T, **self.opts)

    def param_floats(self, D_in):
        return self.layer.param_floats(D_in, **self.opts)

    def to_dict(self):
        return {"kind": self.kind, **self.opts}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        kind = d.pop("kind")
        return cls(kind, tuple(d.items()))

    def __repr__(self):
        changed = {k: v for k, v in self.opts.items() if self.layer.OPTIONS.get(k) != v}
        return f"LayerSpec({self.kind!r}, {changed})" if changed else f"LayerSpec({self.kind!r})"


# ---- the registered layer types ---------------------------------------------------------
from .lsa import LSA  # noqa: E402
from .softmax import Softmax  # noqa: E402
from .mlp import MLP  # noqa: E402
from .embed import Embed  # noqa: E402
from .posenc import PosEnc  # noqa: E402
from .pre_ln import PreLN  # noqa: E402
from .mesa import Mesa  # noqa: E402
from .delta import Delta  # noqa: E402
from .gd import GD  # noqa: E402

register(LSA())
register(Softmax())
register(MLP())
register(Embed())
register(PosEnc())
register(PreLN())
register(Mesa())
register(Delta())
register(GD())

__all__ = ["InitSettings", "LayerType", "LayerSpec", "register", "unregister", "get_layer", "layer_types"]
