"""The results store of a sweep: one SQLite database (stdlib ``sqlite3``) next to the
sweep's run directories. Only the driver process opens it for writing; workers return
their results and the driver records each one in its own transaction, so a killed
sweep loses no finished run.

    SWEEP_DIR/
      sweep.sqlite     this store
      sweep.lock       held (flock) by the driver while it runs the sweep
      runs/<hash16>/   one run directory per distinct config (verify.runs)

Tables (format 1):

    meta(key, value)            'format' (1), 'name', 'spec' (the sweep file as JSON),
                                'created', 'updated'
    runs(hash PRIMARY KEY, ...)  one row per distinct config (identical configs of two
                                grid points are trained once): experiment, seed, config
                                (JSON), status ('pending' | 'running' | 'done' | 'failed'),
                                error, attempts, worker, queued / started / finished
                                (unix seconds), seconds (the worker's wall time),
                                final (JSON: the last evaluation row), baselines (JSON),
                                analysis (JSON: the weights' reading, OOD curves, extra
                                baselines), params_sha (sha256 of the final parameters),
                                run_dir
    points(point PRIMARY KEY, hash, cell, seed, label)
                                the grid: each point (its coordinates and seed, as JSON)
                                names the run that answers it; ``cell`` is the point
                                without the seed (what a report averages over)
    evals(hash, step, loss, metrics)
                                one row per evaluation of a done run (metrics: the row as JSON)

A run found 'running' when a driver opens the store was left by a driver that died
(only one driver holds the lock): :meth:`SweepStore.reset_stale` makes it pending.
"""

import json
import sqlite3
import time

FORMAT = 1
STATUSES = ("pending", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    queued REAL,
    started REAL,
    finished REAL,
    seconds REAL,
    final TEXT,
    baselines TEXT,
    analysis TEXT,
    params_sha TEXT,
    run_dir TEXT
);
CREATE TABLE IF NOT EXISTS points (
    point TEXT PRIMARY KEY,
    hash TEXT NOT NULL REFERENCES runs(hash),
    cell TEXT NOT NULL,
    seed INTEGER NOT NULL,
    label TEXT
);
CREATE TABLE IF NOT EXISTS evals (
    hash TEXT NOT NULL REFERENCES runs(hash),
    step INTEGER NOT NULL,
    loss REAL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (hash, step)
);
"""


class StoreError(RuntimeError):
    """The store cannot be opened or was written by an incompatible version."""


def _dumps(x):
    return None if x is None else json.dumps(x, sort_keys=True)


def _loads(s):
    return None if s is None else json.loads(s)


class SweepStore:
    """The store at ``path``. ``readonly``: open an existing store for reading only
    (``icgd sweep status``, ``icgd report``), never creating it."""

    def __init__(self, path, readonly=False):
        self.path = path
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            else:
                self.db = sqlite3.connect(path)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                with self.db:
                    self.db.executescript(SCHEMA)
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT),))
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (repr(time.time()),))
            self.db.row_factory = sqlite3.Row
            fmt = self.meta("format")
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the sweep store ({exc})") from None
        if fmt != str(FORMAT):
            raise StoreError(f"{path}: sweep store format {fmt}, this code reads format {FORMAT}")

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- meta -------------------------------------------------------------------------------
    def meta(self, key):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, **values):
        with self.db:
            for k, v in values.items():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))

    # ---- the grid ---------------------------------------------------------------------------
    def add_points(self, points):
        """Record the grid: ``points`` is a list of (point key, cell key, seed, label,
        config hash, experiment, config dict). A run row is created pending when its
        hash is new; an existing row (done, failed or pending) is kept as it is. One
        transaction."""
        now = time.time()
        with self.db:
            for point, cell, seed, label, h, experiment, cfg in points:
                self.db.execute("INSERT OR IGNORE INTO runs (hash, experiment, seed, config, status, queued) "
                                "VALUES (?, ?, ?, ?, 'pending', ?)", (h, experiment, seed, _dumps(cfg), now))
                self.db.execute("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?)", (point, h, cell, seed, label))

    def reset_stale(self):
        """Runs left 'running' by a driver that died become 'pending'; returns how many."""
        with self.db:
            return self.db.execute("UPDATE runs SET status = 'pending' WHERE status = 'running'").rowcount

    def todo(self, hashes, retry_failed):
        """The hashes among ``hashes`` still to train: pending ones, and failed ones when
        ``retry_failed``."""
        want = ("pending", "failed") if retry_failed else ("pending",)
        rows = self.db.execute("SELECT hash, status FROM runs").fetchall()
        status = {r["hash"]: r["status"] for r in rows}
        return [h for h in hashes if status.get(h) in want]

    # ---- the driver's writes ---------------------------------------------------------------
    def mark_running(self, hashes):
        with self.db:
            self.db.executemany("UPDATE runs SET status = 'running', error = NULL, attempts = attempts + 1 "
                                "WHERE hash = ?", [(h,) for h in hashes])

    def record(self, h, result):
        """Record a worker's result (:func:`verify.sweep.run_cell`'s dict) for run ``h``,
        with its evaluations, in one transaction. A run already done is left as it is
        (a task that an engine ran twice, after a worker was lost, is recorded once)."""
        with self.db:
            row = self.db.execute("SELECT status FROM runs WHERE hash = ?", (h,)).fetchone()
            if row is None:
                raise StoreError(f"{self.path}: no run {h} in the store")
            if row["status"] == "done":
                return False
            self.db.execute(
                "UPDATE runs SET status = ?, error = ?, worker = ?, started = ?, finished = ?, seconds = ?, "
                "final = ?, baselines = ?, analysis = ?, params_sha = ?, run_dir = ? WHERE hash = ?",
                (result["status"], result.get("error"), result.get("worker"), result.get("started"),
                 result.get("finished"), result.get("seconds"), _dumps(result.get("final")),
                 _dumps(result.get("baselines")), _dumps(result.get("analysis")), result.get("params_sha"),
                 result.get("run_dir"), h))
            self.db.execute("DELETE FROM evals WHERE hash = ?", (h,))
            self.db.executemany("INSERT INTO evals VALUES (?, ?, ?, ?)",
                                [(h, r["step"], r.get("loss"), _dumps(r)) for r in result.get("history") or []])
            return True

    def add_extra_baselines(self, h, extra):
        """Merge ``extra`` into the stored analysis' extra baselines of the done run ``h``
        (one transaction; the run's other columns stay as they are)."""
        with self.db:
            row = self.db.execute("SELECT status, analysis FROM runs WHERE hash = ?", (h,)).fetchone()
            if row is None or row["status"] != "done":
                raise StoreError(f"{self.path}: no done run {h} in the store")
            analysis = _loads(row["analysis"]) or {}
            analysis["extra_baselines"] = {**(analysis.get("extra_baselines") or {}), **extra}
            self.db.execute("UPDATE runs SET analysis = ? WHERE hash = ?", (_dumps(analysis), h))

    def record_failure(self, h, error):
        self.record(h, {"status": "failed", "error": error, "finished": time.time()})

    # ---- reading ------------------------------------------------------------------------------
    def counts(self, hashes=None):
        """{status: number of runs} (over ``hashes`` when given, else every run)."""
        rows = self.db.execute("SELECT hash, status FROM runs").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        for r in rows:
            if hashes is None or r["hash"] in hashes:
                out[r["status"]] += 1
        return out

    def runs(self):
        """Every run row as a dict (JSON columns decoded)."""
        out = []
        for r in self.db.execute("SELECT * FROM runs ORDER BY experiment, seed, hash").fetchall():
            d = dict(r)
            for k in ("config", "final", "baselines", "analysis"):
                d[k] = _loads(d[k])
            out.append(d)
        return out

    def points(self):
        """Every grid point: dicts with point, hash, cell (decoded), seed, label."""
        rows = self.db.execute("SELECT * FROM points ORDER BY rowid").fetchall()
        return [dict(point=r["point"], hash=r["hash"], cell=_loads(r["cell"]), seed=r["seed"], label=r["label"])
                for r in rows]

    def history(self, h):
        """The evaluation rows of run ``h``, by step."""
        return [_loads(r["metrics"]) for r in
                self.db.execute("SELECT metrics FROM evals WHERE hash = ? ORDER BY step", (h,)).fetchall()]
