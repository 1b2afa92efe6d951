"""Regression tests of the hardening of training runs (items 1, 4-8 of the hardening
issue): analyses that cannot be computed, divergence by loss growth, failed baselines,
the memory check, output directories, checkpoint validation, metrics recovery; and a
property test of checkpoint corruption (every damaged file is refused with
CheckpointError, or reads back as the same checkpoint).

Every run is tiny (d=3, N=5, a few dozen steps)."""

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import reference as R
from reference import analysis as A
from reference import trainer
from reference.config import ConfigError
from reference.errors import TrainingDiverged
from verify import runs

from test_training import checkpoint_of, metrics_of, tiny, train


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfinished")
    train(tiny(steps=20), root / "run")
    return root / "run"


def copy_run(finished, tmp_path, name="run"):
    dest = tmp_path / name
    shutil.copytree(str(finished), str(dest))
    return dest


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _rewrite(path, arrays, refresh_checksum=True):
    """Write a hand-made checkpoint (the checksum recomputed unless told otherwise)."""
    arrays = dict(arrays)
    if refresh_checksum:
        arrays.pop("checksum", None)
        arrays["checksum"] = np.array(runs.arrays_checksum(arrays))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


# ---- 1. an analysis that cannot be computed ---------------------------------------------

def _exploding_layer(d, N):
    """A one-layer model whose damped roll-out overflows float32 (a GD layer with a huge step)."""
    return (R.gd_layer(d, 1, N, 1e4, dtype=np.float32),)


def test_final_analyses_record_an_analysis_that_cannot_be_computed():
    cfg = tiny(steps=20, rollout_steps=50)
    evals = trainer.eval_tasks(cfg)
    base = trainer.compute_baselines(cfg, evals)
    out = A.final_analyses(cfg, _exploding_layer(3, 5), base, evals)
    ro = out["rollout"]
    assert "skipped" in ro and "rollout" in ro["skipped"], ro
    assert "ood" in out and "weights" in out          # the other analyses are still there


def test_a_run_whose_rollout_overflows_still_writes_its_summary_and_plots(tmp_path, monkeypatch):
    from verify import plots

    real = trainer.train_loop

    def explode(cfg, state, es, observer=None, stepper=None):
        state = real(cfg, state, es, observer, stepper)
        return state._replace(params=_exploding_layer(3, 5))

    monkeypatch.setattr(trainer, "train_loop", explode)
    run = tmp_path / "r"
    res = runs.train_run(tiny(steps=20, rollout_steps=50), str(run))
    assert "skipped" in res.summary["rollout"]
    assert json.loads((run / "summary.json").read_text())["rollout"]["skipped"]
    assert plots.make_plots(str(run))                    # plots drawn, the roll-out one left out
    assert not (run / "plots" / "rollout.png").exists()


# ---- 4. divergence by loss growth, failed baselines --------------------------------------

def test_a_run_that_blows_up_but_stays_finite_stops_with_the_step_named(tmp_path):
    cfg = tiny(lr=3.0, grad_clip=None, steps=200, eval_every=10, checkpoint_every=10)
    with pytest.raises(TrainingDiverged) as ei:
        train(cfg, tmp_path / "d")
    msg = str(ei.value)
    assert "diverged" in msg and f"step {ei.value.step} of 200" in msg and "eval loss" in msg
    assert ei.value.step < 200


def test_divergence_decision_survives_a_resume(tmp_path, monkeypatch):
    """The rule's state is in the checkpoint: a resumed run stops at the same step."""
    from test_training import interrupted_run

    cfg = tiny(lr=3.0, grad_clip=None, steps=200, eval_every=10, checkpoint_every=10)
    with pytest.raises(TrainingDiverged) as full:
        train(cfg, tmp_path / "a")
    stop = full.value.step
    run = tmp_path / "b"
    interrupted_run(monkeypatch, cfg, str(run), at=stop - 5)
    monkeypatch.undo()
    ck = checkpoint_of(str(run))
    assert "divergence" in ck.extra
    with pytest.raises(TrainingDiverged) as resumed:
        runs.train_run(cfg, str(run), resume=True)
    assert resumed.value.step == stop


def test_a_baseline_worse_than_predicting_zero_is_reported_failed():
    cfg = tiny(gdpp_lr=1e8, gdpp_steps=20)
    evals = trainer.eval_tasks(cfg)
    lines = []
    base = trainer.compute_baselines(cfg, evals, log=lines.append)
    assert base["zero_loss"] > 0
    assert "gdpp" in base["failed"] and base["gdpp_loss"] > base["zero_loss"]
    assert any("warning" in line.lower() and "GD++" in line for line in lines)


# ---- 5. memory -------------------------------------------------------------------------------

@pytest.mark.parametrize("over", [dict(batch=1_000_000_000), dict(d=100_000), dict(eval_tasks=1_000_000_000)])
def test_a_run_that_cannot_fit_in_memory_is_refused_before_work(tmp_path, over):
    cfg = tiny(**over)
    with pytest.raises(ConfigError, match=r"needs about .* of memory.*available"):
        runs.check_runnable(cfg)
    with pytest.raises(ConfigError, match="memory"):
        runs.train_run(cfg, str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_the_memory_estimate_grows_with_the_sizes():
    small = trainer.memory_estimate(tiny())
    assert small["total"] > 0 and set(small["parts"]) >= {"params", "eval"}
    assert set(small["passes"]) == {"train_step", "eval_pass", "line_search", "gdpp_step", "ood_point"}
    assert trainer.memory_estimate(tiny(batch=640))["total"] > small["total"]
    assert trainer.memory_estimate(tiny(n_layers=4))["total"] > small["total"]


# ---- 6. output directories ------------------------------------------------------------------

def test_out_pointing_at_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        runs.train_run(tiny(steps=10), str(f))
    assert f.read_text() == "x"


def test_out_dev_null_is_a_clear_error():
    with pytest.raises(ConfigError, match="not a directory"):
        runs.train_run(tiny(steps=10), "/dev/null")


def test_a_run_killed_before_its_first_checkpoint_can_be_rerun(tmp_path, monkeypatch):
    from test_training import interrupted_run

    run = tmp_path / "k"
    cfg = tiny(steps=40, checkpoint_every=20)
    # killed before step 20 (the checkpoint at step 0 exists): simulate the worse case, no checkpoint
    interrupted_run(monkeypatch, cfg, str(run), at=5)
    monkeypatch.undo()
    os.unlink(run / runs.CHECKPOINT_FILE)
    with pytest.raises(runs.CheckpointError, match="--overwrite"):
        runs.train_run(cfg, str(run), resume=True)
    res = runs.train_run(cfg, str(run))                   # a plain rerun replaces the unfinished run
    assert res.history[-1]["step"] == 40


def test_existing_run_message_names_overwrite(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    with pytest.raises(ConfigError, match="--overwrite"):
        runs.train_run(tiny(steps=20), str(run))


def test_stale_temporary_checkpoints_are_removed(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    stale = run / ".ckpt-abc123.npz"
    stale.write_bytes(b"half")
    runs.train_run(tiny(steps=30), str(run), resume=True)
    assert not stale.exists()


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "u"
        train(tiny(steps=10), run)
    finally:
        os.umask(old)
    for name in runs.RUN_FILES:
        assert (os.stat(run / name).st_mode & 0o777) == 0o644, name


# ---- 7. checkpoint validation ---------------------------------------------------------------

def _hand_made(finished, tmp_path, edit):
    run = copy_run(finished, tmp_path)
    path = run / runs.CHECKPOINT_FILE
    arrays = _arrays(path)
    edit(arrays)
    _rewrite(path, arrays)
    return str(path), str(run)


def _cfg_json(arrays, **changes):
    cfg = json.loads(str(arrays["config"]))
    for k, v in changes.items():
        g, n = k.split(".")
        cfg[g][n] = v
    arrays["config"] = np.array(json.dumps(cfg))


BAD_CHECKPOINTS = {
    "wrong shape": (lambda a: a.__setitem__("params.0.W_Q", np.zeros((1, 2, 4), np.float32)), "shape"),
    "float64 params": (lambda a: a.__setitem__("params.0.W_Q", a["params.0.W_Q"].astype(np.float64)), "dtype"),
    "int params": (lambda a: a.__setitem__("params.0.P", np.zeros(a["params.0.P"].shape, np.int32)), "dtype"),
    "complex params": (lambda a: a.__setitem__("params.0.P", a["params.0.P"].astype(np.complex64)), "dtype"),
    "negative step": (lambda a: a.__setitem__("step", np.array(-3)), "step"),
    "fractional step": (lambda a: a.__setitem__("step", np.array(2.5)), "step"),
    "Adam count disagrees": (lambda a: a.__setitem__("adam.t", np.array(7)), "adam.t"),
    "NaN moment": (lambda a: a.__setitem__("adam.m.0.W_K", a["adam.m.0.W_K"] * np.nan), "adam.m"),
    "negative second moment": (lambda a: a.__setitem__("adam.v.0.W_V", -np.abs(a["adam.v.0.W_V"]) - 1), "adam.v"),
    "extra array": (lambda a: a.__setitem__("params.1.W_Q", a["params.0.W_Q"]), "unexpected"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_hand_made_checkpoints_are_refused_with_the_reason(finished, tmp_path, case):
    edit, match = BAD_CHECKPOINTS[case]
    path, run = _hand_made(finished, tmp_path, edit)
    with pytest.raises(runs.CheckpointError, match=match):
        runs.load_checkpoint(path)
    with pytest.raises(runs.CheckpointError):
        runs.train_run(tiny(steps=30), run, resume=True)


def _flip(data, pos, bit):
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def _one_kind_model(kind):
    """A tiny config whose model uses layer kind ``kind`` (alone, or followed by an lsa
    layer when alone it has no parameters or changes the width)."""
    for layers in ([{"kind": kind}], [{"kind": kind}, {"kind": "lsa"}]):
        try:
            return tiny(steps=20, layers=json.dumps(layers)) if kind != "lsa" else tiny(steps=20)
        except ConfigError:
            continue
    raise AssertionError(f"no tiny model for layer kind {kind!r}: add one here")


@pytest.fixture(scope="module", params=sorted(R.layer_types()))
def finished_per_kind(request, tmp_path_factory):
    """A finished 20-step run for every registered layer kind (the fuzz below covers a
    new kind by its registration)."""
    root = tmp_path_factory.mktemp(f"kind-{request.param}")
    train(_one_kind_model(request.param), root / "run")
    return root / "run"


@settings(max_examples=40, deadline=None)
@given(frac=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_single_bit_flip_is_refused_or_harmless(finished_per_kind, tmp_path_factory, frac, bit):
    """A damaged checkpoint is refused with CheckpointError (never another exception), or
    it reads back as exactly the original checkpoint (a flip in zip metadata that changes
    no content)."""
    finished = finished_per_kind
    src = finished / runs.CHECKPOINT_FILE
    data = src.read_bytes()
    path = tmp_path_factory.mktemp("flip") / "checkpoint.npz"
    path.write_bytes(_flip(data, int(frac * len(data)), bit))
    try:
        ck = runs.load_checkpoint(str(path))
    except runs.CheckpointError:
        return
    ref = runs.load_checkpoint(str(src))
    assert ck.checksum == ref.checksum and ck.step == ref.step


# ---- 8. metrics recovery --------------------------------------------------------------------

def test_deleted_metrics_keep_the_loss_plot(finished, tmp_path):
    from verify import plots

    run = copy_run(finished, tmp_path)
    os.unlink(run / runs.METRICS_FILE)
    paths = plots.make_plots(str(run))
    assert any(p.endswith("loss.png") for p in paths)


def test_a_garbage_line_loses_only_itself_and_the_loss_says_so(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    path = run / runs.METRICS_FILE
    lines = path.read_text().splitlines()
    lines[2] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    cfg, ck, rows, summary = runs.load_run(str(run))
    assert [r["step"] for r in rows if r.get("kind") == "eval"] == [0, 10, 20]
    rec = runs.recover_metrics(str(run))
    assert rec["rebuilt"] and "line 3" in " ".join(rec["problems"])


def test_a_truncated_last_line_is_rewritten_on_resume(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    path = run / runs.METRICS_FILE
    text = path.read_text()
    path.write_text(text[: len(text) - 20])
    runs.train_run(tiny(steps=30), str(run), resume=True)
    for line in path.read_text().splitlines():
        json.loads(line)
    assert [r["step"] for r in metrics_of(str(run)) if r.get("kind") == "eval"] == [0, 10, 20, 30]


def test_an_overflow_inside_a_step_is_divergence_not_a_traceback(tmp_path):
    """A deep NumPy-backend run whose intermediate tokens overflow inside a step (the
    layer checks raise NonFiniteError there) stops as a divergence, naming the step."""
    cfg = tiny(n_layers=3, lr=5.0, grad_clip=None, steps=300, eval_every=10, checkpoint_every=10)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ of 300: .*NaN or infinite"):
        with np.errstate(over="ignore", invalid="ignore"):
            train(cfg, tmp_path / "o")


# ---- found in review -----------------------------------------------------------------------

def test_a_resume_that_is_already_finished_keeps_a_valid_digest(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    runs.train_run(tiny(steps=20), str(run), resume=True)      # nothing left to train: no new checkpoint
    assert runs.check_digest(str(run)) is None


def test_edited_metrics_rows_are_replaced_by_the_checkpoints(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    path = run / runs.METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["loss"] = 123.0                                     # still valid JSON, wrong value
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = runs.recover_metrics(str(run))
    assert "differ from the checkpoint" in rec["note"]
    assert 123.0 not in [r.get("loss") for r in rec["rows"]]


@pytest.mark.parametrize("bad", [dict(b1=1.0), dict(b2=1.0), dict(eps=0.0)])
def test_adam_settings_that_divide_by_zero_are_refused(bad):
    from reference.optim import AdamHP

    with pytest.raises(ValueError, match=next(iter(bad))):
        AdamHP(**bad).validate()
    if "eps" in bad:
        with pytest.raises(ConfigError, match="eps"):
            tiny(**bad)


def test_the_pool_refuses_two_jobs_of_one_config(tmp_path):
    from verify.pool import train_all

    cfg = tiny(steps=10)
    with pytest.raises(ValueError, match="same config"):
        train_all([(cfg, str(tmp_path / "a")), (cfg, str(tmp_path / "b"))])


def _numba_threads():
    import numba
    return numba.get_num_threads()


def test_pool_workers_pin_their_numba_threads_to_cores_per_worker():
    """verify.pool's initializer in a spawned worker, as train_all starts it: W workers on
    C cores get C // W threads each (at least 1), so two workers on 2 cores run 1 each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from verify.pool import pin_threads, threads_per_worker

    assert threads_per_worker(os.cpu_count()) == 1 and threads_per_worker(1) == (os.cpu_count() or 1)
    assert threads_per_worker(10 * (os.cpu_count() or 1)) == 1
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=pin_threads,
                             initargs=(1,)) as pool:
        assert pool.submit(_numba_threads).result() == 1


def test_vectors_write_to_a_file_is_a_usage_error(tmp_path, capsys):
    from verify import cli

    f = tmp_path / "f"
    f.write_text("x")
    assert cli.main(["vectors", "write", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err and f.read_text() == "x"


def test_a_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch):
    """SIGINT arriving in the middle of a checkpoint's serialisation is delivered once the
    checkpoint is whole (found as a flaky CLI test: numpy's zip writer turned the
    interrupt into a ValueError)."""
    import signal

    real = runs.save_checkpoint
    calls = []

    def interrupted_save(path, cfg, step, params, state, extra):
        calls.append(step)
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)       # pending until the deferral ends
        return real(path, cfg, step, params, state, extra)

    monkeypatch.setattr(runs, "save_checkpoint", interrupted_save)
    run = tmp_path / "c"
    with pytest.raises(runs.RunInterrupted) as ei:
        runs.train_run(tiny(steps=40, checkpoint_every=10), str(run))
    assert ei.value.checkpoint_step == 10 and calls == [0, 10]
    assert runs.load_checkpoint(str(run / runs.CHECKPOINT_FILE)).step == 10
    assert not [n for n in os.listdir(run) if n.startswith(".")]
