"""Tests of run records (``verify.records``, ``icgd record``): the committed config.json
and summary.json of a finished sequence run, which ``verify --reuse-runs`` reads when
the work directory has no run, and only while the record is intact.

The runs are the tiny sequence runs of test_sequence_training (a second each)."""

import argparse
import json
import os

import pytest

from verify import records, registry, runs as R
from verify.experiments import get_experiment

from test_sequence_training import seq_tiny
from test_training import CountingTrainRun, claims_training, tiny, train  # noqa: F401 (fixture)


class ModeConfigFor:
    """claims_training.config_for answering one mode only (the other raises KeyError, as
    an unknown experiment does)."""

    def __init__(self, mode, base):
        self.mode, self.base = mode, base

    def __call__(self, ctx, experiment, seed):
        if ctx.mode != self.mode or experiment != self.base.experiment:
            raise KeyError(experiment)
        return self.base.replace(seed=seed)


SEQ = dict(experiment="seq_lsa1", steps=10, eval_every=5, checkpoint_every=5)


@pytest.fixture
def seq_run(tmp_path, monkeypatch, claims_training):  # noqa: F811 (the fixture)
    """(config, run dir) of a finished tiny sequence run that verify's full mode asks for."""
    cfg = seq_tiny(**SEQ)
    monkeypatch.setattr(claims_training, "config_for", ModeConfigFor("full", cfg))
    run = tmp_path / "trained" / "seq_lsa1-seed0"
    train(cfg, run)
    return cfg, str(run)


def _cli(*argv):
    p = argparse.ArgumentParser()
    records.add_arguments(p)
    return records.run(p.parse_args(list(argv)))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _edit_summary(path, fn):
    with open(path) as f:
        s = json.load(f)
    fn(s)
    with open(path, "w") as f:
        json.dump(s, f)


def test_a_record_answers_verify_without_training(seq_run, tmp_path, monkeypatch, claims_training, capsys):  # noqa: F811
    cfg, run = seq_run
    root = str(tmp_path / "records")
    assert _cli(run, "--into", root) == 0
    dest = os.path.join(root, "full", "seq_lsa1-seed0")
    assert sorted(os.listdir(dest)) == ["config.json", "provenance.json", "summary.json"]
    for name in records.RECORD_FILES:
        assert _read(os.path.join(dest, name)) == _read(os.path.join(run, name))
    with open(os.path.join(dest, records.PROVENANCE_FILE)) as f:
        prov = json.load(f)
    with open(os.path.join(run, R.SUMMARY_FILE)) as f:
        assert prov["reference_hash"] == json.load(f)["digest"]["reference"] == R.reference_hash()
    assert prov["from"] == os.path.abspath(run) and prov["machine"]["cpus"] == os.cpu_count()
    assert "added" in capsys.readouterr().out
    assert _cli(run, "--into", root) == 0 and "unchanged" in capsys.readouterr().out

    counter = CountingTrainRun(R.train_run)
    monkeypatch.setattr(R, "train_run", counter)
    ctx = registry.Context(mode="full", workdir=str(tmp_path / "work"), reuse_runs=True, records=root)
    r = claims_training.run_for(ctx, "seq_lsa1", 0)
    assert counter.trained == [], "the recorded run was retrained"
    with open(os.path.join(run, R.SUMMARY_FILE)) as f:
        assert r.summary == json.load(f)
    assert r.baselines == r.summary["baselines"] and r.params is None and r.history == [r.summary["final"]]
    assert any(d.startswith(dest) and "committed record" in d for d in registry.reused_runs())

    claims_training._MEMO.clear()                      # without --reuse-runs the record is not read
    no_reuse = registry.Context(mode="full", workdir=str(tmp_path / "work2"), reuse_runs=False, records=root)
    claims_training.run_for(no_reuse, "seq_lsa1", 0)
    assert len(counter.trained) == 1
    claims_training._MEMO.clear()                      # another seed has no record: trained
    claims_training.run_for(ctx, "seq_lsa1", 1)
    assert counter.trained[-1][0] == 1

    assert _cli("--list", "--into", root) == 0
    out = capsys.readouterr().out
    assert f"usable    {dest}" in out and "1 records" in out and "1 usable now" in out


@pytest.mark.parametrize("damage, reason", [
    ("summary", "summary.json was edited"),
    ("config", "config.json differs"),
    ("reference", "the reference/ sources changed"),
    ("unreadable", "unreadable record"),
])
def test_a_damaged_or_stale_record_is_named_and_not_used(seq_run, tmp_path, monkeypatch, claims_training,  # noqa: F811
                                                         capsys, damage, reason):
    cfg, run = seq_run
    root = str(tmp_path / "records")
    dest, status = records.add(run, root)
    assert status == "added"
    if damage == "summary":
        _edit_summary(os.path.join(dest, R.SUMMARY_FILE), lambda s: s["final"].update(loss=0.0))
    elif damage == "config":
        with open(os.path.join(dest, R.CONFIG_FILE)) as f:
            c = json.load(f)
        c["optim"]["lr"] = 0.5
        with open(os.path.join(dest, R.CONFIG_FILE), "w") as f:
            json.dump(c, f)
    elif damage == "reference":
        monkeypatch.setattr(R, "reference_hash", lambda: "0" * 64)
    else:
        with open(os.path.join(dest, R.SUMMARY_FILE), "w") as f:
            f.write("{not json")
    capsys.readouterr()
    assert records.find(root, "full", cfg) is None
    assert reason in capsys.readouterr().err
    counter = CountingTrainRun(R.train_run)
    monkeypatch.setattr(R, "train_run", counter)
    ctx = registry.Context(mode="full", workdir=str(tmp_path / "work"), reuse_runs=True, records=root)
    claims_training.run_for(ctx, "seq_lsa1", 0)
    assert len(counter.trained) == 1, "a damaged record was used instead of training"
    assert _cli("--list", "--into", root) == 0
    assert "unusable" in capsys.readouterr().out


def test_the_record_of_another_mode_or_config_is_not_used(seq_run, tmp_path):
    cfg, run = seq_run
    root = str(tmp_path / "records")
    records.add(run, root)
    assert records.find(root, "full", cfg) is not None
    assert records.find(root, "quick", cfg) is None
    assert records.find(root, "full", cfg.replace(lr=5e-3)) is None


def test_what_cannot_be_recorded_is_refused_before_anything_is_written(seq_run, tmp_path, monkeypatch, capsys):
    cfg, run = seq_run
    root = str(tmp_path / "records")
    unfinished = tmp_path / "unfinished"
    train(cfg, unfinished)
    os.unlink(unfinished / R.SUMMARY_FILE)
    other = tmp_path / "override"
    train(cfg.replace(lr=3e-3), other)                     # not verify's config
    icml = tmp_path / "icml"
    train(tiny(steps=4), icml)                             # not a sequence experiment
    cases = [(str(tmp_path / "nowhere"), "not a directory"), (str(unfinished), "not a finished run"),
             (str(other), "not verify's quick or full config"), (str(icml), "not a sequence experiment")]
    for d, why in cases:
        with pytest.raises(records.RecordError, match=why):
            records.prepare(d, root)
        assert _cli(run, d, "--into", root) == 2           # one bad run: nothing is written, not even the good one
        assert why in capsys.readouterr().err
        assert not os.path.exists(root)
    monkeypatch.setattr(R, "reference_hash", lambda: "f" * 64)
    with pytest.raises(records.RecordError, match="digest does not match.*reference/ sources changed"):
        records.prepare(run, root)


def test_a_record_of_another_run_is_replaced_only_when_asked(seq_run, tmp_path, capsys):
    cfg, run = seq_run
    root = str(tmp_path / "records")
    dest, _ = records.add(run, root)
    again = tmp_path / "again"
    train(cfg, again)                                      # the same config trained again: other timings
    if _read(again / R.SUMMARY_FILE) == _read(os.path.join(run, R.SUMMARY_FILE)):
        pytest.skip("the retrained summary is byte-identical (no timing field differs)")
    before = _read(os.path.join(dest, R.SUMMARY_FILE))
    with pytest.raises(records.RecordError, match="holds another run.*--replace"):
        records.add(str(again), root)
    assert _read(os.path.join(dest, R.SUMMARY_FILE)) == before
    assert _cli(str(again), "--into", root, "--replace") == 0 and "replaced" in capsys.readouterr().out
    assert _read(os.path.join(dest, R.SUMMARY_FILE)) == _read(again / R.SUMMARY_FILE)
    assert sorted(os.listdir(os.path.dirname(dest))) == ["seq_lsa1-seed0"]     # no temporary folder left
    with open(os.path.join(dest, records.PROVENANCE_FILE)) as f:
        assert json.load(f)["from"] == os.path.abspath(str(again))


def test_two_runs_of_one_record_are_refused(seq_run, tmp_path, capsys):
    cfg, run = seq_run
    copy = tmp_path / "copy"
    train(cfg, copy)
    assert _cli(run, str(copy), "--into", str(tmp_path / "records")) == 2
    assert "several run directories would write the record" in capsys.readouterr().err


def test_cli_usage_errors(capsys):
    assert _cli() == 2 and "give run directories" in capsys.readouterr().err
    assert _cli("--list", "x") == 2 and "takes no run directories" in capsys.readouterr().err


# ---- sweeps: icgd sweep --records -----------------------------------------------------------------

def _seq_spec(**changes):
    from verify import sweep as S

    base = get_experiment("seq_lsa1").config
    cfg = seq_tiny(**SEQ)
    tiny_set = {k: v for k, v in cfg.flat_dict().items() if v != base.flat_dict()[k] and k not in ("experiment", "seed")}
    data = {"name": "seqrec", "experiment": "seq_lsa1", "seeds": [0, 1], "set": tiny_set,
            "report": {"figure": [{"name": "per_t", "kind": "per_t", "baselines": ["gd"]}]}}
    return S.parse_spec({**data, **changes}, source="test")


def test_a_sweep_records_the_runs_its_records_answer(tmp_path, capsys):
    import io

    from verify import report_sweep as RS, sweep as S
    from verify.sweep_store import SweepStore

    spec = _seq_spec()
    p0, p1 = S.expand(spec)
    run = str(tmp_path / "trained")
    train(p0.config, run, analyses=True)
    root = str(tmp_path / "records")
    dest = records.record_path(root, "full", p0.config)
    records.write(dest, {n: _read(os.path.join(run, n)) for n in records.RECORD_FILES})
    out = str(tmp_path / "sweep")
    buf = io.StringIO()
    counts = S.run_sweep(spec, out, S.LocalEngine(1), progress=True, stream=buf, records=root, reuse_only=True)
    assert (counts["done"], counts["pending"]) == (1, 1)
    assert "answered by the record" in buf.getvalue() and not os.path.exists(os.path.join(out, "runs"))
    h = R.config_hash(p0.config)
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        row = next(r for r in st.runs() if r["hash"] == h)
        hist = st.history(h)
    with open(os.path.join(run, R.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert row["final"] == summary["final"] and row["baselines"] == summary["baselines"]
    assert row["params_sha"] is None and row["worker"].startswith("record ")
    assert [r["step"] for r in hist] == [p0.config.steps]
    rep = RS.build(out, str(tmp_path / "rep"))
    assert [c["pending"] for c in rep["cells"]] == [1]
    assert os.path.getsize(os.path.join(str(tmp_path / "rep"), "per_t.png")) > 0

    _edit_summary(os.path.join(dest, R.SUMMARY_FILE), lambda s: s["final"].update(loss=0.0))
    capsys.readouterr()
    again = S.run_sweep(spec, str(tmp_path / "sweep2"), S.LocalEngine(1), progress=False, records=root,
                        reuse_only=True)
    assert (again["done"], again["pending"]) == (0, 2)
    assert "summary.json was edited" in capsys.readouterr().err


def test_the_default_records_folder_is_not_git_ignored():
    """A record that git ignores would never be committed (``runs/`` is ignored)."""
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    path = os.path.join(records.RECORDS_DIR, "full", "seq_lsa4-seed0", R.SUMMARY_FILE)
    r = subprocess.run(["git", "check-ignore", "-q", path], cwd=root)
    assert r.returncode == 1, f"{path} is ignored by .gitignore"


def test_no_train_answers_from_records_and_fails_the_rest_naming_them(seq_run, tmp_path, monkeypatch,
                                                                     claims_training):  # noqa: F811
    cfg, run = seq_run
    root = str(tmp_path / "records")
    records.add(run, root)
    counter = CountingTrainRun(R.train_run)
    monkeypatch.setattr(R, "train_run", counter)
    ctx = registry.Context(mode="full", workdir=str(tmp_path / "work"), reuse_runs=True, records=root, no_train=True)
    assert claims_training.run_for(ctx, "seq_lsa1", 0).run_dir.startswith(root)
    with pytest.raises(claims_training.RunNotTrained, match=r"seq_lsa1 seed 1 \(full mode\).*--no-train"):
        claims_training.run_for(ctx, "seq_lsa1", 1)
    assert counter.trained == []
    with pytest.raises(claims_training.RunNotTrained):                 # the memo keeps the error
        claims_training.run_for(ctx, "seq_lsa1", 1)
    monkeypatch.setattr(claims_training, "_seeds", lambda ctx: (0, 1, 2))
    with pytest.raises(claims_training.RunNotTrained, match=r"seq_lsa1 seed\(s\) 1, 2 \(full mode\)"):
        claims_training.runs(ctx, "seq_lsa1")                          # a claim's error names every missing seed


def test_no_train_needs_reuse_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "verify", "--full", "--no-train", "--only", "training.seq_lsa4",
                        "--workdir", str(tmp_path / "w")], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--no-train: only with --reuse-runs" in r.stderr
    assert not (tmp_path / "w").exists()


def test_older_records_are_used_only_when_asked_and_named(seq_run, tmp_path, monkeypatch, claims_training,  # noqa: F811
                                                          capsys):
    cfg, run = seq_run
    root = str(tmp_path / "records")
    dest, _ = records.add(run, root)
    res = records.find(root, "full", cfg)
    assert res is not None and records.trained_by_other_sources(res) is None
    with open(os.path.join(dest, records.PROVENANCE_FILE)) as f:
        commit = json.load(f)["commit"]
    monkeypatch.setattr(R, "reference_hash", lambda: "0" * 64)       # reference/ edited since
    capsys.readouterr()
    assert records.find(root, "full", cfg) is None
    assert "--older-records" in capsys.readouterr().err
    res = records.find(root, "full", cfg, older=True)
    other = records.trained_by_other_sources(res)
    assert other.startswith("trained by other reference/ sources (hash ")
    assert commit is None or commit[:12] in other
    counter = CountingTrainRun(R.train_run)
    monkeypatch.setattr(R, "train_run", counter)
    ctx = registry.Context(mode="full", workdir=str(tmp_path / "work"), reuse_runs=True, records=root,
                           older_records=True)
    claims_training.run_for(ctx, "seq_lsa1", 0)
    assert counter.trained == [] and any("accepted by --older-records" in d for d in registry.reused_runs())
    _edit_summary(os.path.join(dest, R.SUMMARY_FILE), lambda s: s["final"].update(loss=0.0))
    assert records.find(root, "full", cfg, older=True) is None        # older, yes; edited, never
    assert "summary.json was edited" in capsys.readouterr().err
