"""The mesa layer and the delta rule (reference/layers/mesa.py, delta.py): properties over
dimensions, heads and T (Hypothesis), gradients against complex step, the guards, bad input
refused before any work, cache sizes, and meta-tests showing the checkers and proofs fail
on planted mistakes. The generic suites (test_conformance.py, ...) cover them too."""

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference._checks import NonFiniteError
from reference.gradcheck import check_gradients
from reference.layers import InitSettings, LayerSpec
from reference.layers import delta as delta_mod
from reference.layers import mesa as mesa_mod
from reference.layers.delta import DeltaFixedParams, DeltaParams, delta_backward, delta_forward
from reference.layers.mesa import MesaParams, mesa_backward, mesa_forward
from reference.model import Arch, model_forward
from reference.oracle import oracle_delta_layer, oracle_mesa_layer
from reference.tolerances import assert_close
from symbolic import load_all, run_theorem
from symbolic import mesa as S

FEW = settings(max_examples=8, deadline=None)


def _mesa(D, H, Kd, Vd, T, seed, lam=None, B=2):
    rng = np.random.default_rng(seed)
    p = LayerSpec("mesa", (("heads", H), ("key_size", Kd), ("value_size", Vd))).init(
        rng, D, InitSettings(scale=1.0, dtype=np.float64))
    p = p._replace(lam=rng.uniform(0.2, 3.0, H) if lam is None else np.full(H, lam))
    return rng.uniform(-1, 1, (B, T, D)), p


def _delta(D, H, Kd, Vd, T, seed, beta=None, gate=False):
    rng = np.random.default_rng(seed)
    opts = (("heads", H), ("key_size", Kd), ("value_size", Vd), ("beta", beta), ("gate", gate))
    p = LayerSpec("delta", opts).init(rng, D, InitSettings(scale=1.0, dtype=np.float64))
    return rng.uniform(-1, 1, (2, T, D)), p


dims = st.tuples(st.integers(2, 5), st.integers(1, 2), st.integers(1, 4), st.integers(1, 3), st.integers(1, 7),
                 st.integers(0, 2 ** 16))


# ---- properties ------------------------------------------------------------------------------

@FEW
@given(dims, st.sampled_from([None, 0.9, 0.6]))
def test_mesa_forms_agree_with_the_oracle(dim, forget):
    D, H, Kd, Vd, T, seed = dim
    E, p = _mesa(D, H, min(Kd, D), Vd, T, seed)
    want = oracle_mesa_layer(E, p, forget=forget)
    for form in ("sm", "direct", "cg"):
        assert_close(mesa_forward(E, p, forget=forget, form=form)[0], want, "algebra", what=f"form {form}")


@FEW
@given(dims, st.sampled_from([None, 0.4]), st.booleans(), st.integers(1, 5))
def test_delta_chunked_equals_recurrent_and_the_oracle(dim, beta, gate, chunk):
    D, H, Kd, Vd, T, seed = dim
    E, p = _delta(D, H, Kd, Vd, T, seed, beta, gate)
    rec = delta_forward(E, p, beta=beta, gate=gate)[0]
    assert_close(rec, oracle_delta_layer(E, p, beta=beta), "algebra", what="recurrent vs oracle")
    assert_close(delta_forward(E, p, beta=beta, gate=gate, form="chunked", chunk=chunk)[0], rec, "algebra",
                 what="chunked vs recurrent")


@FEW
@given(dims)
def test_a_batch_is_its_tasks_and_the_layer_is_causal(dim):
    """Token t depends on tokens <= t only; B tasks = B single calls."""
    D, H, Kd, Vd, T, seed = dim
    for kind, (E, p) in (("mesa", _mesa(D, H, min(Kd, D), Vd, T, seed)), ("delta", _delta(D, H, Kd, Vd, T, seed))):
        spec = LayerSpec(kind)
        out = spec.forward(E, p)[0]
        single = np.concatenate([spec.forward(E[b:b + 1], p)[0] for b in range(E.shape[0])])
        assert_close(out, single, "algebra", what=f"{kind} batch")
        E2 = E.copy()
        E2[:, -1] += 1.0                                                # change the last token only
        assert_close(spec.forward(E2, p)[0][:, :-1], out[:, :-1], "algebra", what=f"{kind} causality")


@pytest.mark.parametrize("form", ["sm", "direct", "cg"])
@pytest.mark.parametrize("forget", [None, 0.85])
def test_mesa_backward_matches_complex_step_entrywise(form, forget):
    E, p = _mesa(3, 2, 2, 2, 4, 5, B=1)
    out, cache = mesa_forward(E, p, forget=forget, form=form)
    rng = np.random.default_rng(1)
    G = rng.standard_normal(out.shape)
    dE, dp = mesa_backward(G, cache)
    res = check_gradients(lambda a: np.sum(G * oracle_mesa_layer(a[0], MesaParams(*a[1:]), forget=forget)),
                          [E, *p], [dE, *dp], rng, entrywise=True)
    assert res.ok, res.detail


def test_reverse_sm_backward_equals_the_direct_solve_backward():
    E, p = _mesa(5, 2, 4, 3, 30, 9)
    G = np.random.default_rng(2).standard_normal(E.shape)
    a = mesa_backward(G, mesa_forward(E, p, form="sm")[1])
    b = mesa_backward(G, mesa_forward(E, p, form="direct")[1])
    assert_close(a[0], b[0], "algebra", what="dE")
    for f, x, y in zip(MesaParams._fields, a[1], b[1]):
        assert_close(x, y, "algebra", what=f"d{f}")


@pytest.mark.parametrize("beta, gate, form", [(None, False, "recurrent"), (None, True, "chunked"),
                                              (0.7, True, "recurrent"), (0.7, False, "chunked")])
def test_delta_backward_matches_complex_step_entrywise(beta, gate, form):
    E, p = _delta(3, 1, 2, 2, 5, 3, beta, gate)
    out, cache = delta_forward(E[:1], p, beta=beta, gate=gate, form=form, chunk=2)
    rng = np.random.default_rng(4)
    G = rng.standard_normal(out.shape)
    dE, dp = delta_backward(G, cache)
    res = check_gradients(lambda a: np.sum(G * oracle_delta_layer(a[0], type(p)(*a[1:]), beta=beta)),
                          [E[:1], *p], [dE, *dp], rng, entrywise=True)
    assert res.ok, res.detail


@pytest.mark.parametrize("spec", [LayerSpec("mesa"), LayerSpec("mesa", (("form", "direct"), ("heads", 2))),
                                  LayerSpec("delta"), LayerSpec("delta", (("form", "chunked"), ("chunk", 3),
                                                                          ("gate", True), ("beta", 0.5)))],
                         ids=repr)
def test_cache_floats_and_param_floats_count_what_is_kept_and_drawn(spec):
    E = np.random.default_rng(0).uniform(-1, 1, (3, 7, 4))
    arch = Arch((spec,))
    params = arch.init(np.random.default_rng(1), 4, InitSettings(dtype=np.float64))
    out, cache = model_forward(E, params, arch)

    def arrays(x):
        if isinstance(x, np.ndarray):
            yield x
        elif isinstance(x, tuple):
            for y in x:
                yield from arrays(y)

    owners = {}
    for a in [E, out, *cache.outputs, *arrays(tuple(cache.layer_caches))]:
        base = a if a.base is None else a.base
        owners[id(base)] = base.size
    param_ids = {id(a) for p in params for a in p}
    assert arch.cache_floats(7, 4) * E.shape[0] == sum(n for i, n in owners.items() if i not in param_ids)
    assert arch.param_floats(4) == sum(a.size for p in params for a in p)


# ---- guards -------------------------------------------------------------------------------------

def test_float32_reverse_walk_that_lost_its_precision_is_refused():
    """lam = 1e3 on anisotropic keys (the study's grid): float32 refuses, float64 answers."""
    from verify.mesa_study import _run, _tokens

    E = _tokens("mesa", 256, 0)
    G = np.random.default_rng(0).standard_normal(E.shape)
    _run("mesa", "sm", E, 1e3, np.float64, G)
    with pytest.raises(NonFiniteError, match="reverse Sherman-Morrison walk lost its precision"):
        _run("mesa", "sm", E, 1e3, np.float32, G)


def test_sm_forward_refuses_a_matrix_that_lost_positive_definiteness():
    E, p = _mesa(3, 1, 3, 2, 6, 0)
    with mock.patch.object(mesa_mod, "PD_SLACK", -1e30):           # every margin now negative
        with pytest.raises(NonFiniteError, match="lost positive definiteness"):
            mesa_forward(E, p)


def test_cg_that_does_not_converge_is_refused_and_the_residual_is_reported():
    E, p = _mesa(4, 1, 4, 2, 6, 1)
    with pytest.raises(NonFiniteError, match="conjugate gradients reached a relative residual"):
        mesa_forward(E, p, form="cg", cg_iters=1)
    _, cache = mesa_forward(E, p, form="cg")
    assert 0.0 <= cache.cg_residual <= mesa_mod.cg_tolerance(None, np.float64)


def test_delta_state_that_overflows_is_refused():
    E, p = _delta(3, 1, 3, 3, 200, 0, beta=50.0)
    p = p._replace(W_K=p.W_K * 10)
    with pytest.raises(NonFiniteError, match="overflowed"), np.errstate(all="ignore"):
        delta_forward(E.astype(np.float32), DeltaFixedParams(*(a.astype(np.float32) for a in p)), beta=50.0)


# ---- bad input: clear errors before any work ---------------------------------------------------

MESA_BAD = [
    (lambda E, p: (E, p._replace(lam=-p.lam)), {}, ValueError, r"mesa lam must be > 0"),
    (lambda E, p: (E, p._replace(lam=p.lam[:1] * 0 + np.zeros(1))), {}, ValueError, r"lam"),
    (lambda E, p: (E, p._replace(lam=np.ones(3))), {}, ValueError, r"lam must have shape \(2\)"),
    (lambda E, p: (E, tuple(p)), {}, TypeError, r"mesa params must be MesaParams, got tuple"),
    (lambda E, p: (E[:, :, :2], p), {}, ValueError, r"E must have token width D=3"),
    (lambda E, p: (E, p), {"form": "lu"}, ValueError, r"form must be one of .*got 'lu'"),
    (lambda E, p: (E, p), {"forget": 1.5}, ValueError, r"forget must be <= 1.0, got 1.5"),
    (lambda E, p: (E, p), {"forget": 0.0}, ValueError, r"forget must be > 0.0, got 0.0"),
    (lambda E, p: (E, p), {"cg_iters": 0}, ValueError, r"cg_iters must be >= 1, got 0"),
    (lambda E, p: (E, p), {"cg_tol": "1e-3"}, TypeError, r"cg_tol must be a real number, got str"),
]


@pytest.mark.parametrize("mutate, opts, exc, match", MESA_BAD)
def test_mesa_bad_input_is_refused_before_any_work(mutate, opts, exc, match):
    E, p = mutate(*_mesa(3, 2, 2, 2, 4, 0))
    with mock.patch.object(mesa_mod, "sm_queries", side_effect=AssertionError("work started")), \
            mock.patch.object(mesa_mod, "ridge_matrices", side_effect=AssertionError("work started")):
        with pytest.raises(exc, match=match):
            mesa_forward(E, p, **opts)


DELTA_BAD = [
    (lambda E, p: (E, p), {"beta": 0.5}, TypeError, r"must be DeltaFixedParams for beta=0.5.*got DeltaParams"),
    (lambda E, p: (E, p), {"gate": 1}, TypeError, r"gate must be a bool, got 1"),
    (lambda E, p: (E, p), {"form": "wy"}, ValueError, r"form must be one of .*got 'wy'"),
    (lambda E, p: (E, p), {"chunk": 0}, ValueError, r"chunk must be >= 1, got 0"),
    (lambda E, p: (E, p), {"beta": -1.0}, ValueError, r"beta must be > 0.0, got -1.0"),
    (lambda E, p: (E, p._replace(b_beta=np.zeros(3))), {}, ValueError, r"b_beta must have shape \(1\)"),
    (lambda E, p: (E, p._replace(w_beta=p.w_beta * np.nan)), {}, ValueError, r"w_beta contains NaN"),
    (lambda E, p: (E.astype(np.float32), p), {}, TypeError, r"E and W_Q must share one dtype"),
]


@pytest.mark.parametrize("mutate, opts, exc, match", DELTA_BAD)
def test_delta_bad_input_is_refused_before_any_work(mutate, opts, exc, match):
    E, p = mutate(*_delta(3, 1, 2, 2, 4, 0))
    with mock.patch.object(delta_mod, "run_states", side_effect=AssertionError("work started")), \
            mock.patch.object(delta_mod, "chunked_outputs", side_effect=AssertionError("work started")):
        with pytest.raises(exc, match=match):
            delta_forward(E, p, **opts)


def test_layer_options_are_checked_at_the_spec():
    with pytest.raises(ValueError, match="form must be one of"):
        LayerSpec("mesa", (("form", "qr"),))
    with pytest.raises(TypeError, match="gate must be a bool"):
        LayerSpec("delta", (("gate", "yes"),))
    with pytest.raises(ValueError, match=r"no option\(s\) \['causal'\]"):
        LayerSpec("delta", (("causal", True),))


# ---- meta-tests: the checkers and proofs can fail ------------------------------------------------

def test_gradient_check_catches_a_wrong_dlam_and_a_wrong_key_gradient():
    E, p = _mesa(3, 1, 2, 2, 5, 3, B=1)
    out, cache = mesa_forward(E, p)
    rng = np.random.default_rng(0)
    G = rng.standard_normal(out.shape)
    dE, dp = mesa_backward(G, cache)

    def f(a):
        return np.sum(G * mesa_forward(a[0], MesaParams(*a[1:]))[0])

    assert check_gradients(f, [E, *p], [dE, *dp], rng).ok
    assert not check_gradients(f, [E, *p], [dE, *dp._replace(lam=-dp.lam)], rng).ok
    assert not check_gradients(f, [E, *p], [dE, *dp._replace(W_K=dp.W_K.swapaxes(-1, -2).reshape(dp.W_K.shape))],
                               rng).ok


def test_forms_check_rejects_a_perturbed_output():
    E, p = _mesa(3, 1, 3, 2, 5, 2)
    out = mesa_forward(E, p, form="direct")[0]
    with pytest.raises(AssertionError):
        assert_close(out * (1 + 1e-9), mesa_forward(E, p)[0], "algebra")


def _wrong_sm(R, k, g):
    u = R * k
    return (R - u * u.T / (g - (k.T * u)[0, 0])) / g


def _wrong_reverse(Rn, k, g):
    w = Rn * k
    return g * (Rn - w * w.T / ((k.T * w)[0, 0] + 1))


def _wrong_delta(Sm, k, v, a, b):
    return a * Sm + b * (v - Sm * k) * k.T                             # residual from S, not a S


def _wrong_limit(Ks, Vs, q):
    return 2 * S.linear_attention(Ks, Vs, q)


@pytest.mark.parametrize("tid, kw", [("mesa.sherman_morrison", {"update": _wrong_sm, "sizes": (2,)}),
                                     ("mesa.reverse_sherman_morrison", {"reverse": _wrong_reverse, "sizes": (2,)}),
                                     ("mesa.delta_is_gd", {"update": _wrong_delta, "sizes": ((2, 3),)}),
                                     ("mesa.small_lambda", {"limit": _wrong_limit, "sizes": ((2, 1, 2),)})])
def test_wrong_statements_are_not_established(tid, kw):
    th = load_all()[tid]
    sizes = {"sizes": kw["sizes"]}
    assert run_theorem(th, **sizes).established, f"{tid} must hold for the reference's formula"
    res = run_theorem(th, **kw)
    assert res.error is None and not res.established and res.measured > 0


def test_the_bridge_holds():
    res = run_theorem(load_all()["bridge.mesa"])
    assert res.established, [s for s in res.steps if not s.holds]
