"""JAX peer of one LSA training step: ``jax.jit`` over the whole step.

jax is imported lazily; constructing a peer without jax installed raises
ImportError.  float32 throughout; matmuls request HIGHEST precision so that
accelerator backends do not silently drop to TF32/bf16 passes.

Parameters are a list of 4K (D, D) arrays ordered layer by layer as W_Q, W_K,
W_V, P.  The training step is ONE jitted function
``(params, opt_state, key) -> (params, opt_state, loss)`` that samples the
tasks with ``jax.random``, computes loss and gradient with
``jax.value_and_grad``, clips by global norm and applies a hand-written Adam.
"""

from __future__ import annotations

import numpy as np

from ._common import B1, B2, EPS, TRUNC, derive


def _jax():
    try:
        import jax
        import jax.numpy as jnp
    except Exception as exc:  # pragma: no cover - depends on environment
        raise ImportError(f"jax is not available: {exc}") from exc
    return jax, jnp


class JaxPeer:
    """One LSA training step in JAX. ``form`` in {"attn", "cov"}."""

    def __init__(self, cfg: dict, seed: int = 0, form: str = "attn"):
        jax, jnp = _jax()
        if form not in ("attn", "cov"):
            raise ValueError(form)
        self.jax, self.jnp = jax, jnp
        self.cfg = c = derive(cfg)
        self.form = form
        self.name = f"jax-jit-{form}"
        B, N, d, D, K = c["B"], c["N"], c["d"], c["D"], c["K"]
        clamp, clip, lr = c["clamp"], c["clip"], c["lr"]
        HI = jax.lax.Precision.HIGHEST

        def mm(a, b):
            return jnp.matmul(a, b, precision=HI)

        def sample(key):
            kw, kx, kq = jax.random.split(key, 3)
            W = jax.random.normal(kw, (B, 1, d), jnp.float32)
            X = jax.random.uniform(kx, (B, N, d), jnp.float32, -0.5, 0.5)
            xq = jax.random.uniform(kq, (B, d), jnp.float32, -0.5, 0.5)
            Y = mm(X, jnp.swapaxes(W, 1, 2))  # (B, N, 1)
            yq = mm(W, xq[:, :, None])[:, :, 0]  # (B, 1)
            return X, Y, xq, yq

        def loss_fn(params, X, Y, xq, yq):
            n = X.shape[1]
            E_ctx = jnp.concatenate([X, Y], axis=2)
            E_q = jnp.concatenate([xq, jnp.zeros_like(xq[:, :1])], axis=1)[:, None, :]
            E = jnp.concatenate([E_ctx, E_q], axis=1)  # (B, T, D)
            for layer in range(K):
                Wq, Wk, Wv, P = params[4 * layer: 4 * layer + 4]
                ctx = E[:, :n, :]
                if form == "attn":
                    q = mm(E, Wq.T)
                    k = mm(ctx, Wk.T)
                    v = mm(ctx, Wv.T)
                    scores = mm(q, jnp.swapaxes(k, 1, 2))  # (B, T, N)
                    E = E + mm(mm(scores, v), P.T)
                else:
                    C = mm(jnp.swapaxes(ctx, 1, 2), ctx)  # (B, D, D)
                    M = mm(mm(mm(P, Wv), C), mm(Wk.T, Wq))
                    E = E + mm(E, jnp.swapaxes(M, 1, 2))
                if clamp:
                    E = jnp.clip(E, -10.0, 10.0)
            pred = -E[:, n, -1]
            err = pred - yq.reshape(-1)
            return 0.5 * jnp.mean(err * err)

        value_and_grad = jax.value_and_grad(loss_fn)

        def clip_adam(params, grads, opt):
            m, v, t = opt
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads))
            scale = jnp.minimum(1.0, clip / norm)
            grads = [g * scale for g in grads]
            t = t + 1.0
            m = [B1 * mi + (1.0 - B1) * g for mi, g in zip(m, grads)]
            v = [B2 * vi + (1.0 - B2) * (g * g) for vi, g in zip(v, grads)]
            bc1 = 1.0 - B1 ** t
            bc2 = 1.0 - B2 ** t
            params = [p - lr * (mi / bc1) / (jnp.sqrt(vi / bc2) + EPS) for p, mi, vi in zip(params, m, v)]
            return params, (m, v, t)

        def update(params, opt, batch):
            loss, grads = value_and_grad(params, *batch)
            params, opt = clip_adam(params, grads, opt)
            return params, opt, loss

        def step(params, opt, key):
            return update(params, opt, sample(key))

        self._sample = jax.jit(sample)
        self._loss_fn = jax.jit(loss_fn)
        self._vg = jax.jit(value_and_grad)
        self._clip_adam = jax.jit(clip_adam)
        self._update = jax.jit(update)
        self._step = jax.jit(step)

        key = jax.random.PRNGKey(int(seed))
        key, kinit = jax.random.split(key)
        std = c["init_std"]
        ks = jax.random.split(kinit, 4 * K)
        self.params = [std * jax.random.truncated_normal(k, -TRUNC, TRUNC, (D, D), jnp.float32) for k in ks]
        self.opt = ([jnp.zeros((D, D), jnp.float32) for _ in range(4 * K)],
                    [jnp.zeros((D, D), jnp.float32) for _ in range(4 * K)],
                    jnp.zeros((), jnp.float32))
        self.key = key
        self._loss = jnp.float32(np.nan)

    # -- training ---------------------------------------------------------
    def step(self) -> None:
        """One full jitted training step; blocks until done."""
        self.key, sub = self.jax.random.split(self.key)
        self.params, self.opt, self._loss = self._step(self.params, self.opt, sub)
        self._loss.block_until_ready()
        self.jax.block_until_ready(self.params)

    def step_on(self, X, Y, xq, yq) -> None:
        """One training step on given numpy task arrays (for verification)."""
        self.params, self.opt, self._loss = self._update(self.params, self.opt, self._to_jax(X, Y, xq, yq))
        self.jax.block_until_ready(self.params)

    def loss(self) -> float:
        return float(self._loss)

    def sample(self):
        self.key, sub = self.jax.random.split(self.key)
        return self._sample(sub)

    # -- separately timeable parts ---------------------------------------
    def parts(self) -> dict:
        jax = self.jax
        batch = jax.block_until_ready(self.sample())
        _, grads = jax.block_until_ready(self._vg(self.params, *batch))
        key = self.key

        def p_sample():
            jax.block_until_ready(self._sample(key))

        def p_forward():
            self._loss_fn(self.params, *batch).block_until_ready()

        def p_backward():
            jax.block_until_ready(self._vg(self.params, *batch))

        def p_adam():
            jax.block_until_ready(self._clip_adam(self.params, grads, self.opt))

        return {"sample": p_sample, "forward": p_forward, "backward": p_backward, "adam": p_adam}

    # -- verification helpers --------------------------------------------
    def _to_jax(self, X, Y, xq, yq):
        jnp = self.jnp
        B = np.shape(X)[0]
        f = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))
        return f(X), f(np.reshape(Y, (B, -1, 1))), f(xq), f(np.reshape(yq, (B, 1)))

    def get_params(self) -> list:
        return [np.array(p, dtype=np.float32) for p in self.params]

    def set_params(self, params) -> None:
        jnp = self.jnp
        self.params = [jnp.asarray(np.asarray(p, dtype=np.float32)) for p in params]

    def forward_loss(self, X, Y, xq, yq) -> float:
        return float(self._loss_fn(self.params, *self._to_jax(X, Y, xq, yq)))

    def grads(self, X, Y, xq, yq) -> list:
        _, g = self._vg(self.params, *self._to_jax(X, Y, xq, yq))
        return [np.array(x, dtype=np.float32) for x in g]
