"""One-step agreement of the CuPy backend's stepper with the NumPy backend, in float32.

    python -m benchmarks.gpu_step_check                      on the GPU (cupy_backend.make_stepper)
    python -m benchmarks.gpu_step_check --engine host-twin   on the CPU: the same step code driven
                                                             by NumPy and the kernels' NumPy twins
    python -m benchmarks.gpu_step_check --configs a,c --steps 5 --json FILE

For each configuration of :mod:`benchmarks.gpu` (a, b, c by default; at full batch
unless --batch), both steppers' ``step_on`` are run on IDENTICAL tasks (drawn on the
host by the reference sampler, float32) from IDENTICAL params and Adam state, for
--steps consecutive steps. Each step restarts both from the NumPy backend's result of
the step before (teacher forcing), so every step is compared on its own and rounding
differences do not compound. Compared, with the tolerance table's float32 "algebra"
entry: the loss, the gradient norm and both Adam moments (the first moment is
(1 - b1) times the clipped gradient after step 1). The updated params are judged with
the float32 "construction" entry (rtol 1e-4, atol 1e-5): the update
lr * m_hat / (sqrt(v_hat) + eps) is ~ lr * sign(g) and amplifies the relative rounding
of gradient entries whose size is near eps (seen on the CPU twin at B=32: 1.3e-6
absolute on a parameter of 1.2e-3, while the gradient itself agreed to 1e-5).

Exit status: 0 all agree, 1 a mismatch (printed, and in --json), 2 the engine cannot
run here (no CuPy / no CUDA device for ``--engine cupy``), with the reason.
"""

import argparse
import json
import sys

import numpy as np


def _engine(name, arch, hp, spec):
    from reference.backends._cupy_kernels import HostKernels
    from reference.backends._cupy_step import FusedStepper, HostDraw

    if name == "cupy":
        from reference.backends import get_backend

        cb = get_backend("cupy")
        cupy = cb.require_cupy()
        return cb.make_stepper(arch, hp, spec, seed=0, dtype=np.float32), cupy
    return FusedStepper(arch, hp, spec, 0, np.float32, np, HostKernels(), HostDraw()), np


def _host(tree):
    from reference.tree import to_host

    return to_host(tree)


def check_config(name, cfg, engine, steps, seed=0):
    """Rows (one per step) comparing ``engine``'s step_on with the NumPy backend's."""
    from benchmarks.gpu import init_params, settings
    from reference.backends import numpy_backend
    from reference.optim import AdamState, adam_init
    from reference.tolerances import allclose_report
    from reference.tree import tree_leaves, tree_map

    arch, hp, spec = settings(cfg)
    ref_stepper = numpy_backend.make_stepper(arch, hp, spec, seed, np.float32)
    got_stepper, xp = _engine(engine, arch, hp, spec)
    params = init_params(cfg, seed=seed, dtype=np.float32)
    state = adam_init(params)
    rng = np.random.default_rng([seed, 7])
    rows = []
    for k in range(steps):
        tasks = spec.sample(rng, dtype=np.float32)
        ref = ref_stepper.step_on(params, state, tasks)
        dev_params = tree_map(xp.asarray, params)
        dev_state = AdamState(tree_map(xp.asarray, state.m), tree_map(xp.asarray, state.v), state.t)
        got = got_stepper.step_on(dev_params, dev_state, tasks)
        g_params, g_m, g_v = _host(got.params), _host(got.state.m), _host(got.state.v)
        parts = [("loss", "algebra", np.asarray([float(got.loss)], np.float32), np.asarray([float(ref.loss)], np.float32)),
                 ("grad_norm", "algebra", np.asarray([float(got.grad_norm)], np.float32),
                  np.asarray([float(ref.grad_norm)], np.float32))]
        for what, a, b in (("params", g_params, ref.params), ("adam_m", g_m, ref.state.m), ("adam_v", g_v, ref.state.v)):
            kind = "construction" if what == "params" else "algebra"
            parts += [(f"{what}[{i}]", kind, np.asarray(x, np.float32), np.asarray(y, np.float32))
                      for i, (x, y) in enumerate(zip(tree_leaves(a), tree_leaves(b)))]
        reps = [(what, allclose_report(a, b, kind)) for what, kind, a, b in parts]
        bad = [(w, r) for w, r in reps if not r.ok]
        worst_what, worst = max(reps, key=lambda wr: wr[1].rel_err)
        rows.append({"config": name, **cfg, "engine": engine, "step": k + 1, "ok": not bad,
                     "loss_ref": float(ref.loss), "loss_got": float(got.loss),
                     "worst_part": worst_what, "worst_rel_err": worst.rel_err,
                     "mismatches": [f"{w}: {r}" for w, r in bad]})
        params, state = ref.params, ref.state
    return rows


def main(argv=None):
    from benchmarks.gpu import CONFIGS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("cupy", "host-twin"), default="cupy",
                    help="cupy: the CuPy backend on the GPU; host-twin: its step code on NumPy (CPU)")
    ap.add_argument("--configs", default="a,b,c", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=3, help="consecutive steps compared (teacher-forced)")
    ap.add_argument("--batch", type=int, help="override every configuration's batch size B")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            ap.error(f"argument --configs: unknown {n!r}; known: {', '.join(CONFIGS)}")
    if not names:
        ap.error("argument --configs: no name given")
    if args.steps < 1 or (args.batch is not None and args.batch < 1):
        ap.error("--steps and --batch must be >= 1")
    if args.engine == "cupy":
        from reference.backends import get_backend

        try:
            get_backend("cupy").require_cupy()
        except RuntimeError as exc:
            print(f"benchmarks.gpu_step_check: cannot run: {exc}", file=sys.stderr)
            return 2
    rows = []
    for n in names:
        cfg = dict(CONFIGS[n])
        if args.batch is not None:
            cfg["B"] = args.batch
        for r in check_config(n, cfg, args.engine, args.steps):
            rows.append(r)
            print(f"{n:6s} B={r['B']:<6d} step {r['step']}  {'PASS' if r['ok'] else 'FAIL'}  loss {r['loss_got']:.6g} "
                  f"(numpy {r['loss_ref']:.6g})  worst {r['worst_part']} rel err {r['worst_rel_err']:.2e}", flush=True)
            for m in r["mismatches"]:
                print(f"    MISMATCH {m}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": args.engine, "tolerance": "float32 algebra (params: float32 construction)", "rows": rows}, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"# {len(rows) - len(failed)}/{len(rows)} steps agree with the NumPy backend (float32 tolerances)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
