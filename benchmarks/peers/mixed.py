"""PyTorch and JAX peers of the mixed-stack training steps (``benchmarks/mixed.py``).

Two models, float32, on the CPU:

* ``sine``: tokens (x, y) of width 2 -> linear embedding to 40 (no bias) -> residual
  MLP 40 -> 160 -> 40 with biases and tanh GELU -> one LSA layer (one head, key 40),
  prediction minus feature 39 of the query token; sine tasks y = a sin(x + rho) with the
  official code's tied draw (a = 0.1 + 0.4 u, rho = pi u), x ~ U(-5, 5);
* ``softmax``: one softmax attention layer (``heads`` heads, key and value size D) on
  linear-regression tokens of width d + 1, context-only, logits q . k / sqrt(D).

Each step draws B tasks with the framework's own generator, computes the loss and its
gradient (autograd), clips by global norm and applies Adam, as our backends do. The
parameters are a list of arrays in the order of ``reference.tree.tree_leaves`` of the
reference's params (embed W; mlp W_1, b_1, W_2, b_2; lsa or softmax W_Q, W_K, W_V, P),
so ``set_params`` takes the reference's initial params and ``grads`` can be compared
with the reference's gradients (``benchmarks/mixed.py`` verifies before it times).

    torch-eager     plain torch, gradient by torch.autograd.grad
    torch-compile   the whole update in one torch.compile(fullgraph=True) function
    jax-jit         the whole step (sampling included) in one jax.jit function

torch and jax are imported lazily.
"""

from __future__ import annotations

import math

import numpy as np

from ._common import B1, B2, EPS

MIXED_PEER_NAMES = ("torch-eager", "torch-compile", "jax-jit")


def _loss(ops, params, X, Y, xq, yq, model, heads):
    """0.5 * mean (pred - y_q)^2 of ``model``; ``ops`` (cat, swap, gelu, rowmax, rowsum, exp)
    of torch or jax.numpy."""
    cat, swap, gelu, rowmax, rowsum, exp = ops
    B, N, _ = X.shape
    E = cat([cat([X, Y], 2), cat([xq, 0.0 * xq[:, :1]], 1)[:, None, :]], 1)   # (B, T, d+1)
    if model == "sine":
        W_e, W_1, b_1, W_2, b_2, W_Q, W_K, W_V, P = params
        E = E @ W_e.T                                                  # (B, T, 40)
        E = E + gelu(E @ W_1.T + b_1) @ W_2.T + b_2                    # residual MLP
        ctx = E[:, :N]
        q, k, v = E @ W_Q[0].T, ctx @ W_K[0].T, ctx @ W_V[0].T
        E = E + ((q @ swap(k)) @ v) @ P[0].T                           # LSA, context-only
    else:
        W_Q, W_K, W_V, P = params
        ctx = E[:, :N]
        delta = 0.0
        for h in range(heads):
            q, k, v = E @ W_Q[h].T, ctx @ W_K[h].T, ctx @ W_V[h].T
            z = (q @ swap(k)) * (1.0 / math.sqrt(W_Q.shape[1]))       # (B, T, N) logits
            a = exp(z - rowmax(z))
            delta = delta + ((a / rowsum(a)) @ v) @ P[h].T
        E = E + delta
    pred = -E[:, N, -1]
    err = pred - yq.reshape(-1)
    return 0.5 * (err * err).mean()


def _torch_ops(torch):
    return (lambda xs, ax: torch.cat(xs, dim=ax), lambda a: a.transpose(1, 2),
            lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
            lambda z: z.amax(dim=-1, keepdim=True), lambda a: a.sum(dim=-1, keepdim=True), torch.exp)


def _jax_ops(jax, jnp):
    return (lambda xs, ax: jnp.concatenate(xs, axis=ax), lambda a: jnp.swapaxes(a, 1, 2),
            lambda x: jax.nn.gelu(x, approximate=True),
            lambda z: z.max(axis=-1, keepdims=True), lambda a: a.sum(axis=-1, keepdims=True), jnp.exp)


class TorchMixedPeer:
    def __init__(self, model, cfg, params0, hp, seed=0, compile=False):
        import torch

        self.torch, self.model, self.cfg, self.hp = torch, model, cfg, hp
        self.name = "torch-compile" if compile else "torch-eager"
        self.gen = torch.Generator().manual_seed(int(seed))
        self.set_params(params0)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self._loss = float("nan")
        heads = cfg.get("heads", 1)
        ops = _torch_ops(torch)
        self._loss_fn = loss_fn = lambda ps, *data: _loss(ops, ps, *data, model, heads)  # noqa: E731
        lr, clip = hp.lr, hp.clip_norm

        def update(params, m, v, t, X, Y, xq, yq):
            if compile:
                gs, loss = torch.func.grad_and_value(loss_fn)(params, X, Y, xq, yq)
            else:
                with torch.enable_grad():
                    ps = [p.detach().requires_grad_(True) for p in params]
                    loss = loss_fn(ps, X, Y, xq, yq)
                    gs = torch.autograd.grad(loss, ps)
            norm = torch.sqrt(sum((g * g).sum() for g in gs))
            scale = torch.clamp(clip / norm, max=1.0) if clip is not None else 1.0
            out_p, out_m, out_v = [], [], []
            for p, mm, vv, g in zip(params, m, v, gs):
                g = g * scale
                mm = B1 * mm + (1 - B1) * g
                vv = B2 * vv + (1 - B2) * g * g
                out_p.append(p - lr * (mm / (1 - B1 ** t)) / (torch.sqrt(vv / (1 - B2 ** t)) + EPS))
                out_m.append(mm)
                out_v.append(vv)
            return out_p, out_m, out_v, loss.detach()

        self._update = torch.compile(update, fullgraph=True, dynamic=False) if compile else update

    def sample(self):
        torch, c, g = self.torch, self.cfg, self.gen
        B, N = c["B"], c["N"]
        if self.model == "sine":
            u = torch.rand((B, 1, 1), generator=g)
            a, rho = 0.1 + 0.4 * u, math.pi * u
            X = torch.rand((B, N, 1), generator=g) * 10.0 - 5.0
            xq = torch.rand((B, 1), generator=g) * 10.0 - 5.0
            return X, a * torch.sin(X + rho), xq, a[:, 0] * torch.sin(xq + rho[:, 0])
        d = c["d"]
        W = torch.randn((B, 1, d), generator=g)
        X = torch.rand((B, N, d), generator=g) - 0.5
        xq = torch.rand((B, d), generator=g) - 0.5
        return X, X @ W.transpose(1, 2), xq, (W @ xq[:, :, None])[:, :, 0]

    def step(self):
        self.t += 1
        t = self.torch.tensor(float(self.t))
        self.params, self.m, self.v, loss = self._update(self.params, self.m, self.v, t, *self.sample())
        self._loss = float(loss)

    def loss(self):
        return self._loss

    def set_params(self, arrays):
        self.params = [self.torch.tensor(np.asarray(a, np.float32)) for a in arrays]

    def _data(self, X, Y, xq, yq):
        return [self.torch.tensor(np.asarray(a, np.float32)) for a in (X, Y, xq, yq)]

    def forward_loss(self, X, Y, xq, yq):
        return float(self._loss_fn(self.params, *self._data(X, Y, xq, yq)))

    def grads(self, X, Y, xq, yq):
        torch = self.torch
        with torch.enable_grad():
            ps = [p.detach().requires_grad_(True) for p in self.params]
            gs = torch.autograd.grad(self._loss_fn(ps, *self._data(X, Y, xq, yq)), ps)
        return [g.numpy() for g in gs]

    def threads(self):
        return dict(torch_threads=self.torch.get_num_threads(), torch=self.torch.__version__)


class JaxMixedPeer:
    def __init__(self, model, cfg, params0, hp, seed=0):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.model, self.cfg = jax, jnp, model, cfg
        self.name = "jax-jit"
        heads = cfg.get("heads", 1)
        HI = jax.lax.Precision.HIGHEST
        ops = _jax_ops(jax, jnp)
        self._loss_fn = lambda ps, *data: _loss(ops, ps, *data, model, heads)  # noqa: E731
        B, N, lr, clip = cfg["B"], cfg["N"], hp.lr, hp.clip_norm

        def sample(key):
            k1, k2, k3 = jax.random.split(key, 3)
            if model == "sine":
                u = jax.random.uniform(k1, (B, 1, 1), jnp.float32)
                a, rho = 0.1 + 0.4 * u, jnp.pi * u
                X = jax.random.uniform(k2, (B, N, 1), jnp.float32, -5.0, 5.0)
                xq = jax.random.uniform(k3, (B, 1), jnp.float32, -5.0, 5.0)
                return X, a * jnp.sin(X + rho), xq, a[:, 0] * jnp.sin(xq + rho[:, 0])
            d = cfg["d"]
            W = jax.random.normal(k1, (B, 1, d), jnp.float32)
            X = jax.random.uniform(k2, (B, N, d), jnp.float32, -0.5, 0.5)
            xq = jax.random.uniform(k3, (B, d), jnp.float32, -0.5, 0.5)
            return X, jnp.matmul(X, jnp.swapaxes(W, 1, 2), precision=HI), xq, jnp.matmul(W, xq[:, :, None],
                                                                                         precision=HI)[:, :, 0]

        def step(params, m, v, t, key):
            key, sub = jax.random.split(key)
            loss, gs = jax.value_and_grad(self._loss_fn)(params, *sample(sub))
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in gs))
            scale = jnp.minimum(1.0, clip / norm) if clip is not None else 1.0
            gs = [g * scale for g in gs]
            m = [B1 * a + (1 - B1) * g for a, g in zip(m, gs)]
            v = [B2 * a + (1 - B2) * g * g for a, g in zip(v, gs)]
            params = [p - lr * (a / (1 - B1 ** t)) / (jnp.sqrt(b / (1 - B2 ** t)) + EPS)
                      for p, a, b in zip(params, m, v)]
            return params, m, v, loss, key

        with jax.default_matmul_precision("highest"):
            self._step = jax.jit(step)
            self._vg = jax.jit(jax.value_and_grad(self._loss_fn))
        self.set_params(params0)
        self.m = [jnp.zeros_like(p) for p in self.params]
        self.v = [jnp.zeros_like(p) for p in self.params]
        self.t = 0
        self.key = jax.random.PRNGKey(seed)
        self._loss = float("nan")

    def step(self):
        self.t += 1
        with self.jax.default_matmul_precision("highest"):
            self.params, self.m, self.v, loss, self.key = self._step(self.params, self.m, self.v,
                                                                     float(self.t), self.key)
        self._loss = float(loss.block_until_ready())

    def loss(self):
        return self._loss

    def set_params(self, arrays):
        self.params = [self.jnp.asarray(np.asarray(a, np.float32)) for a in arrays]

    def _data(self, X, Y, xq, yq):
        return [self.jnp.asarray(np.asarray(a, np.float32)) for a in (X, Y, xq, yq)]

    def forward_loss(self, X, Y, xq, yq):
        with self.jax.default_matmul_precision("highest"):
            return float(self._vg(self.params, *self._data(X, Y, xq, yq))[0])

    def grads(self, X, Y, xq, yq):
        with self.jax.default_matmul_precision("highest"):
            return [np.asarray(g) for g in self._vg(self.params, *self._data(X, Y, xq, yq))[1]]

    def threads(self):
        return dict(jax=self.jax.__version__, jax_devices=[str(x) for x in self.jax.devices()])


def available_mixed_peers():
    """(names that can run here, {name: why not})."""
    ok, why = [], {}
    try:
        import torch  # noqa: F401

        ok += ["torch-eager", "torch-compile"]
    except Exception as exc:  # noqa: BLE001
        why.update({n: f"torch not importable: {exc}" for n in ("torch-eager", "torch-compile")})
    try:
        import jax  # noqa: F401

        ok.append("jax-jit")
    except Exception as exc:  # noqa: BLE001
        why["jax-jit"] = f"jax not importable: {exc}"
    return ok, why


def make_mixed_peer(name, model, cfg, params0, hp, seed=0):
    if name not in MIXED_PEER_NAMES:
        raise ValueError(f"unknown mixed-stack peer {name!r}; known: {', '.join(MIXED_PEER_NAMES)}")
    if name.startswith("torch"):
        return TorchMixedPeer(model, cfg, params0, hp, seed=seed, compile=(name == "torch-compile"))
    return JaxMixedPeer(model, cfg, params0, hp, seed=seed)
