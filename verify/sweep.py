"""``icgd sweep``: train a grid of runs, keep one row per run in a SQLite store
(``verify.sweep_store``), and skip what is already done.

    icgd sweep FILE.toml [--quick] [--out DIR] [--engine local|dask] [--workers N]
                         [--scheduler ADDRESS] [--retry-failed] [--set KEY=VALUE] [--dry-run]
    icgd sweep --experiment one_layer --grid lr=1e-3,5e-4 --seeds 0-2 --set steps=500 --out DIR
    icgd sweep status DIR|FILE.toml

A sweep file (TOML) names a base experiment, fixed overrides, a grid over any config
field (flat or dotted name) and the seeds; every key is checked and every grid point's
config built before anything runs, and a problem names the key:

    name = "gamma_vs_N"                 # default: the file's stem
    description = "..."
    experiment = "recurrent2"           # or a list: a grid dimension over experiments
    seeds = [0, 1, 2, 3, 4]             # or an integer n: seeds 0 .. n-1
    [set]                               # fixed overrides of the experiment's config
    steps = 5000
    [grid]                              # every combination of these values
    N = [10, 25, 50, 100]
    [[case]]                            # optional alternatives, each its own overrides,
    label = "K=3"                       # combined with the grid (a label names the case)
    n_layers = 3
    [quick]                             # applied by --quick: overrides and the seeds
    steps = 1000
    seeds = [0]
    [baselines]                         # extra baselines for each run (converged GD++
                                        # is shared by a cell's seeds: DIR/baselines/)
    gdpp_converged = { tol = 1e-4, window = 1000, max_steps = 100000 }   # or true; also patience
                                        # (default 3) and min_steps (default gdpp_steps)
    ridge = true
    [report]                            # read by icgd report (verify.report_sweep)

A field may appear in only one of [set], [grid] and a case; [quick] and ``--set`` may
replace [set] values only. The grid's runs are keyed by their config's hash, so
identical configs are trained once, and each lives in DIR/runs/<hash16>/ (a run
directory of ``verify.runs``). The default DIR is runs/sweeps/NAME (NAME-quick with
--quick).

Engines: ``local`` (default): spawned worker processes on this machine, each pinning
its Numba thread count (``--threads``); ``dask``: Dask distributed (``pip install
"icgd[dask]"``), a LocalCluster of ``--workers`` processes with one thread each, or the
cluster whose scheduler is ``--scheduler`` (tcp://HOST:8786, or a scheduler file).
Workers only train and return results; the driver writes every result to the store
in its own transaction. A worker that dies is replaced and its run retried; a run that
raises is recorded as failed with its error (``--retry-failed`` retries it). A sweep
that is killed loses no finished run: run the same command again. Done runs that lack
a baseline the file's [baselines] now asks for get it computed (no training).

Exit codes: 0 every run done, 1 some run failed, 2 bad sweep file or options, 130
interrupted.
"""

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

from reference.config import ConfigError, field_path

from . import runs as R
from .cli import INTERRUPTED, int_at_least
from .experiments import EXPERIMENTS, get_experiment
from .pool import estimated_cost, pin_threads, threads_per_worker
from .settings import apply_overrides, parse_set_args
from .sweep_store import StoreError, SweepStore

STORE_FILE = "sweep.sqlite"
BASELINE_CACHE = "baselines"   # converged GD++ shared by the seeds of a cell (verify.sweep_baselines)
TOP_KEYS = ("name", "description", "experiment", "seeds", "set", "grid", "case", "quick", "baselines", "report")
BASELINE_KEYS = ("gdpp_converged", "ridge")
ENGINES = ("local", "dask")
WORKER_DEATHS = 3       # a run whose worker died this many times is recorded as failed


class SweepError(ConfigError):
    """A sweep file or sweep option is invalid (said before anything runs)."""


# ---- the sweep file -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    experiments: tuple          # base experiment names (more than one: a grid dimension)
    seeds: tuple
    fixed: dict                 # [set] (with [quick] and --set applied)
    grid: dict                  # field -> tuple of values
    cases: tuple                # dicts of overrides ({} when the file has none), 'label' included
    baselines: dict             # {'gdpp_converged': {...}, 'ridge': bool}
    report: dict
    quick: bool = False
    source: str = ""

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def load_toml(path):
    try:
        import tomllib
    except ModuleNotFoundError:            # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML ({exc})") from None


def _text_value(v):
    """A TOML value as override text (the field's type decides how it is read)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v) if not isinstance(v, float) else repr(v)
    raise SweepError(f"expected a number, a string or a boolean, got {type(v).__name__} {v!r}")


def _overrides(where, table, allow=()):
    """Check a table of config overrides: every key a config field (or in ``allow``),
    every value a scalar; returns {key: text}."""
    if not isinstance(table, dict):
        raise SweepError(f"{where}: expected a table of config fields, got {type(table).__name__}")
    out = {}
    for k, v in table.items():
        if k in allow:
            continue
        try:
            field_path(k)
            out[k] = _text_value(v)
        except ConfigError as exc:
            raise SweepError(f"{where}.{k}: {exc}") from None
    return out


def _seeds(where, v):
    if isinstance(v, bool) or not isinstance(v, (int, list)):
        raise SweepError(f"{where}: expected a list of seeds or a count, got {v!r}")
    seeds = list(range(v)) if isinstance(v, int) else v
    if isinstance(v, int) and v < 1:
        raise SweepError(f"{where}: a count of seeds must be >= 1, got {v}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise SweepError(f"{where}: seeds must be integers >= 0, got {v!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: a seed is listed twice in {v!r}")
    return tuple(seeds)


def _experiments(where, v):
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SweepError(f"{where}: expected an experiment name or a list of them, got {v!r}")
    for n in names:
        try:
            get_experiment(n)
        except ConfigError as exc:
            raise SweepError(f"{where}: {exc}") from None
    return tuple(names)


def _baselines(where, table):
    if not isinstance(table, dict):
        raise SweepError(f"{where}: expected a table, got {table!r}")
    from .sweep_baselines import CONVERGED_DEFAULTS
    out = {}
    for k, v in table.items():
        if k not in BASELINE_KEYS:
            raise SweepError(f"{where}.{k}: unknown baseline; known: {', '.join(BASELINE_KEYS)}")
        if k == "ridge":
            if not isinstance(v, bool):
                raise SweepError(f"{where}.ridge: expected true or false, got {v!r}")
            out[k] = v
        elif v is True or isinstance(v, dict):
            rule = dict(CONVERGED_DEFAULTS)
            for rk, rv in (v if isinstance(v, dict) else {}).items():
                if rk not in rule:
                    raise SweepError(f"{where}.gdpp_converged.{rk}: unknown; known: {', '.join(rule)}")
                least = 0 if rk == "min_steps" else 1
                ok = rv > 0 if rk == "tol" else (isinstance(rv, int) and rv >= least)
                if isinstance(rv, bool) or not isinstance(rv, (int, float)) or not ok:
                    raise SweepError(f"{where}.gdpp_converged.{rk}: expected a positive number, got {rv!r}"
                                     if rk == "tol" else
                                     f"{where}.gdpp_converged.{rk}: expected an integer >= {least}, got {rv!r}")
                rule[rk] = float(rv) if rk == "tol" else rv
            if rule["max_steps"] < rule["window"]:
                raise SweepError(f"{where}.gdpp_converged: max_steps must be >= window")
            if rule["min_steps"] is not None and rule["min_steps"] > rule["max_steps"]:
                raise SweepError(f"{where}.gdpp_converged: min_steps must be <= max_steps")
            out[k] = rule
        elif v is not False:
            raise SweepError(f"{where}.gdpp_converged: expected true, false or a table (tol, window, max_steps)")
    return out


def parse_spec(data, *, source, name=None, quick=False, cli_set=None):
    """A :class:`SweepSpec` from a sweep file's parsed TOML ``data`` (``source``: where
    it came from, for messages). Raises SweepError naming the key."""
    where = source
    for k in data:
        if k not in TOP_KEYS:
            raise SweepError(f"{where}: unknown key {k!r}; known: {', '.join(TOP_KEYS)}")
    if "experiment" not in data:
        raise SweepError(f"{where}: experiment: missing (the named experiment the grid starts from)")
    exps = _experiments(f"{where}: experiment", data["experiment"])
    seeds = _seeds(f"{where}: seeds", data.get("seeds", [0]))
    fixed = _overrides(f"{where}: set", data.get("set", {}))
    grid = {}
    gtable = data.get("grid", {})
    if not isinstance(gtable, dict):
        raise SweepError(f"{where}: grid: expected a table of field = [values]")
    for k, vals in gtable.items():
        if k in ("seed", "experiment"):
            raise SweepError(f"{where}: grid.{k}: give {k}s as the top-level key {k + 's' if k == 'seed' else k!r}")
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"{where}: grid.{k}: expected a non-empty list of values, got {vals!r}")
        texts = [_overrides(f"{where}: grid", {k: v})[k] for v in vals]
        if len(set(texts)) != len(texts):
            raise SweepError(f"{where}: grid.{k}: a value is listed twice in {vals!r}")
        grid[k] = tuple(texts)
    cases_raw = data.get("case", [])
    if not isinstance(cases_raw, list):
        raise SweepError(f"{where}: case: expected an array of tables ([[case]])")
    cases, labels = [], set()
    for i, c in enumerate(cases_raw):
        over = _overrides(f"{where}: case[{i}]", c, allow=("label",))
        label = c.get("label", ",".join(f"{k}={v}" for k, v in over.items()) or f"case{i}")
        if not isinstance(label, str) or label in labels:
            raise SweepError(f"{where}: case[{i}].label: expected a unique string, got {label!r}")
        labels.add(label)
        cases.append({"label": label, **over})
    # one field in one place: [set], [grid] or the cases
    places = [("set", fixed)] + [("grid", grid)] + [(f"case[{i}]", {k: v for k, v in c.items() if k != "label"})
                                                     for i, c in enumerate(cases)]
    owner = {}
    for place, table in places:
        for k in table:
            path = field_path(k)
            if path in owner and not (owner[path][0].startswith("case") and place.startswith("case")):
                raise SweepError(f"{where}: {place}.{k}: the same field is also in {owner[path][0]}.{owner[path][1]}; "
                                 "give each field in one place")
            owner.setdefault(path, (place, k))
    qtable = data.get("quick", {})
    quick_set = _overrides(f"{where}: quick", qtable, allow=("seeds",))      # checked even without --quick
    if "seeds" in qtable:
        quick_seeds = _seeds(f"{where}: quick.seeds", qtable["seeds"])
        if quick:
            seeds = quick_seeds
    if not quick:
        quick_set = {}
    elif "quick" not in data:
        raise SweepError(f"{where}: --quick: this sweep file has no [quick] table")
    for label, extra in (("quick", quick_set), ("--set", cli_set or {})):
        for k in extra:
            path = field_path(k)
            if path in owner and owner[path][0] != "set":
                raise SweepError(f"{label} {k}: a field of the {owner[path][0]} (only [set] fields may be replaced)")
            old = next((kk for kk in fixed if field_path(kk) == path), None)
            if old is not None:
                del fixed[old]
        fixed.update(extra)
    baselines = _baselines(f"{where}: baselines", data.get("baselines", {}))
    report = data.get("report", {})
    if not isinstance(report, dict):
        raise SweepError(f"{where}: report: expected a table")
    nm = data.get("name", name)
    if not isinstance(nm, str) or not nm or "/" in nm:
        raise SweepError(f"{where}: name: expected a non-empty string without '/', got {nm!r}")
    return SweepSpec(name=nm, description=str(data.get("description", "")), experiments=exps, seeds=seeds,
                     fixed=fixed, grid=grid, cases=tuple(cases) or ({},), baselines=baselines, report=report,
                     quick=quick, source=source)


def spec_from_file(path, quick=False, cli_set=None):
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = parse_spec(load_toml(path), source=path, name=stem, quick=quick, cli_set=cli_set)
    if "report" in spec.report or spec.report:
        from .report_sweep import check_report_table
        check_report_table(spec.report, f"{path}: report")
    return spec


# ---- the grid -------------------------------------------------------------------------------

class Point(NamedTuple):
    cell: dict         # coordinates without the seed: experiment, case label, grid values
    seed: int
    label: str         # the case's label ('' without cases)
    config: object     # TrainConfig

    @property
    def cell_key(self):
        return json.dumps(self.cell, sort_keys=False)

    @property
    def key(self):
        return json.dumps({**self.cell, "seed": self.seed}, sort_keys=False)


def expand(spec):
    """Every grid point of ``spec`` with its config (experiments x cases x grid x seeds),
    each config built now; a point whose config is invalid raises SweepError naming it."""
    points = []
    keys = list(spec.grid)
    for exp in spec.experiments:
        base = get_experiment(exp).config
        for case in spec.cases:
            label = case.get("label", "")
            case_over = {k: v for k, v in case.items() if k != "label"}
            for values in itertools.product(*(spec.grid[k] for k in keys)):
                coords = dict(zip(keys, values))
                cell = {}
                if len(spec.experiments) > 1:
                    cell["experiment"] = exp
                if label:
                    cell["case"] = label
                cell.update(coords)
                for seed in spec.seeds:
                    over = {**spec.fixed, **case_over, **coords, "seed": str(seed)}
                    try:
                        cfg = apply_overrides(base, over)
                    except ConfigError as exc:
                        where = ", ".join(f"{k}={v}" for k, v in {"experiment": exp, **cell, "seed": seed}.items())
                        raise SweepError(f"{spec.source}: grid point {where}: {exc}") from None
                    points.append(Point(cell, seed, label, cfg))
    return points


def check_configs(points):
    """Each distinct config fits in memory and its backend runs here (before any work)."""
    seen = set()
    for p in points:
        if p.config in seen:
            continue
        seen.add(p.config)
        try:
            R.check_memory(p.config)
        except ConfigError as exc:
            raise SweepError(f"grid point {p.key}: {exc}") from None


def run_dir_of(out_dir, h):
    return os.path.join(out_dir, "runs", h[:16])


# ---- the worker ---------------------------------------------------------------------------------

def params_sha(params):
    """sha256 of the parameters (names, dtypes, shapes, bytes): equal iff bit-identical."""
    from reference.tree import to_arrays
    return R.arrays_checksum(to_arrays(params, "params"))


def _train_or_reuse(cfg, run_dir):
    """A finished run already in ``run_dir`` for this config (a driver that died after
    the worker finished), else the run resumed from its checkpoint, else trained from
    step 0."""
    try:
        res = R.load_result(run_dir)
        if res.config == cfg and not R.check_digest(run_dir) and (res.summary.get("final") or {}).get("step") == cfg.steps:
            return res
    except (OSError, ValueError, KeyError, R.CheckpointError):
        pass
    try:
        R.load_checkpoint(os.path.join(run_dir, R.CHECKPOINT_FILE), expect_config=cfg)
        return R.train_run(cfg, run_dir, resume=True)
    except R.CheckpointError:
        return R.train_run(cfg, run_dir, overwrite=True)


def run_cell(task):
    """Train one run in a worker and return its result as a plain dict (the driver
    stores it): status 'done' with final metrics, baselines, evaluation history, the
    analyses and the parameters' sha256, or status 'failed' with the error. Never
    raises for a failing run; only a dying worker loses the result. A task with
    ``baselines_only`` (a done run's stored baselines) trains nothing: status
    'baselines' with the extra baselines the sweep asks for."""
    from reference.config import config_from_dict
    from reference import trainer

    started = time.time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        pin_threads(task.get("threads"))
        cfg = config_from_dict(task["config"])
        if task.get("baselines_only") is not None:      # a done run whose sweep asks for more baselines
            from .sweep_baselines import extra_baselines
            extra = extra_baselines(cfg, trainer.eval_tasks(cfg), task["baselines_only"], task["baselines"],
                                    task.get("baseline_cache"))
            return {"status": "baselines", "worker": worker, "seconds": round(time.time() - started, 3),
                    "extra_baselines": R.jsonable(extra)}
        res = _train_or_reuse(cfg, task["run_dir"])
        s = res.summary
        analysis = {k: s[k] for k in ("weights", "ood", "interpolation") if k in s}
        if task.get("baselines"):
            from .sweep_baselines import extra_baselines
            analysis["extra_baselines"] = R.jsonable(extra_baselines(cfg, trainer.eval_tasks(cfg), res.baselines,
                                                                     task["baselines"], task.get("baseline_cache")))
        return {"status": "done", "worker": worker, "started": started, "finished": time.time(),
                "seconds": round(time.time() - started, 3), "final": s.get("final"), "baselines": res.baselines,
                "history": res.history, "analysis": analysis, "params_sha": params_sha(res.params),
                "run_dir": task["run_dir"]}
    except Exception as exc:  # noqa: BLE001 - the run failed; the driver records why
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "worker": worker, "started": started,
                "finished": time.time(), "seconds": round(time.time() - started, 3), "run_dir": task["run_dir"]}


# ---- engines -----------------------------------------------------------------------------------

def die_with_parent():
    """Linux: have the kernel SIGKILL this worker when the driver dies (a driver killed
    with SIGKILL leaves no orphan training a run that the next driver would retrain)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalEngine:
    """Spawned worker processes on this machine (no server). A worker that dies breaks
    the pool: a new pool is started and the runs that had not come back are submitted
    again (at most WORKER_DEATHS times each)."""

    name = "local"

    def __init__(self, workers):
        self.workers = workers

    def describe(self):
        return f"local pool, {self.workers} worker process(es)"

    def run(self, tasks):
        """Yield (hash, result dict) as runs finish, in any order."""
        pending = dict(tasks)
        deaths = dict.fromkeys(pending, 0)
        while pending:
            pool = ProcessPoolExecutor(max(1, min(self.workers, len(pending))),
                                       mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent)
            futures = {pool.submit(run_cell, t): h for h, t in pending.items()}
            broken = False
            try:
                while futures:
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for f in done:
                        h = futures.pop(f)
                        try:
                            res = f.result()
                        except BrokenProcessPool:
                            broken = True
                            deaths[h] += 1
                            if deaths[h] >= WORKER_DEATHS:
                                del pending[h]
                                yield h, {"status": "failed", "error": f"its worker process died {deaths[h]} times",
                                          "finished": time.time()}
                            continue
                        del pending[h]
                        yield h, res
                    if broken:
                        break
            finally:
                pool.shutdown(wait=not broken, cancel_futures=True)

    def close(self):
        pass


class DaskEngine:
    """Dask distributed: a LocalCluster of ``workers`` processes with one thread each,
    or an existing cluster (``address``: a scheduler address or a scheduler file). A
    worker that dies is restarted by its nanny and its task rescheduled by the scheduler
    (distributed's ``allowed-failures``)."""

    name = "dask"

    def __init__(self, workers, address=None):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise SweepError('engine dask: Dask distributed is not installed; pip install "icgd[dask]"') from None
        self.cluster = None
        if address is None:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)
        elif os.path.exists(address):
            self.client = Client(scheduler_file=address)
        else:
            self.client = Client(address)
        self.address = address

    def describe(self):
        n = len(self.client.scheduler_info().get("workers", {}))
        return f"dask {'LocalCluster' if self.cluster else self.address}, {n} worker(s)"

    def worker_pids(self):
        return list(self.client.run(os.getpid).values())

    def run(self, tasks):
        from distributed import as_completed
        futures = {self.client.submit(run_cell, t, key=f"icgd-run-{h}", pure=False): h for h, t in tasks}
        for f in as_completed(futures):
            h = futures[f]
            try:
                res = f.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker and the like: recorded as failed
                res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "finished": time.time()}
            f.release()
            yield h, res

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_engine(name, workers, address=None):
    if name == "dask":
        return DaskEngine(workers, address)
    if address is not None:
        raise SweepError("--scheduler: only with --engine dask")
    return LocalEngine(workers)


# ---- the driver ---------------------------------------------------------------------------------

class SweepProgress:
    """One line per finished run and, on a terminal, an overall tqdm bar with ETA."""

    def __init__(self, total, stream=None, enabled=True):
        from tqdm import tqdm

        self.stream = sys.stderr if stream is None else stream
        self.enabled, self.total, self.done, self.t0 = enabled, total, 0, time.perf_counter()
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, file=self.stream, unit="run", dynamic_ncols=True) if tty else None

    def finished(self, point_text, res):
        self.done += 1
        if res["status"] == "done":
            f, b = res.get("final") or {}, res.get("baselines") or {}
            refs = ", ".join(f"{name} {b[k]:.5f}" for k, name in (("gd_loss", "GD"), ("gdpp_loss", "GD++"),
                                                                ("prop2_loss", "Prop. 2"), ("lstsq_loss", "ridge"))
                             if b.get(k) is not None and (k != "lstsq_loss" or "gdpp_loss" not in b))
            what = f"loss {f.get('loss', float('nan')):.5f} ({refs}) in {res.get('seconds', 0):.1f} s"
        elif res["status"] == "baselines":
            what = f"extra baselines {', '.join(res['extra_baselines'])} in {res.get('seconds', 0):.1f} s"
        else:
            what = f"FAILED: {res.get('error')}"
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"{res['status']:<6} {point_text}: {what}", file=self.stream)
            self.bar.update(1)
        else:
            el = time.perf_counter() - self.t0
            eta = el / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total} ETA {eta:.0f} s] {res['status']:<6} {point_text}: {what}",
                  file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def default_out(spec):
    return os.path.join("runs", "sweeps", spec.name + ("-quick" if spec.quick else ""))


def _point_text(p):
    return ", ".join(f"{k}={v}" for k, v in {**p.cell, "seed": p.seed}.items())


def finished_runs(src_dir):
    """{config hash: run directory} of the finished runs directly under ``src_dir`` (e.g.
    ``runs/verify/full``): config.json readable, last evaluation at the config's steps,
    and the digest's config, checkpoint and summary parts intact. Runs trained by other
    reference/ sources are included (the sweep re-finishes them: see
    :func:`copy_finished_runs`). A sweep directory (its store beside a ``runs/`` folder)
    is read through that folder, so one sweep can reuse another's runs."""
    if not os.path.isdir(src_dir):
        raise SweepError(f"--reuse-from: {src_dir} is not a directory")
    if os.path.isfile(os.path.join(src_dir, STORE_FILE)) and os.path.isdir(os.path.join(src_dir, "runs")):
        src_dir = os.path.join(src_dir, "runs")
    out = {}
    for name in sorted(os.listdir(src_dir)):
        d = os.path.join(src_dir, name)
        if not os.path.isfile(os.path.join(d, R.CONFIG_FILE)):
            continue
        try:
            res = R.load_result(d)
            bad = [b for b in (R.check_digest(d) or []) if b != R.REFERENCE_CHANGED]
        except (OSError, ValueError, KeyError, R.CheckpointError):
            continue
        if not bad and (res.summary.get("final") or {}).get("step") == res.config.steps:
            out.setdefault(R.config_hash(res.config), d)
    return out


def _finished_here(run_dir, cfg):
    """Whether ``run_dir`` holds a finished run of ``cfg`` (its last evaluation at cfg.steps)."""
    try:
        res = R.load_result(run_dir)
    except (OSError, ValueError, KeyError, R.CheckpointError):
        return False
    return res.config == cfg and (res.summary.get("final") or {}).get("step") == cfg.steps


def copy_finished_runs(src_dir, out_dir, hashes, log):
    """Copy the finished run of each config hash in ``hashes`` found under ``src_dir`` into
    its sweep run directory, when that directory does not exist yet (a copy to a
    temporary name, then one rename: never a half-copied run). The worker then reuses
    it as it is (digest intact), or, trained by other reference/ sources, resumes it at
    its last step: nothing is retrained, the final evaluation and analyses are recomputed
    by the current sources. Returns how many were copied."""
    import shutil

    found = finished_runs(src_dir)
    n = 0
    for h in hashes:
        src, dst = found.get(h), run_dir_of(out_dir, h)
        if src is None or os.path.exists(dst):
            continue
        tmp = f"{dst}.copying-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(R.LOCK_FILE, "plots"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(tmp, dst)
        older = R.REFERENCE_CHANGED in (R.check_digest(dst) or [])
        log(f"  reusing {src} for {h[:12]}" + (" (trained by other reference/ sources: its final evaluation "
                                                "is recomputed)" if older else ""))
        n += 1
    return n


def result_from_record(res, spec, cache_dir=None):
    """The store row of a run answered by its committed record (``verify.records``): its
    final evaluation, baselines and analyses as the record has them; no parameters (the
    record holds none, so ``params_sha`` is None) and only the final evaluation as
    history."""
    s = res.summary
    analysis = {k: s[k] for k in ("weights", "ood", "interpolation") if k in s}
    if spec.baselines:
        from reference import trainer
        from .sweep_baselines import extra_baselines
        analysis["extra_baselines"] = R.jsonable(extra_baselines(res.config, trainer.eval_tasks(res.config),
                                                                 res.baselines, spec.baselines, cache_dir))
    from .records import trained_by_other_sources

    now = time.time()
    other = trained_by_other_sources(res)
    return {"status": "done", "worker": f"record {res.run_dir}" + (f" ({other})" if other else ""),
            "started": now, "finished": now, "seconds": 0.0, "final": s.get("final"), "baselines": res.baselines, "history": res.history, "analysis": analysis,
            "params_sha": None, "run_dir": res.run_dir}


def answer_from_records(store, root, todo, by_hash, spec, log, older=False, cache_dir=None):
    """Record, for each run in ``todo`` whose committed record under ``root`` is usable
    (``verify.records.find``: equal config, intact digest, trained by the current
    reference/ sources, or by any with ``older``), the record's numbers instead of
    training it. Returns the hashes still to train."""
    from . import records

    left = []
    for h in todo:
        rec = records.find(root, None, by_hash[h].config, older=older)
        if rec is None:
            left.append(h)
            continue
        store.record(h, result_from_record(rec, spec, cache_dir))
        other = records.trained_by_other_sources(rec)
        log(f"  {h[:12]} answered by the record {rec.run_dir}" + (f" ({other})" if other else ""))
    log(f"  {len(todo) - len(left)} of {len(todo)} runs to train answered by records under {root}")
    return left


def lacking_baselines(store, by_hash, spec, todo):
    """{hash: its stored baselines} of the done runs of this grid (not in ``todo``) whose
    stored extra baselines lack one that ``spec.baselines`` asks for
    (``verify.sweep_baselines.missing_extra``). They need no run directory: the extra
    baselines read the config, the evaluation set and the stored gd_eta only."""
    if not spec.baselines:
        return {}
    from .sweep_baselines import missing_extra

    out = {}
    for r in store.runs():
        h = r["hash"]
        if h in by_hash and h not in todo and r["status"] == "done" and missing_extra(
                ((r["analysis"] or {}).get("extra_baselines") or {}), by_hash[h].config, spec.baselines):
            out[h] = r["baselines"] or {}
    return out


def run_sweep(spec, out_dir, engine, *, retry_failed=False, threads=None, progress=True, stream=None,
              reuse_from=None, reuse_only=False, records=None, older_records=False):
    """Run every grid point of ``spec`` not yet done, recording results in
    ``out_dir/sweep.sqlite``. Returns the store's counts over this grid's runs.
    ``reuse_from``: a directory of finished runs (e.g. runs/verify/full) whose runs of
    equal configs are copied in instead of trained (:func:`copy_finished_runs`);
    ``records``: a folder of committed run records (``verify.records``): a run with no
    finished run directory whose record is usable is recorded from it, not trained;
    ``reuse_only``: train nothing, record only the runs whose directory holds a finished
    run (copied now or before) or that a record answers; the others stay pending (a report
    shows them so)."""
    points = expand(spec)
    check_configs(points)
    R.check_run_dir(out_dir)
    with R.RunLock(out_dir):
        with SweepStore(os.path.join(out_dir, STORE_FILE)) as store:
            store.set_meta(name=spec.name, spec=json.dumps(spec.to_dict()), updated=repr(time.time()))
            by_hash = {}
            rows = []
            for p in points:
                h = R.config_hash(p.config)
                by_hash.setdefault(h, p)
                rows.append((p.key, p.cell_key, p.seed, p.label, h, p.config.experiment, p.config.to_dict()))
            store.add_points(rows)
            stale = store.reset_stale()
            todo = store.todo(list(by_hash), retry_failed)
            log = (lambda m: print(m, file=stream or sys.stderr, flush=True)) if progress else (lambda m: None)
            c = store.counts(set(by_hash))
            log(f"icgd sweep {spec.name}: {len(points)} grid points, {len(by_hash)} distinct runs; "
                f"{c['done']} done, {c['failed']} failed{' (not retried)' if c['failed'] and not retry_failed else ''}, "
                f"{len(todo)} to train" + (f" ({stale} left running by a killed sweep)" if stale else "")
                + (f"; {engine.describe()}" if todo else ""))
            if reuse_from and todo:
                n = copy_finished_runs(reuse_from, out_dir, todo, log)
                log(f"  {n} of {len(todo)} runs to train copied from {reuse_from}")
            cache = os.path.join(out_dir, BASELINE_CACHE)
            if records and todo:
                here = [h for h in todo if _finished_here(run_dir_of(out_dir, h), by_hash[h].config)]
                todo = here + answer_from_records(store, records, [h for h in todo if h not in here], by_hash,
                                                  spec, log, older=older_records, cache_dir=cache)
            if reuse_only:
                keep = [h for h in todo if _finished_here(run_dir_of(out_dir, h), by_hash[h].config)]
                if len(keep) < len(todo):
                    log(f"  {len(todo) - len(keep)} run(s) left pending (--reuse-only: no finished run to reuse)")
                todo = keep
            tasks = [(h, {"config": by_hash[h].config.to_dict(), "run_dir": run_dir_of(out_dir, h),
                          "threads": threads, "baselines": spec.baselines, "baseline_cache": cache}) for h in todo]
            tasks.sort(key=lambda t: -estimated_cost(by_hash[t[0]].config))
            store.mark_running([h for h, _ in tasks])
            extra = lacking_baselines(store, by_hash, spec, set(todo))
            if extra:
                log(f"  {len(extra)} done run(s) lack a baseline of this sweep file's [baselines]: computing it")
            tasks += [(h, {"config": by_hash[h].config.to_dict(), "threads": threads, "baselines": spec.baselines,
                           "baseline_cache": cache, "baselines_only": b}) for h, b in extra.items()]
            bar = SweepProgress(len(tasks), stream, enabled=progress)
            try:
                for h, res in engine.run(tasks):
                    if res["status"] == "baselines":
                        store.add_extra_baselines(h, res["extra_baselines"])
                    elif h in extra:      # computing the baselines failed: the run stays done without them
                        log(f"  {_point_text(by_hash[h])}: its extra baselines failed: {res.get('error')}")
                    else:
                        store.record(h, res)
                    bar.finished(_point_text(by_hash[h]), res)
            finally:
                bar.close()
                store.reset_stale()           # runs handed out but not come back: pending again
            return store.counts(set(by_hash))


# ---- the command line ---------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("target", nargs="*", metavar="FILE | status TARGET",
                   help="a sweep file (TOML); or 'status' and a sweep directory or file")
    p.add_argument("--out", metavar="DIR", help="the sweep directory (default runs/sweeps/NAME)")
    p.add_argument("--quick", action="store_true", help="apply the sweep file's [quick] table (default dir NAME-quick)")
    p.add_argument("--experiment", help="without a file: the experiment the grid starts from")
    p.add_argument("--grid", metavar="KEY=V1,V2", action="append", default=[],
                   help="without a file: a grid dimension (repeat for more)")
    p.add_argument("--seeds", metavar="S", help="without a file: seeds as 0,1,2 or 0-4 (default 0)")
    p.add_argument("--name", help="without a file: the sweep's name (default: the experiment's)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="a fixed config override (replaces the file's [set] value)")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local process pool (default) or dask")
    p.add_argument("--workers", type=int_at_least(1), default=None,
                   help="worker processes (default: the number of cores, at most 3 for local)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="Numba threads per run (default: cores / workers)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="engine dask: an existing cluster's scheduler address or file")
    p.add_argument("--retry-failed", action="store_true", help="train failed runs again")
    p.add_argument("--reuse-from", metavar="DIR",
                   help="copy finished runs of equal configs from DIR (e.g. runs/verify/full, or another sweep's "
                        "directory) instead of training")
    p.add_argument("--records", metavar="DIR",
                   help="answer runs from their committed records (icgd record; e.g. verify/results/records) when a "
                        "record's config is the run's and it is intact, instead of training")
    p.add_argument("--older-records", action="store_true",
                   help="with --records: also use records trained by other reference/ sources (each is named)")
    p.add_argument("--reuse-only", action="store_true",
                   help="with --reuse-from or --records: train nothing; runs with nothing to reuse stay pending")
    p.add_argument("--dry-run", action="store_true", help="check the sweep and list its grid; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _fail(msg):
    print(f"icgd sweep: {msg}", file=sys.stderr)
    return 2


def _parse_seeds(text):
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            return list(range(int(a), int(b) + 1))
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise SweepError(f"--seeds: expected 0,1,2 or 0-4, got {text!r}") from None


def spec_from_args(args):
    cli_set = parse_set_args(args.overrides)
    if args.target:
        if args.experiment or args.grid or args.seeds or args.name:
            raise SweepError("--experiment, --grid, --seeds and --name describe a sweep without a file; "
                             "put them in the sweep file instead")
        if len(args.target) != 1:
            raise SweepError(f"expected one sweep file, got {args.target}")
        return spec_from_file(args.target[0], quick=args.quick, cli_set=cli_set)
    if not args.experiment:
        raise SweepError("give a sweep file, or --experiment (with --grid and --seeds)")
    grid = {}
    for g in args.grid:
        if "=" not in g:
            raise SweepError(f"--grid expects KEY=V1,V2,..., got {g!r}")
        k, v = g.split("=", 1)
        grid[k.strip()] = [x.strip() for x in v.split(",")]
    data = {"experiment": args.experiment, "seeds": _parse_seeds(args.seeds) if args.seeds else [0],
            "grid": grid, "set": cli_set}
    if args.quick:
        raise SweepError("--quick: only with a sweep file")
    return parse_spec(data, source="icgd sweep", name=args.name or args.experiment)


def default_workers(engine):
    n = os.cpu_count() or 1
    return min(n, 3) if engine == "local" else n


def status_text(out_dir):
    path = os.path.join(out_dir, STORE_FILE)
    if not os.path.exists(path):
        raise SweepError(f"{out_dir}: no sweep store ({STORE_FILE}) there")
    with SweepStore(path, readonly=True) as store:
        runs = {r["hash"]: r for r in store.runs()}
        pts = store.points()
        c = store.counts()
        driver = R.lock_holder(out_dir)
        lines = [f"sweep {store.meta('name')} in {out_dir}: {len(pts)} grid points, {len(runs)} runs: "
                 + ", ".join(f"{v} {k}" for k, v in c.items())
                 + (f"; a sweep is running ({driver})" if driver else "; no sweep is running")]
        stale = 0
        for p in pts:
            r = runs[p["hash"]]
            where = ", ".join(f"{k}={v}" for k, v in {**p["cell"], "seed": p["seed"]}.items())
            f = r["final"] or {}
            extra = (f"loss {f['loss']:.5f} at step {f['step']}, {r['seconds']:.1f} s" if r["status"] == "done"
                     else (r["error"] or ""))
            status = r["status"]
            if status == "running" and not driver:         # its driver died: the next sweep retrains it
                status, extra, stale = "stale", "left running by a sweep that was killed", stale + 1
            lines.append(f"  {status:<8} {p['hash'][:12]}  {where}  {extra}")
        if stale:
            lines.append(f"{stale} run(s) were left running by a killed sweep: the next `icgd sweep` on this "
                         "directory makes them pending and trains them")
    return "\n".join(lines)


def run(args):
    try:
        if args.target and args.target[0] == "status":
            if len(args.target) != 2:
                return _fail("status: expected one sweep directory or sweep file")
            t = args.target[1]
            out = args.out or (default_out(spec_from_file(t, quick=args.quick)) if os.path.isfile(t) else t)
            print(status_text(out))
            return 0
        spec = spec_from_args(args)
        out = args.out or default_out(spec)
        points = expand(spec)
        check_configs(points)
        if args.reuse_from and not os.path.isdir(args.reuse_from):
            raise SweepError(f"--reuse-from: {args.reuse_from} is not a directory")
        if args.records and not os.path.isdir(args.records):
            raise SweepError(f"--records: {args.records} is not a directory")
        if args.older_records and not args.records:
            raise SweepError("--older-records: needs --records DIR")
        if args.reuse_only and not (args.reuse_from or args.records):
            raise SweepError("--reuse-only: needs --reuse-from DIR or --records DIR (the finished runs to record)")
        R.check_run_dir(out)
    except (ConfigError, StoreError) as exc:
        return _fail(exc)
    if args.dry_run:
        print(f"sweep {spec.name}: {len(points)} grid points, {len({p.config for p in points})} distinct runs -> {out}")
        for p in points:
            print(f"  {R.config_hash(p.config)[:12]}  {_point_text(p)}")
        return 0
    workers = args.workers or default_workers(args.engine)
    threads = args.threads or threads_per_worker(workers)
    try:
        engine = make_engine(args.engine, workers, args.scheduler)
    except (ConfigError, OSError) as exc:
        return _fail(exc)
    try:
        counts = run_sweep(spec, out, engine, retry_failed=args.retry_failed, threads=threads,
                           reuse_from=args.reuse_from, reuse_only=args.reuse_only, records=args.records,
                           older_records=args.older_records, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\nicgd sweep: interrupted; finished runs are in {out}/{STORE_FILE}; run the same command again "
              "to continue", file=sys.stderr)
        return INTERRUPTED
    except (ConfigError, StoreError) as exc:
        return _fail(exc)
    finally:
        engine.close()
    print(f"icgd sweep {spec.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" ({out})")
    if counts["failed"]:
        print("icgd sweep: some runs failed; icgd sweep status shows why, --retry-failed trains them again",
              file=sys.stderr)
        return 1
    return 0
