"""The conformance suite: every registered layer type on every backend, against the
loop oracle and the reference.

Parametrised over models built from the layer types of ``reference.layers.layer_types()``
(the option variants listed per kind in :data:`LAYER_CASES`: each one as a single layer,
a separate stack and a weight-tied stack, plus stacks mixing the variants) and over the
implementations: every backend of ``reference.backends.backend_names()``, and
``cupy-host-twin``, the CuPy backend's own code driven by NumPy and its kernels' NumPy
twins, so that everything but the CUDA bodies runs without a GPU. For every model an
implementation supports:

1. forward, prediction and loss against the loop oracle (``reference.oracle``), in
   float64 and float32;
2. the reference's hand-written backward against complex-step derivatives of the
   oracle (random upstream gradients); every other implementation's loss and
   gradients against the reference's, float64 and float32, label widths 1 and 2;
3. a batch of B tasks equals B single-task calls;
4. float32 in gives float32 out and float64 gives float64, in the backend's namespace;
5. bad input gets the same exception type on every backend, with a message naming it;
6. ``make_stepper(...).step_on`` and ``train_step`` equal the NumPy backend's on the
   same tasks, with and without gradient clipping.

A model an implementation does not support (``supports(arch)`` gives a reason) is not
skipped: the implementation must refuse it with a ValueError carrying that reason. A
backend that is not available here (``check_available()`` raises, e.g. CuPy without a
GPU) is skipped with its reason; device backends are marked ``gpu``.

Test ids contain ``tiny`` for a few small cases; ``tests/test_numba_backend.py``
runs those for the Numba backend once more with NUMBA_DISABLE_JIT=1. The helpers
``check_*`` and :func:`compare_steps` are reused by the backend files for their own
variants (Numba's lane counts and D x D path).
"""

import functools
import importlib
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import pytest

from reference import Arch, InitSettings, LayerSpec, TokenLayout, build_tokens, get_xp, sample_tasks, to_numpy
from reference.backends import (BACKENDS, PROTOCOL, backend_names, cupy_backend, get_backend, numpy_backend,
                                require_support)
from reference.backends import _cupy_lsa
from reference.backends._cupy_kernels import HostKernels
from reference.backends._cupy_step import FusedEngine, FusedStepper, HostDraw, tokens_of
from reference.backends._lsa_stack import lsa_stack_of
from reference.gradcheck import check_gradients
from reference.layers import get_layer, layer_types
from reference.model import model_backward, model_forward
from reference.optim import AdamHP, adam_init
from reference.oracle import oracle_loss, oracle_model
from reference.tasks import TaskSpec
from reference.tokens import as_layout
from reference.tolerances import assert_close, tolerance
from reference.train_step import train_step as reference_train_step
from reference.tree import tree_leaves, tree_map, tree_paths, tree_unflatten

B_TASKS, N_CTX = 5, 5          # 5 tasks: partial blocks of Numba lanes (64, 4 and 2)
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]
LAYOUTS = [TokenLayout(3, 1), TokenLayout(2, 2)]   # both D = 4, so one set of params fits either
LAYOUT_IDS = ["dy1", "dy2"]
REFERENCE = "numpy"


# ------------------------------------------------------------------------- the cases ----

@dataclass(frozen=True)
class LayerCase:
    """One option variant of a layer type: its options, the init scale (per layer) that
    keeps stacks of it finite and non-trivial, and whether its single layer and tied
    stack are in the ``tiny`` subset (ids ``<kind>-tiny-<id>-...``)."""

    id: str
    options: tuple
    scale: float = 0.3
    tiny: bool = False


def layer_case(name, *, scale=0.3, tiny=False, **options):
    return LayerCase(name, tuple(sorted(options.items())), scale, tiny)


# Every registered layer kind needs an entry here (test_every_layer_type_has_cases), and
# between them the variants must give every option a non-default value. Tokens are
# U(-0.5, 0.5): clip 0.3 is active, clip 0.05 clips most coordinates.
LAYER_CASES = {
    "lsa": (
        layer_case("default", tiny=True),
        layer_case("heads3-key2", heads=3, key_size=2, scale=0.5),
        layer_case("heads2-key5-value2", heads=2, key_size=5, value_size=2),
        layer_case("merged-heads2", tiny=True, merged=True, heads=2),
        layer_case("clip", tiny=True, clip=0.3),
        layer_case("causal", causal=True),
        layer_case("causal-clip-heads2", tiny=True, scale=0.5, causal=True, clip=0.3, heads=2),
        layer_case("causal-tight-clip", scale=0.5, causal=True, clip=0.05),
    ),
    # scale 3: logits of order one, so the softmax weights are far from uniform
    "softmax": (
        layer_case("default", tiny=True, scale=3.0),
        layer_case("key3-value2", scale=3.0, key_size=3, value_size=2),
        layer_case("causal-clip-heads2", scale=3.0, causal=True, clip=0.3, heads=2),
    ),
    # scale 3: hidden pre-activations of order one (GELU's curved part)
    "mlp": (
        layer_case("default", tiny=True, scale=3.0),
        layer_case("erf-nobias-width6", scale=3.0, gelu="erf", bias=False, width=6),
        layer_case("clip", scale=1.0, clip=0.4),
    ),
    "embed": (
        layer_case("width4", tiny=True, scale=1.0, width=4),
        layer_case("bias-width6", scale=1.0, bias=True, width=6),
    ),
    "posenc": (
        layer_case("add", tiny=True),
        layer_case("concat-width3", mode="concat", width=3),
    ),
    "pre_ln": (
        layer_case("lsa", tiny=True),
        layer_case("softmax-heads2-clip", scale=1.0, block="softmax", block_options=(("heads", 2),), clip=0.5),
        layer_case("mlp-width6-eps", scale=3.0, block="mlp", block_options=(("width", 6),), eps=1e-3),
    ),
    "gd": (
        layer_case("default", tiny=True),
        layer_case("eta2-dy2", eta=2.0, d_y=2),
    ),
    # causal only; scale 1: keys of order one, so R_t moves away from lam I
    "mesa": (
        layer_case("default", tiny=True, scale=1.0),
        layer_case("direct-heads2-key3-value2", scale=1.0, form="direct", heads=2, key_size=3, value_size=2),
        layer_case("cg-forget-iters-tol", scale=1.0, form="cg", forget=0.8, cg_iters=16, cg_tol=1e-13),
    ),
    "delta": (
        layer_case("default", tiny=True, scale=1.0),
        layer_case("chunked3-gate", scale=1.0, form="chunked", chunk=3, gate=True),
        layer_case("fixed-beta-heads2-key3-value2", tiny=True, scale=1.0, beta=0.5, heads=2, key_size=3, value_size=2),
    ),
}

# What a case's layer is put into a model with: an embedding back to the layouts' width
# D = 4 after a layer that changes the width (the loss reads tokens of width D), and an
# LSA layer after one without parameters (a model needs parameters to train).
RESTORE_WIDTH = LayerSpec("embed", (("width", LAYOUTS[0].D),))
PARTNER = LayerSpec("lsa")
MIXED_SCALE = {"softmax": 3.0, "mlp": 3.0, "pre_ln": 3.0, "embed": 1.0}   # init scale of mixed stacks (else 0.3)


def case_unit(spec):
    """The layers one case contributes to a model: ``spec``, then RESTORE_WIDTH when it
    changes the width, else PARTNER when it has no parameters."""
    D = LAYOUTS[0].D
    if spec.out_width(D) != D:
        return (spec, RESTORE_WIDTH)
    if spec.param_floats(D) == 0:
        return (spec, PARTNER)
    return (spec,)


@dataclass(frozen=True)
class ModelCase:
    id: str
    arch: Arch
    scale: float
    tiny: bool = False


def model_cases(kind, cases):
    """The models built from one kind's cases: each case as one layer, two separate layers
    and three weight-tied layers; one separate stack of the cases that only shape the
    parameters (different head counts, factored and merged, ...), and one of one case
    per distinct set of call options (options that change the function, mixed in one
    model). A case's layer enters each model as its :func:`case_unit` (the layer alone,
    or followed by a width-restoring embedding or a parametrised partner; tied stacks
    then repeat the unit with its parameter sets)."""
    layer = get_layer(kind)
    out = []
    for c in cases:
        unit = case_unit(LayerSpec(kind, c.options))
        n = len(unit)
        name = f"{kind}-{c.id}"
        small = f"{kind}-tiny-{c.id}" if c.tiny else name     # tiny cases: their single layer and tied stack
        out += [ModelCase(f"{small}-K1", Arch(unit), c.scale, c.tiny),
                ModelCase(f"{name}-K2-separate", Arch(unit * 2), c.scale),
                ModelCase(f"{small}-K3-tied", Arch(unit * 3, tuple(range(n)) * 3), c.scale, c.tiny)]
    specs = [LayerSpec(kind, c.options) for c in cases]
    default_calls = layer.call_options(layer.check_options({}))
    same_calls = [s for s in specs if s.call_opts == default_calls]
    scale = MIXED_SCALE.get(kind, 0.3)
    if len(same_calls) >= 2:
        out.append(ModelCase(f"{kind}-mixed-params-K{len(same_calls)}",
                             Arch(tuple(x for s in same_calls for x in case_unit(s))), scale))
    by_calls = {}
    for s in specs:
        by_calls.setdefault(tuple(sorted(s.call_opts.items())), s)
    if len(by_calls) >= 2:
        out.append(ModelCase(f"{kind}-mixed-calls-K{len(by_calls)}",
                             Arch(tuple(x for s in by_calls.values() for x in case_unit(s))), scale))
    return out


MODEL_CASES_BY_KIND = {kind: model_cases(kind, LAYER_CASES[kind]) for kind in layer_types() if kind in LAYER_CASES}
MODEL_CASES = [m for cases in MODEL_CASES_BY_KIND.values() for m in cases]


def make_data(case, dtype, layout=LAYOUTS[0], B=B_TASKS, seed=0):
    """(E (B, T, D), y_q (B, d_y), params) drawn in float64 and rounded to ``dtype``, so
    the float32 data is the float64 data rounded."""
    rng = np.random.default_rng(seed)
    tasks = sample_tasks(rng, B, layout.d, N_CTX, layout.d_y, dtype=np.float64)
    params = case.arch.init(rng, layout.D, InitSettings(scale=case.scale, n_layers=1, dtype=np.float64))
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)                     # (B, T, D)
    return E.astype(dtype), tasks.y_q.astype(dtype), tree_map(lambda a: a.astype(dtype), params)


@functools.lru_cache(maxsize=None)
def oracle_output(case, dtype, layout=LAYOUTS[0]):
    """The loop oracle's tokens (float64) for the data of (case, dtype, layout)."""
    E, _, params = make_data(case, dtype, layout)
    return oracle_model(E.astype(np.float64), tree_map(lambda a: a.astype(np.float64), params), case.arch)


# ------------------------------------------------------------------- implementations ----

class BackendImpl:
    """A backend module of ``reference.backends`` (results copied to the host to compare)."""

    validates_input = True

    def __init__(self, name):
        self.name = name
        self.mod = get_backend(name)
        self.host_arrays = self.mod.HOST_ARRAYS
        self.needs_device = not self.host_arrays     # a backend whose arrays live on a GPU

    def require(self):
        try:
            self.mod.check_available()
        except RuntimeError as exc:
            pytest.skip(f"backend {self.name!r} is not available here: {exc}")

    def supports(self, arch):
        return self.mod.supports(arch)

    def model_forward(self, E, params, arch):
        return self.mod.model_forward(E, params, arch)[0]

    def loss_and_grads(self, E, y_q, params, arch, layout):
        return self.mod.loss_and_grads(E, y_q, params, arch, layout)

    def train_step(self, params, state, tasks, arch, hp):
        return self.mod.train_step(params, state, tasks, arch, hp)

    def make_stepper(self, arch, hp, spec, seed, dtype):
        return self.mod.make_stepper(arch, hp, spec, seed, dtype)


class CupyHostTwin:
    """The CuPy backend's code (covariance-form layers, flat parameters, the fused
    kernels' call sites) on NumPy with the kernels' NumPy twins: what
    ``cupy_backend.model_forward``, ``loss_and_grads``, ``train_step`` and
    ``make_stepper`` run, minus CuPy itself. Internal code: it does not validate input
    (the backend's entry points do), so it is left out of the bad-input checks."""

    name = "cupy-host-twin"
    validates_input = False
    host_arrays = True
    needs_device = False

    def require(self):
        pass

    def supports(self, arch):
        return cupy_backend.supports(arch)

    def model_forward(self, E, params, arch):
        stack = lsa_stack_of(arch, cupy_backend.NAME)
        if stack.causal:                      # as on the device: causal stacks run the reference code
            return model_forward(E, params, arch)[0]
        return _cupy_lsa.model_forward(E, params, stack, np)[0]

    def loss_and_grads(self, E, y_q, params, arch, layout):
        engine = FusedEngine(arch, AdamHP(), E.dtype, np, HostKernels())
        L, grads, pred, dE = engine.loss_and_grads(E, y_q, params, as_layout(layout, E.shape[2]).d, need_dE=True)
        return L, grads, {"pred": pred, "dE": dE}

    def train_step(self, params, state, tasks, arch, hp):
        dtype = np.dtype(tree_leaves(params)[0].dtype)
        E, y_q = tokens_of(tasks, np, dtype)
        return FusedEngine(arch, hp, dtype, np, HostKernels()).update(params, state, E, y_q, tasks.X.shape[2])

    def make_stepper(self, arch, hp, spec, seed, dtype):
        return FusedStepper(arch, hp, spec, seed, dtype, np, HostKernels(), HostDraw())


IMPLS = {name: BackendImpl(name) for name in backend_names()}
IMPLS[CupyHostTwin.name] = CupyHostTwin()


@pytest.fixture
def impl(request):
    """The implementation named by the (indirect) parameter; skipped, with the reason,
    when its backend cannot run here."""
    im = IMPLS[request.param]
    im.require()
    return im


def impl_cases(names, cases, supported=True):
    """(implementation, model case) parameters: the pairs the implementation supports
    (or, with ``supported=False``, refuses)."""
    out = []
    for name in names:
        im = IMPLS[name]
        for c in cases:
            if (im.supports(c.arch) is None) == supported:
                out.append(pytest.param(name, c, id=f"{name}-{c.id}",
                                        marks=[pytest.mark.gpu] if im.needs_device else []))
    return out


ALL = list(IMPLS)
OTHERS = [n for n in IMPLS if n != REFERENCE]


# ------------------------------------------------------------------------- helpers ----

def host(a):
    return np.asarray(to_numpy(a))


def close(actual, desired, dtype, what):
    assert_close(host(actual), np.asarray(desired), "algebra", dtype, what)


def close_scalar(actual, desired, dtype, what):
    close(np.reshape(host(actual), 1), np.reshape(np.asarray(desired), 1), dtype, what)


def assert_trees_close(got, want, dtype, what, extra_atol=None):
    """Same layer types, then leaf by leaf: same shape and dtype, values close.
    ``extra_atol``: a tree of per-entry absolute tolerances added to the algebra one."""
    assert [type(p) for p in got] == [type(p) for p in want], f"{what}: layer types differ"
    extras = tree_leaves(extra_atol) if extra_atol is not None else [None] * len(tree_leaves(want))
    for path, a, b, x in zip(tree_paths(want), tree_leaves(got), tree_leaves(want), extras):
        a, b = host(a), host(b)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what} {path}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        if x is None:
            assert_close(a, b, "algebra", dtype, f"{what} {path}")
            continue
        tol = tolerance(dtype, "algebra")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        bound = tol.atol + tol.rtol * float(np.max(np.abs(b))) + x
        worst = np.unravel_index(int(np.argmax(diff - bound)), diff.shape)
        assert np.all(diff <= bound), (
            f"{what} {path} differ at {worst}: {a[worst]!r} vs {b[worst]!r} (abs err {diff[worst]:.3e}, bound "
            f"{bound[worst]:.3e} = algebra tolerance + Adam's amplification {x[worst]:.3e})")


def adam_update_atol(state, hp, grad_norm, dtype):
    """Per-entry absolute tolerance of parameters after an Adam update, beyond the
    algebra one: the gradients agree to an absolute error of about rtol * G (G the
    clipped gradient's norm, at least its largest entry), and the update
    lr * m_hat / (sqrt(v_hat) + eps) has derivative up to eps / (sqrt(v_hat) + eps)^2 in
    the gradient of the step, which is 1 / eps for an entry far below eps: the first step
    makes such an entry's update lr g / (|g| + eps) ~ lr g / eps, so its float32 rounding
    error is multiplied by lr / eps (seen: a clipped entry of 2e-9 with clip 0.001). The
    reference's second moments ``state.v`` (after the update) give sqrt(v_hat) per entry.
    Entries with sqrt(v_hat) >> eps get a negligible addition."""
    tol = tolerance(dtype, "algebra")
    G = float(grad_norm) if hp.clip_norm is None else min(float(grad_norm), hp.clip_norm)
    corr = 1.0 - hp.b2 ** state.t
    return tree_map(lambda v: hp.lr * tol.rtol * G * hp.eps / (np.sqrt(host(v).astype(np.float64) / corr) + hp.eps) ** 2,
                    state.v)


def check_forward_against_oracle(impl, case, dtype):
    """Every token after the last layer, the prediction and the loss against the loop
    oracle (float64 on the same, possibly rounded, inputs)."""
    lay = LAYOUTS[0]
    E, y_q, params = make_data(case, dtype, lay)
    want = oracle_output(case, np.dtype(dtype), lay)                  # (B, T, D) float64
    close(impl.model_forward(E, params, case.arch), want, dtype, f"{impl.name} forward vs oracle")
    L, _, aux = impl.loss_and_grads(E, y_q, params, case.arch, lay)
    pred = lay.readout(want)                                          # (B, d_y)
    close(aux["pred"], pred, dtype, f"{impl.name} prediction vs oracle")
    close_scalar(L, oracle_loss(pred, y_q.astype(np.float64)), dtype, f"{impl.name} loss vs oracle")


def check_loss_and_grads_against_reference(impl, case, dtype, layout):
    E, y_q, params = make_data(case, dtype, layout)
    L0, g0, aux0 = numpy_backend.loss_and_grads(E, y_q, params, case.arch, layout)
    L1, g1, aux1 = impl.loss_and_grads(E, y_q, params, case.arch, layout)
    close_scalar(L1, L0, dtype, f"{impl.name} loss")
    close(aux1["pred"], aux0["pred"], dtype, f"{impl.name} prediction")
    close(aux1["dE"], aux0["dE"], dtype, f"{impl.name} dE")
    assert_trees_close(g1, g0, dtype, f"{impl.name} gradient")


def compare_steps(make_stepper, arch, params, dtype, clip_norm, spec, n_steps=3):
    """``n_steps`` of ``make_stepper(...).step_on`` against the NumPy backend's on the
    tasks it samples: loss, grad norm, params and Adam moments after every step."""
    hp = AdamHP(lr=1e-2, clip_norm=clip_norm)
    ref = numpy_backend.make_stepper(arch, hp, spec, 0, dtype)
    fast = make_stepper(arch, hp, spec, 0, dtype)
    p0 = p1 = params
    s0 = s1 = adam_init(params)
    for step in range(n_steps):
        tasks = ref.sample(step)
        r0 = ref.step_on(p0, s0, tasks)
        r1 = fast.step_on(p1, s1, tasks)
        p0, s0, p1, s1 = r0.params, r0.state, r1.params, r1.state
        assert s1.t == s0.t == step + 1
        close_scalar(float(r1.loss), r0.loss, dtype, f"loss at step {step}")
        close_scalar(float(r1.grad_norm), r0.grad_norm, dtype, f"grad norm at step {step}")
        assert_trees_close(p1, p0, dtype, f"params after step {step}",
                           extra_atol=adam_update_atol(s0, hp, r0.grad_norm, dtype))
        for what, t0, t1 in (("m", s0.m, s1.m), ("v", s0.v, s1.v)):
            assert_trees_close(t1, t0, dtype, f"{what} after step {step}")


# ------------------------------------------------------------- the cases themselves ----

def test_every_layer_type_has_cases():
    """A newly registered layer type gets into this suite only through LAYER_CASES."""
    missing = sorted(set(layer_types()) - set(LAYER_CASES))
    assert not missing, (f"layer kind(s) {missing} are registered but have no cases: add their option "
                         "variants to LAYER_CASES in tests/test_conformance.py")
    unknown = sorted(set(LAYER_CASES) - set(layer_types()))
    assert not unknown, f"LAYER_CASES lists kinds that are not registered: {unknown}"


@pytest.mark.parametrize("kind", sorted(LAYER_CASES))
def test_the_cases_vary_every_option(kind):
    """Each option of the layer type takes a non-default value in some case (a new
    option needs a case), and every case's options are valid."""
    layer = get_layer(kind)
    varied = set()
    for c in LAYER_CASES[kind]:
        full = layer.check_options(dict(c.options))
        varied |= {k for k, v in full.items() if v != layer.OPTIONS[k]}
    assert set(layer.OPTIONS) <= varied, (f"layer {kind!r}: no case in LAYER_CASES sets option(s) "
                                          f"{sorted(set(layer.OPTIONS) - varied)}")
    ids = [m.id for m in MODEL_CASES if m.id.startswith(f"{kind}-")]
    assert len(ids) == len(set(ids)), f"layer {kind!r}: duplicate case ids"
    assert any("tiny" in i for i in ids), f"layer {kind!r}: mark a case tiny=True (the NUMBA_DISABLE_JIT subset)"


# --------------------------------------------------------------- the backend protocol ----

@pytest.mark.parametrize("name", backend_names())
def test_every_backend_module_provides_the_protocol(name):
    mod = importlib.import_module(BACKENDS[name])
    missing = [n for n in PROTOCOL if not hasattr(mod, n)]
    assert not missing, f"backend module {BACKENDS[name]} lacks {missing} of reference.backends.PROTOCOL"
    assert mod.NAME == name and isinstance(mod.HOST_ARRAYS, bool)
    assert all(callable(getattr(mod, n)) for n in PROTOCOL if n not in ("NAME", "HOST_ARRAYS"))
    assert set(PROTOCOL) <= set(mod.__all__), f"{name}: __all__ lacks {sorted(set(PROTOCOL) - set(mod.__all__))}"
    assert get_backend(name) is mod


# Backends running fused uniform LSA stacks only: one causal and one clip value per model.
FUSED_LSA_BACKENDS = ("cupy",)
# Backends that run the other Archs of their kinds on mixed-stack kernels (numba: _numba_mixed).
MIXED_STACK_BACKENDS = ("numba",)


@pytest.mark.parametrize("name", backend_names())
def test_supports_refuses_what_the_backend_cannot_run(name):
    """An Arch whose lsa layers have different clip values: the reference computes it;
    the fused LSA backends refuse it, and require_support raises ValueError with the
    reason; a backend with mixed-stack kernels runs it."""
    mod = get_backend(name)
    arch = Arch((LayerSpec("lsa", (("clip", 0.3),)), LayerSpec("lsa")))
    reason = mod.supports(arch)
    if name == REFERENCE:
        assert reason is None, f"the reference must compute every Arch, got {reason!r}"
    if name in FUSED_LSA_BACKENDS:
        assert isinstance(reason, str) and "clip" in reason, reason
    if name in MIXED_STACK_BACKENDS:
        assert reason is None, f"{name} runs lsa layers of different clip values as a mixed stack, got {reason!r}"
    if reason is None:
        require_support(mod, arch)
    else:
        with pytest.raises(ValueError, match=re.escape(reason)) as info:
            require_support(mod, arch)
        assert repr(name) in str(info.value)
    assert mod.supports(Arch((LayerSpec("lsa"),))) is None


@pytest.mark.parametrize("impl, case", impl_cases(ALL, MODEL_CASES, supported=False), indirect=["impl"])
def test_refuses_a_model_it_cannot_run(impl, case):
    """Not a skip: every entry point raises ValueError carrying the supports() reason."""
    reason = impl.supports(case.arch)
    E, y_q, params = make_data(case, np.float64)
    spec = TaskSpec(d=LAYOUTS[0].d, N=N_CTX, B=B_TASKS)
    tasks = spec.sample(np.random.default_rng(0))
    calls = {
        "model_forward": lambda: impl.model_forward(E, params, case.arch),
        "loss_and_grads": lambda: impl.loss_and_grads(E, y_q, params, case.arch, LAYOUTS[0]),
        "train_step": lambda: impl.train_step(params, adam_init(params), tasks, case.arch, AdamHP()),
        "make_stepper": lambda: impl.make_stepper(case.arch, AdamHP(), spec, 0, np.float64),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            call()


@pytest.mark.parametrize("impl", [pytest.param(n, marks=[pytest.mark.gpu] if IMPLS[n].needs_device else [])
                                  for n in backend_names()], indirect=True)
def test_sample_tasks_with_a_generator_draws_the_reference_tasks(impl):
    want = sample_tasks(np.random.default_rng(3), 4, 3, 5, 2, noise_std=0.1, n_distractors=1)
    got = impl.mod.sample_tasks(np.random.default_rng(3), 4, 3, 5, 2, noise_std=0.1, n_distractors=1)
    for a, b in zip(got, want):
        assert (get_xp(a) is np) == impl.host_arrays
        np.testing.assert_array_equal(host(a), b)


# ------------------------------------------------------------------- 1. forward ----

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl, case", impl_cases(ALL, MODEL_CASES), indirect=["impl"])
def test_forward_matches_the_loop_oracle(impl, case, dtype):
    check_forward_against_oracle(impl, case, dtype)


# ------------------------------------------------------------------ 2. gradients ----

@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("case", MODEL_CASES, ids=[f"{REFERENCE}-{c.id}" for c in MODEL_CASES])
def test_reference_backward_matches_complex_step_of_the_oracle(case, layout):
    """float64. The loss gradient (readout and loss included) of the reference backend,
    and model_backward with a random upstream gradient G on every output token, against
    complex-step derivatives of the loop oracle; along random directions, and entry by
    entry for the tiny single layers."""
    arch = case.arch
    E, y_q, params = make_data(case, np.float64, layout)
    rng = np.random.default_rng(1)
    entrywise = case.tiny and arch.n_layers == 1 and layout == LAYOUTS[0]
    args = [E, *tree_leaves(params)]

    def oracle_tokens(a):
        return oracle_model(a[0], tree_unflatten(params, a[1:]), arch)

    _, grads, aux = numpy_backend.loss_and_grads(E, y_q, params, arch, layout)
    res = check_gradients(lambda a: oracle_loss(layout.readout(oracle_tokens(a)), y_q), args,
                          [aux["dE"], *tree_leaves(grads)], rng, entrywise=entrywise)
    assert res.ok, f"loss gradients: {res.detail}"

    out, cache = model_forward(E, params, arch)
    G = rng.standard_normal(out.shape)                                # (B, T, D) random upstream
    dE, dparams = model_backward(G, cache)
    res = check_gradients(lambda a: np.sum(G * oracle_tokens(a)), args, [dE, *tree_leaves(dparams)], rng,
                          entrywise=entrywise)
    assert res.ok, f"gradients of sum(G * tokens): {res.detail}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl, case", impl_cases(OTHERS, MODEL_CASES), indirect=["impl"])
def test_loss_and_grads_match_the_reference(impl, case, dtype, layout):
    check_loss_and_grads_against_reference(impl, case, dtype, layout)


# -------------------------------------------------------------------- 3. batching ----

@pytest.mark.parametrize("impl, case", impl_cases(ALL, MODEL_CASES), indirect=["impl"])
def test_a_batch_equals_single_task_calls(impl, case):
    """Tasks are independent: the forward of B tasks is the B forwards stacked; the loss
    is a mean over tasks, so L = mean_b L_b, dparams = mean_b dparams_b, and
    dE[b] = dE_b / B (dE_b from the call with task b alone). float64: the property does
    not depend on the dtype (float32 results are checked by the tests above)."""
    arch, lay, dtype = case.arch, LAYOUTS[0], np.float64
    E, y_q, params = make_data(case, dtype, lay)
    B = E.shape[0]
    singles = [impl.model_forward(E[b:b + 1], params, arch) for b in range(B)]
    close(impl.model_forward(E, params, arch), np.concatenate([host(o) for o in singles]), dtype, "forward")
    L, grads, aux = impl.loss_and_grads(E, y_q, params, arch, lay)
    per = [impl.loss_and_grads(E[b:b + 1], y_q[b:b + 1], params, arch, lay) for b in range(B)]
    close_scalar(L, np.mean([float(host(r[0])) for r in per]), dtype, "loss")
    close(aux["pred"], np.concatenate([host(r[2]["pred"]) for r in per]), dtype, "prediction")
    close(aux["dE"], np.concatenate([host(r[2]["dE"]) for r in per]) / B, dtype, "dE")
    mean = tree_map(lambda *leaves: np.mean([host(a).astype(np.float64) for a in leaves], axis=0),
                    *[r[1] for r in per])
    for path, a, b in zip(tree_paths(mean), tree_leaves(grads), tree_leaves(mean)):
        close(a, b, dtype, f"gradient {path}")


# ----------------------------------------------------------------------- 4. dtypes ----

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl, case", impl_cases(ALL, MODEL_CASES), indirect=["impl"])
def test_dtype_in_is_dtype_out(impl, case, dtype):
    """Tokens, loss, prediction, dE, every gradient and the stepped params and moments
    keep the input dtype (no silent float64 promotion, no float32 demotion), in the
    backend's array namespace."""
    dt = np.dtype(dtype)
    E, y_q, params = make_data(case, dtype)
    out = impl.model_forward(E, params, case.arch)
    L, grads, aux = impl.loss_and_grads(E, y_q, params, case.arch, LAYOUTS[0])
    spec = TaskSpec(d=LAYOUTS[0].d, N=N_CTX, B=B_TASKS)
    step = impl.make_stepper(case.arch, AdamHP(clip_norm=1.0), spec, 0, dt).step_on(
        params, adam_init(params), spec.sample(np.random.default_rng(0), dtype=dt))
    arrays = {"forward": out, "loss": L, "pred": aux["pred"], "dE": aux["dE"]}
    for what, tree in (("grad", grads), ("stepped params", step.params), ("m", step.state.m), ("v", step.state.v)):
        arrays.update({f"{what} {p}": a for p, a in zip(tree_paths(tree), tree_leaves(tree))})
    for what, a in arrays.items():
        assert np.dtype(a.dtype) == dt, f"{impl.name} {what}: dtype {a.dtype} for {dt} input"
        assert (get_xp(a) is np) == impl.host_arrays, f"{impl.name} {what}: {type(a)}"
    assert [type(p) for p in grads] == [type(p) for p in params] == [type(p) for p in step.params]


# ------------------------------------------------------------------- 5. bad input ----

def _E_2d(E, y_q, p):
    return E[0], y_q, p


def _E_narrow(E, y_q, p):
    return E[:, :, :-1], y_q, p


def _E_nan(E, y_q, p):
    E = E.copy()
    E[1, 2, 0] = np.nan
    return E, y_q, p


def _E_inf(E, y_q, p):
    E = E.copy()
    E[0, -1, 1] = -np.inf
    return E, y_q, p


def _E_float32(E, y_q, p):
    return E.astype(np.float32), y_q, p


def _params_mixed_dtypes(E, y_q, p):
    return E, y_q, (p[0], *tree_map(lambda a: a.astype(np.float32), p[1:]))


def _params_too_few(E, y_q, p):
    return E, y_q, p[:1]


def _params_too_many(E, y_q, p):
    return E, y_q, p + p[:1]


def _params_plain_tuples(E, y_q, p):
    return E, y_q, tuple(tuple(layer) for layer in p)


def _y_q_narrow(E, y_q, p):
    return E, y_q[:, :0], p


def _y_q_nan(E, y_q, p):
    y_q = y_q.copy()
    y_q[0, 0] = np.nan
    return E, y_q, p


class BadInput(NamedTuple):
    id: str
    mutate: Callable        # (E, y_q, params) -> (E, y_q, params), for a two-unit separate stack
    exc: type
    match: str              # what every backend's message must say
    entries: tuple = ("model_forward", "loss_and_grads")


BAD_INPUTS = [
    BadInput("E-2d", _E_2d, ValueError, r"E must have 3 dimensions"),
    BadInput("E-too-narrow", _E_narrow, ValueError, r"width"),
    BadInput("E-nan", _E_nan, ValueError, r"E contains NaN"),
    BadInput("E-inf", _E_inf, ValueError, r"E contains NaN or infinite"),
    BadInput("E-float32-params-float64", _E_float32, TypeError, r"share one dtype"),
    BadInput("params-mixed-dtypes", _params_mixed_dtypes, TypeError, r"share one dtype"),
    BadInput("params-too-few", _params_too_few, ValueError, r"params must hold \d+ layer\(s\)"),
    BadInput("params-too-many", _params_too_many, ValueError, r"params must hold \d+ layer\(s\)"),
    BadInput("params-plain-tuples", _params_plain_tuples, TypeError, r"params\[0\] must be a parameter NamedTuple"),
    BadInput("y_q-too-narrow", _y_q_narrow, ValueError, rf"y_q must have shape \({B_TASKS}, 1\)", ("loss_and_grads",)),
    BadInput("y_q-nan", _y_q_nan, ValueError, r"y_q contains NaN", ("loss_and_grads",)),
]
# per kind: its first case as two separate layers (so a params tuple can be too short)
BAD_INPUT_CASES = [next(m for m in cases if m.id == f"{kind}-{LAYER_CASES[kind][0].id}-K2-separate")
                   for kind, cases in MODEL_CASES_BY_KIND.items()]
BAD_CALLS = [pytest.param(bad, entry, id=f"{bad.id}-{entry}") for bad in BAD_INPUTS for entry in bad.entries]


@pytest.mark.parametrize("bad, entry", BAD_CALLS)
@pytest.mark.parametrize("impl, case", impl_cases([n for n in ALL if IMPLS[n].validates_input], BAD_INPUT_CASES),
                         indirect=["impl"])
def test_bad_input_gets_the_same_clear_error_everywhere(impl, case, bad, entry):
    """The reference's exception type on every backend (never a wrong answer or a NaN
    result), with a message naming the problem."""
    E, y_q, params = bad.mutate(*make_data(case, np.float64))
    call = {"model_forward": lambda: impl.model_forward(E, params, case.arch),
            "loss_and_grads": lambda: impl.loss_and_grads(E, y_q, params, case.arch, LAYOUTS[0])}[entry]
    with pytest.raises(Exception) as info:
        call()
    assert isinstance(info.value, bad.exc), f"{impl.name} raised {type(info.value).__name__}: {info.value}"
    assert re.search(bad.match, str(info.value)), f"{impl.name}: {info.value}"


# ------------------------------------------------------------------ 6. training steps ----

@pytest.mark.parametrize("clip_norm", [0.001, None], ids=["gradclip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl, case", impl_cases(OTHERS, MODEL_CASES), indirect=["impl"])
def test_steps_match_the_numpy_backend(impl, case, dtype, clip_norm):
    """Three ``step_on`` updates on the NumPy backend's tasks, then one module-level
    ``train_step``: params, Adam moments, loss and grad norm."""
    _, _, params = make_data(case, dtype)
    spec = TaskSpec(d=LAYOUTS[0].d, N=N_CTX, B=B_TASKS)
    compare_steps(impl.make_stepper, case.arch, params, dtype, clip_norm, spec)
    hp = AdamHP(lr=1e-2, clip_norm=clip_norm)
    tasks = spec.sample(np.random.default_rng(9), dtype=dtype)
    r0 = reference_train_step(params, adam_init(params), tasks, case.arch, hp)
    r1 = impl.train_step(params, adam_init(params), tasks, case.arch, hp)
    close_scalar(float(r1.loss), r0.loss, dtype, "train_step loss")
    close_scalar(float(r1.grad_norm), r0.grad_norm, dtype, "train_step grad norm")
    assert_trees_close(r1.params, r0.params, dtype, "train_step params",
                       extra_atol=adam_update_atol(r0.state, hp, r0.grad_norm, dtype))
