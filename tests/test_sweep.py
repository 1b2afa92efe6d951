"""icgd sweep and icgd report (verify.sweep, verify.sweep_store, verify.report_sweep):
the sweep file is checked before anything runs, a grid trains once per distinct config
into a SQLite store, a re-run skips what is done and retries what failed, a killed
driver or worker loses nothing finished, Dask (a real LocalCluster of two worker
processes, one killed mid-sweep) gives bit-identical results to the local pool, and the
report aggregates seeds with a 95% t interval."""

import glob
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from verify import runs as R
from verify import report_sweep as RS
from verify import sweep as S
from verify.sweep_store import SweepStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny runs (about a second each on the NumPy reference)
TINY_SET = {"d": 3, "N": 5, "batch": 64, "steps": 40, "eval_every": 20, "checkpoint_every": 20, "eval_tasks": 200,
            "line_search_tasks": 200, "gdpp_steps": 5, "ood_tasks": 50, "backend": "numpy"}
TINY = {"name": "tiny", "experiment": "one_layer", "seeds": [0, 1], "set": TINY_SET, "grid": {"lr": [1e-3, 3e-3]},
        "baselines": {"ridge": True},
        "report": {"figure": [{"name": "loss", "kind": "curves", "baselines": ["gd", "gdpp", "lstsq"]},
                              {"name": "lr", "kind": "versus", "x": "lr", "logx": True, "baselines": ["gd"]},
                              {"name": "ood", "kind": "ood"}]}}


def tiny_spec(**changes):
    return S.parse_spec({**TINY, **changes}, source="test")


def comparable(store_path):
    """{hash: (params sha256, final row, evaluation rows)} without wall-clock fields."""
    with SweepStore(store_path, readonly=True) as st:
        out = {}
        for r in st.runs():
            assert r["status"] == "done", r
            strip = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
            out[r["hash"]] = (r["params_sha"], strip(r["final"]), [strip(e) for e in st.history(r["hash"])],
                              r["baselines"] | {"seconds": None})
        return out


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "local")
    counts = S.run_sweep(tiny_spec(), out, S.LocalEngine(2), threads=1, progress=False)
    return out, counts


# ---- the sweep file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("change, says", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"grid": {"learning_rate": [1]}}, "grid.learning_rate"),
    ({"grid": {"lr": []}}, "grid.lr: expected a non-empty list"),
    ({"grid": {"lr": [1e-3, 1e-3]}}, "grid.lr: a value is listed twice"),
    ({"grid": {"steps": [10, 20]}}, "grid.steps: the same field is also in set.steps"),
    ({"seeds": [0, 0]}, "seeds: a seed is listed twice"),
    ({"seeds": [-1]}, "seeds must be integers >= 0"),
    ({"experiment": "one_layr"}, "did you mean one_layer"),
    ({"baselines": {"ridge": 1}}, "baselines.ridge: expected true or false"),
    ({"baselines": {"gdpp_converged": {"tol": -1}}}, "gdpp_converged.tol"),
    ({"baselines": {"gdpp_converged": {"patience": 0}}}, "gdpp_converged.patience: expected an integer >= 1"),
    ({"baselines": {"gdpp_converged": {"min_steps": 2.5}}}, "gdpp_converged.min_steps: expected an integer >= 0"),
    ({"baselines": {"gdpp_converged": {"min_steps": 10, "window": 2, "max_steps": 6}}}, "min_steps must be <= max_steps"),
    ({"baselines": {"lasso": True}}, "baselines.lasso: unknown baseline"),
    ({"set": {**TINY_SET, "lr": [1, 2]}}, "set.lr: expected a number"),
])
def test_bad_sweep_file_names_the_key(change, says):
    with pytest.raises(S.SweepError, match=says.replace("(", r"\(").replace(".", r"\.")):
        tiny_spec(**change)


def test_bad_value_is_refused_at_its_grid_point():
    spec = tiny_spec(grid={"lr": [1e-3, -1.0]})
    with pytest.raises(S.SweepError, match=r"grid point experiment=one_layer, lr=-1\.0, seed=0: (.|\n)*lr: must be > 0"):
        S.expand(spec)


def test_bad_report_table_names_the_key():
    with pytest.raises(S.SweepError, match=r"report\.figure\[0\]\.kind"):
        RS.check_report_table({"figure": [{"kind": "pie"}]}, "report")
    with pytest.raises(S.SweepError, match=r"report\.figure\[0\]\.colour"):
        RS.check_report_table({"figure": [{"kind": "curves", "colour": "red"}]}, "report")


def test_toml_file_errors(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("experiment = 'one_layer'\n[grid]\nlr = [1e-3\n")
    with pytest.raises(S.SweepError, match="not valid TOML"):
        S.spec_from_file(str(p))
    p.write_text("experiment = 'one_layer'\n[set]\nsteps = 10\n")
    with pytest.raises(S.SweepError, match=r"--quick: this sweep file has no \[quick\] table"):
        S.spec_from_file(str(p), quick=True)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "verify", "figures", "*.toml"))))
@pytest.mark.parametrize("quick", [False, True])
def test_committed_figure_sweeps_are_valid(path, quick):
    spec = S.spec_from_file(path, quick=quick)
    points = S.expand(spec)
    assert points and len({p.key for p in points}) == len(points)


def test_quick_and_cli_set_replace_set_values_only():
    data = {**TINY, "quick": {"steps": 20, "seeds": [0]}}
    spec = S.parse_spec(data, source="t", quick=True, cli_set={"batch": "32"})
    assert spec.seeds == (0,) and spec.fixed["steps"] == "20" and spec.fixed["batch"] == "32"
    with pytest.raises(S.SweepError, match="only \\[set\\] fields may be replaced"):
        S.parse_spec(TINY, source="t", cli_set={"lr": "1e-2"})


# ---- a local sweep -----------------------------------------------------------------------------------

def test_local_sweep_stores_every_run(local_sweep):
    out, counts = local_sweep
    assert counts == {"pending": 0, "running": 0, "done": 4, "failed": 0}
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        runs = st.runs()
        assert len(runs) == 4 and len(st.points()) == 4
        for r in runs:
            assert r["final"]["step"] == 40 and r["seconds"] > 0 and r["params_sha"]
            assert [e["step"] for e in st.history(r["hash"])] == [0, 20, 40]
            assert r["analysis"]["extra_baselines"]["ridge"]["lambda"] == 0.0
            assert os.path.exists(os.path.join(r["run_dir"], "summary.json"))


def test_rerun_skips_done_runs(local_sweep, capsys):
    out, _ = local_sweep
    before = {r["hash"]: r["finished"] for r in SweepStore(os.path.join(out, S.STORE_FILE), readonly=True).runs()}
    counts = S.run_sweep(tiny_spec(), out, S.LocalEngine(2), progress=True, stream=sys.stdout)
    assert counts["done"] == 4
    assert "0 to train" in capsys.readouterr().out
    after = {r["hash"]: r["finished"] for r in SweepStore(os.path.join(out, S.STORE_FILE), readonly=True).runs()}
    assert after == before


def test_identical_configs_train_once(tmp_path):
    cases = [{"label": "a", "lr": 1e-3}, {"label": "b", "lr": 0.001}]
    spec = tiny_spec(grid={}, seeds=[0], case=cases)
    points = S.expand(spec)
    assert len(points) == 2 and points[0].config == points[1].config
    out = str(tmp_path / "dup")
    counts = S.run_sweep(spec, out, S.LocalEngine(1), progress=False)
    assert counts["done"] == 1
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        assert len(st.runs()) == 1 and len(st.points()) == 2


def test_failed_run_is_recorded_and_retried(tmp_path):
    spec = tiny_spec(grid={}, seeds=[0])
    out = str(tmp_path / "fail")
    (h,) = {S.R.config_hash(p.config) for p in S.expand(spec)}
    os.makedirs(os.path.join(out, "runs"))
    blocker = S.run_dir_of(out, h)
    open(blocker, "w").close()                 # a file where the run directory should be: the run fails
    assert S.run_sweep(spec, out, S.LocalEngine(1), progress=False)["failed"] == 1
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        (r,) = st.runs()
        assert r["status"] == "failed" and "ConfigError" in r["error"]
    os.unlink(blocker)
    assert S.run_sweep(spec, out, S.LocalEngine(1), progress=False)["failed"] == 1      # not retried by default
    assert S.run_sweep(spec, out, S.LocalEngine(1), retry_failed=True, progress=False)["done"] == 1


def test_killed_sweep_loses_nothing_finished(tmp_path, local_sweep):
    """The driver is killed (SIGKILL) after its first finished run; the same command
    again trains only the rest and every result equals the uninterrupted sweep's."""
    f = tmp_path / "tiny.toml"
    f.write_text(_toml(TINY))
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "verify.cli", "sweep", str(f), "--out", out, "--workers", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in p.stderr:
        if line.startswith("[1/4"):
            p.kill()                           # SIGKILL: no clean-up; its workers die with it
            break
    p.wait()
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        first = {r["hash"]: r["finished"] for r in st.runs() if r["status"] == "done"}
        assert 1 <= len(first) < 4 and st.counts()["running"] >= 1          # left running by the dead driver
    text = S.status_text(out)                          # status tells a dead driver's runs from live ones
    assert "no sweep is running" in text and "stale " in text and "left running by a sweep that was killed" in text
    with R.RunLock(out):                               # a live driver holds the lock: its runs are running
        live = S.status_text(out)
    assert f"a sweep is running (pid {os.getpid()})" in live and "stale" not in live and "running " in live
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "left running by a killed sweep" in r.stderr
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        assert {h: t for h, t in ((r["hash"], r["finished"]) for r in st.runs()) if h in first} == first
    assert comparable(os.path.join(out, S.STORE_FILE)) == comparable(os.path.join(local_sweep[0], S.STORE_FILE))


def _toml(d):
    """A minimal TOML writer for the test's sweep dicts."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return repr(v)
    lines = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict) and k != "report":
            lines += [f"[{k}]"] + [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    for fig in d.get("report", {}).get("figure", []):
        lines += ["[[report.figure]]"] + [f"{kk} = {val(vv)}" for kk, vv in fig.items()]
    return "\n".join(lines) + "\n"


# ---- engines: a killed worker ---------------------------------------------------------------------

class _KillFirstWorker:
    """Wrap an engine: after the first result, SIGKILL one of its worker processes."""

    def __init__(self, engine, pids):
        self.engine, self.pids, self.killed = engine, pids, None

    def describe(self):
        return self.engine.describe()

    def run(self, tasks):
        for h, res in self.engine.run(tasks):
            if self.killed is None:
                self.killed = self.pids()[0]
                os.kill(self.killed, signal.SIGKILL)
            yield h, res


def _pool_worker_pids():
    import psutil
    return [c.pid for c in psutil.Process().children() if "resource_tracker" not in " ".join(c.cmdline())]


def test_local_pool_survives_a_killed_worker(tmp_path, local_sweep):
    eng = _KillFirstWorker(S.LocalEngine(2), _pool_worker_pids)
    out = str(tmp_path / "lk")
    counts = S.run_sweep(tiny_spec(), out, eng, progress=False)
    assert eng.killed is not None and counts["done"] == 4
    assert comparable(os.path.join(out, S.STORE_FILE)) == comparable(os.path.join(local_sweep[0], S.STORE_FILE))


def test_dask_local_cluster_with_a_killed_worker_matches_the_local_pool(tmp_path, local_sweep):
    """A real distributed LocalCluster (two worker processes, one thread each; not the
    synchronous scheduler): one worker is killed after the first result; the sweep
    completes, every run is recorded once, bit-identical to the local pool's."""
    import distributed  # noqa: F401 - part of the test extra: missing is a failure, not a skip

    eng = S.DaskEngine(2)
    try:
        assert len(eng.worker_pids()) == 2
        killer = _KillFirstWorker(eng, eng.worker_pids)
        out = str(tmp_path / "dask")
        counts = S.run_sweep(tiny_spec(), out, killer, progress=False)
    finally:
        eng.close()
    assert killer.killed is not None
    assert counts == {"pending": 0, "running": 0, "done": 4, "failed": 0}
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        assert len(st.runs()) == 4 and sorted(p["seed"] for p in st.points()) == [0, 0, 1, 1]
    assert comparable(os.path.join(out, S.STORE_FILE)) == comparable(os.path.join(local_sweep[0], S.STORE_FILE))


# ---- status and report -------------------------------------------------------------------------------

def test_status_reads_the_store(local_sweep):
    text = S.status_text(local_sweep[0])
    assert "4 done" in text and text.count("done ") >= 4 and "lr=0.003, seed=1" in text


def test_interval_is_the_student_t_interval():
    iv = RS.interval([1.0, 2.0, 3.0])
    assert iv["n"] == 3 and iv["mean"] == 2.0
    assert math.isclose(iv["hi"] - 2.0, 4.303 / math.sqrt(3)) and math.isclose(2.0 - iv["lo"], 4.303 / math.sqrt(3))
    assert RS.interval([5.0])["lo"] == 5.0 and RS.interval([None])["n"] == 0


def test_drawn_band_stays_inside_the_metric_range():
    # five cosines near 1 with spread: the t interval reaches past 1, the drawn band does not
    iv = RS.interval([0.93, 0.99, 0.999, 0.95, 0.999])
    assert iv["hi"] > 1.0
    lo, hi = RS.drawn_band("model_cos_gdpp", [iv["lo"]], [iv["hi"]])
    assert hi[0] == 1.0 and lo[0] == iv["lo"]
    lo, hi = RS.drawn_band("loss", [-0.2, 0.1], [0.3, 0.4])
    assert lo.tolist() == [0.0, 0.1] and hi.tolist() == [0.3, 0.4]
    lo, hi = RS.drawn_band("gamma", [-5.0], [7.0])           # unbounded: unchanged
    assert lo.tolist() == [-5.0] and hi.tolist() == [7.0]


def test_report_writes_tables_figures_and_json(local_sweep, tmp_path):
    out = str(tmp_path / "rep")
    rep = RS.build(local_sweep[0], out)
    assert [c["cell"] for c in rep["cells"]] == [{"lr": "0.001"}, {"lr": "0.003"}]
    with SweepStore(os.path.join(local_sweep[0], S.STORE_FILE), readonly=True) as st:
        losses = sorted(r["final"]["loss"] for r in st.runs() if r["config"]["optim"]["lr"] == 1e-3)
    assert math.isclose(rep["cells"][0]["metrics"]["loss"]["mean"], sum(losses) / 2)
    for name in ("report.md", "report.html", "report.json", "loss.png", "lr.png", "ood.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "report.html")) as f:
        assert f.read().count("data:image/png;base64,") == 3
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["cells"][1]["seeds"] == [0, 1]


def _tiny_toml(seeds="[0, 1]", title="changed title"):
    sets = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_SET.items())
    return (f'name = "tiny"\nexperiment = "one_layer"\nseeds = {seeds}\n[set]\n{sets}\n[grid]\nlr = [1e-3, 3e-3]\n'
            f'[baselines]\nridge = true\n[report]\ntitle = "{title}"\n[[report.figure]]\nname = "only"\n'
            f'kind = "versus"\nx = "lr"\nbaselines = ["gd", "ridge"]\n')


def test_report_of_a_sweep_file_uses_the_files_report_table(local_sweep, tmp_path, capsys):
    """icgd report FILE --sweep-dir DIR draws what the file's [report] says now (no
    retraining for a changed figure); a file whose grid is not the stored sweep's is refused."""
    from verify.cli import main
    f = tmp_path / "tiny.toml"
    f.write_text(_tiny_toml())
    out = tmp_path / "rep"
    assert main(["report", str(f), "--sweep-dir", local_sweep[0], "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["title"] == "changed title" and [g["file"] for g in rep["figures"]] == ["only.png"]
    assert (out / "only.png").stat().st_size > 0 and not (out / "loss.png").exists()
    assert RS.build(local_sweep[0], str(tmp_path / "stored"))["title"] == "tiny"     # the directory alone: as stored
    f.write_text(_tiny_toml(seeds="[0]"))
    capsys.readouterr()
    assert main(["report", str(f), "--sweep-dir", local_sweep[0], "--out", str(tmp_path / "no")]) == 2
    assert "differ in seeds" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_versus_figure_draws_a_baseline_shared_by_every_group_once(local_sweep, tmp_path):
    # grouping the tiny sweep by seed: ridge is the same in both groups (same tasks), GD too
    spec = {"name": "v", "kind": "versus", "x": "lr", "by": "seed", "metric": "loss", "baselines": ["ridge"]}
    _, _, cells = RS.load(local_sweep[0])
    by_seed = [{**c, "cell": {**c["cell"], "seed": r["config"]["seed"]}, "runs": [r]} for c in cells for r in c["runs"]]
    data = RS.figure_versus(spec, by_seed, "t", str(tmp_path / "v.png"))
    drawn = [(s["group"], s["value"]) for s in data["series"]]
    assert drawn.count((drawn[0][0], "ridge")) == 1 and sum(v == "ridge" for _, v in drawn) == 1
    assert sum(v == "loss" for _, v in drawn) == 2


def test_cli_flags_sweep_dry_run(tmp_path, capsys):
    from verify.cli import main
    rc = main(["sweep", "--experiment", "one_layer", "--grid", "lr=1e-3,5e-4", "--seeds", "0-2", "--set", "steps=10",
               "--out", str(tmp_path / "x"), "--dry-run"])
    assert rc == 0 and "6 grid points" in capsys.readouterr().out
    assert main(["sweep", "--experiment", "one_layer", "--grid", "lrr=1", "--dry-run"]) == 2
    assert "grid.lrr" in capsys.readouterr().err


# ---- reusing finished runs (--reuse-from) -------------------------------------------------------------

def test_reuse_from_copies_finished_runs_instead_of_training(tmp_path, local_sweep):
    """Two runs of the grid are taken from a directory of finished runs (as verify leaves
    them): one as it is, one whose digest names other reference/ sources (re-finished at
    its last step: its evaluations keep their original timings, so nothing was retrained).
    A broken source run is not used; every result equals the trained sweep's."""
    import shutil

    src = tmp_path / "finished"
    src.mkdir()
    points = S.expand(tiny_spec())
    for i, p in enumerate(points[:3]):
        R.train_run(p.config, str(src / f"run{i}"), analyses=True)
    s = json.loads((src / "run1" / R.SUMMARY_FILE).read_text())
    s["digest"]["reference"] = "0" * 64                  # trained by other sources
    (src / "run1" / R.SUMMARY_FILE).write_text(json.dumps(s))
    (src / "run2" / R.CONFIG_FILE).write_text((src / "run2" / R.CONFIG_FILE).read_text().replace('"lr"', '"lr" '))
    shutil.copy(src / "run0" / R.CHECKPOINT_FILE, src / "run2" / R.CHECKPOINT_FILE)   # not its checkpoint
    assert set(S.finished_runs(str(src)).values()) == {str(src / "run0"), str(src / "run1")}
    out = str(tmp_path / "reuse")
    buf = io.StringIO()
    counts = S.run_sweep(tiny_spec(), out, S.LocalEngine(1), progress=True, stream=buf, reuse_from=str(src))
    lines = buf.getvalue()
    assert counts["done"] == 4 and "2 of 4 runs to train copied" in lines and "other reference/ sources" in lines
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        for i in (0, 1):
            h = R.config_hash(points[i].config)
            src_rows = [r for r in R.read_metrics(str(src / f"run{i}" / R.METRICS_FILE))[0] if r.get("kind") == "eval"]
            assert [r["seconds"] for r in st.history(h)] == [r["seconds"] for r in src_rows]
    assert comparable(os.path.join(out, S.STORE_FILE)) == comparable(os.path.join(local_sweep[0], S.STORE_FILE))


def test_reuse_from_reads_a_sweep_directory(tmp_path, local_sweep):
    """Another sweep's directory (store and runs/ folder) serves as --reuse-from: every
    run is copied, none trained, and the results equal that sweep's."""
    out = str(tmp_path / "again")
    buf = io.StringIO()
    counts = S.run_sweep(tiny_spec(), out, S.LocalEngine(1), progress=True, stream=buf, reuse_from=local_sweep[0])
    assert counts["done"] == 4 and "4 of 4 runs to train copied" in buf.getvalue()
    assert comparable(os.path.join(out, S.STORE_FILE)) == comparable(os.path.join(local_sweep[0], S.STORE_FILE))


def test_reuse_from_must_be_a_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "verify.cli", "sweep", "--experiment", "one_layer", "--out",
                        str(tmp_path / "o"), "--reuse-from", str(tmp_path / "none")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--reuse-from" in r.stderr and "not a directory" in r.stderr
    assert not (tmp_path / "o").exists()


def test_report_values_of_models_that_are_no_lsa_stack():
    """A softmax or mixed model's run has weights {"skipped": why}: gamma and eta are
    None (not a crash); the curves name the experiment of a sweep over experiments."""
    run = {"final": {"loss": 0.3}, "baselines": {"gd_loss": 0.21}, "config": {"data": {"N": 10}},
           "analysis": {"weights": {"skipped": "the model is an explicit layer list"}}}
    assert RS.value(run, "gamma") is None and RS.value(run, "eta") is None and RS.value(run, "gd") == 0.21
    assert RS._model_label({"experiment": "softmax2"}, True) == "trained softmax2"
    assert RS._model_label({"experiment": "ln1", "lr": "0.001"}, True) == "trained ln1 lr=0.001"
    assert RS._model_label({"lr": "0.001"}, True) == "trained LSA lr=0.001" and RS._model_label({}, False) == "trained LSA"


def test_per_t_figure_averages_seeds_and_draws_shared_baselines_once(tmp_path):
    """The sequence figure: each cell's final l_t averaged over its seeds (numbers by
    hand), GD's curve (equal in both cells) drawn once, Prop. 2's (per depth) per cell;
    a run without a per-t evaluation is left out, not a crash."""
    def run(seed, per_t, prop2):
        return {"seed": seed, "history": [{"step": 10, "per_t": [9.0, 9.0, 9.0]}, {"step": 20, "per_t": per_t}],
                "baselines": {"gd_per_t": [1.0, 0.5, 0.25], "prop2_per_t": prop2}}
    cells = [{"cell": {"experiment": "seq_lsa1"}, "runs": [run(0, [1.0, 0.4, 0.2], [0.9, 0.4, 0.2]),
                                                           run(1, [1.0, 0.6, 0.4], [0.9, 0.4, 0.2])]},
             {"cell": {"experiment": "seq_lsa2"}, "runs": [run(0, [1.0, 0.3, 0.1], [0.8, 0.3, 0.1]),
                                                           {"seed": 1, "history": [{"step": 20}], "baselines": {}}]}]
    path = str(tmp_path / "per_t.png")
    data = RS.figure_per_t({"baselines": ["gd", "prop2", "cheb"]}, cells, "t", path)
    assert os.path.getsize(path) > 0 and data["shared_baselines"] == ["gd"]
    a, b = data["series"]
    assert a["t"] == [1, 2, 3] and np.allclose(a["model"]["mean"], [1.0, 0.5, 0.3])
    assert a["model"]["lo"][1] < 0.5 < a["model"]["hi"][1]
    assert b["model"]["mean"] == b["model"]["lo"] == [1.0, 0.3, 0.1]          # one seed: no interval
    assert a["baselines"]["prop2"] == [0.9, 0.4, 0.2] and b["baselines"]["prop2"] == [0.8, 0.3, 0.1]
    assert "cheb" not in a["baselines"]
    RS.check_report_table({"figure": [{"kind": "per_t", "baselines": ["gd"]}]}, "report")
    with pytest.raises(S.SweepError, match=r"report\.figure\[0\]\.axis"):
        RS.check_report_table({"figure": [{"kind": "per_t", "axis": "input"}]}, "report")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_converged_gdpp_starts_as_the_papers_protocol_and_stops_by_its_rule(backend):
    """GD++ to convergence takes the trainer's meta-training steps (same init, task stream,
    coordinates and the run's backend's loss function): stopped after as many steps, it has
    the fixed-step GD++'s eta and gamma bit for bit. With tol = 1 it stops at the first window it may
    (converged): after ``patience`` flat windows, not before ``min_steps``; with tol = 0 (no
    improvement is too small) it runs to max_steps, not converged."""
    from reference import trainer
    from reference.backends import host_loss_and_grads
    from reference.solvers import meta_train_gdpp
    from verify.sweep_baselines import converged_gdpp

    cfg = S.expand(tiny_spec(set={**TINY_SET, "backend": backend}))[0].config
    evals = trainer.eval_tasks(cfg)
    b = cfg.baselines
    etas, gammas, _ = meta_train_gdpp(cfg.task_spec(b.gdpp_batch), cfg.model.n_layers, 0.7, shared=True, steps=6,
                                      lr=b.gdpp_lr, b2=b.gdpp_b2, seed=cfg.eval.eval_seed,
                                      loss_and_grads_fn=host_loss_and_grads(cfg.backend))
    run = converged_gdpp(cfg, evals, 0.7, shared=True, tol=0.0, window=3, max_steps=6)
    assert run["etas"] == list(etas) and run["gammas"] == list(gammas)
    assert (run["steps"], run["converged"], [s for s, _ in run["curve"]]) == (6, False, [0, 3, 6])
    first = converged_gdpp(cfg, evals, 0.7, shared=True, tol=1.0, window=3, max_steps=6, patience=1, min_steps=0)
    assert (first["steps"], first["converged"]) == (3, True)
    # every window is flat under tol = 1: patience 2 needs two of them, and min_steps
    # (default: the paper's gdpp_steps = 5 here) holds it until the window ending at 6
    assert converged_gdpp(cfg, evals, 0.7, shared=True, tol=1.0, window=1, max_steps=9, patience=2,
                          min_steps=0)["steps"] == 2
    late = converged_gdpp(cfg, evals, 0.7, shared=True, tol=1.0, window=3, max_steps=9, patience=1)
    assert (late["steps"], late["converged"], b.gdpp_steps) == (6, True, 5)
    assert "from step 5 on" in late["rule"] and "1 window(s)" in late["rule"]
    # the best evaluated iterate: the lowest point of the curve, and its parameters give that loss
    from verify.sweep_baselines import gdpp_eval_loss
    i = int(np.argmin([v for _, v in run["curve"]]))
    assert (run["best_loss"], run["best_step"]) == (run["curve"][i][1], run["curve"][i][0])
    assert gdpp_eval_loss(evals, run["best_etas"], run["best_gammas"]) == run["best_loss"]
    # a meta-step too large for these tasks: the loss turns up after its minimum, three rising
    # windows stop it, and the best iterate is not the final one
    hot = S.expand(tiny_spec(set={**TINY_SET, "backend": backend, "gdpp_lr": 0.2}))[0].config
    over = converged_gdpp(hot, evals, 0.7, shared=True, tol=0.0, window=1, max_steps=12, min_steps=0)
    assert over["converged"] and over["best_step"] < over["steps"] and over["best_loss"] < over["loss"]
    assert gdpp_eval_loss(evals, over["best_etas"], over["best_gammas"]) == over["best_loss"]


def test_converged_gdpp_is_computed_once_per_cell_and_equals_a_fresh_one(tmp_path, monkeypatch):
    """Converged GD++ does not read the training seed: with a cache folder the second seed
    of a cell reads the first one's result, which equals the one seed 1 computes alone
    (wall-clock aside). Another start eta or evaluation seed gets another file; an
    unreadable file is computed again and replaced."""
    import dataclasses

    from reference import trainer
    from verify import sweep_baselines as SB

    cfgs = {p.seed: p.config for p in S.expand(tiny_spec()) if p.config.optim.lr == 1e-3}
    want = {"gdpp_converged": {"tol": 0.0, "window": 3, "max_steps": 6}}
    real, calls = SB.converged_gdpp, []
    monkeypatch.setattr(SB, "converged_gdpp", lambda *a, **k: calls.append(a[0].seed) or real(*a, **k))
    cache = str(tmp_path / "baselines")
    got = [SB.extra_baselines(cfgs[s], trainer.eval_tasks(cfgs[s]), {"gd_eta": 0.7}, want, cache) for s in (0, 1)]
    assert calls == [0] and len(glob.glob(os.path.join(cache, "*.json"))) == 1
    alone = R.jsonable(SB.extra_baselines(cfgs[1], trainer.eval_tasks(cfgs[1]), {"gd_eta": 0.7}, want))
    assert calls == [0, 1]
    strip = lambda d: {k: v for k, v in d["gdpp_converged_shared"].items() if k != "seconds"}  # noqa: E731
    assert strip(got[0]) == strip(got[1]) == strip(alone) and got[1]["gdpp_converged_shared"]["steps"] == 6

    rule = want["gdpp_converged"]
    path = SB.converged_cache_path(cache, cfgs[1], "shared", rule, 0.7)
    other_eval = dataclasses.replace(cfgs[1], eval=dataclasses.replace(cfgs[1].eval, eval_seed=7))
    assert path == SB.converged_cache_path(cache, cfgs[0], "shared", rule, 0.7)
    assert len({path, SB.converged_cache_path(cache, cfgs[1], "shared", rule, 0.7000000000000001),
                SB.converged_cache_path(cache, other_eval, "shared", rule, 0.7),
                SB.converged_cache_path(cache, cfgs[1], "per_layer", rule, 0.7)}) == 4
    with open(path, "w") as f:
        f.write("{not json")
    again = SB.extra_baselines(cfgs[1], trainer.eval_tasks(cfgs[1]), {"gd_eta": 0.7}, want, cache)
    assert calls == [0, 1, 1] and strip(again) == strip(alone)
    with open(path) as f:
        assert json.load(f)["steps"] == 6


def test_two_workers_at_once_compute_converged_gdpp_once(tmp_path, monkeypatch):
    """Two seeds of a cell finishing together: the second waits on the first's lock and
    reads its result (flock locks conflict between open files, so threads show it)."""
    import threading

    from reference import trainer
    from verify import sweep_baselines as SB

    if SB.fcntl is None:
        pytest.skip("no fcntl here: the cache is unlocked")
    cfgs = [p.config for p in S.expand(tiny_spec()) if p.config.optim.lr == 1e-3]
    want = {"gdpp_converged": {"tol": 0.0, "window": 3, "max_steps": 6}}
    real, calls = SB.converged_gdpp, []

    def slow(*a, **k):
        calls.append(a[0].seed)
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(SB, "converged_gdpp", slow)
    got = {}
    threads = [threading.Thread(target=lambda c=c: got.__setitem__(c.seed, SB.extra_baselines(
        c, trainer.eval_tasks(c), {"gd_eta": 0.7}, want, str(tmp_path)))) for c in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got[0] == got[1]


def test_a_baseline_added_to_a_done_sweep_is_computed_without_training(tmp_path, local_sweep):
    """The sweep file gains gdpp_converged after its 4 runs are done: the same command
    trains nothing, adds the baseline to every run (ridge kept, timings untouched, one
    computation per cell), and a third call has nothing left to do; a changed stopping
    rule counts as missing."""
    import shutil

    from verify.sweep_baselines import missing_extra

    out = str(tmp_path / "copy")
    shutil.copytree(local_sweep[0], out)
    rule = {"tol": 1e-12, "window": 2, "max_steps": 4}
    spec = tiny_spec(baselines={"ridge": True, "gdpp_converged": rule})
    store = os.path.join(out, S.STORE_FILE)
    before = {r["hash"]: r for r in SweepStore(store, readonly=True).runs()}
    buf = io.StringIO()
    assert S.run_sweep(spec, out, S.LocalEngine(1), threads=1, progress=True, stream=buf)["done"] == 4
    text = buf.getvalue()
    assert "0 to train" in text and "4 done run(s) lack a baseline" in text and text.count("extra baselines") == 4
    after = SweepStore(store, readonly=True).runs()
    for r in after:
        old = before[r["hash"]]
        assert (r["finished"], r["seconds"], r["final"], r["params_sha"]) == \
               (old["finished"], old["seconds"], old["final"], old["params_sha"])
        extra = r["analysis"]["extra_baselines"]
        assert extra["ridge"] == old["analysis"]["extra_baselines"]["ridge"] and extra["gdpp_converged_shared"]["curve"]
        assert not missing_extra(extra, S.expand(spec)[0].config, spec.baselines)
        assert missing_extra(extra, S.expand(spec)[0].config, {"gdpp_converged": {**rule, "max_steps": 6}})
    assert len(glob.glob(os.path.join(out, S.BASELINE_CACHE, "*.json"))) == 2     # two lr cells, two seeds each
    buf = io.StringIO()
    S.run_sweep(spec, out, S.LocalEngine(1), threads=1, progress=True, stream=buf)
    assert "lack a baseline" not in buf.getvalue()


def test_a_versus_x_may_be_a_field_that_cases_set():
    """x = n_layers where [[case]] tables set n_layers: the cell's value is its runs'
    config value; a field that differs between a cell's runs, or an unknown one, is
    named; a cell without done runs has none (not drawn)."""
    run = lambda K, seed: {"seed": seed, "config": {"seed": seed, "model": {"n_layers": K}}}  # noqa: E731
    cell = {"cell": {"case": "K=3"}, "runs": [run(3, 0), run(3, 1)]}
    assert RS.cell_value(cell, "n_layers", "x") == 3 and RS.cell_value(cell, "case", "x") == "K=3"
    assert RS.cell_value({"cell": {"case": "K=4"}, "runs": []}, "n_layers", "x") is None
    with pytest.raises(S.SweepError, match=r"x = 'n_layers' differs between the runs of the cell case=K=3"):
        RS.cell_value({"cell": {"case": "K=3"}, "runs": [run(3, 0), run(4, 1)]}, "n_layers", "x")
    with pytest.raises(S.SweepError, match=r"fig: x = 'n_layerz'"):
        RS.cell_value(cell, "n_layerz", "fig: x")


@pytest.mark.parametrize("model_loss, passes", [(0.010, True), (0.040, False)])
def test_layers_claim_compares_k5_with_converged_per_layer_gdpp(monkeypatch, model_loss, passes):
    """The claim reads the sweep's cells: a five-layer model below converged per-layer
    GD++ at every seed passes, one above it at a seed fails (cells made up here)."""
    from verify import claims_sweep as CS
    from verify.registry import Context, discover

    def run(K, seed, loss):
        return {"seed": seed, "config": {"model": {"n_layers": K}}, "final": {"loss": loss},
                "baselines": {"gd_loss": 0.1, "gdpp_loss": 0.03},
                "analysis": {"extra_baselines": {"gdpp_converged_per_layer": {"loss": 0.025, "steps": 100000}}}}

    cells = [{"cell": {"case": "K=4"}, "runs": [run(4, 0, 0.02)]},
             {"cell": {"case": "K=5"}, "runs": [run(5, 0, 0.011), run(5, 1, model_loss)]}]
    monkeypatch.setattr(CS, "sweep_cells", lambda ctx, name: cells if name == "layers" else pytest.fail(name))
    out = discover()["sweep.layers.k5_beats_converged_gdpp"].fn(Context(mode="full"))
    assert out.passed is passes and math.isclose(out.measured, max(0.011, model_loss) / 0.025)
    assert out.details["by_K"][4]["ratio"] == [0.02 / 0.025] and out.details["by_K"][5]["gdpp_converged_steps"] == 100000


def test_per_layer_converged_gdpp_of_one_layer_is_the_shared_one():
    shared = {"loss": 0.2, "steps": 3000}
    run = lambda K, extra: {"config": {"model": {"n_layers": K}},  # noqa: E731
                            "analysis": {"extra_baselines": extra}}
    one = run(1, {"gdpp_converged_shared": shared})
    assert (RS.value(one, "gdpp_converged_per_layer"), RS.value(one, "gdpp_converged_per_layer_steps")) == (0.2, 3000)
    assert RS.value(run(2, {"gdpp_converged_shared": shared}), "gdpp_converged_per_layer") is None
    two = run(2, {"gdpp_converged_shared": shared, "gdpp_converged_per_layer": {"loss": 0.1, "steps": 9000}})
    assert (RS.value(two, "gdpp_converged_per_layer"), RS.value(two, "gdpp_converged")) == (0.1, 0.2)
    # the lowest evaluated loss: best_loss, or (stored without it) the lowest point of the curve
    ended_higher = {"loss": 0.104, "steps": 3, "curve": [[0, 0.3], [1, 0.1036], [2, 0.1039], [3, 0.104]]}
    assert RS.value(run(2, {"gdpp_converged_shared": ended_higher}), "gdpp_converged") == 0.1036
    assert RS.value(run(2, {"gdpp_converged_shared": {**ended_higher, "best_loss": 0.09}}), "gdpp_converged") == 0.09


def test_a_sweep_shares_converged_gdpp_between_seeds(tmp_path):
    out = str(tmp_path / "sw")
    spec = tiny_spec(grid={}, baselines={"gdpp_converged": {"tol": 1e-12, "window": 2, "max_steps": 4}})
    assert S.run_sweep(spec, out, S.LocalEngine(1), threads=1, progress=False)["done"] == 2
    assert len(glob.glob(os.path.join(out, S.BASELINE_CACHE, "*.json"))) == 1
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        a, b = (r["analysis"]["extra_baselines"]["gdpp_converged_shared"] for r in st.runs())
    assert a == b and a["curve"]     # one computed, the other read: equal, wall-clock included


def test_reuse_only_records_the_reusable_runs_and_trains_nothing(tmp_path, local_sweep):
    """--reuse-only: of the 4 runs only the one found finished in the source directory is
    recorded (equal to the trained sweep's); the other 3 stay pending and no run
    directory is made for them; a report shows them pending. Without --reuse-from the
    flag is refused before anything runs."""
    src = tmp_path / "finished"
    p0 = S.expand(tiny_spec())[0]
    R.train_run(p0.config, str(src / "run0"), analyses=True)
    out = str(tmp_path / "only")
    buf = io.StringIO()
    counts = S.run_sweep(tiny_spec(), out, S.LocalEngine(1), progress=True, stream=buf, reuse_from=str(src),
                         reuse_only=True)
    assert (counts["done"], counts["pending"]) == (1, 3) and "3 run(s) left pending" in buf.getvalue()
    h = R.config_hash(p0.config)
    assert os.listdir(os.path.join(out, "runs")) == [h[:16]]
    with SweepStore(os.path.join(out, S.STORE_FILE), readonly=True) as st:
        row = next(r for r in st.runs() if r["hash"] == h)
    with SweepStore(os.path.join(local_sweep[0], S.STORE_FILE), readonly=True) as st:
        ref = next(r for r in st.runs() if r["hash"] == h)
    assert row["params_sha"] == ref["params_sha"] and row["final"]["loss"] == ref["final"]["loss"]
    rep = RS.build(out, str(tmp_path / "rep"))
    assert sum(c["pending"] for c in rep["cells"]) == 3
    r = subprocess.run([sys.executable, "-m", "verify.cli", "sweep", "--experiment", "one_layer", "--out",
                        str(tmp_path / "o"), "--reuse-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--reuse-only" in r.stderr and not (tmp_path / "o").exists()


def test_table_headers_name_every_column_and_step_counts_print_in_full():
    """The table says what a column holds (not a raw key), and a step count is a whole
    number, not 3.9e+04; a loss keeps 4 significant digits."""
    assert RS.column_header("gdpp_converged_per_layer") == RS.LABELS["gdpp_converged_per_layer"]
    assert RS.column_header("gdpp_converged_per_layer_steps") == RS.LABELS["gdpp_converged_per_layer"] + ": meta-steps run"
    assert RS.column_header("gdpp_converged_steps").startswith("GD++ meta-trained to convergence")
    assert RS.column_header("loss") == "loss (the trained model)" and RS.column_header("model_cos_gd").startswith("cos(")
    assert RS.column_header("some_new_metric") == "some_new_metric"
    assert RS._fmt(RS.interval([39000, 39000])) == "39000 [39000, 39000]"
    assert RS._fmt(RS.interval([0.0923456])) == "0.09235"
    assert RS._fmt(RS.interval([0.1, 0.2])).startswith("0.15 [")
    assert RS._fmt(RS.interval([])) == "-"


def test_curves_figure_draws_a_one_evaluation_cell_as_a_marker(tmp_path, monkeypatch):
    """A run answered by a committed record keeps only its final evaluation; a line
    through one point draws nothing (the committed mesa_sequences loss figure was empty),
    so such a cell is a marker with its interval and says so; a cell with a curve stays a line."""
    import matplotlib.pyplot as plt
    made = []
    real = plt.subplots

    def capture(*a, **k):
        made.append(real(*a, **k))
        return made[-1]
    monkeypatch.setattr(plt, "subplots", capture)

    def run(seed, hist):
        return {"seed": seed, "config": {"model": {"n_layers": 1}}, "history": hist, "baselines": {}}
    cells = [{"cell": {"experiment": "seq_lsa1"}, "runs": [run(0, [{"step": 5000, "loss": 0.30}]),
                                                           run(1, [{"step": 5000, "loss": 0.34}])]},
             {"cell": {"experiment": "seq_lsa2"}, "runs": [run(0, [{"step": 100, "loss": 0.9}, {"step": 200, "loss": 0.5}]),
                                                           run(1, [{"step": 100, "loss": 0.8}, {"step": 200, "loss": 0.4}])]}]
    path = str(tmp_path / "loss.png")
    data = RS.figure_curves({"metric": "loss"}, cells, "t", path)
    assert os.path.getsize(path) > 0
    a, b = data["series"]
    assert a["final_only"] and a["steps"] == [5000] and math.isclose(a["mean"][0], 0.32)
    assert not b["final_only"] and b["steps"] == [100, 200]
    ax = made[-1][1]
    markers = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [5000]
    assert any("final evaluation only" in t.get_text() for t in ax.get_legend().get_texts())
    assert any(list(ln.get_xdata()) == [100, 200] and ln.get_marker() in ("None", "", None) for ln in ax.lines)
