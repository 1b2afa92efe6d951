"""Meta-tests: the checkers can fail. A closeness check that accepts a perturbed array,
or a gradient checker that accepts a planted wrong backward, would prove nothing."""

import json
import subprocess
import sys

import numpy as np
import pytest

import reference as R
from reference.layers import lsa as lsa_mod
from reference.gradcheck import check_gradients, lsa_layer_gradcheck, model_gradcheck
from reference.tolerances import allclose_report, assert_close, tolerance


def _layer(rng, H=2, causal=False):
    t = R.sample_tasks(rng, 2, 3, 4, 1)
    p = R.init_lsa_params(rng, 4, H=H, scale=1.0, dtype=np.float64)
    return R.build_tokens(t.X, t.Y, t.x_q), p


@pytest.mark.parametrize("dtype,kind", [(np.float64, "algebra"), (np.float32, "algebra"),
                                        (np.float64, "construction"), (np.float64, "complex_step")])
def test_closeness_rejects_perturbed_array(dtype, kind):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 5)).astype(dtype)
    tol = tolerance(dtype, kind)
    b = a.copy()
    b[2, 3] += 10 * (tol.atol + tol.rtol * np.abs(a).max())
    rep = allclose_report(b, a, kind)
    assert not rep.ok and rep.worst_index == (2, 3)
    with pytest.raises(AssertionError, match=r"\(2, 3\)"):
        assert_close(b, a, kind)
    # and it accepts an error well inside the tolerance
    c = a.copy()
    c[2, 3] += 0.1 * tol.rtol * np.abs(a).max()
    assert allclose_report(c, a, kind).ok


def test_closeness_checks_shape_dtype_and_nan():
    a = np.ones((2, 3))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(a, np.ones((3, 2)), "algebra")
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(a.astype(np.float32), a, "algebra")
    b = a.copy()
    b[0, 0] = np.nan
    assert not allclose_report(b, a, "algebra").ok


def _planted(monkeypatch, mutate):
    """Wrap lsa_backward so its gradients are mutated by ``mutate(dE, dparams)``."""
    real = lsa_mod.lsa_backward

    def wrong(dout, cache):
        dE, g = real(dout, cache)
        return mutate(dE, g)

    # the registered "lsa" layer type calls the module's lsa_backward, so the model
    # backward picks the planted one up through the layer registry
    monkeypatch.setattr(lsa_mod, "lsa_backward", wrong)
    import reference.gradcheck as gc
    monkeypatch.setattr(gc, "lsa_backward", wrong)


PLANTS = {
    "transposed dW_Q": lambda dE, g: (dE, g._replace(W_Q=np.swapaxes(g.W_Q, -1, -2))),
    "sign of dP": lambda dE, g: (dE, g._replace(P=-g.P)),
    "dW_K and dW_V swapped": lambda dE, g: (dE, g._replace(W_K=g.W_V, W_V=g.W_K)),
    "missing residual in dE": lambda dE, g: (dE - dE.mean(), g),
    "dW_V off by a factor": lambda dE, g: (dE, g._replace(W_V=g.W_V * (1 + 1e-6))),
}


@pytest.mark.parametrize("method", ["complex_step", "central_diff"])
@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_gradient_checker_catches_planted_backward(monkeypatch, plant, method):
    if plant == "dW_V off by a factor" and method == "central_diff":
        pytest.skip("a 1e-6 relative error is below central differences' resolution by design; complex step catches it")
    rng = np.random.default_rng(1)
    E, p = _layer(rng)
    # square key/value sizes so a transposed/swapped gradient has the right shape
    assert lsa_layer_gradcheck(E, p, rng, method=method).ok
    _planted(monkeypatch, PLANTS[plant])
    r = lsa_layer_gradcheck(E, p, rng, method=method)
    assert not r.ok, f"planted error '{plant}' was not caught: {r.detail}"


def test_model_gradchecker_catches_planted_backward(monkeypatch):
    rng = np.random.default_rng(2)
    E, p = _layer(rng)
    t_y = rng.standard_normal((2, 1))
    arch = R.lsa_stack(2, recurrent=True)
    assert model_gradcheck(E, t_y, (p,), arch, 3, rng).ok
    _planted(monkeypatch, PLANTS["transposed dW_Q"])
    assert not model_gradcheck(E, t_y, (p,), arch, 3, rng).ok


def test_gradient_checker_rejects_vacuous_all_zero_check():
    f = lambda args: np.sum(args[0] * 0.0)  # noqa: E731
    x = np.ones((2, 2))
    r = check_gradients(f, [x], [np.zeros((2, 2))], np.random.default_rng(0))
    assert not r.ok and "vacuous" in r.detail


def test_gradient_checker_flags_non_finite():
    f = lambda args: np.sum(args[0]) * np.inf  # noqa: E731
    r = check_gradients(f, [np.ones(3)], [np.ones(3)], np.random.default_rng(0))
    assert not r.ok


def test_verify_exits_nonzero_on_a_failing_claim(tmp_path):
    """A planted failing claim makes `python -m verify` exit 1 and report passed=false."""
    plugin = tmp_path / "plant.py"
    plugin.write_text(
        "from verify.registry import claim, Outcome\n"
        "@claim('planted.fails', statement='s', source='test', method='m')\n"
        "def _(ctx): return Outcome.at_most(1.0, 0.5, 'planted')\n"
        "@claim('planted.raises', statement='s', source='test', method='m')\n"
        "def _(ctx): raise RuntimeError('boom')\n"
        "@claim('planted.nan', statement='s', source='test', method='m')\n"
        "def _(ctx): return Outcome.at_most(float('nan'), 1.0, 'planted')\n"
        "@claim('planted.passes', statement='s', source='test', method='m')\n"
        "def _(ctx): return Outcome.at_least(2.0, 1.0, 'planted')\n")
    out = tmp_path / "r.json"
    code = ("import sys; sys.path.insert(0, %r); import plant; from verify.runner import main; "
            "sys.exit(main(['--only', 'planted', '--json', %r]))" % (str(tmp_path), str(out)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    verdicts = {c["id"]: c["passed"] for c in rep["claims"]}
    assert verdicts == {"planted.fails": False, "planted.raises": False, "planted.nan": False, "planted.passes": True}
    assert "FAIL  planted.raises" in proc.stdout and "boom" in proc.stdout
