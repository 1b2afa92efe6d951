"""Example-based tests of the reference conventions, with expected values worked out
by hand (not computed by the code under test)."""

import json
import subprocess
import sys

import numpy as np
import pytest

import reference as R
from reference.optim import AdamHP, adam_init, adam_update, clip_by_global_norm, global_norm
from reference.tolerances import assert_close


def test_token_layout_and_readout_sign():
    X = np.array([[[1.0, 2.0], [3.0, 4.0]]])            # B=1, N=2, d=2
    Y = np.array([[[5.0], [6.0]]])
    x_q = np.array([[7.0, 8.0]])
    E = R.build_tokens(X, Y, x_q)
    np.testing.assert_array_equal(E[0], [[1, 2, 5], [3, 4, 6], [7, 8, 0]])
    E0 = R.build_tokens(X, Y, x_q, W_0=np.array([[1.0, -1.0]]))
    assert E0[0, 2, 2] == -(7 - 8)                      # query y-slot = -W_0 x_q = 1
    assert R.readout(E0, 2)[0, 0] == -1.0               # prediction = minus the y-slot


def test_one_gd_step_by_hand():
    """d = 1, N = 2: x = (1, 2), y = (2, 4) (W* = 2), eta = 1, W_0 = 0.
    grad = (1/N) sum (0 - y_i) x_i = -(2 + 8)/2 = -5, so W_1 = 5 and y_hat(x_q = 3) = 15."""
    X = np.array([[[1.0], [2.0]]])
    Y = np.array([[[2.0], [4.0]]])
    x_q = np.array([[3.0]])
    out, _ = R.lsa_forward(R.build_tokens(X, Y, x_q), R.gd_layer(1, 1, 2, 1.0))
    assert R.readout(out, 1)[0, 0] == pytest.approx(15.0, rel=1e-15)
    np.testing.assert_allclose(out[0, :2, 1], [2 - 5 * 1, 4 - 5 * 2])   # residuals y_i - W_1 x_i
    pred, W = R.gd_predict(X, Y, x_q, 1.0)
    assert pred[0, 0] == pytest.approx(15.0) and W[0, 0, 0] == pytest.approx(5.0)


def test_gdpp_by_hand():
    """d = 1, N = 1, x = 2: C = 4; gamma = 0.1 sends x -> (1 - 0.4) x."""
    X, Y, x_q = np.array([[[2.0]]]), np.array([[[1.0]]]), np.array([[1.0]])
    out, _ = R.lsa_forward(R.build_tokens(X, Y, x_q), R.gdpp_layer(1, 1, 1, 0.5, 0.1))
    np.testing.assert_allclose(out[0, :, 0], [2 * 0.6, 1 * 0.6])
    # y-slot of the query: 0 + (eta/N) * (W_0 x - y) ... = 0.5 * (0 - 1) * (2 * 1) = -1 -> prediction 1
    assert R.readout(out, 1)[0, 0] == pytest.approx(1.0)


def test_loss_units():
    pred = np.array([[1.0, 0.0], [0.0, 0.0]])
    y = np.array([[0.0, 0.0], [0.0, 2.0]])
    L, c = R.loss_forward(pred, y)
    assert float(L) == pytest.approx(0.5 * (1 + 4) / 2)       # 0.5 * mean over tasks of summed squares
    np.testing.assert_allclose(R.loss_backward(c), (pred - y) / 2)


def test_closed_form_eta_paper_defaults():
    """m2 = 1/12, m4 = 1/80 for U(-0.5, 0.5); d = N = 10:
    E tr(A^2) = (10/80 + 90/144)/10 + 0.9 * 10/144 = 0.1375, eta* = (10/12)/0.1375,
    L* = (1/24) (10 - (10/12)^2 / 0.1375)."""
    m2, m4 = R.uniform_moments((-0.5, 0.5))
    assert (m2, m4) == pytest.approx((1 / 12, 1 / 80))
    eta, L = R.optimal_one_step_eta(10, 10, m2, m4)
    assert eta == pytest.approx((10 / 12) / 0.1375, rel=1e-12)
    assert L == pytest.approx((10 - (10 / 12) ** 2 / 0.1375) / 24, rel=1e-12)
    assert R.expected_one_step_loss(eta, 10, 10, m2, m4) == pytest.approx(L)
    assert R.expected_one_step_loss(eta * 1.1, 10, 10, m2, m4) > L


def test_least_squares_recovers_noiseless_teacher():
    rng = np.random.default_rng(0)
    t = R.sample_tasks(rng, 5, 4, 9, 2)
    assert_close(R.least_squares_predict(t.X, t.Y, t.x_q), t.y_q, "construction")
    ridge = R.least_squares_predict(t.X, t.Y, t.x_q, ridge=1e3)
    assert np.abs(ridge).max() < np.abs(t.y_q).max()           # heavy ridge shrinks towards 0


def test_sampler_is_seeded_and_matches_its_distribution():
    a = R.sample_tasks(np.random.default_rng(5), 4, 3, 6, dtype=np.float32)
    b = R.sample_tasks(np.random.default_rng(5), 4, 3, 6, dtype=np.float32)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
        assert u.dtype == np.float32
    t = R.sample_tasks(np.random.default_rng(1), 20000, 2, 5)
    assert -0.5 <= t.X.min() and t.X.max() <= 0.5
    assert t.X.var() == pytest.approx(1 / 12, rel=0.02)
    assert t.W.var() == pytest.approx(1.0, rel=0.02)
    np.testing.assert_allclose(t.Y[..., 0], np.einsum("bj,bnj->bn", t.W[:, 0], t.X), rtol=1e-12)
    t = R.sample_tasks(np.random.default_rng(1), 3, 2, 5, n_distractors=2, noise_std=0.1)
    assert not np.allclose(t.Y[:, 2:, 0], np.einsum("bj,bnj->bn", t.W[:, 0], t.X[:, 2:]))


def test_step_rng_is_a_pure_function_of_seed_and_step():
    assert R.step_rng(3, 7).random() == R.step_rng(3, 7).random()
    assert R.step_rng(3, 7).random() != R.step_rng(3, 8).random()


def test_adam_step_by_hand():
    """One Adam step from zero moments moves each parameter by -lr * sign(g) (up to eps)."""
    p = (R.MergedParams(np.array([[[1.0]]]), np.array([[[2.0]]])),)
    g = (R.MergedParams(np.array([[[3.0]]]), np.array([[[-4.0]]])),)
    hp = AdamHP(lr=0.1)
    new, st, norm = adam_update(p, g, adam_init(p), hp)
    assert norm == pytest.approx(5.0)
    assert new[0].W_KQ[0, 0, 0] == pytest.approx(0.9, abs=1e-8)
    assert new[0].W_PV[0, 0, 0] == pytest.approx(2.1, abs=1e-8)
    assert st.t == 1 and st.m[0].W_KQ[0, 0, 0] == pytest.approx(0.3)
    assert st.v[0].W_PV[0, 0, 0] == pytest.approx(0.02 * 16)
    clipped, n = clip_by_global_norm(g, 1.0)
    assert n == pytest.approx(5.0) and global_norm(clipped) == pytest.approx(1.0)
    assert clipped[0].W_KQ[0, 0, 0] == pytest.approx(0.6)


def test_dtype_preserved_through_model_and_step():
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        t = R.sample_tasks(rng, 3, 2, 4, dtype=dt)
        p = (R.init_lsa_params(rng, 3, H=2, dtype=dt),)
        L, g, aux = R.loss_and_grads(R.build_tokens(t.X, t.Y, t.x_q), t.y_q, p, R.lsa_stack(2, recurrent=True),
                                     R.TokenLayout(2, 1))
        assert np.asarray(L).dtype == dt and aux["dE"].dtype == dt
        assert all(a.dtype == dt for a in g[0])
        from reference.train_step import train_step
        r = train_step(p, adam_init(p), t, R.lsa_stack(2, recurrent=True), AdamHP(clip_norm=1e-3))
        assert all(a.dtype == dt for a in r.params[0]) and all(a.dtype == dt for a in r.state.m[0])


def test_an_int_layout_is_the_regression_layout():
    """loss_and_grads / predict take a TokenLayout; an int d means TokenLayout(d, D - d)."""
    rng = np.random.default_rng(1)
    t = R.sample_tasks(rng, 3, 2, 4, 2)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    p = (R.init_lsa_params(rng, 4, H=2, scale=1.0, dtype=np.float64),)
    arch = R.lsa_stack(2, recurrent=True)
    L1, g1, aux1 = R.loss_and_grads(E, t.y_q, p, arch, R.TokenLayout(2, 2))
    L2, g2, aux2 = R.loss_and_grads(E, t.y_q, p, arch, 2)
    assert L1 == L2
    for a, b in zip([*aux1.values(), *g1[0]], [*aux2.values(), *g2[0]]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(R.predict(E, p, arch, R.TokenLayout(2, 2)), aux1["pred"])


def test_clip_gradient_passes_inside_only():
    E = np.array([[[0.5, 2.0], [0.1, -3.0]]])
    p = R.MergedParams(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    out, cache = R.lsa_forward(E, p, clip=1.0)
    np.testing.assert_array_equal(out, [[[0.5, 1.0], [0.1, -1.0]]])
    dE, _ = R.lsa_backward(np.ones_like(E), cache)
    np.testing.assert_array_equal(dE, [[[1, 0], [1, 0]]])


def test_verify_json_interface(tmp_path):
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    proc = subprocess.run([sys.executable, "-m", "verify", "--only", "prop1.*,klayer.*", "--json", str(out),
                           "--markdown", str(md)], capture_output=True, text=True)
    rep = json.loads(out.read_text())
    assert {"version", "machine", "claims", "mode"} <= set(rep)
    ids = [c["id"] for c in rep["claims"] if not c["id"].startswith("import:")]
    assert ids == ["klayer.k_steps.float64", "prop1.notebook_sanity", "prop1.one_step.float64"]
    for c in rep["claims"]:
        assert {"id", "statement", "source", "measured", "tolerance", "passed"} <= set(c)
        assert isinstance(c["passed"], bool)
    assert proc.returncode == (0 if all(c["passed"] for c in rep["claims"]) else 1)
    assert "| prop1.one_step.float64 | pass |" in md.read_text()
