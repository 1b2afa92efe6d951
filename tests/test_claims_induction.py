"""Meta-tests of the classic-token training claims (verify/claims_induction.py): each
checker, fed synthetic runs, passes on what the paper describes and fails on what it
does not. No training here; the real runs are full-mode only."""

import json

import numpy as np
import pytest

from reference.config import TrainConfig
from verify import claims_induction as CI
from verify.registry import Context, discover, run_claim
from verify.runs import RunResult

GD1, ZERO = 0.21, 0.42
LAYERS = json.dumps([{"kind": "posenc", "mode": "concat", "width": 6}, {"kind": "softmax"}, {"kind": "lsa"}])


def fake_run(seed=0, final=0.212, copy_at=3000, drop_at=3500, copy_other=0.05, copy_end=0.95, gd=GD1):
    """A run whose copy_next jumps to copy_end at copy_at and whose loss falls from the
    zero predictor's plateau to ``final`` at drop_at (evaluations every 500 steps)."""
    cfg = TrainConfig(backend="numpy", seed=seed, steps=10_000).replace(
        tokens="classic", layers=LAYERS, d=3, N=2, eval_every=500, eval_tasks=64, line_search_tasks=64)
    hist = []
    for s in range(0, 10_001, 500):
        loss = 0.9 if s == 0 else (ZERO if s < drop_at else final)
        hist.append({"kind": "eval", "step": s, "loss": loss, "copy_self": 0.02,
                     "copy_next": copy_end if s >= copy_at else 0.01, "copy_other": copy_other})
    base = {"gd_loss": gd, "zero_loss": ZERO, "gd_eta": 1.0}
    return RunResult(cfg, None, base, hist, {"final": {"step": 10_000, "loss": final}}, None)


@pytest.fixture(scope="module")
def claims():
    return discover()


def outcome(claims, monkeypatch, cid, rs):
    monkeypatch.setattr(CI, "runs", lambda ctx, exp: rs)
    row = run_claim(claims[cid], Context(mode="full"))
    assert row["error"] is None, row.get("traceback")
    return row


@pytest.mark.parametrize("cid, good, bad", [
    ("training.induction.loss_equals_gd1", {}, {"final": 0.25}),
    ("training.induction.learns_to_copy", {}, {"copy_end": 0.4}),
    ("training.induction.others_stay_small", {}, {"copy_other": 0.3}),
    ("training.induction.copy_before_drop", {}, {"copy_at": 4500}),
    ("training.induction.copy_before_drop", {"copy_at": 3500}, {"copy_at": 10_500}),   # never copies: fails
    ("training.induction_linear.misses_gd1", {"final": 0.40}, {"final": 0.215}),
])
def test_each_checker_passes_the_paper_and_fails_otherwise(claims, monkeypatch, cid, good, bad):
    assert outcome(claims, monkeypatch, cid, [fake_run(s, **good) for s in range(3)])["passed"]
    worse = [fake_run(0), fake_run(1, **bad), fake_run(2)]
    assert not outcome(claims, monkeypatch, cid, worse)["passed"], "one bad seed must fail the claim"


def test_the_loss_drop_is_measured_from_the_zero_predictor_not_step_0():
    """Step 0 (0.9, the readout's offset) to the zero predictor's plateau is not the drop:
    the copy at 3000 is before the drop at 3500 although the loss halved by step 500."""
    t = CI.copy_timing(fake_run())
    assert (t["copy_next_reaches_0.5"], t["loss_below_midpoint"]) == (3000, 3500)


def test_not_gd2_compares_with_gd2_on_the_same_tasks(claims, monkeypatch):
    r = fake_run()
    gd2, _ = CI.gd2_loss(r)
    at_gd1 = [fake_run(final=1.4 * gd2)]
    assert outcome(claims, monkeypatch, "training.induction.not_gd2", at_gd1)["passed"]
    at_gd2 = [fake_run(final=1.02 * gd2)]
    assert not outcome(claims, monkeypatch, "training.induction.not_gd2", at_gd2)["passed"]


def test_copy_band_is_high_for_the_softmax_copy_construction_and_low_at_random(claims, monkeypatch):
    """The attention-band checker on real weights: the Prop. 3 softmax copy layer (where
    R1 and R2 hold: d = 3, N = 2, P = 8) attends from each x token to its label's token;
    a random small init attends about uniformly (1 / (2N) each) and fails."""
    from reference import copy_construction as CC
    from reference.layers import InitSettings

    layers = json.dumps([{"kind": "posenc", "mode": "concat", "width": 8}, {"kind": "softmax"},
                         {"kind": "lsa", "merged": True}])
    cfg = TrainConfig(backend="numpy", dtype="float64").replace(tokens="classic", layers=layers, d=3, N=2)
    arch, params = CC.fit_copy_layers(3, 2, 8, 1, eta=0.5, form="softmax", beta=30.0)
    assert cfg.arch() == arch
    good = RunResult(cfg, params, {}, [], {}, None)
    assert CI.copy_band(good)["band"] > 0.99
    rnd = arch.init(np.random.default_rng(0), cfg.layout().D_in, InitSettings(scale=0.01))
    bad = RunResult(cfg, rnd, {}, [], {}, None)
    assert abs(CI.copy_band(bad)["band"] - 0.25) < 0.02
    assert outcome(claims, monkeypatch, "training.induction.attention_band", [good])["passed"]
    assert not outcome(claims, monkeypatch, "training.induction.attention_band", [good, bad])["passed"]
