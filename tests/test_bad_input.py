"""Bad input gets a clear ValueError/TypeError naming the argument, never a wrong answer."""

import numpy as np
import pytest

import reference as R
from reference.train_step import train_step as reference_train_step


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def layer(rng):
    t = R.sample_tasks(rng, 2, 3, 4, 1)
    return R.build_tokens(t.X, t.Y, t.x_q), R.init_lsa_params(rng, 4, dtype=np.float64)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(B=0), ValueError, "B must be >= 1, got 0"),
    (dict(d=2.5), TypeError, "d must be an integer"),
    (dict(N=True), TypeError, "N must be an integer"),
    (dict(x_range=(1, -1)), ValueError, "x_range must satisfy low < high"),
    (dict(x_range="ab"), TypeError, "x_range must be a pair"),
    (dict(w_scale=-1.0), ValueError, "w_scale must be >= 0"),
    (dict(noise_std=float("nan")), ValueError, "noise_std must be finite"),
    (dict(n_distractors=9), ValueError, "n_distractors must be <= 4"),
    (dict(dtype=np.int32), TypeError, "dtype must be float32 or float64"),
])
def test_sample_tasks_rejects(rng, kwargs, exc, match):
    args = dict(B=2, d=3, N=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        R.sample_tasks(rng, args.pop("B"), args.pop("d"), args.pop("N"), **args)


def test_sample_tasks_needs_a_generator():
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        R.sample_tasks(np.random.RandomState(0), 2, 3, 4)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        R.sample_tasks(0, 2, 3, 4)


def test_build_tokens_rejects(rng):
    t = R.sample_tasks(rng, 2, 3, 4, 1)
    with pytest.raises(ValueError, match=r"Y must have shape \(2, 4, d_y\)"):
        R.build_tokens(t.X, t.Y[:, :3], t.x_q)
    with pytest.raises(ValueError, match=r"x_q must have shape \(2, 3\), got \(2, 2\)"):
        R.build_tokens(t.X, t.Y, t.x_q[:, :2])
    with pytest.raises(ValueError, match="W_0 must have shape"):
        R.build_tokens(t.X, t.Y, t.x_q, W_0=np.zeros((3, 1)))
    X = t.X.copy()
    X[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        R.build_tokens(X, t.Y, t.x_q)
    with pytest.raises(TypeError, match="X must have dtype float32 or float64"):
        R.build_tokens(t.X.astype(np.int64), t.Y, t.x_q)


def test_lsa_forward_rejects(layer):
    E, p = layer
    with pytest.raises(ValueError, match=r"E must have token width D=4"):
        R.lsa_forward(E[:, :, :3], p)
    with pytest.raises(ValueError, match="E must have 3 dimensions"):
        R.lsa_forward(E[0], p)
    with pytest.raises(TypeError, match="share one dtype"):
        R.lsa_forward(E.astype(np.float32), p)
    with pytest.raises(ValueError, match=r"P must have shape \(1, 4, 4\)"):
        R.lsa_forward(E, p._replace(P=p.P[:, :3]))
    with pytest.raises(ValueError, match="clip must be > 0"):
        R.lsa_forward(E, p, clip=0.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        R.lsa_forward(E, p, causal=1)
    with pytest.raises(TypeError, match="params must be LSAParams or MergedParams"):
        R.lsa_forward(E, (p.W_Q, p.W_K, p.W_V, p.P))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        R.lsa_forward(E[:, :1], p)
    Einf = E.copy()
    Einf[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="E contains NaN or infinite"):
        R.lsa_forward(Einf, p)


def test_model_rejects(layer):
    E, p = layer
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        R.lsa_stack(0)
    with pytest.raises(TypeError, match="recurrent must be a bool"):
        R.lsa_stack(2, recurrent="yes")
    with pytest.raises(ValueError, match=r"params must hold 3 layer\(s\) for a separate stack of K=3, got 1"):
        R.model_forward(E, (p,), R.lsa_stack(3))
    with pytest.raises(TypeError, match="arch must be an Arch"):
        R.model_forward(E, (p,), 3)
    with pytest.raises(ValueError, match=r"y_q must have shape \(2, 1\)"):
        R.loss_forward(np.zeros((2, 1)), np.zeros((2, 2)))


def test_constructions_and_solvers_reject(rng):
    with pytest.raises(ValueError, match="N must be >= 1"):
        R.gd_layer(3, 1, 0, 1.0)
    with pytest.raises(ValueError, match="eta must be finite"):
        R.gd_layer(3, 1, 4, float("inf"))
    with pytest.raises(ValueError, match=r"W_0 must have shape \(1, 3\)"):
        R.gd_layer(3, 1, 4, 1.0, W_0=np.zeros((3, 1)))
    with pytest.raises(ValueError, match="etas and gammas must be non-empty and of equal length"):
        R.gdpp_stack(3, 1, 4, [1.0], [0.1, 0.2])
    t = R.sample_tasks(rng, 2, 3, 4, 1)
    with pytest.raises(ValueError, match="eta must be a scalar or have n_steps=3 entries, got 2"):
        R.gd_predict(t.X, t.Y, t.x_q, [1.0, 2.0], 3)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        R.least_squares_predict(t.X, t.Y, t.x_q, ridge=-1.0)
    with pytest.raises(ValueError, match="grid must be a non-empty 1-d array"):
        R.line_search_eta(t.X, t.Y, t.x_q, t.y_q, grid=[])
    with pytest.raises(ValueError, match="x_range must be symmetric"):
        R.uniform_moments((0.0, 1.0))
    with pytest.raises(ValueError, match="m4 must be >= "):
        R.optimal_one_step_eta(10, 10, 0.5, 0.1)
    with pytest.raises(ValueError, match="cannot both be 0"):
        R.optimal_one_step_eta(10, 10, 1 / 12, 1 / 80, w_scale=0.0)


def test_mixing_host_and_device_namespaces_is_an_error():
    class FakeCupyArray:
        __module__ = "cupy._core.core"
    FakeCupyArray.__module__ = "cupy._core.core"
    with pytest.raises(TypeError, match="mix NumPy"):
        R.get_xp(np.zeros(2), FakeCupyArray())


def test_init_and_adam_reject(rng):
    from reference.optim import AdamHP
    with pytest.raises(ValueError, match="scale must be > 0"):
        R.init_lsa_params(rng, 4, scale=0.0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        R.init_lsa_params(rng, 4, dtype="int8")
    with pytest.raises(ValueError, match="lr must be > 0"):
        AdamHP(lr=0.0).validate()
    with pytest.raises(ValueError, match="b2 must be <= 1"):
        AdamHP(b2=1.5).validate()


def test_adam_rejects_trees_of_another_structure(rng):
    from reference.optim import AdamHP, adam_init, adam_update
    p = (R.init_lsa_params(rng, 4, dtype=np.float64),)
    g = (R.to_merged(p[0]),)
    with pytest.raises(ValueError, match="same structure"):
        adam_update(p, g, adam_init(p), AdamHP())
    with pytest.raises(ValueError, match="same structure"):
        adam_update(p, p * 2, adam_init(p), AdamHP())
    with pytest.raises(TypeError, match=r"tree\[0\] must be a NamedTuple of arrays"):
        adam_init(p[0])


def test_token_layout_rejects(layer):
    E, p = layer
    with pytest.raises(ValueError, match="d must be >= 1"):
        R.TokenLayout(0)
    with pytest.raises(ValueError, match="layout kind must be 'regression'"):
        R.TokenLayout(3, 1, kind="classification")
    with pytest.raises(ValueError, match=r"E must have token width D=5 for this layout"):
        R.TokenLayout(3, 2).readout(E)
    with pytest.raises(ValueError, match=r"E must have token width D=5 for this layout"):
        R.loss_and_grads(E, np.zeros((2, 2)), (p,), R.lsa_stack(1), R.TokenLayout(3, 2))
    with pytest.raises(ValueError, match="d must be <= 3"):
        R.predict(E, (p,), R.lsa_stack(1), 4)


# ---- the fast path validates what the reference validates (one shared validator) ---------

def _step_setup(B=2048, dtype=np.float64, seed=0):
    from reference.layers import InitSettings
    from reference.optim import adam_init

    rng = np.random.default_rng(seed)
    arch = R.lsa_stack(1)
    tasks = R.sample_tasks(rng, B, 3, 4, 1, dtype=dtype)
    params = arch.init(rng, 4, InitSettings(scale=0.3, dtype=dtype))
    return arch, tasks, params, adam_init(params)


BAD_Y_Q = {
    "nan": (lambda y: np.where(np.arange(y.size).reshape(y.shape) == 5, np.nan, y), ValueError, r"y_q contains NaN"),
    "none": (lambda y: None, TypeError, r"y_q must be an array"),
    "shape-1x1": (lambda y: y[:1, :1].copy(), ValueError, r"y_q must have shape \(2048, 1\), got \(1, 1\)"),
    "too-wide": (lambda y: np.concatenate([y, y], axis=1), ValueError, r"y_q must have shape \(2048, 1\)"),
    "float32": (lambda y: y.astype(np.float32), TypeError, r"y_q .*float32"),
    "int": (lambda y: y.astype(np.int64), TypeError, r"y_q must have dtype float32 or float64"),
}


@pytest.mark.parametrize("bad", sorted(BAD_Y_Q))
@pytest.mark.parametrize("backend, entry", [("numpy", "train_step"), ("numba", "train_step"), ("numba", "step_on")])
def test_steps_check_y_q_like_the_reference(backend, entry, bad):
    """B = 2048 tasks: a NaN, None, (1, 1) or otherwise wrong y_q is refused with the
    reference's message before any kernel runs (it used to give a NaN loss, train against
    zeros, or read y_q out of bounds)."""
    from unittest import mock

    from reference.backends import get_backend, numba_backend
    from reference.optim import AdamHP
    from reference.tasks import TaskSpec

    mod = get_backend(backend)
    arch, tasks, params, state = _step_setup()
    mutate, exc, match = BAD_Y_Q[bad]
    tasks = tasks._replace(y_q=mutate(tasks.y_q))
    hp = AdamHP(clip_norm=1.0)

    def kernel(*a, **k):
        raise AssertionError("a kernel ran")

    with mock.patch.object(numba_backend, "run_batch", kernel), \
            mock.patch.object(numba_backend, "run_batch_dspace", kernel), pytest.raises(exc, match=match):
        if entry == "train_step":
            mod.train_step(params, state, tasks, arch, hp)
        else:
            mod.make_stepper(arch, hp, TaskSpec(d=3, N=4, B=2048), 0, np.float64).step_on(params, state, tasks)


def test_numba_step_checks_the_adam_state_like_the_reference():
    from reference.backends import numba_backend as nb
    from reference.optim import AdamHP, AdamState
    from reference.tasks import TaskSpec

    arch, tasks, params, state = _step_setup(B=8)
    st = nb.make_stepper(arch, AdamHP(), TaskSpec(d=3, N=4, B=8), 0, np.float64)
    m = (state.m[0]._replace(W_Q=np.full_like(state.m[0].W_Q, np.nan)),)
    for call in (lambda s: st.step(params, s, 0), lambda s: st.step_on(params, s, tasks),
                 lambda s: nb.train_step(params, s, tasks, arch, AdamHP()), lambda s: reference_train_step(params, s, tasks, arch, AdamHP())):
        with pytest.raises(ValueError, match=r"state\.m\[0\]\.W_Q contains NaN"):
            call(state._replace(m=m))
        with pytest.raises(ValueError, match=r"state\.v\[0\]\.P must have shape \(1, 4, 4\)"):
            call(state._replace(v=(state.v[0]._replace(P=state.v[0].P[:, :3]),)))
        with pytest.raises(TypeError, match="state must be an AdamState"):
            call(tuple(state))
        with pytest.raises(ValueError, match=r"state\.t must be >= 0"):
            call(AdamState(state.m, state.v, -1))


# ---- public functions reject what they cannot compute, naming the argument ------------------

def _forward(rng, dtype=np.float64):
    t = R.sample_tasks(rng, 2, 3, 4, 1, dtype=dtype)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    p = R.init_lsa_params(rng, 4, dtype=dtype)
    return E, p


BAD_DOUT = {
    "nan": (lambda g: np.where(g > 0.5, np.nan, g), ValueError, "dout contains NaN"),
    "inf": (lambda g: np.where(g > 0.5, -np.inf, g), ValueError, "dout contains NaN or infinite"),
    "object": (lambda g: g.astype(object), TypeError, "dout must have dtype"),
    "float16": (lambda g: g.astype(np.float16), TypeError, "dout must have dtype"),
    "float32": (lambda g: g.astype(np.float32), TypeError, "dout must have the forward's dtype float64, got float32"),
    "ndim": (lambda g: g[0], ValueError, r"dout must have shape \(2, 5, 4\), got \(5, 4\)"),
    "shape": (lambda g: g[:, :4], ValueError, r"dout must have shape \(2, 5, 4\), got \(2, 4, 4\)"),
    "none": (lambda g: None, TypeError, "dout must be an array"),
}


@pytest.mark.parametrize("bad", sorted(BAD_DOUT))
@pytest.mark.parametrize("which", ["lsa_backward", "model_backward"])
def test_backward_checks_dout(rng, which, bad):
    E, p = _forward(rng)
    if which == "lsa_backward":
        out, cache = R.lsa_forward(E, p)
        back = R.lsa_backward
    else:
        out, cache = R.model_forward(E, (p, p), R.lsa_stack(2))
        back = R.model_backward
    mutate, exc, match = BAD_DOUT[bad]
    with pytest.raises(exc, match=match):
        back(mutate(rng.standard_normal(out.shape)), cache)
    with pytest.raises(TypeError, match="cache must be"):
        back(rng.standard_normal(out.shape), tuple(cache))


@pytest.mark.parametrize("which", ["gd_predict", "gdpp_predict"])
def test_solvers_check_W_0(rng, which):
    t = R.sample_tasks(rng, 2, 3, 4, 1)
    call = {"gd_predict": lambda W: R.gd_predict(t.X, t.Y, t.x_q, 0.5, 2, W_0=W),
            "gdpp_predict": lambda W: R.gdpp_predict(t.X, t.Y, t.x_q, [0.5], [0.1], W_0=W)}[which]
    W = np.zeros((1, 3))
    call(W)
    with pytest.raises(ValueError, match="W_0 contains NaN"):
        call(np.full((1, 3), np.nan))
    with pytest.raises(ValueError, match=r"W_0 must have shape \(1, 3\)"):
        call(np.zeros((3, 1)))
    with pytest.raises(TypeError, match="W_0 must have dtype float32 or float64"):
        call(W.astype(object))
    with pytest.raises(TypeError, match="W_0 must be an array"):
        call([[0.0, 0.0, 0.0]])


def test_empty_batches_and_contexts_are_refused(rng):
    """B = 0 or N = 0 used to give NaN losses (and line_search_eta 0.001 from an all-NaN
    curve)."""
    t = R.sample_tasks(rng, 2, 3, 4, 1)
    E, p = _forward(rng)
    arch = R.lsa_stack(1)
    with pytest.raises(ValueError, match=r"E must have B >= 1"):
        R.loss_and_grads(E[:0], t.y_q[:0], (p,), arch, 3)
    with pytest.raises(ValueError, match=r"pred must have B >= 1"):
        R.loss_forward(np.zeros((0, 1)), np.zeros((0, 1)))
    for X, Y, x_q, y_q, what in ((t.X[:0], t.Y[:0], t.x_q[:0], t.y_q[:0], "B"), (t.X[:, :0], t.Y[:, :0], t.x_q, t.y_q, "N")):
        for call in (lambda: R.gd_predict(X, Y, x_q, 0.5), lambda: R.gdpp_predict(X, Y, x_q, [0.5], [0.1]),
                     lambda: R.least_squares_predict(X, Y, x_q), lambda: R.line_search_eta(X, Y, x_q, y_q),
                     lambda: R.build_tokens(X, Y, x_q)):
            with pytest.raises(ValueError, match=rf"X must have {what} >= 1"):
                call()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_line_search_skips_non_finite_losses_and_refuses_an_all_non_finite_curve(rng):
    t = R.sample_tasks(rng, 8, 3, 4, 1)
    eta, losses = R.line_search_eta(t.X, t.Y, t.x_q, t.y_q, n_steps=400, grid=[25.0, 0.1])
    assert not np.isfinite(losses[0]) and eta == 0.1
    with pytest.raises(ValueError, match=r"every eta of the grid .* non-finite loss"):
        R.line_search_eta(t.X, t.Y, t.x_q, t.y_q, n_steps=400, grid=[20.0, 25.0])


def test_least_squares_refuses_overflow_scale_data(rng):
    t = R.sample_tasks(rng, 2, 3, 4, 1)
    for ridge in (0.0, 0.1):
        with pytest.raises(ValueError, match=r"X has entries of magnitude up to [0-9.]+e\+199, beyond the float64 data limit"):
            R.least_squares_predict(t.X * 1e200, t.Y, t.x_q, ridge=ridge)


def test_adam_update_checks_its_inputs(rng):
    from reference.optim import AdamHP, AdamState, adam_init, adam_update

    p = (R.init_lsa_params(rng, 4, dtype=np.float64),)
    g = (R.init_lsa_params(rng, 4, dtype=np.float64),)
    s = adam_init(p)
    hp = AdamHP()
    adam_update(p, g, s, hp)
    ints = (R.LSAParams(*(np.ones(a.shape, np.int64) for a in p[0])),)
    with pytest.raises(TypeError, match=r"params\[0\]\.W_Q must have dtype float32 or float64, got int64"):
        adam_update(ints, g, adam_init(ints), hp)
    with pytest.raises(ValueError, match=r"grads\[0\]\.W_V contains NaN"):
        adam_update(p, (g[0]._replace(W_V=np.full_like(g[0].W_V, np.nan)),), s, hp)
    with pytest.raises(TypeError, match=r"grads\[0\]\.P must have dtype float64 \(the params'\), got float32"):
        adam_update(p, (g[0]._replace(P=g[0].P.astype(np.float32)),), s, hp)
    with pytest.raises(ValueError, match=r"state\.m\[0\]\.W_K must have shape \(1, 4, 4\)"):
        adam_update(p, g, s._replace(m=(s.m[0]._replace(W_K=s.m[0].W_K[:, :2]),)), hp)
    with pytest.raises(ValueError, match=r"state\.v\[0\]\.W_Q must be >= 0"):
        adam_update(p, g, s._replace(v=(s.v[0]._replace(W_Q=-np.ones((1, 4, 4))),)), hp)
    with pytest.raises(TypeError, match=r"state\.t must be an integer"):
        adam_update(p, g, AdamState(s.m, s.v, 1.5), hp)
    with pytest.raises(TypeError, match="hp must be an AdamHP"):
        adam_update(p, g, s, {"lr": 1e-3})
    with pytest.raises(ValueError, match="lr must be > 0"):
        adam_update(p, g, s, AdamHP(lr=0.0))


def test_adam_refuses_a_float32_gradient_whose_square_overflows(rng):
    """g^2 of a float32 gradient above 1.8e19 is inf: v would be inf and the update zero.
    adam_update refuses it; a training step reports the gradient norm as inf (the
    trainer's divergence check), on every backend."""
    from reference.optim import AdamHP, adam_init, adam_update

    p = (R.init_lsa_params(rng, 4, dtype=np.float32),)
    g = (R.LSAParams(*(np.full(a.shape, 3e19, np.float32) for a in p[0])),)
    for hp in (AdamHP(), AdamHP(clip_norm=1.0)):
        with pytest.raises(ValueError, match=r"grads: the global gradient norm overflows float32"):
            adam_update(p, g, adam_init(p), hp)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_steps_report_a_float32_gradient_overflow_as_an_infinite_norm(backend):
    from reference.backends import get_backend
    from reference.optim import AdamHP
    from reference.tasks import TaskSpec
    from reference.tree import tree_map

    arch, tasks, params, state = _step_setup(B=16, dtype=np.float32)
    params = tree_map(lambda a: a * np.float32(1e4), params)       # loss finite (~1e28), gradient^2 overflows
    mod = get_backend(backend)
    r0 = reference_train_step(params, state, tasks, arch, AdamHP())
    assert np.isfinite(r0.loss) and r0.grad_norm == np.inf
    for res in (mod.train_step(params, state, tasks, arch, AdamHP()),
                mod.make_stepper(arch, AdamHP(), TaskSpec(d=3, N=4, B=16), 0, np.float32).step_on(params, state, tasks)):
        assert res.grad_norm == np.inf, f"{backend}: gradient norm {res.grad_norm} for an overflowing float32 gradient"
