"""Classic tokens and the Prop. 3 copy construction (reference/classic_tokens.py,
reference/copy_construction.py, reference/copy_analysis.py, symbolic/copy.py): the
layout against loops, its readout and backward, training with it, the construction's
exactness and the softmax bound as properties, the copy diagnostics twice (complex step
and central differences), bad input refused naming the argument, and meta-tests showing
each check can fail."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

import reference as R
from reference import copy_construction as CC
from reference.classic_tokens import ClassicLayout, build_classic_tokens, readout_offset
from reference.config import ConfigError, TrainConfig
from reference.copy_analysis import attention_maps, copy_sensitivities, update_jacobian_norms
from reference.gradcheck import model_gradcheck
from reference.layers import InitSettings, LayerSpec
from reference.layers.posenc import positional_encoding
from reference.optim import adam_init, AdamHP
from reference.tolerances import tolerance
from reference.train_step import train_step
from symbolic import load_all, run_theorem
from symbolic import copy as SC

from strategies import classic_sizes, copy_sizes, seeds

CLASSIC_LAYERS = json.dumps([{"kind": "posenc", "mode": "concat", "width": 6}, {"kind": "softmax"}, {"kind": "lsa"}])


def _tasks(seed, B, d, N, d_y, dtype=np.float64):
    return R.sample_tasks(np.random.default_rng(seed), B, d, N, d_y, dtype=dtype)


def _loop_tokens(X, Y, x_q):
    B, N, d = X.shape
    d_y = Y.shape[2]
    E = np.zeros((B, 2 * N + 1, d))
    for b in range(B):
        for j in range(N):
            for k in range(d):
                E[b, 2 * j, k] = X[b, j, k]
            for k in range(d_y):
                E[b, 2 * j + 1, d - d_y + k] = Y[b, j, k]
        for k in range(d):
            E[b, 2 * N, k] = x_q[b, k]
    return E


def _classic_model(P=6, seed=0, d=3):
    arch = R.Arch((LayerSpec("posenc", {"mode": "concat", "width": P}), LayerSpec("softmax", {}), LayerSpec("lsa", {})))
    return arch, arch.init(np.random.default_rng(seed), d, InitSettings(1.0, 2, np.float64))


# ---- the layout -------------------------------------------------------------------------

@given(classic_sizes(), seeds)
def test_layout_matches_loops_and_reads_the_last_features(sizes, seed):
    d, d_y, N, B = sizes
    t = _tasks(seed, B, d, N, d_y)
    lay = ClassicLayout(d, d_y, width=d + 5)
    E = lay.build(t.X, t.Y, t.x_q)
    np.testing.assert_array_equal(E, _loop_tokens(t.X, t.Y, t.x_q))
    assert E.shape == (B, lay.n_tokens(N), lay.D_in) and lay.n_tokens(N) == 2 * N + 1 and lay.kind == "classic"
    out = np.random.default_rng(seed).standard_normal((B, 2 * N + 1, d + 5))
    np.testing.assert_array_equal(lay.readout(out), -out[:, -1, d + 5 - d_y:])
    # the backward is the readout's adjoint: <readout(E), g> = <E, readout_backward(g)>
    g = np.random.default_rng(seed + 1).standard_normal((B, d_y))
    lhs, rhs = np.sum(lay.readout(out) * g), np.sum(out * lay.readout_backward(g, out.shape))
    assert abs(lhs - rhs) <= tolerance(np.float64, "algebra").rtol * max(1.0, abs(lhs))


def test_readout_offset_is_the_last_encoding_channel_of_the_query():
    # pe[2N, P-1] = cos(2N * 10000^(-(P-2)/P)) for even P; a model whose layers add nothing reads minus it
    assert readout_offset(10, 10)[0] == pytest.approx(np.cos(20 * 10000 ** -0.8), abs=tolerance(np.float64, "algebra").atol)
    assert 0.9999 < readout_offset(10, 10)[0] < 1.0
    arch = R.Arch((LayerSpec("posenc", {"mode": "concat", "width": 10}), LayerSpec("lsa", {"merged": True})))
    D = 20
    zero = (R.layers.posenc.PosEncParams(), R.MergedParams(np.zeros((1, D, D)), np.zeros((1, D, D))))
    t = _tasks(0, 4, 10, 10, 1)
    lay = R.classic_layout(arch, 10, 1)
    np.testing.assert_array_equal(R.predict(lay.build(t.X, t.Y, t.x_q), zero, arch, lay),
                                  -readout_offset(10, 10)[None].repeat(4, 0))


def test_classic_model_gradients_match_complex_step():
    arch, params = _classic_model()
    t = _tasks(1, 3, 3, 2, 1)
    lay = R.classic_layout(arch, 3, 1)
    res = model_gradcheck(lay.build(t.X, t.Y, t.x_q), t.y_q, params, arch, lay, np.random.default_rng(2))
    assert res.ok, res.detail


@pytest.mark.parametrize("call, match", [
    (lambda t: build_classic_tokens(t.X[:, :, :1], t.Y.repeat(2, axis=2), t.x_q[:, :1]), r"d_y <= d.*\(2, 3, 1\).*\(2, 3, 2\)"),
    (lambda t: ClassicLayout(3, 1).build(t.X, t.Y, t.x_q, W_0=np.zeros((1, 3))), r"W_0 must be None.*\(1, 3\)"),
    (lambda t: ClassicLayout(4, 1).build(t.X, t.Y, t.x_q), r"widths d=4, d_y=1.*got 3 and 1"),
    (lambda t: ClassicLayout(3, 1, width=9).readout(np.zeros((2, 7, 8))), r"width 9.*\(2, 7, 8\)"),
    (lambda t: ClassicLayout(2, 3), r"d_y"),
    (lambda t: build_classic_tokens(t.X, t.Y[:, :2], t.x_q), r"Y must have shape \(2, 3, d_y\)"),
])
def test_bad_input_is_refused_naming_the_argument(call, match):
    t = _tasks(0, 2, 3, 3, 1)
    with pytest.raises(ValueError, match=match):
        call(t)


def test_bad_types_are_refused():
    t = _tasks(0, 2, 3, 3, 1)
    arch, params = _classic_model()
    with pytest.raises(TypeError, match="layout must be a TokenLayout"):
        copy_sensitivities(params, arch, "classic", t)
    with pytest.raises(TypeError, match="tasks must be"):
        attention_maps(params, arch, R.classic_layout(arch, 3, 1), (t.X, t.Y))
    with pytest.raises(ValueError, match="tokens must be one of"):
        copy_sensitivities(params, arch, R.classic_layout(arch, 3, 1), t, tokens="y")
    with pytest.raises(ValueError, match="layer 0 is a 'posenc' layer"):
        update_jacobian_norms(params, arch, R.classic_layout(arch, 3, 1), t, layer=0)
    with pytest.raises(ValueError, match="P .* must be >= 2 d_y \\+ 1 = 3.*got 2"):
        CC.copy_layer(2, 1, 2)
    with pytest.raises(ValueError, match="form must be one of"):
        CC.copy_arch(6, "hard")


# ---- training with classic tokens ------------------------------------------------------

def test_config_selects_the_classic_layout_and_refuses_what_cannot_train_it():
    cfg = TrainConfig(backend="numpy").replace(tokens="classic", layers=CLASSIC_LAYERS)
    lay = cfg.layout()
    assert isinstance(lay, ClassicLayout) and (lay.D_in, lay.D, lay.n_tokens(10)) == (10, 16, 21)
    TrainConfig(backend="numba").replace(tokens="classic", layers=CLASSIC_LAYERS)    # the mixed-stack kernels
    with pytest.raises(ConfigError, match="backend: backend 'cupy' trains the layouts .* not 'classic'"):
        TrainConfig(backend="cupy").replace(tokens="classic", layers=CLASSIC_LAYERS)
    with pytest.raises(ConfigError, match="layers: classic tokens need an explicit layer list"):
        TrainConfig(backend="numpy").replace(tokens="classic")
    with pytest.raises(ConfigError, match="tokens: must be one of"):
        TrainConfig(backend="numpy").replace(tokens="interleaved")
    with pytest.raises(ConfigError, match="d_y: classic tokens .* d_y <= d=2"):
        TrainConfig(backend="numpy").replace(tokens="classic", layers=CLASSIC_LAYERS, d=2, d_y=3)


def test_training_steps_use_the_classic_tokens():
    from reference import trainer

    cfg = TrainConfig(backend="numpy", steps=2, dtype="float64").replace(
        tokens="classic", layers=CLASSIC_LAYERS, d=3, N=2, batch=4, eval_tasks=8, eval_every=1, checkpoint_every=1)
    state = trainer.init_state(cfg)
    stepper = trainer.make_stepper(cfg)
    tasks = stepper.sample(0)
    res = stepper.step_on(state.params, state.adam, tasks)
    # the same step by hand: tokens of the classic layout, loss of its readout
    lay = cfg.layout()
    L, _, _ = R.loss_and_grads(lay.build(tasks.X, tasks.Y, tasks.x_q), tasks.y_q, state.params, cfg.arch(), lay)
    assert res.loss == float(L)                                      # the same computation
    evals = trainer.eval_tasks(cfg)
    es = trainer.EvalSet(evals, lay.build(evals.X, evals.Y, evals.x_q), {}, 0.1)
    assert np.isfinite(trainer.evaluate(res.params, cfg, es)["loss"])
    # a layout that does not fit the model is refused before any work
    with pytest.raises(ValueError, match="layout reads tokens of width 8"):
        train_step(state.params, state.adam, tasks, cfg.arch(), cfg.adam_hp(), ClassicLayout(3, 1, width=8))
    with pytest.raises(TypeError, match="layout must be a reference.tokens.TokenLayout"):
        train_step(state.params, state.adam, tasks, cfg.arch(), AdamHP(), "classic")


# ---- the construction -------------------------------------------------------------------

def _err(t, arch, params, d, d_y, target):
    lay = R.classic_layout(arch, d, d_y)
    return np.max(np.abs(R.predict(lay.build(t.X, t.Y, t.x_q), params, arch, lay) - target), axis=1)


@given(copy_sizes(), seeds, st.floats(0.1, 3.0))
def test_linear_copy_then_gd_is_one_gd_step(sizes, seed, eta):
    d, d_y, N, P = sizes
    t = _tasks(seed, 4, d, N, d_y)
    arch, params = CC.fit_copy_layers(d, N, P, d_y, eta=eta)
    g = R.gd_predict(t.X, t.Y, t.x_q, eta, 1)[0]
    assert np.max(_err(t, arch, params, d, d_y, g)) <= CC.copy_rounding_bound(N, P, d_y) * (1 + np.max(np.abs(g)))
    # after layer 1 the y tokens are unchanged and the query's readout channels are 0
    lay = R.classic_layout(arch, d, d_y)
    _, cache = R.model_forward(lay.build(t.X, t.Y, t.x_q), params, arch)
    h0, h1 = cache.outputs[0], cache.outputs[1]
    tol = CC.copy_rounding_bound(N, P, d_y)
    assert np.max(np.abs(h1[:, 1:2 * N:2] - h0[:, 1:2 * N:2])) <= tol
    assert np.max(np.abs(h1[:, -1, -d_y:])) <= tol


@given(copy_sizes(), seeds, st.floats(2.0, 30.0))
def test_softmax_copy_is_within_its_bound_of_the_hard_limit(sizes, seed, beta):
    d, d_y, N, P = sizes
    t = _tasks(seed, 4, d, N, d_y)
    eta = 0.8
    arch, params = CC.fit_copy_layers(d, N, P, d_y, eta=eta, form="softmax", beta=beta)
    target = R.gd_predict(t.X, t.Y, t.x_q, eta, 1)[0] + CC.hard_limit_residual(t.X, t.Y, t.x_q, eta)
    floor = CC.copy_rounding_bound(N, P, d_y) * (1 + np.max(np.abs(target)))
    assert np.all(_err(t, arch, params, d, d_y, target) <= CC.softmax_copy_bound(t.X, t.Y, t.x_q, eta, P, beta) + floor)


def test_official_width_fails_the_rank_conditions():
    c = CC.copy_conditions(10, 10, 1)
    assert not c["R1"] and not c["R2"] and c["rank_all"] == 10
    assert CC.copy_rounding_bound(10, 10) == float("inf")
    assert CC.pattern_fit_error(10, 10, 1, keep=8) > 0.5 and CC.pattern_fit_error(2, 6, 1) < 1e-9


def test_rotation_shifts_the_encoding_by_one_position():
    pe = positional_encoding(12, 10)
    np.testing.assert_allclose(pe[1:], pe[:-1] @ CC.rotation(10).T, atol=1e-14)


# ---- the analyses -----------------------------------------------------------------------

@pytest.mark.parametrize("d_y", [1, 2])
def test_sensitivities_of_the_exact_copy(d_y):
    d, N, P = 3, 2, 8
    t = _tasks(3, 4, d, N, d_y)
    arch, params = CC.fit_copy_layers(d, N, P, d_y, eta=0.5)
    lay = R.classic_layout(arch, d, d_y)
    s = copy_sensitivities(params, arch, lay, t)
    tol = tolerance(np.float64, "construction").rtol
    assert abs(s["next"] - np.sqrt(d_y)) <= tol and s["self"] <= tol and s["other"] <= tol
    maps = attention_maps(params, arch, lay, t)
    assert [m.shape for m in maps] == [(1, 2 * N + 1, 2 * N)] * 2
    np.testing.assert_allclose(maps[0][0], CC.copy_pattern(N, "linear"), atol=tol)


def test_sensitivities_complex_step_equals_central_differences_and_loops():
    arch, params = _classic_model(seed=5)
    t = _tasks(4, 3, 3, 2, 1)
    lay = R.classic_layout(arch, 3, 1)
    a = update_jacobian_norms(params, arch, lay, t)
    b = update_jacobian_norms(params, arch, lay, t, method="central_diff")
    assert np.max(np.abs(a - b)) <= tolerance(np.float64, "central_diff").rtol * np.max(a)
    # one entry by explicit loops: perturb token 2 feature by feature, difference the layer update
    E = lay.build(t.X, t.Y, t.x_q)
    pre = R.Arch(arch.layers[:2])

    def delta(Ex):
        out, cache = R.model_forward(Ex, params[:2], pre)
        return out - cache.outputs[0]

    J = np.zeros((3, 9, 3))
    for k in range(3):
        Ep, Em = E.copy(), E.copy()
        Ep[:, 2, k] += 1e-6
        Em[:, 2, k] -= 1e-6
        J[:, :, k] = (delta(Ep) - delta(Em))[:, 0, :] / 2e-6
    np.testing.assert_allclose(a[:, 0, 2], np.sqrt(np.sum(J ** 2, axis=(1, 2))), rtol=tolerance(np.float64, "central_diff").rtol)
    maps = attention_maps(params, arch, lay, t)
    np.testing.assert_allclose(maps[0].sum(axis=-1), 1.0, rtol=tolerance(np.float64, "algebra").rtol)   # softmax rows


# ---- meta-tests: the checks can fail ----------------------------------------------------

def test_a_broken_construction_fails_the_exactness_check():
    d, d_y, N, P = 2, 1, 2, 6
    t = _tasks(7, 8, d, N, d_y)
    arch, params = CC.fit_copy_layers(d, N, P, d_y, eta=1.0)
    g = R.gd_predict(t.X, t.Y, t.x_q, 1.0, 1)[0]
    W_PV = params[2].W_PV.copy()
    W_PV[0, -1, d:-2] = 0.0                                            # layer 2 without G: y tokens leak
    broken = (params[0], params[1], R.MergedParams(params[2].W_KQ, W_PV))
    assert np.max(_err(t, arch, broken, d, d_y, g)) > 1e3 * CC.copy_rounding_bound(N, P, d_y)


def test_the_softmax_bound_is_not_vacuous():
    d, d_y, N, P = 2, 1, 2, 6
    t = _tasks(8, 16, d, N, d_y)
    target = R.gd_predict(t.X, t.Y, t.x_q, 1.0, 1)[0] + CC.hard_limit_residual(t.X, t.Y, t.x_q, 1.0)
    arch, params = CC.fit_copy_layers(d, N, P, d_y, eta=1.0, form="softmax", beta=8.0)
    ratio = _err(t, arch, params, d, d_y, target) / CC.softmax_copy_bound(t.X, t.Y, t.x_q, 1.0, P, 8.0)
    assert np.max(ratio) > 0.05                                        # a bound 20x too small would fail
    assert np.max(_err(t, arch, params, d, d_y, target - CC.hard_limit_residual(t.X, t.Y, t.x_q, 1.0))) > 1e-3


def _no_G(pe, dx, dy, eta):
    W = list(SC.exact_weights(pe, dx, dy, eta))
    for c in range(dx, W[3].cols - 2 * dy):
        for k in range(dy):
            W[3][W[3].rows - dy + k, c] = 0
    return tuple(W)


def _no_constant(tok, r, lq):
    v = SC.copy_values(tok, r, lq)
    return v[:4] + [SC.ZeroMatrix(*v[4].shape)]


@pytest.mark.parametrize("tid, kw", [
    ("copy.realise.general", {"realiser": lambda PE, PEc, A: PE.T * A * PEc}),
    ("copy.two_layers.general", {"values1": _no_constant}),
    ("copy.two_layers.explicit", {"weights": _no_G, "sizes": ((2, 1, 1),)}),
    ("bridge.copy", {"blocks": (lambda pe, d, dy, A: tuple(2 * w for w in CC.copy_blocks(pe, d, dy, A)), CC.gd_blocks)}),
])
def test_wrong_statements_are_not_established(tid, kw):
    th = load_all()[tid]
    assert run_theorem(th).established, f"{tid} must hold for the reference's construction"
    res = run_theorem(th, **kw)
    assert res.error is None and not res.established and res.measured > 0


# ---- the training run's plots and the loss-drop step --------------------------------------

def test_a_classic_token_run_draws_the_induction_and_attention_plots(tmp_path):
    from verify import plots, runs

    cfg = TrainConfig(backend="numpy", steps=6, dtype="float64").replace(
        tokens="classic", layers=CLASSIC_LAYERS, d=3, N=2, batch=8, eval_tasks=16, eval_every=3, checkpoint_every=3,
        line_search_tasks=16, gdpp_steps=2, gdpp_batch=8, ood_tasks=4, rollout_steps=2)
    runs.train_run(cfg, str(tmp_path / "c"), analyses=False)
    drawn = {os.path.basename(p) for p in plots.make_plots(str(tmp_path / "c"))}
    assert {"loss.png", "induction.png", "attention.png"} <= drawn
    rows = [r for r in runs.read_metrics(str(tmp_path / "c" / runs.METRICS_FILE))[0] if r.get("kind") == "eval"]
    assert all({"copy_self", "copy_next", "copy_other"} <= set(r) for r in rows)
    # the same through the command line, into another directory; --compare wants sine runs
    from verify import cli

    assert cli.main(["plots", str(tmp_path / "c"), "--out", str(tmp_path / "p")]) == 0
    assert {"induction.png", "attention.png"} <= set(os.listdir(tmp_path / "p"))
    assert cli.main(["plots", str(tmp_path / "c"), "--compare", str(tmp_path / "c")]) == 2
    assert cli.main(["plots", str(tmp_path / "nothing")]) == 2


def test_loss_drop_step_is_halfway_from_the_zero_predictor_to_gd():
    from verify.runs import loss_drop_step

    base = {"zero_loss": 0.42, "gd_loss": 0.21}                       # midpoint 0.315
    hist = [{"step": 0, "loss": 0.9}, {"step": 500, "loss": 0.421}, {"step": 1000, "loss": 0.32},
            {"step": 1500, "loss": 0.315}, {"step": 2000, "loss": 0.22}]
    assert loss_drop_step(hist, base) == 1500                        # not step 500: 0.9 -> 0.42 is the offset
    assert loss_drop_step(hist[:3], base) is None
