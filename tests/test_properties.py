"""Hypothesis properties of the reference LSA layer, model and constructions, across
random d, d_y, N, K, H, eta and dtype."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import reference as R
from reference.oracle import oracle_gd, oracle_lsa_layer, oracle_model
from reference.tolerances import assert_close

from strategies import etas, gammas, layer_case, layers, regression


@given(regression(), etas, st.booleans())
def test_construction_is_one_gd_step(case, eta, use_w0):
    dm, t, rng = case
    d, d_y, N = dm["d"], dm["d_y"], dm["N"]
    W_0 = rng.standard_normal((d_y, d)).astype(t.X.dtype) if use_w0 else None
    E = R.build_tokens(t.X, t.Y, t.x_q, W_0=W_0)
    out, _ = R.lsa_forward(E, R.gd_layer(d, d_y, N, eta, W_0, dtype=t.X.dtype))
    t64 = R.Tasks(*(a.astype(np.float64) for a in t))
    W64 = None if W_0 is None else W_0.astype(np.float64)
    expected = oracle_gd(t64.X, t64.Y, t64.x_q, eta, 1, W64)
    assert_close(dm["layout"].readout(out).astype(np.float64), expected, "construction", dtype=t.X.dtype)


@given(regression(np.float64), etas, layers, st.booleans())
def test_k_layers_are_k_gd_steps(case, eta, K, recurrent):
    dm, t, _ = case
    params, arch = R.gd_stack(K, dm["d"], dm["d_y"], dm["N"], eta / 2, recurrent=recurrent)
    pred = R.predict(dm["layout"].build(t.X, t.Y, t.x_q), params, arch, dm["layout"])
    assert_close(pred, oracle_gd(t.X, t.Y, t.x_q, eta / 2, K), "construction")


@given(regression(np.float64), st.lists(st.tuples(etas, gammas), min_size=1, max_size=3))
def test_gdpp_construction_matches_recursion(case, eg):
    dm, t, _ = case
    e, g = zip(*eg)
    params, arch = R.gdpp_stack(dm["d"], dm["d_y"], dm["N"], e, g)
    pred = R.predict(dm["layout"].build(t.X, t.Y, t.x_q), params, arch, dm["layout"])
    assert_close(pred, R.gdpp_predict(t.X, t.Y, t.x_q, e, g), "construction")


@given(layer_case())
def test_layer_matches_loop_oracle(case):
    E, p, causal = case
    out, _ = R.lsa_forward(E, p, causal=causal)
    assert out.dtype == E.dtype
    assert_close(out, oracle_lsa_layer(E, p, causal), "algebra")


@given(layer_case(np.float64))
def test_batch_equals_single_calls(case):
    E, p, causal = case
    out, _ = R.lsa_forward(E, p, causal=causal)
    for b in range(E.shape[0]):
        single, _ = R.lsa_forward(E[b:b + 1], p, causal=causal)
        assert_close(single[0], out[b], "algebra")


@given(layer_case(np.float64, merged=False), st.integers(0, 2**31))
def test_context_permutation(case, seed):
    """Context-only: permuting context tokens leaves the query output unchanged and
    permutes the context outputs the same way."""
    E, p, _ = case
    N = E.shape[1] - 1
    perm = np.random.default_rng(seed).permutation(N)
    Ep = E.copy()
    Ep[:, :N] = E[:, perm]
    out, _ = R.lsa_forward(E, p)
    outp, _ = R.lsa_forward(Ep, p)
    assert_close(outp[:, N], out[:, N], "algebra")
    assert_close(outp[:, :N], out[:, perm], "algebra")


@given(layer_case(np.float64, merged=False), st.sampled_from(["W_Q", "W_K", "W_V", "P"]),
       st.floats(-2, 2), st.floats(-2, 2), st.integers(0, 2**31))
def test_update_is_linear_in_each_parameter(case, name, a, b, seed):
    E, p, causal = case
    other = np.random.default_rng(seed).standard_normal(getattr(p, name).shape)

    def delta(W):
        out, _ = R.lsa_forward(E, p._replace(**{name: W}), causal=causal)
        return out - E

    lhs = delta(a * getattr(p, name) + b * other)
    rhs = a * delta(getattr(p, name)) + b * delta(other)
    assert_close(lhs, rhs, "algebra")


@given(layer_case(merged=False), st.booleans())
def test_zero_projection_is_identity(case, clip):
    E, p, causal = case
    p0 = p._replace(P=np.zeros_like(p.P))
    c = 0.25 if clip else None
    out, _ = R.lsa_forward(E, p0, causal=causal, clip=c)
    expected = E if c is None else np.clip(E, -c, c)
    np.testing.assert_array_equal(out, expected)


@given(layer_case(np.float64, merged=False))
def test_merged_equals_factored(case):
    E, p, causal = case
    out, _ = R.lsa_forward(E, p, causal=causal)
    outm, _ = R.lsa_forward(E, R.to_merged(p), causal=causal)
    assert_close(outm, out, "algebra")


@given(layer_case(np.float64), st.integers(0, 8))
def test_causal_output_ignores_future_tokens(case, j):
    E, p, _ = case
    T = E.shape[1]
    j = j % T
    out, _ = R.lsa_forward(E, p, causal=True)
    E2 = E.copy()
    E2[:, j + 1:] += 1.0
    out2, _ = R.lsa_forward(E2, p, causal=True)
    assert_close(out2[:, : j + 1], out[:, : j + 1], "algebra")


@given(regression(np.float64), layers, st.integers(0, 2**31))
def test_recurrent_equals_separate_copies_and_oracle(case, K, seed):
    dm, t, _ = case
    D = dm["d"] + dm["d_y"]
    p = R.init_lsa_params(np.random.default_rng(seed), D, H=2, scale=1.0, dtype=np.float64)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    rec, _ = R.model_forward(E, (p,), R.lsa_stack(K, recurrent=True, clip=1.0))
    sep, _ = R.model_forward(E, (p,) * K, R.lsa_stack(K, recurrent=False, clip=1.0))
    np.testing.assert_array_equal(rec, sep)
    assert_close(rec, oracle_model(E, (p,), R.lsa_stack(K, recurrent=True, clip=1.0)), "algebra")


@given(layer_case(np.float64), st.integers(0, 2**31))
def test_layer_backward_complex_step(case, seed):
    from reference.gradcheck import lsa_layer_gradcheck

    E, p, causal = case
    r = lsa_layer_gradcheck(E, p, np.random.default_rng(seed), causal=causal)
    assert r.ok, r.detail


@given(regression(np.float64), layers, st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_recurrent_gradient_is_sum_over_applications(case, K, causal, merged, seed):
    """Gradient of a recurrent stack = sum of the separate-copies stack's layer gradients."""
    dm, t, _ = case
    D = dm["d"] + dm["d_y"]
    p = R.init_lsa_params(np.random.default_rng(seed), D, scale=1.0, dtype=np.float64, merged=merged)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    _, g_rec, _ = R.loss_and_grads(E, t.y_q, (p,), R.lsa_stack(K, recurrent=True, causal=causal), dm["layout"])
    _, g_sep, _ = R.loss_and_grads(E, t.y_q, (p,) * K, R.lsa_stack(K, causal=causal), dm["layout"])
    for n, name in enumerate(p._fields):
        assert_close(g_rec[0][n], sum(g[n] for g in g_sep), "algebra", what=name)
