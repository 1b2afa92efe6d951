"""PyTorch peer of the lds task's training step (``benchmarks/seq.py``): the same models
and the same step as ``benchmarks/peers/seq_jax.py`` (tokens, input mask, forward, the loss
over every time step, autograd, element-wise clip 1, AdamW with weight decay 0.1), on the
CPU, float32.

Run in the peers' environment (torch installed there, this repository on PYTHONPATH):

    PYTHONPATH=. /tmp/peers-venv/bin/python -m benchmarks.peers.seq_torch --config mesa --impl torch-eager

Implementations (``--impl``):

    torch-eager     plain torch: ``loss.backward()``, ``torch.nn.utils.clip_grad_value_`` and
                    ``torch.optim.AdamW`` (its defaults otherwise), the way a PyTorch user
                    writes the step
    torch-compile   the whole step in one ``torch.compile(fullgraph=True, dynamic=False)``
                    function: gradient by ``torch.func.grad_and_value``, clip and AdamW
                    written functionally (as ``benchmarks/peers/torch_peer.py`` does). When
                    torch.compile does not work here at all (a probe function fails to
                    compile) the row says "skipped" with the reason and nothing is timed

Models: causal LSA stacks in factored heads (the diagonal included, token clip after the
residual) and the mesa layer written the way a PyTorch user would: per head the
regularised key covariance of every prefix, A_t = I / lam + sum_{s<=t} k_s k_s^T (a
``cumsum`` of outer products, (B, H, T, Kd, Kd)), and qt_t = A_t^{-1} q_t by one batched
``torch.linalg.solve`` over all (b, h, t), i.e. a direct LU solve per time step,
differentiated by autograd (not the Sherman-Morrison recursion of the reference's form
"sm", not a scan). It equals the reference's layer in exact arithmetic; the verification
below measures how close it is in float64.

Verification, before anything is timed (float64, the implementation's own step function,
compiled in float64 for torch-compile): at the verification parameters of
``benchmarks.seq`` (normal(0, 0.05), sequences of ``default_rng(7)``)

1. the loss and the raw gradients of the step against the reference's
   ``sequences.seq_loss_and_grads`` (worst |x - x_ref| <= atol + rtol max |x_ref| per
   leaf, the float64 "algebra" tolerance: the check of ``seq_jax.py``);
2. the update of two consecutive steps (p_new - p) against the reference's
   ``optim.adam_apply`` (element-wise clip, then AdamW) applied to the peer's own
   gradients and the reference's optimiser state, same tolerance: the clip and AdamW are
   checked apart from the gradients' rounding (Adam's first steps are ~sign(g), which
   would amplify it). The reported relative figure is max |error| / max |p_new - p|: the
   updates are lr-sized (1e-4), so the rounding of p itself (|p| eps, ~1e-16 for the mesa
   layer's lam = 1) shows as up to ~1e-12 there; the check passes by the absolute 1e-14.

A failure prints the row with verified "NO (...)" and exits 1 without timing. Then the
float32 step is timed (parameters normal(0, 0.0002) of ``default_rng(1)``, one batch of
``default_rng(0)``; ``warmup`` steps dropped, ``repeats`` timed) and one JSON row is
printed (the protocol of ``seq_jax.py``: ``benchmarks/seq.py`` reads the last line).
Threads: torch's own (``torch.get_num_threads()``, set by OMP_NUM_THREADS), in the row.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

IMPLS = ("torch-eager", "torch-compile")


def _model(torch, kind, mask, clip, d, sizes, tie):
    """loss(flat, X, Y): the sequence loss of the model whose parameter sets are the
    consecutive groups of ``sizes`` leaves of the flat list ``flat`` (layer k uses set
    ``tie[k]``)."""

    def proj(E, W):                                                     # (B, T, D), (H, k, D) -> (B, H, T, k)
        return torch.einsum("btd,hkd->bhtk", E, W)

    def causal_attend(qr, k, v, E, P):
        T = E.shape[1]
        S = (qr @ k.transpose(-1, -2)) * torch.ones(T, T, dtype=E.dtype, device=E.device).tril()
        return E + torch.einsum("bhtv,hdv->btd", S @ v, P)

    def lsa(E, p):
        W_Q, W_K, W_V, P = p
        out = causal_attend(proj(E, W_Q), proj(E, W_K), proj(E, W_V), E, P)
        return out.clamp(-clip, clip) if clip is not None else out

    def mesa(E, p):
        W_Q, W_K, W_V, P, lam = p
        q, k, v = proj(E, W_Q), proj(E, W_K), proj(E, W_V)
        Kd = q.shape[-1]
        eye = torch.eye(Kd, dtype=E.dtype, device=E.device)
        # A_t = I / lam + sum_{s<=t} k_s k_s^T: (B, H, T, Kd, Kd)
        A = torch.cumsum(k[..., :, None] * k[..., None, :], dim=2) + (eye / lam[:, None, None])[None, :, None]
        qt = torch.linalg.solve(A, q[..., None])[..., 0]                # (B, H, T, Kd) A_t^{-1} q_t
        return causal_attend(qt, k, v, E, P)

    layer = lsa if kind == "lsa" else mesa
    starts = np.cumsum((0,) + tuple(sizes)).tolist()

    def tokens(X):
        Xs = torch.cat([torch.zeros_like(X[:, :1]), X[:, :-1]], dim=1)
        E = torch.cat([torch.zeros_like(X), X, X, Xs], dim=2)           # [0, x_t, x_t, x_{t-1}]
        if mask:
            E = torch.cat([torch.zeros_like(E[:, :, :mask]), E[:, :, mask:]], dim=2)
        return E

    def loss(flat, X, Y):
        sets = [flat[starts[i]:starts[i + 1]] for i in range(len(sizes))]
        E = tokens(X)
        for i in tie:
            E = layer(E, sets[i])
        err = E[:, :, :d] - Y
        return 0.5 * torch.mean(torch.sum(err * err, dim=2))

    return loss


class _EagerStep:
    """``loss.backward()``, ``clip_grad_value_``, ``torch.optim.AdamW.step()``."""

    def __init__(self, torch, loss, leaves, hp):
        self.torch, self.loss = torch, loss
        self.params = [torch.tensor(a, requires_grad=True) for a in leaves]
        self.clip = hp.clip_value
        self.opt = torch.optim.AdamW(self.params, lr=hp.lr, betas=(hp.b1, hp.b2), eps=hp.eps,
                                     weight_decay=hp.weight_decay)

    def __call__(self, X, Y, keep_grads=False):
        self.opt.zero_grad(set_to_none=True)
        L = self.loss(self.params, X, Y)
        L.backward()
        g = [p.grad.detach().clone() for p in self.params] if keep_grads else None
        self.torch.nn.utils.clip_grad_value_(self.params, self.clip)
        self.opt.step()
        return L.detach(), g

    def leaves(self):
        return [p.detach().numpy().copy() for p in self.params]


class _CompiledStep:
    """One ``torch.compile(fullgraph=True)`` function (params, m, v, t, X, Y) ->
    (params, m, v, loss, raw grads)."""

    def __init__(self, torch, loss, leaves, hp):
        self.torch = torch
        b1, b2, eps, lr, wd, ce = hp.b1, hp.b2, hp.eps, hp.lr, hp.weight_decay, hp.clip_value

        def step(params, m, v, t, X, Y):
            g, L = torch.func.grad_and_value(loss)(params, X, Y)
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t
            out_p, out_m, out_v = [], [], []
            for p, m_, v_, g_ in zip(params, m, v, g):
                gc = g_.clamp(-ce, ce)
                m_ = b1 * m_ + (1 - b1) * gc
                v_ = b2 * v_ + (1 - b2) * gc * gc
                out_p.append(p - lr * ((m_ / c1) / (torch.sqrt(v_ / c2) + eps) + wd * p))
                out_m.append(m_)
                out_v.append(v_)
            return out_p, out_m, out_v, L, g

        cfg = torch._dynamo.config           # the float64 and float32 graphs share one code object
        for name in ("recompile_limit", "cache_size_limit"):
            if getattr(cfg, name, 1 << 30) < 16:
                setattr(cfg, name, 16)
        self._step = torch.compile(step, fullgraph=True, dynamic=False)
        self.params = [torch.tensor(a) for a in leaves]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def __call__(self, X, Y, keep_grads=False):
        self.t += 1
        t = self.torch.tensor(float(self.t), dtype=self.params[0].dtype)
        self.params, self.m, self.v, L, g = self._step(self.params, self.m, self.v, t, X, Y)
        return L, (list(g) if keep_grads else None)

    def leaves(self):
        return [p.detach().numpy().copy() for p in self.params]


def probe_compile(torch):
    """None if torch.compile (inductor, CPU) compiles a probe function correctly here, else why not."""
    try:
        f = lambda a, b: torch.sum(torch.sin(a) * b)                    # noqa: E731
        a, b = torch.ones(3), torch.full((3,), 2.0)
        if not torch.allclose(torch.compile(f, fullgraph=True)(a, b), f(a, b)):
            return "torch.compile gave a wrong result on a probe function"
    except Exception as exc:  # noqa: BLE001  (no compiler, inductor broken, ...)
        return f"torch.compile failed on a probe function: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def build(torch, name, impl, params, model=None):
    """The step of ``impl`` for config ``name`` starting at the parameter tree ``params``
    (the reference's: a tuple of per-set NamedTuples, flattened in ``tree_leaves`` order);
    ``model`` overrides the config's model options (kind, mask; for tests)."""
    from benchmarks.seq import CONFIGS, problem
    from reference.tree import tree_leaves

    cfg = CONFIGS[name]
    arch, hp, _ = problem(cfg)
    m = dict(cfg, **(model or {}))
    clip = arch.option("clip") if m["kind"] == "lsa" else None
    if any(a is None for q in params for a in q):
        raise ValueError("the peer's models have no optional (None) parameter fields")
    loss = _model(torch, m["kind"], m["mask"], clip, 10, [len(q) for q in params], tuple(arch.tie))
    return (_EagerStep if impl == "torch-eager" else _CompiledStep)(torch, loss, tree_leaves(params), hp)


def verify(torch, name, impl, B=None, model=None):
    """(ok, worst relative error of loss and gradients, worst of the two updates) of
    ``impl`` for config ``name`` in float64 (see the module docstring); ``B`` overrides the
    batch (tests)."""
    from benchmarks.seq import CONFIGS, problem
    from reference import seq_training as S
    from reference.optim import adam_apply, adam_init
    from reference.sequences import code_tokens, seq_loss_and_grads
    from reference.tolerances import tolerance
    from reference.tree import tree_leaves

    cfg = CONFIGS[name]
    arch, hp, spec = problem(cfg)
    seqs = spec.sample(np.random.default_rng(7), B=B)
    p64 = S.init_normal(arch, 40, 0.05, np.random.default_rng(8), np.float64)
    L0, g0, _ = seq_loss_and_grads(code_tokens(seqs.X), seqs.Y, p64, arch, 10, cfg["mask"])
    tol = tolerance(np.float64, "algebra")

    def rel(x, y):
        diff = np.abs(np.asarray(x, np.float64) - y)
        scale = np.abs(y).max()
        return bool(np.all(diff <= tol.atol + tol.rtol * scale)), float(diff.max() / max(scale, 1e-300))

    st = build(torch, name, impl, p64, model)
    X, Y = torch.tensor(seqs.X), torch.tensor(seqs.Y)
    params, state = p64, adam_init(p64)
    ok, worst_g, worst_u = True, 0.0, 0.0
    for i in range(2):
        before = st.leaves()
        L1, g1 = st(X, Y, keep_grads=True)
        g1 = [g.detach().numpy() for g in g1]
        if i == 0:                                                      # 1. loss and gradients
            worst_g = abs(float(L1) - float(L0)) / abs(float(L0))
            ok &= worst_g <= tol.atol + tol.rtol * abs(float(L0))
            for x, y in zip(g1, tree_leaves(g0)):
                o, w = rel(x, y)
                ok, worst_g = ok and o, max(worst_g, w)
        # 2. the update, against the reference's optimiser on the peer's own gradients
        params = tuple(type(q)(*vals) for q, vals in zip(params, _groups(before, params)))
        grads = tuple(type(q)(*vals) for q, vals in zip(params, _groups(g1, params)))
        ref_new, state, _ = adam_apply(params, grads, state, hp)
        for a, b, r in zip(st.leaves(), before, tree_leaves(ref_new)):
            o, w = rel(a - b, r - b)
            ok, worst_u = ok and o, max(worst_u, w)
    return ok, worst_g, worst_u


def _groups(flat, like):
    """``flat`` regrouped as the fields of the parameter tree ``like`` (no None fields)."""
    out, i = [], 0
    for q in like:
        out.append(flat[i:i + len(q)])
        i += len(q)
    return out


def time_step(torch, name, impl, repeats, warmup):
    from benchmarks.seq import CONFIGS, problem
    from reference import seq_training as S

    arch, _, spec = problem(CONFIGS[name])
    st = build(torch, name, impl, S.init_normal(arch, 40, 0.0002, np.random.default_rng(1), np.float32))
    sq = spec.sample(np.random.default_rng(0), dtype=np.float32)
    X, Y = torch.tensor(sq.X), torch.tensor(sq.Y)
    t0 = time.perf_counter()
    st(X, Y)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        st(X, Y)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        float(st(X, Y)[0])                                              # the loss: the step is done
        ts.append((time.perf_counter() - t) * 1e3)
    return dict(median_ms=round(float(np.median(ts)), 3), p10_ms=round(float(np.percentile(ts, 10)), 3),
                p90_ms=round(float(np.percentile(ts, 90)), 3), sample_ms="nan", first_s=round(first, 3))


def main(argv=None):
    from benchmarks.seq import CONFIGS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers.seq_torch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--impl", default="torch-eager", choices=IMPLS)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    row = dict(config=a.config, impl=a.impl, load=f"{os.getloadavg()[0]:.1f}", torch=torch.__version__,
               torch_threads=torch.get_num_threads())
    if a.impl == "torch-compile":
        why = probe_compile(torch)
        if why is not None:
            row.update(verified=f"skipped ({why})")
            print(json.dumps(row))
            return 0
    try:
        ok, worst_g, worst_u = verify(torch, a.config, a.impl)
    except Exception as exc:  # noqa: BLE001  (a compile error of the model is a failure, shown in the row)
        row.update(verified=f"NO ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
        print(json.dumps(row))
        return 1
    if not ok:
        row.update(verified=f"NO (f64 {worst_g:.1e}, update {worst_u:.1e})")
        print(json.dumps(row))
        return 1
    row.update(time_step(torch, a.config, a.impl, a.repeats, a.warmup))
    row.update(verified=f"yes (f64 {worst_g:.1e}, update {worst_u:.1e})",
               load=f"{row['load']}/{os.getloadavg()[0]:.1f}")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
