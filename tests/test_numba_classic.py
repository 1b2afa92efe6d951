"""Classic tokens (``reference.classic_tokens.ClassicLayout``: 2N + 1 tokens, the readout
minus the last d_y features of the query at the model's output width) on the Numba
backend's mixed-stack kernels, against the NumPy backend on the same tasks: loss,
prediction, dE and every gradient, three Adam updates of ``make_stepper(..., layout=)``,
``train_step(..., layout=)`` and ``stepper.step`` (the NumPy backend's draws); float64
with and without gradient clipping, float32 with clipping (the float32 no-clip case is
left out for the reason ``tests/test_numba_mixed.py`` gives: W_K entries whose
gradients are float32 rounding noise become +-lr Adam updates). Models: the induction
experiment's (posenc concat -> softmax -> lsa, key size 20 on width 20 tokens; smaller
d and N here), its all-linear variant, and a uniform LSA stack (which on classic tokens
leaves the fused LSA kernels for the mixed ones)."""

import numpy as np
import pytest

import test_conformance as C
from reference import Arch, InitSettings, LayerSpec, lsa_stack
from reference.backends import LAYOUT_KINDS, numba_backend as nb, numpy_backend
from reference.classic_tokens import classic_layout
from reference.model import loss_and_grads
from reference.optim import AdamHP, adam_init
from reference.tasks import TaskSpec
from reference.tolerances import assert_close
from reference.tree import tree_map

POS = LayerSpec("posenc", (("mode", "concat"), ("width", 6)))
ARCHS = {
    "induction": Arch((POS, LayerSpec("softmax", (("key_size", 8),)), LayerSpec("lsa", (("key_size", 8),)))),
    "induction-linear": Arch((POS, LayerSpec("lsa", (("key_size", 8),)), LayerSpec("lsa", (("key_size", 8),)))),
    "lsa-stack": lsa_stack(2),
}
SPEC = TaskSpec(d=4, N=5, B=6)
DTYPES = {"f64": np.float64, "f32": np.float32}


def _setup(name, dtype, seed=0):
    arch = ARCHS[name]
    layout = classic_layout(arch, SPEC.d, SPEC.d_y)
    rng = np.random.default_rng(seed)
    params = arch.init(rng, layout.D_in, InitSettings(scale=1.0, dtype=np.float64))
    params = tree_map(lambda a: a.astype(dtype), params)
    tasks = SPEC.sample(rng, dtype=dtype)
    return arch, layout, params, tasks


def test_numba_lists_the_classic_layout():
    assert "classic" in LAYOUT_KINDS["numba"]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", ARCHS)
def test_loss_and_grads_match_the_reference(name, dt):
    dtype = DTYPES[dt]
    arch, layout, params, tasks = _setup(name, dtype)
    E = layout.build(tasks.X, tasks.Y, tasks.x_q)
    assert E.shape[1] == 2 * SPEC.N + 1
    L0, g0, a0 = loss_and_grads(E, tasks.y_q, params, arch, layout)
    L1, g1, a1 = nb.loss_and_grads(E, tasks.y_q, params, arch, layout)
    assert a1["path"] == "mixed"
    C.close_scalar(float(L1), float(L0), dtype, "loss")
    for what, x, y in (("prediction", a1["pred"], a0["pred"]), ("dE", a1["dE"], a0["dE"])):
        assert_close(np.asarray(x), np.asarray(y, dtype=x.dtype), "algebra", dtype, what)
    C.assert_trees_close(g1, g0, dtype, "gradient")


CASES = [(n, dt, clip) for n in ARCHS for dt in DTYPES for clip in (0.001, None) if not (dt == "f32" and clip is None)]


@pytest.mark.parametrize("name, dt, clip_norm", CASES)
def test_adam_steps_match_the_numpy_backend(name, dt, clip_norm):
    dtype = DTYPES[dt]
    arch, layout, params, _ = _setup(name, dtype)
    hp = AdamHP(lr=1e-2, clip_norm=clip_norm)
    ref = numpy_backend.make_stepper(arch, hp, SPEC, 0, dtype, layout=layout)
    fast = nb.make_stepper(arch, hp, SPEC, 0, dtype, layout=layout)
    assert isinstance(fast, nb.MixedStepper)
    p0 = p1 = params
    s0 = s1 = adam_init(params)
    for step in range(3):
        tasks = ref.sample(step)
        r0, r1 = ref.step_on(p0, s0, tasks), fast.step_on(p1, s1, tasks)
        p0, s0, p1, s1 = r0.params, r0.state, r1.params, r1.state
        C.close_scalar(float(r1.loss), r0.loss, dtype, f"loss at step {step}")
        C.close_scalar(float(r1.grad_norm), r0.grad_norm, dtype, f"grad norm at step {step}")
        C.assert_trees_close(p1, p0, dtype, f"params after step {step}",
                             extra_atol=C.adam_update_atol(s0, hp, r0.grad_norm, dtype))
        for what, t0, t1 in (("m", s0.m, s1.m), ("v", s0.v, s1.v)):
            C.assert_trees_close(t1, t0, dtype, f"{what} after step {step}")
    tasks = ref.sample(5)
    r0 = numpy_backend.train_step(params, adam_init(params), tasks, arch, hp, layout)
    r1 = nb.train_step(params, adam_init(params), tasks, arch, hp, layout)
    C.close_scalar(r1.loss, r0.loss, dtype, "train_step loss")
    C.assert_trees_close(r1.params, r0.params, dtype, "train_step params",
                         extra_atol=C.adam_update_atol(r0.state, hp, r0.grad_norm, dtype))
    r0, r1 = ref.step(params, adam_init(params), 4), fast.step(params, adam_init(params), 4)
    C.close_scalar(r1.loss, r0.loss, dtype, "step loss (the NumPy backend's draws)")


def test_a_layout_of_the_wrong_width_is_refused_as_the_reference_refuses_it():
    arch, layout, params, tasks = _setup("induction", np.float64)
    bad = classic_layout(ARCHS["lsa-stack"], SPEC.d, SPEC.d_y)       # reads width d, the model outputs d + 6
    hp = AdamHP()
    with pytest.raises(ValueError, match="layout reads tokens of width") as e0:
        numpy_backend.train_step(params, adam_init(params), tasks, arch, hp, bad)
    with pytest.raises(ValueError, match="layout reads tokens of width") as e1:
        nb.train_step(params, adam_init(params), tasks, arch, hp, bad)
    assert str(e0.value) == str(e1.value)
