"""CPU benchmark: milliseconds per LSA training step, our backends against the peers.

    python -m benchmarks --json benchmarks/results/cpu.json          everything
    python -m benchmarks --configs a --impls numba,torch-eager-cov --repeats 20

One training step = draw B fresh tasks, forward, loss, backward, global-norm clip and
Adam, for K separate one-head LSA layers with factored (D, D) weights, in float32. The
paper's settings for K: gradient clip 0.001 if K <= 2 else 10, lr 1e-3 if K <= 3 else
5e-4, token clip [-10, 10] if K > 3. Configurations:

    a   d=10  N=10  B=2048  K=1
    b   d=10  N=10  B=2048  K=6
    c   d=40  N=80  B=1024  K=4

Implementations: ``numba`` (reference.backends.numba_backend, tasks drawn inside the
fused kernel), ``numpy`` (the reference), and the peers of ``benchmarks/peers`` that are
installed (PyTorch eager and torch.compile, JAX jit; attention and covariance forms).

Each (configuration, implementation) is verified in one process and, if it passes,
timed in a fresh one (so no two threading runtimes share a process and the peak RSS is
the implementation's own):

1. verifies: ``numba``: its loss and gradients on the reference's tasks and parameters
   against the reference (float64), at the initial scale and at a scale where the layers
   change the tokens, and one ``step_on`` against the NumPy backend's step in float64,
   within the tolerance table's float32 "algebra" entry; ``numpy``: float32
   against float64; a peer: its loss and gradients on the same tasks and parameters
   against the reference in float64, at the initial scale and at a scale where the
   layers change the tokens (same tolerance). An implementation that fails is not
   timed and the exit status is 1.
2. times: ``warmup`` steps (JIT compilation included) are run and dropped, then
   ``repeats`` timed steps (perf_counter around one blocking step); median, p10, p90.
   Then each part (sample, forward = loss only, backward = loss and gradients, adam =
   clip + Adam) alone, median over ``repeats`` calls. Parts are separate calls, so they
   need not add up to the fused step.
3. records the timing process's peak RSS (VmHWM), its RSS after imports, thread counts
   and the load average before and after (a busy machine makes timings meaningless; the table
   shows it).

A roofline line per configuration: FLOPs, bytes and random numbers of one Numba step
(``benchmarks/costs.py``, counted analytically for the algorithm it runs), the machine's
float32 matmul rate (a 2048^2 np.matmul, all threads), copy bandwidth (a 256 MiB copy)
and random-number rates (the backend's generator on all threads: SplitMix64 words and
polar-method normals; NumPy's PCG64 recorded too), the bound max(FLOPs / matmul rate,
bytes / bandwidth, words / word rate + normals / normal rate), and the fraction of it the
Numba step reaches. The per-task products are D x D (D = d + 1), far from the 2048^2 size
that sets the matmul rate, so the line also gives the rate NumPy/OpenBLAS reaches on
batches of D x D float32 products (one batch per thread, all threads) and the time the
step's FLOPs would take at that rate: what a kernel made of the best small BLAS calls
could expect.

Output: ``--json FILE`` (one object: machine, versions, rates, rows, roofline, ratios)
and the same stem with ``.md`` (a readable table); the table is also printed.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from .mixed import MIXED_CONFIGS

CONFIGS = {
    "a": dict(d=10, N=10, B=2048, K=1),
    "b": dict(d=10, N=10, B=2048, K=6),
    "c": dict(d=40, N=80, B=1024, K=4),
}
OURS = ("numba", "numpy")


def hyper(cfg):
    """The paper's settings for K (benchmarks/peers/_common.py derives the same)."""
    K = cfg["K"]
    return dict(grad_clip=0.001 if K <= 2 else 10.0, lr=1e-3 if K <= 3 else 5e-4,
                token_clip=10.0 if K > 3 else None)


# ------------------------------------------------------------------ measurement helpers --

def _status_mib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mib():
    return _status_mib("VmRSS")


def peak_rss_mib():
    """Peak RSS of this process: VmHWM (reset at exec), else getrusage's ru_maxrss (which
    Linux carries over from the parent across exec, so it can over-report)."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def stats_ms(ts):
    a = 1e3 * np.asarray(ts)
    return dict(ms_median=float(np.median(a)), ms_p10=float(np.percentile(a, 10)),
                ms_p90=float(np.percentile(a, 90)), n=int(a.size))


def _rel(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


# ------------------------------------------------------------------------- the problem --

def token_layout(cfg):
    """The configuration's token layout (d_y = 1)."""
    from reference import TokenLayout

    return TokenLayout(cfg["d"], 1)


def problem(cfg, seed=0):
    """Arch, AdamHP, TaskSpec, float32 initial params (the official init) and float32
    verification tasks drawn by the reference."""
    from reference import lsa_stack, init_lsa_params
    from reference.optim import AdamHP
    from reference.tasks import TaskSpec, step_rng

    h = hyper(cfg)
    K, d = cfg["K"], cfg["d"]
    arch = lsa_stack(n_layers=K, clip=h["token_clip"])
    hp = AdamHP(lr=h["lr"], clip_norm=h["grad_clip"])
    spec = TaskSpec(d=d, N=cfg["N"], B=cfg["B"])
    rng = np.random.default_rng(seed)
    params = tuple(init_lsa_params(rng, d + 1, n_layers_for_scale=K, dtype=np.float32) for _ in range(K))
    tasks = spec.sample(step_rng(seed + 1000, 0), dtype=np.float32)
    return arch, hp, spec, params, tasks


def big_params(cfg, seed=1):
    """Random params whose layers change the tokens by about 10% per layer (|M| ~ 0.1,
    M = P W_V C W_K^T W_Q with |C| ~ N d / 12), so verification tests the layers, not
    the identity; the K > 3 token clip stays mostly inactive."""
    from reference.layers.lsa import LSAParams

    d, N, K = cfg["d"], cfg["N"], cfg["K"]
    D = d + 1
    std = (0.1 * 12.0 / (N * d * D * D)) ** 0.25
    rng = np.random.default_rng(seed)
    return tuple(LSAParams(*(np.clip(rng.standard_normal((1, D, D)), -2, 2).astype(np.float32) * np.float32(std)
                             for _ in range(4))) for _ in range(K))


def reference_loss_grads64(tasks, params, arch, layout):
    """The reference's loss and gradient leaves (``reference.tree`` order) in float64."""
    from reference import loss_and_grads
    from reference.tree import tree_leaves, tree_map

    c = lambda a: np.asarray(a, np.float64)  # noqa: E731
    E = layout.build(c(tasks.X), c(tasks.Y), c(tasks.x_q))
    L, g, _ = loss_and_grads(E, c(tasks.y_q), tree_map(c, params), arch, layout)
    return float(L), tree_leaves(g)


def _verdict(checks):
    from reference.tolerances import tolerance

    tol = tolerance(np.float32, "algebra")
    ok = all(c["rel_err"] <= tol.rtol + tol.atol for c in checks if not c.get("info"))
    return dict(ok=ok, rtol=tol.rtol, checks=checks)


# ---------------------------------------------------------------------- our backends --

class Ours:
    """One of our backends behind the benchmark's interface."""

    def __init__(self, name, cfg, seed=0):
        from reference.backends import get_backend
        from reference.optim import adam_init

        self.name, self.cfg = name, cfg
        self.backend = get_backend(name)
        self.arch, self.hp, self.spec, self.params0, self.vtasks = problem(cfg, seed)
        self.stepper = self.backend.make_stepper(self.arch, self.hp, self.spec, seed, np.float32)
        self.params, self.state = self.params0, adam_init(self.params0)
        self.t = 0
        self.last_loss = float("nan")

    def step(self):
        r = self.stepper.step(self.params, self.state, self.t)
        self.params, self.state, self.last_loss = r.params, r.state, r.loss
        self.t += 1

    def verify(self):
        from reference.backends import numpy_backend
        from reference.optim import adam_init

        checks = []
        if self.name == "numpy":
            checks += self._loss_grad_checks(self.params0, "init")
            return _verdict(checks)
        for label, params in (("init", self.params0), ("big", big_params(self.cfg))):
            checks += self._loss_grad_checks(params, label)
        # one step_on on the same tasks and params against the NumPy backend's step in
        # float64 (not in float32: at Adam's first step an entry's update is about
        # lr * sign(g), so float32 rounding of tiny gradient entries shows in any float32
        # implementation; the NumPy backend's own float32 error is recorded for comparison)
        from reference.tasks import Tasks
        from reference.tree import to_vector, tree_map

        flat = lambda r: to_vector(r.params, np.float64)  # noqa: E731
        p64 = tree_map(lambda a: np.asarray(a, np.float64), self.params0)
        t64 = Tasks(*(np.asarray(a, np.float64) for a in self.vtasks))
        r64 = numpy_backend.make_stepper(self.arch, self.hp, self.spec, 0, np.float64).step_on(p64, adam_init(p64), t64)
        r32 = numpy_backend.make_stepper(self.arch, self.hp, self.spec, 0, np.float32).step_on(
            self.params0, adam_init(self.params0), self.vtasks)
        st = adam_init(self.params0)
        r1 = self.stepper.step_on(self.params0, st, self.vtasks)
        checks.append(dict(what="step_on params vs numpy backend float64 step", rel_err=_rel(flat(r1), flat(r64))))
        checks.append(dict(what="step_on loss vs numpy backend float64 step", rel_err=_rel([r1.loss], [r64.loss])))
        checks.append(dict(what="(info, not checked) numpy backend float32 step vs its float64 step",
                           rel_err=_rel(flat(r32), flat(r64)), info=True))
        r0 = r64
        # the fused step (tasks drawn in the kernel) gives a finite loss near the reference's
        r2 = self.stepper.step(self.params0, st, 0)
        ok = np.isfinite(r2.loss) and abs(r2.loss - r0.loss) < 0.5 * r0.loss
        checks.append(dict(what="fused step loss finite and near the reference's", rel_err=0.0 if ok else float("inf")))
        return _verdict(checks)

    def _loss_grad_checks(self, params, label):
        from reference.tree import tree_leaves

        lay = token_layout(self.cfg)
        L0, g0 = reference_loss_grads64(self.vtasks, params, self.arch, lay)
        E = lay.build(self.vtasks.X, self.vtasks.Y, self.vtasks.x_q)
        if self.name == "numba":
            # the path the stepper runs (no dE needed): D x D space where it applies
            L1, g1, aux = self.backend.loss_and_grads(E, self.vtasks.y_q, params, self.arch, lay, need_dE=False)
            label += f", {aux['path']} path, {aux['fallback_tasks']} tasks via the token fallback"
        else:
            L1, g1, _ = self.backend.loss_and_grads(E, self.vtasks.y_q, params, self.arch, lay)
        g1 = tree_leaves(g1)
        return [dict(what=f"loss vs reference f64 ({label})", rel_err=_rel([float(L1)], [L0])),
                dict(what=f"grads vs reference f64 ({label})",
                     rel_err=_rel(np.concatenate([a.ravel() for a in g1]), np.concatenate([a.ravel() for a in g0])))]

    def parts(self):
        from reference import loss_and_grads, model_forward
        from reference.model import loss_forward
        from reference.optim import adam_update
        from reference.tasks import step_rng

        tasks = self.vtasks
        lay = token_layout(self.cfg)
        E = lay.build(tasks.X, tasks.Y, tasks.x_q)
        params, state, hp = self.params, self.state, self.hp
        if self.name == "numpy":
            _, grads, _ = loss_and_grads(E, tasks.y_q, params, self.arch, lay)
            return {
                "sample": lambda: self.spec.sample(step_rng(0, 1), dtype=np.float32),
                "forward": lambda: loss_forward(lay.readout(model_forward(E, params, self.arch)[0]), tasks.y_q),
                "backward": lambda: loss_and_grads(E, tasks.y_q, params, self.arch, lay),
                "adam": lambda: adam_update(params, grads, state, hp),
            }
        nb = self.backend
        run = nb.BatchRun(self.arch, params, self.spec.B, self.spec.N, lay.d, lay.d_y, np.float32)
        res = run(E=E, y_q=tasks.y_q)
        grads = nb.factored_grads(params, res["dA"], res["dB"], np.float32)

        def backward():
            r = run(E=E, y_q=tasks.y_q)
            nb.factored_grads(params, r["dA"], r["dB"], np.float32)

        return {
            "sample": lambda: self.stepper.sample(1),
            "forward": lambda: run(E=E, y_q=tasks.y_q, need_grad=False),
            "backward": backward,
            "adam": lambda: nb.adam_update(params, grads, state, hp, np.dtype(np.float32)),
        }

    def threads(self):
        out = {}
        if self.name == "numba":
            import numba

            from reference.backends import config

            out = dict(numba_threads=numba.get_num_threads(), numba_config=config.describe())
            try:
                out["threading_layer"] = numba.threading_layer()
            except ValueError:
                pass
        return out


# ------------------------------------------------------------------------------ peers --

class Peer:
    def __init__(self, name, cfg, seed=0):
        from benchmarks.peers import make_peer

        self.name, self.cfg = name, cfg
        self.peer = make_peer(name, dict(cfg), seed=seed)
        self.last_loss = float("nan")

    def step(self):
        self.peer.step()
        self.last_loss = self.peer.loss()

    def verify(self):
        from reference.tree import tree_leaves

        arch, _, _, params0, tasks = problem(self.cfg)
        checks = []
        saved = self.peer.get_params()
        for label, params in (("init", params0), ("big", big_params(self.cfg))):
            flat = [a[0] if a.ndim == 3 else a for a in tree_leaves(params)]   # 4K arrays (D, D)
            self.peer.set_params(flat)
            L0, g0 = reference_loss_grads64(tasks, params, arch, token_layout(self.cfg))
            L1 = self.peer.forward_loss(tasks.X, tasks.Y, tasks.x_q, tasks.y_q)
            g1 = self.peer.grads(tasks.X, tasks.Y, tasks.x_q, tasks.y_q)
            checks.append(dict(what=f"loss vs reference f64 ({label})", rel_err=_rel([L1], [L0])))
            checks.append(dict(what=f"grads vs reference f64 ({label})",
                               rel_err=_rel(np.concatenate([np.ravel(a) for a in g1]),
                                            np.concatenate([np.ravel(a) for a in g0]))))
        self.peer.set_params(saved)
        return _verdict(checks)

    def parts(self):
        return self.peer.parts()

    def threads(self):
        out = {}
        if self.name.startswith("torch"):
            import torch

            out = dict(torch_threads=torch.get_num_threads(), torch=torch.__version__)
            if "compile" in self.name:
                out["compile_mode"] = getattr(self.peer, "compile_mode", None)
        elif self.name.startswith("jax"):
            import jax

            out = dict(jax=jax.__version__, jax_devices=[str(x) for x in jax.devices()])
        return out


def make_impl(name, cfg):
    if "model" in cfg:                                   # a mixed-stack configuration (benchmarks/mixed.py)
        from .mixed import make_mixed_impl

        return make_mixed_impl(name, cfg)
    return Ours(name, cfg) if name in OURS else Peer(name, cfg)


def config_of(name):
    """The configuration dict of ``name``: an LSA one (CONFIGS) or a mixed-stack one."""
    return CONFIGS[name] if name in CONFIGS else MIXED_CONFIGS[name]


# ----------------------------------------------------------------------------- worker --

def verify_worker(impl_name, config):
    """Verify one implementation on one configuration (in its own process)."""
    cfg = config_of(config)
    t0 = time.perf_counter()
    impl = make_impl(impl_name, cfg)
    return dict(config=config, impl=impl_name, verify=impl.verify(), verify_s=time.perf_counter() - t0)


def time_worker(impl_name, config, repeats, warmup):
    """Time one (already verified) implementation on one configuration, in a fresh process
    so the peak RSS is the implementation's own (imports, build, steps and parts)."""
    cfg = config_of(config)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rss_imports = rss_mib()
    row = dict(config=config, impl=impl_name, cfg=cfg)
    impl = make_impl(impl_name, cfg)
    row["rss_after_build_mib"] = rss_mib()
    t_first = time.perf_counter()
    impl.step()                                    # first step: JIT / compile, excluded
    row["first_step_s"] = time.perf_counter() - t_first
    row.update(stats_ms(timed(impl.step, warmup, repeats)))
    row["final_loss"] = float(impl.last_loss)
    parts = {}
    for pname, fn in impl.parts().items():
        parts[pname] = float(np.median(1e3 * np.asarray(timed(fn, 2, repeats))))
    row["parts"] = parts
    row["threads"] = impl.threads()
    row["rss_imports_mib"] = rss_imports
    row["peak_rss_mib"] = peak_rss_mib()
    row["loadavg_before"] = list(load0)
    row["loadavg_after"] = list(os.getloadavg())
    row["wall_s"] = time.perf_counter() - t0
    return row


def matmul_rates(n=2048, repeats=7):
    """float32 rate of one ``n`` x ``n`` np.matmul in GFLOP/s (OpenBLAS with its default
    threads): (best, median) of ``repeats`` timings after 2 warm-up calls."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.copy()
    c = np.empty_like(a)
    ts = timed(lambda: np.matmul(a, b, out=c), 2, repeats)
    return 2 * n ** 3 / min(ts) / 1e9, 2 * n ** 3 / float(np.median(ts)) / 1e9


def rates_worker():
    """The machine's float32 matmul rate, copy bandwidth and random-number rates."""
    import numba
    from numba import njit, prange

    from reference.backends.numba_backend import rng_kernels

    normal_pairs, stream_key, task_key, uniforms_lanes = rng_kernels()

    out = {}
    out["matmul_gflops"], out["matmul_gflops_median"] = matmul_rates()
    x = np.ones(64 * 2 ** 20, np.float32)
    y = np.empty_like(x)
    ts = timed(lambda: np.copyto(y, x), 2, 7)
    out["copy_gbs"] = 2 * x.nbytes / min(ts) / 1e9
    rng = np.random.default_rng(0)
    buf = np.empty(2 ** 20, np.float32)
    ts = timed(lambda: rng.random(out=buf, dtype=np.float32), 1, 9)
    out["numpy_pcg64_float32_per_s"] = buf.size / min(ts)
    ts = timed(lambda: rng.standard_normal(out=buf, dtype=np.float32), 1, 9)
    out["numpy_normal_float32_per_s"] = buf.size / min(ts)

    @njit(parallel=True)
    def words_all_threads(n_chunks, L, n_words, reps, U):
        # each chunk refills its own cache-resident (2 n_words, L) buffer reps times
        for ch in prange(n_chunks):
            keys = np.empty(L, np.uint64)
            for l in range(L):
                keys[l] = stream_key(task_key(np.uint64(12345), ch * L + l), 0)
            for r in range(reps):
                keys[0] += np.uint64(1)
                uniforms_lanes(keys, L, 2 * n_words, U[ch], True)

    @njit(parallel=True)
    def normals_all_threads(n_chunks, n, reps, out):
        for ch in prange(n_chunks):
            for r in range(reps):
                normal_pairs(stream_key(task_key(np.uint64(777), ch * reps + r), 1), n, out[ch])

    chunks, L, nw, reps = 8 * numba.get_num_threads(), 64, 64, 64
    U = np.empty((chunks, 2 * nw, L))
    words_all_threads(1, L, 8, 1, U)
    ts = timed(lambda: words_all_threads(chunks, L, nw, reps, U), 1, 7)
    out["rng_words_per_s"] = chunks * L * nw * reps / min(ts)
    nn = 1024
    Z = np.empty((chunks, nn))
    normals_all_threads(1, 8, 1, Z)
    ts = timed(lambda: normals_all_threads(chunks, nn, reps, Z), 1, 7)
    out["rng_normals_per_s"] = chunks * nn * reps / min(ts)
    out["rng_generator"] = ("the numba backend's: SplitMix64 words (two float32 uniforms each) and polar-method "
                            "normals, all threads, cache-resident buffers")
    out["small_matmul_gflops"] = {str(D): small_matmul_gflops(D, numba.get_num_threads())
                                  for D in sorted({c["d"] + 1 for c in CONFIGS.values()})}
    out["threads"] = dict(numba=numba.get_num_threads(), openblas=os.environ.get("OPENBLAS_NUM_THREADS", "default"))
    return out


def small_matmul_gflops(D, threads, per_thread=512):
    """float32 rate (GFLOP/s) of np.matmul on batches of D x D products, one batch of
    ``per_thread`` products per thread, the threads running at once (np.matmul releases
    the GIL; OpenBLAS does not split products this small)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    A = rng.random((threads, per_thread, D, D), dtype=np.float32)
    Bm = rng.random((threads, per_thread, D, D), dtype=np.float32)
    C = np.empty_like(A)
    reps = max(1, int(2e8 // (2 * per_thread * D ** 3)))
    with ThreadPoolExecutor(threads) as ex:
        def one(t):
            for _ in range(reps):
                np.matmul(A[t], Bm[t], out=C[t])

        def run():
            list(ex.map(one, range(threads)))

        ts = timed(run, 1, 7)
    return threads * reps * 2 * per_thread * D ** 3 / min(ts) / 1e9


def thread_env(threads):
    """Environment for worker processes limited to ``threads`` threads (None: unchanged):
    Numba, OpenMP (PyTorch), OpenBLAS/MKL (NumPy) and XLA (JAX)."""
    env = dict(os.environ)
    if threads:
        n = str(threads)
        env.update(NUMBA_NUM_THREADS=n, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            f" intra_op_parallelism_threads={n}").strip()
    return env


def run_worker_process(args_list, timeout, threads=None):
    """Run ``python -m benchmarks.bench --worker ...`` and return its JSON (or an error row)."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--worker"] + args_list
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=thread_env(threads),
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout)[-1500:]
        return dict(error=f"worker exited {out.returncode}: {tail}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------ the machine --

def machine_info():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512dq", "avx512bw") if x in have)
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2 ** 20
    except OSError:
        pass
    return dict(cpu=cpu, simd=flags, logical_cores=os.cpu_count(), usable_cores=usable, mem_gib=mem,
                platform=platform.platform(), python=platform.python_version(),
                env={k: v for k, v in os.environ.items() if k.startswith(("ICGD_", "NUMBA_", "OMP_", "OPENBLAS_",
                                                                          "MKL_", "XLA_"))})


def versions():
    out = {}
    for mod in ("numpy", "numba", "llvmlite", "scipy", "torch", "jax", "jaxlib"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - not installed, or broken
            out[mod] = None
    return out


# ------------------------------------------------------------------------------ report --

def best_peer(rows, config):
    peers = [r for r in rows if r["config"] == config and r["impl"] not in OURS and "ms_median" in r]
    return min(peers, key=lambda r: r["ms_median"]) if peers else None


def summarise(result):
    """Ratios per configuration: numba against numpy and against the best peer."""
    rows = result["rows"]
    out = {}
    for config in result["configs"]:
        ours = {r["impl"]: r for r in rows if r["config"] == config and r["impl"] in OURS and "ms_median" in r}
        bp = best_peer(rows, config)
        nbr = ours.get("numba")
        s = {}
        if nbr and "numpy" in ours:
            s["numba_speedup_over_numpy"] = ours["numpy"]["ms_median"] / nbr["ms_median"]
        if nbr and bp:
            s["best_peer"] = bp["impl"]
            s["best_peer_ms"] = bp["ms_median"]
            s["numba_speedup_over_best_peer"] = bp["ms_median"] / nbr["ms_median"]
        rf = result.get("roofline", {}).get(config, {})
        if nbr and rf:
            s["numba_fraction_of_bound"] = rf["bound_ms"] / nbr["ms_median"]
        if nbr and "compute_small_ms" in rf:
            s["numba_fraction_of_small_product_time"] = rf["compute_small_ms"] / nbr["ms_median"]
        out[config] = s
    return out


def _D(config):
    return CONFIGS[config]["d"] + 1


def markdown(result):
    lines = []
    m, v = result["machine"], result["versions"]
    lines.append(f"# CPU benchmark: ms per training step ({result['label']})")
    lines.append("")
    lines.append(f"Machine: {m['cpu']} ({m['simd']}), {m['usable_cores']} usable cores, "
                 f"{m['mem_gib']:.0f} GiB; Python {m['python']}; "
                 + ", ".join(f"{k} {x}" for k, x in v.items() if x) + ".")
    r = result.get("rates", {})
    if "matmul_gflops" in r:
        lines.append(f"Rates: float32 matmul {r['matmul_gflops']:.0f} GFLOP/s (2048^2, all threads), copy "
                     f"{r['copy_gbs']:.1f} GB/s, the backend's generator {r['rng_words_per_s'] / 1e9:.2f} G words/s "
                     f"and {r['rng_normals_per_s'] / 1e6:.0f} M normals/s (all threads); NumPy PCG64 "
                     f"{r['numpy_pcg64_float32_per_s'] / 1e9:.2f} G uniforms/s and "
                     f"{r['numpy_normal_float32_per_s'] / 1e6:.0f} M normals/s (one thread).")
    lines.append(f"Command: `{result['command']}`; threads: {result.get('threads', 'all cores')}; "
                 f"{result['repeats']} timed steps after {result['warmup']} "
                 "warm-up steps (JIT/compile excluded); each row in its own process.")
    lines.append("")
    lines.append("| config | impl | ms/step median | p10 | p90 | sample | forward | backward | adam | "
                 "peak RSS MiB | load before/after | verified (worst rel err) |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for row in result["rows"]:
        ver = row.get("verify", {})
        worst = max((c["rel_err"] for c in ver.get("checks", []) if not c.get("info")), default=float("nan"))
        vtxt = ("yes" if ver.get("ok") else "NO") + f" ({worst:.1e})" if ver else "-"
        if "ms_median" not in row:
            lines.append(f"| {row['config']} | {row['impl']} | {row.get('error', 'not run')[:80]} "
                         f"| | | | | | | | | {vtxt} |")
            continue
        p = row.get("parts", {})
        la = row.get("loadavg_before", [float("nan")])[0], row.get("loadavg_after", [float("nan")])[0]
        lines.append(f"| {row['config']} | {row['impl']} | {row['ms_median']:.3f} | {row['ms_p10']:.3f} | "
                     f"{row['ms_p90']:.3f} | " + " | ".join(f"{p.get(k, float('nan')):.3f}"
                                                           for k in ("sample", "forward", "backward", "adam"))
                     + f" | {row['peak_rss_mib']:.0f} | {la[0]:.1f}/{la[1]:.1f} | {vtxt} |")
    lines.append("")
    lines.append("| config | numba ms | best peer | best peer ms | numba speed-up over best peer | "
                 "over numpy | bound ms (by) | fraction of bound |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for config in result["configs"]:
        s = result["summary"].get(config, {})
        nbr = next((r for r in result["rows"] if r["config"] == config and r["impl"] == "numba"
                    and "ms_median" in r), None)
        rf = result.get("roofline", {}).get(config, {})
        fmt = lambda x, f: (f.format(x) if x is not None else "-")  # noqa: E731
        lines.append(f"| {config} | {fmt(nbr and nbr['ms_median'], '{:.3f}')} | {s.get('best_peer', '-')} | "
                     f"{fmt(s.get('best_peer_ms'), '{:.2f}')} | {fmt(s.get('numba_speedup_over_best_peer'), '{:.1f}x')} "
                     f"| {fmt(s.get('numba_speedup_over_numpy'), '{:.1f}x')} | "
                     f"{fmt(rf.get('bound_ms'), '{:.3f}')} ({rf.get('bound_by', '-')}) | "
                     f"{fmt(s.get('numba_fraction_of_bound'), '{:.2f}')} |")
    lsa_roof = {c: rf for c, rf in result.get("roofline", {}).items() if c in CONFIGS}
    if "sine" in result.get("roofline", {}):
        rf = result["roofline"]["sine"]
        lines.append("")
        lines.append(f"Bound of the sine step (benchmarks/costs.py sine_step_cost): its dense products alone are "
                     f"{rf['flops'] / 1e9:.2f} GFLOP, {rf['compute_ms']:.1f} ms at the measured matmul rate "
                     f"({result['rates']['matmul_gflops']:.0f} GFLOP/s); at that rate no implementation of this step is faster, "
                     f"so a lead over a peer cannot exceed that peer's time / {rf['compute_ms']:.1f} ms.")
    if lsa_roof:                                        # LSA configurations
        lines.append("")
        lines.append("Roofline (numba algorithm, benchmarks/costs.py): " + "; ".join(
        f"{c}: {rf['path']} path, {rf['flops'] / 1e6:.1f} MFLOP, {rf['random_words'] / 1e6:.2f} M random words "
        f"+ {rf['normals'] / 1e3:.0f} k normals, "
        f"{rf['dram_bytes'] / 1e3:.0f} kB compulsory / {rf['scratch_bytes'] / 1e6:.1f} MB scratch "
        f"-> compute {rf['compute_ms']:.3f} ms, RNG {rf['rng_ms']:.3f} ms, DRAM {rf['dram_ms']:.4f} ms"
        + (f"; at the {rf['small_matmul_gflops']:.0f} GFLOP/s NumPy reaches on batched {_D(c)}x{_D(c)} "
           f"products the FLOPs take {rf['compute_small_ms']:.3f} ms"
           + (f" (numba at {result['summary'][c]['numba_fraction_of_small_product_time']:.2f} of that)"
              if "numba_fraction_of_small_product_time" in result["summary"].get(c, {}) else "")
           if "compute_small_ms" in rf else "")
        for c, rf in lsa_roof.items()) + ".")
    bad = [r for r in result["rows"] if "ms_median" not in r]
    if bad:
        lines.append("")
        lines.append("Not timed: " + "; ".join(f"{r['config']}/{r['impl']}: {r.get('error', '?')[:200]}" for r in bad))
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- main --

def parse(argv):
    """The options, every one checked before any work (exit code 2 naming the option).
    A worker's options are not: its parent checked them (and a worker imports nothing
    before what it measures)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the result object here (and a .md table beside it)")
    p.add_argument("--configs", default="a,b,c",
                   help="comma-separated subset of a,b,c (LSA stacks) and sine,softmax2 (mixed stacks)")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementations (default: numba, numpy and every installed peer)")
    p.add_argument("--repeats", type=int, default=30, help="timed steps (and calls per part)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    p.add_argument("--label", default="provisional", help="label written in the table's title")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per (config, impl) process")
    p.add_argument("--threads", type=int, default=None,
                   help="limit every implementation to this many threads (default: all cores)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rates", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--verify-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    from benchmarks.peers import PEER_NAMES
    from benchmarks.peers.mixed import MIXED_PEER_NAMES
    from reference.files import OutputPathError, check_writable, is_special

    for option, lo in (("--repeats", 1), ("--warmup", 0), ("--timeout", 1), ("--threads", 1)):
        v = getattr(a, option[2:])
        if v is not None and v < lo:
            p.error(f"argument {option}: must be >= {lo}, got {v}")
    a.configs = _names(p, "--configs", a.configs, list(CONFIGS) + list(MIXED_CONFIGS))
    a.impls = None if a.impls is None else _names(p, "--impls", a.impls,
                                                  list(OURS) + list(PEER_NAMES) + list(MIXED_PEER_NAMES))
    if a.json is not None:
        try:
            check_writable(a.json, "--json")
            if not is_special(a.json):
                check_writable(_markdown_path(a.json), "--json (the .md table beside it)")
        except OutputPathError as exc:
            p.error(str(exc))
    return a


def _names(p, option, text, known):
    """The comma-separated names of ``text``, each known and given once (else p.error)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        p.error(f"argument {option}: no name given; known: {', '.join(known)}")
    bad = [x for x in names if x not in known]
    if bad:
        p.error(f"argument {option}: unknown {bad}; known: {', '.join(known)}")
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        p.error(f"argument {option}: {', '.join(twice)} given twice")
    return names


def _markdown_path(json_path):
    return os.path.splitext(json_path)[0] + ".md"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.worker:
        if a.rates:
            row = rates_worker()
        elif a.verify_only:
            row = verify_worker(a.impl, a.config)
        else:
            row = time_worker(a.impl, a.config, a.repeats, a.warmup)
        print(json.dumps(row))
        return 0
    from benchmarks.costs import bound, sine_step_cost, step_cost
    from benchmarks.peers import UNAVAILABLE_REASONS, available_peers
    from benchmarks.peers.mixed import MIXED_PEER_NAMES, available_mixed_peers
    from reference.files import OutputPathError, is_special, write_output

    configs = a.configs
    mixed_ok, mixed_why = available_mixed_peers() if any(c in MIXED_CONFIGS for c in configs) else ([], {})
    lsa_impls = a.impls if a.impls is not None else list(OURS) + (
        available_peers() if any(c in CONFIGS for c in configs) else [])
    mixed_impls = a.impls if a.impls is not None else list(OURS) + mixed_ok
    impls_of = lambda c: [i for i in (mixed_impls if c in MIXED_CONFIGS else lsa_impls)  # noqa: E731
                          if i in OURS or (i in MIXED_PEER_NAMES) == (c in MIXED_CONFIGS)]
    result = dict(label=a.label, command="python -m benchmarks " + " ".join(argv),
                  configs=configs, repeats=a.repeats, warmup=a.warmup, threads=a.threads or "all cores",
                  machine=machine_info(), versions=versions(),
                  unavailable_peers=dict(UNAVAILABLE_REASONS, **mixed_why), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    print("measuring machine rates ...", flush=True)
    result["rates"] = run_worker_process(["--rates"], a.timeout, a.threads)
    rows = []
    for config in configs:
        for impl in impls_of(config):
            print(f"{config} {impl} ...", end=" ", flush=True)
            ver = run_worker_process(["--verify-only", "--impl", impl, "--config", config], a.timeout, a.threads)
            if ver.get("verify", {}).get("ok"):
                row = run_worker_process(["--impl", impl, "--config", config, "--repeats", str(a.repeats),
                                          "--warmup", str(a.warmup)], a.timeout, a.threads)
            else:
                row = dict(error=ver.get("error", "verification failed; not timed"))
            row.update(config=config, impl=impl, verify=ver.get("verify", {}), verify_s=ver.get("verify_s"))
            rows.append(row)
            print(f"{row['ms_median']:.3f} ms" if "ms_median" in row else row.get("error", "?")[:300], flush=True)
    result["rows"] = rows
    if "matmul_gflops" in result["rates"]:
        result["roofline"] = {}
        for config in (c for c in configs if c in CONFIGS):             # LSA stacks (benchmarks/costs.py)
            cfg = CONFIGS[config]
            cost = step_cost(cfg["d"], cfg["N"], cfg["B"], cfg["K"])
            result["roofline"][config] = dict(cost, **bound(cost, result["rates"]))
            small = result["rates"].get("small_matmul_gflops", {}).get(str(cfg["d"] + 1))
            if small:
                result["roofline"][config].update(small_matmul_gflops=small,
                                                  compute_small_ms=1e3 * cost["flops"] / (small * 1e9))
        if "sine" in configs:                                           # dense products only: compute bound
            cost = sine_step_cost(MIXED_CONFIGS["sine"]["N"], MIXED_CONFIGS["sine"]["B"])
            ms = 1e3 * cost["flops"] / (result["rates"]["matmul_gflops"] * 1e9)
            result["roofline"]["sine"] = dict(cost, compute_ms=ms, bound_ms=ms, bound_by="compute")
    result["summary"] = summarise(result)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    md = markdown(result)
    print(md)
    if a.json:
        try:
            write_output(a.json, json.dumps(result, indent=1), "--json")
            if not is_special(a.json):      # a table beside a JSON file, not beside a stream or device
                write_output(_markdown_path(a.json), md, "--json (the .md table beside it)")
        except OutputPathError as exc:
            print(f"benchmarks: {exc}", file=sys.stderr)
            return 2
    failed = [r for r in rows if not r.get("verify", {}).get("ok", False)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
