"""A JAX port of SPEC.md behind the adapter protocol (SPEC.md section 14): a porting guide.

    pip install "jax[cpu]"
    icgd conformance verify.adapters.jax_adapter

Written from the spec alone, not from the reference: the LSA layer in ``jax.numpy``
(section 4), stacks and the loss (sections 3, 5, 6), the gradients from ``jax.vjp`` /
``jax.value_and_grad``, the constructions and baselines (sections 8, 9) and Adam
(section 10) transcribed. What to get right in JAX:

* float64: ``jax_enable_x64`` is switched on before any array exists (the vectors are
  float64, compared at rtol 1e-12); JAX's default float32 fails every case;
* the clip as a select on the value, ``where(|pre| <= c, pre, sign(pre) c)``: the
  gradient of ``jnp.clip`` is 0.5 on the level, which the ``clipedge`` case catches;
* the sampler and initialiser draw from NumPy's Generator (``_from_spec``): JAX's PRNG
  is another stream, and the spec's numbers are NumPy's.

JAX is not a dependency of icgd; importing this file without it raises ImportError.
"""

import math

import jax

jax.config.update("jax_enable_x64", True)            # before any array is made

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from . import _from_spec  # noqa: E402
from ._from_spec import eta, init, tasks  # noqa: E402,F401 -- kinds with no array work: NumPy's Generator, arithmetic

NAME = f"JAX {jax.__version__} port (float64, autodiff gradients)"
tree_map = jax.tree_util.tree_map


def _out(tree):
    """NumPy arrays for the kit."""
    return tree_map(np.asarray, tree)


def _grads(p):
    return {"d" + name: g for name, g in p.items()}


def _clip(x, c):
    """clip(x, -c, c) as a select: the gradient passes in full where -c <= x <= c."""
    return x if math.isinf(c) else jnp.where(jnp.abs(x) <= c, x, jnp.sign(x) * c)


def lsa(E, p, causal, clip):
    """One LSA layer (SPEC.md section 4): E (B, T, D), p {W_Q, W_K, W_V, P} or merged {W_KQ, W_PV}."""
    if "W_KQ" in p:                                                    # merged: W_K = P = I
        eye = jnp.broadcast_to(jnp.eye(E.shape[2]), p["W_KQ"].shape)
        W_Q, W_K, W_V, P = p["W_KQ"], eye, p["W_PV"], eye
    else:
        W_Q, W_K, W_V, P = p["W_Q"], p["W_K"], p["W_V"], p["P"]
    T = E.shape[1]
    S = T if causal else T - 1                                         # keys and values: the context only
    q = jnp.einsum("hkd,btd->bhtk", W_Q, E)                            # (B, H, T, Kd)
    k = jnp.einsum("hkd,bsd->bhsk", W_K, E[:, :S])                     # (B, H, S, Kd)
    v = jnp.einsum("hvd,bsd->bhsv", W_V, E[:, :S])                     # (B, H, S, Vd)
    A = jnp.einsum("bhtk,bhsk->bhts", q, k)                            # no softmax, no scaling
    if causal:
        A = A * jnp.tril(jnp.ones((T, T)))                             # i <= j, the diagonal included
    return _clip(E + jnp.einsum("hdv,bhts,bhsv->btd", P, A, v), clip)


def forward(E, layers, K, recurrent, causal, clip):
    for k in range(K):
        E = lsa(E, layers[0 if recurrent else k], causal, clip)
    return E


def layer(E, dout, causal, clip, **params):
    out, vjp = jax.vjp(lambda E, p: lsa(E, p, causal, clip), E, params)
    dE, dp = vjp(jnp.asarray(dout))
    return _out({"out": out, "dE": dE, **_grads(dp)})


def stack(E, layer, dout, K, recurrent, causal, clip):
    out, vjp = jax.vjp(lambda E, ps: forward(E, ps, K, recurrent, causal, clip), E, layer)
    dE, dps = vjp(jnp.asarray(dout))                                   # a shared set's gradients summed
    return _out({"out": out, "dE": dE, "layer": [_grads(g) for g in dps]})


def _loss(E, layers, y_q, d, K, recurrent, causal, clip):
    pred = -forward(E, layers, K, recurrent, causal, clip)[:, -1, d:]  # minus the query's y-slot
    return 0.5 * jnp.mean(jnp.sum((pred - y_q) ** 2, axis=1)), pred    # summed over d_y, mean over tasks


def loss(E, y_q, layer, d, K, recurrent, causal, clip):
    (L, pred), (dE, dps) = jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True)(
        E, layer, y_q, d, K, recurrent, causal, clip)
    return _out({"pred": pred, "L": L, "dE": dE, "layer": [_grads(g) for g in dps]})


def tokens(X, Y, x_q, W_0=None):
    """(x_i, y_i) for the context, (x_q, -W_0 x_q) for the query, last (SPEC.md section 3)."""
    slot = jnp.zeros((X.shape[0], Y.shape[2])) if W_0 is None else -jnp.einsum("ij,bj->bi", W_0, x_q)
    return jnp.concatenate([jnp.concatenate([X, Y], 2), jnp.concatenate([x_q, slot], 1)[:, None]], 1)


def _blocks(d, d_y, x_block, W_0, P_x, P_y):
    """W_Q = W_K = [[I_d, 0], [0, 0]], W_V = [[x_block, 0], [W_0, -I]], P = diag(P_x I_d, P_y I_dy), one head."""
    D = d + d_y
    W_QK = jnp.zeros((D, D)).at[:d, :d].set(jnp.eye(d))
    W_V = jnp.zeros((D, D)).at[:d, :d].set(x_block).at[d:, :d].set(W_0).at[d:, d:].set(-jnp.eye(d_y))
    P = jnp.diag(jnp.concatenate([jnp.full(d, P_x), jnp.full(d_y, P_y)]))
    return {"W_Q": W_QK[None], "W_K": W_QK[None], "W_V": W_V[None], "P": P[None]}


def gd_steps(X, Y, x_q, etas, W_0):
    """W_{k+1} = W_k - eta_k (1/N) sum_i (W_k x_i - y_i) x_i^T from W_0; returns (W_K x_q, W_K)."""
    W = jnp.broadcast_to(W_0, (X.shape[0],) + W_0.shape[-2:])
    for eta in etas:
        W = W - eta / X.shape[1] * jnp.einsum("bni,bnj->bij", jnp.einsum("bij,bnj->bni", W, X) - Y, X)
    return jnp.einsum("bij,bj->bi", W, x_q), W


def gd(X, Y, x_q, W_0, eta, K, recurrent):
    d, d_y, N = X.shape[2], Y.shape[2], X.shape[1]
    layers = [_blocks(d, d_y, jnp.zeros((d, d)), W_0, eta / N, eta / N) for _ in range(1 if recurrent else K)]
    E = tokens(X, Y, x_q, W_0)
    out = forward(E, layers, K, recurrent, False, math.inf)
    pred_gd, W_gd = gd_steps(X, Y, x_q, [eta] * K, W_0)
    return _out({"E": E, "layer": layers, "out": out, "pred": -out[:, -1, d:], "pred_gd": pred_gd, "W_gd": W_gd})


def gdpp(X, Y, x_q, W_0, etas, gammas):
    d, d_y, N = X.shape[2], Y.shape[2], X.shape[1]
    layers = [_blocks(d, d_y, jnp.eye(d), W_0, -g, e / N) for e, g in zip(etas, gammas)]
    E = tokens(X, Y, x_q, W_0)
    out = forward(E, layers, len(layers), False, False, math.inf)
    x, y = jnp.concatenate([X, x_q[:, None]], 1), jnp.concatenate([Y, -jnp.einsum("ij,bj->bi", W_0, x_q)[:, None]], 1)
    for e, g in zip(etas, gammas):                                     # the GD++ recursion, every token
        xc, yc = x[:, :N], y[:, :N]
        C = jnp.einsum("bni,bnj->bij", xc, xc)                         # sum_i x_i x_i^T
        dW = -e / N * jnp.einsum("bni,bnj->bij", jnp.einsum("ij,bnj->bni", W_0, xc) - yc, xc)
        x, y = x - g * jnp.einsum("bij,btj->bti", C, x), y - jnp.einsum("bij,btj->bti", dW, x)
    return _out({"E": E, "layer": layers, "out": out, "pred": -out[:, -1, d:], "pred_gdpp": -y[:, -1]})


def adam_step(params, grads, m, v, t, lr, b1, b2, eps, clip_norm):
    """Global-norm clip, then Adam with bias correction for update t + 1 (SPEC.md section 10)."""
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    grads = tree_map(lambda g: g * jnp.minimum(1.0, clip_norm / norm), grads)
    t = t + 1
    m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    params = tree_map(lambda p, m, v: p - lr * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps), params, m, v)
    return params, m, v, t, norm


def adam(layer, m, v, t, lr, b1, b2, eps, clip_norm):
    """``layer[k]`` holds the parameters (W_Q ...) and their gradients (dW_Q ...)."""
    params = [{n: a for n, a in p.items() if "d" + n in p} for p in layer]
    grads = [{n: p["d" + n] for n in q} for p, q in zip(layer, params)]
    new, m, v, t, norm = adam_step(params, grads, m["layer"], v["layer"], t, lr, b1, b2, eps, clip_norm)
    return _out({"new": {"layer": new}, "new_m": {"layer": m}, "new_v": {"layer": v}, "new_t": t, "grad_norm": norm})


def train(layer, seed, n_steps, d, N, d_y, B, x_range, w_scale, noise_std, n_distractors, K, recurrent, causal, clip,
          lr, b1, b2, eps, clip_norm):
    """Step s = 0, 1, ...: the tasks of default_rng([seed, s]), the loss and gradients before the update, Adam t = s + 1."""
    spec = dict(B=B, d=d, N=N, d_y=d_y, x_range=x_range, w_scale=w_scale, noise_std=noise_std,
                n_distractors=n_distractors)
    value_and_grad = jax.value_and_grad(_loss, argnums=1, has_aux=True)
    params = [dict(p) for p in layer]
    m, v = tree_map(jnp.zeros_like, params), tree_map(jnp.zeros_like, params)
    t, steps, losses, norms = 0, [], [], []
    for s in range(n_steps):
        tk = _from_spec.step_tasks(seed, s, **spec)
        steps.append({k: tk[k] for k in ("X", "Y", "x_q", "y_q")})
        (L, _), grads = value_and_grad(tokens(tk["X"], tk["Y"], tk["x_q"]), params, tk["y_q"], d, K, recurrent,
                                       causal, clip)
        params, m, v, t, norm = adam_step(params, grads, m, v, t, lr, b1, b2, eps, clip_norm)
        losses.append(L)
        norms.append(norm)
    return _out({"losses": jnp.stack(losses), "grad_norms": jnp.stack(norms), "step": steps,
                 "final": {"layer": params}})


def baselines(X, Y, x_q, y_q, eta, n_steps, ridge, eta_grid):
    etas = [eta] * n_steps if isinstance(eta, float) else list(eta)   # one eta, or one per step
    W_0 = jnp.zeros((Y.shape[2], X.shape[2]))
    pred_gd, W_gd = gd_steps(X, Y, x_q, etas, W_0)
    C, XtY = jnp.einsum("bni,bnj->bij", X, X), jnp.einsum("bni,bnj->bij", X, Y)   # X^T X, X^T Y

    def ls(r):                                                         # W^T = (X^T X + r I)^-1 X^T Y; r = 0: pinv
        Wt = jnp.linalg.solve(C + r * jnp.eye(X.shape[2]), XtY) if r > 0 else jnp.linalg.pinv(C) @ XtY
        return jnp.einsum("bij,bi->bj", Wt, x_q)

    def gd_loss(e):                                                    # GD-n_steps from 0 with step size e
        return 0.5 * jnp.mean(jnp.sum((gd_steps(X, Y, x_q, [e] * n_steps, W_0)[0] - y_q) ** 2, axis=1))

    losses = jax.vmap(gd_loss)(jnp.asarray(eta_grid))
    best = int(jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf)))   # the first of equal smallest
    return _out({"pred_gd": pred_gd, "W_gd": W_gd, "pred_ls": ls(0.0), "pred_ridge": ls(ridge),
                 "eta_ls": eta_grid[best], "losses_ls": losses})
