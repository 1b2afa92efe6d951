"""The paper's one-layer experiment end to end, Numba backend against NumPy.

    python -m benchmarks.whole_run                       5000 steps, both backends
    python -m benchmarks.whole_run --json benchmarks/results/whole_run.json
    python -m benchmarks.whole_run --via-training        through verify.runs.train_run

One run (von Oswald et al. 2023, the official code's one-layer setting): d = 10, N = 10,
one LSA layer, float32, batch 2048 fresh tasks per step, Adam (lr 1e-3, b2 0.98) with
global-norm clip 0.001, 5000 steps, and every 100 steps the loss on a fixed set of
10,000 evaluation tasks. Each backend runs in its own process and drives its stepper
directly: ``stepper.step(params, state, s)`` for s = 0 .. steps-1 (tasks drawn by the
backend: NumPy's PCG64 stream for 'numpy', the in-kernel SplitMix64 stream for
'numba'), and the evaluation loss through the backend's own forward pass. Reported:
wall time end to end (set-up, the first step with its JIT load or compile, training,
evaluations), the split, and the evaluation losses (first and last; the one-step-GD
loss on the same evaluation set for reference).

``--via-training`` instead times ``verify.runs.train_run`` (the project's training
run: ``reference.trainer``'s loop with baselines, the same steps and evaluations with
the alignment metrics, checkpoints in a temporary run directory, no final analyses) with
``backend=numba`` and ``backend=numpy``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _eval_loss_fn(backend, arch, E, y_q, layout):
    from reference import model_forward
    from reference.model import loss_forward

    if backend == "numba":
        from reference.backends import numba_backend as nb

        def f(params):
            run = nb.BatchRun(arch, params, E.shape[0], E.shape[1] - 1, layout.d, layout.d_y, np.float32)
            return run(E=E, y_q=y_q, need_grad=False)["loss"]
        return f

    def f(params):
        out, _ = model_forward(E, params, arch)
        return float(loss_forward(layout.readout(out), y_q)[0])
    return f


def direct(backend, steps, batch, eval_every, eval_tasks, seed=0):
    t_start = time.perf_counter()
    from reference import TokenLayout, lsa_stack, init_lsa_params
    from reference.backends import get_backend
    from reference.optim import AdamHP, adam_init
    from reference.solvers import gd_predict, line_search_eta
    from reference.tasks import TaskSpec, step_rng

    d, N = 10, 10
    arch = lsa_stack(1)
    hp = AdamHP(lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, clip_norm=0.001)
    spec = TaskSpec(d=d, N=N, B=batch)
    layout = TokenLayout(d, 1)
    evals = TaskSpec(d=d, N=N, B=eval_tasks).sample(step_rng(2023, 0), dtype=np.float32)
    E_eval = layout.build(evals.X, evals.Y, evals.x_q)
    params = (init_lsa_params(np.random.default_rng(seed), d + 1, dtype=np.float32),)
    state = adam_init(params)
    stepper = get_backend(backend).make_stepper(arch, hp, spec, seed, np.float32)
    eval_loss = _eval_loss_fn(backend, arch, E_eval, evals.y_q, layout)
    t_setup = time.perf_counter() - t_start

    t0 = time.perf_counter()
    r = stepper.step(params, state, 0)
    t_first = time.perf_counter() - t0
    params, state = r.params, r.state
    t_train = t_eval = 0.0
    history = []
    for s in range(1, steps):
        t0 = time.perf_counter()
        r = stepper.step(params, state, s)
        params, state = r.params, r.state
        t_train += time.perf_counter() - t0
        if (s + 1) % eval_every == 0 or s == steps - 1:
            t0 = time.perf_counter()
            history.append((s + 1, eval_loss(params)))
            t_eval += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    # one step of GD with the line-searched eta on the same evaluation tasks (the target)
    X, Y, xq, yq = (np.asarray(a, np.float64) for a in (evals.X, evals.Y, evals.x_q, evals.y_q))
    eta = line_search_eta(X, Y, xq, yq, n_steps=1)[0]
    gd = float(0.5 * np.mean(np.sum((gd_predict(X, Y, xq, eta, 1)[0] - yq) ** 2, axis=1)))
    return dict(backend=backend, mode="direct", steps=steps, batch=batch, eval_every=eval_every,
                eval_tasks=eval_tasks, total_s=total, setup_s=t_setup, first_step_s=t_first, train_s=t_train,
                eval_s=t_eval, ms_per_step=1e3 * t_train / max(steps - 1, 1), n_evals=len(history),
                first_eval=history[0] if history else None, final_eval=history[-1] if history else None,
                gd1_eval_loss=gd, loadavg=list(os.getloadavg()))


def via_training(backend, steps, batch, eval_every, eval_tasks):
    from reference.config import TrainConfig
    from verify.runs import train_run

    every = max(eval_every, 500 // eval_every * eval_every)
    cfg = TrainConfig().replace(steps=steps, batch=batch, eval_every=eval_every, checkpoint_every=every,
                                eval_tasks=eval_tasks, backend=backend)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        res = train_run(cfg, out, analyses=False)
    total = time.perf_counter() - t0
    final = res.summary.get("final") or {}
    return dict(backend=backend, mode="via-training", steps=steps, batch=batch, eval_every=eval_every,
                eval_tasks=eval_tasks, total_s=total, final_eval=final.get("loss"),
                gd1_eval_loss=res.baselines.get("gd_loss"), loadavg=list(os.getloadavg()))


def parse(argv):
    """The options, every one checked before any work (exit code 2 naming the option).
    A worker's options are not: its parent checked them (and a worker's set-up time
    includes importing the reference)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.whole_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tasks", type=int, default=10_000)
    p.add_argument("--backends", default="numba,numpy", help="comma-separated backends (reference.backends)")
    p.add_argument("--via-training", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    from reference.backends import backend_names
    from reference.files import OutputPathError, check_writable

    for option in ("--steps", "--batch", "--eval-every", "--eval-tasks"):
        v = getattr(a, option[2:].replace("-", "_"))
        if v < 1:
            p.error(f"argument {option}: must be >= 1, got {v}")
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not a.backends:
        p.error(f"argument --backends: no backend named; known: {', '.join(backend_names())}")
    unknown = [b for b in a.backends if b not in backend_names()]
    if unknown:
        p.error(f"argument --backends: unknown {unknown}; known: {', '.join(backend_names())}")
    twice = sorted({b for b in a.backends if a.backends.count(b) > 1})
    if twice:
        p.error(f"argument --backends: {', '.join(twice)} given twice")
    if a.json is not None:
        try:
            check_writable(a.json, "--json")
        except OutputPathError as exc:
            p.error(str(exc))
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.worker:
        fn = via_training if a.via_training else direct
        print(json.dumps(fn(a.worker, a.steps, a.batch, a.eval_every, a.eval_tasks)))
        return 0
    from reference.files import OutputPathError, write_output

    rows = []
    for backend in a.backends:
        cmd = [sys.executable, "-m", "benchmarks.whole_run", "--worker", backend, "--steps", str(a.steps),
               "--batch", str(a.batch), "--eval-every", str(a.eval_every), "--eval-tasks", str(a.eval_tasks)]
        if a.via_training:
            cmd.append("--via-training")
        print(f"{backend} ...", end=" ", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            print("FAILED", out.stderr[-2000:])
            return 1
        row = json.loads(lines[-1])
        rows.append(row)
        print(f"{row['total_s']:.1f} s", flush=True)
    by = {r["backend"]: r for r in rows}
    if "numba" in by and "numpy" in by:
        print(f"numba end to end {by['numpy']['total_s'] / by['numba']['total_s']:.1f}x faster than numpy")
    for r in rows:
        print(json.dumps(r))
    if a.json:
        text = json.dumps(dict(rows=rows, command="python -m benchmarks.whole_run " + " ".join(argv)), indent=1)
        try:
            write_output(a.json, text, "--json")
        except OutputPathError as exc:
            print(f"benchmarks.whole_run: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
