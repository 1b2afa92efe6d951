"""Hypothesis strategies, in one place. They build valid inputs directly (sizes drawn
in small ranges, data from a drawn seed) instead of filtering invalid ones; the bad-array
strategies at the end make one argument of a valid call invalid."""

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

import reference as R

dims = st.fixed_dictionaries({
    "d": st.integers(1, 5),
    "d_y": st.integers(1, 3),
    "N": st.integers(1, 8),
    "B": st.integers(1, 3),
})
heads = st.integers(1, 3)
layers = st.integers(1, 4)
etas = st.floats(0.05, 3.0)
gammas = st.floats(0.0, 0.5)
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


@st.composite
def regression(draw, dtype=None):
    """(dims dict, Tasks, rng) with data drawn from a seed; the dims dict also holds
    the tasks' token layout, ``dm["layout"] = TokenLayout(d, d_y)``."""
    dm = draw(dims)
    dm = {**dm, "layout": R.TokenLayout(dm["d"], dm["d_y"])}
    dt = draw(dtypes) if dtype is None else dtype
    rng = np.random.default_rng(draw(seeds))
    t = R.sample_tasks(rng, dm["B"], dm["d"], dm["N"], dm["d_y"], dtype=dt)
    return dm, t, rng


@st.composite
def layer_case(draw, dtype=None, merged=None):
    """(E, params, causal) for one LSA layer of random heads, key and value sizes."""
    dm, t, rng = draw(regression(dtype))
    D = dm["d"] + dm["d_y"]
    merged = draw(st.booleans()) if merged is None else merged
    p = R.init_lsa_params(rng, D, H=draw(heads), key_size=draw(st.integers(1, D + 1)),
                          value_size=draw(st.integers(1, D + 1)), scale=1.0,
                          dtype=t.X.dtype, merged=merged)
    return R.build_tokens(t.X, t.Y, t.x_q), p, draw(st.booleans())


# ---- bad arrays: one argument of a valid call made invalid (tests/test_fuzz_arrays.py) ----

class ArrayArg(NamedTuple):
    """An array argument of a call and what it must be, so that a bad one can be drawn.

    ``path`` says where it sits in the call's keyword arguments (``("X",)``,
    ``("tasks", "y_q")``, ``("params", 0, "W_Q")``); an error about it must name one of
    ``names`` (a size error may also name one of ``tied_names``, the arguments whose
    shapes fix its ``tied`` axes)."""

    path: tuple
    names: tuple
    tied: tuple = ()            # axes whose size the other arguments fix
    tied_names: tuple = ()
    data: bool = False          # task data or tokens: overflow-scale values are rejected
    shared_dtype: bool = True   # must have the call's dtype (the other float dtype is an error)
    fixed_ndim: bool = True     # its number of dimensions is fixed
    nonneg: bool = False        # must be >= 0 (Adam's second moments)
    optional: bool = False      # None is a valid value (it means "not given")
    complex_ok: bool = False    # complex accepted (alone, for complex-step checks)


class ValidCall(NamedTuple):
    """Keyword arguments of a call that succeeds, its array arguments, and for the sizes
    that must be >= 1 ("B", "N") the argument an error must name when that size is 0."""

    args: dict
    arrays: tuple
    empty: dict = {}


class BadCall(NamedTuple):
    what: str         # e.g. "tasks.y_q: nan"
    names: tuple      # one of these must be named in the error message
    exc: type         # ValueError or TypeError
    args: dict


fuzz_dims = st.fixed_dictionaries({
    "d": st.integers(1, 3),
    "d_y": st.integers(1, 2),
    "N": st.integers(1, 4),
    "B": st.integers(1, 3),
})
# dtypes an argument must never have (the call's own float dtype is the only one allowed;
# complex is refused too: a single complex argument among real ones mixes dtypes)
BAD_DTYPES = (object, np.int64, np.float16, np.bool_, np.complex128)


def overflow_scale(dtype):
    """A magnitude the dtype represents but whose square overflows it."""
    return 1e200 if np.dtype(dtype) == np.float64 else 1e30


def get_at(args, path):
    a = args
    for k in path:
        a = a[k] if isinstance(k, int) or isinstance(a, dict) else getattr(a, k)
    return a


def replace_at(args, path, value):
    """A copy of ``args`` with the entry at ``path`` replaced (NamedTuples by _replace,
    tuples rebuilt); the rest is shared."""
    def put(node, keys):
        if not keys:
            return value
        k, rest = keys[0], keys[1:]
        if isinstance(node, dict):
            return {**node, k: put(node[k], rest)}
        if isinstance(k, int):
            items = list(node)
            items[k] = put(items[k], rest)
            return type(node)(items) if not hasattr(node, "_fields") else type(node)(*items)
        return node._replace(**{k: put(getattr(node, k), rest)})
    return put(args, tuple(path))


def small_tasks(rng, dims, dtype):
    """Tasks of ``dims``; B = 0 or N = 0 are made by slicing tasks drawn with size 1
    (``sample_tasks`` itself refuses them)."""
    B, N = dims["B"], dims["N"]
    t = R.sample_tasks(rng, max(B, 1), dims["d"], max(N, 1), dims["d_y"], dtype=dtype)
    return R.Tasks(t.X[:B, :N], t.Y[:B, :N], t.x_q[:B], t.y_q[:B], t.W[:B])


def raw_tokens(tasks):
    """Tokens of ``tasks`` assembled without any checks (also for B = 0 or N = 0)."""
    X, Y, x_q = tasks.X, tasks.Y, tasks.x_q
    q = np.concatenate([x_q, np.zeros((x_q.shape[0], Y.shape[2]), X.dtype)], axis=1)[:, None]
    return np.concatenate([np.concatenate([X, Y], axis=2), q], axis=1)   # (B, N+1, D)


@st.composite
def bad_arrays(draw, a, spec, dtype):
    """(kind, bad value, exception type, names) for the valid array ``a`` described by
    ``spec`` (an :class:`ArrayArg`) in a call of float dtype ``dtype``."""
    kinds = ["dtype"] if spec.optional else ["none", "dtype"]
    if spec.fixed_ndim:
        kinds.append("ndim")
    if a.size:
        kinds += ["nan", "inf"]
    if spec.tied:
        kinds.append("size")
    if spec.data and a.size:
        kinds.append("overflow")
    if spec.shared_dtype:
        kinds.append("other-float")
    if spec.nonneg and a.size:
        kinds.append("negative")
    kind = draw(st.sampled_from(kinds))
    names = spec.names
    i = draw(st.integers(0, max(a.size - 1, 0)))
    if kind == "none":
        return kind, None, TypeError, names
    if kind == "dtype":
        dt = draw(st.sampled_from([t for t in BAD_DTYPES if not (spec.complex_ok and t is np.complex128)]))
        return f"dtype {np.dtype(dt)}", a.astype(dt), TypeError, names
    if kind == "other-float":
        other = np.float32 if np.dtype(dtype) == np.float64 else np.float64
        return f"dtype {np.dtype(other)}", a.astype(other), TypeError, names
    if kind == "ndim":
        if draw(st.booleans()) or a.ndim < 2:
            return "ndim +1", a[None], ValueError, names
        return "ndim -1", a.reshape(a.shape[:-2] + (-1,)), ValueError, names
    if kind == "size":
        axis = draw(st.sampled_from(spec.tied))
        n = a.shape[axis]
        if n >= 2 and draw(st.booleans()):
            bad = np.take(a, np.arange(n - 1), axis=axis)
        else:
            bad = np.concatenate([a, np.take(a, [0], axis=axis)], axis=axis)
        return f"size of axis {axis} {n} -> {bad.shape[axis]}", bad, ValueError, names + spec.tied_names
    b = a.copy()
    if kind == "nan":
        b.flat[i] = np.nan
    elif kind == "inf":
        b.flat[i] = draw(st.sampled_from([np.inf, -np.inf]))
    elif kind == "negative":
        b.flat[i] = -1.0
    else:  # overflow: finite in the dtype, but its square is not
        s = overflow_scale(dtype)
        b = (a.astype(np.float64) * s).astype(a.dtype)
        b.flat[i] = s
    return kind, b, ValueError, names


@st.composite
def bad_calls(draw, build):
    """A :class:`BadCall`: a valid call of ``build(rng, dims, dtype) -> ValidCall`` with
    one array argument made invalid (None, a bad dtype, NaN or inf entries, a wrong
    number of dimensions or size, overflow-scale data, a negative second moment), or
    built with B = 0 or N = 0."""
    dims = draw(fuzz_dims)
    dtype = np.dtype(draw(dtypes))
    seed = draw(seeds)
    valid = build(np.random.default_rng(seed), dims, dtype)
    choices = [("array", k) for k in range(len(valid.arrays))] + [("empty", ax) for ax in sorted(valid.empty)]
    what, which = draw(st.sampled_from(choices))
    if what == "empty":
        empty = build(np.random.default_rng(seed), {**dims, which: 0}, dtype)
        return BadCall(f"{which} = 0", (valid.empty[which],), ValueError, empty.args)
    spec = valid.arrays[which]
    kind, value, exc, names = draw(bad_arrays(get_at(valid.args, spec.path), spec, dtype))
    path = ".".join(str(k) for k in spec.path)
    return BadCall(f"{path}: {kind} ({dtype})", names, exc, replace_at(valid.args, spec.path, value))


# ---- corrupted golden-vector folders (tests/test_vectors_fuzz.py) ----------------------
# A corruption is a plain description of one thing to break in a copy of verify/vectors/;
# the test applies it. Which case and which key are drawn as large integers taken modulo
# the number of cases / keys the folder has, so these strategies need not read the files.

class VectorCorruption(NamedTuple):
    """``op`` on case number ``case`` (modulo the cases), key number ``key`` (modulo the
    candidate keys of ``op``), with ``value`` (a JSON value, a dtype name, a size, a
    path template, bytes; what ``op`` needs)."""

    op: str
    case: int = 0
    key: int = 0
    value: object = None


json_junk = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                      st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                      st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2))
VECTOR_ENTRY_FIELDS = ("name", "kind", "file", "sha256", "inputs", "outputs")
# values a configuration input never takes (out of range for every kind) or that change
# the case's meaning (another seed, step or Adam step count); a bool input is flipped
BAD_CONFIG_VALUES = {"int64": (10 ** 9, 2 ** 40, -5), "float64": (float("nan"), float("-inf"), -1e300)}
_which = st.integers(0, 10 ** 6)


def _corruption(ops, value=st.none(), key=_which):
    """VectorCorruptions of the ops ``ops`` (every field given: builds would otherwise
    infer the defaulted ones from their annotations)."""
    return st.builds(VectorCorruption, op=st.sampled_from(ops), case=_which, key=key, value=value)


# the whole manifest: drop or replace "cases" (key 0) or "format_version" (key 1)
manifest_corruptions = _corruption(["manifest_drop", "manifest_set"], json_junk, st.integers(0, 1))

# one case: its manifest entry, its place in the list, its arrays (the manifest forged to
# agree, so only the kind's own rules can catch it), its file's path
vector_case_corruptions = st.one_of(
    _corruption(["entry_drop", "entry_set"], json_junk, st.integers(0, len(VECTOR_ENTRY_FIELDS) - 1)),
    _corruption(["list_drop", "list_duplicate", "list_junk"], json_junk),
    _corruption(["drop_output", "drop_all_outputs", "drop_input", "truncate", "member_twice"]),
    _corruption(["dtype"], st.sampled_from(["int64", "float32", "complex128", "bool", "int32", "float64", ">f8"])),
    _corruption(["config_value"], st.integers(0, 2)),                 # which of BAD_CONFIG_VALUES[dtype]
    _corruption(["data_shape"], st.sampled_from([(33,), (2, 40, 4), (5000,), (1, 1, 1, 1, 1), ()])),
    _corruption(["claimed_shape"], st.sampled_from([[10 ** 12], [2 ** 31, 2 ** 31], [], [0]])),
    _corruption(["extra_key"], st.sampled_from(["extra", "layer9.W_Q", "W_KQ", "step99.X", "dW_Q", "E"]),
                st.integers(0, 1)),
    _corruption(["garbage"], st.binary(max_size=64)),
    _corruption(["path"], st.sampled_from(["../{name}.npz", "{outside}", "sub/../../{name}.npz", "./{name}.npz",
                                           "{name}", "sub/{name}.npz", "symlink"])),
)

# several cases broken at once, each its own way (distinct cases: the test drops repeats)
vector_corruption_sets = st.lists(vector_case_corruptions, min_size=1, max_size=3)


# ---- mixed stacks: any order of the layer kinds (tests/test_numba_mixed.py) ----------------

_clips = st.sampled_from([None, None, 0.4])


@st.composite
def _attention_options(draw, kind, D, block=False):
    o = {"causal": draw(st.booleans()), "heads": draw(st.integers(1, 2)),
         "key_size": draw(st.sampled_from([None, 1, D + 1])), "value_size": draw(st.sampled_from([None, 2]))}
    if kind == "lsa" and draw(st.booleans()):
        o = {"causal": o["causal"], "heads": o["heads"], "merged": True}
    if not block:
        o["clip"] = draw(_clips)
    return o


@st.composite
def _mlp_options(draw, block=False):
    o = {"width": draw(st.integers(1, 6)), "bias": draw(st.booleans()), "gelu": draw(st.sampled_from(["tanh", "erf"]))}
    if not block:
        o["clip"] = draw(_clips)
    return o


@st.composite
def mixed_layer(draw, D, d_y):
    """One LayerSpec of a kind the Numba mixed-stack kernels run, for tokens of width D
    (pre_ln from D = 3: a LayerNorm of 2 features is the constant (1, -1) or (-1, 1), whose
    exact gradient 0 comes out as rounding noise times 1/std, no property of the code)."""
    kinds = ["embed", "mlp", "lsa", "softmax", "gd", "posenc"] + (["pre_ln"] if D >= 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "embed":
        return R.LayerSpec("embed", (("width", draw(st.integers(d_y + 1, D + 4))), ("bias", draw(st.booleans()))))
    if kind == "mlp":
        return R.LayerSpec("mlp", tuple(draw(_mlp_options()).items()))
    if kind in ("lsa", "softmax"):
        return R.LayerSpec(kind, tuple(draw(_attention_options(kind, D)).items()))
    if kind == "gd":
        return R.LayerSpec("gd", (("eta", draw(etas)), ("d_y", draw(st.integers(1, min(2, D - 1))))))
    if kind == "posenc":
        if draw(st.booleans()):
            return R.LayerSpec("posenc")
        return R.LayerSpec("posenc", (("mode", "concat"), ("width", draw(st.integers(1, 3)))))
    block = draw(st.sampled_from(["lsa", "softmax", "mlp"]))
    bo = draw(_mlp_options(block=True)) if block == "mlp" else draw(_attention_options(block, D, block=True))
    return R.LayerSpec("pre_ln", (("block", block), ("block_options", tuple(bo.items())),
                                  ("eps", draw(st.sampled_from([1e-5, 1e-2]))), ("clip", draw(_clips))))


@st.composite
def mixed_stack(draw):
    """(Arch, d, d_y): 1 to 4 layers drawn by :func:`mixed_layer` (at least one with
    parameters), as one unit or, when the unit keeps the token width, the unit twice
    with its parameter sets tied."""
    d, d_y = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    D = d + d_y
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        s = draw(mixed_layer(D, d_y))
        layers.append(s)
        D = s.out_width(D)
    if all(s.param_floats(w) == 0 for s, w in zip(layers, R.Arch(tuple(layers)).widths(d + d_y))):
        layers.append(R.LayerSpec("lsa"))
    n = len(layers)
    if R.Arch(tuple(layers)).widths(d + d_y)[-1] == d + d_y and draw(st.booleans()):
        return R.Arch(tuple(layers) * 2, tuple(range(n)) * 2), d, d_y
    return R.Arch(tuple(layers)), d, d_y


@st.composite
def classic_sizes(draw, max_N=4):
    """(d, d_y, N, B) for classic tokens: d_y <= d (y_j sits in the last d_y of d features)."""
    d_y = draw(st.integers(1, 2))
    return draw(st.integers(d_y, d_y + 3)), d_y, draw(st.integers(1, max_N)), draw(st.integers(1, 3))


@st.composite
def copy_sizes(draw):
    """(d, d_y, N, P) meeting the copy construction's rank conditions R1 and R2 (N <= 2,
    P >= 2N + 2 d_y: the sinusoidal tables there are well conditioned)."""
    d_y = draw(st.integers(1, 2))
    N = draw(st.integers(1, 2))
    return draw(st.integers(d_y, d_y + 3)), d_y, N, 2 * N + 2 * d_y + draw(st.integers(0, 4))
