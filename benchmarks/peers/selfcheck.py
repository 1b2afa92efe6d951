"""Self-check and quick timing of the torch / JAX peers.

    python -m benchmarks.peers.selfcheck [--configs a,b,c] [--peers p1,p2]
                                         [--steps 10] [--warmup 3] [--parts]

For every available peer and config it checks, on shared numpy data and shared
parameters (at init scale and at a larger scale where the layers matter):
  * forward loss against an independent NumPy float64 implementation;
  * gradient against a float64 central difference along random directions;
  * attn vs cov form (loss and gradient) and agreement across peers;
  * one step_on() update against a NumPy clip + Adam applied to its gradient;
then times the median ms per full step() over --steps steps after --warmup.
Exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from . import PEER_NAMES, UNAVAILABLE_REASONS, available_peers, make_peer
from ._common import B1, B2, EPS, derive

CONFIGS = {
    "a": dict(d=10, N=10, B=2048, K=1),
    "b": dict(d=10, N=10, B=2048, K=6),
    "c": dict(d=40, N=80, B=1024, K=4),
}
RTOL = 1e-4


# ---------------------------------------------------------------- numpy f64 --
def np_tasks(cfg, rng):
    B, N, d = cfg["B"], cfg["N"], cfg["d"]
    W = rng.standard_normal((B, 1, d))
    X = rng.uniform(-0.5, 0.5, (B, N, d))
    xq = rng.uniform(-0.5, 0.5, (B, d))
    Y = np.einsum("bnd,bod->bno", X, W)
    yq = np.einsum("bod,bd->bo", W, xq)
    f = lambda a: a.astype(np.float32)
    return f(X), f(Y), f(xq), f(yq)


def np_loss64(params, X, Y, xq, yq, K):
    """Token-by-token linear attention in float64, written from the definition."""
    X, Y, xq, yq = (np.asarray(a, np.float64) for a in (X, Y, xq, yq))
    B, N, d = X.shape
    E = np.zeros((B, N + 1, d + 1))
    E[:, :N, :d], E[:, :N, d] = X, Y[:, :, 0]
    E[:, N, :d] = xq
    for l in range(K):
        Wq, Wk, Wv, P = (np.asarray(p, np.float64) for p in params[4 * l: 4 * l + 4])
        q = np.einsum("ij,btj->bti", Wq, E)
        k = np.einsum("ij,bnj->bni", Wk, E[:, :N])
        v = np.einsum("ij,bnj->bni", Wv, E[:, :N])
        a = np.einsum("bti,bni->btn", q, k)  # no softmax, no scaling, no mask
        upd = np.einsum("btn,bni->bti", a, v)
        E = E + np.einsum("ij,btj->bti", P, upd)
        if K > 3:
            E = np.clip(E, -10.0, 10.0)
    pred = -E[:, N, d]
    return 0.5 * np.mean((pred - yq.reshape(-1)) ** 2)


def np_clip_adam(params, grads, cfg):
    g = [np.asarray(x, np.float64) for x in grads]
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
    s = min(1.0, cfg["clip"] / norm) if norm > 0 else 1.0
    out = []
    for p, x in zip(params, g):
        x = x * s
        m_hat = (1 - B1) * x / (1 - B1)
        v_hat = (1 - B2) * x * x / (1 - B2)
        out.append(np.asarray(p, np.float64) - cfg["lr"] * m_hat / (np.sqrt(v_hat) + EPS))
    return out


def flat(lst):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in lst])


def rel(a, b):
    a, b = flat(a) if isinstance(a, list) else np.float64(a), flat(b) if isinstance(b, list) else np.float64(b)
    return float(np.linalg.norm(np.ravel(a - b)) / max(np.linalg.norm(np.ravel(b)), 1e-30))


# ------------------------------------------------------------------- checks --
def check_config(tag, cfg, peers, args, failures):
    c = derive(cfg)
    K, D = c["K"], c["D"]
    rng = np.random.default_rng(1234)
    data = np_tasks(c, rng)
    Xs = [d[: min(256, c["B"])] for d in data]  # smaller batch for the f64 FD
    # "big": random params whose per-layer update E M^T has relative size about
    # args.big (M = P W_V C W_K^T W_Q, |C| ~ N d / 12), so the layers matter
    # but the K > 3 token clamp stays (mostly) inactive.
    big = (args.big * 12.0 / (c["N"] * c["d"] * D * D)) ** 0.25
    scales = {"init": c["init_std"], "big": big}
    rows = []
    for sname, std in scales.items():
        params = [np.clip(rng.standard_normal((D, D)), -2, 2).astype(np.float32) * np.float32(std)
                  for _ in range(4 * K)]
        ref_loss = np_loss64(params, *data, K)
        # float64 directional derivatives on the small batch
        dirs = [[rng.standard_normal((D, D)) for _ in range(4 * K)] for _ in range(2)]
        h = 1e-4 * float(np.linalg.norm(flat(params))) / math.sqrt(len(flat(params)))
        h = max(h, 1e-7)
        fd = []
        for u in dirs:
            up = [p + h * x for p, x in zip(params, u)]
            dn = [p - h * x for p, x in zip(params, u)]
            fd.append((np_loss64(up, *Xs, K) - np_loss64(dn, *Xs, K)) / (2 * h))
        got = {}
        for name in peers:
            peer = make_peer(name, cfg, seed=0)
            peer.set_params(params)
            L = peer.forward_loss(*data)
            G = peer.grads(*data)
            Gs = peer.grads(*Xs)
            dd = [float(np.dot(flat(Gs), flat(u))) for u in dirs]
            fd_err = max(abs(a - b) / max(abs(b), np.linalg.norm(flat(Gs)) * np.linalg.norm(flat(u)) * 1e-3, 1e-30)
                         for a, b, u in zip(dd, fd, dirs))
            peer.step_on(*data)
            upd_exp = np_clip_adam(params, G, c)
            upd_got = peer.get_params()
            step_err = float(np.max(np.abs(flat(upd_got) - flat(upd_exp)))) / c["lr"]
            got[name] = (L, G)
            r = dict(cfg=tag, scale=sname, peer=name, loss=L, loss_err=abs(L - ref_loss) / abs(ref_loss),
                     fd_err=fd_err, step_err=step_err)
            rows.append(r)
            if r["loss_err"] > RTOL:
                failures.append(f"{tag}/{sname}/{name}: loss vs f64 rel err {r['loss_err']:.2e}")
            if fd_err > 1e-3:
                failures.append(f"{tag}/{sname}/{name}: grad vs f64 finite difference rel err {fd_err:.2e}")
            if step_err > 1e-3:
                failures.append(f"{tag}/{sname}/{name}: step_on vs numpy clip+Adam err {step_err:.2e} lr")
        # attn vs cov, and agreement across peers
        names = list(got)
        for name in names:
            base, form = name.rsplit("-", 1)
            twin = f"{base}-{'cov' if form == 'attn' else 'attn'}"
            others = [twin] if twin in got else []
            others += [n for n in names if n != name and n != twin][:1]
            for o in others:
                le = abs(got[name][0] - got[o][0]) / abs(got[o][0])
                ge = rel(got[name][1], got[o][1])
                if le > RTOL or ge > RTOL:
                    failures.append(f"{tag}/{sname}: {name} vs {o}: loss {le:.2e} grad {ge:.2e}")
                for r in rows:
                    if r["peer"] == name and r["scale"] == sname and o == twin:
                        r["twin_grad_err"] = ge
    return rows


def time_peer(name, cfg, args):
    peer = make_peer(name, cfg, seed=0)
    t0 = time.perf_counter()
    peer.step()
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        peer.step()
    ts = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        peer.step()
        ts.append(time.perf_counter() - t0)
    out = dict(first_s=first, median_ms=1e3 * float(np.median(ts)), min_ms=1e3 * min(ts), loss=peer.loss())
    if args.parts:
        for pn, fn in peer.parts().items():
            for _ in range(2):
                fn()
            pts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                pts.append(time.perf_counter() - t0)
            out[pn] = 1e3 * float(np.median(pts))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="a,b,c")
    ap.add_argument("--peers", default="")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--parts", action="store_true", help="also time sample/forward/backward/adam")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--big", type=float, default=0.3,
                    help="target relative per-layer update for the second ('big') check scale")
    args = ap.parse_args(argv)

    peers = available_peers()
    for n in PEER_NAMES:
        if n not in peers:
            print(f"unavailable: {n}: {UNAVAILABLE_REASONS.get(n, '?')}")
    if args.peers:
        want = args.peers.split(",")
        peers = [p for p in peers if p in want]
    if not peers:
        print("no peers available")
        return 1
    failures: list[str] = []
    for tag in args.configs.split(","):
        cfg = CONFIGS[tag]
        print(f"\n=== config {tag}: {cfg}")
        if not args.no_check:
            rows = check_config(tag, cfg, peers, args, failures)
            print(f"{'scale':5} {'peer':20} {'loss':>11} {'vs f64':>9} {'grad~FD':>9} {'attn~cov':>9} {'adam/lr':>9}")
            for r in rows:
                print(f"{r['scale']:5} {r['peer']:20} {r['loss']:11.6g} {r['loss_err']:9.1e} {r['fd_err']:9.1e} "
                      f"{r.get('twin_grad_err', float('nan')):9.1e} {r['step_err']:9.1e}")
        hdr = f"{'peer':20} {'ms/step':>9} {'min':>9} {'first(s)':>9} {'loss':>10}"
        if args.parts:
            hdr += "".join(f" {p:>9}" for p in ("sample", "forward", "backward", "adam"))
        print(hdr)
        load0 = os.getloadavg()[0]
        for name in peers:
            t = time_peer(name, cfg, args)
            line = f"{name:20} {t['median_ms']:9.2f} {t['min_ms']:9.2f} {t['first_s']:9.2f} {t['loss']:10.4g}"
            if args.parts:
                line += "".join(f" {t[p]:9.2f}" for p in ("sample", "forward", "backward", "adam"))
            print(line, flush=True)
        print(f"(1-min load average {load0:.2f} before timing, {os.getloadavg()[0]:.2f} after, "
              f"{os.cpu_count()} CPUs: timings are only meaningful on an otherwise idle machine)")
    print()
    if failures:
        print("FAILED:")
        for f in failures:
            print("  " + f)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
