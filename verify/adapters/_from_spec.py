"""The parts of a port that no array framework computes, written from SPEC.md alone and
shared by the JAX and PyTorch example adapters: the task sampler and the initialiser,
which must draw from NumPy's ``Generator(PCG64)`` in the documented order to give the
same numbers (a framework's own random numbers are another stream; SPEC.md sections 2
and 7), and the closed-form one-step step size, which is arithmetic (section 9).
``tasks``, ``init`` and ``eta`` are adapter functions of those kinds, re-exported by both
examples. Nothing here imports the reference: a port has only the spec.
"""

import math

import numpy as np


def sample_tasks(rng, B, d, N, d_y, x_range, w_scale, noise_std, n_distractors):
    """SPEC.md section 2, draws in this order. Returns {X, Y, x_q, y_q, W}."""
    low, high = (float(x) for x in x_range)
    W = w_scale * rng.standard_normal((B, d_y, d))                     # (B, d_y, d)
    X = rng.uniform(low, high, size=(B, N, d))                         # (B, N, d)
    x_q = rng.uniform(low, high, size=(B, d))                          # (B, d)
    Y = np.einsum("bij,bnj->bni", W, X)                                # (B, N, d_y)
    y_q = np.einsum("bij,bj->bi", W, x_q)                              # (B, d_y)
    if noise_std > 0:                                                  # context labels only
        Y = Y + noise_std * rng.standard_normal((B, N, d_y))
    if n_distractors > 0:                                              # the first n_distractors labels
        Y[:, :n_distractors] = rng.standard_normal((B, n_distractors, d_y))
    return {"X": X, "Y": Y, "x_q": x_q, "y_q": y_q, "W": W}


def step_tasks(seed, step, **spec):
    """The tasks of training step ``step``: default_rng([seed, step]) (steps from 0)."""
    return sample_tasks(np.random.default_rng([seed, step]), **spec)


def truncated_normal(rng, shape, std):
    """std * z, z ~ N(0, 1) given |z| <= 2: the whole array drawn, then every rejected
    position redrawn in C order, one call per round (SPEC.md section 7)."""
    z = rng.standard_normal(shape)
    while True:
        bad = np.abs(z) > 2.0
        if not bad.any():
            return std * z
        z[bad] = rng.standard_normal(int(bad.sum()))


def init(seed, D, H, K, scale, key_size=None, value_size=None, merged=False):
    """The ``init`` kind: one layer's parameters from default_rng(seed), W_Q, W_K, W_V, P
    (merged: W_KQ, W_PV), variance scaling scale / K over each fan-in (D; H * Vd for P)."""
    rng = np.random.default_rng(seed)

    def draw(shape, fan_in):
        return truncated_normal(rng, shape, math.sqrt(scale / K / fan_in) / 0.87962566103423978)

    if merged:
        return {"W_KQ": draw((H, D, D), D), "W_PV": draw((H, D, D), D)}
    Kd, Vd = key_size or D, value_size or D
    return {"W_Q": draw((H, Kd, D), D), "W_K": draw((H, Kd, D), D), "W_V": draw((H, Vd, D), D),
            "P": draw((H, D, Vd), H * Vd)}


def tasks(seed, step, d, N, d_y, B, x_range, w_scale, noise_std, n_distractors):
    """The ``tasks`` kind: the tasks of step ``step`` of a run with ``seed``."""
    return step_tasks(seed, step, B=B, d=d, N=N, d_y=d_y, x_range=x_range, w_scale=w_scale, noise_std=noise_std,
                      n_distractors=n_distractors)


def eta(d, N, d_y, x_range, w_scale, noise_std, eta):
    """The ``eta`` kind: moments of U(-a, a), the optimal one-step eta, its expected loss
    and the loss at eta (SPEC.md section 9)."""
    low, high = (float(x) for x in x_range)
    if low != -high:
        raise ValueError(f"the closed form needs a symmetric range, got ({low}, {high})")
    m2, m4 = high * high / 3.0, high ** 4 / 5.0
    s2, n2 = w_scale ** 2, noise_std ** 2
    trA = d * m2                                                        # E tr A
    trA2 = (d * m4 + d * (d - 1) * m2 ** 2) / N + (N - 1) / N * d * m2 ** 2   # E tr A^2

    def loss(e):
        return 0.5 * d_y * (s2 * m2 * (e * e * trA2 - 2 * e * trA + d) + e * e * n2 * d * m2 ** 2 / N)

    eta_star = s2 * m2 * trA / (s2 * m2 * trA2 + n2 * d * m2 ** 2 / N)
    return {"m2": m2, "m4": m4, "eta_star": eta_star, "L_star": loss(eta_star), "L_eta": loss(eta)}
