"""What is specific to the CuPy backend: its stepper's own task stream and parameter
handling, its flat layout and Adam kernel twin, and clear errors without CuPy or a GPU.

Forward, loss and gradients, batching, dtypes, bad input and ``step_on`` against the
reference are in ``tests/test_conformance.py``, for both ways of running this backend:
``cupy`` (the real backend on a GPU, marked ``gpu``) and ``cupy-host-twin`` (its own
step code, covariance-form layers and fused-kernel call sites driven by NumPy and the
kernels' NumPy twins, which runs everywhere and checks everything but the CUDA bodies).

The stepper tests here run through the ``impl`` fixture on both as well; ``cupy`` is
skipped, with the reason, when CuPy or a CUDA device is missing. Never a false pass.
"""

import importlib
import subprocess
import sys
import types

import numpy as np
import pytest

import test_conformance as C
from reference import lsa_stack, build_tokens, init_lsa_params, sample_tasks, to_numpy
from reference.backends import get_backend
from reference.backends._cupy_kernels import HostKernels
from reference.backends._cupy_step import FlatLayout
from reference.optim import AdamHP, adam_init
from reference.tasks import TaskSpec
from reference.tolerances import assert_close, tolerance

B, N, d = 6, 5, 3
D = d + 1
DTYPES = [np.float64, np.float32]
K1 = ("K1", lsa_stack(1), 1, None, False, 0.3)    # (id, arch, heads, key size, merged, init scale)


@pytest.fixture(params=["cupy-host-twin", pytest.param("cupy", marks=pytest.mark.gpu)])
def impl(request):
    """The conformance suite's implementation of that name (skips ``cupy`` without a GPU)."""
    im = C.IMPLS[request.param]
    im.require()
    return im


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


def test_step_draws_then_steps(impl):
    """step(params, state, s) is step_on(params, state, sample(s)), and sample(s) is
    a function of (seed, s) alone."""
    arch, _, params = _setup(K1, np.float32)
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
    _close(np.reshape(float(r_step.loss), 1), np.reshape(float(r_on.loss), 1), np.float32, "loss")


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
    arch, _, params = _setup(K1, np.float64)
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
    arch, tasks, params = _setup(K1, np.float64)
    st = C.IMPLS["cupy-host-twin"].make_stepper(arch, AdamHP(), TaskSpec(d=d, N=N, B=B), 0, np.float32)
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
    arch, tasks, params = _setup(K1, np.float32)
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
