"""What each golden-vector kind is: the npz key format of parameter trees, the
reference computation of every kind (``COMPUTE``), and the schema of its inputs and
outputs (``KINDS``: data vs configuration, dtypes, ranges and limits) that the manifest
publishes and ``verify.golden``'s checker and the conformance kit read. The cases and
their seeded inputs are ``verify.golden_cases``; writing and checking the files is
``verify.golden``."""

import re
from typing import NamedTuple

import numpy as np

import reference as R
from reference.backends.numpy_backend import make_stepper
from reference.layers.embed import EmbedParams
from reference.layers.layernorm import layernorm_backward, layernorm_forward
from reference.layers.mlp import MLPParams
from reference.layers.posenc import PosEncParams, positional_encoding
from reference.layers.softmax import SoftmaxParams
from reference.optim import AdamHP, AdamState, adam_init, adam_update
from reference.tokens import EmbeddedLayout
from reference.tree import tree_leaves, tree_paths, tree_unflatten



# --------------------------------------------------------------------------------
# Parameter naming: parameter trees (reference.tree) <-> npz keys
# --------------------------------------------------------------------------------
# A tree's leaves are walked and named by reference.tree (tree_leaves, tree_paths
# "<i>.<field>", tree_unflatten); the vector files spell the path of leaf <i>.<field>
# with one of these formats (g = "d" for gradients, "" otherwise):

STACK_KEY = "{prefix}layer{i}.{g}{field}"   # a stack's tree: layer0.W_Q, m.layer1.P, layer0.dW_Q
LAYER_KEY = "{prefix}{g}{field}"            # a one-layer case: W_Q, dW_Q (the tree (p,))


def tree_keys(tree, prefix="", grad=False, key=STACK_KEY):
    """The npz key of each of ``tree_leaves(tree)``, from its path ``"<i>.<field>"``."""
    keys = []
    for path in tree_paths(tree):
        i, field = path.split(".", 1)
        keys.append(key.format(prefix=prefix, i=i, g="d" if grad else "", field=field))
    return keys


def tree_arrays(tree, prefix="", grad=False, key=STACK_KEY):
    """``{npz key: leaf}`` for a parameter tree, in ``tree_leaves`` order."""
    return dict(zip(tree_keys(tree, prefix, grad, key), tree_leaves(tree)))


def read_tree(arrays, types, prefix="", grad=False, key=STACK_KEY):
    """The tree with one layer of each NamedTuple class in ``types`` stored by
    :func:`tree_arrays`. The skeleton's leaves are its field names (only its structure
    is used: the keys and the order)."""
    like = tuple(tp(*tp._fields) for tp in types)
    return tree_unflatten(like, [np.asarray(arrays[k]) for k in tree_keys(like, prefix, grad, key)])


def _stored_type(arrays, prefix, grad, key, i=0):
    """MergedParams if layer ``i`` is stored merged (``W_KQ``), else LSAParams."""
    merged = key.format(prefix=prefix, i=i, g="d" if grad else "", field="W_KQ") in arrays
    return R.MergedParams if merged else R.LSAParams


def layer_arrays(p, prefix="", grad=False):
    """Keys ``<prefix>W_Q`` ... (``<prefix>dW_Q`` ... for gradients) for one layer."""
    return tree_arrays((p,), prefix, grad, LAYER_KEY)


def stack_arrays(layers, prefix="", grad=False):
    """Keys ``<prefix>layer<k>.<name>`` (``.d<name>`` for gradients) for a tuple of layers."""
    return tree_arrays(layers, prefix, grad, STACK_KEY)


def read_layer(arrays, prefix="", grad=False):
    """One layer from keys ``<prefix>W_Q`` ... (factored) or ``<prefix>W_KQ`` ... (merged)."""
    return read_tree(arrays, [_stored_type(arrays, prefix, grad, LAYER_KEY)], prefix, grad, LAYER_KEY)[0]


def read_stack(arrays, prefix="", grad=False):
    """The tuple of layers stored under ``<prefix>layer0.``, ``<prefix>layer1.``, ..."""
    pat = re.compile(re.escape(prefix) + r"layer(\d+)\.")
    n = 1 + max(int(m.group(1)) for m in (pat.match(k) for k in arrays) if m)
    types = [_stored_type(arrays, prefix, grad, STACK_KEY, i) for i in range(n)]
    return read_tree(arrays, types, prefix, grad, STACK_KEY)


def _scalar(x):
    return np.asarray(x)[()]


def _clip_arg(x):
    """Stored clip (+inf = none) -> the reference's argument (None = none)."""
    c = float(x)
    return None if np.isinf(c) else c


def _arch(a):
    return R.lsa_stack(int(a["K"]), recurrent=bool(a["recurrent"]), causal=bool(a["causal"]), clip=_clip_arg(a["clip"]))


# --------------------------------------------------------------------------------
# The reference computation of each kind: stored inputs -> outputs
# --------------------------------------------------------------------------------

def compute_layer(a):
    """One LSA layer and its backward for the upstream gradient ``dout``."""
    p = read_layer(a)
    out, cache = R.lsa_forward(a["E"], p, causal=bool(a["causal"]), clip=_clip_arg(a["clip"]))
    dE, dp = R.lsa_backward(a["dout"], cache)
    return {"out": out, "dE": dE, **layer_arrays(dp, grad=True)}


def compute_stack(a):
    """A K-layer stack and its backward for the upstream gradient ``dout`` on E_K."""
    out, cache = R.model_forward(a["E"], read_stack(a), _arch(a))
    dE, grads = R.model_backward(a["dout"], cache)
    return {"out": out, "dE": dE, **stack_arrays(grads, grad=True)}


def compute_loss(a):
    """Readout, 0.5 * MSE loss and the loss gradient for E and every parameter."""
    layout = R.TokenLayout(int(a["d"]), a["y_q"].shape[1])
    L, grads, aux = R.loss_and_grads(a["E"], a["y_q"], read_stack(a), _arch(a), layout)
    return {"pred": aux["pred"], "L": np.asarray(L, dtype=np.float64), "dE": aux["dE"], **stack_arrays(grads, grad=True)}


def compute_gd(a):
    """The Prop. 1 construction (K layers, recurrent or separate) against explicit GD-K."""
    X, Y, x_q, W_0 = a["X"], a["Y"], a["x_q"], a["W_0"]
    B, N, d = X.shape
    d_y = Y.shape[2]
    eta, K = float(a["eta"]), int(a["K"])
    params, arch = R.gd_stack(K, d, d_y, N, eta, W_0, recurrent=bool(a["recurrent"]))
    layout = R.TokenLayout(d, d_y)
    E = layout.build(X, Y, x_q, W_0=W_0)                               # (B, T, D)
    out, _ = R.model_forward(E, params, arch)
    pred_gd, W_gd = R.gd_predict(X, Y, x_q, eta, K, W_0=W_0)
    return {"E": E, **stack_arrays(params), "out": out, "pred": layout.readout(out), "pred_gd": pred_gd, "W_gd": W_gd}


def compute_gdpp(a):
    """The GD++ construction (separate layers, one (eta_k, gamma_k) each) against its recursion."""
    X, Y, x_q, W_0 = a["X"], a["Y"], a["x_q"], a["W_0"]
    B, N, d = X.shape
    etas, gammas = [float(e) for e in a["etas"]], [float(g) for g in a["gammas"]]
    params, arch = R.gdpp_stack(d, Y.shape[2], N, etas, gammas, W_0)
    layout = R.TokenLayout(d, Y.shape[2])
    E = layout.build(X, Y, x_q, W_0=W_0)                               # (B, T, D)
    out, _ = R.model_forward(E, params, arch)
    pred_gdpp = R.gdpp_predict(X, Y, x_q, etas, gammas, W_0=W_0)
    return {"E": E, **stack_arrays(params), "out": out, "pred": layout.readout(out), "pred_gdpp": pred_gdpp}


def _hp(a):
    return AdamHP(lr=float(a["lr"]), b1=float(a["b1"]), b2=float(a["b2"]), eps=float(a["eps"]),
                  clip_norm=_clip_arg(a["clip_norm"])).validate()


def compute_adam(a):
    """One global-norm-clipped Adam step from a given state."""
    params, grads = read_stack(a), read_stack(a, grad=True)
    state = AdamState(read_stack(a, "m."), read_stack(a, "v."), int(a["t"]))
    new, st, norm = adam_update(params, grads, state, _hp(a))
    return {**stack_arrays(new, "new."), **stack_arrays(st.m, "new_m."), **stack_arrays(st.v, "new_v."),
            "new_t": np.asarray(st.t, dtype=np.int64), "grad_norm": np.asarray(norm, dtype=np.float64)}


def compute_train(a):
    """``n_steps`` steps of the numpy backend's stepper (float64), tasks of step s from
    default_rng([seed, s]); records each step's tasks, loss and pre-clip gradient norm."""
    spec = R.TaskSpec(d=int(a["d"]), N=int(a["N"]), d_y=int(a["d_y"]), B=int(a["B"]),
                      x_range=tuple(float(v) for v in a["x_range"]), w_scale=float(a["w_scale"]),
                      noise_std=float(a["noise_std"]), n_distractors=int(a["n_distractors"]))
    stepper = make_stepper(_arch(a), _hp(a), spec, int(a["seed"]), dtype=np.float64)
    params = read_stack(a)
    state = adam_init(params)
    out, losses, norms = {}, [], []
    for s in range(int(a["n_steps"])):
        t = stepper.sample(s)
        out.update({f"step{s}.{f}": getattr(t, f) for f in ("X", "Y", "x_q", "y_q")})
        res = stepper.step(params, state, s)
        params, state = res.params, res.state
        losses.append(res.loss)
        norms.append(res.grad_norm)
    return {"losses": np.array(losses), "grad_norms": np.array(norms), **out, **stack_arrays(params, "final.")}


def compute_tasks(a):
    """sample_tasks(step_rng(seed, step), ...): the sampler's draw order, bit for bit."""
    t = R.sample_tasks(R.step_rng(int(a["seed"]), int(a["step"])), int(a["B"]), int(a["d"]), int(a["N"]), int(a["d_y"]),
                       x_range=tuple(float(v) for v in a["x_range"]), w_scale=float(a["w_scale"]),
                       noise_std=float(a["noise_std"]), n_distractors=int(a["n_distractors"]))
    return dict(zip(t._fields, t))


def compute_init(a):
    """init_lsa_params(default_rng(seed), D, ...) in float64; ``merged`` (default false),
    ``key_size`` and ``value_size`` (default D) may be absent."""
    size = {k: int(a[k]) if k in a else None for k in ("key_size", "value_size")}
    p = R.init_lsa_params(np.random.default_rng(int(a["seed"])), int(a["D"]), H=int(a["H"]), **size,
                          n_layers_for_scale=int(a["K"]), scale=float(a["scale"]), dtype=np.float64,
                          merged=bool(a["merged"]) if "merged" in a else False)
    return layer_arrays(p)


def compute_baselines(a):
    """GD-K (eta scalar or one per step), least squares, ridge and the eta line search on the same tasks."""
    X, Y, x_q, y_q = a["X"], a["Y"], a["x_q"], a["y_q"]
    n = int(a["n_steps"])
    eta = float(a["eta"]) if a["eta"].ndim == 0 else [float(e) for e in a["eta"]]   # one eta, or one per step
    pred_gd, W_gd = R.gd_predict(X, Y, x_q, eta, n)
    eta_ls, losses = R.line_search_eta(X, Y, x_q, y_q, n_steps=n, grid=a["eta_grid"])
    return {"pred_gd": pred_gd, "W_gd": W_gd, "pred_ls": R.least_squares_predict(X, Y, x_q),
            "pred_ridge": R.least_squares_predict(X, Y, x_q, ridge=float(a["ridge"])),
            "eta_ls": np.asarray(eta_ls), "losses_ls": losses}


def compute_eta(a):
    """Moments of U(low, high), the closed-form optimal one-step eta and the expected loss."""
    d, N, d_y = int(a["d"]), int(a["N"]), int(a["d_y"])
    w_scale, noise = float(a["w_scale"]), float(a["noise_std"])
    m2, m4 = R.uniform_moments(tuple(float(v) for v in a["x_range"]))
    eta_star, L_star = R.optimal_one_step_eta(d, N, m2, m4, w_scale, d_y, noise)
    L_eta = R.expected_one_step_loss(float(a["eta"]), d, N, m2, m4, w_scale, d_y, noise)
    return {"m2": np.asarray(m2), "m4": np.asarray(m4), "eta_star": np.asarray(eta_star),
            "L_star": np.asarray(L_star), "L_eta": np.asarray(L_eta)}


# The layer types after LSA (reference/layers/: softmax, mlp, pre_ln with layernorm,
# embed, posenc), added in format version 1. One layer and its backward for ``dout``;
# keys are the parameters' field names (``W_1``, ``ln_scale``), gradients with a ``d``.

def _layer_case(spec, params, a):
    """Forward of one layer spec and its backward for a["dout"]: out, dE, d<field>."""
    out, cache = spec.forward(a["E"], params)
    dE, dp = spec.backward(a["dout"], cache)
    return {"out": out, "dE": dE, **layer_arrays(dp, grad=True)}


def read_params(a, tp, prefix=""):
    """The NamedTuple ``tp`` whose fields are the arrays ``a[prefix + field]``."""
    return tp(*(a[prefix + f] for f in tp._fields))


def compute_softmax_layer(a):
    """One softmax attention layer (causal, clip) and its backward."""
    spec = R.LayerSpec("softmax", (("causal", bool(a["causal"])), ("clip", _clip_arg(a["clip"]))))
    return _layer_case(spec, read_params(a, SoftmaxParams), a)


def compute_mlp_layer(a):
    """The residual MLP (tanh or erf GELU, clip) with biases (zero biases: no bias) and its backward."""
    spec = R.LayerSpec("mlp", (("gelu", "erf" if bool(a["gelu_erf"]) else "tanh"), ("clip", _clip_arg(a["clip"]))))
    return _layer_case(spec, read_params(a, MLPParams), a)


def compute_layernorm(a):
    """LayerNorm of every token (eps) and its backward."""
    out, cache = layernorm_forward(a["E"], a["ln_scale"], a["ln_offset"], float(a["eps"]))
    dE, dscale, doffset = layernorm_backward(a["dout"], cache)
    return {"out": out, "dE": dE, "dln_scale": dscale, "dln_offset": doffset}


def _pre_ln_spec(block, block_options, a):
    return R.LayerSpec("pre_ln", (("block", block), ("block_options", block_options), ("eps", float(a["eps"])),
                                  ("clip", _clip_arg(a["clip"]))))


def compute_pre_ln_attention(a):
    """A pre-LN attention block e + f(LN(e)), softmax or linear (LSA), and its backward."""
    block = "softmax" if bool(a["softmax"]) else "lsa"
    spec = _pre_ln_spec(block, (("causal", bool(a["causal"])),), a)
    return _layer_case(spec, read_params(a, spec.param_type()), a)


def compute_pre_ln_mlp(a):
    """A pre-LN MLP block e + MLP(LN(e)) and its backward."""
    spec = _pre_ln_spec("mlp", (("gelu", "erf" if bool(a["gelu_erf"]) else "tanh"),), a)
    return _layer_case(spec, read_params(a, spec.param_type()), a)


def compute_posenc(a):
    """The encoding table pe (T, width), tokens with it added or concatenated, and dE."""
    E, P, concat = a["E"], int(a["width"]), bool(a["concat"])
    if not concat and P != E.shape[2]:
        raise ValueError(f"width {P} must be the token width {E.shape[2]} when concat is false")
    spec = R.LayerSpec("posenc", (("mode", "concat"), ("width", P)) if concat else ())
    out, cache = spec.forward(E, PosEncParams())
    dE, _ = spec.backward(a["dout"], cache)
    return {"pe": positional_encoding(E.shape[1], P), "out": out, "dE": dE}


EMBEDDED_TYPES = (EmbedParams, MLPParams, R.LSAParams)


def _embedded_arch(a):
    gelu = "erf" if bool(a["gelu_erf"]) else "tanh"
    D_model, w = a["layer0.W"].shape[0], a["layer1.W_1"].shape[0]
    return R.Arch((R.LayerSpec("embed", (("width", int(D_model)), ("bias", True))),
                   R.LayerSpec("mlp", (("width", int(w)), ("gelu", gelu))), R.LayerSpec("lsa")))


def compute_embedded_loss(a):
    """The sine-task model shape: embed (W, b) to width D_model, residual MLP, one LSA
    layer; pred = minus the last d_y features of the query; loss and every gradient."""
    layers = read_tree(a, EMBEDDED_TYPES)
    d_y = a["y_q"].shape[1]
    layout = EmbeddedLayout(a["E"].shape[2] - d_y, d_y, width=int(a["layer0.W"].shape[0]))
    L, grads, aux = R.loss_and_grads(a["E"], a["y_q"], layers, _embedded_arch(a), layout)
    return {"pred": aux["pred"], "L": np.asarray(L, dtype=np.float64), "dE": aux["dE"], **stack_arrays(grads, grad=True)}


COMPUTE = {"layer": compute_layer, "stack": compute_stack, "loss": compute_loss, "gd": compute_gd,
           "gdpp": compute_gdpp, "adam": compute_adam, "train": compute_train, "tasks": compute_tasks,
           "init": compute_init, "baselines": compute_baselines, "eta": compute_eta,
           "softmax_layer": compute_softmax_layer, "mlp_layer": compute_mlp_layer, "layernorm": compute_layernorm,
           "pre_ln_attention": compute_pre_ln_attention, "pre_ln_mlp": compute_pre_ln_mlp, "posenc": compute_posenc,
           "embedded_loss": compute_embedded_loss}


def compute_causal_gd(a):
    """Sequence tokens (spec layout with Phi_0, the code's layout), the causal Prop. 1 layer,
    its output and readout, explicit GD per token, the masked code-layout step and the
    sequence loss (SPEC.md section 15)."""
    from reference import causal_constructions as CC
    from reference import sequences as S

    X, Y, P0, eta = a["X"], a["Y"], a["Phi_0"], float(a["eta"])
    d = X.shape[2]
    E = S.seq_tokens(X, P0)
    p = CC.causal_gd_layer(d, eta, P0)
    out, _ = R.lsa_forward(E, p, causal=True)
    E_code = S.code_tokens(X)
    out_code, _ = R.lsa_forward(S.mask_forward(E_code, 2 * d)[0], CC.causal_gd_layer(d, eta, layout="code"), causal=True)
    L, per_t, _ = S.seq_loss_forward(out[..., :d], Y)
    return {"E": E, **layer_arrays(p), "out": out, "pred": out[..., :d], "pred_gd": CC.causal_gd_predict(X, eta, P0),
            "E_code": E_code, "pred_code": out_code[..., :d], "L": np.asarray(L), "per_t": per_t}


COMPUTE["causal_gd"] = compute_causal_gd      # mesa paper (SPEC.md section 15)


# The mesa layer and the delta rule (SPEC.md section 16): the form of the computation is
# an int64 code, the index into these tuples (a port needs no string inputs).
MESA_FORMS = ("sm", "direct", "cg")
DELTA_FORMS = ("recurrent", "chunked")
DELTA_GATING = ("w_beta", "b_beta", "w_alpha", "b_alpha")


def compute_mesa_layer(a):
    """One mesa layer (forget factor, form sm / direct / cg with the default CG settings)
    and its backward (SPEC.md section 16)."""
    spec = R.LayerSpec("mesa", (("forget", float(a["forget"])), ("form", MESA_FORMS[int(a["form"])])))
    return _layer_case(spec, read_params(a, spec.param_type()), a)


def delta_spec(a):
    """The delta-rule layer spec of stored inputs: beta learned (no ``beta`` input) or
    fixed, gate, form and chunk (default 16)."""
    options = (("beta", float(a["beta"]) if "beta" in a else None), ("gate", bool(a["gate"])),
               ("form", DELTA_FORMS[int(a["form"])]), ("chunk", int(a["chunk"]) if "chunk" in a else 16))
    spec = R.LayerSpec("delta", options)
    want = [f for f in spec.param_type()._fields if f in DELTA_GATING]
    have = [f for f in DELTA_GATING if f in a]
    if have != want:
        raise ValueError(f"delta rule with beta {'fixed' if 'beta' in a else 'learned'} and gate "
                         f"{bool(a['gate'])} has the step/gate parameters {want}, the inputs give {have}")
    return spec


def compute_delta_layer(a):
    """One delta-rule layer (DeltaNet / Gated DeltaNet) and its backward (SPEC.md section 16)."""
    spec = delta_spec(a)
    return _layer_case(spec, read_params(a, spec.param_type()), a)


COMPUTE["mesa_layer"] = compute_mesa_layer    # SPEC.md section 16
COMPUTE["delta_layer"] = compute_delta_layer


# --------------------------------------------------------------------------------
# Kinds: what each kind reads and writes (written into the manifest as "kinds")
# --------------------------------------------------------------------------------
# An input is *data* (float64 arrays, finite, small) or *configuration* (0-d or short
# 1-d arrays of a fixed dtype within a range). The checker refuses any input that is
# neither, and computes the outputs itself, so a stored output set that differs from
# the computed one fails. The ranges bound the work a forged file can ask for.

PLACEHOLDERS = {
    "<param>": "a parameter of one LSA layer: W_Q, W_K, W_V, P (factored) or W_KQ, W_PV (merged)",
    "<k>": "a parameter-set index 0, 1, ...: K sets for a separate stack, 1 for a recurrent one; "
           "as many as the case stores for adam",
    "<s>": "a training step 0 .. n_steps - 1",
    "<gating>": "a parameter of the delta rule's step size and gate: w_beta, b_beta (beta learned, no beta input), "
                "w_alpha, b_alpha (gate true)",
}
_PLACEHOLDER_RE = {"<param>": "(?:W_Q|W_K|W_V|P|W_KQ|W_PV)", "<k>": "(?:0|[1-9][0-9]?)", "<s>": "(?:0|[1-9][0-9]{0,2})",
                   "<gating>": "(?:w_beta|b_beta|w_alpha|b_alpha)"}
MAX_DIM = 32              # every dimension of a data input
MAX_DATA = 4096           # entries of one data input
MAX_LIST = 1024           # entries of a 1-d configuration input (eta_grid)
MAX_FILE_BYTES = 1 << 22  # one npz on disk, and all its arrays unpacked
MAX_MANIFEST_BYTES = 1 << 22
LIMITS = (f"data inputs: float64, finite, every dimension <= {MAX_DIM}, <= {MAX_DATA} entries; 1-d configuration "
          f"<= {MAX_LIST} entries; an npz <= {MAX_FILE_BYTES} bytes on disk and unpacked")


class Config(NamedTuple):
    """One configuration input: ``dtype`` bool, int64 or float64; ``shape`` "()",
    "(2,)", "(n,)" (1-d, 1 .. MAX_LIST entries) or "() or (n_steps,)"; bounds ``lo``
    (exclusive when ``strict``) and ``hi``; ``inf`` accepts +inf ("no clipping");
    ``default``: the value when absent (None: required)."""
    dtype: str
    shape: str = "()"
    lo: float = None
    hi: float = None
    strict: bool = False
    inf: bool = False
    default: object = None

    def bounds(self):
        low = "" if self.lo is None else f"{'>' if self.strict else '>='} {self.lo:g}"
        high = "" if self.hi is None else f"<= {self.hi:g}" if isinstance(self.hi, float) else f"<= {self.hi}"
        return ", ".join(t for t in (low, high) if t)

    def describe(self):
        return "; ".join(t for t in (f"{self.dtype} {self.shape}", self.bounds(), "+inf: no clipping" if self.inf else "",
                                     "" if self.default is None else f"optional, default {self.default}") if t)

    def problem(self, name, a, inputs):
        """Why ``a`` is not a valid value of this input (None when it is)."""
        if a.dtype.name != self.dtype:
            return f"{name} has dtype {a.dtype.name}, configuration {self.dtype}"
        if self.shape == "(n,)":
            ok = a.ndim == 1 and 1 <= a.size <= MAX_LIST
        elif self.shape == "() or (n_steps,)":
            ok = a.shape in ((), (_int_or(inputs.get("n_steps"), -1),))
        else:
            ok = a.shape == {"()": (), "(2,)": (2,)}[self.shape]
        if not ok:
            return f"{name} has shape {a.shape}, configuration {self.shape}"
        if self.dtype == "bool":
            return None
        v = a.astype(np.float64)
        if np.any(np.isnan(v)) or np.any(v == -np.inf) or (not self.inf and np.any(v == np.inf)):
            return f"{name} = {a.tolist()} is not {'finite or +inf' if self.inf else 'finite'}"
        v = v[np.isfinite(v)]
        low = self.lo is not None and np.any(v <= self.lo if self.strict else v < self.lo)
        if low or (self.hi is not None and np.any(v > self.hi)):
            return f"{name} = {a.tolist()} is outside {self.bounds()}"
        return None


def _int_or(a, default):
    return int(a) if isinstance(a, np.ndarray) and a.shape == () and a.dtype.kind == "i" else default


class Kind(NamedTuple):
    computes: str     # one line, with the SPEC.md section
    data: tuple       # data input keys, with placeholders
    config: dict      # configuration input name -> Config
    outputs: tuple    # output keys, with placeholders


_BOOL, _CLIP = Config("bool"), Config("float64", lo=0.0, strict=True, inf=True)
_SEED = Config("int64", lo=0, hi=2 ** 63 - 1)
_SIZE = Config("int64", lo=1, hi=MAX_DIM)
_LAYERS = Config("int64", lo=1, hi=8)
_REAL = Config("float64", lo=-1e6, hi=1e6)
_NONNEG = Config("float64", lo=0.0, hi=1e6)
_TASK_SPEC = {"d": _SIZE, "N": _SIZE, "d_y": Config("int64", lo=1, hi=8), "B": _SIZE,
              "x_range": Config("float64", "(2,)", -1e6, 1e6), "w_scale": _NONNEG, "noise_std": _NONNEG,
              "n_distractors": Config("int64", lo=0, hi=MAX_DIM)}
_UNIT = Config("float64", lo=0.0, hi=1.0)
_ADAM_HP = {"lr": Config("float64", lo=0.0, hi=1.0, strict=True), "b1": _UNIT, "b2": _UNIT, "eps": _UNIT, "clip_norm": _CLIP}
_STACK = {"K": _LAYERS, "recurrent": _BOOL, "causal": _BOOL, "clip": _CLIP}
_EPS = Config("float64", lo=0.0, hi=1.0, strict=True)
_ATTN = ("W_Q", "W_K", "W_V", "P")
_MLP = ("W_1", "b_1", "W_2", "b_2")
_LN = ("ln_scale", "ln_offset")
_EMBEDDED = ("layer0.W", "layer0.b", "layer1.W_1", "layer1.b_1", "layer1.W_2", "layer1.b_2", "layer2.W_Q",
             "layer2.W_K", "layer2.W_V", "layer2.P")


def _d(keys):
    return tuple(f"d{k}" for k in keys)


KINDS = {
    "layer": Kind("one LSA layer out = clip(E + sum_h P_h (A_h v_h)) and its backward for the upstream gradient dout "
                  "(SPEC.md section 4)", ("E", "<param>", "dout"), {"causal": _BOOL, "clip": _CLIP},
                  ("out", "dE", "d<param>")),
    "stack": Kind("K LSA layers (recurrent: one parameter set applied K times) and the backward for dout on E_K "
                  "(SPEC.md section 5)", ("E", "layer<k>.<param>", "dout"), _STACK,
                  ("out", "dE", "layer<k>.d<param>")),
    "loss": Kind("readout pred = -E_K[:, N, d:], L = 0.5 mean_b |pred - y_q|^2 and dL/dE, dL/dparams (SPEC.md sections 3, 5, 6)",
                 ("E", "y_q", "layer<k>.<param>"), {"d": _SIZE, **_STACK},
                 ("pred", "L", "dE", "layer<k>.d<param>")),
    "gd": Kind("the Prop. 1 weights for K GD steps from W_0 (shared by the batch), the tokens with query slot -W_0 x_q, "
               "the stack's output and readout, and explicit GD-K (SPEC.md section 8)",
               ("X", "Y", "x_q", "W_0"), {"eta": _REAL, "K": _LAYERS, "recurrent": _BOOL},
               ("E", "layer<k>.W_Q", "layer<k>.W_K", "layer<k>.W_V", "layer<k>.P", "out", "pred", "pred_gd", "W_gd")),
    "gdpp": Kind("the GD++ weights (separate layers, (etas[k], gammas[k]) each, from W_0), the stack's output and "
                 "readout, and the GD++ recursion (SPEC.md sections 8, 9)",
                 ("X", "Y", "x_q", "W_0"), {"etas": Config("float64", "(n,)", -1e6, 1e6),
                                             "gammas": Config("float64", "(n,)", -1e6, 1e6)},
                 ("E", "layer<k>.W_Q", "layer<k>.W_K", "layer<k>.W_V", "layer<k>.P", "out", "pred", "pred_gdpp")),
    "adam": Kind("one global-norm-clipped Adam step from the state (m, v, t) (SPEC.md section 10)",
                 ("layer<k>.<param>", "layer<k>.d<param>", "m.layer<k>.<param>", "v.layer<k>.<param>"),
                 {"t": Config("int64", lo=0, hi=10 ** 9), **_ADAM_HP},
                 ("new.layer<k>.<param>", "new_m.layer<k>.<param>", "new_v.layer<k>.<param>", "new_t", "grad_norm")),
    "train": Kind("n_steps training steps s = 0 .. n_steps-1 from the stored initial parameters and m = v = 0; step s "
                  "draws its tasks from default_rng([seed, s]) and records the loss and the pre-clip gradient norm "
                  "before its update (SPEC.md section 10)",
                  ("layer<k>.<param>",), {"seed": _SEED, "n_steps": Config("int64", lo=1, hi=64), **_TASK_SPEC,
                                          **_STACK, **_ADAM_HP},
                  ("losses", "grad_norms", "step<s>.X", "step<s>.Y", "step<s>.x_q", "step<s>.y_q", "final.layer<k>.<param>")),
    "tasks": Kind("sample_tasks(default_rng([seed, step]), ...): the sampler's draws in order (SPEC.md section 2)",
                  (), {"seed": _SEED, "step": _SEED, **_TASK_SPEC}, ("X", "Y", "x_q", "y_q", "W")),
    "init": Kind("init_lsa_params(default_rng(seed), D, ...): truncated-normal variance scaling, redraws in order "
                 "(SPEC.md section 7)", (),
                 {"seed": _SEED, "D": Config("int64", lo=2, hi=MAX_DIM), "H": _LAYERS,
                  "key_size": Config("int64", lo=1, hi=MAX_DIM, default="D"),
                  "value_size": Config("int64", lo=1, hi=MAX_DIM, default="D"), "K": _LAYERS,
                  "scale": Config("float64", lo=0.0, hi=1e6, strict=True), "merged": Config("bool", default="false")},
                 ("<param>",)),
    "baselines": Kind("GD-n_steps from 0 (eta one value or one per step), least squares, ridge, and the line search "
                      "over eta_grid (first minimum on ties) (SPEC.md section 9)",
                      ("X", "Y", "x_q", "y_q"),
                      {"eta": Config("float64", "() or (n_steps,)", -1e6, 1e6), "n_steps": Config("int64", lo=0, hi=64),
                       "ridge": _NONNEG, "eta_grid": Config("float64", "(n,)", -1e6, 1e6)},
                      ("pred_gd", "W_gd", "pred_ls", "pred_ridge", "eta_ls", "losses_ls")),
    "eta": Kind("moments of U(low, high) (symmetric ranges only), the closed-form optimal one-step eta, its loss and "
                "the loss at eta (SPEC.md section 9)", (),
                {"d": Config("int64", lo=1, hi=10 ** 6), "N": Config("int64", lo=1, hi=10 ** 6),
                 "d_y": Config("int64", lo=1, hi=10 ** 6), "x_range": Config("float64", "(2,)", -1e6, 1e6),
                 "w_scale": _NONNEG, "noise_std": _NONNEG, "eta": _REAL},
                ("m2", "m4", "eta_star", "L_star", "L_eta")),
    # the layer types after LSA (added in format version 1)
    "softmax_layer": Kind("one softmax attention layer out = clip(E + sum_h P_h (softmax(q k^T / sqrt(Kd)) v)_h), "
                          "the softmax over the context keys (causal: keys i <= j), and its backward for dout "
                          "(SPEC.md section 5a)", ("E",) + _ATTN + ("dout",), {"causal": _BOOL, "clip": _CLIP},
                          ("out", "dE") + _d(_ATTN)),
    "mlp_layer": Kind("the residual MLP out = clip(E + W_2 gelu(W_1 E + b_1) + b_2), gelu tanh (jax.nn.gelu's "
                      "default) or erf, and its backward for dout; a bias-free MLP is b_1 = b_2 = 0 "
                      "(SPEC.md section 5a)", ("E",) + _MLP + ("dout",), {"gelu_erf": _BOOL, "clip": _CLIP},
                      ("out", "dE") + _d(_MLP)),
    "layernorm": Kind("LayerNorm of every token, ln_scale (E - mean) / sqrt(var + eps) + ln_offset (biased "
                      "variance), and its backward for dout (SPEC.md section 5a)", ("E",) + _LN + ("dout",),
                      {"eps": _EPS}, ("out", "dE") + _d(_LN)),
    "pre_ln_attention": Kind("a pre-LN attention block out = clip(E + f(LN(E))), f the softmax (softmax true) or "
                             "linear (LSA) attention's output on the normalised tokens, and its backward for dout "
                             "(SPEC.md section 5a)", ("E",) + _LN + _ATTN + ("dout",),
                             {"softmax": _BOOL, "causal": _BOOL, "eps": _EPS, "clip": _CLIP},
                             ("out", "dE") + _d(_LN + _ATTN)),
    "pre_ln_mlp": Kind("a pre-LN MLP block out = clip(E + MLP(LN(E))) and its backward for dout (SPEC.md section 5a)",
                       ("E",) + _LN + _MLP + ("dout",), {"gelu_erf": _BOOL, "eps": _EPS, "clip": _CLIP},
                       ("out", "dE") + _d(_LN + _MLP)),
    "posenc": Kind("the sinusoidal encoding pe (T, width), out = E + pe (concat false: width = D) or [E, pe] "
                   "(concat true), and dE for dout (SPEC.md section 5a)", ("E", "dout"),
                   {"concat": _BOOL, "width": _SIZE}, ("pe", "out", "dE")),
    "embedded_loss": Kind("a width-changing mixed model: layer0 embed (W, b) to width D_model, layer1 residual MLP "
                          "(gelu_erf), layer2 LSA; pred = minus the last d_y features of the query token, "
                          "L = 0.5 mean_b |pred - y_q|^2, dL/dE and dL/dparams (SPEC.md sections 5a, 6)",
                          ("E", "y_q") + _EMBEDDED, {"gelu_erf": _BOOL},
                          ("pred", "L", "dE") + tuple(k.replace(".", ".d", 1) for k in _EMBEDDED)),
}
KINDS["causal_gd"] = Kind(
    "sequence tokens e_t = [Phi_0 x_t, x_t, x_{t-1}] and [0, x_t, x_t, x_{t-1}], the causal Prop. 1 layer (one GD step "
    "from Phi_0 on L_t, no 1/t), its output, readout (+ first d channels), explicit GD per token, the code layout's "
    "masked step (Phi_0 = 0) and the sequence loss L and per-step losses (SPEC.md section 15)",
    ("X", "Y", "Phi_0"), {"eta": _REAL},
    ("E", "W_Q", "W_K", "W_V", "P", "out", "pred", "pred_gd", "E_code", "pred_code", "L", "per_t"))
KINDS["mesa_layer"] = Kind(
    "one mesa layer (causal, the diagonal included) out = E + sum_h P_h Phi_hat_{h,t} q_{h,t}, Phi_hat_t = M_t A_t^{-1}, "
    "A_t = forget^t I / lam_h + sum_{s<=t} forget^(t-s) k_s k_s^T, M_t = sum_{s<=t} forget^(t-s) v_s k_s^T (t from 1), "
    "lam (H,) > 0 per head, form 0 Sherman-Morrison (its reverse-walk backward), 1 direct solves, 2 conjugate "
    "gradients (at most 2 Kd iterations, relative residual 1e-12), and its backward for dout (SPEC.md section 16)",
    ("E",) + _ATTN + ("lam", "dout"),
    {"forget": Config("float64", lo=0.0, hi=1.0, strict=True), "form": Config("int64", lo=0, hi=len(MESA_FORMS) - 1)},
    ("out", "dE") + _d(_ATTN + ("lam",)))
KINDS["delta_layer"] = Kind(
    "one delta-rule layer (causal) S_t = alpha_t S_{t-1} - beta_t (alpha_t S_{t-1} k_t - v_t) k_t^T from S_0 = 0, "
    "out_t = E_t + sum_h P_h S_{h,t} q_{h,t}; beta_t = sigmoid(w_beta . e_t + b_beta) (no beta input) or the fixed "
    "beta, alpha_t = sigmoid(w_alpha . e_t + b_alpha) (gate true) else 1; form 0 recurrent, 1 chunked (UT transform, "
    "chunk tokens per chunk); and its backward for dout (SPEC.md section 16)",
    ("E",) + _ATTN + ("<gating>", "dout"),
    {"beta": Config("float64", lo=0.0, hi=1e6, strict=True, default="learned: w_beta, b_beta"), "gate": _BOOL,
     "form": Config("int64", lo=0, hi=len(DELTA_FORMS) - 1), "chunk": Config("int64", lo=1, hi=MAX_DIM, default="16")},
    ("out", "dE") + _d(_ATTN) + ("d<gating>",))

# Classic tokens and the Prop. 3 copy construction (issue #15, SPEC.md section 5b).
CLASSIC_ATTN1 = tuple(f"layer1.{k}" for k in _ATTN)
CLASSIC_ATTN2 = tuple(f"layer2.{k}" for k in _ATTN)
COPY_WEIGHTS = ("layer1.W_KQ", "layer1.W_PV", "layer2.W_KQ", "layer2.W_PV")
KINDS["classic_loss"] = Kind(
    "classic tokens x_1, (0, y_1), ..., x_N, (0, y_N), x_q (2N+1 tokens of width d), layer0 posenc concat of width "
    "P, layer1 softmax attention, layer2 LSA (both factored, context-only: keys and values from all tokens but the "
    "last), pred = minus the last d_y features of the query at width d + P, L and every gradient (SPEC.md section 5b)",
    ("X", "Y", "x_q", "y_q") + CLASSIC_ATTN1 + CLASSIC_ATTN2, {"width": _SIZE},
    ("E", "pred", "L", "dE") + tuple(k.replace(".", ".d", 1) for k in CLASSIC_ATTN1 + CLASSIC_ATTN2))
KINDS["copy_construction"] = Kind(
    "the Prop. 3 construction on classic tokens with concatenated encodings of width P (P >= 2N + 2 d_y, the tables "
    "of full rank): the copy layer (merged LSA: pattern x_j -> (0, y_j), query -> token 0; values C <- label "
    "features, L <- -pe[2N, L] (r . pe_i)) and the GD layer (merged LSA: content identity, values "
    "-(eta/N)(C - G O)), the tokens after both, pred and one explicit GD step from 0 (SPEC.md section 5b)",
    ("X", "Y", "x_q"), {"eta": _REAL, "width": _SIZE},
    ("E",) + COPY_WEIGHTS + ("out", "pred", "pred_gd"))


def _classic_arch(a):
    return R.Arch((R.LayerSpec("posenc", {"mode": "concat", "width": int(a["width"])}), R.LayerSpec("softmax"),
                   R.LayerSpec("lsa")))


def compute_classic_loss(a):
    """Classic tokens, posenc concat -> softmax -> LSA, readout, loss and gradients."""
    from reference.classic_tokens import classic_layout

    arch = _classic_arch(a)
    d, d_y = a["X"].shape[2], a["Y"].shape[2]
    layout = classic_layout(arch, d, d_y)
    E = layout.build(a["X"], a["Y"], a["x_q"])
    params = (PosEncParams(), SoftmaxParams(*(a[k] for k in CLASSIC_ATTN1)), R.LSAParams(*(a[k] for k in CLASSIC_ATTN2)))
    L, grads, aux = R.loss_and_grads(E, a["y_q"], params, arch, layout)
    return {"E": E, "pred": aux["pred"], "L": np.asarray(L, dtype=np.float64), "dE": aux["dE"],
            **stack_arrays(grads, grad=True)}


def compute_copy_construction(a):
    """The copy and GD layers of reference.copy_construction, their output and readout, and GD-1."""
    from reference import copy_construction as CC
    from reference.classic_tokens import classic_layout

    d, N, d_y = a["X"].shape[2], a["X"].shape[1], a["Y"].shape[2]
    P, eta = int(a["width"]), float(a["eta"])
    arch, params = CC.fit_copy_layers(d, N, P, d_y, eta=eta)
    layout = classic_layout(arch, d, d_y)
    E = layout.build(a["X"], a["Y"], a["x_q"])
    out, _ = R.model_forward(E, params, arch)
    return {"E": E, **stack_arrays(params), "out": out, "pred": layout.readout(out),
            "pred_gd": R.gd_predict(a["X"], a["Y"], a["x_q"], eta, 1)[0]}


COMPUTE["classic_loss"] = compute_classic_loss
COMPUTE["copy_construction"] = compute_copy_construction

# The Prop. 2 causal constructions and the LDS sequence sampler (issue #16, SPEC.md section 15).
PROP2_ITERATIONS = ("neumann", "richardson", "chebyshev")
KINDS["causal_prop2"] = Kind(
    "Prop. 2 on sequence tokens [0, x_t, x_{t-1}, z_1 .. z_K] (every z_j = x_t): K causal preconditioning layers "
    "(layer k: z_j -= gamma_k C_t z_{k-1}, j >= k) and the causal GD readout layer (slot 0 += M_t sum_j c_j z_j); "
    "iteration 0 Neumann (omega, K + 1 terms), 1 Richardson (omegas, K + 1 steps), 2 the code's Chebyshev-type "
    "recursion with a fixed normaliser nu (alphas, betas: K pairs; gamma_k = 1/nu); the tokens after every layer, "
    "the readout (+ first d channels) and exact ridge M_t A_t^{-1} x_t per token (SPEC.md section 15)",
    ("X",),
    {"ridge": Config("float64", lo=0.0, hi=1e6, strict=True),
     "iteration": Config("int64", lo=0, hi=len(PROP2_ITERATIONS) - 1), "K": Config("int64", lo=0, hi=8),
     "omega": Config("float64", lo=-1e6, hi=1e6, default="absent unless iteration = 0"),
     "omegas": Config("float64", "(n,)", -1e6, 1e6, default="absent unless iteration = 1 (K + 1 entries)"),
     "alphas": Config("float64", "(n,)", -1e6, 1e6, default="absent unless iteration = 2 (K entries)"),
     "betas": Config("float64", "(n,)", -1e6, 1e6, default="absent unless iteration = 2 (K entries)"),
     "nu": Config("float64", lo=0.0, hi=1e6, strict=True, default="absent unless iteration = 2")},
    ("E", "gammas", "coeffs", "layer<k>.<param>", "outs", "pred", "pred_ridge"))
KINDS["lds_sampler"] = Kind(
    "sample_sequences(default_rng([seed, step]), SequenceSpec(...)): the LDS draws in the documented order "
    "(W or U and lam, h_1, state noise, C, observation noise) for variant 0 linear, 1 partial, 2 nonlinear, "
    "3 contracting, 4 fixed; inputs X, targets Y, states H, W, C (SPEC.md section 15)",
    (), {"seed": _SEED, "step": _SEED, "variant": Config("int64", lo=0, hi=4), "B": _SIZE, "T": _SIZE, "d": _SIZE,
         "d_obs": _SIZE, "init_range": Config("float64", lo=0.0, hi=1e6, strict=True), "noise_std": _NONNEG,
         "obs_noise_std": _NONNEG,
         "clip": Config("float64", lo=0.0, hi=1e6, strict=True, default="the variant's (nonlinear: no clipping)"),
         "mlp_seed": Config("int64", lo=0, hi=2 ** 63 - 1, default="0"),
         "teacher_seed": Config("int64", lo=0, hi=2 ** 63 - 1, default="0")},
    ("X", "Y", "H", "W", "C"))


def prop2_scalars(a):
    """(gammas (K,), coeffs (K+1,)) of a causal_prop2 case, from reference.causal_constructions."""
    from reference import causal_constructions as CC

    K, r, it = int(a["K"]), float(a["ridge"]), PROP2_ITERATIONS[int(a["iteration"])]
    if it == "neumann":
        return CC.neumann_coefficients(float(a["omega"]), K, r)
    if it == "richardson":
        if a["omegas"].shape != (K + 1,):
            raise ValueError(f"omegas must have K + 1 = {K + 1} entries, got {a['omegas'].shape}")
        return CC.richardson_coefficients(a["omegas"], r)
    alphas, betas, nu = a["alphas"], a["betas"], float(a["nu"])
    if alphas.shape != (K,) or betas.shape != (K,):
        raise ValueError(f"alphas and betas must have K = {K} entries, got {alphas.shape} and {betas.shape}")
    gammas = np.full(K, 1.0 / nu)
    return gammas, CC.polynomial_coefficients(CC.chebyshev_polynomial(alphas, betas, nu), gammas, r)


def compute_causal_prop2(a):
    """precond_tokens, prop2_stack with the iteration's scalars, the tokens after each layer,
    the readout and ridge_predict."""
    from reference import causal_constructions as CC

    X, K = a["X"], int(a["K"])
    d = X.shape[2]
    gammas, coeffs = prop2_scalars(a)
    params, arch = CC.prop2_stack(d, gammas, coeffs)
    E = CC.precond_tokens(X, K)
    h, outs = E, []
    for p in params:
        h, _ = R.lsa_forward(h, p, causal=True)
        outs.append(h)
    arch_out = R.model_forward(E, params, arch)[0]
    if not np.array_equal(arch_out, h):
        raise AssertionError("prop2_stack's model_forward differs from its layers applied in turn")
    return {"E": E, "gammas": np.asarray(gammas, np.float64), "coeffs": np.asarray(coeffs, np.float64),
            **stack_arrays(params), "outs": np.stack(outs), "pred": h[..., :d],
            "pred_ridge": CC.ridge_predict(X, float(a["ridge"]))}


def lds_spec(a):
    """The SequenceSpec of an lds_sampler case (clip absent: the variant's)."""
    from reference import sequences as S

    return S.SequenceSpec(variant=S.VARIANTS[int(a["variant"])], T=int(a["T"]), B=int(a["B"]), d=int(a["d"]),
                          d_obs=int(a["d_obs"]), init_range=float(a["init_range"]), noise_std=float(a["noise_std"]),
                          obs_noise_std=float(a["obs_noise_std"]), clip=float(a["clip"]) if "clip" in a else None,
                          mlp_seed=int(a.get("mlp_seed", 0)), teacher_seed=int(a.get("teacher_seed", 0)))


def compute_lds_sampler(a):
    """sample_sequences(step_rng(seed, step), spec, B) in float64."""
    from reference import sequences as S

    spec = lds_spec(a)
    s = S.sample_sequences(R.step_rng(int(a["seed"]), int(a["step"])), spec, spec.B)
    return {k: np.ascontiguousarray(v) for k, v in zip(s._fields, s)}


COMPUTE["causal_prop2"] = compute_causal_prop2
COMPUTE["lds_sampler"] = compute_lds_sampler

assert set(KINDS) == set(COMPUTE)


def key_pattern(pattern):
    """The regular expression of a key written with placeholders (``layer<k>.d<param>``)."""
    return re.compile("".join(_PLACEHOLDER_RE.get(tok, re.escape(tok)) for tok in re.split(r"(<[a-z]+>)", pattern)))


def input_problems(kind, inputs):
    """Why ``inputs`` are not inputs of ``kind`` ([] when they are): every configuration
    input present (unless optional) and valid, every other key a data key of the kind,
    float64, finite, within the size limits."""
    spec = KINDS[kind]
    problems = []
    for name, c in spec.config.items():
        if name in inputs:
            p = c.problem(name, inputs[name], inputs)
            if p:
                problems.append(p)
        elif c.default is None:
            problems.append(f"configuration input {name} is missing")
    data = [key_pattern(p) for p in spec.data]
    for key, a in inputs.items():
        if key in spec.config:
            continue
        if not any(r.fullmatch(key) for r in data):
            problems.append(f"{key} is not an input of kind {kind}")
        elif a.dtype != np.float64:
            problems.append(f"{key} has dtype {a.dtype.name}, data must be float64")
        elif not 1 <= a.ndim <= 4 or max(a.shape) > MAX_DIM or a.size > MAX_DATA:
            problems.append(f"{key} has shape {a.shape}, data must have 1 to 4 dimensions of at most {MAX_DIM}")
        elif not np.all(np.isfinite(a)):
            problems.append(f"{key} is not finite")
    problems += [f"data input {k} is missing" for k in spec.data if "<" not in k and k not in inputs]
    return problems


def kinds_table():
    """The manifest's description of every kind."""
    return {kind: {"computes": k.computes, "data": list(k.data),
                   "config": {n: c.describe() for n, c in k.config.items()}, "outputs": list(k.outputs)}
            for kind, k in KINDS.items()}

