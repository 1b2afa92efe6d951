"""A PyTorch port of SPEC.md behind the adapter protocol (SPEC.md section 14): a porting guide.

    pip install torch
    icgd conformance verify.adapters.torch_adapter

Written from the spec alone, not from the reference: the LSA layer with ``torch.einsum``
(section 4), stacks and the loss (sections 3, 5, 6), the gradients from
``torch.autograd.grad`` (with the stored ``dout`` as the upstream gradient), the
constructions and baselines (sections 8, 9) and Adam (section 10) transcribed. What to
get right in PyTorch:

* float64: every tensor is made as ``torch.float64`` (the default dtype is set at
  import); PyTorch's default float32 fails every case at the vectors' rtol 1e-12;
* the clip as a select on the value, ``where(|pre| <= c, pre, sign(pre) c)``, so the
  gradient passes in full on the level (SPEC.md section 4);
* outputs back as NumPy arrays: ``.detach().numpy()``;
* the sampler and initialiser draw from NumPy's Generator (``_from_spec``): torch's
  generator is another stream, and the spec's numbers are NumPy's.

PyTorch is not a dependency of icgd; importing this file without it raises ImportError.
"""

import math

import numpy as np
import torch

from . import _from_spec
from ._from_spec import eta, init, tasks  # noqa: F401 -- kinds with no array work: NumPy's Generator, arithmetic

torch.set_default_dtype(torch.float64)               # the vectors are float64
NAME = f"PyTorch {torch.__version__} port (float64, autograd gradients)"


def _t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


def _out(x):
    """NumPy arrays (nested dicts and lists kept) for the kit."""
    if isinstance(x, dict):
        return {k: _out(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_out(v) for v in x]
    return x.detach().numpy() if isinstance(x, torch.Tensor) else x


def _leaves(layers, grad=True):
    """Tensors (requiring gradients) for a list of parameter dicts, and the flat list of them."""
    layers = [{n: _t(a, grad) for n, a in p.items()} for p in layers]
    return layers, [a for p in layers for a in p.values()]


def _regroup(flat, layers, prefix="d"):
    it = iter(flat)
    return [{prefix + n: next(it) for n in p} for p in layers]


def _clip(x, c):
    """clip(x, -c, c) as a select: the gradient passes in full where -c <= x <= c."""
    return x if math.isinf(c) else torch.where(x.abs() <= c, x, x.sign() * c)


def lsa(E, p, causal, clip):
    """One LSA layer (SPEC.md section 4): E (B, T, D), p {W_Q, W_K, W_V, P} or merged {W_KQ, W_PV}."""
    if "W_KQ" in p:                                                    # merged: W_K = P = I
        eye = torch.eye(E.shape[2]).expand(p["W_KQ"].shape)
        W_Q, W_K, W_V, P = p["W_KQ"], eye, p["W_PV"], eye
    else:
        W_Q, W_K, W_V, P = p["W_Q"], p["W_K"], p["W_V"], p["P"]
    T = E.shape[1]
    S = T if causal else T - 1                                         # keys and values: the context only
    q = torch.einsum("hkd,btd->bhtk", W_Q, E)                          # (B, H, T, Kd)
    k = torch.einsum("hkd,bsd->bhsk", W_K, E[:, :S])                   # (B, H, S, Kd)
    v = torch.einsum("hvd,bsd->bhsv", W_V, E[:, :S])                   # (B, H, S, Vd)
    A = torch.einsum("bhtk,bhsk->bhts", q, k)                          # no softmax, no scaling
    if causal:
        A = A * torch.tril(torch.ones(T, T))                           # i <= j, the diagonal included
    return _clip(E + torch.einsum("hdv,bhts,bhsv->btd", P, A, v), clip)


def forward(E, layers, K, recurrent, causal, clip):
    for k in range(K):
        E = lsa(E, layers[0 if recurrent else k], causal, clip)
    return E


def layer(E, dout, causal, clip, **params):
    E = _t(E, grad=True)
    (p,), flat = _leaves([params])
    out = lsa(E, p, causal, clip)
    dE, *dp = torch.autograd.grad(out, [E, *flat], grad_outputs=_t(dout))
    return _out({"out": out, "dE": dE, **_regroup(dp, [p])[0]})


def stack(E, layer, dout, K, recurrent, causal, clip):
    E = _t(E, grad=True)
    layers, flat = _leaves(layer)
    out = forward(E, layers, K, recurrent, causal, clip)
    dE, *dp = torch.autograd.grad(out, [E, *flat], grad_outputs=_t(dout))   # a shared set's gradients summed
    return _out({"out": out, "dE": dE, "layer": _regroup(dp, layers)})


def _loss(E, layers, y_q, d, K, recurrent, causal, clip):
    pred = -forward(E, layers, K, recurrent, causal, clip)[:, -1, d:]  # minus the query's y-slot
    return 0.5 * torch.mean(torch.sum((pred - y_q) ** 2, dim=1)), pred # summed over d_y, mean over tasks


def loss(E, y_q, layer, d, K, recurrent, causal, clip):
    E = _t(E, grad=True)
    layers, flat = _leaves(layer)
    L, pred = _loss(E, layers, _t(y_q), d, K, recurrent, causal, clip)
    dE, *dp = torch.autograd.grad(L, [E, *flat])
    return _out({"pred": pred, "L": L, "dE": dE, "layer": _regroup(dp, layers)})


def tokens(X, Y, x_q, W_0=None):
    """(x_i, y_i) for the context, (x_q, -W_0 x_q) for the query, last (SPEC.md section 3)."""
    slot = torch.zeros(X.shape[0], Y.shape[2]) if W_0 is None else -torch.einsum("ij,bj->bi", W_0, x_q)
    return torch.cat([torch.cat([X, Y], 2), torch.cat([x_q, slot], 1)[:, None]], 1)


def _blocks(d, d_y, x_block, W_0, P_x, P_y):
    """W_Q = W_K = [[I_d, 0], [0, 0]], W_V = [[x_block, 0], [W_0, -I]], P = diag(P_x I_d, P_y I_dy), one head."""
    D = d + d_y
    W_QK, W_V = torch.zeros(D, D), torch.zeros(D, D)
    W_QK[:d, :d] = torch.eye(d)
    W_V[:d, :d], W_V[d:, :d], W_V[d:, d:] = x_block, W_0, -torch.eye(d_y)
    P = torch.diag(torch.cat([torch.full((d,), P_x), torch.full((d_y,), P_y)]))
    return {"W_Q": W_QK[None], "W_K": W_QK[None].clone(), "W_V": W_V[None], "P": P[None]}


def gd_steps(X, Y, x_q, etas, W_0):
    """W_{k+1} = W_k - eta_k (1/N) sum_i (W_k x_i - y_i) x_i^T from W_0; returns (W_K x_q, W_K)."""
    W = W_0.expand((X.shape[0],) + W_0.shape[-2:])
    for eta in etas:
        W = W - eta / X.shape[1] * torch.einsum("bni,bnj->bij", torch.einsum("bij,bnj->bni", W, X) - Y, X)
    return torch.einsum("bij,bj->bi", W, x_q), W


def gd(X, Y, x_q, W_0, eta, K, recurrent):
    X, Y, x_q, W_0 = map(_t, (X, Y, x_q, W_0))
    d, d_y, N = X.shape[2], Y.shape[2], X.shape[1]
    layers = [_blocks(d, d_y, torch.zeros(d, d), W_0, eta / N, eta / N) for _ in range(1 if recurrent else K)]
    E = tokens(X, Y, x_q, W_0)
    out = forward(E, layers, K, recurrent, False, math.inf)
    pred_gd, W_gd = gd_steps(X, Y, x_q, [eta] * K, W_0)
    return _out({"E": E, "layer": layers, "out": out, "pred": -out[:, -1, d:], "pred_gd": pred_gd, "W_gd": W_gd})


def gdpp(X, Y, x_q, W_0, etas, gammas):
    X, Y, x_q, W_0 = map(_t, (X, Y, x_q, W_0))
    d, d_y, N = X.shape[2], Y.shape[2], X.shape[1]
    etas, gammas = [float(e) for e in etas], [float(g) for g in gammas]
    layers = [_blocks(d, d_y, torch.eye(d), W_0, -g, e / N) for e, g in zip(etas, gammas)]
    E = tokens(X, Y, x_q, W_0)
    out = forward(E, layers, len(layers), False, False, math.inf)
    x, y = torch.cat([X, x_q[:, None]], 1), torch.cat([Y, -torch.einsum("ij,bj->bi", W_0, x_q)[:, None]], 1)
    for e, g in zip(etas, gammas):                                     # the GD++ recursion, every token
        xc, yc = x[:, :N], y[:, :N]
        C = torch.einsum("bni,bnj->bij", xc, xc)                       # sum_i x_i x_i^T
        dW = -e / N * torch.einsum("bni,bnj->bij", torch.einsum("ij,bnj->bni", W_0, xc) - yc, xc)
        x, y = x - g * torch.einsum("bij,btj->bti", C, x), y - torch.einsum("bij,btj->bti", dW, x)
    return _out({"E": E, "layer": layers, "out": out, "pred": -out[:, -1, d:], "pred_gdpp": -y[:, -1]})


@torch.no_grad()
def adam_step(params, grads, m, v, t, lr, b1, b2, eps, clip_norm):
    """Global-norm clip, then Adam with bias correction for update t + 1 (SPEC.md section 10).
    params, grads, m, v: lists of {name: tensor}."""
    norm = torch.sqrt(sum(torch.sum(g * g) for gs in grads for g in gs.values()))
    scale = torch.clamp(clip_norm / norm, max=1.0)
    t = t + 1
    new_p, new_m, new_v = [], [], []
    for p, g, m_, v_ in zip(params, grads, m, v):
        new_m.append({n: b1 * m_[n] + (1 - b1) * g[n] * scale for n in p})
        new_v.append({n: b2 * v_[n] + (1 - b2) * (g[n] * scale) ** 2 for n in p})
        new_p.append({n: p[n] - lr * (new_m[-1][n] / (1 - b1 ** t)) / (torch.sqrt(new_v[-1][n] / (1 - b2 ** t)) + eps)
                      for n in p})
    return new_p, new_m, new_v, t, norm


def adam(layer, m, v, t, lr, b1, b2, eps, clip_norm):
    """``layer[k]`` holds the parameters (W_Q ...) and their gradients (dW_Q ...)."""
    params = [{n: _t(a) for n, a in p.items() if "d" + n in p} for p in layer]
    grads = [{n: _t(p["d" + n]) for n in q} for p, q in zip(layer, params)]
    m, v = ([{n: _t(a) for n, a in p.items()} for p in s["layer"]] for s in (m, v))
    new, m, v, t, norm = adam_step(params, grads, m, v, t, lr, b1, b2, eps, clip_norm)
    return _out({"new": {"layer": new}, "new_m": {"layer": m}, "new_v": {"layer": v}, "new_t": t, "grad_norm": norm})


def train(layer, seed, n_steps, d, N, d_y, B, x_range, w_scale, noise_std, n_distractors, K, recurrent, causal, clip,
          lr, b1, b2, eps, clip_norm):
    """Step s = 0, 1, ...: the tasks of default_rng([seed, s]), the loss and gradients before the update, Adam t = s + 1."""
    spec = dict(B=B, d=d, N=N, d_y=d_y, x_range=x_range, w_scale=w_scale, noise_std=noise_std,
                n_distractors=n_distractors)
    params = [{n: _t(a) for n, a in p.items()} for p in layer]
    m = [{n: torch.zeros_like(a) for n, a in p.items()} for p in params]
    v = [{n: torch.zeros_like(a) for n, a in p.items()} for p in params]
    t, steps, losses, norms = 0, [], [], []
    for s in range(n_steps):
        tk = _from_spec.step_tasks(seed, s, **spec)
        steps.append({k: tk[k] for k in ("X", "Y", "x_q", "y_q")})
        leaves = [{n: a.detach().requires_grad_() for n, a in p.items()} for p in params]
        L, _ = _loss(tokens(_t(tk["X"]), _t(tk["Y"]), _t(tk["x_q"])), leaves, _t(tk["y_q"]), d, K, recurrent, causal,
                     clip)
        grads = _regroup(torch.autograd.grad(L, [a for p in leaves for a in p.values()]), leaves, prefix="")
        params, m, v, t, norm = adam_step(params, grads, m, v, t, lr, b1, b2, eps, clip_norm)
        losses.append(L.detach())
        norms.append(norm)
    return _out({"losses": torch.stack(losses), "grad_norms": torch.stack(norms), "step": steps,
                 "final": {"layer": params}})


def baselines(X, Y, x_q, y_q, eta, n_steps, ridge, eta_grid):
    X, Y, x_q, y_q = map(_t, (X, Y, x_q, y_q))
    etas = [eta] * n_steps if isinstance(eta, float) else [float(e) for e in eta]   # one eta, or one per step
    W_0 = torch.zeros(Y.shape[2], X.shape[2])
    pred_gd, W_gd = gd_steps(X, Y, x_q, etas, W_0)
    C, XtY = torch.einsum("bni,bnj->bij", X, X), torch.einsum("bni,bnj->bij", X, Y)   # X^T X, X^T Y

    def ls(r):                                                         # W^T = (X^T X + r I)^-1 X^T Y; r = 0: pinv
        Wt = torch.linalg.solve(C + r * torch.eye(X.shape[2]), XtY) if r > 0 else torch.linalg.pinv(C) @ XtY
        return torch.einsum("bij,bi->bj", Wt, x_q)

    losses = torch.stack([0.5 * torch.mean(torch.sum((gd_steps(X, Y, x_q, [float(e)] * n_steps, W_0)[0] - y_q) ** 2,
                                                     dim=1)) for e in eta_grid])
    best = int(torch.argmin(torch.where(torch.isfinite(losses), losses, torch.inf)))   # the first of equal smallest
    return _out({"pred_gd": pred_gd, "W_gd": W_gd, "pred_ls": ls(0.0), "pred_ridge": ls(ridge),
                 "eta_ls": float(eta_grid[best]), "losses_ls": losses})
