"""Tests of run directories, format 2 (verify/runs.py), and of what runs them: the
checkpoint checksum, the summary digest, metrics.jsonl rebuilt from the checkpoint,
the run lock, the progress lines (verify/progress.py), the pool's cost order
(verify/pool.py) and which experiments the training claims prefetch.

Helpers (the tiny config, the fault injection, bit-for-bit comparison) are those of
tests/test_training.py. Every run is tiny (d=3, N=5, at most 40 steps)."""

import io
import json
import os
import shutil

import numpy as np
import pytest

from reference.config import ConfigError
from verify import runs
from verify.experiments import EXPERIMENTS
from verify.progress import Progress

from test_training import (ConfigFor, checkpoint_of, claims_training, eval_rows, interrupted_run, metrics_of,
                           same_params, tiny, train, without_seconds)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two finished 20-step runs (seeds 0 and 1), never written by the tests: copy first."""
    root = tmp_path_factory.mktemp("finished")
    for seed in (0, 1):
        train(tiny(steps=20, seed=seed), root / f"seed{seed}")
    return root


def copy_run(finished, tmp_path, seed=0, name="run"):
    dest = str(tmp_path / name)
    shutil.copytree(str(finished / f"seed{seed}"), dest)
    return dest


def _npz_arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---- the checkpoint's checksum -------------------------------------------------------------

def test_a_fresh_checkpoint_is_format_2_with_the_checksum_of_its_arrays(finished):
    path = os.path.join(str(finished / "seed0"), runs.CHECKPOINT_FILE)
    arrays = _npz_arrays(path)
    assert int(arrays["format_version"]) == 2
    stored = str(arrays.pop("checksum"))
    assert len(stored) == 64 and runs.arrays_checksum(arrays) == stored
    ck = runs.load_checkpoint(path)
    assert ck.version == 2 and ck.checksum == stored and ck.step == 20
    assert [r["step"] for r in ck.extra["history"]] == [0, 10, 20]


@pytest.mark.parametrize("entry", ["params.0.W_Q", "adam.v.0.P"])
def test_one_edited_byte_in_an_array_fails_the_checksum(finished, tmp_path, entry):
    run = copy_run(finished, tmp_path)
    path = os.path.join(run, runs.CHECKPOINT_FILE)
    arrays = _npz_arrays(path)
    edited = arrays[entry].copy()
    edited.reshape(-1).view(np.uint8)[3] ^= 1                    # one bit of one byte of one value
    assert np.isfinite(edited).all() and not np.array_equal(edited, arrays[entry])
    np.savez(path, **dict(arrays, **{entry: edited}))    # the stored checksum kept
    with pytest.raises(runs.CheckpointError, match="checksum mismatch"):
        runs.load_checkpoint(path)
    with pytest.raises(runs.CheckpointError, match="checksum mismatch"):
        train(tiny(steps=40), run, resume=True)
    np.savez(path, **arrays)                             # the original bytes again: accepted
    assert runs.load_checkpoint(path).checksum == str(arrays["checksum"])


def test_a_format_2_checkpoint_without_its_checksum_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    path = os.path.join(run, runs.CHECKPOINT_FILE)
    arrays = _npz_arrays(path)
    del arrays["checksum"]
    np.savez(path, **arrays)
    with pytest.raises(runs.CheckpointError, match="without its checksum"):
        runs.load_checkpoint(path)


# ---- the summary's digest ----------------------------------------------------------------

def _edit_json(path, edit):
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _edit_final_loss(summary):
    summary["final"]["loss"] *= 0.5


def _edit_lr(config):
    config["optim"]["lr"] = 0.002


def test_digest_matches_a_fresh_run(finished):
    for seed in (0, 1):
        assert runs.check_digest(str(finished / f"seed{seed}")) is None


def test_digest_names_an_edited_summary(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    _edit_json(os.path.join(run, runs.SUMMARY_FILE), _edit_final_loss)
    assert runs.check_digest(run) == ["summary.json was edited after the run wrote it"]


def test_digest_names_a_checkpoint_from_another_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    other = os.path.join(str(finished / "seed1"), runs.CHECKPOINT_FILE)
    shutil.copyfile(other, os.path.join(run, runs.CHECKPOINT_FILE))
    assert runs.check_digest(run) == ["checkpoint.npz is not the one the run ended with"]


def test_digest_names_an_edited_config(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    _edit_json(os.path.join(run, runs.CONFIG_FILE), _edit_lr)
    assert runs.check_digest(run) == ["config.json differs from the config that trained the run"]


def test_digest_names_changed_reference_sources(finished, monkeypatch):
    monkeypatch.setattr(runs, "reference_hash", lambda: "0" * 64)
    assert runs.check_digest(str(finished / "seed0")) == ["the reference/ sources changed since the run was trained"]


def test_a_run_with_an_edited_summary_is_not_reused(finished, tmp_path, monkeypatch, claims_training, capsys):
    from verify import registry

    ctx = registry.Context(mode="quick", seed=0, workdir=str(tmp_path), reuse_runs=True)
    cfg = tiny(steps=20)
    run = str(tmp_path / "quick" / f"{cfg.experiment}-seed0")
    shutil.copytree(str(finished / "seed0"), run)
    assert claims_training._run_dir(ctx, cfg) == run
    assert claims_training._reusable(ctx, cfg) is not None           # untouched: reusable
    _edit_json(os.path.join(run, runs.SUMMARY_FILE), _edit_final_loss)
    assert claims_training._reusable(ctx, cfg) is None
    assert "summary.json was edited" in capsys.readouterr().err
    monkeypatch.setattr(claims_training, "config_for", ConfigFor(cfg))
    r = claims_training.run_for(ctx, "one_layer", 0)                 # retrained instead
    with open(os.path.join(str(finished / "seed0"), runs.SUMMARY_FILE)) as f:
        original = json.load(f)["final"]["loss"]
    assert runs.check_digest(run) is None and r.summary["final"]["loss"] == original


# ---- metrics.jsonl rebuilt from the checkpoint ------------------------------------------------

def _delete(path):
    os.unlink(path)


def _garbage_middle_line(path):
    with open(path) as f:
        lines = f.readlines()
    assert len(lines) >= 4
    lines[2] = "{not json\n"
    with open(path, "w") as f:
        f.writelines(lines)


def _truncate_last_line(path):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[:-20])


@pytest.mark.parametrize("damage", [None, _delete, _garbage_middle_line, _truncate_last_line],
                         ids=["intact", "deleted", "garbage_middle_line", "truncated_last_line"])
def test_resume_rebuilds_damaged_metrics_from_the_checkpoint(tmp_path, monkeypatch, damage):
    cfg = tiny(steps=40, eval_every=10, checkpoint_every=20)
    full = train(cfg, tmp_path / "full")
    run = str(tmp_path / "cut")
    interrupted_run(monkeypatch, cfg, run, 35)             # rows 0..30 written, checkpoint at 20
    path = os.path.join(run, runs.METRICS_FILE)
    assert [r.get("step") for r in metrics_of(run)] == [None, 0, 10, 20, 30]
    assert checkpoint_of(run).step == 20
    if damage is not None:
        damage(path)
    messages = []
    train(cfg, run, resume=True, log=messages.append)
    assert without_seconds(metrics_of(run)) == without_seconds(metrics_of(tmp_path / "full"))
    assert eval_rows(metrics_of(run)) == eval_rows(full.history)
    rebuilt = [m for m in messages if "rebuilt" in m]
    assert len(rebuilt) == (0 if damage is None else 1), messages


def test_load_run_rebuilds_deleted_metrics_from_the_checkpoint(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = metrics_of(run)
    assert [r["kind"] for r in before] == ["baselines", "eval", "eval", "eval"]
    os.unlink(os.path.join(run, runs.METRICS_FILE))
    _, ck, rows, _ = runs.load_run(run)
    assert ck.step == 20 and rows == before                 # timings included: stored as written
    assert runs.load_result(run).history == before[1:]


def test_a_damaged_metrics_line_loses_only_itself_and_is_reported(tmp_path):
    path = str(tmp_path / "m.jsonl")
    with open(path, "w") as f:
        f.write('{"kind": "baselines"}\n{"kind": "eval", "step": 0}\n{bad\n{"kind": "eval", "step": 10}\n')
    rows, problem = runs.read_metrics(path)
    assert problem == "line 3 is not JSON"
    assert rows == [{"kind": "baselines"}, {"kind": "eval", "step": 0}, {"kind": "eval", "step": 10}]
    assert runs.read_metrics(str(tmp_path / "none.jsonl")) == ([], "missing")


# ---- the run lock ------------------------------------------------------------------------------

def test_a_locked_run_directory_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    with runs.RunLock(run):
        with pytest.raises(ConfigError, match="in use"):
            train(tiny(steps=40), run, resume=True)
        with pytest.raises(ConfigError, match="in use"):
            train(tiny(steps=20), run, overwrite=True)
        assert checkpoint_of(run).step == 20
    resumed = train(tiny(steps=40), run, resume=True)        # released: the run continues
    assert checkpoint_of(run).step == 40 and same_params(resumed.params, checkpoint_of(run).params)


# ---- progress -----------------------------------------------------------------------------------

def test_progress_off_a_terminal_prints_one_line_per_evaluation():
    stream = io.StringIO()
    train(tiny(steps=20), progress=Progress(20, stream=stream, enabled=True))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert [ln.split(":")[0] for ln in lines] == ["step 0/20", "step 10/20", "step 20/20"]
    assert all("eval " in ln and "cos(GD)" in ln for ln in lines)


def test_progress_disabled_prints_nothing():
    stream = io.StringIO()
    train(tiny(steps=20), progress=Progress(20, stream=stream, enabled=False))
    assert stream.getvalue() == ""


# ---- the pool and the prefetch -------------------------------------------------------------------

def test_estimated_cost_orders_the_experiments_longest_first():
    from verify.pool import estimated_cost

    cost = {name: estimated_cost(e.config) for name, e in EXPERIMENTS.items()}
    assert cost["layers5"] > cost["recurrent10"] > cost["recurrent2"] > cost["one_layer"] > 0
    base = tiny(steps=40, gdpp_steps=0)
    for field, more in (("steps", 80), ("batch", 128), ("n_layers", 2), ("heads", 2), ("d", 4), ("N", 6),
                        ("eval_tasks", 400), ("gdpp_steps", 5)):
        assert estimated_cost(base.replace(**{field: more})) > estimated_cost(base), field


def test_prefetch_trains_the_experiments_of_the_selected_claims():
    from verify import registry
    from verify.claims_training import _selected_experiments

    def selected(ids):
        return _selected_experiments(registry.Context(selected=ids))

    assert selected(["training.recurrent2.below_gd2"]) == ["recurrent2"]
    assert selected(["training.layers5.x", "training.one_layer.loss_equals_gd1", "prop1.float64"]) == [
        "layers5", "one_layer"]
    assert selected(["prop1.float64", "training.no_such.claim"]) == []
    from verify.claims_training import QUICK

    assert selected(None) == sorted(e for e in EXPERIMENTS if e in QUICK)      # quick mode: quick experiments only
    full = lambda ids: _selected_experiments(registry.Context(mode="full", selected=ids))
    assert full(None) == sorted(EXPERIMENTS)
    assert full(["training.sine.partial_cosine"]) == ["sine", "sine_mlp_gd"]  # the claim also reads MLP + GD
    assert full(["training.softmax1.misses_gd1"]) == ["softmax1"] and selected(["training.softmax1.misses_gd1"]) == []

