"""Tests of training on sequences (the mesa paper's lds task, ``reference.seq_training``):
the AdamW / element-wise clip optimiser against a hand loop (``reference.optim``), the
config's refusals, the step against its pieces, the baselines' constructions, the weight
match, resume bit for bit and divergence handling in a run directory (``verify.runs``).

Every run here is tiny (T = 6, d = 3, a few dozen sequences) so the file stays fast."""

import functools

import numpy as np
import pytest

from reference import causal_constructions as CC
from reference import seq_training as S
from reference import trainer
from reference.config import ConfigError, TrainConfig
from reference.errors import TrainingDiverged
from reference.layers.lsa import LSAParams
from reference.model import lsa_stack
from reference.optim import AdamHP, adam_init, adam_update, clip_by_value
from reference.sequences import SequenceSpec, code_tokens, seq_loss_and_grads
from reference.tolerances import assert_close
from verify.experiments import SEQ_EXPERIMENTS, get_experiment

from test_training import (checkpoint_of, eval_rows, inject_fault, interrupted_run, metrics_of, nan_params_at,
                           same_params, train)

SEQ_TINY = dict(task="lds", seq_len=6, seq_dim=3, batch=16, steps=30, eval_every=5, checkpoint_every=10,
                eval_tasks=40, line_search_tasks=40, backend="numpy", dtype="float64", causal=True, heads=2,
                key_size=4, value_size=4, token_clip=4.0, init_std=0.02, lr=1e-2, b2=0.999, grad_clip=None,
                elementwise_clip=1.0, weight_decay=0.1)


def seq_tiny(**kw):
    return TrainConfig().replace(**{**SEQ_TINY, **kw})


# ---- the optimiser: element-wise clip, then AdamW (optax.chain(clip, adamw)) ---------------

def _tree(rng, dtype=np.float64):
    return (LSAParams(*(rng.standard_normal(s).astype(dtype) for s in ((2, 3, 4), (2, 3, 4), (2, 3, 4), (2, 4, 3)))),)


def _hand_adamw(p, grads, lr, b1, b2, eps, wd, c):
    """optax.chain(optax.clip(c), optax.adamw(lr, b1, b2, eps, weight_decay=wd)) on one
    flat array, written out loop by loop (float64)."""
    p = p.astype(np.float64).ravel().copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float64).ravel()
        for i in range(p.size):
            gi = min(max(g[i], -c), c) if c is not None else g[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mh, vh = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * (mh / (np.sqrt(vh) + eps) + wd * p[i])
    return p


@pytest.mark.parametrize("wd,c", [(0.1, 1.0), (0.1, None), (0.0, 0.5)])
def test_adamw_matches_hand_loop(wd, c):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = [tuple(type(l)(*(2 * rng.standard_normal(a.shape) for a in l)) for l in params) for _ in range(4)]
    hp = AdamHP(lr=0.05, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None, weight_decay=wd, clip_value=c)
    p, st = params, adam_init(params)
    for g in grads:
        p, st, _ = adam_update(p, g, st, hp)
    for j, f in enumerate(params[0]._fields):
        want = _hand_adamw(params[0][j], [g[0][j] for g in grads], hp.lr, hp.b1, hp.b2, hp.eps, wd, c)
        assert_close(p[0][j].ravel(), want, "algebra", what=f"AdamW {f}")


def test_defaults_are_adam_bit_for_bit():
    """weight_decay 0 and no element-wise clip take Adam's expressions; a clip above every
    |g| changes nothing either (the clip is exact where it does not act)."""
    rng = np.random.default_rng(1)
    params = _tree(rng, np.float32)
    g = tuple(type(l)(*(rng.standard_normal(a.shape).astype(np.float32) for a in l)) for l in params)
    base = adam_update(params, g, adam_init(params), AdamHP(clip_norm=0.5))
    for hp in (AdamHP(clip_norm=0.5, weight_decay=0.0, clip_value=None), AdamHP(clip_norm=0.5, clip_value=1e6)):
        other = adam_update(params, g, adam_init(params), hp)
        assert same_params(base[0], other[0]) and base[2] == other[2]


def test_clip_by_value_and_reported_norm():
    rng = np.random.default_rng(2)
    params = _tree(rng)
    g = tuple(type(l)(*(3 * rng.standard_normal(a.shape) for a in l)) for l in params)
    clipped = clip_by_value(g, 1.0)
    for a, b in zip(g[0], clipped[0]):
        assert np.array_equal(b, np.clip(a, -1, 1))
    _, _, norm = adam_update(params, g, adam_init(params), AdamHP(clip_value=1.0, weight_decay=0.1))
    raw = np.sqrt(sum(float((a * a).sum()) for a in g[0]))
    assert norm == pytest.approx(raw, rel=1e-12)         # the norm of the raw gradient
    with pytest.raises(ValueError, match="weight_decay"):
        AdamHP(weight_decay=-1.0).validate()
    with pytest.raises(ValueError, match="clip_value"):
        AdamHP(clip_value=0.0).validate()


# ---- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("over,field", [
    (dict(backend="cupy"), "backend"), (dict(seq_variant="bogus"), "seq_variant"), (dict(d=4), "d:"),
    (dict(causal=False), "causal"), (dict(input_mask=99), "input_mask"), (dict(seq_len=0), "seq_len"),
    (dict(init_std=-1.0), "init_std"), (dict(weight_decay=-0.1), "weight_decay"), (dict(N=3), "N:"),
    (dict(elementwise_clip=0.0), "elementwise_clip")])
def test_bad_sequence_config_names_the_field(over, field):
    with pytest.raises(ConfigError, match=field):
        seq_tiny(**over)


def test_sequence_fields_refused_for_regression_and_optimiser_needs_numpy():
    with pytest.raises(ConfigError, match="seq_len"):
        TrainConfig(backend="numpy").replace(seq_len=10)
    with pytest.raises(ConfigError, match="input_mask"):
        TrainConfig(backend="numpy").replace(input_mask=2)
    with pytest.raises(ConfigError, match="weight_decay: only the numpy backend"):
        TrainConfig(backend="numba").replace(weight_decay=0.1)
    with pytest.raises(ConfigError, match="layer 0 .lsa. must be causal"):
        seq_tiny(causal=False, heads=1, key_size=None, value_size=None, token_clip=None, layers='[{"kind": "lsa"}]')


def test_experiments_are_valid_and_use_the_codes_settings():
    for name in SEQ_EXPERIMENTS:
        c = get_experiment(name).config
        o, m = c.optim, c.model
        assert (c.data.batch, o.elementwise_clip, o.weight_decay, o.grad_clip, m.init_std) == (256, 1.0, 0.1, None, 2e-4)
        assert trainer.memory_estimate(c)["total"] > 0
    assert get_experiment("seq_lsa1").config.model.input_mask == 20
    assert get_experiment("seq_lsa6").config.arch().n_layers == 6


# ---- the step, the init, the baselines' constructions ----------------------------------------

def test_step_equals_its_pieces():
    cfg = seq_tiny()
    state = trainer.init_state(cfg)
    stepper = trainer.make_stepper(cfg)
    seqs = stepper.sample(0)
    res = stepper.step(state.params, state.adam, 0)
    L, g, _ = seq_loss_and_grads(code_tokens(seqs.X), seqs.Y, state.params, cfg.arch(), 3, 0)
    p, st, norm = adam_update(state.params, g, state.adam, cfg.adam_hp())
    assert res.loss == L and res.grad_norm == norm and same_params(res.params, p)


def test_init_normal_draws_weights_and_keeps_lam():
    cfg = seq_tiny(layers='[{"kind": "mesa", "heads": 2, "key_size": 4, "value_size": 4}]', causal=False,
                   heads=1, key_size=None, value_size=None, token_clip=None, input_mask=6)
    (p,) = trainer.init_params(cfg)
    assert np.array_equal(p.lam, np.ones(2))
    assert 0.01 < p.W_Q.std() < 0.03 and p.W_Q.shape == (2, 4, 12)
    again = trainer.init_params(cfg)
    assert same_params((p,), again)


def test_prop2_layers_equal_the_matrix_form():
    X = SequenceSpec(T=7, B=5, d=3).sample(np.random.default_rng(3)).X
    for K in (2, 4):
        assert_close(S.prop2_layers_predict(X, 0.07, K), S.neumann_matrix_predict(X, 0.07, K), "construction",
                     what=f"Prop. 2, {K} layers")


def test_gd_weight_match_sees_through_the_symmetries():
    d, eta = 3, 0.04
    (c,) = (CC.causal_gd_layer(d, eta, layout="code"),)
    m = S.gd_weight_match(c, d, 2 * d)
    assert m["tensor_cos"] == pytest.approx(1.0) and m["scale"] == pytest.approx(eta) and m["tensor_rel_err"] < 1e-12
    # two heads that split the construction (scaled factors, halves of P), plus junk in masked channels
    s = LSAParams(*(np.concatenate([a, a], axis=0) for a in c))
    s = s._replace(W_Q=s.W_Q * np.array([2.0, 0.5])[:, None, None], P=s.P * np.array([0.25, 1.0])[:, None, None])
    s.W_K[:, :, :2 * d] = 7.0
    m2 = S.gd_weight_match(s, d, 2 * d)
    assert m2["tensor_cos"] == pytest.approx(1.0) and m2["scale"] == pytest.approx(eta)
    rng = np.random.default_rng(4)
    m3 = S.gd_weight_match(LSAParams(*(rng.standard_normal(a.shape) for a in c)), d, 2 * d)
    assert abs(m3["tensor_cos"]) < 0.5                                  # the metric can fail


def test_baselines_order_and_per_t():
    cfg = seq_tiny(n_layers=2, seq_len=12, eval_tasks=64, line_search_tasks=64)
    evals = trainer.eval_tasks(cfg)
    b = trainer.compute_baselines(cfg, evals)
    assert len(b["gd_per_t"]) == len(b["lstsq_per_t"]) == len(b["prop2_per_t"]) == 12
    assert b["lstsq_per_t"][-1] < b["prop2_per_t"][-1] < b["gd_per_t"][-1] and not b["failed"]
    assert b["cheb_steps"] == 2 and b["prop2_layers"] == 2


# ---- runs: resume bit for bit, divergence ----------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(dtype="float32", n_layers=2), dict(backend="numba", dtype="float32", n_layers=2)])
def test_resume_equals_uninterrupted_sequence(tmp_path, monkeypatch, kw):
    cfg = seq_tiny(**kw)
    full = train(cfg, tmp_path / "full")
    run = str(tmp_path / "cut")
    interrupted_run(monkeypatch, cfg, run, 15)
    assert checkpoint_of(run).step == 10
    resumed = train(cfg, run, resume=True)
    assert same_params(full.params, resumed.params), "resumed params differ from the uninterrupted run"
    assert eval_rows(metrics_of(run)) == eval_rows(full.history)
    rows = eval_rows(full.history)
    assert len(rows[-1]["per_t"]) == 6 and len(rows[-1]["pred_cos_gd_per_t"]) == 6


def test_divergence_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = seq_tiny()
    run = str(tmp_path / "d")
    with monkeypatch.context() as m:
        inject_fault(m, functools.partial(nan_params_at, 13))
        with pytest.raises(TrainingDiverged, match="step 14") as exc:
            train(cfg, run)
    assert exc.value.checkpoint_step == 10 and checkpoint_of(run).step == 10


def test_full_run_summary_and_plots(tmp_path):
    from verify import plots
    from verify.train_cli import summary_text

    res = train(seq_tiny(steps=10, heads=2, input_mask=6), tmp_path / "s", analyses=True)
    assert set(res.summary["gd_weights"]) == {"tensor_cos", "tensor_rel_err", "scale"}
    assert "weights vs the Prop. 1 construction" in summary_text(res)
    names = sorted(p.rsplit("/", 1)[-1] for p in plots.make_plots(str(tmp_path / "s")))
    assert names == ["alignment.png", "loss.png", "per_t.png"]
