"""The reference's CPU test bodies, run on every array namespace through ``xp``.

``reference/`` is written once, generic over the array namespace. Each test here
builds its inputs on the host, moves them to ``xp`` (NumPy, or CuPy on a GPU: the
fixture skips that one, with the reason, where there is none), runs the reference code
there, and compares with an independent answer computed on host copies: the loop
oracle, the NumPy run of the same function, or an explicit solver. On NumPy the
"NumPy run" comparisons are trivially exact; they are there for the CuPy run, where
they check that the code gives the same numbers through cuBLAS and CuPy's kernels.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as R
from reference.oracle import oracle_gd, oracle_lsa_layer, oracle_loss, oracle_model
from reference.optim import AdamHP, adam_init, adam_update, global_norm
from reference.tolerances import assert_close
from reference.train_step import train_step
from reference.tree import tree_leaves, tree_map

from strategies import layer_case, regression

XP_SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- moving things between namespaces ----------------------------------------------------

def to_xp(xp, a):
    return None if a is None else xp.asarray(a)


def tree_to(xp, tree):
    return tree_map(xp.asarray, tree)


def tasks_to(xp, t):
    return R.Tasks(*(xp.asarray(a) for a in t))


def host(a):
    return np.asarray(R.to_numpy(a))


def assert_in(xp, *arrays):
    for a in arrays:
        assert R.get_xp(a) is xp, f"result left the {xp.__name__} namespace: {type(a)}"


def close(actual, desired, kind="algebra", what="arrays"):
    """Compare a result (any namespace) with a host array, by the tolerance table."""
    a, d = host(actual), np.asarray(desired)
    assert_close(a, d.astype(a.dtype) if a.dtype != d.dtype and d.dtype.kind == a.dtype.kind else d, kind, what=what)


def make_tasks(seed=0, B=4, N=5, d=3, d_y=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return R.sample_tasks(rng, B, d, N, d_y, dtype=dtype), rng


# -- tokens ----------------------------------------------------------------------------

def test_build_tokens_layout(xp):
    t, _ = make_tasks(d_y=2)
    X, Y, x_q = (to_xp(xp, a) for a in (t.X, t.Y, t.x_q))
    E = R.build_tokens(X, Y, x_q)
    assert_in(xp, E)
    assert E.shape == (4, 6, 5) and E.dtype == np.float64
    Eh = host(E)
    np.testing.assert_array_equal(Eh[:, :5, :3], t.X)
    np.testing.assert_array_equal(Eh[:, :5, 3:], t.Y)
    np.testing.assert_array_equal(Eh[:, 5, :3], t.x_q)
    np.testing.assert_array_equal(Eh[:, 5, 3:], 0.0)
    np.testing.assert_array_equal(Eh, R.build_tokens(t.X, t.Y, t.x_q))


def test_build_tokens_with_W0_starts_the_query_at_minus_W0_xq(xp):
    t, rng = make_tasks(d_y=2)
    W_0 = rng.standard_normal((2, 3))
    E = R.build_tokens(to_xp(xp, t.X), to_xp(xp, t.Y), to_xp(xp, t.x_q), W_0=to_xp(xp, W_0))
    assert_in(xp, E)
    close(E[:, -1, 3:], -np.einsum("ij,bj->bi", W_0, t.x_q), what="query y-slot")


def test_build_tokens_with_a_per_task_W0(xp):
    t, rng = make_tasks(d_y=2)
    W_0 = rng.standard_normal((4, 2, 3))
    E = R.build_tokens(to_xp(xp, t.X), to_xp(xp, t.Y), to_xp(xp, t.x_q), W_0=to_xp(xp, W_0))
    close(E[:, -1, 3:], -np.einsum("bij,bj->bi", W_0, t.x_q), what="query y-slot")


def test_readout_and_its_backward(xp):
    t, rng = make_tasks(d_y=2)
    E = R.build_tokens(*(to_xp(xp, a) for a in (t.X, t.Y, t.x_q)))
    E = E + to_xp(xp, rng.standard_normal(E.shape))
    pred = R.readout(E, 3)
    assert_in(xp, pred)
    np.testing.assert_array_equal(host(pred), -host(E)[:, -1, 3:])
    G = rng.standard_normal((4, 2))
    dE = R.readout_backward(to_xp(xp, G), E.shape, 3)
    assert_in(xp, dE)
    want = np.zeros(E.shape)
    want[:, -1, 3:] = -G
    np.testing.assert_array_equal(host(dE), want)
    layout = R.TokenLayout(3, 2)                                       # the same two through the layout
    np.testing.assert_array_equal(host(layout.readout(E)), host(pred))
    np.testing.assert_array_equal(host(layout.readout_backward(to_xp(xp, G), E.shape)), want)


# -- the LSA layer and the model ----------------------------------------------------------

LAYER_CASES = [  # (H, key_size, value_size, merged, causal, clip)
    (1, None, None, False, False, None),
    (2, 3, 5, False, False, None),
    (2, None, None, True, False, None),
    (1, None, None, False, True, None),
    (3, 2, 2, False, True, 0.4),
    (1, None, None, False, False, 0.4),
]
LAYER_IDS = ["1head", "2heads-k3-v5", "merged", "causal", "causal-3heads-clip", "clip"]


def _layer(case, seed=0, dtype=np.float64):
    H, kd, vd, merged, causal, clip = case
    t, rng = make_tasks(seed, dtype=dtype)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    p = R.init_lsa_params(rng, 4, H=H, key_size=kd, value_size=vd, scale=3.0, dtype=dtype, merged=merged)
    return E, p, causal, clip, rng


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_layer_forward_matches_loop_oracle(xp, case):
    E, p, causal, clip, _ = _layer(case)
    out, _ = R.lsa_forward(to_xp(xp, E), tree_to(xp, (p,))[0], causal=causal, clip=clip)
    assert_in(xp, out)
    close(out, oracle_lsa_layer(E, p, causal, clip), what="LSA layer vs loop oracle")


@pytest.mark.parametrize("case", LAYER_CASES, ids=LAYER_IDS)
def test_layer_backward_matches_host_backward(xp, case):
    E, p, causal, clip, rng = _layer(case)
    G = rng.standard_normal(E.shape)                                   # random upstream, never ones
    out_h, cache_h = R.lsa_forward(E, p, causal=causal, clip=clip)
    dE_h, dp_h = R.lsa_backward(G, cache_h)
    out, cache = R.lsa_forward(to_xp(xp, E), tree_to(xp, (p,))[0], causal=causal, clip=clip)
    dE, dp = R.lsa_backward(to_xp(xp, G), cache)
    assert_in(xp, dE, *dp)
    assert type(dp) is type(dp_h)
    close(dE, dE_h, what="dE")
    for name, a, b in zip(dp._fields, dp, dp_h):
        close(a, b, what=f"d{name}")


ARCHS = [R.lsa_stack(1), R.lsa_stack(3, recurrent=True), R.lsa_stack(3, clip=0.4), R.lsa_stack(2, causal=True)]
ARCH_IDS = ["K1", "K3-recurrent", "K3-clip", "K2-causal"]


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_model_matches_oracle_and_host_gradients(xp, arch):
    t, rng = make_tasks()
    E = R.build_tokens(t.X, t.Y, t.x_q)
    params = tuple(R.init_lsa_params(rng, 4, H=2, scale=1.0, dtype=np.float64) for _ in range(arch.n_param_layers))
    out, _ = R.model_forward(to_xp(xp, E), tree_to(xp, params), arch)
    assert_in(xp, out)
    close(out, oracle_model(E, params, arch), what="model vs loop oracle")
    layout = R.TokenLayout(3, 1)
    L_h, g_h, aux_h = R.loss_and_grads(E, t.y_q, params, arch, layout)
    L, g, aux = R.loss_and_grads(to_xp(xp, E), to_xp(xp, t.y_q), tree_to(xp, params), arch, layout)
    assert_in(xp, L, aux["pred"], aux["dE"])
    close(xp.asarray(L).reshape(1), np.asarray([oracle_loss(host(aux["pred"]), t.y_q)]), what="loss vs oracle")
    close(aux["pred"], aux_h["pred"], what="pred")
    close(aux["dE"], aux_h["dE"], what="dE")
    for n, (a, b) in enumerate(zip(tree_leaves(g), tree_leaves(g_h))):
        close(a, b, what=f"gradient leaf {n}")


def test_clip_tokens_and_its_backward(xp):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5))
    G = rng.standard_normal(x.shape)
    y = R.layers.lsa.clip_tokens(to_xp(xp, x), 0.5)
    assert_in(xp, y)
    np.testing.assert_array_equal(host(y), np.clip(x, -0.5, 0.5))
    dx = R.layers.lsa.clip_backward(to_xp(xp, G), to_xp(xp, x), 0.5)
    np.testing.assert_array_equal(host(dx), G * (np.abs(x) <= 0.5))


# -- constructions against the explicit solvers ---------------------------------------------

@pytest.mark.parametrize("K,recurrent", [(1, False), (3, True), (4, False)])
def test_gd_construction_equals_gd_predict(xp, K, recurrent):
    t, rng = make_tasks(N=6, d=3, d_y=2)
    eta = 0.7
    W_0 = rng.standard_normal((2, 3))
    params, arch = R.gd_stack(K, 3, 2, 6, eta, W_0, recurrent=recurrent, xp=xp)
    assert_in(xp, *params[0])
    X, Y, x_q = (to_xp(xp, a) for a in (t.X, t.Y, t.x_q))
    pred = R.predict(R.build_tokens(X, Y, x_q, W_0=to_xp(xp, W_0)), params, arch, R.TokenLayout(3, 2))
    want, _ = R.gd_predict(X, Y, x_q, eta, K, W_0=to_xp(xp, W_0))
    assert_in(xp, pred, want)
    close(pred, host(want), "construction", "GD construction vs gd_predict")
    close(want, oracle_gd(t.X, t.Y, t.x_q, eta, K, W_0), "construction", "gd_predict vs loop oracle")


def test_gdpp_construction_equals_gdpp_predict(xp):
    t, _ = make_tasks(N=6, d=3, d_y=1)
    etas, gammas = [0.9, 0.5, 1.2], [0.1, 0.3, 0.05]
    params, arch = R.gdpp_stack(3, 1, 6, etas, gammas, xp=xp)
    X, Y, x_q = (to_xp(xp, a) for a in (t.X, t.Y, t.x_q))
    pred = R.predict(R.build_tokens(X, Y, x_q), params, arch, R.TokenLayout(3, 1))
    want = R.gdpp_predict(X, Y, x_q, etas, gammas)
    assert_in(xp, pred, want)
    close(pred, host(want), "construction", "GD++ construction vs gdpp_predict")
    close(want, R.gdpp_predict(t.X, t.Y, t.x_q, etas, gammas), "algebra", "gdpp_predict vs host")


# -- explicit solvers ------------------------------------------------------------------------

def test_gdpp_with_zero_gamma_is_gd(xp):
    t, _ = make_tasks(N=7, d=4, d_y=2)
    X, Y, x_q = (to_xp(xp, a) for a in (t.X, t.Y, t.x_q))
    a = R.gdpp_predict(X, Y, x_q, [0.5, 1.0], [0.0, 0.0])
    b, _ = R.gd_predict(X, Y, x_q, [0.5, 1.0], 2)
    assert_in(xp, a, b)
    close(a, host(b), "algebra", "GD++ at gamma 0 vs GD")


def test_least_squares_recovers_the_teacher(xp):
    t, _ = make_tasks(B=5, N=12, d=4, d_y=2)
    X, Y, x_q = (to_xp(xp, a) for a in (t.X, t.Y, t.x_q))
    for ridge in (0.0, 1e-3):
        pred = R.least_squares_predict(X, Y, x_q, ridge=ridge)
        assert_in(xp, pred)
        close(pred, R.least_squares_predict(t.X, t.Y, t.x_q, ridge=ridge), "construction", f"ridge {ridge} vs host")
    close(R.least_squares_predict(X, Y, x_q), t.y_q, "construction", "noiseless least squares = teacher")


def test_line_search_matches_host(xp):
    t, _ = make_tasks(B=50, N=10, d=4)
    grid = np.arange(0.1, 10, 0.5)
    eta, losses = R.line_search_eta(*(to_xp(xp, a) for a in (t.X, t.Y, t.x_q, t.y_q)), n_steps=1, grid=grid)
    eta_h, losses_h = R.line_search_eta(t.X, t.Y, t.x_q, t.y_q, n_steps=1, grid=grid)
    assert eta == eta_h
    close(losses, losses_h, "algebra", "line-search losses")


# -- optimiser and the train step ------------------------------------------------------------

@pytest.mark.parametrize("clip_norm", [None, 1e-3, 1e6], ids=["noclip", "clip-active", "clip-inactive"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_adam_update_matches_host(xp, clip_norm, dtype):
    rng = np.random.default_rng(0)
    params = (R.init_lsa_params(rng, 4, H=2, dtype=dtype, scale=1.0), R.init_lsa_params(rng, 4, merged=True, dtype=dtype))
    hp = AdamHP(lr=1e-2, clip_norm=clip_norm)
    p_h, s_h = params, adam_init(params)
    p_x, s_x = tree_to(xp, params), adam_init(tree_to(xp, params))
    for _ in range(3):
        grads = tree_map(lambda a: rng.standard_normal(a.shape).astype(dtype), params)
        p_h, s_h, n_h = adam_update(p_h, grads, s_h, hp)
        p_x, s_x, n_x = adam_update(p_x, tree_to(xp, grads), s_x, hp)
        assert isinstance(n_x, float) and s_x.t == s_h.t
        close(np.asarray([n_x], dtype=dtype), np.asarray([n_h], dtype=dtype), what="global norm")
        assert abs(global_norm(tree_to(xp, grads)) - n_h) <= 1e-5 * n_h
        for tx, th in ((p_x, p_h), (s_x.m, s_h.m), (s_x.v, s_h.v)):
            for a, b in zip(tree_leaves(tx), tree_leaves(th)):
                assert_in(xp, a)
                assert a.dtype == b.dtype
                close(a, b, what="Adam state")


def test_train_step_matches_host(xp):
    t, rng = make_tasks(B=8, dtype=np.float32)
    arch = R.lsa_stack(2)
    params = tuple(R.init_lsa_params(rng, 4, dtype=np.float32, scale=0.5) for _ in range(2))
    hp = AdamHP(clip_norm=0.001)
    p_h, s_h, p_x, s_x = params, adam_init(params), tree_to(xp, params), adam_init(tree_to(xp, params))
    for _ in range(3):
        r_h = train_step(p_h, s_h, t, arch, hp)
        r_x = train_step(p_x, s_x, tasks_to(xp, t), arch, hp)
        p_h, s_h, p_x, s_x = r_h.params, r_h.state, r_x.params, r_x.state
        close(np.asarray([r_x.loss], np.float32), np.asarray([r_h.loss], np.float32), what="loss")
        for a, b in zip(tree_leaves(p_x), tree_leaves(p_h)):
            close(a, b, what="params after a train step")


def test_host_and_device_arrays_do_not_mix(xp):
    if xp is np:
        pytest.skip("mixing needs a device namespace besides NumPy (runs on CuPy)")
    E, p, causal, clip, _ = _layer(LAYER_CASES[0])
    with pytest.raises(TypeError, match="mix NumPy"):
        R.lsa_forward(to_xp(xp, E), p)


# -- properties over xp (Hypothesis) ----------------------------------------------------------

@XP_SETTINGS
@given(case=layer_case(np.float64))
def test_batch_equals_single_task_calls(xp, case):
    E, p, causal = case
    Ex, px = to_xp(xp, E), tree_to(xp, (p,))[0]
    out, _ = R.lsa_forward(Ex, px, causal=causal)
    for b in range(E.shape[0]):
        one, _ = R.lsa_forward(Ex[b:b + 1], px, causal=causal)
        close(one, host(out)[b:b + 1], what=f"task {b} alone vs in the batch")


@XP_SETTINGS
@given(case=layer_case(np.float64, merged=False), seed=st.integers(0, 2**31))
def test_query_output_ignores_the_order_of_the_context(xp, case, seed):
    E, p, _ = case
    N = E.shape[1] - 1
    perm = np.random.default_rng(seed).permutation(N)
    Ep = E.copy()
    Ep[:, :N] = E[:, perm]
    a, _ = R.lsa_forward(to_xp(xp, E), tree_to(xp, (p,))[0])
    b, _ = R.lsa_forward(to_xp(xp, Ep), tree_to(xp, (p,))[0])
    close(a[:, -1], host(b[:, -1]), what="query token under a context permutation")


@XP_SETTINGS
@given(case=regression(np.float64), eta=st.floats(0.05, 3.0))
def test_one_layer_construction_is_one_gd_step(xp, case, eta):
    dm, t, _ = case
    params, arch = R.gd_stack(1, dm["d"], dm["d_y"], dm["N"], eta, xp=xp)
    X, Y, x_q = (to_xp(xp, a) for a in (t.X, t.Y, t.x_q))
    pred = R.predict(R.build_tokens(X, Y, x_q), params, arch, dm["layout"])
    close(pred, oracle_gd(t.X, t.Y, t.x_q, eta, 1), "construction", "construction vs loop GD")
