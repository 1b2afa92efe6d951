"""The Numba backend's sequence step (``reference/backends/_numba_seq.py``: causal LSA
stacks with the lds task's loss over every time step) against the NumPy reference
(``reference.sequences.seq_loss_and_grads``, ``reference.seq_training.seq_train_step``)
on the same sequences:

1. loss, per-time-step losses, predictions and every gradient, float64 (the algebra
   tolerance, 1e-12 relative) and float32 (``reference.tolerances``), on the stacked-heads
   kernels (factored params) and the merged-form kernels; 1 and 3 layers, several heads,
   key and value sizes that differ, the token clip active, the input mask, weight tying,
   a batch that is not a multiple of the lanes;
2. three AdamW steps with the element-wise clip (``SeqStepper.step_on``) and
   ``stepper.step`` (the NumPy backend's draws for the same seed and step);
3. what the path refuses (the mesa layer, non-causal stacks) with the reason, and the
   config routing an lds run to it.
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

SPEC = SequenceSpec(T=6, B=21, d=3)
STACKS = {
    "1layer-mask": (lsa_stack(1, False, True, 4.0, heads=2, key_size=4, value_size=5), 6),
    "3layers-clip": (lsa_stack(3, False, True, 0.6, heads=2, key_size=4, value_size=3), 0),
    "2layers-tied": (lsa_stack(2, True, True, 1.0, heads=3, key_size=2, value_size=4), 0),
}
DTYPES = {"f64": np.float64, "f32": np.float32}


def _setup(name, dtype, seed=0):
    arch, mask = STACKS[name]
    seqs = SPEC.sample(np.random.default_rng(seed), dtype=dtype)
    params = S.init_normal(arch, 4 * SPEC.d, 0.3, np.random.default_rng(seed + 1), dtype)
    return arch, mask, seqs, params


def close(a, b, dtype, what):
    assert_close(np.asarray(a), np.asarray(b, dtype=np.asarray(a).dtype), "algebra", dtype, what)


@pytest.mark.parametrize("path", [None, "merged"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", STACKS)
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


def test_what_the_sequence_kernels_do_not_compute_is_refused_with_the_reason():
    mesa = Arch((LayerSpec("mesa", (("heads", 2), ("key_size", 4), ("value_size", 4))),))
    acausal = lsa_stack(2, False, False, None)
    hp = AdamHP()
    for arch, words in ((mesa, "'mesa'"), (acausal, "causal")):
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
    mesa = '[{"kind": "mesa", "heads": 2, "key_size": 4, "value_size": 4}]'
    kw = {k: v for k, v in base.items() if k not in ("heads", "key_size", "value_size", "token_clip", "causal")}
    TrainConfig().replace(**kw, backend="numpy", layers=mesa)
    with pytest.raises(ConfigError, match="backend: .*'mesa'"):
        TrainConfig().replace(**kw, backend="numba", layers=mesa)
