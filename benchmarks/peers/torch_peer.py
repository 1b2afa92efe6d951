"""PyTorch peer of one LSA training step (eager and ``torch.compile``).

torch is imported lazily; constructing a peer without torch installed raises
ImportError.  Everything runs on the CPU in float32.

Parameters are held as ONE tensor of shape (K, 4, D, D) (per layer W_Q, W_K,
W_V, P), so gradient clipping and Adam are a handful of tensor ops instead of
4K little ones (what torch.optim's foreach/fused paths achieve by other
means).  ``get_params``/``set_params``/``grads`` expose the usual flat list of
4K (D, D) arrays, ordered layer by layer as W_Q, W_K, W_V, P.

Eager mode: forward in plain torch, gradient by ``torch.autograd.grad``, clip
and Adam written by hand.

Compile mode: the WHOLE update (forward + loss + gradient via
``torch.func.grad_and_value`` + global-norm clip + Adam) is a single
``torch.compile(fullgraph=True, dynamic=False)`` function of (params, m, v, t, X, Y, xq, yq).
Task sampling (``torch.Generator``-driven) stays eager, because dynamo does
not trace explicit generators; it is a few RNG kernels.  If the full-graph
compile ever fails at first call, the peer falls back to compiling only the
loss function (gradient through the compiled graph's AOT backward, clip and
Adam eager) and records that in ``self.compile_mode``.
"""

from __future__ import annotations

import numpy as np

from ._common import B1, B2, EPS, TRUNC, derive


def _torch():
    try:
        import torch  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on environment
        raise ImportError(f"torch is not available: {exc}") from exc
    return torch


def _lsa_loss(torch, params, X, Y, xq, yq, form: str, clamp: bool):
    """0.5 * mean (pred - y_q)^2 for params of shape (K, 4, D, D)."""
    B, N, _ = X.shape
    E_ctx = torch.cat([X, Y], dim=2)  # (B, N, D)
    E_q = torch.cat([xq, torch.zeros_like(xq[:, :1])], dim=1)[:, None, :]
    E = torch.cat([E_ctx, E_q], dim=1)  # (B, T, D)
    for layer in range(params.shape[0]):
        Wq, Wk, Wv, P = params[layer, 0], params[layer, 1], params[layer, 2], params[layer, 3]
        ctx = E[:, :N, :]
        if form == "attn":
            q = E @ Wq.T  # (B, T, D)
            k = ctx @ Wk.T  # (B, N, D)
            v = ctx @ Wv.T  # (B, N, D)
            scores = q @ k.transpose(1, 2)  # (B, T, N)
            E = E + (scores @ v) @ P.T
        else:  # "cov"
            C = ctx.transpose(1, 2) @ ctx  # (B, D, D)
            M = (P @ Wv) @ C @ (Wk.T @ Wq)  # (B, D, D)
            E = E + E @ M.transpose(1, 2)
        if clamp:
            E = torch.clamp(E, -10.0, 10.0)
    pred = -E[:, N, -1]
    err = pred - yq.reshape(-1)
    return 0.5 * torch.mean(err * err)


def _clip_adam(torch, params, g, m, v, t, clip: float, lr: float):
    """Global-norm clip of g, then one bias-corrected Adam step. Functional."""
    norm = torch.sqrt(torch.sum(g * g))
    g = g * torch.clamp(clip / norm, max=1.0)
    t = t + 1.0
    m = B1 * m + (1.0 - B1) * g
    v = B2 * v + (1.0 - B2) * (g * g)
    m_hat = m / (1.0 - B1 ** t)
    v_hat = v / (1.0 - B2 ** t)
    params = params - lr * m_hat / (torch.sqrt(v_hat) + EPS)
    return params, m, v, t


def _raise_recompile_limit(torch, at_least: int = 128) -> None:
    """Every peer's compiled closures share code objects, and dynamo keeps at
    most ``recompile_limit`` (default 8) specialisations per code object before
    silently running it eagerly.  A benchmark builds peers for several configs,
    forms and (in verification) batch shapes in one process, so raise it."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < at_least:
            setattr(cfg, name, at_least)


class TorchPeer:
    """One LSA training step in PyTorch. ``form`` in {"attn", "cov"}."""

    def __init__(self, cfg: dict, seed: int = 0, form: str = "attn", compile: bool = False):
        torch = _torch()
        if form not in ("attn", "cov"):
            raise ValueError(form)
        self.torch = torch
        self.cfg = c = derive(cfg)
        self.form = form
        self.compiled = bool(compile)
        self.name = f"torch-{'compile' if compile else 'eager'}-{form}"
        self.gen = torch.Generator().manual_seed(int(seed))
        std = c["init_std"]
        p = torch.empty((c["K"], 4, c["D"], c["D"]), dtype=torch.float32)
        torch.nn.init.trunc_normal_(p, mean=0.0, std=std, a=-TRUNC * std, b=TRUNC * std, generator=self.gen)
        self.params = p
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)
        self.t = torch.zeros((), dtype=torch.float32)
        self._loss = torch.full((), float("nan"))

        clamp, clip, lr = c["clamp"], c["clip"], c["lr"]

        def loss_fn(params, X, Y, xq, yq):
            return _lsa_loss(torch, params, X, Y, xq, yq, form, clamp)

        compiled = self.compiled

        def value_and_grad(params, X, Y, xq, yq):
            if compiled:
                g, loss = torch.func.grad_and_value(loss_fn)(params, X, Y, xq, yq)
                return loss, g
            with torch.enable_grad():
                pl = params.detach().requires_grad_(True)
                loss = loss_fn(pl, X, Y, xq, yq)
                (g,) = torch.autograd.grad(loss, pl)
            return loss.detach(), g

        def clip_adam(params, g, m, v, t):
            return _clip_adam(torch, params, g, m, v, t, clip, lr)

        def update(params, m, v, t, X, Y, xq, yq):
            loss, g = value_and_grad(params, X, Y, xq, yq)
            params, m, v, t = clip_adam(params, g, m, v, t)
            return params, m, v, t, loss

        self._loss_fn = loss_fn
        self._value_and_grad = value_and_grad
        self._clip_adam = clip_adam
        if self.compiled:
            _raise_recompile_limit(torch)
            cc = dict(fullgraph=True, dynamic=False)
            self.compile_mode = "full-step"
            self._update = torch.compile(update, **cc)
            # Separately compiled pieces, for parts() and the verification
            # helpers (torch.compile is lazy: nothing compiles until called).
            self._loss_fn_c = torch.compile(loss_fn, **cc)
            self._vg_c = torch.compile(value_and_grad, **cc)
            self._clip_adam_c = torch.compile(clip_adam, **cc)
        else:
            self.compile_mode = None
            self._update = update
            self._loss_fn_c, self._vg_c, self._clip_adam_c = loss_fn, value_and_grad, clip_adam

    # -- sampling ---------------------------------------------------------
    def sample(self):
        torch, c, g = self.torch, self.cfg, self.gen
        B, N, d = c["B"], c["N"], c["d"]
        W = torch.randn((B, 1, d), generator=g)
        X = torch.rand((B, N, d), generator=g) - 0.5
        xq = torch.rand((B, d), generator=g) - 0.5
        Y = X @ W.transpose(1, 2)  # (B, N, 1)
        yq = (W @ xq[:, :, None])[:, :, 0]  # (B, 1)
        return X, Y, xq, yq

    # -- training ---------------------------------------------------------
    def _apply(self, batch):
        try:
            out = self._update(self.params, self.m, self.v, self.t, *batch)
        except Exception:
            if not self.compiled or self.compile_mode != "full-step":
                raise
            # Fallback: compiled loss only, eager gradient plumbing / Adam.
            import traceback
            import warnings

            warnings.warn(f"{self.name}: full-step torch.compile failed, falling back to compiling the "
                          f"loss only:\n{traceback.format_exc(limit=3)}")
            self.compile_mode = "loss-only"
            torch = self.torch
            loss_c = self._loss_fn_c

            def vg(params, X, Y, xq, yq):
                with torch.enable_grad():
                    pl = params.detach().requires_grad_(True)
                    loss = loss_c(pl, X, Y, xq, yq)
                    (g,) = torch.autograd.grad(loss, pl)
                return loss.detach(), g

            def update(params, m, v, t, X, Y, xq, yq):
                loss, g = vg(params, X, Y, xq, yq)
                return (*self._clip_adam(params, g, m, v, t), loss)

            self._value_and_grad = self._vg_c = vg
            self._update = update
            out = self._update(self.params, self.m, self.v, self.t, *batch)
        self.params, self.m, self.v, self.t, self._loss = out

    def step(self) -> None:
        """One full training step (sample, forward, backward, clip, Adam)."""
        self._apply(self.sample())

    def step_on(self, X, Y, xq, yq) -> None:
        """One training step on given numpy task arrays (for verification)."""
        self._apply(self._to_torch(X, Y, xq, yq))

    def loss(self) -> float:
        return float(self._loss)

    # -- separately timeable parts ---------------------------------------
    def parts(self) -> dict:
        torch = self.torch
        batch = self.sample()
        fwd, vg, ca = self._loss_fn_c, self._vg_c, self._clip_adam_c
        _, g = vg(self.params, *batch)
        g = g.detach().clone()

        def p_sample():
            self.sample()

        def p_forward():
            fwd(self.params, *batch)

        def p_backward():
            vg(self.params, *batch)

        def p_adam():
            ca(self.params, g, self.m, self.v, self.t)

        return {"sample": p_sample, "forward": p_forward, "backward": p_backward, "adam": p_adam}

    # -- verification helpers --------------------------------------------
    def _to_torch(self, X, Y, xq, yq):
        torch, c = self.torch, self.cfg
        f = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))
        B = np.shape(X)[0]
        return f(X), f(np.reshape(Y, (B, -1, 1))), f(xq), f(np.reshape(yq, (B, 1)))

    def get_params(self) -> list:
        p = self.params.detach().numpy()
        return [np.array(p[l, i], dtype=np.float32) for l in range(p.shape[0]) for i in range(4)]

    def set_params(self, params) -> None:
        c = self.cfg
        arr = np.asarray(params, dtype=np.float32).reshape(c["K"], 4, c["D"], c["D"])
        self.params = self.torch.tensor(arr)

    def forward_loss(self, X, Y, xq, yq) -> float:
        return float(self._loss_fn_c(self.params, *self._to_torch(X, Y, xq, yq)))

    def grads(self, X, Y, xq, yq) -> list:
        _, g = self._vg_c(self.params, *self._to_torch(X, Y, xq, yq))
        g = g.detach().numpy()
        return [np.array(g[l, i], dtype=np.float32) for l in range(g.shape[0]) for i in range(4)]
