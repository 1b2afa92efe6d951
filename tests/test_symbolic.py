"""Tests of the symbolic proofs: every theorem is established, and every kind of proof
reports a deliberately wrong statement (a wrong sign in W_V, a transposed gradient, a
wrong eta*, ...) as NOT established. A checker that cannot fail proves nothing."""

import json

import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

import reference as R
from reference.layers.lsa import MergedParams
from symbolic import algebra as A
from symbolic import bridge, cli, core, gdpp, gradients, prop1, step_size
from symbolic.core import Proof, Theorem, load_all, run_theorem

THEOREMS = load_all()


def _param(th):
    return pytest.param(th.id, id=th.id, marks=[pytest.mark.slow] if th.slow else [])


# --- every theorem is established --------------------------------------------------------

@pytest.mark.parametrize("tid", [_param(t) for t in THEOREMS.values()])
def test_theorem_is_established(tid):
    res = run_theorem(THEOREMS[tid])
    assert res.error is None, res.traceback
    bad = [(s.label, s.where, s.witness) for s in res.steps if not s.holds]
    assert res.established, bad
    assert res.steps and all(s.checked > 0 for s in res.steps)
    if res.kind == "exact":
        assert res.measured == 0
    else:
        assert res.measured <= res.tolerance


def test_every_required_statement_is_present():
    want = {"prop1.general", "prop1.explicit", "klayers.step.general", "klayers.k23.general", "klayers.explicit",
            "gdpp.general", "gdpp.explicit", "gdpp.eigen.general", "gdpp.eigen.explicit",
            "gradients.merged.explicit", "step_size.optimum.general", "step_size.moment.explicit",
            "bridge.prop1", "bridge.klayers", "bridge.gdpp", "bridge.eigen", "bridge.gradients", "bridge.step_size"}
    assert want <= set(THEOREMS)


# --- wrong statements are NOT established ---------------------------------------------------

def _not_established(tid, **inject):
    res = run_theorem(THEOREMS[tid], **inject)
    assert res.error is None, res.traceback
    assert not res.established
    assert res.measured > res.tolerance
    assert any(not s.holds and s.witness for s in res.steps)
    return res


def _gd_wrong_sign_WV(dx, dy, n, step, W_0):
    W_Q, W_K, W_V, P = A.gd_weights(dx, dy, n, step, W_0)
    return W_Q, W_K, -W_V, P


def _gd_W0_dropped(dx, dy, n, step, W_0):
    """W_V = [[0, 0], [0, -I]]: right only when W_0 = 0."""
    zero = sp.zeros(dy, dx) if isinstance(dx, int) else sp.ZeroMatrix(dy, dx)
    return A.gd_weights(dx, dy, n, step, zero)[:2] + (A.gd_weights(dx, dy, n, step, zero)[2],
                                                      A.gd_weights(dx, dy, n, step, W_0)[3])


def _gd_P_without_1_over_N(dx, dy, n, step, W_0):
    return A.gd_weights(dx, dy, n, step * n, W_0)


@pytest.mark.parametrize("tid", ["prop1.general", "prop1.explicit", "klayers.step.general", "klayers.k23.general"])
def test_wrong_sign_in_W_V_is_not_established(tid):
    res = _not_established(tid, weights=_gd_wrong_sign_WV)
    # the step that does not involve the weights still holds: the failure is located
    if tid == "prop1.general":
        assert any(s.holds for s in res.steps) and any(not s.holds for s in res.steps)


def test_missing_1_over_N_is_not_established():
    _not_established("prop1.explicit", weights=_gd_P_without_1_over_N)


def test_W_0_dropped_from_W_V_breaks_the_induction_step():
    _not_established("klayers.step.general", weights=_gd_W0_dropped)


def test_klayers_explicit_detects_wrong_weights():
    _not_established("klayers.explicit", weights=_gd_wrong_sign_WV, sizes=((1, 1, 2, 2),))


def _gdpp_plus_gamma(dx, dy, n, step, W_0, curv=A.gamma):
    return A.gdpp_weights(dx, dy, n, step, W_0, -curv)


@pytest.mark.parametrize("tid", ["gdpp.general", "gdpp.explicit"])
def test_gdpp_wrong_sign_of_gamma_is_not_established(tid):
    _not_established(tid, weights=_gdpp_plus_gamma)


@pytest.mark.parametrize("tid", ["gdpp.eigen.general", "gdpp.eigen.explicit"])
def test_wrong_eigenvalue_map_is_not_established(tid):
    kw = {"sizes": (2,)} if tid.endswith("explicit") else {}
    _not_established(tid, claimed=lambda l, g: l * (1 - g * l), **kw)


def test_wrong_data_transform_is_not_established():
    _not_established("gdpp.eigen.general", transform=lambda X, g: gdpp.gdpp_transform(X, -g))


def test_eigen_rewrite_refuses_a_term_it_cannot_reduce():
    d = A.d
    C, u, B = sp.MatrixSymbol("C", d, d), sp.MatrixSymbol("u", d, 1), sp.MatrixSymbol("B", d, d)
    with pytest.raises(ValueError):
        gdpp.eigen_coefficient(B * C * u, C, u)


def _transposed_dW_KQ(dout, cache):
    dE, g = R.lsa_backward(dout, cache)
    return dE, MergedParams(np.swapaxes(g.W_KQ, -1, -2), g.W_PV)


def _no_residual_path(dout, cache):
    """A planted bug: dE without the residual connection's identity term."""
    dE, g = R.lsa_backward(dout, cache)
    return dE - dout, g


def test_transposed_gradient_is_not_established():
    res = _not_established("gradients.merged.explicit", backward=_transposed_dW_KQ, sizes=gradients.MERGED_SIZES[:1])
    failing = {s.label for s in res.steps if not s.holds}
    assert all("dW_KQ" in lab for lab in failing)


def test_missing_residual_gradient_is_not_established():
    res = _not_established("gradients.factored.explicit",
                           backward=lambda dout, cache: (R.lsa_backward(dout, cache)[0] - dout,
                                                         R.lsa_backward(dout, cache)[1]))
    assert {s.label.split()[0] for s in res.steps if not s.holds} == {"dE"}


@pytest.mark.slow
def test_stack_backward_that_does_not_sum_shared_gradients_is_not_established():
    def last_application_only(dout, mcache):
        grads, dh = None, dout
        for k in reversed(range(mcache.arch.n_layers)):
            dh, g = R.lsa_backward(dh, mcache.layer_caches[k])
            grads = g if grads is None else grads      # planted bug: overwrite instead of sum
        return dh, (grads,)

    _not_established("gradients.stack.explicit", backward=last_application_only, sizes=gradients.STACK_SIZES[1:2])


def test_wrong_optimal_eta_is_not_established():
    _not_established("step_size.optimum.general", eta_star=lambda a, b, c: 2 * b / a)
    _not_established("step_size.optimum.general", eta_star=lambda a, b, c: a / b)


def test_wrong_optimal_loss_is_not_established():
    _not_established("step_size.optimum.general", loss_star=lambda a, b, c, dy: dy * (c - b ** 2 / a))


def test_wrong_moment_formula_is_not_established():
    # drop the off-diagonal d(d-1) m2^2 term: wrong for d >= 2
    _not_established("step_size.moment.explicit",
                     formula=lambda d, N, m2=step_size.m2, m4=step_size.m4: d * m4 / N + (N - 1) / sp.S(N) * d * m2 ** 2,
                     sizes=((2, 2),))


def test_wrong_expected_loss_is_not_established():
    def loss_without_noise_term(e, d, N, d_y):
        return step_size.expected_loss_formula(e, d, N, d_y).subs(step_size.n2, 0)

    _not_established("step_size.expected_loss.explicit", loss=loss_without_noise_term, sizes=((1, 1, 1),))


# the bridges fail when the reference side is wrong

def test_bridge_detects_a_wrong_reference_layer():
    _not_established("bridge.prop1", layer=lambda d, dy, N, eta, W_0: R.gd_layer(d, dy, N, eta * (1 + 1e-9), W_0))


def test_bridge_detects_a_wrong_stack():
    def stack(K, d, dy, N, eta, W_0, recurrent=True):
        return R.gd_stack(K - 1, d, dy, N, eta, W_0, recurrent=recurrent)

    _not_established("bridge.klayers", stack=stack)


def test_bridge_detects_a_wrong_gdpp_layer():
    _not_established("bridge.gdpp", layer=lambda d, dy, N, e, g, W_0=None: R.gdpp_layer(d, dy, N, e, -g, W_0))


@pytest.mark.slow
def test_bridge_detects_a_wrong_gradient():
    def transposed(E, y_q, params, arch, layout):
        L, g, aux = R.loss_and_grads(E, y_q, params, arch, layout)
        g = tuple(type(p)(np.swapaxes(p[0], -1, -2), *p[1:]) for p in g)
        return L, g, aux

    _not_established("bridge.gradients", loss_and_grads=transposed)


def test_bridge_detects_a_wrong_step_size():
    _not_established("bridge.step_size",
                     optimal=lambda *a, **k: (R.optimal_one_step_eta(*a, **k)[0] * 1.001, R.optimal_one_step_eta(*a, **k)[1]))


def test_bridge_eigen_detects_a_wrong_curvature():
    _not_established("bridge.eigen", layer=lambda d, dy, N, e, g, W_0=None: R.gdpp_layer(d, dy, N, e, 1.01 * g, W_0))


# --- the proof machinery itself ---------------------------------------------------------------

def test_a_proof_without_steps_is_not_established():
    assert not Proof().established
    th = Theorem("zz.empty", "nothing", "none", "test", lambda: Proof())
    res = run_theorem(th)
    assert not res.established and res.measured == float("inf")


def test_a_raising_proof_is_failed_with_its_error():
    def boom():
        raise ZeroDivisionError("planted")

    res = run_theorem(Theorem("zz.raises", "raises", "none", "test", boom))
    assert not res.established and "planted" in res.error and res.measured == float("inf")


def test_residual_deciders_reject_nonzero_residuals():
    X = sp.MatrixSymbol("X", A.N, A.d)
    assert core.matexpr_is_zero(X.T * X - (X.T * X).T)
    assert not core.matexpr_is_zero(X.T * X - 2 * X.T * X)
    x, y = sp.symbols("x y")
    pf = Proof()
    assert pf.entries_zero("true", (x + y) ** 2, x ** 2 + 2 * x * y + y ** 2, "test")
    assert not pf.entries_zero("false", (x + y) ** 2, x ** 2 + y ** 2, "test")
    assert not pf.close("far", [1.0, 2.0], [1.0, 2.0 + 1e-9], "test")
    assert pf.close("near", [1.0, 2.0], [1.0, 2.0 + 1e-15], "test")
    assert [s.holds for s in pf.steps] == [True, False, False, True]
    assert not pf.established


def test_polys_zero_decides_in_the_ring():
    Rg, a, b = sp.ring("a b", sp.QQ)
    pf = Proof()
    assert pf.polys_zero("true", [(a + b) ** 2], [a ** 2 + 2 * a * b + b ** 2], "test")
    assert not pf.polys_zero("false", [(a + b) ** 2], [a ** 2 + b ** 2], "test")


def test_exact_evaluation_of_ring_polynomials():
    Rg, a, b = sp.ring("a b", sp.QQ)
    p = (a - b) ** 30
    assert bridge.eval_poly(p, [1.5, 1.5]) == 0.0        # exact cancellation of 31 large terms
    assert bridge.eval_poly(Rg(0), [1.0, 2.0]) == 0.0


@given(dx=st.integers(1, 4), dy=st.integers(1, 3), n=st.integers(1, 6), seed=st.integers(0, 2 ** 32 - 1))
def test_general_prop1_expression_matches_reference_at_any_size(dx, dy, n, seed):
    """Property: the block-collapsed general-dimension layer output, substituted at any
    drawn size, equals the reference layer."""
    rng = np.random.default_rng(seed)
    X, Y, X_q, _, W_0 = prop1.general_data()
    f = bridge.lambdify_at(bridge.gd_composed(1), (X, Y, X_q, W_0, A.eta), {A.d: dx, A.d_y: dy, A.N: n, A.M: 1})
    t = R.sample_tasks(rng, 1, dx, n, dy)
    W0 = rng.standard_normal((dy, dx))
    eta = float(rng.uniform(0.1, 3.0))
    b = f(t.X[0], t.Y[0], t.x_q, W0, eta)
    ref, _ = R.lsa_forward(R.build_tokens(t.X, t.Y, t.x_q, W_0=W0), R.gd_layer(dx, dy, n, eta, W0))
    from reference.tolerances import assert_close
    assert_close(np.block([[b[0], b[1]], [b[2], b[3]]]), ref[0], "algebra", what="symbolic vs reference layer")


# --- the command line and the verify claims ---------------------------------------------------

def test_cli_reports_each_theorem_and_writes_json(tmp_path, capsys):
    out = tmp_path / "prove.json"
    rc = cli.main(["--only", "prop1.general,symbolic.step_size.optimum*", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "PROVED  prop1.general" in text and "hypotheses:" in text and "established by:" in text
    assert "blockwise residual expanded to ZeroMatrix" in text and "2 established, 0 failed" in text
    rep = json.loads(out.read_text())
    assert rep["n_failed"] == 0 and [t["id"] for t in rep["theorems"]] == ["prop1.general", "step_size.optimum.general"]
    assert all(t["established"] and t["steps"] and t["seconds"] >= 0 for t in rep["theorems"])


def test_cli_fails_loudly_on_a_failing_theorem(monkeypatch, capsys):
    def wrong():
        pf = Proof()
        pf.entries_zero("1 + 1 = 3", sp.Integer(1) + 1, 3, "integers")
        return pf

    monkeypatch.setitem(core.THEOREMS, "zz.wrong", Theorem("zz.wrong", "1 + 1 = 3", "integers", "test", wrong))
    assert cli.main(["--only", "zz.wrong"]) == 1
    text = capsys.readouterr().out
    assert "FAILED  zz.wrong" in text and "NOT ESTABLISHED" in text and "0 established, 1 failed" in text


def test_cli_no_match_and_list(capsys):
    assert cli.main(["--only", "no-such-theorem"]) == 2
    assert cli.main(["--list"]) == 0
    assert "prop1.general" in capsys.readouterr().out


def test_icgd_prove_subcommand(capsys):
    from verify.cli import main

    assert main(["prove", "--only", "klayers.step", "--brief"]) == 0
    assert "PROVED  klayers.step.general" in capsys.readouterr().out


def test_symbolic_claims_are_registered_and_pass():
    from verify import registry

    claims = registry.discover()
    ids = {f"symbolic.{t}" for t in THEOREMS}
    assert ids <= set(claims)
    row = registry.run_claim(claims["symbolic.prop1.general"], registry.Context())
    assert row["passed"] and row["measured"] == 0 and row["tolerance"] == 0


def test_a_failing_theorem_is_a_failing_claim(monkeypatch):
    from verify import claims_symbolic, registry

    def wrong():
        pf = Proof()
        pf.entries_zero("x = x + 1", sp.Symbol("x"), sp.Symbol("x") + 1, "scalar")
        return pf

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    claims_symbolic._register(Theorem("zz.wrong", "x = x + 1", "scalar", "test", wrong))
    row = registry.run_claim(registry._REGISTRY["symbolic.zz.wrong"], registry.Context())
    assert not row["passed"] and row["measured"] == 1
