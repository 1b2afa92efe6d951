"""The CuPy backend against the NumPy reference, and its clear errors without a GPU.

Every comparison body runs twice through the ``impl`` fixture:

* ``host-twin``: the backend's own step code (covariance-form layers, flat
  parameters, device-style sampler, fused-kernel call sites) driven by NumPy and the
  kernels' NumPy twins. Runs everywhere; it checks everything but the CUDA bodies.
* ``cupy``: the real backend on a GPU (marked ``gpu``); skipped, with the reason,
  when CuPy or a CUDA device is missing. Never a false pass.

The reference side always runs on host copies with ``reference`` itself.
"""

import importlib
import subprocess
import sys
import types

import numpy as np
import pytest

from reference import Arch, lsa_stack, build_tokens, init_lsa_params, loss_and_grads, model_forward, sample_tasks, to_numpy
from reference.backends import get_backend, numpy_backend
from reference.backends import _cupy_lsa
from reference.backends._cupy_kernels import HostKernels
from reference.backends._cupy_step import FlatLayout, FusedEngine, FusedStepper, HostDraw
from reference.optim import AdamHP, adam_init
from reference.tasks import TaskSpec
from reference.tolerances import assert_close, tolerance

B, N, d = 6, 5, 3
D = d + 1

# (id, arch, heads, key size, merged params, init scale): small scales keep deep
# stacks finite; clip 0.3 is active for tokens of U(-0.5, 0.5) inputs.
CASES = [
    ("K1", lsa_stack(1), 1, None, False, 0.3),
    ("K3-recurrent-2heads-key5", lsa_stack(3, recurrent=True), 2, 5, False, 0.3),
    ("K3-separate-clip", lsa_stack(3, clip=0.3), 1, None, False, 0.3),
    ("K2-merged", lsa_stack(2), 2, None, True, 0.3),
    ("K2-causal-fallback", lsa_stack(2, causal=True), 1, None, False, 0.3),
]
DTYPES = [np.float64, np.float32]


class HostTwin:
    """The backend's code paths on NumPy with the kernels' NumPy twins."""

    name = "host-twin"
    xp = np

    def model_forward(self, E, params, arch):
        if arch.causal:
            return model_forward(E, params, arch)[0]
        return _cupy_lsa.model_forward(E, params, arch, np)[0]

    def loss_and_grads(self, E, y_q, params, arch, d):
        eng = FusedEngine(arch, AdamHP(), E.dtype, np, HostKernels())
        L, grads, pred, dE = eng.loss_and_grads(E, y_q, params, d, need_dE=True)
        return L, grads, {"pred": pred, "dE": dE}

    def make_stepper(self, arch, hp, spec, seed, dtype):
        return FusedStepper(arch, hp, spec, seed, dtype, np, HostKernels(), HostDraw())


class Device:
    """The real CuPy backend."""

    name = "cupy"

    def __init__(self, backend, cupy):
        self.b, self.xp = backend, cupy

    def model_forward(self, E, params, arch):
        return self.b.model_forward(E, params, arch)[0]

    def loss_and_grads(self, E, y_q, params, arch, d):
        return self.b.loss_and_grads(E, y_q, params, arch, d)

    def make_stepper(self, arch, hp, spec, seed, dtype):
        return self.b.make_stepper(arch, hp, spec, seed, dtype)


@pytest.fixture(params=["host-twin", pytest.param("cupy", marks=pytest.mark.gpu)])
def impl(request):
    if request.param == "host-twin":
        return HostTwin()
    backend = get_backend("cupy")
    try:
        cupy = backend.require_cupy()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return Device(backend, cupy)


def _setup(case, dtype, seed=0):
    _, arch, H, key_size, merged, scale = case
    rng = np.random.default_rng(seed)
    tasks = sample_tasks(rng, B, d, N, dtype=dtype)
    params = tuple(init_lsa_params(rng, D, H=H, key_size=key_size, scale=scale, dtype=dtype, merged=merged)
                   for _ in range(arch.n_param_layers))
    return arch, tasks, params


def _leaves(tree):
    return [a for layer in tree for a in layer]


def _close(actual, desired, dtype, what):
    assert_close(np.asarray(to_numpy(actual)), np.asarray(desired), "algebra", dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(impl, case, dtype):
    arch, tasks, params = _setup(case, dtype)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    want, _ = model_forward(E, params, arch)
    got = impl.model_forward(E, params, arch)
    assert type(got).__module__.split(".")[0] == impl.xp.__name__
    _close(got, want, dtype, f"{impl.name} forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_and_grads_match_reference(impl, case, dtype):
    arch, tasks, params = _setup(case, dtype)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    L0, g0, aux0 = loss_and_grads(E, tasks.y_q, params, arch, d)
    L1, g1, aux1 = impl.loss_and_grads(E, tasks.y_q, params, arch, d)
    _close(impl.xp.asarray(L1).reshape(1), np.asarray(L0).reshape(1), dtype, "loss")
    _close(aux1["pred"], aux0["pred"], dtype, "pred")
    _close(aux1["dE"], aux0["dE"], dtype, "dE")
    assert [type(p) for p in g1] == [type(p) for p in g0]
    for n, (a, b) in enumerate(zip(_leaves(g1), _leaves(g0))):
        _close(a, b, dtype, f"gradient leaf {n}")


@pytest.mark.parametrize("clip_norm", [0.001, None], ids=["gradclip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_step_on_matches_numpy_backend(impl, case, dtype, clip_norm):
    """Several train steps on the same tasks: params, Adam moments, loss and grad norm."""
    arch, _, params = _setup(case, dtype)
    hp = AdamHP(lr=1e-2, clip_norm=clip_norm)
    spec = TaskSpec(d=d, N=N, B=B)
    ref = numpy_backend.make_stepper(arch, hp, spec, seed=0, dtype=dtype)
    fast = impl.make_stepper(arch, hp, spec, 0, dtype)
    p0, s0 = params, adam_init(params)
    p1, s1 = params, adam_init(params)
    for step in range(4):
        tasks = ref.sample(step)
        r0 = ref.step_on(p0, s0, tasks)
        r1 = fast.step_on(p1, s1, tasks)
        p0, s0, p1, s1 = r0.params, r0.state, r1.params, r1.state
        assert s1.t == s0.t == step + 1
        _close(impl.xp.asarray(r1.loss).reshape(1), np.asarray([r0.loss]), dtype, f"loss at step {step}")
        _close(impl.xp.asarray(r1.grad_norm).reshape(1), np.asarray([r0.grad_norm]), dtype, f"grad norm at step {step}")
        for what, t0, t1 in (("params", p0, p1), ("m", s0.m, s1.m), ("v", s0.v, s1.v)):
            for n, (a, b) in enumerate(zip(_leaves(t1), _leaves(t0))):
                _close(a, b, dtype, f"{what} leaf {n} after step {step}")


def test_step_draws_then_steps(impl):
    """step(params, state, s) is step_on(params, state, sample(s)), and sample(s) is
    a function of (seed, s) alone."""
    case = CASES[0]
    arch, _, params = _setup(case, np.float32)
    hp = AdamHP(clip_norm=0.001)
    spec = TaskSpec(d=d, N=N, B=B)
    st = impl.make_stepper(arch, hp, spec, 7, np.float32)
    t_a, t_b, t_c = st.sample(3), st.sample(4), st.sample(3)
    for a, c in zip(t_a, t_c):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(c))
    assert not np.array_equal(to_numpy(t_a.X), to_numpy(t_b.X))
    other = impl.make_stepper(arch, hp, spec, 8, np.float32)
    assert not np.array_equal(to_numpy(other.sample(3).X), to_numpy(t_a.X))
    state = adam_init(params)
    r_step = st.step(params, state, 3)
    r_on = impl.make_stepper(arch, hp, spec, 7, np.float32).step_on(params, state, t_a)
    for a, b in zip(_leaves(r_step.params), _leaves(r_on.params)):
        _close(a, to_numpy(b), np.float32, "step vs step_on(sample)")
    _close(impl.xp.asarray(r_step.loss).reshape(1), to_numpy(impl.xp.asarray(r_on.loss)).reshape(1), np.float32, "loss")


def test_device_tasks_distribution(impl):
    """Tasks drawn by the backend's sampler: labels are W x exactly, inputs in range,
    and the moments of W and x match N(0, 1) and U(-0.5, 0.5) (1e5 draws each)."""
    spec = TaskSpec(d=10, N=10, B=10_000)
    st = impl.make_stepper(lsa_stack(1), AdamHP(), spec, 0, np.float64)
    X, Y, x_q, y_q, W = (to_numpy(a) for a in st.sample(0))
    assert X.shape == (10_000, 10, 10) and Y.shape == (10_000, 10, 1) and x_q.shape == (10_000, 10)
    assert y_q.shape == (10_000, 1) and W.shape == (10_000, 1, 10)
    assert_close(Y, np.einsum("bij,bnj->bni", W, X), "algebra", what="Y = W x")
    assert_close(y_q, np.einsum("bij,bj->bi", W, x_q), "algebra", what="y_q = W x_q")
    assert X.min() >= -0.5 and X.max() < 0.5 and x_q.min() >= -0.5 and x_q.max() < 0.5
    mc = tolerance(np.float64, "monte_carlo")
    w = W.reshape(-1)
    # means: within 4 standard errors (sd / sqrt(n)) of 0
    assert abs(w.mean()) < 4 / np.sqrt(w.size), f"mean of W {w.mean():.4f}"
    assert abs(w.var() - 1.0) <= mc.rtol, f"variance of W {w.var():.4f}; {mc.reason}"
    x = X.reshape(-1)[:100_000]
    assert abs(x.mean()) < 4 * np.sqrt(1 / 12 / x.size), f"mean of x {x.mean():.4f}"
    assert abs(x.var() / (1 / 12) - 1.0) <= mc.rtol, f"variance of x {x.var():.5f} vs 1/12; {mc.reason}"


def test_device_tasks_options(impl):
    """Label noise touches context labels only; distractors replace the first labels."""
    spec = TaskSpec(d=3, N=6, B=2000, noise_std=0.5, n_distractors=2, x_range=(-1.0, 1.0), w_scale=2.0)
    st = impl.make_stepper(lsa_stack(1), AdamHP(), spec, 1, np.float64)
    X, Y, x_q, y_q, W = (to_numpy(a) for a in st.sample(0))
    assert X.min() >= -1.0 and X.max() < 1.0
    assert_close(y_q, np.einsum("bij,bj->bi", W, x_q), "algebra", what="clean query target")
    resid = Y[:, 2:] - np.einsum("bij,bnj->bni", W, X[:, 2:])
    assert 0.4 < resid.std() < 0.6, f"label noise std {resid.std():.3f}, want 0.5"
    assert 0.8 < Y[:, :2].std() < 1.2, f"distractor label std {Y[:, :2].std():.3f}, want 1"
    assert 1.7 < W.std() < 2.3, f"teacher std {W.std():.3f}, want w_scale = 2"


def test_returned_params_are_not_mutated_and_copies_agree(impl):
    """Handing back the returned tuples (the fast path) and handing in copies (the
    packing path) give the same step; earlier results never change afterwards."""
    arch, _, params = _setup(CASES[0], np.float64)
    hp = AdamHP(clip_norm=0.001)
    spec = TaskSpec(d=d, N=N, B=B)
    st = impl.make_stepper(arch, hp, spec, 0, np.float64)
    r1 = st.step(params, adam_init(params), 0)
    before = [to_numpy(a).copy() for a in _leaves(r1.params)]
    r2 = st.step(r1.params, r1.state, 1)
    for a, b in zip(_leaves(r1.params), before):
        np.testing.assert_array_equal(to_numpy(a), b)
    copy = lambda tree: tuple(type(p)(*(a.copy() for a in p)) for p in tree)  # noqa: E731
    other = impl.make_stepper(arch, hp, spec, 0, np.float64)
    r2b = other.step(copy(r1.params), type(r1.state)(copy(r1.state.m), copy(r1.state.v), r1.state.t), 1)
    for a, b in zip(_leaves(r2.params), _leaves(r2b.params)):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_layout_and_dtype_mismatch_raise():
    arch, tasks, params = _setup(CASES[0], np.float64)
    st = HostTwin().make_stepper(arch, AdamHP(), TaskSpec(d=d, N=N, B=B), 0, np.float32)
    with pytest.raises(TypeError, match="dtype float32"):
        st.step_on(params, adam_init(params), tasks)
    lay = FlatLayout(params, np.float64)
    other = (init_lsa_params(np.random.default_rng(1), D, H=2, dtype=np.float64),)
    with pytest.raises(ValueError, match="does not match the parameter layout"):
        lay.pack(other, np, "params")


def test_flat_layout_round_trip():
    rng = np.random.default_rng(0)
    params = (init_lsa_params(rng, D, H=2, key_size=3, dtype=np.float64),
              init_lsa_params(rng, D, merged=True, dtype=np.float64))
    lay = FlatLayout(params, np.float64)
    flat = lay.pack(params, np, "params")
    assert flat.shape == (lay.size,) == (sum(a.size for a in _leaves(params)),)
    back = lay.unpack(flat)
    assert [type(p) for p in back] == [type(p) for p in params]
    for a, b in zip(_leaves(back), _leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_host_twin_adam_kernel_matches_reference_adam():
    """The Adam twin (what the CUDA body computes) equals reference.optim.adam_update."""
    from reference.optim import adam_update

    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        params = (init_lsa_params(rng, D, dtype=dtype, scale=1.0),)
        grads = (init_lsa_params(rng, D, dtype=dtype, scale=1.0),)
        state = adam_init(params)
        k = HostKernels()
        lay = FlatLayout(params, dtype)
        for clip in (None, 1e-3, 1e6):
            hp = AdamHP(clip_norm=clip)
            new, st, norm = adam_update(params, grads, state, hp)
            g = lay.pack(grads, np, "grads")
            gn = k.l2norm(g)
            p1, m1, v1 = k.adam(lay.pack(params, np, "p"), g, lay.pack(state.m, np, "m"), lay.pack(state.v, np, "v"),
                                gn, -1.0 if clip is None else clip, hp.lr, hp.b1, hp.b2, hp.eps,
                                1 - hp.b1, 1 - hp.b2)
            assert_close(np.asarray(gn).reshape(1), np.asarray([norm], dtype=dtype), "algebra", what="norm")
            for got, want in ((p1, new), (m1, st.m), (v1, st.v)):
                assert_close(got, lay.pack(want, np, "x"), "algebra", what=f"adam clip={clip}")


# -- without CuPy or without a device: clear errors, never a crash at import ------------

def _public_calls(cb):
    arch, tasks, params = _setup(CASES[0], np.float32)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    return {
        "sample_tasks": lambda: cb.sample_tasks(np.random.default_rng(0), 2, 3, 4),
        "device_rng": lambda: cb.device_rng(0, 0),
        "model_forward": lambda: cb.model_forward(E, params, arch),
        "loss_and_grads": lambda: cb.loss_and_grads(E, tasks.y_q, params, arch, d),
        "train_step": lambda: cb.train_step(params, adam_init(params), tasks, arch, AdamHP()),
        "make_stepper": lambda: cb.make_stepper(arch, AdamHP(), TaskSpec(d=d, N=N, B=B), 0),
        "check_available": cb.check_available,
    }


def test_import_needs_no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)   # makes `import cupy` fail
    sys.modules.pop("reference.backends.cupy_backend", None)
    cb = importlib.import_module("reference.backends.cupy_backend")
    assert get_backend("cupy") is cb and cb.NAME == "cupy"


def test_import_in_a_fresh_interpreter_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import reference.backends.cupy_backend as cb\n"
            "try:\n    cb.make_stepper(None, None, None, 0)\n"
            "except RuntimeError as e:\n    print('RuntimeError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RuntimeError:" in out.stdout and "pip install icgd[gpu]" in out.stdout


@pytest.mark.parametrize("call", ["sample_tasks", "device_rng", "model_forward", "loss_and_grads",
                                  "train_step", "make_stepper", "check_available"])
def test_public_entry_points_without_cupy(monkeypatch, call):
    cb = get_backend("cupy")
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError) as info:
        _public_calls(cb)[call]()
    msg = str(info.value)
    assert "needs CuPy" in msg and "pip install icgd[gpu]" in msg, msg


def _fake_cupy(get_device_count):
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("call", ["sample_tasks", "device_rng", "model_forward", "loss_and_grads", "train_step",
                                  "make_stepper", "check_available"])
def test_public_entry_points_without_device(monkeypatch, call):
    cb = get_backend("cupy")

    def no_driver():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(no_driver))
    with pytest.raises(RuntimeError) as info:
        _public_calls(cb)[call]()
    msg = str(info.value)
    assert "no usable CUDA device" in msg and "cudaErrorNoDevice" in msg and "pip install icgd[gpu]" in msg, msg

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 0))
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        _public_calls(cb)[call]()
