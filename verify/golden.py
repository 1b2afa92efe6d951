"""Golden test vectors: plain ``.npz`` files and a JSON manifest for ports.

``icgd vectors write [DIR]`` computes every case with the reference and writes
``DIR/<case>.npz`` plus ``DIR/manifest.json``; ``icgd vectors check [DIR]`` reads
them back, recomputes every case from its stored inputs with the reference and
compares the stored outputs, one verdict line per case, exit code 1 on any mismatch.
DIR defaults to this package's ``verify/vectors/`` (the committed vectors). Also
``python -m verify.golden write|check [DIR]``.

What this file is: the generator and the checker. What it is not: the independent
confirmation of the vectors, which lives in ``verify/claims_vectors.py`` (loop
oracle, complex-step derivatives, hand transcriptions) and runs in the tests.
Every key of every case is documented in SPEC.md (section "Golden vectors").

A case is a kind, a builder of inputs (seeded) and the reference function of that
kind mapping inputs to outputs. The builder runs only in ``write``; ``check``
recomputes outputs from the *stored* inputs, so a port needs only the npz. Each kind
(``KINDS``, written into the manifest) says which inputs are data and which are
configuration, with their dtypes and ranges, and which outputs it computes.

``check`` trusts nothing in the folder: the manifest's list of cases must be the
generator's (a case missing, repeated or unknown fails), a case's file is
``<name>.npz`` in the folder (no other path, no link), inputs must be what the kind
reads (dtypes, shapes, sizes, ranges: a forged file cannot ask for 10**9 tasks), and
the stored outputs must be exactly the ones the kind computes. Every problem is a FAIL
line of its own case; the other cases are still checked and nothing raises.
Format version: it changes only when the meaning of an existing case changes; new
cases are appended to the table (the case index salts its generator, so the earlier
cases keep their bytes) without a change.
Conventions inside an npz: every float is float64; configuration is stored as 0-d
arrays (``causal``, ``recurrent`` bool; ``K``, ``d``, ``seed`` int64); ``clip`` and
``clip_norm`` = +inf mean "no clipping" (clip(x, -inf, inf) = x exactly); per-layer
parameters of a stack are ``layer<k>.<name>``, gradients ``d<name>`` (the leaf of
path ``<k>.<name>`` of the parameter tree, ``reference.tree``; see ``STACK_KEY``).
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

import reference as R
from reference.backends.numpy_backend import make_stepper
from reference.files import OutputPathError, check_output_dir, write_bytes_atomic, write_text_atomic
from reference.layers.embed import EmbedParams
from reference.layers.layernorm import layernorm_backward, layernorm_forward
from reference.layers.mlp import MLPParams, mlp_forward
from reference.layers.posenc import PosEncParams, positional_encoding
from reference.layers.softmax import SoftmaxParams, softmax_forward
from reference.optim import AdamHP, AdamState, adam_init, adam_update, global_norm
from reference.tokens import EmbeddedLayout
from reference.tolerances import allclose_report, tolerance
from reference.tree import tree_leaves, tree_map, tree_paths, tree_unflatten

FORMAT_VERSION = 1
SEED = 20230712
MANIFEST = "manifest.json"
DEFAULT_DIR = Path(__file__).resolve().parent / "vectors"
TOL_KIND = "algebra"   # the reference against its own vectors: same polynomial, maybe other summation order
FORMAT_RULE = ("format_version changes only when the meaning of an existing case changes (a key, a convention); new "
               "cases, of new or existing kinds, are added without a change. A port runs the cases of the kinds it "
               "knows and reports the others")
REGENERATE_HINT = "regenerate the vectors with `icgd vectors write` (or `python -m verify.golden write`)"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class Case(NamedTuple):
    name: str
    kind: str
    inputs: dict    # key -> ndarray, in writing order
    outputs: dict   # key -> ndarray


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


def _fields(a, tp, prefix=""):
    return tp(*(a[prefix + f] for f in tp._fields))


def compute_softmax_layer(a):
    """One softmax attention layer (causal, clip) and its backward."""
    spec = R.LayerSpec("softmax", (("causal", bool(a["causal"])), ("clip", _clip_arg(a["clip"]))))
    return _layer_case(spec, _fields(a, SoftmaxParams), a)


def compute_mlp_layer(a):
    """The residual MLP (tanh or erf GELU, clip) with biases (zero biases: no bias) and its backward."""
    spec = R.LayerSpec("mlp", (("gelu", "erf" if bool(a["gelu_erf"]) else "tanh"), ("clip", _clip_arg(a["clip"]))))
    return _layer_case(spec, _fields(a, MLPParams), a)


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
    return _layer_case(spec, _fields(a, spec.param_type()), a)


def compute_pre_ln_mlp(a):
    """A pre-LN MLP block e + MLP(LN(e)) and its backward."""
    spec = _pre_ln_spec("mlp", (("gelu", "erf" if bool(a["gelu_erf"]) else "tanh"),), a)
    return _layer_case(spec, _fields(a, spec.param_type()), a)


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
}
_PLACEHOLDER_RE = {"<param>": "(?:W_Q|W_K|W_V|P|W_KQ|W_PV)", "<k>": "(?:0|[1-9][0-9]?)", "<s>": "(?:0|[1-9][0-9]{0,2})"}
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


# --------------------------------------------------------------------------------
# Builders: the seeded inputs of each case (write only)
# --------------------------------------------------------------------------------

def _f(x):
    return np.asarray(x, dtype=np.float64)


def _i(x):
    return np.asarray(x, dtype=np.int64)


def _random_layer(rng, D, H, merged, Kd, Vd, scale):
    if merged:
        return R.MergedParams(scale * rng.standard_normal((H, D, D)), scale * rng.standard_normal((H, D, D)))
    return R.LSAParams(scale * rng.standard_normal((H, Kd, D)), scale * rng.standard_normal((H, Kd, D)),
                       scale * rng.standard_normal((H, Vd, D)), scale * rng.standard_normal((H, D, Vd)))


def _tokens(rng, B, d, d_y, N, query_slot):
    """Tokens from sampled tasks; ``query_slot`` puts -W_0 x_q (random W_0) in the query's y-slot."""
    t = R.sample_tasks(rng, B, d, N, d_y)
    W_0 = rng.standard_normal((d_y, d)) if query_slot else None
    return R.build_tokens(t.X, t.Y, t.x_q, W_0=W_0), t


def _pick_clip(pre_values, margin=1e-3):
    """A clip level that clips some token entries and not others, at a relative
    distance > ``margin`` from every pre-clip value, so rounding in a port cannot flip
    which entries are clipped. ``pre_values(c)`` returns the pre-clip arrays of every
    layer when the stack runs with clip c (None: no clipping)."""
    mags = np.sort(np.abs(np.concatenate([p.ravel() for p in pre_values(None)])))
    lo, hi = int(0.5 * mags.size), int(0.8 * mags.size)
    mids = [(mags[i] + mags[i + 1]) / 2 for i in range(lo, hi)]
    gaps = [mags[i + 1] - mags[i] for i in range(lo, hi)]
    for n in np.argsort(gaps)[::-1]:
        c = float(f"{mids[n]:.4g}")                                   # a short decimal a port can type in
        vals = np.abs(np.concatenate([p.ravel() for p in pre_values(c)]))
        if np.min(np.abs(vals - c)) > margin * c and np.any(vals > c):
            return c
    raise RuntimeError("no clip level with a safe margin found")


def build_layer(rng, H, causal, clip, merged):
    d, d_y, N, B = 3, 1, 4, 2
    D = d + d_y
    E, _ = _tokens(rng, B, d, d_y, N, query_slot=True)                # (B, T, D)
    p = _random_layer(rng, D, H, merged, Kd=3, Vd=5, scale=0.5)
    c = np.inf
    if clip:
        c = _pick_clip(lambda c: [R.lsa_forward(E, p, causal=causal, clip=c)[1].pre])
    dout = rng.standard_normal(E.shape)                                # (B, T, D) random upstream
    return {"E": E, **layer_arrays(p), "causal": np.asarray(causal), "clip": _f(c), "dout": dout}


def build_layer_clip_edge(rng, H, causal):
    """A clipped layer with two pre-clip entries exactly at the clip level, +c and -c,
    where the gradient must pass (an autodiff clip that halves it there fails). Row 0 of
    every P_h is zero, so coordinate 0 of every token leaves the layer as it came
    (E + 0, exactly); two tokens get that coordinate = +c and -c. Every other pre-clip
    value keeps the usual safe distance from c."""
    d, d_y, N, B = 3, 1, 4, 2
    D = d + d_y
    E, _ = _tokens(rng, B, d, d_y, N, query_slot=True)                # (B, T, D)
    p = _random_layer(rng, D, H, False, Kd=3, Vd=5, scale=0.5)
    P = p.P.copy()
    P[:, 0, :] = 0.0                                                   # coordinate 0 of delta is 0
    p = p._replace(P=P)
    edges = [((0, 1, 0), 1.0), ((1, N, 0), -1.0)]                      # (entry of E, sign of the level there)
    flat = [int(np.ravel_multi_index(idx, E.shape)) for idx, _ in edges]

    def at_level(c):
        Ec = E.copy()
        for idx, sign in edges:
            Ec[idx] = sign * c
        return Ec

    def pre_values(c):                                                 # every pre-clip value but the two edges
        pre = R.lsa_forward(E if c is None else at_level(c), p, causal=causal, clip=c)[1].pre
        return [np.delete(pre.ravel(), flat)]

    c = _pick_clip(pre_values)
    E = at_level(c)
    pre = R.lsa_forward(E, p, causal=causal, clip=c)[1].pre
    if any(pre[idx] != sign * c for idx, sign in edges):
        raise RuntimeError("the edge entries moved off the clip level")
    dout = rng.standard_normal(E.shape)                                # (B, T, D) random upstream
    return {"E": E, **layer_arrays(p), "causal": np.asarray(causal), "clip": _f(c), "dout": dout}


def _stack_inputs(rng, K, recurrent, H, causal, clip, merged, d, d_y, N, scale, query_slot):
    D = d + d_y
    E, t = _tokens(rng, 2, d, d_y, N, query_slot)                      # (B, T, D)
    n_param = 1 if recurrent else K
    layers = tuple(_random_layer(rng, D, H, merged, Kd=3, Vd=4, scale=scale) for _ in range(n_param))
    c = np.inf
    if clip:
        def pre_values(cl):
            _, cache = R.model_forward(E, layers, R.lsa_stack(K, recurrent=recurrent, causal=causal, clip=cl))
            return [lc.pre for lc in cache.layer_caches]
        c = _pick_clip(pre_values)
    cfg = {"K": _i(K), "recurrent": np.asarray(recurrent), "causal": np.asarray(causal), "clip": _f(c)}
    return E, t, layers, cfg


def build_stack(rng, K, recurrent, H, causal, clip, merged):
    E, _, layers, cfg = _stack_inputs(rng, K, recurrent, H, causal, clip, merged, d=2, d_y=2, N=4,
                                      scale=0.4, query_slot=True)
    return {"E": E, **stack_arrays(layers), **cfg, "dout": rng.standard_normal(E.shape)}


def build_loss(rng, K, recurrent, H, causal, clip, merged, d, d_y, N, scale):
    E, t, layers, cfg = _stack_inputs(rng, K, recurrent, H, causal, clip, merged, d, d_y, N,
                                      scale=scale, query_slot=False)
    return {"E": E, "y_q": t.y_q, "d": _i(d), **stack_arrays(layers), **cfg}


def build_gd(rng, d, d_y, N, eta, K, recurrent, with_W0):
    t = R.sample_tasks(rng, 2, d, N, d_y)
    W_0 = rng.standard_normal((d_y, d)) if with_W0 else np.zeros((d_y, d))
    return {"X": t.X, "Y": t.Y, "x_q": t.x_q, "W_0": W_0, "eta": _f(eta), "K": _i(K), "recurrent": np.asarray(recurrent)}


def build_gdpp(rng, d, d_y, N, etas, gammas):
    t = R.sample_tasks(rng, 2, d, N, d_y)
    return {"X": t.X, "Y": t.Y, "x_q": t.x_q, "W_0": rng.standard_normal((d_y, d)), "etas": _f(etas), "gammas": _f(gammas)}


def _hp_arrays(lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, clip_norm=np.inf):
    return {"lr": _f(lr), "b1": _f(b1), "b2": _f(b2), "eps": _f(eps), "clip_norm": _f(clip_norm)}


def build_adam(rng, n_layers, H, merged, clip):
    D = 3
    params = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.1) for _ in range(n_layers))
    grads = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.1) for _ in range(n_layers))
    m = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.01) for _ in range(n_layers))
    v_root = tuple(_random_layer(rng, D, H, merged, Kd=D, Vd=D, scale=0.01) for _ in range(n_layers))
    v = tree_map(lambda a: a * a, v_root)                               # second moments are >= 0
    norm = global_norm(grads)
    clip_norm = float(f"{0.5 * norm:.3g}") if clip else np.inf         # clip = active: half the gradient's norm
    return {**stack_arrays(params), **stack_arrays(grads, grad=True), **stack_arrays(m, "m."), **stack_arrays(v, "v."),
            "t": _i(4), **_hp_arrays(clip_norm=clip_norm)}


def build_train(rng, seed, n_steps, d, N, d_y, B, H, K=1, clip_norm=1e-3):
    """A separate K-layer stack from the initialiser (paper settings); ``clip_norm`` 1e-3
    never acts at this size (gradient norms ~1e-6), a smaller one may."""
    D = d + d_y
    init_rng = np.random.default_rng(seed)
    layers = tuple(R.init_lsa_params(init_rng, D, H=H, n_layers_for_scale=K, dtype=np.float64) for _ in range(K))
    return {"seed": _i(seed), "n_steps": _i(n_steps), "d": _i(d), "N": _i(N), "d_y": _i(d_y), "B": _i(B),
            "x_range": _f([-0.5, 0.5]), "w_scale": _f(1.0), "noise_std": _f(0.0), "n_distractors": _i(0),
            "K": _i(K), "recurrent": np.asarray(False), "causal": np.asarray(False), "clip": _f(np.inf),
            **stack_arrays(layers), **_hp_arrays(clip_norm=clip_norm)}


def build_tasks(rng, seed, step):
    return {"seed": _i(seed), "step": _i(step), "B": _i(2), "d": _i(3), "N": _i(4), "d_y": _i(2),
            "x_range": _f([-1.0, 1.0]), "w_scale": _f(1.5), "noise_std": _f(0.1), "n_distractors": _i(1)}


def build_init(rng, seed, H=1, key_size=3, value_size=4, merged=False):
    """D = 4, K = 2, scale 0.002. Merged cases store ``merged`` and no key or value size."""
    sizes = {} if merged else {"key_size": _i(key_size), "value_size": _i(value_size)}
    return {"seed": _i(seed), "D": _i(4), "H": _i(H), **sizes, "K": _i(2), "scale": _f(0.002),
            **({"merged": np.asarray(True)} if merged else {})}


def build_baselines(rng, eta=0.7):
    """Sampled tasks, GD-3 (``eta`` one value or one per step), the paper's eta grid."""
    t = R.sample_tasks(rng, 2, 3, 5, 1)
    return {"X": t.X, "Y": t.Y, "x_q": t.x_q, "y_q": t.y_q, "eta": _f(eta), "n_steps": _i(3), "ridge": _f(0.1),
            "eta_grid": R.ETA_GRID.copy()}


def build_line_search_tie(rng):
    """Tasks on which the line search meets an exact tie at its minimum. The context is
    e_1, e_2, -e_1, -e_2, so (1/N) X^T X = I/2 and GD-K from 0 leaves the error
    -(1 - eta/2)^K W x_q; with short dyadic teachers and queries every step is exact in
    float64. The grid's 1.5 and 2.5 give the same smallest loss; the first, 1.5, wins."""
    X = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]] * 2)   # (B, N, d)
    W = np.array([[[1.0, -0.5]], [[0.5, 0.25]]])                             # (B, d_y, d)
    x_q = np.array([[1.0, 0.5], [-1.0, 0.5]])                                # (B, d)
    Y, y_q = np.einsum("bij,bnj->bni", W, X), np.einsum("bij,bj->bi", W, x_q)
    return {"X": X, "Y": Y, "x_q": x_q, "y_q": y_q, "eta": _f(0.75), "n_steps": _i(2), "ridge": _f(0.5),
            "eta_grid": _f([0.5, 1.5, 2.5, 3.0])}


def build_eta(rng, d, N, d_y, x_range, w_scale, noise_std, eta):
    return {"d": _i(d), "N": _i(N), "d_y": _i(d_y), "x_range": _f(x_range), "w_scale": _f(w_scale),
            "noise_std": _f(noise_std), "eta": _f(eta)}


# ---- builders of the layer types after LSA (added in format version 1) -----------------

def _softmax_params(rng, D, H, Kd, Vd, scale):
    return SoftmaxParams(*_random_layer(rng, D, H, False, Kd=Kd, Vd=Vd, scale=scale))


def _mlp_params(rng, D, w, bias=True):
    W_1, b_1 = 1.5 * rng.standard_normal((w, D)), 0.3 * rng.standard_normal(w)
    W_2, b_2 = 0.5 * rng.standard_normal((D, w)), 0.1 * rng.standard_normal(D)
    if not bias:
        b_1, b_2 = np.zeros(w), np.zeros(D)
    return MLPParams(W_1, b_1, W_2, b_2)


def _ln_params(rng, D):
    return 1.0 + 0.3 * rng.standard_normal(D), 0.1 * rng.standard_normal(D)


def build_softmax_layer(rng, H, causal, clip, max_logit=None):
    """D = 4, Kd = 3, Vd = 5. ``max_logit``: W_Q rescaled so the largest |logit| is that
    (900: exp of it overflows float64, so only a max-subtracted softmax computes it)."""
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)                   # (B, T, D)
    p = _softmax_params(rng, 4, H, 3, 5, scale=1.0)
    if max_logit is not None:
        _, cache = softmax_forward(E, p, causal=causal)
        Z = np.matmul(cache.q, np.swapaxes(cache.k, -1, -2)) / np.sqrt(3)
        p = p._replace(W_Q=p.W_Q * (max_logit / np.abs(Z).max()))
    c = np.inf
    if clip:
        c = _pick_clip(lambda c: [softmax_forward(E, p, causal=causal, clip=c)[1].pre])
    return {"E": E, **layer_arrays(p), "causal": np.asarray(causal), "clip": _f(c), "dout": rng.standard_normal(E.shape)}


def build_mlp_layer(rng, gelu_erf, clip, bias=True):
    """D = 4, width 6; pre-activations of order one (GELU's curved part)."""
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)
    p = _mlp_params(rng, 4, 6, bias)
    gelu = "erf" if gelu_erf else "tanh"
    c = np.inf
    if clip:
        c = _pick_clip(lambda c: [mlp_forward(E, p, gelu_form=gelu, clip=c)[1].pre])
    return {"E": E, **layer_arrays(p), "gelu_erf": np.asarray(gelu_erf), "clip": _f(c),
            "dout": rng.standard_normal(E.shape)}


def build_layernorm(rng, spread):
    """Tokens 0.2 + spread * N(0, 1): spread 3e-3 puts the variance near eps = 1e-5."""
    E = 0.2 + spread * rng.standard_normal((2, 5, 4))
    scale, offset = _ln_params(rng, 4)
    return {"E": E, "ln_scale": scale, "ln_offset": offset, "eps": _f(1e-5), "dout": rng.standard_normal(E.shape)}


def build_pre_ln_attention(rng, softmax, causal, clip):
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)
    scale, offset = _ln_params(rng, 4)
    attn = _random_layer(rng, 4, 2 if softmax else 1, False, Kd=3, Vd=4, scale=0.6)
    a = {"E": E, "ln_scale": scale, "ln_offset": offset, **layer_arrays(attn), "softmax": np.asarray(softmax),
         "causal": np.asarray(causal), "eps": _f(1e-5), "clip": _f(np.inf)}
    if clip:
        options = (("block", "softmax" if softmax else "lsa"), ("block_options", (("causal", causal),)))
        params = _fields(a, R.LayerSpec("pre_ln", options).param_type())
        a["clip"] = _f(_pick_clip(lambda c: [R.LayerSpec("pre_ln", (*options, ("clip", c))).forward(E, params)[1].pre]))
    return {**a, "dout": rng.standard_normal(E.shape)}


def build_pre_ln_mlp(rng, gelu_erf):
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)
    scale, offset = _ln_params(rng, 4)
    return {"E": E, "ln_scale": scale, "ln_offset": offset, **layer_arrays(_mlp_params(rng, 4, 6)),
            "gelu_erf": np.asarray(gelu_erf), "eps": _f(1e-5), "clip": _f(np.inf), "dout": rng.standard_normal(E.shape)}


def build_posenc(rng, concat, width):
    E, _ = _tokens(rng, 2, 3, 1, 4, query_slot=True)                   # (B, T = 5, D = 4)
    out_width = E.shape[2] + (width if concat else 0)
    return {"E": E, "concat": np.asarray(concat), "width": _i(width),
            "dout": rng.standard_normal(E.shape[:2] + (out_width,))}


def build_embedded_loss(rng, gelu_erf):
    """Tokens (x, y) of width 2 (d = d_y = 1, N = 4), embedded to width 4, MLP width 6."""
    E, t = _tokens(rng, 2, 1, 1, 4, query_slot=False)
    layers = (EmbedParams(1.0 * rng.standard_normal((4, 2)), 0.2 * rng.standard_normal(4)), _mlp_params(rng, 4, 6),
              _random_layer(rng, 4, 1, False, Kd=4, Vd=4, scale=0.5))
    return {"E": E, "y_q": t.y_q, **stack_arrays(layers), "gelu_erf": np.asarray(gelu_erf)}


class CaseSpec(NamedTuple):
    name: str
    kind: str
    build: Callable   # build(rng) -> inputs dict


def _case_table():
    """Every case, in order. The case's index salts its generator: default_rng([SEED, index])."""
    t = []
    for H in (1, 2):
        for causal in (False, True):
            for clip in (False, True):
                for merged in (False, True):
                    name = (f"layer-H{H}-{'causal' if causal else 'ctx'}-{'clip' if clip else 'noclip'}-"
                            f"{'merged' if merged else 'factored'}")
                    t.append(CaseSpec(name, "layer", lambda r, H=H, c=causal, cl=clip, m=merged: build_layer(r, H, c, cl, m)))
    for name, K, rec, H, causal, clip, merged in [
            ("stack-recurrent-K3-H1-ctx-clip-factored", 3, True, 1, False, True, False),
            ("stack-separate-K2-H2-ctx-noclip-factored", 2, False, 2, False, False, False),
            ("stack-separate-K2-H1-causal-clip-merged", 2, False, 1, True, True, True)]:
        t.append(CaseSpec(name, "stack", lambda r, a=(K, rec, H, causal, clip, merged): build_stack(r, *a)))
    for name, args in [
            ("loss-K1-H1-ctx-noclip-factored", (1, False, 1, False, False, False, 3, 1, 5, 0.6)),
            ("loss-recurrent-K3-H1-ctx-clip-factored", (3, True, 1, False, True, False, 2, 2, 4, 0.3)),
            ("loss-separate-K2-H2-causal-noclip-merged", (2, False, 2, True, False, True, 2, 2, 4, 0.4))]:
        t.append(CaseSpec(name, "loss", lambda r, a=args: build_loss(r, *a)))
    t.append(CaseSpec("gd-1step-W0", "gd", lambda r: build_gd(r, 3, 1, 5, 0.9, 1, False, True)))
    t.append(CaseSpec("gd-3steps-recurrent", "gd", lambda r: build_gd(r, 2, 2, 5, 0.6, 3, True, False)))
    t.append(CaseSpec("gd-2steps-separate-W0", "gd", lambda r: build_gd(r, 2, 1, 4, 1.3, 2, False, True)))
    t.append(CaseSpec("gdpp-2layers-W0", "gdpp", lambda r: build_gdpp(r, 2, 1, 5, [0.8, 0.5], [0.1, 0.05])))
    t.append(CaseSpec("adam-clip-2layers-factored", "adam", lambda r: build_adam(r, 2, 1, False, True)))
    t.append(CaseSpec("adam-noclip-H2-merged", "adam", lambda r: build_adam(r, 1, 2, True, False)))
    t.append(CaseSpec("train-5steps-K1-H1", "train", lambda r: build_train(r, seed=7, n_steps=5, d=2, N=4, d_y=1, B=2, H=1)))
    t.append(CaseSpec("tasks-noise-distractors", "tasks", lambda r: build_tasks(r, seed=11, step=3)))
    t.append(CaseSpec("init-H1", "init", lambda r: build_init(r, seed=5)))
    t.append(CaseSpec("baselines", "baselines", build_baselines))
    t.append(CaseSpec("eta-paper-defaults", "eta", lambda r: build_eta(r, 10, 10, 1, [-0.5, 0.5], 1.0, 0.0, 3.0)))
    t.append(CaseSpec("eta-noise-dy2", "eta", lambda r: build_eta(r, 5, 20, 2, [-1.0, 1.0], 1.5, 0.3, 1.0)))
    # Added later, in format version 1: appended, so the indices salting the cases above stay as they were.
    t.append(CaseSpec("layer-H2-causal-clipedge-factored", "layer", lambda r: build_layer_clip_edge(r, 2, True)))
    t.append(CaseSpec("init-H2-Vd3-redraw", "init", lambda r: build_init(r, seed=29, H=2, key_size=3, value_size=3)))
    t.append(CaseSpec("init-H2-merged-redraw", "init", lambda r: build_init(r, seed=20, H=2, merged=True)))
    t.append(CaseSpec("train-4steps-K2-H2-clipnorm", "train",
                      lambda r: build_train(r, seed=3, n_steps=4, d=2, N=3, d_y=1, B=2, H=2, K=2, clip_norm=3.3e-6)))
    t.append(CaseSpec("baselines-eta-per-step", "baselines", lambda r: build_baselines(r, eta=[1.1, 0.3, 0.7])))
    t.append(CaseSpec("baselines-line-search-tie", "baselines", build_line_search_tie))
    # Added with the layer types after LSA (format version 1, appended as well):
    t.append(CaseSpec("softmax-H1-ctx-noclip", "softmax_layer", lambda r: build_softmax_layer(r, 1, False, False)))
    t.append(CaseSpec("softmax-H2-causal-clip", "softmax_layer", lambda r: build_softmax_layer(r, 2, True, True)))
    t.append(CaseSpec("softmax-H2-ctx-large-logits", "softmax_layer",
                      lambda r: build_softmax_layer(r, 2, False, False, max_logit=900.0)))
    t.append(CaseSpec("mlp-tanh-noclip", "mlp_layer", lambda r: build_mlp_layer(r, False, False)))
    t.append(CaseSpec("mlp-erf-clip", "mlp_layer", lambda r: build_mlp_layer(r, True, True)))
    t.append(CaseSpec("mlp-tanh-nobias", "mlp_layer", lambda r: build_mlp_layer(r, False, False, bias=False)))
    t.append(CaseSpec("layernorm", "layernorm", lambda r: build_layernorm(r, 1.0)))
    t.append(CaseSpec("layernorm-variance-near-eps", "layernorm", lambda r: build_layernorm(r, 3e-3)))
    t.append(CaseSpec("pre_ln-lsa-ctx-noclip", "pre_ln_attention",
                      lambda r: build_pre_ln_attention(r, False, False, False)))
    t.append(CaseSpec("pre_ln-softmax-H2-causal-clip", "pre_ln_attention",
                      lambda r: build_pre_ln_attention(r, True, True, True)))
    t.append(CaseSpec("pre_ln-mlp-tanh", "pre_ln_mlp", lambda r: build_pre_ln_mlp(r, False)))
    t.append(CaseSpec("posenc-add", "posenc", lambda r: build_posenc(r, False, 4)))
    t.append(CaseSpec("posenc-concat-width3", "posenc", lambda r: build_posenc(r, True, 3)))
    t.append(CaseSpec("embedded-loss-tanh", "embedded_loss", lambda r: build_embedded_loss(r, False)))
    return t


CASES = _case_table()


def build_cases(seed=SEED):
    """Every :class:`Case`: inputs from its builder, outputs from the reference."""
    cases = []
    for i, spec in enumerate(CASES):
        inputs = spec.build(np.random.default_rng([seed, i]))
        outputs = COMPUTE[spec.kind](inputs)
        cases.append(Case(spec.name, spec.kind, inputs, {k: np.asarray(v) for k, v in outputs.items()}))
    return cases


# --------------------------------------------------------------------------------
# Files: deterministic npz bytes, manifest
# --------------------------------------------------------------------------------

def npz_bytes(arrays):
    """An uncompressed .npz (readable by numpy.load) whose bytes depend only on the
    arrays and their order: fixed zip timestamps and attributes, no pickles."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            b = io.BytesIO()
            np.lib.format.write_array(b, np.array(a, order="C"), allow_pickle=False)   # 0-d stays 0-d
            zf.writestr(info, b.getvalue())
    return buf.getvalue()


def _describe(a):
    return {"shape": list(a.shape), "dtype": np.dtype(a.dtype).name}


def manifest_for(cases, files, seed=SEED):
    """The manifest dict: provenance (with the seed the cases were built from) plus, per
    case, kind, file, sha256, inputs and outputs."""
    tol = tolerance(np.float64, TOL_KIND)
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"module": "verify.golden", "function": "build_cases", "seed": seed},
        "package_version": R.__version__,
        "numpy_version": np.__version__,
        "dtype": "float64",
        "tolerance": {"kind": TOL_KIND, "rtol": tol.rtol, "atol": tol.atol,
                      "rule": "per array: |actual - expected| <= atol + rtol * max|expected| elementwise"},
        "format_rule": FORMAT_RULE,
        "limits": LIMITS,
        "placeholders": PLACEHOLDERS,
        "kinds": kinds_table(),
        "cases": [{"name": c.name, "kind": c.kind, "file": f"{c.name}.npz",
                   "sha256": hashlib.sha256(files[c.name]).hexdigest(),
                   "inputs": {k: _describe(a) for k, a in c.inputs.items()},
                   "outputs": {k: _describe(a) for k, a in c.outputs.items()}} for c in cases],
    }


def write_vectors(directory=DEFAULT_DIR, seed=SEED):
    """Write every case's npz and the manifest into ``directory``. Files of cases that an
    earlier manifest there listed and this one does not are removed. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cases = build_cases(seed)
    files = {c.name: npz_bytes({**c.inputs, **c.outputs}) for c in cases}
    old = directory / MANIFEST
    if old.exists():
        try:
            listed = {e["file"] for e in json.loads(old.read_text())["cases"]}
        except (ValueError, KeyError, TypeError):
            listed = set()
        stale = {f for f in listed if isinstance(f, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.npz", f)}
    else:
        stale = set()
    # every file atomically, the manifest last, stale files only once the new manifest is in place
    for name, data in files.items():
        write_bytes_atomic(str(directory / f"{name}.npz"), data)
    man = manifest_for(cases, files, seed)
    write_text_atomic(str(directory / MANIFEST), manifest_text(man))
    for f in stale - {f"{n}.npz" for n in files}:                   # plain names in this folder only
        (directory / f).unlink(missing_ok=True)
    return man


def manifest_text(x, indent=""):
    """JSON with one line per array description (a dict or list of scalars and flat
    lists is written inline), so the manifest reads as a table."""
    inner = indent + "  "
    if isinstance(x, dict) and any(isinstance(v, dict) or (isinstance(v, list) and any(isinstance(i, (dict, list)) for i in v))
                                   for v in x.values()):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {manifest_text(v, inner)}" for k, v in x.items())
        text = "{\n" + body + "\n" + indent + "}"
    elif isinstance(x, list) and any(isinstance(v, dict) for v in x):
        text = "[\n" + ",\n".join(inner + manifest_text(v, inner) for v in x) + "\n" + indent + "]"
    else:
        text = json.dumps(x)
    return text + ("\n" if indent == "" else "")


# --------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------

class CaseResult(NamedTuple):
    name: str
    ok: bool
    rel_err: float      # worst relative error over the case's outputs (inf on a structural failure)
    message: str


class CaseError(ValueError):
    """A case's files or manifest entry are not what the format says (the message says how)."""


_NPZ_DTYPES = (np.dtype("<f8"), np.dtype("<i8"), np.dtype("|b1"))
_SHA256 = re.compile("[0-9a-f]{64}")


def _what(x):
    """A short description of a JSON value for a message (ASCII: any terminal prints it)."""
    text = ascii(x)
    return f"{type(x).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _field(entry, key):
    """How an entry's field reads in a message: "no 'kind'" or "'kind' NoneType None"."""
    return f"no {key!r}" if key not in entry else f"{key!r} {_what(entry[key])}"


def read_npz(data):
    """The arrays of an npz held in ``data`` (bytes), in file order. Refuses (CaseError)
    what a vector file is not: members other than ``<key>.npy``, a key twice, pickles,
    dtypes other than float64 / int64 / bool (little-endian, C order), arrays whose
    header does not match their bytes, more than MAX_FILE_BYTES unpacked."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise CaseError(f"not an npz (zip) file: {exc}") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CaseError(f"a key is stored twice: {sorted({n for n in names if names.count(n) > 1})}")
        if sum(i.file_size for i in infos) > MAX_FILE_BYTES:
            raise CaseError(f"arrays unpack to more than {MAX_FILE_BYTES} bytes")
        arrays = {}
        for info in infos:
            key = info.filename[:-4]
            if not info.filename.endswith(".npy") or not key or "/" in key:
                raise CaseError(f"member {info.filename!r} is not an array <key>.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise CaseError(f"{key}: .npy format version {version} (1.0 or 2.0 expected)")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                if dtype not in _NPZ_DTYPES or fortran:
                    raise CaseError(f"{key}: dtype {dtype}{' in Fortran order' if fortran else ''}; vector arrays are "
                                    "C-ordered float64, int64 or bool")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if f.tell() + nbytes != info.file_size:
                    raise CaseError(f"{key}: header says shape {shape} ({nbytes} bytes), the member holds "
                                    f"{info.file_size - f.tell()}")
                arrays[key] = np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape).copy()
    return arrays


def _descriptions(entry, part):
    """The entry's ``inputs`` or ``outputs``: {key: {"shape": [...], "dtype": str}}."""
    d = entry.get(part)
    if not isinstance(d, dict):
        raise CaseError(f"manifest entry has {_field(entry, part)}, not an object of array descriptions")
    for k, desc in d.items():
        if not (isinstance(desc, dict) and set(desc) == {"shape", "dtype"} and isinstance(desc["shape"], list)
                and all(type(n) is int and n >= 0 for n in desc["shape"]) and isinstance(desc["dtype"], str)):
            raise CaseError(f"manifest entry's {part}[{k!r}] is {_what(desc)}, not {{'shape': [...], 'dtype': ...}}")
    return d


def case_path(directory, entry):
    """The path of a case's npz: ``<name>.npz`` inside ``directory`` and nowhere else
    (no other name, no link out of the folder). Raises CaseError."""
    name, file = entry["name"], entry.get("file")
    if file != f"{name}.npz":
        raise CaseError(f"manifest entry has {_field(entry, 'file')}; a case's file is {name}.npz, in the vectors folder")
    path = Path(directory) / file
    if path.is_symlink() or path.resolve().parent != Path(directory).resolve():
        raise CaseError(f"{file} links out of the vectors folder; {REGENERATE_HINT}")
    if not path.is_file():
        raise CaseError(f"{file} is not a file in the vectors folder; {REGENERATE_HINT}")
    return path


def load_case(directory, entry):
    """The arrays of one manifest entry as (inputs dict, outputs dict). Raises CaseError
    (a ValueError) on a bad path, size, checksum, npz, or on keys, shapes or dtypes that
    differ from the manifest."""
    path = case_path(directory, entry)
    inputs, outputs = _descriptions(entry, "inputs"), _descriptions(entry, "outputs")
    if set(inputs) & set(outputs):
        raise CaseError(f"keys listed as both inputs and outputs: {sorted(set(inputs) & set(outputs))}")
    sha = entry.get("sha256")
    if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise CaseError(f"manifest entry has {_field(entry, 'sha256')}, not 64 lowercase hex digits; {REGENERATE_HINT}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CaseError(f"{path.name} has {size} bytes, more than a vector file may ({MAX_FILE_BYTES})")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise CaseError(f"sha256 of {path.name} does not match the manifest; {REGENERATE_HINT}")
    arrays = read_npz(data)
    want = {**inputs, **outputs}
    if set(arrays) != set(want):
        raise CaseError(f"{path.name} keys differ from the manifest: {sorted(set(arrays) ^ set(want))}; {REGENERATE_HINT}")
    for k, desc in want.items():
        if _describe(arrays[k]) != desc:
            raise CaseError(f"{path.name}: {k} is {_describe(arrays[k])}, manifest says {desc}; {REGENERATE_HINT}")
    return ({k: arrays[k] for k in inputs}, {k: arrays[k] for k in outputs})


def _listing(keys, n=6):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def compare_outputs(actual, expected, kind=TOL_KIND):
    """Compare output dicts array by array, in full: the same keys, dtypes and shapes,
    then the values. Returns (ok, worst rel err, worst key, detail)."""
    missing, extra = [k for k in actual if k not in expected], [k for k in expected if k not in actual]
    if missing or extra:
        detail = "; ".join(t for t in (missing and f"outputs the file lacks: {_listing(missing)}",
                                       extra and f"stored outputs the kind does not compute: {_listing(extra)}") if t)
        return False, float("inf"), (missing or extra)[0], detail
    ok, worst, worst_key, detail = True, 0.0, None, ""
    for k, e in expected.items():
        a = np.asarray(actual[k])
        if a.shape != e.shape or a.dtype != e.dtype:
            return False, float("inf"), k, f"{k}: computed {a.dtype.name} {a.shape}, stored {e.dtype.name} {e.shape}"
        if e.dtype.kind in "biu":
            good = bool(np.array_equal(a, e))
            rel = 0.0 if good else float("inf")
            msg = "" if good else f"{k}: {a!r} vs stored {e!r}"
        else:
            rep = allclose_report(a, e, kind, np.float64)
            good, rel, msg = rep.ok, rep.rel_err, f"{k}: {rep}"
        if rel >= worst:
            worst, worst_key = rel, k
        if not good:
            ok = False
            detail = detail or msg
    return ok, worst, worst_key, detail


def check_case(directory, entry):
    """One manifest entry (a dict with a known ``name`` and its ``kind``): load, check the
    inputs against the kind, recompute, compare. Every problem becomes a FAIL result;
    nothing raises."""
    name, kind = entry["name"], entry["kind"]
    try:
        inputs, expected = load_case(directory, entry)
        problems = input_problems(kind, inputs)
        if problems:
            return CaseResult(name, False, float("inf"), f"inputs refused for kind {kind}: {'; '.join(problems)}")
        actual = COMPUTE[kind](inputs)
    except CaseError as exc:
        return CaseResult(name, False, float("inf"), str(exc))
    except Exception as exc:  # noqa: BLE001 -- the reference refusing an input, or worse: a FAIL line, not a traceback
        return CaseResult(name, False, float("inf"), f"recomputing failed: {type(exc).__name__}: {exc}")
    ok, rel, key, detail = compare_outputs(actual, expected)
    return CaseResult(name, ok, rel, ("bit-exact" if rel == 0 else f"worst at {key}") if ok else detail)


def read_manifest(directory):
    """(manifest dict, None) or (None, why it cannot be read) for ``directory``."""
    path = Path(directory) / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"{path} has more than {MAX_MANIFEST_BYTES} bytes; {REGENERATE_HINT}"
        man = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path} not found; {REGENERATE_HINT}"
    except (OSError, ValueError) as exc:          # unreadable, not UTF-8, not JSON
        return None, f"{path} cannot be read as JSON ({exc}); {REGENERATE_HINT}"
    if not isinstance(man, dict):
        return None, f"{path} holds {_what(man)}, not a JSON object; {REGENERATE_HINT}"
    version = man.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        return None, (f"format version {version!r} in {path}, this checker reads version {FORMAT_VERSION}; "
                      f"{REGENERATE_HINT}")
    return man, None


def _entry_name(i, entry):
    """(the name to report entry ``i`` under, the problem with its name or None). An entry
    without a usable name is reported as ``cases[i]``."""
    if not isinstance(entry, dict):
        return f"cases[{i}]", f"manifest entry is {_what(entry)}, not an object"
    name = entry.get("name")
    if not isinstance(name, str):
        return f"cases[{i}]", f"manifest entry has {_field(entry, 'name')}, not a string"
    if not (name.isascii() and name.isprintable() and 0 < len(name) <= 80):
        return f"cases[{i}]", f"manifest entry has the unprintable or overlong name {_what(name)}"
    return name, None


def check_vectors(directory=DEFAULT_DIR):
    """Recompute every case from its stored inputs and compare. Returns (ok, [CaseResult]):
    one result per manifest entry and one per case of the generator that the manifest
    lacks; a manifest that cannot be read (or of another format version) is one result.
    The list of cases must be the generator's: a case missing, listed twice or unknown
    fails."""
    directory = Path(directory)
    man, problem = read_manifest(directory)
    if man is None:
        return False, [CaseResult("manifest", False, float("inf"), problem)]
    results = []
    entries = man.get("cases")
    if not isinstance(entries, list):
        results.append(CaseResult("manifest", False, float("inf"),
                                  f"'cases' is {_what(entries)}, not a list of case entries; {REGENERATE_HINT}"))
        entries = []
    known = {c.name: c.kind for c in CASES}
    first = {}                                                         # name -> index of its first entry
    for i, entry in enumerate(entries):
        name, problem = _entry_name(i, entry)
        if problem is None and name in first:
            problem = f"listed twice in the manifest (cases[{first[name]}] and cases[{i}])"
        elif problem is None and name not in known:
            problem = f"not a case of this generator (verify.golden); {REGENERATE_HINT}"
        elif problem is None and entry.get("kind") != known[name]:
            problem = f"manifest entry has {_field(entry, 'kind')}; this case's kind is {known[name]!r}"
        results.append(check_case(directory, entry) if problem is None else CaseResult(name, False, float("inf"), problem))
        if name in known:
            first.setdefault(name, i)
    results += [CaseResult(n, False, float("inf"), f"missing from the manifest; {REGENERATE_HINT}")
                for n in known if n not in first]
    return all(r.ok for r in results), results


def _verdict(r):
    tol = tolerance(np.float64, TOL_KIND)
    mark = "PASS" if r.ok else "FAIL"
    line = f"{mark}  {r.name:<44} rel err {r.rel_err:9.2e} (rtol {tol.rtol:g})  {r.message}"
    return line.encode("ascii", "backslashreplace").decode("ascii")     # keys and values quoted from a file


# --------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("action", choices=["write", "check"],
                   help="write: compute the cases and write DIR/*.npz and DIR/manifest.json; "
                        "check: recompute every case from its stored inputs and compare")
    p.add_argument("dir", nargs="?", default=str(DEFAULT_DIR), metavar="DIR",
                   help=f"vectors directory (default: the package's {DEFAULT_DIR})")


def run(args):
    if args.action == "write":
        try:
            check_output_dir(str(args.dir), "DIR")
        except OutputPathError as exc:
            print(f"icgd vectors write: {exc}", file=sys.stderr)
            return 2
        man = write_vectors(args.dir)
        size = sum(os.path.getsize(Path(args.dir) / e["file"]) for e in man["cases"])
        print(f"wrote {len(man['cases'])} cases ({size / 1024:.0f} KiB) and {MANIFEST} to {args.dir}")
        return 0
    ok, results = check_vectors(args.dir)
    for r in results:
        print(_verdict(r), flush=True)
    n_bad = sum(not r.ok for r in results)
    if ok:
        print(f"{len(results)} passed, 0 failed ({args.dir})")
    else:
        print(f"FAILED: {n_bad} of {len(results)} checks failed, {len(results) - n_bad} agree ({args.dir})")
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m verify.golden", description="Write or check the golden test vectors.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
