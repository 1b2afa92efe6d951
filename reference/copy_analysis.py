"""Copy diagnostics of a model on classic tokens (von Oswald et al. ICML 2023, Sec. 4):
how much the first attention layer's update at token j depends on token j itself, on
the next token and on the others, and the attention maps of every attention layer.

Definitions (for tokens E = layout.build(X, Y, x_q), E (B, T, D_in), and the attention
layer k1, by default the first layer of kind lsa, softmax or pre_ln):

    Delta_j = h_{k1}[j] - h_{k1-1}[j]            the layer's update at token j (its output minus
                                                 its input, width D_k), h_{-1} = E
    s[b, j, i] = || d Delta_j / d E[b, i] ||_F   (D_k x D_in) Jacobian w.r.t. the model's input
                                                 token i (through the layers before k1, e.g. the
                                                 positional encodings), Frobenius norm

    self  = mean_b mean_{j in J} s[b, j, j]
    next  = mean_b mean_{j in J} s[b, j, j + 1]
    other = mean_b mean_{j in J} mean_{i not in {j, j+1}} s[b, j, i]

J = the x tokens (positions 0, 2, ..., 2N - 2: each one's next token carries its label;
``tokens="x"``) or every context token (0 .. T-2; ``tokens="context"``). The derivatives
are taken w.r.t. the bare tokens, so a positional encoding, which is a constant, has
none. An exact copy (``reference.copy_construction.copy_layer``) has self = other = 0 and
next = sqrt(d_y) (the identity from the label features to the copy channels).

Jacobians by complex step (one forward of the layers up to k1 per input feature: T * D_in
forwards, no (T, T) Jacobian held per task), or central differences for a check.

Not here: the construction (``copy_construction.py``), the layout (``classic_tokens.py``).
"""

import numpy as np

from ._checks import check_int
from .model import Arch, check_model_params, model_forward
from .tasks import Tasks
from .tokens import TokenLayout
from .tree import tree_map

ATTENTION_KINDS = ("lsa", "softmax")
SENSITIVITY_TOKENS = ("x", "context")


def attention_layers(arch):
    """Indices of the layers of ``arch`` that attend: kinds lsa and softmax, and pre_ln
    around an lsa or softmax block."""
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    return [k for k, s in enumerate(arch.layers)
            if s.kind in ATTENTION_KINDS or (s.kind == "pre_ln" and s.opts.get("block") in ATTENTION_KINDS)]


def _check_inputs(params, arch, layout, tasks):
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout (e.g. a ClassicLayout), got {type(layout).__name__}")
    if not isinstance(tasks, Tasks):
        raise TypeError(f"tasks must be a reference.tasks.Tasks, got {type(tasks).__name__}")
    check_model_params(params, arch, layout.D_in)
    if arch.widths(layout.D_in)[-1] != layout.D:
        raise ValueError(f"layout reads width {layout.D}, but the model's output width is "
                         f"{arch.widths(layout.D_in)[-1]}")
    if not attention_layers(arch):
        raise ValueError(f"the model has no attention layer (kinds {list(arch.kinds())})")


def _tokens(params, layout, tasks):
    """Tokens in the params' dtype (float64 when the params are float64)."""
    dt = np.result_type(*[a.dtype for p in params for a in p if a is not None]) if any(
        len(p) for p in params) else np.float64
    return layout.build(*(np.asarray(a, dtype=dt) for a in (tasks.X, tasks.Y, tasks.x_q)))


def _prefix(arch, params, k1):
    """(Arch of layers 0..k1, their params)."""
    tie = arch.tie[: k1 + 1]
    return Arch(arch.layers[: k1 + 1], tie), tuple(params[: max(tie) + 1])


def _update(E, params, arch):
    """Delta (B, T, D_k) of the prefix's last layer: its output minus its input."""
    out, cache = model_forward(E, params, arch)
    before = E if arch.n_layers == 1 else cache.outputs[-2]
    return out - before


def update_jacobian_norms(params, arch, layout, tasks, layer=None, method="complex_step", h=None):
    """s (B, T, T): s[b, j, i] = ||d Delta_j / d E[b, i]||_F (module docstring) for the
    attention layer ``layer`` (index into arch.layers; None: the first attention layer)."""
    _check_inputs(params, arch, layout, tasks)
    att = attention_layers(arch)
    k1 = att[0] if layer is None else check_int("layer", layer, 0, arch.n_layers - 1)
    if k1 not in att:
        raise ValueError(f"layer {k1} is a {arch.layers[k1].kind!r} layer, not an attention layer (those: {att})")
    if method not in ("complex_step", "central_diff"):
        raise ValueError(f"method must be 'complex_step' or 'central_diff', got {method!r}")
    E = _tokens(params, layout, tasks)                                 # (B, T, D_in)
    pre_arch, pre_params = _prefix(arch, params, k1)
    B, T, D_in = E.shape
    s2 = np.zeros((B, T, T))                                           # squared norms
    if method == "complex_step":
        h = 1e-30 if h is None else h
        Ec = E.astype(np.complex128)
        pc = tree_map(lambda a: np.asarray(a, dtype=np.complex128), pre_params)
    else:
        h = 1e-6 if h is None else h
    for i in range(T):
        for a in range(D_in):
            if method == "complex_step":
                Ep = Ec.copy()
                Ep[:, i, a] += 1j * h
                col = _update(Ep, pc, pre_arch).imag / h               # (B, T, D_k) dDelta / dE[:, i, a]
            else:
                Ep, Em = E.copy(), E.copy()
                Ep[:, i, a] += h
                Em[:, i, a] -= h
                col = (_update(Ep, pre_params, pre_arch) - _update(Em, pre_params, pre_arch)) / (2 * h)
            s2[:, :, i] += np.sum(col * col, axis=2)
    return np.sqrt(s2)


def copy_sensitivities(params, arch, layout, tasks, layer=None, tokens="x", method="complex_step"):
    """dict(self=, next=, other=, matrix=) of the module docstring: three floats and the
    (T, T) task-averaged norms ``matrix[j, i] = mean_b s[b, j, i]``. ``tokens``: "x" (the
    x tokens of classic tokens) or "context" (every token but the query)."""
    if tokens not in SENSITIVITY_TOKENS:
        raise ValueError(f"tokens must be one of {SENSITIVITY_TOKENS}, got {tokens!r}")
    s = update_jacobian_norms(params, arch, layout, tasks, layer, method)    # (B, T, T)
    T = s.shape[1]
    if tokens == "x":
        if T % 2 != 1 or T < 3:
            raise ValueError(f"tokens='x' needs classic tokens (T = 2N + 1 >= 3), got T={T}")
        J = list(range(0, T - 1, 2))
    else:
        J = list(range(T - 1))
    self_ = float(np.mean([s[:, j, j] for j in J]))
    nxt = float(np.mean([s[:, j, j + 1] for j in J]))
    other = float(np.mean([np.mean(s[:, j, [i for i in range(T) if i not in (j, j + 1)]], axis=1)
                           for j in J])) if T > 2 else 0.0
    return {"self": self_, "next": nxt, "other": other, "matrix": s.mean(axis=0)}


def attention_maps(params, arch, layout, tasks):
    """The attention weights of every attention layer (:func:`attention_layers`, in
    order), per head, averaged over the tasks: a list of (H, T, S) arrays. Softmax
    layers: the softmax weights; LSA layers: the scores (W_K e_i) . (W_Q e_j) (linear
    attention has no normalisation); a pre_ln layer: its block's."""
    _check_inputs(params, arch, layout, tasks)
    E = _tokens(params, layout, tasks)
    _, cache = model_forward(E, params, arch)
    maps = []
    for k in attention_layers(arch):
        c = cache.layer_caches[k]
        c = getattr(c, "block_cache", c)                               # pre_ln: the wrapped block's cache
        maps.append(np.asarray(c.A.real).mean(axis=0))                 # (H, T, S)
    return maps
