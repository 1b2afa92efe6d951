"""The conformance kit: a port checks itself against the golden vectors through an adapter.

``icgd conformance ADAPTER`` loads ADAPTER (an importable module such as
``verify.adapters.numpy_adapter``, or a file ``my_adapter.py``), runs every case of the
vectors (``verify/vectors/`` by default) whose kind the adapter implements, compares
each output with the manifest's tolerance rule and prints one verdict line per case:
PASS, FAIL (the worst error and where, which outputs are off, and the known mistake
that reproduces them, if one does) or NOT IMPLEMENTED. ``--json`` and ``--junit-xml``
write the same report for CI systems; ``--kinds`` and ``--cases`` select;
``--rtol`` / ``--atol`` override the tolerance, and the report says so on every line.
Exit codes: 0 every case run passed (and at least one ran), 1 a case failed or none
ran, 2 bad usage (the adapter cannot be loaded, an option, an output path).
``icgd conformance --protocol`` prints what each kind's function takes and returns.

The adapter protocol (SPEC.md section 14) is read from the manifest's ``kinds`` table,
so a new kind needs no code here:

* kind K is implemented by the adapter's function named K (:func:`function_name`);
  a kind without one is *not implemented*, never passed; a function that raises
  ``NotImplementedError`` makes its case not implemented too;
* it is called with keyword arguments, one per top-level name of the case's inputs
  (:func:`nest`): data as float64 NumPy arrays, configuration as Python values
  (0-d: bool, int or float, +inf meaning "no clipping"; 1-d: a float64 array); a key
  segment with an index (``layer0``, ``step3``) becomes entry 0, 3 of a list under its
  name (``layer``, ``step``), a dotted key a nested dict (``m.layer1.P`` ->
  ``m["layer"][1]["P"]``);
* it returns a dict of its outputs in the same structure, or with the flat keys of the
  manifest, or a mix (:func:`flatten`). Any array NumPy can read is accepted.

What this file is not: the reference (it calls it only to test the known mistakes),
nor the checker of the vectors themselves (``icgd vectors check``, verify/golden.py).

**Diagnoses** (:data:`MISTAKES`). A diagnosis is a named hypothesis about a port,
decided by recomputing the case with the reference under that one mistake
(:class:`Variant`: the reference's layer with the mask shifted, the loss divided by
d_y, Adam without its bias correction, ...) and comparing the port's outputs with the
mistaken ones at the same tolerance. It is named only when the mistaken outputs differ
from the vectors on that case and the port's match them; never from error sizes alone.
The variants with every switch off reproduce the vectors (tests/test_conformance_kit.py).
"""

import argparse
import fnmatch
import importlib
import importlib.util
import json
import math
import re
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

import reference as R
from reference.files import OutputPathError, check_writable, write_output
from reference.layers.lsa import clip_backward, clip_tokens
from reference.optim import AdamHP, AdamState, adam_init, adam_update
from reference.tree import tree_add

from . import golden
from .cli import INTERRUPTED

PASSED, FAILED, NOT_IMPLEMENTED = "passed", "failed", "not implemented"
MAX_OFF_LINES = 8     # outputs listed one per line under a failing case; the rest by name
MARK = {PASSED: "PASS", FAILED: "FAIL", NOT_IMPLEMENTED: "NOT IMPLEMENTED"}
FLOAT64_HINT = ("the vectors are float64: compute in float64 (JAX: jax.config.update('jax_enable_x64', True) "
                "before any array is made; PyTorch: torch.float64 tensors, e.g. torch.set_default_dtype(torch.float64))")


class UsageError(ValueError):
    """A command-line problem found before any case runs (exit code 2)."""


# --------------------------------------------------------------------------------
# The protocol: kind -> function, stored keys -> keyword arguments, outputs -> keys
# --------------------------------------------------------------------------------

def function_name(kind):
    """The adapter function of ``kind``: the kind's name with every character that
    cannot be in a Python name replaced by ``_`` (``layer`` -> ``layer``)."""
    name = re.sub(r"\W", "_", kind, flags=re.ASCII)
    return f"kind_{name}" if name[:1].isdigit() else name


_PLACEHOLDER = re.compile(r"<([a-z_]+)>")


def _pattern_regex(pattern):
    """A regular expression for a key pattern; each placeholder a group matching one
    dot-free stretch (``layer<k>.d<param>`` matches ``layer1.dW_Q``)."""
    parts = re.split(r"(<[a-z_]+>)", pattern)
    return re.compile("".join("([^.]+?)" if _PLACEHOLDER.fullmatch(p) else re.escape(p) for p in parts))


def key_path(key, patterns):
    """The path of a stored key in the nested arguments: one entry per dotted segment,
    ``(name, None)`` for a plain segment and ``(name, i)`` for a segment the kind
    writes as ``name<placeholder>`` whose placeholder is the number ``i`` here
    (``layer<k>`` -> ``("layer", 1)`` for ``layer1``). Keys that no pattern describes
    are plain segments."""
    segments = key.split(".")
    candidates = sorted(patterns, key=lambda p: -len(_PLACEHOLDER.sub("", p)))    # the most literal pattern first
    for pattern in candidates:
        if _pattern_regex(pattern).fullmatch(key) is None:
            continue
        path = []
        for pseg, kseg in zip(pattern.split("."), segments):
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)<[a-z_]+>", pseg)
            index = kseg[len(m.group(1)):] if m and kseg.startswith(m.group(1)) else ""
            if m and re.fullmatch(r"[0-9]{1,4}", index):                        # an entry of a list, < 10**4
                path.append((m.group(1), int(index)))
            else:
                path.append((kseg, None))
        return path
    return [(s, None) for s in segments]


def _put(tree, path, value, key):
    node = tree
    for n, (name, index) in enumerate(path):
        last = n == len(path) - 1
        if index is None:
            if last:
                if name in node:
                    raise ValueError(f"key {key} collides with another key's structure")
                node[name] = value
            else:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ValueError(f"key {key} collides with another key's structure")
        else:
            seq = node.setdefault(name, [])
            if not isinstance(seq, list):
                raise ValueError(f"key {key} collides with another key's structure")
            seq.extend([None] * (index + 1 - len(seq)))
            if last:
                seq[index] = value
            else:
                if seq[index] is None:
                    seq[index] = {}
                node = seq[index]


def argument_value(a, is_config):
    """What the adapter receives for a stored array: configuration as a Python value
    (0-d) or a float64 array (1-d), data as a fresh float64 array (its own copy)."""
    if is_config and a.ndim == 0:
        return a.item()
    return np.array(a)


def nest(arrays, kind_entry):
    """The keyword arguments of an adapter function: ``arrays`` (stored key -> array)
    nested by :func:`key_path` under the kind's data patterns and configuration names."""
    config = kind_entry.get("config", {})
    patterns = list(kind_entry.get("data", [])) + list(config)
    out = {}
    for key, a in arrays.items():
        _put(out, key_path(key, patterns), argument_value(a, key in config), key)
    return out


def nest_outputs(arrays, kind_entry):
    """Stored outputs nested like an adapter returns them (for a reference adapter or a test)."""
    out = {}
    for key, a in arrays.items():
        _put(out, key_path(key, kind_entry.get("outputs", [])), a, key)
    return out


def flatten(tree, expected_keys, prefix=""):
    """An adapter's outputs as ``{stored key: value}``: a dict key ``k`` holding a dict
    adds the segment ``k.``; one holding a list or tuple whose entries are not
    themselves an expected key adds ``k0``, ``k1``, ... (``{"layer": [{"dP": a}]}`` ->
    ``layer0.dP``); everything else is a value (a list that *is* an expected key, such
    as ``losses``, stays one array). Flat keys pass through."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"the adapter returned {type(tree).__name__}, not a dict of outputs")
    flat = {}
    for k, v in tree.items():
        if not isinstance(k, str):
            raise TypeError(f"output key {k!r} is not a string")
        key = prefix + k
        if isinstance(v, Mapping):
            flat.update(flatten(v, expected_keys, key + "."))
        elif isinstance(v, (list, tuple)) and key not in expected_keys:
            for i, item in enumerate(v):
                if item is None:
                    continue
                name = f"{key}{i}"
                flat.update(flatten(item, expected_keys, name + ".") if isinstance(item, Mapping) else {name: item})
        else:
            flat[key] = v
    return flat


def _shape_tree(patterns, keys):
    """The nesting of a kind's patterns: {segment: None (a value) or a subtree}; a list
    segment is labelled ``name[]``. Whether a segment is a list is read off ``keys``
    (the stored keys of the kind's cases)."""
    tree = {}
    for p in patterns:
        matched = [k for k in keys if _pattern_regex(p).fullmatch(k)]
        path = key_path(matched[0], [p]) if matched else [(seg, None) for seg in p.split(".")]
        node = tree
        for n, ((name, index), seg) in enumerate(zip(path, p.split("."))):
            label = seg if index is None else f"{name}[]"
            if n == len(path) - 1:
                node.setdefault(label, None)
            else:
                child = node.get(label)
                if not isinstance(child, dict):
                    child = node[label] = {}
                node = child
    return tree


def _render(tree):
    parts = []
    for label, child in tree.items():
        inner = "array" if child is None else "{" + _render(child) + "}"
        if label.endswith("[]"):
            parts.append(f"{label[:-2]}: [{inner}, ...]")
        else:
            parts.append(label if child is None else f"{label}: {inner}")
    return ", ".join(parts)


def signature(kind, kind_entry, cases=()):
    """Lines for ``--protocol``: the function with its keyword arguments, the structure of
    each nested argument, and what it returns, all from the kind's patterns (a list where
    the manifest's ``cases`` of the kind store a number: ``layer<k>`` -> ``layer: [...]``)."""
    keys = {k for c in cases if c.get("kind") == kind for part in ("inputs", "outputs") for k in c.get(part, {})}
    data = _shape_tree(kind_entry.get("data", []), keys)
    names = [label.removesuffix("[]") for label in data] + list(kind_entry.get("config", {}))
    lines = [f"{function_name(kind)}({', '.join(names)})"]
    lines += [f"  {_render({label: child})}" for label, child in data.items() if child is not None]
    lines += [f"  {name}: {desc}" for name, desc in kind_entry.get("config", {}).items()]
    lines.append(f"returns {{{_render(_shape_tree(kind_entry.get('outputs', []), keys))}}}")
    return lines


# --------------------------------------------------------------------------------
# Loading an adapter
# --------------------------------------------------------------------------------

class Adapter(NamedTuple):
    module: object
    label: str       # what the user gave: a module path or a file
    name: str        # the module's NAME, or its docstring's first line, or the label
    file: str        # the module's file ('' when unknown)

    def function(self, kind):
        """The adapter's function for ``kind``, or None (not implemented)."""
        fn = getattr(self.module, function_name(kind), None)
        return fn if callable(fn) else None


def _where(exc, file=""):
    """``file:line in function`` of the innermost frame of the traceback in ``file``
    (the adapter's), else of the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    mine = [f for f in frames if file and Path(f.filename).resolve() == Path(file).resolve()]
    f = (mine or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def _exception_text(exc, file=""):
    where = _where(exc, file)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ascii_line(text + (f" (at {where})" if where else ""))


def load_adapter(spec):
    """Import an adapter: a file (a path ending in ``.py``, or one that exists) or an
    importable module path. Raises :class:`UsageError` saying why it cannot."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("ADAPTER: empty; give a module path (verify.adapters.numpy_adapter) or a file (my_adapter.py)")
    path = Path(spec)
    as_file = spec.endswith(".py") or "/" in spec or "\\" in spec or path.exists()
    try:
        if as_file:
            if not path.is_file():
                raise UsageError(f"ADAPTER {spec}: no such file")
            name = "icgd_adapter_" + re.sub(r"\W", "_", path.stem, flags=re.ASCII)
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise UsageError(f"ADAPTER {spec}: not a Python file")
            module = importlib.util.module_from_spec(module_spec)
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)        # the adapter may import modules next to it
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", spec):
                raise UsageError(f"ADAPTER {spec}: neither a file nor a module path")
            module = importlib.import_module(spec)
    except UsageError:
        raise
    except ModuleNotFoundError as exc:
        if not as_file and exc.name and (spec + ".").startswith(exc.name + "."):
            raise UsageError(f"ADAPTER {spec}: no module named {exc.name} (give an importable module path or a "
                             "file ending in .py)") from None
        raise UsageError(f"ADAPTER {spec}: importing it failed: {_exception_text(exc, str(path) if as_file else '')}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the adapter's own import error, said in one line
        raise UsageError(f"ADAPTER {spec}: importing it failed: {_exception_text(exc, str(path) if as_file else '')}") from None
    name = getattr(module, "NAME", None)
    if not isinstance(name, str) or not name.strip():
        doc = (module.__doc__ or "").strip().splitlines()
        name = doc[0] if doc else spec
    return Adapter(module, spec, ascii_line(name.strip())[:120], getattr(module, "__file__", "") or "")


# --------------------------------------------------------------------------------
# Comparing one output
# --------------------------------------------------------------------------------

class Tolerance(NamedTuple):
    """The comparison rule's numbers: the ones in force and the manifest's."""
    rtol: float
    atol: float
    manifest_rtol: float
    manifest_atol: float

    @property
    def overridden(self):
        return (self.rtol, self.atol) != (self.manifest_rtol, self.manifest_atol)

    def describe(self):
        text = f"rtol {self.rtol:g}, atol {self.atol:g}"
        if not self.overridden:
            return text + " (the manifest's)"
        return text + f" (OVERRIDDEN on the command line; the manifest's: rtol {self.manifest_rtol:g}, atol {self.manifest_atol:g})"


class OutputCheck(NamedTuple):
    key: str
    ok: bool
    rel_err: float      # max |actual - expected| / max |expected| (inf when not comparable)
    index: tuple        # where |actual - expected| is largest
    actual: object      # the values there (None when not comparable)
    expected: object
    problem: str        # why it was not compared ("" when it was)
    dtype: str          # the port's dtype ("" when absent)

    def where(self):
        return f"{self.key}{list(self.index)}" if self.index else self.key

    def describe(self):
        if self.problem:
            return f"{self.key}: {self.problem}"
        return (f"{self.where()}: rel err {self.rel_err:.2e} (actual {_num(self.actual)}, expected "
                f"{_num(self.expected)})")


def _num(x):
    return "?" if x is None else f"{x:.10g}" if isinstance(x, float) else str(x)


def to_array(value):
    """An adapter's output as a NumPy array (jax arrays, detached torch tensors,
    Python numbers and lists work)."""
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 -- a torch tensor that requires grad, a device array, ...
        raise TypeError(f"not readable as a NumPy array ({type(exc).__name__}: {exc}); return NumPy arrays "
                        "(torch: .detach().cpu().numpy())") from None


def compare(key, actual, expected, tol):
    """One output against its stored value: the shape must be the stored one; integer
    and bool outputs must be equal; float outputs follow the rule
    ``|actual - expected| <= atol + rtol * max|expected|`` elementwise (compared in
    float64 whatever the port's float dtype; a lower precision is noted, not excused)."""
    try:
        a = to_array(actual)
    except TypeError as exc:
        return OutputCheck(key, False, math.inf, (), None, None, str(exc), type(actual).__name__)
    dtype = a.dtype.name
    if a.dtype.kind not in "biuf":
        return OutputCheck(key, False, math.inf, (), None, None, f"dtype {dtype}, expected a real {expected.dtype.name}", dtype)
    if a.shape != expected.shape:
        return OutputCheck(key, False, math.inf, (), None, None,
                           f"shape {a.shape}, expected {expected.shape}", dtype)
    if expected.size == 0:
        return OutputCheck(key, True, 0.0, (), None, None, "", dtype)
    e = expected.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        a64 = a.astype(np.float64)
        diff = np.abs(a64 - e)
    if not np.all(np.isfinite(a64)):
        idx = np.unravel_index(int(np.argmax(~np.isfinite(a64))), a.shape)
        return OutputCheck(key, False, math.inf, tuple(int(i) for i in idx), float(a64[idx]), float(e[idx]),
                           "", dtype)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    scale = float(np.max(np.abs(e)))
    max_abs = float(diff[idx])
    if expected.dtype.kind in "biu":
        ok = bool(np.array_equal(a64, e))
    else:
        ok = bool(np.all(diff <= tol.atol + tol.rtol * scale))
    rel = max_abs / scale if scale > 0 else max_abs
    return OutputCheck(key, ok, rel, idx if a.ndim else (), a64[idx].item(), e[idx].item(), "", dtype)


def compare_all(actual, expected, tol):
    """Every expected output (missing ones fail) and the keys the port returned that the case lacks."""
    checks = []
    for key, e in expected.items():
        if key in actual:
            checks.append(compare(key, actual[key], e, tol))
        else:
            checks.append(OutputCheck(key, False, math.inf, (), None, None, "not returned by the adapter", ""))
    extra = tuple(k for k in actual if k not in expected)
    return tuple(checks), extra


# --------------------------------------------------------------------------------
# Diagnoses: the reference with one known mistake switched on
# --------------------------------------------------------------------------------
# A layer rule is a forward(E, p, causal, clip) -> (out, cache) and a backward(dout,
# cache) -> (dE, dp) made of the reference's lsa_forward / lsa_backward with one
# mistake; the stack, loss, construction and training computations below run any rule.
# Where a mistake does not apply (a causal mask in context-only mode), the rule is the
# reference itself, so the case cannot tell it apart and it is not named.

class LayerRule(NamedTuple):
    forward: object
    backward: object


def _exact_forward(E, p, causal, clip):
    return R.lsa_forward(E, p, causal=causal, clip=clip)


def _exact_backward(dout, cache):
    return R.lsa_backward(dout, cache)


def _no_diagonal_forward(E, p, causal, clip):
    """Causal attention over i < j: the reference's causal pre-clip tokens minus the
    diagonal term P v_j (k_j . q_j), which is the reference's context-only layer on the
    two-token sequence (e_j, e_j) (e_j the one context token, then e_j as the query)."""
    if not causal:
        out, cache = R.lsa_forward(E, p, causal=False, clip=clip)
        return out, (cache,)
    B, T, D = E.shape
    pre_c, cache_c = R.lsa_forward(E, p, causal=True, clip=None)                     # (B, T, D)
    E2 = np.repeat(E.reshape(B * T, 1, D), 2, axis=1)                                # (B T, 2, D)
    out2, cache2 = R.lsa_forward(E2, p, causal=False, clip=None)
    pre = pre_c - (out2[:, 0] - E2[:, 0]).reshape(B, T, D)                           # (B, T, D)
    out = pre if clip is None else clip_tokens(pre, clip)
    return out, (cache_c, cache2, pre, clip)


def _no_diagonal_backward(dout, cache):
    if len(cache) == 1:
        return R.lsa_backward(dout, cache[0])
    cache_c, cache2, pre, clip = cache
    B, T, D = pre.shape
    dpre = dout if clip is None else clip_backward(dout, pre, clip)                  # (B, T, D)
    dE_c, dp_c = R.lsa_backward(dpre, cache_c)
    # forward: pre = pre_c - out2[:, 0] + E2[:, 0], where both rows of E2 are copies of E
    dout2 = np.zeros((B * T, 2, D))
    dout2[:, 0] = -dpre.reshape(B * T, D)
    dE2, dp2 = R.lsa_backward(dout2, cache2)
    dE = dE_c + (dE2.sum(axis=1) + dpre.reshape(B * T, D)).reshape(B, T, D)
    return dE, tree_add((dp_c,), (dp2,))[0]


def _query_key_forward(E, p, causal, clip):
    """Context-only attention over all T tokens, query included: the reference's
    context-only layer on (e_0 .. e_{N-1}, e_q, e_q), whose first T tokens are all keys;
    the extra copy of the query asks what the query would and is dropped."""
    if causal:
        out, cache = R.lsa_forward(E, p, causal=True, clip=clip)
        return out, (cache, False)
    E_ext = np.concatenate([E, E[:, -1:]], axis=1)                                   # (B, T+1, D)
    out, cache = R.lsa_forward(E_ext, p, causal=False, clip=clip)
    return out[:, :-1], (cache, True)


def _query_key_backward(dout, cache):
    cache, extended = cache
    if not extended:
        return R.lsa_backward(dout, cache)
    dE_ext, dp = R.lsa_backward(np.concatenate([dout, np.zeros_like(dout[:, -1:])], axis=1), cache)
    dE = dE_ext[:, :-1].copy()                                                       # (B, T, D)
    dE[:, -1] += dE_ext[:, -1]                                                       # both query rows are e_q
    return dE, dp


def _projection_field(p):
    return "W_PV" if isinstance(p, R.MergedParams) else "P"


def _divided_by_N_forward(E, p, causal, clip):
    """Attention divided by N = T - 1 context tokens: the reference with P / N (merged: W_PV / N)."""
    N = E.shape[1] - 1
    field = _projection_field(p)
    out, cache = R.lsa_forward(E, p._replace(**{field: getattr(p, field) / N}), causal=causal, clip=clip)
    return out, (cache, N, field)


def _divided_by_N_backward(dout, cache):
    cache, N, field = cache
    dE, dp = R.lsa_backward(dout, cache)
    return dE, dp._replace(**{field: getattr(dp, field) / N})


def _transposed(p):
    if isinstance(p, R.MergedParams):
        return p._replace(W_KQ=np.swapaxes(p.W_KQ, -1, -2))
    return p._replace(W_Q=p.W_K, W_K=p.W_Q)


def _transposed_forward(E, p, causal, clip):
    """e_i^T W_KQ^T e_j instead of e_i^T W_KQ e_j: the reference with W_KQ transposed
    (factored: W_Q and W_K swapped, since W_KQ = W_K^T W_Q)."""
    return R.lsa_forward(E, _transposed(p), causal=causal, clip=clip)


def _transposed_backward(dout, cache):
    dE, dp = R.lsa_backward(dout, cache)
    return dE, _transposed(dp)


def _straight_through_backward(dout, cache):
    """The clip's gradient passing everywhere: the reference's backward as if unclipped."""
    return R.lsa_backward(dout, cache._replace(clip=None))


def _halved_at_level_backward(dout, cache):
    """The clip's gradient 0.5 on the level (a min/max clip splits a tie): the reference's
    backward with dpre = dout * (1 inside, 0.5 at +-c, 0 outside)."""
    if cache.clip is None:
        return R.lsa_backward(dout, cache)
    r = np.abs(cache.pre.real)
    dpre = dout * np.where(r < cache.clip, 1.0, np.where(r == cache.clip, 0.5, 0.0))
    return R.lsa_backward(dpre, cache._replace(clip=None))


LAYER_RULES = {
    "exact": LayerRule(_exact_forward, _exact_backward),
    "mask-without-diagonal": LayerRule(_no_diagonal_forward, _no_diagonal_backward),
    "query-as-key": LayerRule(_query_key_forward, _query_key_backward),
    "divided-by-N": LayerRule(_divided_by_N_forward, _divided_by_N_backward),
    "transposed-W_KQ": LayerRule(_transposed_forward, _transposed_backward),
    "straight-through-clip": LayerRule(_exact_forward, _straight_through_backward),
    "clip-halved-at-level": LayerRule(_exact_forward, _halved_at_level_backward),
}


class Variant(NamedTuple):
    """The reference's computation of a case, with at most one known mistake switched on."""
    layer: str = "exact"              # a key of LAYER_RULES
    readout_sign: int = -1            # y_hat = readout_sign * E_K[:, N, d:]; the spec's is -1
    loss_mean_over_dy: bool = False   # L and its gradients divided by d_y
    adam_bias_correction: bool = True
    first_step: int = 0               # training step s draws default_rng([seed, s + first_step])
    ones_upstream: bool = False       # the gradients of sum(out) instead of sum(dout * out)


class Stack(NamedTuple):
    K: int
    recurrent: bool
    causal: bool
    clip: object        # None: no clipping


def _clip(x):
    c = float(x)
    return None if math.isinf(c) else c


def _stack_of(a):
    return Stack(int(a["K"]), bool(a["recurrent"]), bool(a["causal"]), _clip(a["clip"]))


def _stack_forward(E, layers, st, rule):
    """K layers of ``rule`` (recurrent: parameter set 0 every time). Returns (E_K, caches)."""
    h, caches = E, []
    for k in range(st.K):
        h, c = rule.forward(h, layers[0 if st.recurrent else k], st.causal, st.clip)
        caches.append(c)
    return h, caches


def _stack_backward(dout, caches, st, rule):
    """The layers in reverse; the gradients of a shared parameter set are summed."""
    grads = [None] * (1 if st.recurrent else st.K)
    dh = dout
    for k in reversed(range(st.K)):
        dh, g = rule.backward(dh, caches[k])
        i = 0 if st.recurrent else k
        grads[i] = g if grads[i] is None else tree_add((grads[i],), (g,))[0]
    return dh, tuple(grads)


def _loss_and_grads(E, y_q, layers, d, st, v):
    """pred, L, dL/dE and the parameter gradients under variant ``v``."""
    rule = LAYER_RULES[v.layer]
    out, caches = _stack_forward(E, layers, st, rule)
    pred = v.readout_sign * out[:, -1, d:]                                           # (B, d_y)
    L, lcache = R.loss_forward(pred, y_q)
    dpred = R.loss_backward(lcache)                                                  # (B, d_y)
    if v.loss_mean_over_dy:
        L, dpred = L / y_q.shape[1], dpred / y_q.shape[1]
    dout = np.zeros_like(out)
    dout[:, -1, d:] = v.readout_sign * dpred
    dE, grads = _stack_backward(dout, caches, st, rule)
    return pred, L, dE, grads


def _v_layer(a, v):
    rule = LAYER_RULES[v.layer]
    out, cache = rule.forward(a["E"], golden.read_layer(a), bool(a["causal"]), _clip(a["clip"]))
    dE, dp = rule.backward(np.ones_like(out) if v.ones_upstream else a["dout"], cache)
    return {"out": out, "dE": dE, **golden.layer_arrays(dp, grad=True)}


def _v_stack(a, v):
    rule, st = LAYER_RULES[v.layer], _stack_of(a)
    out, caches = _stack_forward(a["E"], golden.read_stack(a), st, rule)
    dE, grads = _stack_backward(np.ones_like(out) if v.ones_upstream else a["dout"], caches, st, rule)
    return {"out": out, "dE": dE, **golden.stack_arrays(grads, grad=True)}


def _v_loss(a, v):
    pred, L, dE, grads = _loss_and_grads(a["E"], a["y_q"], golden.read_stack(a), int(a["d"]), _stack_of(a), v)
    return {"pred": pred, "L": np.asarray(L, dtype=np.float64), "dE": dE, **golden.stack_arrays(grads, grad=True)}


def _construction(kind, a, v):
    """gd / gdpp: the reference's weights and tokens, run through the variant's layers and readout."""
    res = golden.COMPUTE[kind](a)
    st = Stack(int(a["K"]), bool(a["recurrent"]), False, None) if kind == "gd" else Stack(len(a["etas"]), False, False, None)
    out, _ = _stack_forward(res["E"], golden.read_stack(res), st, LAYER_RULES[v.layer])
    return {**res, "out": out, "pred": v.readout_sign * out[:, -1, a["X"].shape[2]:]}


def _v_gd(a, v):
    return _construction("gd", a, v)


def _v_gdpp(a, v):
    return _construction("gdpp", a, v)


def _hp(a):
    return AdamHP(lr=float(a["lr"]), b1=float(a["b1"]), b2=float(a["b2"]), eps=float(a["eps"]),
                  clip_norm=_clip(a["clip_norm"])).validate()


def _adam_step(params, grads, state, hp, v):
    """The reference's clipped Adam step. Without bias correction it is the same step
    with lr * c1 / c2 and eps / c2 (c1 = 1 - b1^t, c2 = sqrt(1 - b2^t)), which makes
    p - lr (m / c1) / (sqrt(v / c2^2) + eps) into p - lr m / (sqrt(v) + eps)."""
    if v.adam_bias_correction:
        return adam_update(params, grads, state, hp)
    t = state.t + 1
    c1, c2 = 1 - hp.b1 ** t, math.sqrt(1 - hp.b2 ** t)
    return adam_update(params, grads, state, hp._replace(lr=hp.lr * c1 / c2, eps=hp.eps / c2))


def _v_adam(a, v):
    params, grads = golden.read_stack(a), golden.read_stack(a, grad=True)
    state = AdamState(golden.read_stack(a, "m."), golden.read_stack(a, "v."), int(a["t"]))
    new, st, norm = _adam_step(params, grads, state, _hp(a), v)
    return {**golden.stack_arrays(new, "new."), **golden.stack_arrays(st.m, "new_m."),
            **golden.stack_arrays(st.v, "new_v."), "new_t": np.asarray(st.t, dtype=np.int64),
            "grad_norm": np.asarray(norm, dtype=np.float64)}


def _task_spec(a):
    return R.TaskSpec(d=int(a["d"]), N=int(a["N"]), d_y=int(a["d_y"]), B=int(a["B"]),
                      x_range=tuple(float(x) for x in a["x_range"]), w_scale=float(a["w_scale"]),
                      noise_std=float(a["noise_std"]), n_distractors=int(a["n_distractors"]))


def _v_train(a, v):
    """The train loop from the reference's pieces: step s draws its tasks, takes the loss
    and gradients at the parameters it starts from, then does Adam update t = s + 1."""
    spec, st, hp, seed = _task_spec(a), _stack_of(a), _hp(a), int(a["seed"])
    params = golden.read_stack(a)
    state = adam_init(params)
    out, losses, norms = {}, [], []
    for s in range(int(a["n_steps"])):
        t = spec.sample(R.step_rng(seed, s + v.first_step))
        out.update({f"step{s}.{f}": getattr(t, f) for f in ("X", "Y", "x_q", "y_q")})
        _, L, _, grads = _loss_and_grads(R.build_tokens(t.X, t.Y, t.x_q), t.y_q, params, spec.d, st, v)
        params, state, norm = _adam_step(params, grads, state, hp, v)
        losses.append(float(L))
        norms.append(norm)
    return {"losses": np.array(losses), "grad_norms": np.array(norms), **out, **golden.stack_arrays(params, "final.")}


def _v_tasks(a, v):
    return golden.COMPUTE["tasks"]({**a, "step": np.asarray(int(a["step"]) + v.first_step, dtype=np.int64)})


VARIANT_COMPUTE = {"layer": _v_layer, "stack": _v_stack, "loss": _v_loss, "gd": _v_gd, "gdpp": _v_gdpp,
                   "adam": _v_adam, "train": _v_train, "tasks": _v_tasks}


def compute_variant(kind, inputs, variant):
    """The outputs of a case of ``kind`` under ``variant`` (None: no variant computation for the kind)."""
    fn = VARIANT_COMPUTE.get(kind)
    return None if fn is None else fn(inputs, variant)


class Mistake(NamedTuple):
    name: str
    variant: Variant
    says: str


MISTAKES = (
    Mistake("loss-mean-over-d_y", Variant(loss_mean_over_dy=True),
            "the loss is averaged over the d_y label dimensions as well as over the B tasks; SPEC.md section 6: "
            "L = 0.5 * mean over tasks of the squared error summed over d_y"),
    Mistake("causal-mask-without-diagonal", Variant(layer="mask-without-diagonal"),
            "the causal mask leaves out the diagonal (token j attends to i < j); SPEC.md section 4: "
            "ctx(j) = {0 .. j}, the mask tril(ones(T, T)) includes the diagonal"),
    Mistake("query-used-as-key", Variant(layer="query-as-key"),
            "in context-only mode the query token is used as a key and value (keys from all T tokens); "
            "SPEC.md section 4: keys and values come from the N context tokens only"),
    Mistake("attention-divided-by-N", Variant(layer="divided-by-N"),
            "the attention is divided by N (A = q k^T / N); SPEC.md section 4: no softmax, no scaling, no 1/N "
            "in the layer (the 1/N lives in the constructions' P)"),
    Mistake("straight-through-clip-gradient", Variant(layer="straight-through-clip"),
            "the token clip passes the gradient everywhere (straight-through); SPEC.md section 4: the gradient is "
            "zero where an entry was clipped, the residual path included"),
    Mistake("clip-gradient-halved-at-the-level", Variant(layer="clip-halved-at-level"),
            "the clip's gradient is 0.5 where pre = +-c (a min/max clip such as jnp.clip splits the tie); SPEC.md "
            "section 4: it passes in full where -c <= pre <= c"),
    Mistake("adam-without-bias-correction", Variant(adam_bias_correction=False),
            "Adam without bias correction (p - lr m / (sqrt(v) + eps)); SPEC.md section 10: "
            "m / (1 - b1^t) and v / (1 - b2^t), t the number of the update"),
    Mistake("steps-numbered-from-1", Variant(first_step=1),
            "steps numbered from 1: step s draws its tasks from default_rng([seed, s + 1]); SPEC.md section 10: the "
            "train vectors number steps from 0, step s draws default_rng([seed, s]) and does Adam update t = s + 1"),
    Mistake("readout-sign-flipped", Variant(readout_sign=1),
            "the prediction is read as +E_K[:, N, d:]; SPEC.md section 3: y_hat = -E_K[:, N, d:], minus the "
            "query's y-slot"),
    Mistake("W_KQ-transposed", Variant(layer="transposed-W_KQ"),
            "the attention score uses W_KQ transposed, e_i^T W_KQ^T e_j (factored: W_Q and W_K swapped); "
            "SPEC.md section 4: e_i^T W_KQ e_j with W_KQ = W_K^T W_Q"),
    Mistake("upstream-gradient-ones", Variant(ones_upstream=True),
            "the gradients are those of sum(out), an upstream gradient of ones, not of the stored dout; SPEC.md "
            "section 12: gradients of sum(dout * out)"),
)


class Diagnosis(NamedTuple):
    name: str
    says: str
    full: bool          # the port matches the mistaken computation on every output
    keys: tuple         # the failing outputs the mistake reproduces


def diagnose(kind, inputs, expected, actual, tol):
    """The known mistakes that reproduce the port's outputs on this case: those whose
    mistaken outputs differ from the vectors here and match the port's on every output
    (``full``), else those that reproduce some of the failing outputs."""
    failing = {k for k, e in expected.items() if not (k in actual and compare(k, actual[k], e, tol).ok)}
    found = []
    for m in MISTAKES:
        try:
            with np.errstate(all="ignore"):
                mistaken = compute_variant(kind, inputs, m.variant)
        except Exception:  # noqa: BLE001 -- the mistake cannot be computed on this case: not named
            continue
        if mistaken is None or set(mistaken) != set(expected):
            continue
        differs = {k for k in expected if not compare(k, mistaken[k], expected[k], tol).ok}
        if not differs:
            continue                                   # this case cannot tell the mistake apart
        matches = {k for k in expected if k in actual and compare(k, actual[k], np.asarray(mistaken[k]), tol).ok}
        if matches == set(expected):
            found.append(Diagnosis(m.name, m.says, True, tuple(k for k in expected if k in failing)))
        elif failing & matches & differs:
            found.append(Diagnosis(m.name, m.says, False, tuple(k for k in expected if k in failing & matches & differs)))
    full = [d for d in found if d.full]
    return tuple(full or found)


def diagnosable_kinds():
    """The kinds for which the known mistakes can be computed."""
    return tuple(VARIANT_COMPUTE)


# --------------------------------------------------------------------------------
# Running the cases
# --------------------------------------------------------------------------------

class CaseReport(NamedTuple):
    name: str
    kind: str
    status: str            # PASSED, FAILED or NOT_IMPLEMENTED
    message: str           # one line: the worst error and where, the exception, or why not implemented
    checks: tuple = ()     # OutputCheck per stored output (empty when the adapter did not return outputs)
    extra: tuple = ()      # keys the adapter returned that the case does not store
    diagnoses: tuple = ()  # Diagnosis
    notes: tuple = ()      # str
    seconds: float = 0.0
    traceback: str = ""

    def off(self):
        return tuple(c for c in self.checks if not c.ok)


def ascii_line(text):
    """One printable ASCII line (keys, values and exception texts quoted from elsewhere)."""
    return " ".join(str(text).split()).encode("ascii", "backslashreplace").decode("ascii")


def _worst(checks):
    compared = [c for c in checks if not c.problem]
    return max(compared, key=lambda c: c.rel_err) if compared else None


def run_case(adapter, directory, entry, kind_entry, tol, diagnoses=True):
    """One case: load it, call the adapter, compare, diagnose a failure. Never raises
    (but KeyboardInterrupt): every problem is this case's FAIL."""
    name, kind = entry["name"], entry["kind"]
    fn = adapter.function(kind)
    if fn is None:
        what = getattr(adapter.module, function_name(kind), None)
        why = (f"the adapter's {function_name(kind)} is a {type(what).__name__}, not a function" if what is not None
               else f"the adapter has no function {function_name(kind)}()")
        return CaseReport(name, kind, NOT_IMPLEMENTED, why)
    try:
        inputs, expected = golden.load_case(directory, entry)
        args = nest(inputs, kind_entry)
    except Exception as exc:  # noqa: BLE001 - any damaged file (bad zip, bad JSON, ...) fails this case only
        return CaseReport(name, kind, FAILED,
                          ascii_line(f"the vectors of this case cannot be read: {type(exc).__name__}: {exc}"))
    t0 = time.perf_counter()
    try:
        result = fn(**args)
    except NotImplementedError as exc:
        return CaseReport(name, kind, NOT_IMPLEMENTED, ascii_line(f"the adapter raised NotImplementedError: {exc}"),
                          seconds=time.perf_counter() - t0)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 -- an adapter's exception (SystemExit too) fails its case only
        tb = "".join(traceback.format_exception(exc))
        if isinstance(exc, TypeError) and len(traceback.extract_tb(exc.__traceback__)) == 1:   # the call itself
            return CaseReport(name, kind, FAILED, ascii_line(
                f"the adapter's {function_name(kind)}() does not take this case's arguments "
                f"({', '.join(args)}; `icgd conformance --protocol` lists them): {exc}"),
                seconds=time.perf_counter() - t0, traceback=tb)
        return CaseReport(name, kind, FAILED, f"the adapter raised {_exception_text(exc, adapter.file)}",
                          seconds=time.perf_counter() - t0, traceback=tb)
    seconds = time.perf_counter() - t0
    try:
        actual = flatten(result, set(expected))
    except TypeError as exc:
        return CaseReport(name, kind, FAILED, ascii_line(f"outputs: {exc}"), seconds=seconds)
    checks, extra = compare_all(actual, expected, tol)
    notes = []
    low = sorted({c.dtype for c in checks if c.dtype in ("float32", "float16", "bfloat16")})
    if low:
        notes.append(f"float32-outputs: the adapter returned {', '.join(low)} arrays; {FLOAT64_HINT}")
    ok = all(c.ok for c in checks) and not extra
    worst = _worst(checks)
    where = ("no output compared" if worst is None else "bit-exact" if worst.rel_err == 0
             else f"worst rel err {worst.rel_err:.2e} at {worst.where()}")
    if ok:
        return CaseReport(name, kind, PASSED, where, checks, notes=tuple(notes), seconds=seconds)
    off = [c for c in checks if not c.ok]
    parts = []
    if off:
        first = max(off, key=lambda c: c.rel_err if not c.problem else -1.0)
        parts.append(f"{len(off)} of {len(checks)} outputs off, " + ("worst " + first.describe() if not first.problem
                                                                      else first.describe()))
    if extra:
        parts.append(f"outputs the case does not have: {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
    found = ()
    if diagnoses and off:
        found = diagnose(kind, inputs, expected, actual, tol)
    return CaseReport(name, kind, FAILED, ascii_line("; ".join(parts)), checks, extra, found, tuple(notes), seconds)


class Selection(NamedTuple):
    kinds: tuple = ()     # empty: every kind
    cases: tuple = ()     # fnmatch patterns; empty: every case


def parse_list(text, what):
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise UsageError(f"{what}: nothing in {text!r}; give names, comma-separated")
    return tuple(t for t in items if t)


class Vectors(NamedTuple):
    directory: Path
    manifest: dict
    entries: list       # the manifest's case entries
    kinds: dict         # the manifest's kinds table
    rtol: float         # the manifest's tolerance
    atol: float

    def tolerance(self, rtol=None, atol=None):
        """The :class:`Tolerance` in force: the manifest's, or the given overrides."""
        return Tolerance(self.rtol if rtol is None else rtol, self.atol if atol is None else atol, self.rtol, self.atol)


def read_vectors(directory):
    """The manifest of a vectors folder (format version checked). Raises UsageError."""
    directory = Path(directory)
    man, problem = golden.read_manifest(directory)
    if man is None:
        raise UsageError(f"--vectors: {problem}")
    kinds, entries, tol = man.get("kinds"), man.get("cases"), man.get("tolerance")
    if not isinstance(kinds, dict) or not all(isinstance(k, dict) for k in kinds.values()):
        raise UsageError(f"--vectors: the manifest in {directory} has no 'kinds' table; {golden.REGENERATE_HINT}")
    if not isinstance(entries, list):
        raise UsageError(f"--vectors: the manifest in {directory} has no list of 'cases'; {golden.REGENERATE_HINT}")
    if not (isinstance(tol, dict) and all(type(tol.get(k)) in (int, float) and tol[k] >= 0 for k in ("rtol", "atol"))):
        raise UsageError(f"--vectors: the manifest in {directory} has no tolerance rtol / atol; {golden.REGENERATE_HINT}")
    return Vectors(directory, man, entries, kinds, float(tol["rtol"]), float(tol["atol"]))


def select_entries(entries, kinds, selection):
    """The manifest entries to run, in manifest order, and the problems of entries that
    cannot be run at all (no name, an unknown kind). Raises UsageError for a --kinds
    name that is not a kind or a --cases pattern that matches no case."""
    unknown = [k for k in selection.kinds if k not in kinds]
    if unknown:
        raise UsageError(f"--kinds: {', '.join(unknown)} not a kind of these vectors; kinds: {', '.join(kinds)}")
    chosen, broken = [], []
    for i, e in enumerate(entries):
        ok = isinstance(e, dict) and isinstance(e.get("name"), str) and e.get("kind") in kinds
        name = e.get("name") if isinstance(e, dict) and isinstance(e.get("name"), str) else f"cases[{i}]"
        kind = e.get("kind") if isinstance(e, dict) and isinstance(e.get("kind"), str) else "?"
        if selection.kinds and kind not in selection.kinds:
            continue
        if selection.cases and not any(fnmatch.fnmatchcase(name, p) for p in selection.cases):
            continue
        if ok:
            chosen.append(e)
        else:
            broken.append(CaseReport(ascii_line(name), ascii_line(kind), FAILED,
                                     f"manifest entry without a name or of a kind the 'kinds' table lacks; "
                                     f"{golden.REGENERATE_HINT}"))
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    for p in selection.cases:
        if not any(isinstance(n, str) and fnmatch.fnmatchcase(n, p) for n in names):
            raise UsageError(f"--cases: {p!r} matches no case")
    return chosen, broken


class Report(NamedTuple):
    adapter: str
    adapter_name: str
    vectors: str
    manifest: dict
    tol: Tolerance
    cases: tuple          # CaseReport
    seconds: float

    def count(self, status):
        return sum(c.status == status for c in self.cases)

    def ok(self):
        """Every case run passed and at least one ran."""
        return self.count(FAILED) == 0 and self.count(PASSED) > 0


def run_conformance(adapter, vectors, tol=None, selection=Selection(), diagnoses=True, progress=None):
    """Run the selected cases of ``vectors`` (a :class:`Vectors`) at ``tol`` (default:
    the manifest's); ``progress(case_report)`` is called after each. Returns a :class:`Report`."""
    tol = vectors.tolerance() if tol is None else tol
    chosen, broken = select_entries(vectors.entries, vectors.kinds, selection)
    t0 = time.perf_counter()
    reports = []
    for r in broken:
        reports.append(r)
        if progress:
            progress(r)
    for entry in chosen:
        r = run_case(adapter, vectors.directory, entry, vectors.kinds[entry["kind"]], tol, diagnoses)
        reports.append(r)
        if progress:
            progress(r)
    return Report(adapter.label, adapter.name, str(vectors.directory), vectors.manifest, tol, tuple(reports),
                  time.perf_counter() - t0)


# --------------------------------------------------------------------------------
# Reports: text, JSON, JUnit XML
# --------------------------------------------------------------------------------

def verdict_lines(r, tol, show_traceback=False):
    """The lines of one case: the verdict, then (on failure) what is off, what agrees,
    the diagnoses and notes, indented."""
    tag = " [tolerance overridden]" if tol.overridden else ""
    lines = [f"{MARK[r.status]:<15}  {r.name:<44} {r.message}{tag}"]
    if r.status == FAILED and r.checks:
        off = r.off()
        for c in off[:MAX_OFF_LINES]:
            lines.append(f"    off    {c.where():<24} " + (c.problem if c.problem else
                         f"rel err {c.rel_err:.2e}  actual {_num(c.actual)}  expected {_num(c.expected)}"))
        if len(off) > MAX_OFF_LINES:
            lines.append(f"    off    and {len(off) - MAX_OFF_LINES} more: {', '.join(c.key for c in off[MAX_OFF_LINES:])}")
        agree = [c.key for c in r.checks if c.ok]
        if off and agree:
            lines.append("    agree  " + ", ".join(agree))
        for d in r.diagnoses:
            if d.full:
                lines.append(f"    diagnosis: {d.name}: {d.says}")
            else:
                lines.append(f"    partly explained by {d.name} (reproduces {', '.join(d.keys)}): {d.says}")
        if off and not r.diagnoses and r.kind in diagnosable_kinds():
            lines.append(f"    diagnosis: none of the {len(MISTAKES)} known mistakes reproduces these outputs")
    for n in r.notes:
        lines.append(f"    note: {n}")
    if show_traceback and r.traceback:
        lines += ["    " + t for t in r.traceback.rstrip().splitlines()]
    return [line.encode("ascii", "backslashreplace").decode("ascii") for line in lines]


def summary_line(rep):
    n_pass, n_fail, n_ni = rep.count(PASSED), rep.count(FAILED), rep.count(NOT_IMPLEMENTED)
    ni_kinds = sorted({c.kind for c in rep.cases if c.status == NOT_IMPLEMENTED})
    text = (f"{n_pass} passed, {n_fail} failed, {n_ni} not implemented"
            + (f" (kinds {', '.join(ni_kinds)})" if ni_kinds else "")
            + f" of {len(rep.cases)} cases in {rep.seconds:.1f} s; {rep.tol.describe()}")
    if n_fail:
        return "FAILED: " + text
    if not n_pass:
        return "NOTHING CHECKED: " + text + "; no case ran, so nothing is shown to conform"
    return "OK: " + text


def _check_dict(c):
    return {"key": c.key, "ok": c.ok, "rel_err": _json_float(c.rel_err), "index": list(c.index),
            "actual": _json_float(c.actual), "expected": _json_float(c.expected), "problem": c.problem, "dtype": c.dtype}


def _json_float(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def to_json(rep):
    """The report as a JSON text (non-finite numbers as strings)."""
    return json.dumps({
        "adapter": rep.adapter, "adapter_name": rep.adapter_name, "vectors": rep.vectors,
        "format_version": rep.manifest.get("format_version"), "package_version": rep.manifest.get("package_version"),
        "tolerance": {"rtol": rep.tol.rtol, "atol": rep.tol.atol, "overridden": rep.tol.overridden,
                      "manifest_rtol": rep.tol.manifest_rtol, "manifest_atol": rep.tol.manifest_atol,
                      "rule": rep.manifest.get("tolerance", {}).get("rule")},
        "ok": rep.ok(), "n_passed": rep.count(PASSED), "n_failed": rep.count(FAILED),
        "n_not_implemented": rep.count(NOT_IMPLEMENTED), "seconds": round(rep.seconds, 3),
        "summary": summary_line(rep),
        "cases": [{"name": c.name, "kind": c.kind, "status": c.status, "message": c.message,
                   "seconds": round(c.seconds, 4), "off": [o.key for o in c.off()],
                   "extra_outputs": list(c.extra), "notes": list(c.notes),
                   "diagnoses": [{"name": d.name, "full": d.full, "reproduces": list(d.keys), "says": d.says}
                                 for d in c.diagnoses],
                   "outputs": [_check_dict(o) for o in c.checks], "traceback": c.traceback} for c in rep.cases],
    }, indent=2) + "\n"


def to_junit_xml(rep):
    """The report as JUnit XML: one testcase per case (classname icgd.conformance.<kind>);
    a failure carries the verdict and its lines, not implemented is ``skipped``."""
    suite = ET.Element("testsuite", name="icgd conformance", tests=str(len(rep.cases)),
                       failures=str(rep.count(FAILED)), errors="0", skipped=str(rep.count(NOT_IMPLEMENTED)),
                       time=f"{rep.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (("adapter", rep.adapter), ("adapter_name", rep.adapter_name), ("vectors", rep.vectors),
                 ("rtol", f"{rep.tol.rtol:g}"), ("atol", f"{rep.tol.atol:g}"),
                 ("tolerance", rep.tol.describe())):
        ET.SubElement(props, "property", name=k, value=str(v))
    for c in rep.cases:
        tc = ET.SubElement(suite, "testcase", classname=f"icgd.conformance.{c.kind}", name=c.name,
                           time=f"{c.seconds:.4f}")
        if c.status == FAILED:
            f = ET.SubElement(tc, "failure", message=c.message, type="mismatch" if c.checks else "error")
            f.text = "\n".join(verdict_lines(c, rep.tol, show_traceback=True))
        elif c.status == NOT_IMPLEMENTED:
            ET.SubElement(tc, "skipped", message=f"not implemented: {c.message}")
        elif c.notes:
            ET.SubElement(tc, "system-out").text = "\n".join(c.notes)
    root = ET.Element("testsuites", name="icgd conformance", tests=str(len(rep.cases)),
                      failures=str(rep.count(FAILED)), errors="0", skipped=str(rep.count(NOT_IMPLEMENTED)),
                      time=f"{rep.seconds:.3f}")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------

def _tolerance_value(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


_tolerance_value.__name__ = "number >= 0"


def add_arguments(p):
    p.add_argument("adapter", nargs="?", metavar="ADAPTER",
                   help="the port's adapter: an importable module (verify.adapters.numpy_adapter) or a file "
                        "(my_adapter.py); SPEC.md section 14 says what it provides")
    p.add_argument("--vectors", default=str(golden.DEFAULT_DIR), metavar="DIR",
                   help=f"the vectors folder (default: the package's {golden.DEFAULT_DIR})")
    p.add_argument("--kinds", metavar="K,K", help="only the cases of these kinds (comma-separated)")
    p.add_argument("--cases", metavar="GLOB,GLOB", help="only the cases whose names match one of these patterns "
                                                      "(fnmatch, comma-separated: 'layer-H1-*,adam-*')")
    p.add_argument("--rtol", type=_tolerance_value, help="override the manifest's rtol (reported on every line)")
    p.add_argument("--atol", type=_tolerance_value, help="override the manifest's atol (reported on every line)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--junit-xml", metavar="FILE", help="also write the report as JUnit XML (one testcase per case)")
    p.add_argument("--no-diagnose", action="store_true", help="do not test the known mistakes on failing cases")
    p.add_argument("--traceback", action="store_true", help="print the adapter's traceback under a case it failed by raising")
    p.add_argument("--protocol", action="store_true",
                   help="print each kind's function, its arguments and outputs (from the manifest), and, with "
                        "ADAPTER, which ones it implements; runs nothing")


def _fail(msg):
    print(f"icgd conformance: {msg}", file=sys.stderr)
    return 2


def print_protocol(vectors, adapter=None):
    man, entries, kinds = vectors.manifest, vectors.entries, vectors.kinds
    print(f"The adapter protocol of the vectors in {vectors.directory} (format {man.get('format_version')}); "
          "SPEC.md section 14.")
    print("One function per kind, called with keyword arguments; [k] is a list entry (layer[0] is the "
          "stored layer0.); returns a dict of the outputs in the same structure (or the flat keys).")
    for kind, entry in kinds.items():
        n = sum(isinstance(e, dict) and e.get("kind") == kind for e in entries)
        mark = "" if adapter is None else ("  [implemented]" if adapter.function(kind) else "  [not implemented]")
        print(f"\n{kind} ({n} cases){mark}: {entry.get('computes', '')}")
        for line in signature(kind, entry, [e for e in entries if isinstance(e, dict)]):
            print(f"  {line}")
    print("\nPlaceholders: " + "; ".join(f"{k} {v}" for k, v in man.get("placeholders", {}).items()))
    print(f"Comparison: {man.get('tolerance', {}).get('rule')}, rtol {vectors.rtol:g}, atol {vectors.atol:g}")
    return 0


def run(args):
    try:
        vectors = read_vectors(args.vectors)
        adapter = load_adapter(args.adapter) if args.adapter is not None else None
        if args.protocol:
            return print_protocol(vectors, adapter)
        if adapter is None:
            raise UsageError("ADAPTER: missing; give the port's adapter (a module path or a file), or --protocol")
        selection = Selection(parse_list(args.kinds, "--kinds") if args.kinds is not None else (),
                              parse_list(args.cases, "--cases") if args.cases is not None else ())
        select_entries(vectors.entries, vectors.kinds, selection)            # a bad --kinds / --cases, before any work
        outputs = [(opt, path) for opt, path in (("--json", args.json), ("--junit-xml", args.junit_xml)) if path]
        for opt, path in outputs:
            check_writable(path, opt)
        if len(outputs) == 2 and Path(args.json).resolve() == Path(args.junit_xml).resolve():
            raise UsageError(f"--json and --junit-xml: both name {args.json}; give two files")
    except (UsageError, OutputPathError) as exc:
        return _fail(exc)
    tol = vectors.tolerance(args.rtol, args.atol)
    print(ascii_line(f"icgd conformance {R.__version__}: adapter {adapter.label} ({adapter.name}) against the "
                     f"vectors in {vectors.directory} (format {vectors.manifest.get('format_version')}, "
                     f"{len(vectors.entries)} cases)"), flush=True)
    print(f"tolerance per output: |actual - expected| <= atol + rtol * max|expected|, {tol.describe()}", flush=True)

    def progress(r):
        for line in verdict_lines(r, tol, args.traceback):
            print(line, flush=True)

    try:
        rep = run_conformance(adapter, vectors, tol, selection, not args.no_diagnose, progress)
    except KeyboardInterrupt:
        print("\nicgd conformance: interrupted; no report written", file=sys.stderr)
        return INTERRUPTED
    print(summary_line(rep))
    for opt, path, text in (("--json", args.json, to_json), ("--junit-xml", args.junit_xml, to_junit_xml)):
        if path:
            try:
                write_output(path, text(rep), opt)
            except OutputPathError as exc:
                return _fail(exc)
    return 0 if rep.ok() else 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m verify.conformance",
                                description="Check a port's adapter against the golden vectors.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
