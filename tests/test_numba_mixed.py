"""The Numba backend's mixed-stack kernels (``reference/backends/_numba_mixed.py``) on the
models they exist for, against the loop oracle and the reference.

Models: the sine-regression model (tokens (x, y) -> embed 40 -> MLP 160 -> LSA, read at
feature 39), one softmax layer with 1 and 2 heads, pre-LN stacks (one layer: LN before
the LSA layer; two layers: none before layer 1, LN before layer 2), the classic-token
model (posenc concat 10 on tokens of width 11 -> softmax -> lsa) and Hypothesis-drawn
stacks of every kind the kernels run (``tests/strategies.py``). For each:

1. every output token, the prediction and the loss against the loop oracle (float64,
   float32 on the same rounded inputs);
2. loss, prediction, dE and every gradient against the reference's (whose backward is
   complex-step checked in ``tests/test_conformance.py``; complex numbers do not run
   through Numba's float kernels), float64 and float32;
3. Adam updates: three ``step_on`` updates and ``train_step`` against the NumPy
   backend's (``test_conformance.compare_steps``), with and without gradient clipping;
4. ``stepper.step`` draws the NumPy backend's tasks for the same seed and step.

Also: the fused embedding + MLP op against the unfused layers, uniform LSA stacks kept
on their fused LSA kernels, other layer kinds refused naming the layer, and overflowing
softmax logits refused as the reference refuses them.
"""

import numpy as np
import pytest
from hypothesis import given

import strategies as S
import test_conformance as C
from reference import Arch, InitSettings, LayerSpec, lsa_stack, transformer_stack
from reference._checks import NonFiniteError
from reference.backends import _numba_mixed, numba_backend as nb, numpy_backend
from reference.layers import LayerType, register, unregister
from reference.model import loss_and_grads, model_forward
from reference.optim import AdamHP, adam_init
from reference.oracle import oracle_loss, oracle_model
from reference.tasks import SineTaskSpec, TaskSpec
from reference.tolerances import assert_close
from reference.tree import tree_leaves, tree_map, tree_paths

DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]


class Model:
    def __init__(self, id, arch, spec, scale):
        self.id, self.arch, self.spec, self.scale = id, arch, spec, scale

    def __repr__(self):
        return self.id


SINE = Arch((LayerSpec("embed", (("width", 40),)), LayerSpec("mlp", (("width", 160),)), LayerSpec("lsa")))
MODELS = [
    Model("sine", SINE, SineTaskSpec(N=10, B=6), 1.0),
    Model("softmax-1head", Arch((LayerSpec("softmax"),)), TaskSpec(d=10, N=10, B=6), 3.0),
    Model("softmax-2heads", Arch((LayerSpec("softmax", (("heads", 2),)),)), TaskSpec(d=10, N=10, B=6), 3.0),
    Model("pre-ln-1layer", Arch((LayerSpec("pre_ln"),)), TaskSpec(d=3, N=6, B=5), 1.0),
    Model("pre-ln-2layers", transformer_stack(2, layer_norm=True), TaskSpec(d=3, N=6, B=5), 1.0),
    Model("classic-tokens", Arch((LayerSpec("posenc", (("mode", "concat"), ("width", 10))), LayerSpec("softmax"),
                                  LayerSpec("lsa"))), TaskSpec(d=10, N=6, B=4), 1.0),
]


def data(model, dtype, seed=0):
    """(E, y_q, params, layout) drawn in float64 and rounded to ``dtype``."""
    rng = np.random.default_rng(seed)
    tasks = model.spec.sample(rng, dtype=np.float64)
    layout = model.arch.layout(tasks.X.shape[2], tasks.Y.shape[2])
    params = model.arch.init(rng, layout.D_in, InitSettings(scale=model.scale, dtype=np.float64))
    E = layout.build(tasks.X, tasks.Y, tasks.x_q)
    return E.astype(dtype), tasks.y_q.astype(dtype), tree_map(lambda a: a.astype(dtype), params), layout


def close(actual, desired, dtype, what):
    assert_close(np.asarray(actual), np.asarray(desired, dtype=np.asarray(actual).dtype), "algebra", dtype, what)


def check_against_oracle(arch, E, y_q, params, layout, dtype):
    want = oracle_model(E.astype(np.float64), tree_map(lambda a: a.astype(np.float64), params), arch)
    out, _ = nb.model_forward(E, params, arch)
    close(out, want, dtype, "forward vs oracle")
    L, _, aux = nb.loss_and_grads(E, y_q, params, arch, layout)
    pred = layout.readout(want)
    close(aux["pred"], pred, dtype, "prediction vs oracle")
    close(np.reshape(L, 1), np.reshape(oracle_loss(pred, y_q.astype(np.float64)), 1), dtype, "loss vs oracle")


def check_against_reference(arch, E, y_q, params, layout, dtype):
    L0, g0, a0 = loss_and_grads(E, y_q, params, arch, layout)
    L1, g1, a1 = nb.loss_and_grads(E, y_q, params, arch, layout)
    assert a1["path"] == "mixed" or _numba_mixed.mixed_reason(arch, "numba") is None
    close(np.reshape(L1, 1), np.reshape(L0, 1), dtype, "loss")
    close(a1["pred"], a0["pred"], dtype, "prediction")
    close(a1["dE"], a0["dE"], dtype, "dE")
    C.assert_trees_close(g1, g0, dtype, "gradient")
    assert np.dtype(L1.dtype) == np.dtype(dtype) and all(a.dtype == dtype for a in tree_leaves(g1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("model", MODELS, ids=str)
def test_forward_matches_the_loop_oracle(model, dtype):
    check_against_oracle(model.arch, *data(model, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("model", MODELS, ids=str)
def test_loss_and_grads_match_the_reference(model, dtype):
    assert nb.supports(model.arch) is None and nb._mixed(model.arch)
    check_against_reference(model.arch, *data(model, dtype), dtype)


# Left out: the classic-token model in float32 without gradient clipping. Its slowest
# encoding columns are nearly constant over the tokens and a softmax row does not change
# when a constant is added to its logits, so the W_K entries multiplying them have
# gradients that are float32 rounding noise (~1e-7, above Adam's eps); Adam turns noise of
# either sign into updates of +-lr, so the two float32 computations differ by O(lr)
# there. Clipped to 0.001 those entries fall below eps and the tolerance covers them;
# in float64 the noise is 1e-16.
ADAM_CASES = [pytest.param(m, dt, clip, id=f"{m.id}-{dt_id}-{clip_id}")
              for m in MODELS for dt, dt_id in zip(DTYPES, DTYPE_IDS)
              for clip, clip_id in ((0.001, "gradclip"), (None, "noclip"))
              if not (m.id == "classic-tokens" and dt == np.float32 and clip is None)]


@pytest.mark.parametrize("model, dtype, clip_norm", ADAM_CASES)
def test_adam_steps_match_the_numpy_backend(model, dtype, clip_norm):
    _, _, params, _ = data(model, dtype)
    C.compare_steps(nb.make_stepper, model.arch, params, dtype, clip_norm, model.spec)
    hp = AdamHP(lr=1e-2, clip_norm=clip_norm)
    tasks = model.spec.sample(np.random.default_rng(9), dtype=dtype)
    r0 = numpy_backend.train_step(params, adam_init(params), tasks, model.arch, hp)
    r1 = nb.train_step(params, adam_init(params), tasks, model.arch, hp)
    C.close_scalar(r1.loss, r0.loss, dtype, "train_step loss")
    C.close_scalar(r1.grad_norm, r0.grad_norm, dtype, "train_step grad norm")
    C.assert_trees_close(r1.params, r0.params, dtype, "train_step params",
                         extra_atol=C.adam_update_atol(r0.state, hp, r0.grad_norm, dtype))


@pytest.mark.parametrize("model", [MODELS[0], MODELS[2]], ids=str)
def test_step_draws_the_numpy_backends_tasks(model):
    """Same seed, same step: the same tasks, then the same update."""
    dtype = np.float32
    _, _, params, _ = data(model, dtype)
    hp = AdamHP(lr=1e-3, clip_norm=1.0)
    fast = nb.make_stepper(model.arch, hp, model.spec, 7, dtype)
    ref = numpy_backend.make_stepper(model.arch, hp, model.spec, 7, dtype)
    assert isinstance(fast, nb.MixedStepper)
    for step in (0, 3):
        for a, b in zip(fast.sample(step), ref.sample(step)):
            np.testing.assert_array_equal(a, b)
    r1 = fast.step(params, adam_init(params), 3)
    r0 = ref.step(params, adam_init(params), 3)
    C.close_scalar(r1.loss, r0.loss, dtype, "step loss")
    C.assert_trees_close(r1.params, r0.params, dtype, "step params",
                         extra_atol=C.adam_update_atol(r0.state, hp, r0.grad_norm, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_embedding_and_mlp_equal_the_two_layers(monkeypatch, dtype):
    """The sine model's embed + MLP run as one op; with the fusion switched off the
    layers run one by one: both equal the reference (above) and each other. A biased
    embedding before a bias-free MLP (the other fused case) against the reference."""
    model = MODELS[0]
    E, y_q, params, layout = data(model, dtype)
    assert _numba_mixed.fusable_embed_mlp(*_numba_mixed._layers(model.arch)[:2], 2)
    L1, g1, a1 = nb.loss_and_grads(E, y_q, params, model.arch, layout)
    monkeypatch.setattr(_numba_mixed, "fusable_embed_mlp", lambda *a: False)
    L2, g2, a2 = nb.loss_and_grads(E, y_q, params, model.arch, layout)
    close(np.reshape(L1, 1), np.reshape(L2, 1), dtype, "loss fused vs unfused")
    close(a1["dE"], a2["dE"], dtype, "dE fused vs unfused")
    C.assert_trees_close(g1, g2, dtype, "gradient fused vs unfused")
    monkeypatch.undo()
    arch = Arch((LayerSpec("embed", (("width", 6), ("bias", True))), LayerSpec("mlp", (("bias", False),)),
                 LayerSpec("embed", (("width", 7), ("bias", True))), LayerSpec("mlp", (("gelu", "erf"),)),
                 LayerSpec("lsa")))
    other = Model("embed-bias", arch, TaskSpec(d=2, N=5, B=5), 1.0)
    rng = np.random.default_rng(1)
    E, y_q, _, layout = data(other, dtype)
    params = tree_map(lambda a: (a + 0.1 * rng.standard_normal(a.shape)).astype(dtype), data(other, dtype)[2])
    check_against_reference(arch, E, y_q, params, layout, dtype)


@given(S.mixed_stack(), S.seeds)
def test_drawn_mixed_stacks_match_the_reference_and_the_oracle(stack, seed):
    """float64: the same function. (float32 is checked on the models above: drawn stacks
    include LayerNorms of 2 or 3 features and deep softmax stacks, whose float32 rounding
    the reference's own float32 result carries as much as ours, beyond the float32
    algebra tolerance of either against the other.)"""
    arch, d, d_y = stack
    dtype = np.float64
    model = Model("drawn", arch, TaskSpec(d=d, d_y=d_y, N=4, B=3), 1.0)
    E, y_q, params, layout = data(model, dtype, seed)
    check_against_reference(arch, E, y_q, params, layout, dtype)
    check_against_oracle(arch, E, y_q, params, layout, dtype)


def test_uniform_lsa_stacks_keep_their_fused_kernels():
    """Only the other Archs take the mixed-stack path."""
    model = Model("lsa", lsa_stack(2, clip=0.3), TaskSpec(d=3, N=5, B=4), 0.3)
    E, y_q, params, layout = data(model, np.float64)
    assert not nb._mixed(model.arch)
    assert nb.loss_and_grads(E, y_q, params, model.arch, layout)[2]["path"] in ("tokens", "dspace")
    assert isinstance(nb.make_stepper(model.arch, AdamHP(), model.spec, 0, np.float64), nb.Stepper)
    mixed = Arch((LayerSpec("lsa", (("clip", 0.3),)), LayerSpec("lsa")))
    assert nb._mixed(mixed) and nb.loss_and_grads(E, y_q, params, mixed, layout)[2]["path"] == "mixed"


class _Doubler(LayerType):
    """A layer kind the mixed kernels do not know: out = 2 e."""

    kind = "test_doubler"

    def param_type(self, **_):
        return tuple

    def check_params(self, params, D_in, **_):
        pass


def test_other_layer_kinds_are_refused_naming_the_layer():
    register(_Doubler())
    try:
        arch = Arch((LayerSpec("lsa"), LayerSpec("test_doubler")))
        reason = nb.supports(arch)
        assert "layer 1" in reason and "'test_doubler'" in reason, reason
        model = Model("doubler", arch, TaskSpec(d=3, N=5, B=4), 0.3)
        E, y_q, params, layout = data(Model("lsa", Arch((LayerSpec("lsa"),) * 2), model.spec, 0.3), np.float64)
        tasks = model.spec.sample(np.random.default_rng(0))
        for call in (lambda: nb.model_forward(E, params, arch), lambda: nb.loss_and_grads(E, y_q, params, arch, 3),
                     lambda: nb.train_step(params, adam_init(params), tasks, arch, AdamHP()),
                     lambda: nb.make_stepper(arch, AdamHP(), model.spec, 0, np.float64)):
            with pytest.raises(ValueError, match="test_doubler"):
                call()
    finally:
        unregister("test_doubler")


@pytest.mark.parametrize("entry", ["model_forward", "loss_and_grads"])
def test_overflowing_softmax_logits_are_refused_as_the_reference_refuses_them(entry):
    model = MODELS[1]
    E, y_q, params, layout = data(model, np.float64)
    big = (params[0]._replace(W_Q=params[0].W_Q * 1e160, W_K=params[0].W_K * 1e160),)
    calls = {"model_forward": (model_forward, nb.model_forward, (E, big, model.arch)),
             "loss_and_grads": (loss_and_grads, nb.loss_and_grads, (E, y_q, big, model.arch, layout))}
    ref, fast, args = calls[entry]
    with pytest.raises(NonFiniteError), np.errstate(over="ignore", invalid="ignore"):
        ref(*args)                                                     # the reference's matmul overflows first
    with pytest.raises(NonFiniteError):
        fast(*args)


@pytest.mark.parametrize("model", [MODELS[0], MODELS[4]], ids=str)
def test_results_do_not_depend_on_the_thread_count(model):
    """Weight-gradient sums run over a fixed partition of rows or tasks, added in order:
    1 and 2 threads give the same bits."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2 or numba.config.DISABLE_JIT:
        pytest.skip("needs the JIT and NUMBA_NUM_THREADS >= 2")
    E, y_q, params, layout = data(model, np.float32)
    E, y_q = np.repeat(E, 40, axis=0), np.repeat(y_q, 40, axis=0)     # several chunks of tasks and rows
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(nb.loss_and_grads(E, y_q, params, model.arch, layout))
    finally:
        numba.set_num_threads(before)
    (L1, g1, a1), (L2, g2, a2) = results
    assert L1 == L2
    np.testing.assert_array_equal(a1["dE"], a2["dE"])
    for a, b in zip(tree_leaves(g1), tree_leaves(g2)):
        np.testing.assert_array_equal(a, b)
