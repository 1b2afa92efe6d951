"""What is specific to the Numba backend: lane blocks, the D x D ("dspace") path and its
fallback, the fused Adam kernel, its own task stream, thread-count independence, its
config flags and its errors beyond the shared ones.

Forward, loss and gradients against the loop oracle and the reference, batching,
dtypes, shared bad-input errors and ``step_on`` against the NumPy backend are in
``tests/test_conformance.py`` (run for every backend); this file reuses its cases and
checks for the variants only this backend has.

Tests whose name contains ``tiny`` (here and the Numba ones of the conformance suite)
are also run once more in a subprocess with ``NUMBA_DISABLE_JIT=1`` (the kernels as
plain Python, so their Python semantics are what is tested) by
:func:`test_pure_python_run_of_the_tiny_subset`.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import test_conformance as C
from reference import lsa_stack, build_tokens, init_lsa_params, loss_and_grads, sample_tasks
from reference.backends import config, get_backend, numba_backend as nb
from reference.layers.lsa import LSAParams
from reference.optim import AdamHP, adam_init, adam_update
from reference.tasks import TaskSpec
from reference.tolerances import assert_close, tolerance

B, N, d = 7, 5, 3
D = d + 1
DTYPES = [np.float64, np.float32]

# (id, arch, heads, key size, merged params, init scale) for the tests below; the
# conformance suite has the full table of layer options.
K1 = ("K1", lsa_stack(1), 1, None, False, 0.3)
K3_CLIP = ("K3-separate-clip", lsa_stack(3, clip=0.3), 1, None, False, 0.3)


def _setup(case, dtype, seed=0, b=B, n=N, dd=d):
    _, arch, H, key_size, merged, scale = case
    rng = np.random.default_rng(seed)
    tasks = sample_tasks(rng, b, dd, n, dtype=dtype)
    params = tuple(init_lsa_params(rng, dd + 1, H=H, key_size=key_size, scale=scale, dtype=dtype, merged=merged)
                   for _ in range(arch.n_param_layers))
    return arch, tasks, params


def _leaves(tree):
    return [a for layer in tree for a in layer]


def _close(actual, desired, dtype, what, kind="algebra"):
    assert_close(np.asarray(actual), np.asarray(desired), kind, dtype, what)


@pytest.fixture(params=[0, 4, 2], ids=["lanes-auto", "lanes-4", "lanes-2"])
def lanes(request, monkeypatch):
    """Blocks of 64 (one partial block), 4 and 2 lanes (several blocks and chunks, padding)."""
    monkeypatch.setattr(config, "LANES", request.param)
    return request.param


# ------------------------------------------------------------------ token path ----
# Forward, loss and gradients at the automatic lane count are in test_conformance.py;
# here the same checks with small blocks (several blocks and chunks, a padded block).

NUMBA_CASES = [c for c in C.MODEL_CASES if nb.supports(c.arch) is None]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", NUMBA_CASES, ids=[c.id for c in NUMBA_CASES])
@pytest.mark.parametrize("lanes", [4, 2], ids=["lanes-4", "lanes-2"])
def test_token_path_in_small_blocks(monkeypatch, lanes, case, dtype):
    monkeypatch.setattr(config, "LANES", lanes)
    C.check_forward_against_oracle(C.IMPLS["numba"], case, dtype)
    C.check_loss_and_grads_against_reference(C.IMPLS["numba"], case, dtype, C.LAYOUTS[0])


# ----------------------------------------------------------------- D x D space path ----
# (id, arch, heads, key size, merged, scale). Clip 0.8 at scale 0.3 sends some tasks (not
# all) to the token fallback; clip 0.05 sends them all; the others never clip.
DSPACE_CASES = [
    ("K2", lsa_stack(2), 1, None, False, 0.3),
    ("K3-recurrent-2heads-key5", lsa_stack(3, recurrent=True), 2, 5, False, 0.3),
    ("K3-clip-some-fall-back", lsa_stack(3, clip=0.8), 1, None, False, 0.3),
    ("K4-merged-2heads", lsa_stack(4), 2, None, True, 0.3),
    ("K4-clip-some-fall-back", lsa_stack(4, clip=0.8), 1, None, False, 0.3),
    ("K5-clip-all-fall-back", lsa_stack(5, clip=0.05), 1, None, False, 0.3),
    ("K6-3heads", lsa_stack(6), 3, None, False, 0.2),
]


def _check_dspace(case, dtype, b=B):
    arch, tasks, params = _setup(case, dtype, b=b)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    L0, g0, aux0 = loss_and_grads(E, tasks.y_q, params, arch, d)
    L1, g1, aux1 = nb.loss_and_grads(E, tasks.y_q, params, arch, d, path="dspace", need_dE=False)
    assert aux1["path"] == "dspace"
    _close(np.reshape(L1, 1), np.reshape(L0, 1), dtype, "loss")
    _close(aux1["pred"], aux0["pred"], dtype, "pred")
    for n, (a, b_) in enumerate(zip(_leaves(g1), _leaves(g0))):
        _close(a, b_, dtype, f"gradient leaf {n}")
    return aux1["fallback_tasks"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", DSPACE_CASES, ids=[c[0] for c in DSPACE_CASES])
def test_dspace_path_matches_reference(lanes, case, dtype):
    """Context-only stacks in D x D space (C' = L C L^T, the matrix-vector tail, the
    factored backward), with the exact token-path fallback for tasks that could clip."""
    n_fallback = _check_dspace(case, dtype)
    if "some-fall-back" in case[0]:
        assert 0 < n_fallback < B, f"{n_fallback} of {B} tasks fell back; the case should mix both paths"
    elif "all-fall-back" in case[0]:
        assert n_fallback == B
    else:
        assert n_fallback == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_tiny_dspace(dtype):
    assert 0 < _check_dspace(DSPACE_CASES[2], dtype) < B
    _check_dspace(DSPACE_CASES[3], dtype)


def test_dspace_layers_are_dense_and_factored():
    """K = 8, D = 33, one head: the backward runs factored for the layers next to the tail
    and dense before them (the cost rule switches), matching the reference."""
    rng = np.random.default_rng(5)
    dd, n = 32, 40
    arch = lsa_stack(8)
    tasks = sample_tasks(rng, 5, dd, n)
    params = tuple(init_lsa_params(rng, dd + 1, scale=0.05, dtype=np.float64) for _ in range(8))
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    L0, g0, _ = loss_and_grads(E, tasks.y_q, params, arch, dd)
    L1, g1, aux = nb.loss_and_grads(E, tasks.y_q, params, arch, dd, path="dspace", need_dE=False)
    assert aux["path"] == "dspace" and aux["fallback_tasks"] == 0
    _close(np.reshape(L1, 1), np.reshape(L0, 1), np.float64, "loss")
    for n_, (a, b_) in enumerate(zip(_leaves(g1), _leaves(g0))):
        _close(a, b_, np.float64, f"gradient leaf {n_}")


def test_path_choice():
    """auto: D x D space for wide tokens with N + 1 >= D; tokens otherwise, for causal
    stacks, for d_y > 1, for one layer, and whenever dE or every token is asked for."""
    p = (init_lsa_params(np.random.default_rng(0), 41),)
    assert nb.BatchRun(lsa_stack(4), p * 4, 8, 80, 40, 1, np.float32, path="auto").path == "dspace"
    assert nb.BatchRun(lsa_stack(4), p * 4, 8, 20, 40, 1, np.float32, path="auto").path == "tokens"
    assert nb.BatchRun(lsa_stack(1), p, 8, 80, 40, 1, np.float32, path="dspace").path == "tokens"
    assert nb.BatchRun(lsa_stack(4, causal=True), p * 4, 8, 80, 40, 1, np.float32, path="dspace").path == "tokens"
    assert nb.BatchRun(lsa_stack(4), p * 4, 8, 80, 39, 2, np.float32, path="dspace").path == "tokens"
    p11 = (init_lsa_params(np.random.default_rng(0), 11),)
    assert nb.BatchRun(lsa_stack(6), p11 * 6, 8, 10, 10, 1, np.float32, path="auto").path == "tokens"


# -------------------------------------------------------------------- training steps ----

def _check_dspace_steps(case, dtype, clip_norm, n_steps=4):
    arch, _, params = _setup(case, dtype)
    C.compare_steps(nb.make_stepper, arch, params, dtype, clip_norm, TaskSpec(d=d, N=N, B=B), n_steps)


@pytest.mark.parametrize("clip_norm", [0.001, None], ids=["gradclip", "noclip"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", DSPACE_CASES[:5], ids=[c[0] for c in DSPACE_CASES[:5]])
def test_dspace_step_on_matches_numpy_backend(monkeypatch, case, dtype, clip_norm):
    """Several train steps through the D x D path (the token path is in the conformance
    suite): params, Adam moments, loss and grad norm."""
    monkeypatch.setattr(config, "PATH", "dspace")
    _check_dspace_steps(case, dtype, clip_norm)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_tiny_dspace_step_on(monkeypatch, dtype):
    monkeypatch.setattr(config, "PATH", "dspace")
    _check_dspace_steps(K3_CLIP, dtype, 0.001, n_steps=2)


def test_adam_kernel_matches_reference_adam():
    """The flat clip + Adam equals reference.optim.adam_update (both dtypes, clip on/off/inactive)."""
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        params = (init_lsa_params(rng, D, dtype=dtype, scale=1.0), init_lsa_params(rng, D, merged=True, dtype=dtype))
        grads = (init_lsa_params(rng, D, dtype=dtype, scale=1.0), init_lsa_params(rng, D, merged=True, dtype=dtype))
        for clip in (None, 1e-3, 1e6):
            hp = AdamHP(clip_norm=clip)
            state = adam_init(params)
            for _ in range(3):
                new0, st0, n0 = adam_update(params, grads, state, hp)
                new1, st1, n1 = nb.adam_update(params, grads, state, hp, np.dtype(dtype))
                _close([n1], [n0], dtype, "norm")
                for got, want in ((new1, new0), (st1.m, st0.m), (st1.v, st0.v)):
                    for a, b in zip(_leaves(got), _leaves(want)):
                        _close(a, b, dtype, f"adam clip={clip}")
                params, state = new0, st0


# ---------------------------------------------------------------------- task stream ----

def test_tiny_step_draws_then_steps():
    """step(params, state, s) is step_on(params, state, sample(s)), and sample(s) is a
    function of (seed, s) alone."""
    arch, _, params = _setup(K3_CLIP, np.float32)
    hp = AdamHP(clip_norm=0.001)
    spec = TaskSpec(d=d, N=N, B=B)
    st = nb.make_stepper(arch, hp, spec, 7, np.float32)
    t_a, t_b, t_c = st.sample(3), st.sample(4), st.sample(3)
    for a, c in zip(t_a, t_c):
        np.testing.assert_array_equal(a, c)
    assert not np.array_equal(t_a.X, t_b.X)
    assert not np.array_equal(nb.make_stepper(arch, hp, spec, 8, np.float32).sample(3).X, t_a.X)
    state = adam_init(params)
    r_step = st.step(params, state, 3)
    r_on = nb.make_stepper(arch, hp, spec, 7, np.float32).step_on(params, state, t_a)
    for a, b in zip(_leaves(r_step.params), _leaves(r_on.params)):
        np.testing.assert_array_equal(a, b)
    assert r_step.loss == r_on.loss and r_step.grad_norm == r_on.grad_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_task_stream_does_not_depend_on_block_size(monkeypatch, dtype):
    """Task b's draws are a function of (seed, step, b) only: 1, 3 or 64 lanes per block agree."""
    spec = TaskSpec(d=4, N=6, B=11, noise_std=0.1, n_distractors=1)
    draws = []
    for L in (1, 4, 0):
        monkeypatch.setattr(config, "LANES", L)
        draws.append(nb.make_stepper(lsa_stack(1), AdamHP(), spec, 5, dtype).sample(2))
    for other in draws[1:]:
        for a, b in zip(other, draws[0]):
            np.testing.assert_array_equal(a, b)
    # module-level sample_tasks: the same stream through numba_rng, the reference's through a Generator
    t = nb.sample_tasks(nb.numba_rng(5, 2), 11, 4, 6, noise_std=0.1, n_distractors=1, dtype=dtype)
    np.testing.assert_array_equal(t.X, draws[0].X)
    ref = nb.sample_tasks(np.random.default_rng(0), 3, 2, 4, dtype=dtype)
    want = sample_tasks(np.random.default_rng(0), 3, 2, 4, dtype=dtype)
    for a, b in zip(ref, want):
        np.testing.assert_array_equal(a, b)


def test_tasks_distribution():
    """Labels are W x; inputs in range; moments of W and x match N(0, 1) and U(-0.5, 0.5)."""
    spec = TaskSpec(d=10, N=10, B=10_000)
    for dtype in DTYPES:
        X, Y, x_q, y_q, W = nb.make_stepper(lsa_stack(1), AdamHP(), spec, 0, dtype).sample(0)
        assert X.shape == (10_000, 10, 10) and Y.shape == (10_000, 10, 1) and x_q.shape == (10_000, 10)
        assert y_q.shape == (10_000, 1) and W.shape == (10_000, 1, 10) and X.dtype == np.dtype(dtype)
        assert_close(Y, np.einsum("bij,bnj->bni", W, X), "algebra", what="Y = W x")
        assert_close(y_q, np.einsum("bij,bj->bi", W, x_q), "algebra", what="y_q = W x_q")
        assert X.min() >= -0.5 and X.max() < 0.5 and x_q.min() >= -0.5 and x_q.max() < 0.5
        mc = tolerance(np.float64, "monte_carlo")
        w = W.reshape(-1).astype(np.float64)
        assert abs(w.mean()) < 4 / np.sqrt(w.size), f"mean of W {w.mean():.4f}"
        assert abs(w.var() - 1.0) <= mc.rtol, f"variance of W {w.var():.4f}; {mc.reason}"
        assert abs(np.mean(w ** 4) / 3.0 - 1.0) < 0.05, "fourth moment of W (normal: 3)"
        x = X.reshape(-1).astype(np.float64)
        assert abs(x.mean()) < 4 * np.sqrt(1 / 12 / x.size), f"mean of x {x.mean():.4f}"
        assert abs(x.var() / (1 / 12) - 1.0) <= mc.rtol, f"variance of x {x.var():.5f} vs 1/12; {mc.reason}"
        # uniform: each tenth of the range holds a tenth of the draws (1e6 draws, 5 sigma)
        counts = np.histogram(x, bins=10, range=(-0.5, 0.5))[0] / x.size
        assert np.all(np.abs(counts - 0.1) < 5 * np.sqrt(0.09 / x.size)), counts
        # tasks are independent: neighbouring tasks' teachers are uncorrelated
        c = np.corrcoef(W[:-1, 0, 0], W[1:, 0, 0])[0, 1]
        assert abs(c) < 4 / np.sqrt(W.shape[0]), f"correlation of neighbouring teachers {c:.4f}"


def test_tasks_options():
    """Label noise touches context labels only; distractors replace the first labels."""
    spec = TaskSpec(d=3, N=6, B=2000, noise_std=0.5, n_distractors=2, x_range=(-1.0, 1.0), w_scale=2.0)
    X, Y, x_q, y_q, W = nb.make_stepper(lsa_stack(1), AdamHP(), spec, 1, np.float64).sample(0)
    assert X.min() >= -1.0 and X.max() < 1.0
    assert_close(y_q, np.einsum("bij,bj->bi", W, x_q), "algebra", what="clean query target")
    resid = Y[:, 2:] - np.einsum("bij,bnj->bni", W, X[:, 2:])
    assert 0.45 < resid.std() < 0.55, f"label noise std {resid.std():.3f}, want 0.5"
    assert 0.9 < Y[:, :2].std() < 1.1, f"distractor label std {Y[:, :2].std():.3f}, want 1"
    assert 1.8 < W.std() < 2.2, f"teacher std {W.std():.3f}, want w_scale = 2"


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="threads need the JIT")
@pytest.mark.parametrize("path", ["tokens", "dspace"])
def test_results_do_not_depend_on_the_thread_count(monkeypatch, path):
    """Chunks are a fixed partition added in chunk order: 1 and 2 threads give the same bits."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    monkeypatch.setattr(config, "PATH", path)
    monkeypatch.setattr(config, "LANES", 2)
    arch, _, params = _setup(DSPACE_CASES[4], np.float32, b=40)
    spec = TaskSpec(d=d, N=N, B=40)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            st = nb.make_stepper(arch, AdamHP(clip_norm=0.001), spec, 3, np.float32)
            results.append(st.step(params, adam_init(params), 5))
    finally:
        numba.set_num_threads(before)
    assert results[0].loss == results[1].loss and results[0].grad_norm == results[1].grad_norm
    for a, b_ in zip(_leaves(results[0].params), _leaves(results[1].params)):
        np.testing.assert_array_equal(a, b_)


def test_returned_params_are_not_mutated():
    arch, _, params = _setup(K1, np.float64)
    hp = AdamHP(clip_norm=0.001)
    st = nb.make_stepper(arch, hp, TaskSpec(d=d, N=N, B=B), 0, np.float64)
    before_in = [a.copy() for a in _leaves(params)]
    r1 = st.step(params, adam_init(params), 0)
    before = [a.copy() for a in _leaves(r1.params)]
    st.step(r1.params, r1.state, 1)
    for a, b in zip(_leaves(r1.params) + _leaves(params), before + before_in):
        np.testing.assert_array_equal(a, b)


def test_registered_as_backend_and_default():
    from reference.backends import DEFAULT_TRAIN_BACKEND

    assert get_backend("numba") is nb and nb.NAME == "numba"
    assert DEFAULT_TRAIN_BACKEND == "numba"


# ---------------------------------------------------------------------------- errors ----

def test_bad_input_beyond_the_shared_cases():
    """Errors of this backend's entry points that the conformance suite's shared bad
    inputs (E's shape, width, NaN and dtype, params' count and type, y_q) do not cover."""
    arch, tasks, params = _setup(K1, np.float64)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    p = params[0]
    cases = [
        (lambda: nb.model_forward(E, (p._replace(P=p.P[:, :3]),), arch), ValueError, r"P must have shape \(1, 4, 4\)"),
        (lambda: nb.model_forward(E, (p,), 3), TypeError, "arch must be an Arch"),
        (lambda: nb.model_forward(E[:, :1], params, arch), ValueError, "at least 2 tokens"),
        (lambda: nb.loss_and_grads(E, tasks.y_q, params, arch, 4), ValueError, "d must be <= 3"),
        (lambda: nb.loss_and_grads(E.astype(np.complex128), tasks.y_q, tuple(LSAParams(*(a.astype(np.complex128)
                                   for a in p)) for p in params), arch, d), TypeError, "complex-step"),
        (lambda: nb.sample_tasks(np.random.RandomState(0), 2, 3, 4), TypeError, "numpy.random.Generator"),
        (lambda: nb.sample_tasks(nb.numba_rng(0), 0, 3, 4), ValueError, "B must be >= 1, got 0"),
        (lambda: nb.numba_rng(-1), ValueError, "seed must be >= 0"),
        (lambda: nb.make_stepper(arch, AdamHP(lr=-1.0), TaskSpec(d=d, N=N, B=B), 0), ValueError, "lr must be > 0"),
        (lambda: nb.make_stepper(arch, AdamHP(), TaskSpec(d=d, N=N, B=B), 0, np.int32), TypeError,
         "dtype must be float32 or float64"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_stepper_dtype_mismatch_raises():
    arch, tasks, params = _setup(K1, np.float64)
    st = nb.make_stepper(arch, AdamHP(), TaskSpec(d=d, N=N, B=B), 0, np.float32)
    with pytest.raises(TypeError, match="dtype float32"):
        st.step_on(params, adam_init(params), tasks)
    with pytest.raises(TypeError, match="dtype float32"):
        st.step(params, adam_init(params), 0)
    wide = (init_lsa_params(np.random.default_rng(0), D + 1, dtype=np.float32),)
    with pytest.raises(ValueError, match="token width D=5"):
        st.step(wide, adam_init(wide), 0)


def test_config_flags_parse(monkeypatch):
    monkeypatch.setenv("ICGD_NUMBA_X", "maybe")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        config._flag("ICGD_NUMBA_X", True)
    monkeypatch.setenv("ICGD_NUMBA_X", "3")
    with pytest.raises(ValueError, match="must be one of"):
        config._int("ICGD_NUMBA_X", 0, {0, 8})
    monkeypatch.setenv("ICGD_NUMBA_X", "off")
    assert config._flag("ICGD_NUMBA_X", True) is False
    assert set(config.describe()) == {"parallel", "fastmath", "cache", "lanes", "path"}
    monkeypatch.setenv("ICGD_NUMBA_X", "fast")
    with pytest.raises(ValueError, match="must be one of"):
        config._choice("ICGD_NUMBA_X", "auto", {"auto", "tokens"})


# ------------------------------------------------------------------- pure-Python run ----

@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="already running without JIT")
def test_pure_python_run_of_the_tiny_subset():
    """The ``tiny`` tests of this file and the Numba ``tiny`` tests of the conformance
    suite again with NUMBA_DISABLE_JIT=1 and 2 lanes per block (several blocks and
    chunks, a padded block): the kernels' Python semantics, not just LLVM's."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", ICGD_NUMBA_CACHE="0", ICGD_NUMBA_LANES="2")
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.abspath(__file__), os.path.join(here, "test_conformance.py")]
    # -k matches the module name too: every tiny test here, the numba-* ones there
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "tiny and numba",
                          *files], cwd=os.path.dirname(here), env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-2000:]
    passed = [line for line in out.stdout.splitlines() if line.startswith("PASSED ")]
    for f in files:
        assert any(f"{os.path.basename(f)}::" in line for line in passed), f"no tiny test of {f} ran"
