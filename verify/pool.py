"""Train many runs at once: a process pool that knows nothing about which experiments
exist. The training claims use it, and so can sweeps.

Each job is (TrainConfig, run directory). Jobs start longest first, by a cost estimated
from the config alone (:func:`estimated_cost`); each worker trains one run with
``verify.runs.train_to_dir`` (spawned processes, so no state leaks between runs) and
the results are read back from the run directories. A run is the same deterministic
computation in a worker as in-process. Each worker pins its Numba thread count to
cores // workers (:func:`pin_threads`)."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from . import runs

MAX_WORKERS = 3


def estimated_cost(cfg):
    """Relative cost of a run: multiply-adds of the training steps (K layers, each
    O(T D^2) per task in the covariance form) plus GD++ meta-training and the eval set's
    forward-backward passes. Only the order of jobs depends on it."""
    t, m = cfg.data, cfg.model
    D, T = t.d + t.d_y, t.N + 1
    per_task = m.n_layers * m.heads * T * D * D
    train = cfg.steps * t.batch * per_task
    gdpp = cfg.baselines.gdpp_steps * cfg.baselines.gdpp_batch * m.n_layers * T * D * D
    evals = (cfg.steps // cfg.eval.eval_every + 1) * cfg.eval.eval_tasks * per_task * 2
    return train + gdpp + evals


def pin_threads(n):
    """Set this process's Numba thread count to ``n`` (at most what Numba started with;
    None: leave it). Worker processes call it first, so that W workers on C cores run
    C // W threads each and do not oversubscribe the cores (results do not depend on the
    thread count: tests/test_numba_backend.py, test_numba_mixed.py, test_numba_seq.py)."""
    if n is None:
        return
    import numba
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def threads_per_worker(workers):
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def workers_for(n_jobs, max_workers=MAX_WORKERS):
    return max(1, min(n_jobs, os.cpu_count() or 1, max_workers))


def train_all(jobs, max_workers=MAX_WORKERS):
    """Train every (cfg, run_dir) job; returns {cfg: RunResult or the exception it raised}.
    With fewer than two workers available nothing is started and {} is returned (the
    caller trains in-process)."""
    configs = [cfg for cfg, _ in jobs]
    if len(set(configs)) != len(configs):
        raise ValueError("train_all: two jobs have the same config; results are keyed by config, so train each once")
    jobs = sorted(jobs, key=lambda j: -estimated_cost(j[0]))
    workers = workers_for(len(jobs), max_workers)
    out = {}
    if workers < 2:
        return out
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=pin_threads,
                             initargs=(threads_per_worker(workers),)) as pool:
        futures = {cfg: pool.submit(runs.train_to_dir, cfg.to_dict(), run_dir) for cfg, run_dir in jobs}
        for cfg, f in futures.items():
            try:
                out[cfg] = runs.load_result(f.result())
            except Exception as exc:  # noqa: BLE001 - reported to the caller, which decides
                out[cfg] = exc
    return out
