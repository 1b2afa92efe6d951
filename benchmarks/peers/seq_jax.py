"""JAX peer of the lds task's training step (``benchmarks/seq.py``): ``jax.jit`` over the
whole step on a given batch (tokens, mask, forward, the loss over every time step,
``jax.value_and_grad``, element-wise clip, AdamW), float32, HIGHEST matmul precision.

Run in the peers' environment (jax installed there, this repository on PYTHONPATH):

    PYTHONPATH=. /tmp/peers-venv/bin/python -m benchmarks.peers.seq_jax --config lsa2

It verifies first (float64, ``jax_enable_x64``: loss and gradients against the
reference's ``sequences.seq_loss_and_grads`` at the verification parameters of
``benchmarks.seq``, the float64 "algebra" tolerance), then times the jitted step and
prints one JSON row. Models: causal LSA stacks in factored heads (token clip) and mesa
layers (the Sherman-Morrison recursion as a ``lax.scan``, differentiated by JAX, not by
the reverse walk).
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def _model(jax, jnp, arch_kind, mask, clip, d):
    hi = jax.lax.Precision.HIGHEST

    def lsa(E, p):
        W_Q, W_K, W_V, P = p
        q = jnp.einsum("btd,hkd->bhtk", E, W_Q, precision=hi)
        k = jnp.einsum("btd,hkd->bhtk", E, W_K, precision=hi)
        v = jnp.einsum("btd,hkd->bhtk", E, W_V, precision=hi)
        T = E.shape[1]
        S = jnp.einsum("bhtk,bhsk->bhts", q, k, precision=hi) * jnp.tril(jnp.ones((T, T), E.dtype))
        o = jnp.einsum("bhts,bhsv->bhtv", S, v, precision=hi)
        out = E + jnp.einsum("bhtv,hdv->btd", o, P, precision=hi)
        return jnp.clip(out, -clip, clip) if clip is not None else out

    def mesa(E, p):
        W_Q, W_K, W_V, P, lam = p
        q = jnp.einsum("btd,hkd->bhtk", E, W_Q, precision=hi)
        k = jnp.einsum("btd,hkd->bhtk", E, W_K, precision=hi)
        v = jnp.einsum("btd,hkd->bhtk", E, W_V, precision=hi)
        B, H, T, Kd = q.shape
        R0 = jnp.broadcast_to(lam[None, :, None, None] * jnp.eye(Kd, dtype=E.dtype), (B, H, Kd, Kd))

        def step(R, kq):
            kt, qt_in = kq                                              # (B, H, Kd) each
            u = jnp.einsum("bhij,bhj->bhi", R, kt, precision=hi)
            c = 1.0 + jnp.sum(kt * u, axis=-1)
            R = R - u[..., :, None] * u[..., None, :] / c[..., None, None]
            return R, jnp.einsum("bhij,bhj->bhi", R, qt_in, precision=hi)

        _, qt = jax.lax.scan(step, R0, (jnp.moveaxis(k, 2, 0), jnp.moveaxis(q, 2, 0)))
        qt = jnp.moveaxis(qt, 0, 2)                                     # (B, H, T, Kd)
        S = jnp.einsum("bhtk,bhsk->bhts", qt, k, precision=hi) * jnp.tril(jnp.ones((T, T), E.dtype))
        o = jnp.einsum("bhts,bhsv->bhtv", S, v, precision=hi)
        return E + jnp.einsum("bhtv,hdv->btd", o, P, precision=hi)

    layer = lsa if arch_kind == "lsa" else mesa

    def tokens(X):
        Xs = jnp.concatenate([jnp.zeros_like(X[:, :1]), X[:, :-1]], axis=1)
        E = jnp.concatenate([jnp.zeros_like(X), X, X, Xs], axis=2)     # [0, x_t, x_t, x_{t-1}]
        return E.at[:, :, :mask].set(0.0) if mask else E

    def loss(params, tie, X, Y):
        E = tokens(X)
        for i in tie:
            E = layer(E, params[i])
        err = E[:, :, :d] - Y
        return 0.5 * jnp.mean(jnp.sum(err * err, axis=2))

    return loss


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from benchmarks.seq import CONFIGS, problem
    from reference import seq_training as S
    from reference.sequences import code_tokens, seq_loss_and_grads
    from reference.tolerances import tolerance
    from reference.tree import tree_leaves

    cfg = CONFIGS[a.config]
    arch, hp, spec = problem(cfg)
    kind = cfg["kind"]
    clip = arch.option("clip") if kind == "lsa" else None
    tie = tuple(arch.tie)
    loss = _model(jax, jnp, kind, cfg["mask"], clip, 10)
    vg = jax.value_and_grad(loss)

    # ---- verify (float64)
    seqs = spec.sample(np.random.default_rng(7))
    p64 = S.init_normal(arch, 40, 0.05, np.random.default_rng(8), np.float64)
    L0, g0, _ = seq_loss_and_grads(code_tokens(seqs.X), seqs.Y, p64, arch, 10, cfg["mask"])
    L1, g1 = jax.jit(vg, static_argnums=1)([tuple(jnp.asarray(x) for x in p) for p in p64], tie, seqs.X, seqs.Y)
    tol = tolerance(np.float64, "algebra")
    worst, ok = abs(float(L1) - float(L0)) / abs(float(L0)), True
    for x, y in zip([np.asarray(t) for g in g1 for t in g], tree_leaves(g0)):
        diff = np.abs(x - y)
        ok &= bool(np.all(diff <= tol.atol + tol.rtol * np.abs(y).max()))
        worst = max(worst, float(diff.max() / np.abs(y).max()))

    # ---- time (float32)
    b1, b2, eps, lr, wd, ce = hp.b1, hp.b2, hp.eps, hp.lr, hp.weight_decay, hp.clip_value

    def step(params, m, v, t, X, Y):
        L, g = vg(params, tie, X, Y)
        g = jax.tree_util.tree_map(lambda x: jnp.clip(x, -ce, ce), g)
        m = jax.tree_util.tree_map(lambda a_, x: b1 * a_ + (1 - b1) * x, m, g)
        v = jax.tree_util.tree_map(lambda a_, x: b2 * a_ + (1 - b2) * x * x, v, g)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        params = jax.tree_util.tree_map(lambda p, m_, v_: p - lr * ((m_ / c1) / (jnp.sqrt(v_ / c2) + eps) + wd * p),
                                        params, m, v)
        return params, m, v, L

    jstep = jax.jit(step)
    p32 = [tuple(jnp.asarray(x, jnp.float32) for x in p)
           for p in S.init_normal(arch, 40, 0.0002, np.random.default_rng(1), np.float32)]
    m = jax.tree_util.tree_map(jnp.zeros_like, p32)
    v = jax.tree_util.tree_map(jnp.zeros_like, p32)
    sq = spec.sample(np.random.default_rng(0), dtype=np.float32)
    X, Y = jnp.asarray(sq.X), jnp.asarray(sq.Y)
    t0 = time.perf_counter()
    jax.block_until_ready(jstep(p32, m, v, jnp.float32(1), X, Y))
    first = time.perf_counter() - t0
    for _ in range(a.warmup):
        jax.block_until_ready(jstep(p32, m, v, jnp.float32(1), X, Y))
    ts = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        jax.block_until_ready(jstep(p32, m, v, jnp.float32(1), X, Y))
        ts.append((time.perf_counter() - t) * 1e3)
    row = dict(config=a.config, impl="jax-jit", median_ms=round(float(np.median(ts)), 3),
               p10_ms=round(float(np.percentile(ts, 10)), 3), p90_ms=round(float(np.percentile(ts, 90)), 3),
               sample_ms="nan", first_s=round(first, 3), load=f"{os.getloadavg()[0]:.1f}",
               verified=f"yes (f64 {worst:.1e})" if ok else f"NO ({worst:.1e})", jax=jax.__version__)
    print(json.dumps(row))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
