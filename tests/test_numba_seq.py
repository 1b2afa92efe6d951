"""The Numba backend's sequence step (``reference/backends/_numba_seq.py``: causal LSA
stacks with the lds task's loss over every time step) against the NumPy reference
(``reference.sequences.seq_loss_and_grads``, ``reference.seq_training.seq_train_step``)
on the same sequences:

1. loss, per-time-step losses, predictions and every gradient, float64 (the algebra
   tolerance, 1e-12 relative) and float32 (``reference.tolerances``), on the stacked-heads
   kernels (factored params) and the merged-form kernels; 1 and 3 layers, several heads,
   key and value sizes that differ, the token clip active, the input mask, weight tying,
   a batch that is not a multiple of the lanes; mesa stacks (form "sm": one and two
   layers, heads and sizes that differ, tied, lam per head away from 1, lam's gradient);
2. three AdamW steps with the element-wise clip (``SeqStepper.step_on``) and
   ``stepper.step`` (the NumPy backend's draws for the same seed and step);
3. the mesa guards refusing (NonFiniteError) where the reference's refuse; what the path
   does not compute (other mesa forms, forgetting, non-causal or mixed stacks) refused with
   the reason, and the config routing an lds run to it.
"""

import numpy as np
import pytest

import test_conformance as C
from reference import seq_training as S
from reference.backends import numba_backend as nb, seq_support
from reference.config import ConfigError, TrainConfig
from reference.model import Arch, LayerSpec, lsa_stack
from reference.optim import AdamHP, adam_init
from reference.sequences import SequenceSpec, code_tokens, seq_loss_and_grads
from reference.tolerances import assert_close
from reference.tree import tree_leaves

SPEC = SequenceSpec(T=6, B=21, d=3)
MESA = LayerSpec("mesa", (("heads", 2), ("key_size", 4), ("value_size", 3)))
STACKS = {
    "1layer-mask": (lsa_stack(1, False, True, 4.0, heads=2, key_size=4, value_size=5), 6),
    "3layers-clip": (lsa_stack(3, False, True, 0.6, heads=2, key_size=4, value_size=3), 0),
    "2layers-tied": (lsa_stack(2, True, True, 1.0, heads=3, key_size=2, value_size=4), 0),
    "mesa-1layer-mask": (Arch((MESA,)), 6),
    "mesa-2layers": (Arch((MESA, LayerSpec("mesa", (("heads", 3), ("key_size", 2), ("value_size", 4))))), 0),
    "mesa-2layers-tied": (Arch((MESA, MESA), tie=(0, 0)), 0),
}
DTYPES = {"f64": np.float64, "f32": np.float32}


def _setup(name, dtype, seed=0):
    arch, mask = STACKS[name]
    seqs = SPEC.sample(np.random.default_rng(seed), dtype=dtype)
    params = S.init_normal(arch, 4 * SPEC.d, 0.3, np.random.default_rng(seed + 1), dtype)
    if name.startswith("mesa"):                                        # lam away from its init 1, per head
        params = tuple(p._replace(lam=np.linspace(0.5, 2.0, p.lam.size).astype(dtype)) for p in params)
    return arch, mask, seqs, params


def close(a, b, dtype, what):
    assert_close(np.asarray(a), np.asarray(b, dtype=np.asarray(a).dtype), "algebra", dtype, what)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name, path", [(n, None) for n in STACKS] + [(n, "merged") for n in STACKS if "mesa" not in n])
def test_loss_and_grads_match_the_reference(name, dt, path):
    dtype = DTYPES[dt]
    arch, mask, seqs, params = _setup(name, dtype)
    assert nb.seq_supports(arch) is None
    E = code_tokens(seqs.X)
    L0, g0, a0 = seq_loss_and_grads(E, seqs.Y, params, arch, SPEC.d, mask)
    L1, g1, a1 = nb.seq_loss_and_grads(E, seqs.Y, params, arch, SPEC.d, mask, path=path)
    C.close_scalar(float(L1), float(L0), dtype, "loss")
    close(a1["per_t"], a0["per_t"], dtype, "per-time-step losses")
    close(a1["pred"], a0["pred"], dtype, "predictions")
    C.assert_trees_close(g1, g0, dtype, "gradient")


def test_the_token_clip_is_active_in_the_clipped_case():
    arch, mask, seqs, params = _setup("3layers-clip", np.float64)
    free = lsa_stack(3, False, True, None, heads=2, key_size=4, value_size=3)
    E = code_tokens(seqs.X)
    L_clip = nb.seq_loss_and_grads(E, seqs.Y, params, arch, SPEC.d, mask)[0]
    L_free = nb.seq_loss_and_grads(E, seqs.Y, params, free, SPEC.d, mask)[0]
    assert abs(L_clip - L_free) > 1e-3 * abs(L_free)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", STACKS)
def test_adamw_steps_match_the_reference(name, dt):
    dtype = DTYPES[dt]
    arch, mask, _, params = _setup(name, dtype)
    hp = AdamHP(lr=1e-2, b2=0.999, clip_norm=None, clip_value=1.0, weight_decay=0.1)
    ref = S.SeqStepper(arch, hp, SPEC, 3, dtype, mask)
    fast = nb.make_seq_stepper(arch, hp, SPEC, 3, dtype, mask)
    p0 = p1 = params
    s0 = s1 = adam_init(params)
    for step in range(3):
        seqs = ref.sample(step)
        r0, r1 = ref.step_on(p0, s0, seqs), fast.step_on(p1, s1, seqs)
        p0, s0, p1, s1 = r0.params, r0.state, r1.params, r1.state
        C.close_scalar(r1.loss, r0.loss, dtype, f"loss at step {step}")
        C.close_scalar(r1.grad_norm, r0.grad_norm, dtype, f"grad norm at step {step}")
        C.assert_trees_close(p1, p0, dtype, f"params after step {step}",
                             extra_atol=C.adam_update_atol(s0, hp, r0.grad_norm, dtype))
        for what, t0, t1 in (("m", s0.m, s1.m), ("v", s0.v, s1.v)):
            C.assert_trees_close(t1, t0, dtype, f"{what} after step {step}")
    for a, b in zip(fast.sample(4), ref.sample(4)):
        np.testing.assert_array_equal(a, b)
    r0, r1 = ref.step(params, adam_init(params), 4), fast.step(params, adam_init(params), 4)
    C.close_scalar(r1.loss, r0.loss, dtype, "step loss (the NumPy backend's draws)")


@pytest.mark.parametrize("lam, words", [(1.0, "backward"), (1e7, "positive definiteness")])
def test_the_mesa_guards_refuse_as_the_reference_refuses(lam, words):
    """float32 keys of norm ~10 over T = 40 tokens: the reverse walk loses its precision
    (lam 1); lam 1e7 makes k^T R k negative beyond rounding in the forward."""
    from reference._checks import NonFiniteError

    arch = Arch((LayerSpec("mesa", (("heads", 2), ("key_size", 4), ("value_size", 4))),))
    spec = SequenceSpec(T=40, B=9, d=3)
    seqs = spec.sample(np.random.default_rng(0), dtype=np.float32)
    params = S.init_normal(arch, 12, 1.0, np.random.default_rng(1), np.float32)
    params = (params[0]._replace(lam=np.full(2, lam, np.float32)),)
    E = code_tokens(seqs.X)
    for f in (seq_loss_and_grads, nb.seq_loss_and_grads):
        with pytest.raises(NonFiniteError, match=words):
            f(E, seqs.Y, params, arch, 3, 0)


def test_what_the_sequence_kernels_do_not_compute_is_refused_with_the_reason():
    direct = Arch((LayerSpec("mesa", (("form", "direct"),)),))
    forget = Arch((LayerSpec("mesa", (("forget", 0.9),)),))
    acausal = lsa_stack(2, False, False, None)
    mixed = Arch((LayerSpec("lsa", (("causal", True),)), MESA))
    hp = AdamHP()
    for arch, words in ((direct, "form='sm'"), (forget, "forget=None"), (acausal, "causal"), (mixed, "'mesa'")):
        reason = nb.seq_supports(arch)
        assert reason is not None and words in reason and "numpy" in reason, reason
        assert seq_support("numba", arch) == reason and seq_support("numpy", arch) is None
        with pytest.raises(ValueError, match=words):
            nb.make_seq_stepper(arch, hp, SPEC, 0, np.float64)
    assert "no sequence step" in seq_support("cupy", acausal)


def test_the_config_routes_lds_runs_to_the_numba_sequence_step_only_where_it_applies():
    base = dict(task="lds", seq_len=6, seq_dim=3, batch=16, eval_tasks=40, line_search_tasks=40, dtype="float64",
                causal=True, heads=2, key_size=4, value_size=4, token_clip=4.0, init_std=0.02, grad_clip=None,
                elementwise_clip=1.0, weight_decay=0.1)
    cfg = TrainConfig().replace(**base, backend="numba")
    assert isinstance(S.make_stepper(cfg), nb.SeqStepper)
    assert isinstance(S.make_stepper(TrainConfig().replace(**base, backend="numpy")), S.SeqStepper)
    kw = {k: v for k, v in base.items() if k not in ("heads", "key_size", "value_size", "token_clip", "causal")}
    mesa = '[{"kind": "mesa", "heads": 2, "key_size": 4, "value_size": 4}]'
    assert isinstance(S.make_stepper(TrainConfig().replace(**kw, backend="numba", layers=mesa)), nb.SeqStepper)
    direct = '[{"kind": "mesa", "heads": 2, "form": "direct"}]'
    TrainConfig().replace(**kw, backend="numpy", layers=direct)
    with pytest.raises(ConfigError, match="backend: .*form='sm'"):
        TrainConfig().replace(**kw, backend="numba", layers=direct)


@pytest.mark.parametrize("model", ["lsa2", "mesa"])
def test_a_short_run_on_numba_follows_the_numpy_run(tmp_path, model):
    """30 steps of a tiny lds run (float64) on each backend: the same eval curve."""
    from test_sequence_training import seq_tiny
    from test_training import eval_rows, train

    kw = dict(n_layers=2) if model == "lsa2" else dict(
        layers='[{"kind": "mesa", "heads": 2, "key_size": 4, "value_size": 4}]', heads=1, key_size=None,
        value_size=None, token_clip=None, causal=False)
    runs = {b: eval_rows(train(seq_tiny(backend=b, **kw), tmp_path / b).history) for b in ("numpy", "numba")}
    assert len(runs["numba"]) == len(runs["numpy"]) > 2
    for r1, r0 in zip(runs["numba"], runs["numpy"]):
        assert r1["loss"] == pytest.approx(r0["loss"], rel=1e-9)
        np.testing.assert_allclose(r1["per_t"], r0["per_t"], rtol=1e-9)


@pytest.mark.parametrize("name", ["3layers-clip", "mesa-2layers"])
def test_results_do_not_depend_on_the_thread_count(name):
    """Blocks of lanes fixed by B, chunks a fixed partition added in order: 1 and 2
    threads give the same bits."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2 or numba.config.DISABLE_JIT:
        pytest.skip("needs the JIT and NUMBA_NUM_THREADS >= 2")
    arch, mask, _, params = _setup(name, np.float32)
    seqs = SequenceSpec(T=6, B=40, d=3).sample(np.random.default_rng(3), dtype=np.float32)   # 5 blocks of 8
    E = code_tokens(seqs.X)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(nb.seq_loss_and_grads(E, seqs.Y, params, arch, SPEC.d, mask))
    finally:
        numba.set_num_threads(before)
    (L1, g1, _), (L2, g2, _) = results
    assert L1 == L2
    for a, b in zip(tree_leaves(g1), tree_leaves(g2)):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_refused_as_the_reference_refuses_it():
    arch, mask, seqs, params = _setup("1layer-mask", np.float64)
    hp = AdamHP()
    bad = seqs._replace(X=seqs.X.astype(np.float32), Y=seqs.Y.astype(np.float32))
    for f in (S.seq_train_step, nb.seq_train_step):
        with pytest.raises(TypeError, match="params' dtype"):
            f(params, adam_init(params), bad, arch, hp, mask)
    E = code_tokens(seqs.X)
    for f in (seq_loss_and_grads, nb.seq_loss_and_grads):
        with pytest.raises(ValueError, match="n_masked"):
            f(E, seqs.Y, params, arch, SPEC.d, 99)
