"""The sine-regression task, the frozen GD layer, width-changing models end to end, and
the sine analyses (issue #14; paper-settings.md sections 7, 7a)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from reference.config import ConfigError, TrainConfig
from reference.layers import InitSettings, LayerSpec
from reference.model import Arch, loss_and_grads, predict
from reference.optim import AdamHP, adam_init
from reference.oracle import oracle_gd, oracle_gd_layer
from reference.sine_analysis import (across_task_cosine, learned_features, partial_cosine, query_grid, sine_curves)
from reference.tasks import SineTaskSpec, Tasks, sample_sine_tasks
from reference.tokens import EmbeddedLayout, TokenLayout, build_tokens
from reference.train_step import train_step
from verify.claims_layers import heads_cancellation
from verify.experiments import get_experiment

SINE_ARCH = Arch((LayerSpec("embed", (("width", 6),)), LayerSpec("mlp", (("bias", True), ("width", 8))),
                  LayerSpec("lsa")))


# ---- the task sampler ------------------------------------------------------------------

def test_tied_phase_follows_the_amplitude_as_in_the_code():
    t = sample_sine_tasks(np.random.default_rng(0), 500, 10)
    a, rho = t.W[:, 0, 0], t.W[:, 0, 1]
    np.testing.assert_allclose(rho, np.pi * (a - 0.1) / 0.4, rtol=1e-12, atol=1e-12)
    assert 0.1 <= a.min() and a.max() <= 0.5 and t.X.min() >= -5 and t.X.max() <= 5


def test_independent_phase_is_uncorrelated_and_labels_are_the_sine():
    t = sample_sine_tasks(np.random.default_rng(1), 4000, 10, phase="independent", amp_range=(0.1, 5.0))
    a, rho = t.W[:, 0, 0], t.W[:, 0, 1]
    assert abs(np.corrcoef(a, rho)[0, 1]) < 0.05 and a.max() > 4.5
    # labels recomputed by a loop, not by the sampler's vectorised formula
    for b in range(0, 4000, 997):
        for n in range(10):
            assert t.Y[b, n, 0] == pytest.approx(a[b] * np.sin(t.X[b, n, 0] + rho[b]), abs=1e-14)
        assert t.y_q[b, 0] == pytest.approx(a[b] * np.sin(t.x_q[b, 0] + rho[b]), abs=1e-14)


def test_draw_order_is_u_then_x_then_queries():
    rng = np.random.default_rng(7)
    u = rng.uniform(0, 1, size=3)
    X = rng.uniform(-5, 5, size=(3, 4, 1))
    xq = rng.uniform(-5, 5, size=(3, 1))
    t = sample_sine_tasks(np.random.default_rng(7), 3, 4)
    np.testing.assert_array_equal(t.X, X)
    np.testing.assert_array_equal(t.x_q, xq)
    np.testing.assert_array_equal(t.W[:, 0, 0], 0.1 + 0.4 * u)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(phase="shared"), ValueError, "phase must be one of"),
    (dict(amp_range=(0.5, 0.1)), ValueError, "amp_range must satisfy low < high"),
    (dict(amp_range=3), TypeError, "amp_range must be a pair"),
    (dict(x_range=(1, 1)), ValueError, "x_range must satisfy"),
    (dict(dtype=np.int32), TypeError, "dtype"),
])
def test_bad_sampler_arguments_are_named(kw, exc, match):
    with pytest.raises(exc, match=match):
        sample_sine_tasks(np.random.default_rng(0), 2, 3, **kw)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        sample_sine_tasks(0, 2, 3)


def test_config_checks_the_sine_fields_before_any_work():
    c = TrainConfig().replace(task="sine", d=1, x_low=-5.0, x_high=5.0)
    assert c.task_spec(7) == SineTaskSpec(N=10, B=7)
    for kw, msg in ((dict(task="sine"), "d: the sine task has scalar inputs"),
                    (dict(task="sine", d=1, noise_std=0.1), "noise_std: not used by the sine task"),
                    (dict(amp_low=0.2), "amp_low: read by the sine task only"),
                    (dict(task="cosine"), "task: must be one of"),
                    (dict(task="sine", d=1, sine_phase="x"), "sine_phase: must be one of"),
                    (dict(task="sine", d=1, amp_low=1.0, amp_high=0.5), "need amp_low < amp_high")):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig().replace(**kw)


# ---- the frozen GD layer -----------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 4), N=st.integers(1, 6), eta=st.floats(0.01, 3.0), seed=st.integers(0, 2 ** 16))
def test_gd_layer_is_one_gd_step_on_the_query(d, N, eta, seed):
    rng = np.random.default_rng(seed)
    X, W = rng.uniform(-1, 1, (2, N, d)), rng.standard_normal((2, 1, d))
    x_q = rng.uniform(-1, 1, (2, d))
    Y = np.einsum("bij,bnj->bni", W, X)
    arch = Arch((LayerSpec("gd", (("eta", eta),)),))
    pred = predict(build_tokens(X, Y, x_q), arch.init(rng, d + 1, InitSettings()), arch, d)
    np.testing.assert_allclose(pred, oracle_gd(X, Y, x_q, eta), rtol=1e-12, atol=1e-13)


def test_gd_layer_matches_its_oracle_and_refuses_bad_tokens():
    rng = np.random.default_rng(3)
    E = rng.standard_normal((3, 6, 5))
    from reference.layers.gd import gd_forward

    out, _ = gd_forward(E, eta=0.7, d_y=2)
    np.testing.assert_allclose(out, oracle_gd_layer(E, eta=0.7, d_y=2), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        gd_forward(E[:, :1], eta=0.1)
    with pytest.raises(ValueError, match="token width D > d_y=5"):
        gd_forward(E, eta=0.1, d_y=5)
    with pytest.raises(ValueError, match="token width D > d_y"):
        Arch((LayerSpec("embed", (("width", 1),)), LayerSpec("gd"))).widths(3)


# ---- width-changing models end to end ---------------------------------------------------------

def test_arch_layout_reads_the_last_feature_at_the_output_width():
    assert SINE_ARCH.layout(1, 1) == EmbeddedLayout(1, 1, width=6)
    assert Arch((LayerSpec("lsa"),)).layout(3, 1) == TokenLayout(3, 1)
    cfg = get_experiment("sine").config
    assert cfg.layout() == EmbeddedLayout(1, 1, width=40) and cfg.layout().D_in == 2


def test_train_step_on_sine_tasks_equals_loss_and_grads_with_the_embedded_layout():
    rng = np.random.default_rng(0)
    params = SINE_ARCH.init(rng, 2, InitSettings(1.0, 1, np.float64))
    tasks = SineTaskSpec(N=5, B=8).sample(rng)
    hp = AdamHP(lr=1e-2, clip_norm=None)
    res = train_step(params, adam_init(params), tasks, SINE_ARCH, hp)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    L, _, _ = loss_and_grads(E, tasks.y_q, params, SINE_ARCH, EmbeddedLayout(1, 1, width=6))
    assert res.loss == L
    # the readout is minus the last feature of the query: recompute it by hand
    from reference.model import model_forward

    out, _ = model_forward(E, params, SINE_ARCH)
    assert L == pytest.approx(0.5 * np.mean((-out[:, -1, 5] - tasks.y_q[:, 0]) ** 2), rel=1e-13)


def test_sine_experiments_share_the_initial_embedding_and_mlp():
    from reference.trainer import init_params

    tf, mg = (init_params(get_experiment(n).config) for n in ("sine", "sine_mlp_gd"))
    for a, b in zip(tf[:2], mg[:2]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert mg[2] == () or len(mg[2]) == 0


# ---- the sine analyses --------------------------------------------------------------------------

def test_sine_curves_sensitivity_equals_finite_differences_of_the_predictions():
    rng = np.random.default_rng(5)
    params = SINE_ARCH.init(rng, 2, InitSettings(1.0, 1, np.float64))
    tasks = sample_sine_tasks(rng, 3, 5)
    grid = query_grid((-5, 5), 9)
    c = sine_curves(params, SINE_ARCH, tasks, grid, np.float64)
    h = 1e-6
    up = sine_curves(params, SINE_ARCH, tasks, grid + h, np.float64).pred
    dn = sine_curves(params, SINE_ARCH, tasks, grid - h, np.float64).pred
    np.testing.assert_allclose(c.dpred, (up - dn) / (2 * h), rtol=1e-6, atol=1e-8)
    a, rho = tasks.W[:, 0, 0:1], tasks.W[:, 0, 1:2]
    np.testing.assert_allclose(c.truth, a * np.sin(grid + rho), rtol=1e-14)
    with pytest.raises(ValueError, match="needs sine tasks"):
        sine_curves(params, SINE_ARCH, Tasks(*(np.zeros((2, 3, 2)),) * 2, np.zeros((2, 2)), np.zeros((2, 1)),
                                              np.zeros((2, 1, 2))), grid)


def test_partial_cosine_can_fail():
    g = np.random.default_rng(0).standard_normal((10, 7))
    assert partial_cosine(g, g) == pytest.approx(1.0, abs=1e-7)
    assert partial_cosine(g, -g) == pytest.approx(-1.0, abs=1e-7)
    assert abs(partial_cosine(g, np.random.default_rng(1).standard_normal((10, 7)))) < 0.5
    assert across_task_cosine(g[:, 0], -g[:, 0]) == pytest.approx(-1.0, abs=1e-7)
    with pytest.raises(ValueError, match="one shape"):
        partial_cosine(g, g[:, :3])


def test_learned_features_are_the_tokens_after_the_first_layers():
    rng = np.random.default_rng(2)
    params = SINE_ARCH.init(rng, 2, InitSettings(1.0, 1, np.float64))
    x = np.linspace(-5, 5, 4)
    F = learned_features(params, SINE_ARCH, x, 2, dtype=np.float64)
    W = params[0].W
    h = np.stack([x, 0 * x], 1) @ W.T                                   # the embedding by hand
    assert F.shape == (4, 6)
    with pytest.raises(ValueError, match="n_layers"):
        learned_features(params, SINE_ARCH, x, 3)
    assert not np.allclose(F, h)                                         # the MLP's residual added something


def test_heads_cancellation_measure_can_fail():
    from reference.layers.softmax import SoftmaxParams

    rng = np.random.default_rng(0)
    Wq = rng.standard_normal((1, 4, 4))
    Wk = rng.standard_normal((1, 4, 4))
    P = SoftmaxParams(np.concatenate([Wq, Wq]), np.concatenate([Wk, -Wk]), np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    assert heads_cancellation(P, 3)["offdiag_cos"] == pytest.approx(-1.0)
    assert heads_cancellation(P, 3)["offdiag_sum_over_heads"] == pytest.approx(0.0, abs=1e-12)
    same = P._replace(W_K=np.concatenate([Wk, Wk]))
    assert heads_cancellation(same, 3)["offdiag_cos"] == pytest.approx(1.0)


def test_experiment_layer_lists_are_the_official_models():
    tf = json.loads(get_experiment("sine").config.model.layers)
    mg = json.loads(get_experiment("sine_mlp_gd").config.model.layers)
    assert tf[:2] == mg[:2] == [{"kind": "embed", "width": 40}, {"kind": "mlp", "width": 160, "bias": True}]
    assert tf[2] == {"kind": "lsa"} and mg[2] == {"kind": "gd", "eta": 0.1}
    assert get_experiment("sine").config.arch().param_floats(2) == 80 + (40 * 160 + 160 + 160 * 40 + 40) + 4 * 1600
