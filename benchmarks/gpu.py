"""GPU benchmark: milliseconds per LSA training step on one NVIDIA GPU.

    python -m benchmarks.gpu --json gpu.json                  all configs, all impls
    python -m benchmarks.gpu --configs a,c --impls icgd-cupy  a subset
    python -m benchmarks.gpu --check-peers-cpu                verify the peers on the CPU only
    python -m benchmarks.gpu --large                          the configs that fill the GPU

One training step = draw B fresh tasks, forward, loss, backward, global-norm clip,
Adam (b2 = 0.98), for K separate LSA layers (1 head, key = value = D = d + 1),
the paper's settings for K: grad clip 0.001 if K <= 2 else 10, lr 1e-3 if K <= 3 else
5e-4, token clip 10 if K > 3. Configurations:

    a      d=10  N=10   B=2048  K=1
    b      d=10  N=10   B=2048  K=6
    c      d=40  N=80   B=1024  K=4
    large  d=64  N=512  B=4096  K=8     (meant to fill the GPU)
    a64k   d=10  N=10   B=65536 K=1     (config a at a batch that fills the GPU)

--large selects the configurations that fill the GPU (large, a64k): each is verified
against the float64 reference at --verify-batch tasks only, and timed at full size.

Implementations (float32, TF32 off everywhere):

    icgd-cupy            reference.backends.cupy_backend stepper.step (tasks drawn on the device)
    icgd-cupy-reference  reference.train_step on CuPy arrays (the xp-generic spec, unfused)
    torch-eager, torch-compile, jax-jit
                         the same step (covariance form, tasks drawn on the device, autograd),
                         when PyTorch / JAX with CUDA are installed

Verify before timing: every implementation first does one step on the same tasks and
the same initial parameters as the NumPy reference (reference.backends.numpy_backend,
on the host), in float64, and must match it within the tolerance table's "algebra"
entry (parameters after the Adam update and the loss); a mismatch is reported and
that implementation is not timed (the exit status is then 1).

Timing: warm-up steps (compilation included) are excluded; each repeat runs ``inner``
steps between two device synchronisations (inner chosen so a repeat lasts about
--target-ms) and records ms per step; rows give the median, p10 and p90 over repeats.
Throughput: FLOPs and a lower bound on DRAM bytes of the covariance-form algorithm
(:func:`step_cost`, counted analytically, the same count charged to every
implementation), divided by time, as fractions of the GPU's peak FP32 (non-tensor-core)
FLOP/s and memory bandwidth (from the device properties, or --peak-tflops/--peak-gbps).

Without a usable GPU the program exits with status 2 and says why.

STATUS: written on a machine without a GPU; the CPU-checkable parts (peers against the
reference: ``--check-peers-cpu``; the exit path without a GPU) were run, the timing
itself was not.
"""

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

CONFIGS = {
    "a": dict(d=10, N=10, B=2048, K=1),
    "b": dict(d=10, N=10, B=2048, K=6),
    "c": dict(d=40, N=80, B=1024, K=4),
    "large": dict(d=64, N=512, B=4096, K=8),
    "a64k": dict(d=10, N=10, B=65536, K=1),
}
DEFAULT_CONFIGS = ("a", "b", "c", "large")
LARGE_CONFIGS = ("large", "a64k")   # --large: fill the GPU (verified at --verify-batch, timed at full size)
ICGD_IMPLS = ("icgd-cupy", "icgd-cupy-reference")
PEER_IMPLS = ("torch-eager", "torch-compile", "jax-jit")

# FP32 lanes per SM by compute capability (CUDA C Programming Guide, arithmetic
# instruction throughput table); peak FP32 = SMs * lanes * 2 (FMA) * clock.
FP32_LANES_PER_SM = {(6, 0): 64, (6, 1): 128, (7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128,
                     (8, 9): 128, (9, 0): 128, (10, 0): 128, (12, 0): 128}


# -- settings -------------------------------------------------------------------------

def settings(cfg):
    """Arch, AdamHP and TaskSpec of a configuration (the paper's rules for K)."""
    from reference import lsa_stack
    from reference.optim import AdamHP
    from reference.tasks import TaskSpec

    K = cfg["K"]
    arch = lsa_stack(n_layers=K, recurrent=False, clip=10.0 if K > 3 else None)
    hp = AdamHP(lr=1e-3 if K <= 3 else 5e-4, clip_norm=0.001 if K <= 2 else 10.0)
    return arch, hp, TaskSpec(d=cfg["d"], N=cfg["N"], B=cfg["B"])


def init_params(cfg, seed=0, dtype=np.float32):
    from reference import init_lsa_params

    rng = np.random.default_rng([seed, 1])
    K = cfg["K"]
    return tuple(init_lsa_params(rng, cfg["d"] + 1, n_layers_for_scale=K, dtype=dtype) for _ in range(K))


# -- analytic cost ----------------------------------------------------------------------

def step_cost(cfg, itemsize=4):
    """(FLOPs, bytes) of one training step of the covariance-form algorithm
    (reference/backends/_cupy_lsa.py), d_y = 1, H = 1, K separate layers.

    FLOPs: 2 per multiply-add of every matmul; elementwise work and parameter-sized
    products are left out. Forward, per layer: C = E_ctx^T E_ctx (2 B N D^2),
    Z = C KQ and M = PV Z (4 B D^3), pre = E + E M^T (2 B T D^2; only the query row,
    2 B D^2, in the last layer). Backward, per layer: dM (2 B T D^2; 0 in the last
    layer, an outer product), dPV, dZ, dKQ (6 B D^3), and where dE is needed (all
    layers but the first): dE (2 B T D^2; 2 B D^2 in the last layer), dC (2 B D^3),
    dE_ctx (2 B N D^2).

    Bytes: a LOWER BOUND on DRAM traffic, each array the algorithm makes written once
    and read once, and the step's inputs read once: per layer the tokens (B T D) in
    and out, the (B, D, D) arrays C, Z, M (forward) and dM, dZ, dC (backward), dE;
    the fraction of peak bandwidth derived from it is a lower bound too.
    """
    d, N, B, K = cfg["d"], cfg["N"], cfg["B"], cfg["K"]
    D, T = d + 1, N + 1
    flops = 0
    nbytes = B * T * D + B                                             # tasks written by the sampler
    for k in range(K):
        last, first = k == K - 1, k == 0
        flops += 2 * B * N * D * D + 4 * B * D ** 3 + (2 * B * D * D if last else 2 * B * T * D * D)
        flops += (0 if last else 2 * B * T * D * D) + 6 * B * D ** 3
        if not first:
            flops += (2 * B * D * D if last else 2 * B * T * D * D) + 2 * B * D ** 3 + 2 * B * N * D * D
        tok = B * T * D
        nbytes += 2 * tok + 2 * 3 * B * D * D                          # forward: E in, out; C, Z, M
        nbytes += 2 * 2 * B * D * D + (0 if first else 2 * tok + 2 * B * D * D + tok)  # backward
    return float(flops), float(nbytes * itemsize)


# -- the GPU ----------------------------------------------------------------------------

def require_gpu():
    """The cupy module, or exit(2) with the reason (no CuPy, no device)."""
    from reference.backends import get_backend

    try:
        return get_backend("cupy").require_cupy()
    except RuntimeError as exc:
        print(f"benchmarks.gpu: cannot run: {exc}", file=sys.stderr)
        raise SystemExit(2)


def machine_info(cupy, peak_tflops=None, peak_gbps=None):
    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device().id
    props = rt.getDeviceProperties(dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    cc = (int(props["major"]), int(props["minor"]))
    sms = int(props["multiProcessorCount"])

    def attr(key, code):
        if key in props:
            return int(props[key])
        try:
            return int(rt.deviceGetAttribute(code, dev))
        except Exception:  # noqa: BLE001
            return None

    clock_khz = attr("clockRate", 13)            # cudaDevAttrClockRate
    mem_khz = attr("memoryClockRate", 36)        # cudaDevAttrMemoryClockRate
    bus_bits = attr("memoryBusWidth", 37)        # cudaDevAttrGlobalMemoryBusWidth
    lanes = FP32_LANES_PER_SM.get(cc)
    if peak_tflops is None and lanes and clock_khz:
        peak_tflops = sms * lanes * 2 * clock_khz * 1e3 / 1e12
    if peak_gbps is None and mem_khz and bus_bits:
        peak_gbps = 2 * mem_khz * 1e3 * bus_bits / 8 / 1e9
    import reference

    info = {"gpu": name, "compute_capability": f"{cc[0]}.{cc[1]}", "sms": sms, "clock_mhz": clock_khz and clock_khz / 1e3,
            "peak_fp32_tflops": peak_tflops, "peak_gbps": peak_gbps, "cupy": cupy.__version__,
            "cuda_runtime": rt.runtimeGetVersion(), "driver": rt.driverGetVersion(), "icgd": reference.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "host": platform.node(),
            "cupy_tf32": __import__("os").environ.get("CUPY_TF32", "0")}
    for mod in ("torch", "jax"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


# -- implementations ---------------------------------------------------------------------
# Each has: load(params_host, dtype) to set parameters (fresh Adam state),
# step_on(tasks_host) -> loss (one step on given tasks), params() -> host LSAParams tuple,
# step() (one full step drawing its own tasks), sync().

class IcgdCupy:
    """The CuPy backend's stepper."""

    def __init__(self, cfg, device="cuda"):
        from reference.backends import get_backend

        self.cb = get_backend("cupy")
        self.cupy = self.cb.require_cupy()
        self.cfg = cfg

    def load(self, params, dtype):
        from reference.optim import adam_init
        from reference.tree import tree_map

        arch, hp, spec = settings(self.cfg)
        self.stepper = self.cb.make_stepper(arch, hp, spec, seed=0, dtype=dtype)
        self.p = tree_map(self.cupy.asarray, params)
        self.s = adam_init(self.p)
        self.k = 0

    def step_on(self, tasks):
        r = self.stepper.step_on(self.p, self.s, tasks)
        self.p, self.s = r.params, r.state
        return float(r.loss)

    def step(self):
        r = self.stepper.step(self.p, self.s, self.k)
        self.p, self.s, self.k = r.params, r.state, self.k + 1
        return r.loss

    def params(self):
        from reference.tree import to_host

        return to_host(self.p)

    def sync(self):
        self.cupy.cuda.get_current_stream().synchronize()


class IcgdCupyReference(IcgdCupy):
    """reference.train_step on CuPy arrays, tasks drawn by the backend's device sampler."""

    def step_on(self, tasks):
        from reference.train_step import train_step

        arch, hp, _ = settings(self.cfg)
        t = type(tasks)(*(self.cupy.asarray(a) for a in tasks))
        r = train_step(self.p, self.s, t, arch, hp)
        self.p, self.s = r.params, r.state
        return float(r.loss)

    def step(self):
        tasks = self.stepper.sample(self.k)
        self.k += 1
        return self.step_on(tasks)


def _stack(params):
    """LSAParams tuple (H = 1) -> (K, 4, D, D) array [W_Q, W_K, W_V, P] per layer."""
    return np.stack([np.stack([a[0] for a in layer]) for layer in params])


def _unstack(P):
    from reference import LSAParams

    return tuple(LSAParams(*(np.asarray(P[k, i])[None] for i in range(4))) for k in range(P.shape[0]))


class TorchStep:
    """PyTorch peer: the covariance-form step with autograd, eager or torch.compile."""

    def __init__(self, cfg, device="cuda", compile=False):
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device (torch.cuda.is_available() is False)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.torch, self.cfg, self.device, self.compiled = torch, cfg, device, compile
        arch, hp, _ = settings(cfg)
        d, N, K = cfg["d"], cfg["N"], cfg["K"]
        clamp = arch.clip
        b1, b2, eps, lr, clip = hp.b1, hp.b2, hp.eps, hp.lr, hp.clip_norm

        def loss_fn(P, E, y_q):
            for k in range(K):
                W_Q, W_K, W_V, Pk = P[k, 0], P[k, 1], P[k, 2], P[k, 3]
                Ec = E[:, :N]
                C = Ec.transpose(1, 2) @ Ec                                  # (B, D, D)
                M = (Pk @ W_V) @ C @ (W_K.T @ W_Q)                           # (B, D, D)
                E = E + E @ M.transpose(1, 2)
                if clamp is not None:
                    E = torch.clamp(E, -clamp, clamp)
            err = -E[:, N, d:] - y_q
            return 0.5 * (err * err).sum(dim=1).mean()

        def update(P, m, v, c1, c2, E, y_q):
            with torch.enable_grad():
                Pg = P.detach().requires_grad_(True)
                L = loss_fn(Pg, E, y_q)
                (g,) = torch.autograd.grad(L, Pg)
            norm = torch.sqrt((g * g).sum())
            g = g * torch.clamp(clip / norm, max=1.0)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            P = P - lr * (m / c1) / (torch.sqrt(v / c2) + eps)
            return P, m, v, L.detach()

        self._update = torch.compile(update) if compile else update
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(0)

    def load(self, params, dtype):
        t = self.torch
        self.dtype = {np.dtype(np.float32): t.float32, np.dtype(np.float64): t.float64}[np.dtype(dtype)]
        self.P = t.as_tensor(_stack(params), dtype=self.dtype, device=self.device)
        self.m, self.v, self.t = t.zeros_like(self.P), t.zeros_like(self.P), 0

    def _apply(self, E, y_q):
        t = self.torch
        _, hp, _ = settings(self.cfg)
        self.t += 1
        c1 = t.tensor(1 - hp.b1 ** self.t, dtype=self.dtype, device=self.device)
        c2 = t.tensor(1 - hp.b2 ** self.t, dtype=self.dtype, device=self.device)
        self.P, self.m, self.v, L = self._update(self.P, self.m, self.v, c1, c2, E, y_q)
        return L

    def step_on(self, tasks):
        t = self.torch
        X, Y, x_q, y_q = (t.as_tensor(np.asarray(a), dtype=self.dtype, device=self.device)
                          for a in (tasks.X, tasks.Y, tasks.x_q, tasks.y_q))
        q = t.cat([x_q, t.zeros_like(x_q[:, :1])], dim=1)[:, None]
        return float(self._apply(t.cat([t.cat([X, Y], dim=2), q], dim=1), y_q))

    def step(self):
        t, c = self.torch, self.cfg
        B, N, d = c["B"], c["N"], c["d"]
        W = t.randn((B, 1, d), generator=self.gen, device=self.device, dtype=self.dtype)
        x = t.rand((B, N + 1, d), generator=self.gen, device=self.device, dtype=self.dtype) - 0.5
        y = x @ W.transpose(1, 2)                                            # (B, T, 1)
        y_q = y[:, N].clone()
        y[:, N] = 0
        return self._apply(t.cat([x, y], dim=2), y_q)

    def params(self):
        return _unstack(self.P.detach().cpu().numpy())

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


class JaxStep:
    """JAX peer: the covariance-form step (sampling included) under one jax.jit."""

    def __init__(self, cfg, device="gpu"):
        import jax

        jax.config.update("jax_enable_x64", True)   # float64 for verification; float32 stays float32
        import jax.numpy as jnp

        self.dev = jax.devices(device)[0]
        self.jax, self.jnp, self.cfg = jax, jnp, cfg
        arch, hp, _ = settings(cfg)
        d, N, B, K = cfg["d"], cfg["N"], cfg["B"], cfg["K"]
        clamp = arch.clip
        HI = jax.lax.Precision.HIGHEST
        b1, b2, eps, lr, clip = hp.b1, hp.b2, hp.eps, hp.lr, hp.clip_norm

        def mm(a, b):
            return jnp.matmul(a, b, precision=HI)

        def loss_fn(P, E, y_q):
            for k in range(K):
                W_Q, W_K, W_V, Pk = P[k, 0], P[k, 1], P[k, 2], P[k, 3]
                Ec = E[:, :N]
                C = mm(jnp.swapaxes(Ec, 1, 2), Ec)
                M = mm(mm(mm(Pk, W_V), C), mm(W_K.T, W_Q))
                E = E + mm(E, jnp.swapaxes(M, 1, 2))
                if clamp is not None:
                    E = jnp.clip(E, -clamp, clamp)
            err = -E[:, N, d:] - y_q
            return 0.5 * jnp.mean(jnp.sum(err * err, axis=1))

        def update(P, m, v, t, E, y_q):
            L, g = jax.value_and_grad(loss_fn)(P, E, y_q)
            norm = jnp.sqrt(jnp.sum(g * g))
            g = g * jnp.minimum(1.0, clip / norm).astype(g.dtype)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            c1 = (1 - b1 ** t).astype(P.dtype)
            c2 = (1 - b2 ** t).astype(P.dtype)
            return P - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), m, v, L

        def full_step(P, m, v, t, key):
            kw, kx = jax.random.split(key)
            W = jax.random.normal(kw, (B, 1, d), P.dtype)
            x = jax.random.uniform(kx, (B, N + 1, d), P.dtype, -0.5, 0.5)
            y = mm(x, jnp.swapaxes(W, 1, 2))
            y_q = y[:, N]
            y = y.at[:, N].set(0)
            return update(P, m, v, t, jnp.concatenate([x, y], axis=2), y_q)

        self._update = jax.jit(update)
        self._full = jax.jit(full_step)

    def load(self, params, dtype):
        jnp = self.jnp
        self.P = self.jax.device_put(jnp.asarray(_stack(params), dtype=dtype), self.dev)
        self.m, self.v = jnp.zeros_like(self.P), jnp.zeros_like(self.P)
        self.t = 0
        self.key = self.jax.random.PRNGKey(0)

    def step_on(self, tasks):
        jnp = self.jnp
        X, Y, x_q, y_q = (self.jax.device_put(jnp.asarray(a, dtype=self.P.dtype), self.dev)
                          for a in (tasks.X, tasks.Y, tasks.x_q, tasks.y_q))
        q = jnp.concatenate([x_q, jnp.zeros_like(x_q[:, :1])], axis=1)[:, None]
        self.t += 1
        self.P, self.m, self.v, L = self._update(self.P, self.m, self.v, jnp.asarray(self.t, self.P.dtype),
                                                 jnp.concatenate([jnp.concatenate([X, Y], axis=2), q], axis=1), y_q)
        return float(L)

    def step(self):
        self.t += 1
        key = self.jax.random.fold_in(self.key, self.t)
        self.P, self.m, self.v, L = self._full(self.P, self.m, self.v, self.jnp.asarray(self.t, self.P.dtype), key)
        return L

    def params(self):
        return _unstack(np.asarray(self.P))

    def sync(self):
        self.P.block_until_ready()


def make_impl(name, cfg, on_cpu=False):
    if name == "icgd-cupy":
        return IcgdCupy(cfg)
    if name == "icgd-cupy-reference":
        return IcgdCupyReference(cfg)
    if name == "torch-eager":
        return TorchStep(cfg, "cpu" if on_cpu else "cuda", compile=False)
    if name == "torch-compile":
        return TorchStep(cfg, "cpu" if on_cpu else "cuda", compile=True)
    if name == "jax-jit":
        return JaxStep(cfg, "cpu" if on_cpu else "gpu")
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join(ICGD_IMPLS + PEER_IMPLS)}")


# -- verification ---------------------------------------------------------------------------

def verify(impl, cfg, verify_batch, dtype=np.float64):
    """One step on the same tasks and params as the NumPy reference. Returns
    (ok, worst relative error, detail)."""
    from reference.backends import numpy_backend
    from reference.optim import adam_init
    from reference.tolerances import allclose_report
    from reference.tree import tree_leaves

    small = dict(cfg, B=min(cfg["B"], verify_batch))
    arch, hp, spec = settings(small)
    params = init_params(small, dtype=dtype)
    tasks = spec.sample(np.random.default_rng([0, 99]), dtype=dtype)
    ref = numpy_backend.make_stepper(arch, hp, spec, 0, dtype).step_on(params, adam_init(params), tasks)
    impl.cfg = small
    impl.load(params, dtype)
    loss = impl.step_on(tasks)
    got = impl.params()
    reps = [allclose_report(np.asarray([loss], dtype=dtype), np.asarray([ref.loss], dtype=dtype), "algebra")]
    reps += [allclose_report(np.asarray(a, dtype=dtype), np.asarray(b), "algebra")
             for a, b in zip(tree_leaves(got), tree_leaves(ref.params))]
    worst = max(reps, key=lambda r: r.rel_err)
    ok = all(r.ok for r in reps)
    return ok, worst.rel_err, ("ok" if ok else f"MISMATCH: {worst}")


# -- timing -----------------------------------------------------------------------------

def time_steps(impl, warmup, repeats, target_ms):
    """ms per step: median, p10, p90 over ``repeats`` blocks of ``inner`` steps."""
    for _ in range(warmup):
        impl.step()
    impl.sync()
    t0 = time.perf_counter()
    impl.step()
    impl.sync()
    one = time.perf_counter() - t0
    inner = max(1, min(10_000, int(target_ms / 1e3 / max(one, 1e-6))))
    samples = []
    for _ in range(repeats):
        impl.sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            impl.step()
        impl.sync()
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
    q = np.percentile(samples, [10, 90])
    return statistics.median(samples), float(q[0]), float(q[1]), inner


def run(args):
    cupy = require_gpu()
    info = machine_info(cupy, args.peak_tflops, args.peak_gbps)
    print(f"# {info['gpu']} (cc {info['compute_capability']}, {info['sms']} SMs), peak FP32 "
          f"{info['peak_fp32_tflops'] or float('nan'):.1f} TFLOP/s, {info['peak_gbps'] or float('nan'):.0f} GB/s; "
          f"CuPy {info['cupy']}, torch {info['torch']}, jax {info['jax']}", flush=True)
    rows, failed = [], False
    for cname in args.configs:
        cfg = CONFIGS[cname]
        flops, nbytes = step_cost(cfg)
        for iname in args.impls:
            row = {"config": cname, **cfg, "impl": iname, "dtype": "float32"}
            try:
                impl = make_impl(iname, cfg)
            except Exception as exc:  # noqa: BLE001 - a peer that is not installed / has no GPU
                row.update(status="unavailable", reason=f"{type(exc).__name__}: {exc}")
                print(f"{cname:6s} {iname:20s} unavailable: {row['reason']}", flush=True)
                rows.append(row)
                continue
            try:
                ok, err, detail = verify(impl, cfg, args.verify_batch)
                row.update(verify_ok=ok, verify_rel_err=err, verify_detail=detail, verify_batch=min(cfg["B"], args.verify_batch))
                if not ok:
                    failed = True
                    row.update(status="verify-failed")
                    print(f"{cname:6s} {iname:20s} VERIFY FAILED: {detail}", flush=True)
                    rows.append(row)
                    continue
                impl.cfg = cfg
                impl.load(init_params(cfg), np.float32)
                med, p10, p90, inner = time_steps(impl, args.warmup, args.repeats, args.target_ms)
                final = float(impl.step())
            except Exception as exc:  # noqa: BLE001 - e.g. out of device memory: recorded, not fatal
                row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                print(f"{cname:6s} {iname:20s} error: {row['reason']}", flush=True)
                rows.append(row)
                continue
            tflops = flops / (med * 1e-3) / 1e12
            gbps = nbytes / (med * 1e-3) / 1e9
            row.update(status="ok", ms_median=med, ms_p10=p10, ms_p90=p90, repeats=args.repeats, inner=inner,
                       warmup=args.warmup, flops=flops, bytes_lower_bound=nbytes, tflops=tflops, gbps=gbps,
                       flop_frac=tflops / info["peak_fp32_tflops"] if info["peak_fp32_tflops"] else None,
                       bw_frac=gbps / info["peak_gbps"] if info["peak_gbps"] else None,
                       loss_after=final, loss_finite=bool(np.isfinite(final)))
            if not np.isfinite(final):
                failed = True
            print(f"{cname:6s} {iname:20s} {med:9.3f} ms/step (p10 {p10:.3f}, p90 {p90:.3f}; inner {inner})  "
                  f"{tflops:7.2f} TFLOP/s ({100 * (row['flop_frac'] or 0):5.1f}% peak)  {gbps:7.1f} GB/s "
                  f"({100 * (row['bw_frac'] or 0):5.1f}%)  verify rel err {err:.1e}", flush=True)
            rows.append(row)
            del impl
            cupy.get_default_memory_pool().free_all_blocks()
    if args.json:
        from reference.files import OutputPathError, write_output

        try:
            write_output(args.json, json.dumps({"machine": info, "rows": rows}, indent=1), "--json")
        except OutputPathError as exc:
            print(f"benchmarks.gpu: {exc}", file=sys.stderr)
            return 2
        print(f"# wrote {args.json}")
    return 1 if failed else 0


def check_peers_cpu(args):
    """Verify the PyTorch / JAX peers against the reference on the CPU (no timing)."""
    failed = False
    for cname in args.configs:
        cfg = dict(CONFIGS[cname])
        for iname in [i for i in args.impls if i in PEER_IMPLS]:
            try:
                impl = make_impl(iname, cfg, on_cpu=True)
                ok, err, detail = verify(impl, cfg, args.verify_batch)
            except Exception as exc:  # noqa: BLE001
                print(f"{cname:6s} {iname:14s} unavailable: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            failed |= not ok
            print(f"{cname:6s} {iname:14s} {'PASS' if ok else 'FAIL'} float64 one-step rel err {err:.2e} ({detail})")
    return 1 if failed else 0


def main(argv=None):
    from reference.files import OutputPathError, check_writable

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write {machine, rows} to this file")
    ap.add_argument("--configs", help=f"comma list of {', '.join(CONFIGS)} (default {','.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--large", action="store_true",
                    help=f"the configurations that fill the GPU ({','.join(LARGE_CONFIGS)}) instead of the default list")
    ap.add_argument("--impls", default=",".join(ICGD_IMPLS + PEER_IMPLS), help="comma list of implementations")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--target-ms", type=float, default=50.0, help="length of one timed repeat")
    ap.add_argument("--verify-batch", type=int, default=64, help="tasks in the float64 verification step")
    ap.add_argument("--peak-tflops", type=float, help="override the peak FP32 TFLOP/s")
    ap.add_argument("--peak-gbps", type=float, help="override the peak memory bandwidth")
    ap.add_argument("--check-peers-cpu", action="store_true", help="verify the peers on the CPU and exit")
    args = ap.parse_args(argv)
    for option, lo in (("--warmup", 0), ("--repeats", 1), ("--verify-batch", 1)):
        v = getattr(args, option[2:].replace("-", "_"))
        if v < lo:
            ap.error(f"argument {option}: must be >= {lo}, got {v}")
    for option in ("--target-ms", "--peak-tflops", "--peak-gbps"):
        v = getattr(args, option[2:].replace("-", "_"))
        if v is not None and not (np.isfinite(v) and v > 0):
            ap.error(f"argument {option}: must be finite and > 0, got {v}")
    if args.large and args.configs is not None:
        ap.error("argument --large: not together with --configs (--large means --configs " + ",".join(LARGE_CONFIGS) + ")")
    if args.configs is None:
        args.configs = ",".join(LARGE_CONFIGS if args.large else DEFAULT_CONFIGS)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for option, names, known in (("--configs", args.configs, list(CONFIGS)),
                                 ("--impls", args.impls, list(ICGD_IMPLS + PEER_IMPLS))):
        if not names:
            ap.error(f"argument {option}: no name given; known: {', '.join(known)}")
        for n in names:
            if n not in known:
                ap.error(f"argument {option}: unknown {n!r}; known: {', '.join(known)}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            ap.error(f"argument {option}: {', '.join(twice)} given twice")
    if args.json is not None:
        try:
            check_writable(args.json, "--json")
        except OutputPathError as exc:
            ap.error(str(exc))
    return check_peers_cpu(args) if args.check_peers_cpu else run(args)


if __name__ == "__main__":
    sys.exit(main())
