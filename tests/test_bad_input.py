"""Bad input gets a clear ValueError/TypeError naming the argument, never a wrong answer."""

import numpy as np
import pytest

import reference as R


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
