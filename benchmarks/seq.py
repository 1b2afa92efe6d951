"""Sequence training steps (the mesa paper's lds task): ms per step of the Numba
backend's sequence step against the NumPy reference's and the JAX and PyTorch peers',
float32, verified before timed.

    python -m benchmarks seq --peer-python /tmp/peers-venv/bin/python --json benchmarks/results/seq_cpu.json
    python -m benchmarks seq --configs lsa1,mesa --peer-python /tmp/peers-venv/bin/python

(``python -m benchmarks seq ...`` is ``python -m benchmarks.seq ...``; ``python -m
benchmarks`` without the ``seq`` subcommand is the LSA benchmark, ``benchmarks/bench.py``.)

Configurations (the ``seq_*`` experiments' models: T = 50, token width 40, batch 256,
key and value size 20, element-wise clip 1 then AdamW, weight decay 0.1):

    lsa1   one causal LSA layer, 2 heads, token clip 4, the first 20 input channels masked
    lsa2   two causal LSA layers, 4 heads, token clip 4
    lsa6   six causal LSA layers, 4 heads, token clip 4
    mesa   one mesa layer (form "sm"), 4 heads, the first 20 input channels masked

One step = ``stepper.step_on`` on one drawn batch (tokens, mask, forward, loss over every
time step, backward, clip, AdamW); the sequence sampler (the same for both: the NumPy
backend's) is timed apart. Verification: at parameters drawn normal(0, 0.05) (the layers
change the tokens; the experiments' init 0.0002 barely does), the Numba loss and
gradients in float64 against the reference's (the float64 "algebra" tolerance) and in
float32 against the reference's float64 ones (the float32 tolerance). Both run in this
one process, one after the other.

Peers: ``--peer-python PY`` (or ``ICGD_PEERS_PYTHON``) adds the peers of ``--peers``
(default all), each run by PY in its own process (this repository on PYTHONPATH), which
verifies in float64 against the reference first and prints one JSON row (its last stdout
line; a peer that fails to run gives a row verified "NO (peer failed: ...)"):

    jax-jit         ``benchmarks/peers/seq_jax.py``: the whole step in one ``jax.jit``, mesa
                    layer as a Sherman-Morrison ``lax.scan``
    torch-eager     ``benchmarks/peers/seq_torch.py``: plain PyTorch (autograd,
                    ``clip_grad_value_``, ``torch.optim.AdamW``), mesa layer as a batched
                    ``torch.linalg.solve`` of A_t = I / lam + sum_{s<=t} k_s k_s^T per time step
    torch-compile   the same model, the whole step in one ``torch.compile(fullgraph=True)``
                    function (a row verified "skipped (...)" where torch.compile does not work)

The torch peers also check the clip + AdamW update of two steps against the reference's
optimiser. The exit status is 1 when anything failed verification (a skipped peer is not
a failure).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

CONFIGS = {
    "lsa1": dict(kind="lsa", layers=1, heads=2, mask=20),
    "lsa2": dict(kind="lsa", layers=2, heads=4, mask=0),
    "lsa6": dict(kind="lsa", layers=6, heads=4, mask=0),
    "mesa": dict(kind="mesa", layers=1, heads=4, mask=20),
}


def matmul_gflops(n=2048, repeats=7):
    """float32 rate of one large np.matmul (GFLOP/s, best of ``repeats``), the rate the
    bound divides by (OpenBLAS with its default threads)."""
    from benchmarks.bench import matmul_rates

    return matmul_rates(n, repeats)[0]


def summarise(rows, gflops):
    """Per config: the Numba median, the best verified peer's, the ratio, and the bound
    (``costs.seq_step_cost`` FLOPs at ``gflops``): the largest lead any implementation
    could have over that peer is best peer / bound."""
    from benchmarks.costs import seq_step_cost

    out = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        cfg = CONFIGS[name]
        cost = seq_step_cost(cfg["layers"], cfg["heads"], mask=cfg["mask"], mesa=cfg["kind"] == "mesa")
        bound_ms = 1e3 * cost["flops"] / (gflops * 1e9)
        mine = [r for r in rows if r["config"] == name]
        numba = next((r.get("median_ms") for r in mine if r["impl"] == "numba" and "median_ms" in r), None)
        peers = [r for r in mine if r["impl"] not in ("numba", "numpy") and "median_ms" in r
                 and str(r.get("verified", "")).startswith("yes")]
        best = min(peers, key=lambda r: r["median_ms"]) if peers else None
        s = dict(flops=cost["flops"], bound_ms=round(bound_ms, 3), numba_ms=numba)
        if numba:
            s["numba_fraction_of_bound"] = round(bound_ms / numba, 3)
        if best:
            s.update(best_peer=best["impl"], best_peer_ms=best["median_ms"],
                     max_possible_lead=round(best["median_ms"] / bound_ms, 2))
            if numba:
                s["numba_over_best_peer"] = round(best["median_ms"] / numba, 2)
        out[name] = s
    return out


def summary_lines(summ, gflops):
    lines = ["", f"Bound (benchmarks/costs.py seq_step_cost: the step's dense products) at the float32 matmul rate "
             f"measured in this run, {gflops:.0f} GFLOP/s (2048^2, OpenBLAS default threads); no implementation of a "
             "step is faster than its bound, so a lead over a peer cannot exceed that peer's time / bound.", "",
             "| config | GFLOP | bound ms | numba ms | numba / bound | best peer | peer ms | numba lead | largest "
             "possible lead |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, s in summ.items():
        f = lambda k, spec: "-" if s.get(k) is None else spec.format(s[k])  # noqa: E731
        lines.append(f"| {name} | {s['flops'] / 1e9:.3f} | {s['bound_ms']:.2f} | {f('numba_ms', '{:.2f}')} | "
                     f"{f('numba_fraction_of_bound', '{:.2f}')} | {s.get('best_peer', '-')} | "
                     f"{f('best_peer_ms', '{:.2f}')} | {f('numba_over_best_peer', '{:.2f}x')} | "
                     f"{f('max_possible_lead', '{:.1f}x')} |")
    return lines


def problem(cfg):
    from reference.model import Arch, LayerSpec, lsa_stack
    from reference.optim import AdamHP
    from reference.sequences import SequenceSpec

    if cfg["kind"] == "lsa":
        arch = lsa_stack(cfg["layers"], False, True, 4.0, heads=cfg["heads"], key_size=20, value_size=20)
    else:
        arch = Arch((LayerSpec("mesa", (("heads", cfg["heads"]), ("key_size", 20), ("value_size", 20))),) * cfg["layers"])
    hp = AdamHP(lr=1e-4, b2=0.999, eps=1e-8, clip_norm=None, clip_value=1.0, weight_decay=0.1)
    return arch, hp, SequenceSpec(T=50, B=256)


def verify(cfg):
    """Worst relative error (max |x - x_ref| / max |x_ref| over loss and gradient leaves)
    of the Numba float64 and float32 results against the reference's float64, and
    whether each is within its tolerance."""
    from reference import seq_training as S
    from reference.backends import numba_backend as nb
    from reference.sequences import code_tokens, seq_loss_and_grads
    from reference.tolerances import tolerance
    from reference.tree import tree_leaves

    arch, _, spec = problem(cfg)
    seqs = spec.sample(np.random.default_rng(7))
    p64 = S.init_normal(arch, 40, 0.05, np.random.default_rng(8), np.float64)
    L0, g0, _ = seq_loss_and_grads(code_tokens(seqs.X), seqs.Y, p64, arch, 10, cfg["mask"])
    out = {}
    for dt in (np.float64, np.float32):
        p = tuple(type(q)(*(a.astype(dt) for a in q)) for q in p64)
        X, Y = seqs.X.astype(dt), seqs.Y.astype(dt)
        L1, g1, _ = nb.seq_loss_and_grads(code_tokens(X), Y, p, arch, 10, cfg["mask"])
        tol = tolerance(dt, "algebra")
        ok, worst = True, abs(float(L1) - float(L0)) / abs(float(L0))
        for a, b in zip(tree_leaves(g1), tree_leaves(g0)):
            diff = np.abs(a.astype(np.float64) - b)
            ok &= bool(np.all(diff <= tol.atol + tol.rtol * np.abs(b).max()))
            worst = max(worst, float(diff.max() / np.abs(b).max()))
        out[np.dtype(dt).name] = (ok, worst)
    return out


def time_steps(cfg, impl, repeats, warmup):
    from reference import seq_training as S
    from reference.backends import numba_backend as nb
    from reference.optim import adam_init

    arch, hp, spec = problem(cfg)
    params = S.init_normal(arch, 40, 0.0002, np.random.default_rng(1), np.float32)
    state = adam_init(params)
    make = nb.make_seq_stepper if impl == "numba" else S.SeqStepper
    st = make(arch, hp, spec, 0, np.float32, cfg["mask"])
    seqs = st.sample(0)
    t0 = time.perf_counter()
    st.step_on(params, state, seqs)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        st.step_on(params, state, seqs)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        st.step_on(params, state, seqs)
        ts.append(time.perf_counter() - t)
    samp = []
    for s in range(1, 4):
        t = time.perf_counter()
        st.sample(s)
        samp.append(time.perf_counter() - t)
    ts = np.asarray(ts) * 1e3
    return dict(first_s=round(first, 3), median_ms=round(float(np.median(ts)), 3),
                p10_ms=round(float(np.percentile(ts, 10)), 3), p90_ms=round(float(np.percentile(ts, 90)), 3),
                sample_ms=round(float(np.median(samp)) * 1e3, 3))


#: peer impl -> (its module, its extra arguments), each run by --peer-python in its own process
PEERS = {
    "jax-jit": ("benchmarks.peers.seq_jax", []),
    "torch-eager": ("benchmarks.peers.seq_torch", ["--impl", "torch-eager"]),
    "torch-compile": ("benchmarks.peers.seq_torch", ["--impl", "torch-compile"]),
}


def _peer_row(a, name, impl):
    import subprocess

    module, extra = PEERS[impl]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    res = subprocess.run([a.peer_python, "-m", module, "--config", name, "--repeats", str(a.repeats),
                          "--warmup", str(a.warmup)] + extra, capture_output=True, text=True, env=env, cwd=root)
    try:
        row = json.loads(res.stdout.strip().splitlines()[-1])
        if not isinstance(row, dict) or "verified" not in row:
            raise ValueError(row)
        return row
    except (IndexError, ValueError):
        return dict(config=name, impl=impl, load="-", verified=f"NO (peer failed: {res.stderr.strip()[-200:]})")


def _names(ap, option, value, known):
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if not names or bad or len(set(names)) != len(names):
        ap.error(f"{option}: expected distinct names from {', '.join(known)}, got {value!r}")
    return names


def main(argv=None, prog=None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 epilog="peers: " + ", ".join(PEERS) + " (see the module docstring)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--label", default="provisional")
    ap.add_argument("--json", default=None)
    ap.add_argument("--peer-python", default=os.environ.get("ICGD_PEERS_PYTHON", ""),
                    help="a Python with jax and/or torch installed: adds the peers' rows (benchmarks/peers/seq_jax.py, "
                         "seq_torch.py, each run in its own process with this repository on PYTHONPATH)")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="comma-separated peers run with --peer-python, from " + ", ".join(PEERS))
    a = ap.parse_args(argv)
    configs = _names(ap, "--configs", a.configs, list(CONFIGS))
    peers = _names(ap, "--peers", a.peers, list(PEERS))
    for option in ("repeats", "warmup"):
        if getattr(a, option) < (1 if option == "repeats" else 0):
            ap.error(f"--{option} must be >= {1 if option == 'repeats' else 0}, got {getattr(a, option)}")
    import numba

    rows = []
    bad = False
    for name in configs:
        cfg = CONFIGS[name]
        ver = verify(cfg)
        okv = all(v[0] for v in ver.values())
        bad |= not okv
        for impl in ("numba", "numpy"):
            load0 = os.getloadavg()[0]
            r = time_steps(cfg, impl, a.repeats, a.warmup) if (okv or impl == "numpy") else {}
            r.update(config=name, impl=impl, load=f"{load0:.1f}/{os.getloadavg()[0]:.1f}",
                     verified=(f"yes (f64 {ver['float64'][1]:.1e}, f32 {ver['float32'][1]:.1e})" if okv else "NO")
                     if impl == "numba" else "reference")
            rows.append(r)
            print(json.dumps(r), flush=True)
        for impl in peers if a.peer_python else ():
            rows.append(_peer_row(a, name, impl))
            print(json.dumps(rows[-1]), flush=True)
            bad |= not rows[-1]["verified"].startswith(("yes", "skipped"))
    shown = sys.argv[1:] if argv is None else argv
    head = (f"# Sequence training steps, ms per step ({a.label})\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
            f"{platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}; Numba threads "
            f"{numba.get_num_threads()}. Command: `{prog or 'python -m benchmarks.seq'} {' '.join(shown)}`; "
            f"{a.repeats} timed steps after {a.warmup} warm-up steps; 'first s' is the first timed-process step, after the "
            "verification compiled the kernels (a cold compile with an empty Numba cache is ~16 s per kernel "
            "family and dtype, measured apart).\n\n"
            "| config | impl | ms/step median | p10 | p90 | sample ms | first s | load before/after | verified (worst rel err) |\n"
            "|---|---|---:|---:|---:|---:|---:|---|---|\n")
    lines = [f"| {r['config']} | {r['impl']} | {r.get('median_ms', 'nan')} | {r.get('p10_ms', 'nan')} | "
             f"{r.get('p90_ms', 'nan')} | {r.get('sample_ms', 'nan')} | {r.get('first_s', 'nan')} | {r['load']} | "
             f"{r['verified']} |" for r in rows]
    peer_info = sorted({f"jax {r['jax']}" for r in rows if r.get("jax")} |
                       {f"torch {r['torch']} (torch threads {r.get('torch_threads', '?')})" for r in rows if r.get("torch")})
    gflops = matmul_gflops()
    summ = summarise(rows, gflops)
    md = (head + "\n".join(lines + summary_lines(summ, gflops)) + "\n"
          + (f"\nPeers: {'; '.join(peer_info)}.\n" if peer_info else ""))
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "matmul_gflops": gflops, "summary": summ, "label": a.label,
                       "machine": dict(processor=platform.processor() or platform.machine(), cores=os.cpu_count(),
                                       numba_threads=numba.get_num_threads(),
                                       loadavg_end=list(os.getloadavg()))}, f, indent=1)
        with open(a.json[:-5] + ".md" if a.json.endswith(".json") else a.json + ".md", "w") as f:
            f.write(md)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
