"""Run directories: one training run on disk, written so that it can be resumed bit for
bit, checked, and trusted later. The application around ``reference.trainer``.

    run_dir/
      config.json     the effective config (format 2: grouped; format 1: flat, still read)
      metrics.jsonl   one JSON object per line: the 'baselines' row, then one 'eval' row
                      per evaluation (appended as the run goes)
      checkpoint.npz  parameters, Adam state, step, and everything needed to rebuild
                      metrics.jsonl (baselines and the eval rows so far), with a checksum
      summary.json    final numbers and analyses, and a digest binding them to the
                      config, the checkpoint and the reference/ sources that trained it
      run.lock        held (flock) while a process trains in the directory
      plots/*.png     drawn by verify.plots from these files

Checkpoint (plain .npz, readable without this code), format 2:
``format_version`` (2), ``config`` (JSON), ``step``, ``params.{i}.{field}``,
``adam.m.{i}.{field}``, ``adam.v.{i}.{field}``, ``adam.t``, ``extra`` (JSON: baselines,
seconds, history, divergence), ``checksum`` (sha256 over every other entry's name, dtype, shape
and bytes, in name order). It is written by ``reference.files.write_bytes_atomic``
(a temporary file in the same folder, fsynced and renamed over the old one). Format 1
(no checksum, no history) is read.

Digest (``summary["digest"]``): sha256 of the config's canonical JSON, the final
checkpoint's checksum, the hash of the ``reference`` package's sources
(:func:`reference_hash`) and the sha256 of the summary without the digest.
:func:`check_digest` recomputes each and names the part that does not match.
"""

import contextlib
import fcntl
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
import zipfile
from typing import NamedTuple, Optional

import numpy as np

import reference
from reference import analysis as A
from reference import trainer
from reference.files import OutputPathError, check_output_dir, write_bytes_atomic, write_text_atomic
from reference.config import ConfigError, TrainConfig, config_differences, config_from_dict
from reference.errors import TrainingDiverged
from reference.optim import AdamState
from reference.tree import all_finite, from_arrays, to_arrays, to_host, tree_leaves, tree_paths

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE, LOCK_FILE = (
    "config.json", "metrics.jsonl", "checkpoint.npz", "summary.json", "run.lock")
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE)

# fields that may differ between a checkpoint and the config resuming it: they do not
# change the trajectory (steps only decides where the run stops).
RESUME_MAY_CHANGE = ("steps", "checkpoint_every")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not belong to this configuration."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during :func:`train_run`: ``step`` is the last update done,
    ``checkpoint_step`` the step of the last checkpoint written (None: none), ``run_dir``
    the run directory (None: nothing written). No file is left half-written."""

    def __init__(self, step, checkpoint_step, run_dir):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint_step, self.run_dir = step, checkpoint_step, run_dir


# ---- hashes ---------------------------------------------------------------------------

def _sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(cfg):
    return _sha(json.dumps(cfg.to_dict(), sort_keys=True))


_REF_HASH = []


def reference_hash():
    """sha256 over the ``reference`` package's .py files (relative path and bytes, in path
    order): which version of the spec trained a run."""
    if not _REF_HASH:
        root = os.path.dirname(os.path.abspath(reference.__file__))
        h = hashlib.sha256()
        files = sorted(os.path.relpath(os.path.join(dp, f), root)
                       for dp, dn, fn in os.walk(root) if "__pycache__" not in dp for f in fn if f.endswith(".py"))
        for rel in files:
            h.update(rel.encode() + b"\0")
            with open(os.path.join(root, rel), "rb") as f:
                h.update(f.read() + b"\0")
        _REF_HASH.append(h.hexdigest())
    return _REF_HASH[0]


def arrays_checksum(arrays):
    """sha256 over (name, dtype, shape, bytes) of every array, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- checkpoints -------------------------------------------------------------------------

class Checkpoint(NamedTuple):
    config: TrainConfig
    step: int
    params: tuple
    state: AdamState
    extra: dict
    version: int
    checksum: Optional[str]


def save_checkpoint(path, cfg, step, params, state, extra):
    """Write a format-2 checkpoint atomically (temp file in the same folder, fsync,
    rename). Returns its checksum."""
    arrays = {"format_version": np.array(FORMAT_VERSION), "config": np.array(cfg.to_json()),
              "step": np.array(step), "adam.t": np.array(state.t), "extra": np.array(json.dumps(jsonable(extra)))}
    arrays.update(to_arrays(params, "params"))
    arrays.update(to_arrays(state.m, "adam.m"))
    arrays.update(to_arrays(state.v, "adam.v"))
    checksum = arrays_checksum(arrays)
    arrays["checksum"] = np.array(checksum)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
    return checksum


def load_checkpoint(path, expect_config=None):
    """Read a checkpoint (format 1 or 2); refuse it (CheckpointError, with the reason) if
    it cannot be read, fails its checksum, has an unknown format version, or was written
    by a different configuration (fields other than RESUME_MAY_CHANGE)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read the zip (bad CRC, compression, encryption, ...)
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        ck = _decode_checkpoint(path, arrays)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, ConfigError, UnicodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if expect_config is not None:
        diff = config_differences(ck.config, expect_config, ignore=RESUME_MAY_CHANGE)
        if diff:
            raise CheckpointError(f"{path}: checkpoint was written by a different configuration: " + "; ".join(diff)
                                  + f" (only {', '.join(RESUME_MAY_CHANGE)} may change on --resume)")
        if ck.step > expect_config.steps:
            raise CheckpointError(f"{path}: checkpoint is at step {ck.step}, beyond steps={expect_config.steps}")
    return ck


def _decode_checkpoint(path, arrays):
    if "format_version" not in arrays:
        raise CheckpointError(f"{path}: not an icgd checkpoint (no format_version)")
    version = _scalar_int(path, arrays, "format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this code reads versions "
                              f"{list(READABLE_VERSIONS)}; retrain, or use the code that wrote it")
    checksum = None
    if version >= 2:
        if "checksum" not in arrays:
            raise CheckpointError(f"{path}: format-2 checkpoint without its checksum")
        checksum = str(arrays.pop("checksum"))
        actual = arrays_checksum(arrays)
        if actual != checksum:
            raise CheckpointError(f"{path}: checksum mismatch (stored {checksum[:12]}..., contents {actual[:12]}...): "
                                  "the file is corrupted or was edited")
    cfg = config_from_dict(json.loads(str(arrays["config"])))
    step, t = _scalar_int(path, arrays, "step"), _scalar_int(path, arrays, "adam.t")
    if step < 0:
        raise CheckpointError(f"{path}: step must be >= 0, got {step}")
    if t != step:
        raise CheckpointError(f"{path}: adam.t = {t} disagrees with step = {step} (one Adam update per step)")
    template = trainer.init_params(cfg)
    types = [type(p) for p in template]
    expected = {"format_version", "config", "step", "adam.t", "extra"} | {
        f"{prefix}.{i}.{f}" for prefix in ("params", "adam.m", "adam.v") for i, tp in enumerate(types) for f in tp._fields}
    extra_keys = sorted(set(arrays) - expected)
    if extra_keys:
        raise CheckpointError(f"{path}: unexpected array(s) {extra_keys} for this configuration")
    for prefix in ("params", "adam.m", "adam.v"):
        for i, p in enumerate(template):
            for f, want in zip(p._fields, p):
                _check_leaf(path, f"{prefix}.{i}.{f}", arrays.get(f"{prefix}.{i}.{f}"), want)
    params = from_arrays(arrays, "params", types)
    m, v = from_arrays(arrays, "adam.m", types), from_arrays(arrays, "adam.v", types)
    for name, tree in (("params", params), ("adam.m", m), ("adam.v", v)):
        if not all_finite(tree):
            raise CheckpointError(f"{path}: {name} hold non-finite values")
    neg = [p for p, a in zip(tree_paths(v), tree_leaves(v)) if (a < 0).any()]
    if neg:
        raise CheckpointError(f"{path}: adam.v (second moments) must be >= 0, negative in {neg}")
    extra = json.loads(str(arrays["extra"]))
    if not isinstance(extra, dict) or not isinstance(extra.get("baselines"), dict):
        raise CheckpointError(f"{path}: extra must hold the run's baselines")
    return Checkpoint(cfg, step, params, AdamState(m, v, t), extra, version, checksum)


def _scalar_int(path, arrays, name):
    a = arrays[name]
    if a.ndim != 0 or a.dtype.kind not in "iu":
        raise CheckpointError(f"{path}: {name} must be an integer scalar, got dtype {a.dtype} shape {a.shape}")
    return int(a)


def _check_leaf(path, name, a, want):
    if a is None:
        raise CheckpointError(f"{path}: missing array {name!r}")
    if a.dtype != want.dtype:
        raise CheckpointError(f"{path}: {name} has dtype {a.dtype}, the config trains in {want.dtype}")
    if a.shape != want.shape:
        raise CheckpointError(f"{path}: {name} has shape {a.shape}, the config needs {want.shape}")


# ---- metrics -------------------------------------------------------------------------------

def read_metrics(path):
    """(rows, problem): every readable row of a metrics.jsonl file, and what was wrong
    with it (None when every line was read; "missing"; or "line n is not JSON", joined
    by "; " for several lines). An unreadable line loses only itself."""
    if not os.path.exists(path):
        return [], "missing"
    rows, bad = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.append(f"line {n} is not JSON")
                continue
            if not isinstance(row, dict) or row.get("kind") not in ("baselines", "eval") or (
                    row.get("kind") == "eval" and not isinstance(row.get("step"), int)):
                bad.append(f"line {n} is not a metrics row")
                continue
            rows.append(row)
    return rows, ("; ".join(bad) or None)


def metrics_from_checkpoint(ck):
    """The metrics rows a checkpoint can rebuild: the baselines row and (format 2) every
    eval row up to its step. Returns (rows, complete: bool)."""
    rows = [dict(kind="baselines", **ck.extra["baselines"])]
    hist = ck.extra.get("history")
    if hist is None:
        return rows, False
    return rows + [dict(r) for r in hist], True


def merge_metrics(rows, problem, ck):
    """The rows a run directory still has: the file's rows, with every row up to the
    checkpoint's step taken from the checkpoint when the file is damaged or lacks one
    (format 2 holds them all; format 1 only the baselines row). Returns (rows, note):
    ``note`` says what was rebuilt and what is lost (None when the file was whole)."""
    if ck is None:
        return rows, (None if problem is None else f"metrics.jsonl: {problem}; no checkpoint to rebuild from")
    rebuilt, complete = metrics_from_checkpoint(ck)
    upto = [r for r in rows if r.get("kind") == "baselines" or r["step"] <= ck.step]
    after = [r for r in rows if r.get("kind") == "eval" and r["step"] > ck.step]
    has_base = any(r.get("kind") == "baselines" for r in upto)
    if problem is None and (upto == rebuilt if complete else has_base):
        return rows, None
    if complete:
        what = problem or ("rows missing" if len(upto) < len(rebuilt) else "rows differ from the checkpoint's")
        note = f"metrics.jsonl: {what}; rebuilt its {len(rebuilt)} rows up to step {ck.step} from the checkpoint"
        lost = sorted({r["step"] for r in after})
        return rebuilt + after, note + (f"; kept the readable rows after it (steps {lost})" if lost else "")
    base = [] if has_base else rebuilt[:1]
    return base + upto + after, (f"metrics.jsonl: {problem or 'rows missing'}; a format-1 checkpoint holds only "
                                 "the baselines row, so the eval rows that were unreadable are lost")


def recover_metrics(run_dir):
    """What :func:`load_run` does to metrics.jsonl, spelled out: dict(rows, problems (the
    file's), rebuilt (rows taken from the checkpoint), note)."""
    ck_path = os.path.join(run_dir, CHECKPOINT_FILE)
    ck = load_checkpoint(ck_path) if os.path.exists(ck_path) else None
    rows, problem = read_metrics(os.path.join(run_dir, METRICS_FILE))
    merged, note = merge_metrics(rows, problem, ck)
    return {"rows": merged, "problems": [] if problem is None else problem.split("; "),
            "rebuilt": note is not None and "rebuilt" in note, "note": note}


class _Metrics:
    """metrics.jsonl, appended line by line (or in memory only when there is no run dir)."""

    def __init__(self, path, rows=()):
        self.path, self.rows = path, list(rows)
        if path is not None:
            write_text_atomic(path, "".join(json.dumps(jsonable(r)) + "\n" for r in self.rows))

    def add(self, row):
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(jsonable(row)) + "\n")

    def history(self):
        return [r for r in self.rows if r.get("kind") == "eval"]


# ---- the lock ---------------------------------------------------------------------------------

class RunLock:
    """An exclusive flock on run_dir/run.lock while a process trains there."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(self.path) as f:
                who = f.read().strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise ConfigError(f"{os.path.dirname(self.path)} is in use by {who}; wait for it to finish") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        return False


def lock_holder(run_dir):
    """What another process holding run_dir/run.lock wrote there ("pid N"), or None when
    no process holds it (or there is no lock file). Opens the file read-only and takes
    a shared lock for a moment: the file is not changed."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path) as f:
                return f.read().strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---- one run ----------------------------------------------------------------------------------

class RunResult(NamedTuple):
    config: TrainConfig
    params: tuple
    baselines: dict
    history: list     # the 'eval' rows
    summary: dict
    run_dir: Optional[str]


class _RunFiles(trainer.Observer):
    """The observer that keeps a run directory: metrics rows, checkpoints, progress."""

    def __init__(self, cfg, paths, metrics, baselines, elapsed0, progress, last_ckpt):
        self.cfg, self.paths, self.metrics, self.baselines = cfg, paths, metrics, baselines
        self.elapsed0, self.t_start, self.progress = elapsed0, time.perf_counter(), progress
        self.last_ckpt, self.checksum = last_ckpt, None
        self.last_step = last_ckpt or 0

    def seconds(self):
        return round(self.elapsed0 + time.perf_counter() - self.t_start, 2)

    def after_step(self, state, loss, grad_norm):
        self.last_step = state.step
        self.progress.step(state.step, loss)

    def after_eval(self, state, row, train_loss, grad_norm):
        row = {"kind": "eval", **row, "train_loss": train_loss, "grad_norm": grad_norm, "seconds": self.seconds()}
        self.metrics.add(row)
        self.progress.evaluated(row)
        s, c = state.step, self.cfg
        if self.paths is not None and (s % c.eval.checkpoint_every == 0 or s == c.steps):
            self.save(state)

    def save(self, state):
        extra = {"baselines": self.baselines, "seconds": self.seconds(), "history": self.metrics.history(),
                 "divergence": state.watch.to_dict()}
        with interrupts_deferred():      # a Ctrl-C lands after the checkpoint is written and recorded
            self.checksum = save_checkpoint(self.paths[CHECKPOINT_FILE], self.cfg, state.step,
                                            to_host(state.params),
                                            AdamState(to_host(state.adam.m), to_host(state.adam.v), state.adam.t),
                                            extra)
            self.last_ckpt = state.step


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) while the block runs: a SIGINT that arrives meanwhile is
    recorded and handed to the previous handler (KeyboardInterrupt, by default) when the
    block has finished, so a checkpoint is never interrupted half-way through its
    serialisation. Signal handlers belong to the main thread; elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = _PendingSignals()
    old = signal.signal(signal.SIGINT, pending)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if pending.signals:
            if callable(old):
                old(signal.SIGINT, None)         # signal.default_int_handler raises KeyboardInterrupt
            elif old == signal.SIG_DFL:
                raise KeyboardInterrupt


class _PendingSignals:
    """A signal handler that only records the signals it receives."""

    def __init__(self):
        self.signals = []

    def __call__(self, signum, frame):
        self.signals.append(signum)


def train_run(cfg, out_dir=None, *, resume=False, overwrite=False, progress=None, log=None, analyses=True):
    """Train ``cfg`` (``reference.trainer``), keeping the run directory ``out_dir`` (None:
    nothing is written), and return a :class:`RunResult`.

    ``resume``: continue from the checkpoint (refused if it is unreadable or from another
    config). Without resume an existing run in ``out_dir`` is refused unless
    ``overwrite``. ``progress``: a :class:`verify.progress.Progress` (None: none).
    ``log``: a function for one-line messages. ``analyses``: run the final analyses.
    Raises ConfigError before any work, TrainingDiverged on a non-finite loss or
    parameters (the last good checkpoint is kept), CheckpointError on a bad resume.
    """
    from .progress import Progress

    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    log = log or _silent
    progress = progress or Progress(cfg.steps, enabled=False)
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: --resume continues the run in the directory, "
                          "--overwrite replaces it")
    stepper = check_runnable(cfg)
    if out_dir is None:
        if resume:
            raise ConfigError("resume needs a run directory")
        return _train(cfg, None, False, progress, log, analyses, stepper)
    check_run_dir(out_dir)
    with RunLock(out_dir):
        _remove_stale_temporaries(out_dir, log)
        existing = [k for k in RUN_FILES if os.path.exists(os.path.join(out_dir, k))]
        has_ckpt = CHECKPOINT_FILE in existing
        if resume and not has_ckpt:
            raise CheckpointError(
                f"{out_dir}: no checkpoint to resume from"
                + (" (the run stopped before its first checkpoint)" if existing else "")
                + "; run it again without --resume (or with --overwrite) to start it from step 0")
        if existing and not resume and not overwrite:
            if has_ckpt:
                raise ConfigError(f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to continue "
                                  "it, --overwrite to replace it, or choose another output directory")
            log(f"{out_dir}: replacing an unfinished run that stopped before its first checkpoint "
                f"({', '.join(existing)})")
        return _train(cfg, out_dir, resume, progress, log, analyses, stepper)


def _silent(msg):
    pass


def check_runnable(cfg):
    """ConfigError (with the reason) unless the run fits in memory and the configured
    backend is available here and runs this model; nothing is trained. Returns the
    backend's stepper."""
    check_memory(cfg)
    try:
        return trainer.make_stepper(cfg)
    except (RuntimeError, ImportError, OSError, ValueError) as exc:
        raise ConfigError(f"backend {cfg.backend!r} cannot run this configuration here: {exc}; "
                          "use backend=numpy") from exc


def check_run_dir(out_dir):
    """ConfigError unless ``out_dir`` is (or can be made) a writable directory
    (``reference.files.check_output_dir``: not a file or a device, writable as probed
    with a temporary file, so read-only mounts are caught whoever runs it); then it is
    created."""
    try:
        check_output_dir(out_dir)
        os.makedirs(out_dir, exist_ok=True)
    except (OutputPathError, OSError) as exc:
        raise ConfigError(str(exc)) from None


def _remove_stale_temporaries(out_dir, log):
    """Temporary files a killed writer left behind (``.ckpt-*``, ``.tmp-*``); only called
    while holding the run lock, so no live writer owns them."""
    for name in os.listdir(out_dir):
        if name.startswith((".ckpt-", ".tmp-")):
            os.unlink(os.path.join(out_dir, name))
            log(f"{out_dir}: removed the stale temporary file {name}")


def check_memory(cfg):
    """ConfigError with the estimate unless the run fits in the memory available here."""
    est = trainer.memory_estimate(cfg)
    avail, source = available_memory()
    if avail is not None and est["total"] > avail:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(est["parts"].items(), key=lambda kv: -kv[1]))
        raise ConfigError(f"this run needs about {_gib(est['total'])} of memory ({parts}), but {_gib(avail)} is "
                          f"available ({source}); lower batch, eval_tasks, line_search_tasks, gdpp_batch, ood_tasks "
                          "or the sizes d, N, n_layers, heads")


def available_memory():
    """(bytes, where it comes from): the smaller of the cgroup's remaining limit and
    MemAvailable; (None, reason) when neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                raw = f.read().strip()
            if raw == "max":
                continue
            with open(usage) as f:
                used = int(f.read().strip())
            found.append((max(int(raw) - used, 0), "the cgroup memory limit"))
            break
        except (OSError, ValueError):
            continue
    if not found:
        return None, "unknown"
    return min(found)


def _gib(n):
    return f"{n / 2 ** 30:.3g} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.3g} MiB"


def _train(cfg, out_dir, resume, progress, log, analyses, stepper):
    paths = None if out_dir is None else {k: os.path.join(out_dir, k) for k in RUN_FILES}
    if resume:
        ck = load_checkpoint(paths[CHECKPOINT_FILE], expect_config=cfg)
        baselines, elapsed0 = ck.extra["baselines"], float(ck.extra.get("seconds", 0.0))
        rows = _resume_rows(paths[METRICS_FILE], ck, log)
        state = trainer.TrainState(ck.params, ck.state, ck.step, _watch_of(cfg, ck, rows, baselines))
        log(f"resuming {out_dir} at step {ck.step} of {cfg.steps}")
    else:
        if paths is not None:
            for k in RUN_FILES:
                if os.path.exists(paths[k]):
                    os.unlink(paths[k])
        state, baselines, elapsed0, rows = trainer.init_state(cfg), None, 0.0, []
    if paths is not None:
        write_text_atomic(paths[CONFIG_FILE], json.dumps({"format_version": FORMAT_VERSION, **cfg.to_dict()},
                                                         indent=2) + "\n")
    evals = trainer.eval_tasks(cfg)
    if baselines is None:
        baselines = trainer.compute_baselines(cfg, evals, log=log)
        rows = [dict(kind="baselines", **baselines)]
    metrics = _Metrics(paths and paths[METRICS_FILE], rows)
    es = trainer.eval_set(cfg, evals, baselines)
    progress.start(state.step, baselines, cfg.model.n_layers)
    files = _RunFiles(cfg, paths, metrics, baselines, elapsed0, progress, state.step if resume else None)
    if resume:
        files.checksum = ck.checksum        # a resume that is already at `steps` writes no new checkpoint
    try:
        state = trainer.train_loop(cfg, state, es, files, stepper)
        return _finish(cfg, state, metrics, baselines, evals, files, paths, analyses, out_dir)
    except TrainingDiverged as exc:
        raise _with_checkpoint(exc, paths, files.last_ckpt) from None
    except KeyboardInterrupt:
        raise RunInterrupted(files.last_step, _checkpoint_step(paths, files.last_ckpt), out_dir) from None
    finally:
        progress.close()


def _finish(cfg, state, metrics, baselines, evals, files, paths, analyses, out_dir):
    """The end of a run: the final analyses and summary.json (with its digest)."""
    params = to_host(state.params)
    history = metrics.history()
    summary = {"experiment": cfg.experiment, "steps": cfg.steps, "seed": cfg.seed, "baselines": baselines,
               "final": history[-1] if history else None, "seconds": files.seconds()}
    if analyses:
        t0 = time.perf_counter()
        if cfg.is_sequence:
            from reference import seq_training

            summary.update(seq_training.final_analyses(cfg, params, baselines, evals))
        else:
            summary.update(A.final_analyses(cfg, params, baselines, evals))
        summary["analysis_seconds"] = round(time.perf_counter() - t0, 2)
    if paths is not None:
        summary = jsonable(summary)
        summary["digest"] = _digest(cfg, files.checksum, summary)
        write_text_atomic(paths[SUMMARY_FILE], json.dumps(summary, indent=1) + "\n")
    return RunResult(cfg, params, baselines, history, summary, out_dir)


def _resume_rows(path, ck, log):
    """metrics.jsonl's rows up to the checkpoint's step, recovered from the checkpoint
    where the file is missing or damaged (:func:`merge_metrics`), with a message."""
    rows, problem = read_metrics(path)
    merged, note = merge_metrics(rows, problem, ck)
    if note:
        log(f"{os.path.dirname(path)}: {note}")
    return [r for r in merged if r.get("kind") == "baselines" or r["step"] <= ck.step]


def _watch_of(cfg, ck, rows, baselines):
    """The divergence rule's state at the checkpoint: stored in format-2 checkpoints;
    for older ones replayed from the eval rows up to the checkpoint's step."""
    if "divergence" in ck.extra:
        return trainer.DivergenceWatch.from_dict(ck.extra["divergence"])
    zero = baselines.get("zero_loss")
    if zero is None:
        zero = A.mean_loss(np.zeros((1, 1)), np.zeros((1, 1)))
    watch, e = trainer.DivergenceWatch(), cfg.eval
    for r in rows:
        if r.get("kind") == "eval" and r["step"] <= ck.step:
            watch, _ = watch.update(r["step"], r["loss"], zero, e.diverge_factor, e.diverge_evals)
    return watch


def _checkpoint_step(paths, last_ckpt):
    """The step of the checkpoint on disk (an interrupt can land after a checkpoint was
    renamed into place but before the run recorded it); ``last_ckpt`` if none is readable."""
    if paths is None:
        return last_ckpt
    try:
        return load_checkpoint(paths[CHECKPOINT_FILE]).step
    except CheckpointError:
        return last_ckpt


def _with_checkpoint(exc, paths, last_ckpt):
    where = ""
    if paths is not None and last_ckpt is not None:
        where = f"; the last good checkpoint (step {last_ckpt}) is kept at {paths[CHECKPOINT_FILE]}"
    elif paths is not None:
        where = "; no checkpoint had been written yet"
    return TrainingDiverged(f"{exc}{where}. Lower lr or set grad_clip.", exc.step, last_ckpt)


def summary_hash(body):
    """sha256 of a summary without its digest (the digest's summary part)."""
    return _sha(json.dumps(body, sort_keys=True))


def _digest(cfg, checkpoint_checksum, summary):
    body = {k: v for k, v in summary.items() if k != "digest"}
    return {"config": config_hash(cfg), "checkpoint": checkpoint_checksum, "reference": reference_hash(),
            "summary": summary_hash(body)}


REFERENCE_CHANGED = "the reference/ sources changed since the run was trained"


def check_digest(run_dir):
    """None when summary.json's digest matches the run's config, checkpoint, the current
    reference/ sources and the summary itself; else the list of parts that do not match
    (or ['no digest'] for a format-1 run)."""
    try:
        cfg, ck, _, summary = load_run(run_dir)
    except CheckpointError as exc:
        return [str(exc)]
    except (OSError, ValueError) as exc:
        return [f"{run_dir}: unreadable run files ({type(exc).__name__}: {exc})"]
    dg = (summary or {}).get("digest")
    if not dg:
        return ["no digest (a format-1 run)"]
    bad = []
    if dg.get("config") != config_hash(cfg):
        bad.append("config.json differs from the config that trained the run")
    if ck is None or dg.get("checkpoint") != ck.checksum:
        bad.append("checkpoint.npz is not the one the run ended with")
    if dg.get("reference") != reference_hash():
        bad.append(REFERENCE_CHANGED)
    body = {k: v for k, v in summary.items() if k != "digest"}
    if dg.get("summary") != summary_hash(body):
        bad.append("summary.json was edited after the run wrote it")
    return bad or None


# ---- reading runs ------------------------------------------------------------------------------

def load_run(run_dir):
    """(config, Checkpoint or None, metrics rows, summary or None) of a run directory."""
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        cfg = config_from_dict(json.load(f))
    ck_path = os.path.join(run_dir, CHECKPOINT_FILE)
    ck = load_checkpoint(ck_path) if os.path.exists(ck_path) else None
    rows, problem = read_metrics(os.path.join(run_dir, METRICS_FILE))
    rows, _ = merge_metrics(rows, problem, ck)
    sp = os.path.join(run_dir, SUMMARY_FILE)
    summary = None
    if os.path.exists(sp):
        with open(sp) as f:
            summary = json.load(f)
    return cfg, ck, rows, summary


def load_result(run_dir):
    """The :class:`RunResult` of a finished run directory (as :func:`train_run` returned it)."""
    cfg, ck, rows, summary = load_run(run_dir)
    if summary is None or ck is None:
        raise CheckpointError(f"{run_dir}: not a finished run (no summary.json or checkpoint.npz)")
    base = next((r for r in rows if r.get("kind") == "baselines"), None)
    base = {k: v for k, v in base.items() if k != "kind"} if base else summary.get("baselines")
    return RunResult(cfg, ck.params, base, [r for r in rows if r.get("kind") == "eval"], summary, run_dir)


def loss_drop_step(history, baselines):
    """The first evaluation step whose loss is at or below the midpoint between the zero
    predictor's loss and GD's (``baselines["zero_loss"]``, ``["gd_loss"]``), or None. On
    classic tokens the zero predictor is the plateau before the copy forms (without x and
    y in one token the best prediction is 0, by the symmetry w -> -w of the task
    distribution), so this is when the loss drops; the step-0 loss is above it (the
    readout's positional offset)."""
    mid = 0.5 * (baselines["zero_loss"] + baselines["gd_loss"])
    return next((row["step"] for row in history if row["loss"] <= mid), None)


def train_to_dir(cfg_dict, out_dir):
    """Train a config given as a dict into ``out_dir`` (overwriting) without progress
    output; returns out_dir. A picklable entry point for worker processes."""
    train_run(config_from_dict(cfg_dict), out_dir, overwrite=True)
    return out_dir


def jsonable(x):
    """JSON-ready copies: arrays to lists, NumPy scalars to Python, inf to +-1e308, NaN to None."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return jsonable(x.item())
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def log_to_stderr(msg):
    print(msg, file=sys.stderr, flush=True)
