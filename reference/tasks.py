"""In-context linear regression tasks (von Oswald et al. 2023, Sec. 2 and App. A.1).

Per task: a teacher W ~ w_scale * N(0, I) of shape (d_y, d); N context inputs and one
query input drawn i.i.d. from U(low, high)^d; labels y = W x. Defaults follow the
official code: x ~ U(-0.5, 0.5) (the paper's text says U(-1, 1); pass
``x_range=(-1, 1)`` for that), d_y = 1, w_scale = 1, no noise.

Options: Gaussian label noise (context labels only; the query target stays the clean
W x_q so the loss measures error against the teacher), and ``n_distractors`` context
labels (the first ones) replaced by N(0, 1) noise.

Randomness comes only from the ``numpy.random.Generator`` passed in, drawn in float64
in this fixed order so ports can reproduce it: W, X, x_q, label noise, distractor
labels. Arrays are then cast to ``dtype`` (and moved to ``xp``).
"""

from typing import NamedTuple

import numpy as np

from ._checks import check_dtype, check_float, check_int


class Tasks(NamedTuple):
    X: object    # (B, N, d)   context inputs
    Y: object    # (B, N, d_y) context labels
    x_q: object  # (B, d)      query input
    y_q: object  # (B, d_y)    query target (clean)
    W: object    # (B, d_y, d) teacher


def sample_tasks(rng, B, d, N, d_y=1, *, x_range=(-0.5, 0.5), w_scale=1.0,
                 noise_std=0.0, n_distractors=0, dtype=np.float64, xp=np):
    """Draw B regression tasks. Returns a :class:`Tasks` of arrays in ``dtype``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            "rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)), "
            f"got {type(rng).__name__}"
        )
    B = check_int("B", B, 1)
    d = check_int("d", d, 1)
    N = check_int("N", N, 1)
    d_y = check_int("d_y", d_y, 1)
    low, high = _check_range(x_range)
    w_scale = check_float("w_scale", w_scale, 0.0)
    noise_std = check_float("noise_std", noise_std, 0.0)
    n_distractors = check_int("n_distractors", n_distractors, 0, N)
    dtype = check_dtype("dtype", dtype)

    W = w_scale * rng.standard_normal((B, d_y, d))                     # (B, d_y, d)
    X = rng.uniform(low, high, size=(B, N, d))                         # (B, N, d)
    x_q = rng.uniform(low, high, size=(B, d))                          # (B, d)
    Y = np.einsum("bij,bnj->bni", W, X)                                # (B, N, d_y)
    y_q = np.einsum("bij,bj->bi", W, x_q)                              # (B, d_y)
    if noise_std > 0:
        Y = Y + noise_std * rng.standard_normal(Y.shape)
    if n_distractors > 0:
        Y[:, :n_distractors, :] = rng.standard_normal((B, n_distractors, d_y))
    return Tasks(*(xp.asarray(a.astype(dtype)) for a in (X, Y, x_q, y_q, W)))


def _check_range(x_range):
    return _check_named_range("x_range", x_range)


def uniform_moments(x_range=(-0.5, 0.5)):
    """Second and fourth moments (m2, m4) of one coordinate of x ~ U(-a, a).

    m2 = a^2 / 3 and m4 = a^4 / 5. Only symmetric ranges (zero mean) are supported,
    since the closed-form step size assumes zero-mean inputs.
    """
    low, high = _check_range(x_range)
    if not np.isclose(low, -high):
        raise ValueError(f"x_range must be symmetric (low == -high) for these moments, got ({low}, {high})")
    a = high
    return a * a / 3.0, a ** 4 / 5.0


from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class TaskSpec:
    """What tasks a training run draws: sizes and the data options of :func:`sample_tasks`."""

    d: int = 10
    N: int = 10
    d_y: int = 1
    B: int = 2048
    x_range: tuple = (-0.5, 0.5)
    w_scale: float = 1.0
    noise_std: float = 0.0
    n_distractors: int = 0

    def __post_init__(self):
        check_int("d", self.d, 1)
        check_int("N", self.N, 1)
        check_int("d_y", self.d_y, 1)
        check_int("B", self.B, 1)
        _check_range(self.x_range)
        check_float("w_scale", self.w_scale, 0.0)
        check_float("noise_std", self.noise_std, 0.0)
        check_int("n_distractors", self.n_distractors, 0, self.N)

    @property
    def D(self):
        return self.d + self.d_y

    def sample(self, rng, B=None, dtype=np.float64, xp=np):
        return sample_tasks(rng, self.B if B is None else B, self.d, self.N, self.d_y, x_range=self.x_range,
                            w_scale=self.w_scale, noise_std=self.noise_std, n_distractors=self.n_distractors,
                            dtype=dtype, xp=xp)


def step_rng(seed, step):
    """The generator for the tasks of training step ``step`` of a run with ``seed``.

    Tasks of step s come from ``default_rng([seed, s])``: no generator state to save,
    so a resumed run draws exactly the tasks an uninterrupted one would.
    """
    return np.random.default_rng([check_int("seed", seed, 0), check_int("step", step, 0)])


# Random streams of a training run. Training step s draws from default_rng([seed, s])
# (:func:`step_rng`); every other stream is default_rng([seed or eval_seed, TAG, ...]) with
# a TAG far above any step index, so no two streams coincide (SeedSequence ignores
# trailing zeros, hence the nonzero tags).
STREAM_INIT, STREAM_EVAL, STREAM_LINE_SEARCH, STREAM_GDPP, STREAM_OOD, STREAM_ROLLOUT = (2 ** 32 - k for k in range(1, 7))


def stream_rng(seed, tag, *extra):
    """The generator ``default_rng([seed, tag, *extra])`` of one named stream."""
    return np.random.default_rng([check_int("seed", seed, 0), tag, *extra])


# ---- nonlinear (sine) regression tasks ------------------------------------------------------

SINE_PHASES = ("tied", "independent")


def sample_sine_tasks(rng, B, N, *, x_range=(-5.0, 5.0), amp_range=(0.1, 0.5), phase="tied",
                      phase_range=(0.0, np.pi), dtype=np.float64, xp=np):
    """Draw B sine-regression tasks (ICML'23 Sec. 5, paper-settings.md sections 7, 7a):
    y = a sin(x + rho), inputs x ~ U(x_range) (d = 1), N context pairs and one query.

    ``phase="tied"`` (the official code's default): one u ~ U(0, 1) per task gives both
    a = a_low + (a_high - a_low) u and rho = rho_low + (rho_high - rho_low) u, because the
    code draws a and rho from the same random key, so they are perfectly correlated
    (rho = pi (a - 0.1) / 0.4 with the defaults). ``"independent"`` (the paper's text):
    a and rho from separate draws. ``amp_range`` defaults to the code's (0.1, 0.5); the
    paper's text says (0.1, 5).

    Draw order (float64, so ports can reproduce it): u (B,) (tied) or a (B,) then rho (B,)
    (independent, each U(0, 1) then scaled); X (B, N, 1); x_q (B, 1). Returns a
    :class:`Tasks` whose ``W`` (B, 1, 2) holds each task's (a, rho) (the task's
    parameters, not a linear teacher)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)), "
                        f"got {type(rng).__name__}")
    B = check_int("B", B, 1)
    N = check_int("N", N, 1)
    low, high = _check_range(x_range)
    a_low, a_high = _check_named_range("amp_range", amp_range)
    r_low, r_high = _check_named_range("phase_range", phase_range)
    if phase not in SINE_PHASES:
        raise ValueError(f"phase must be one of {SINE_PHASES}, got {phase!r}")
    dtype = check_dtype("dtype", dtype)
    if phase == "tied":
        u = rng.uniform(0.0, 1.0, size=B)
        ua = ur = u
    else:
        ua = rng.uniform(0.0, 1.0, size=B)
        ur = rng.uniform(0.0, 1.0, size=B)
    a = a_low + (a_high - a_low) * ua                                  # (B,)
    rho = r_low + (r_high - r_low) * ur                                # (B,)
    X = rng.uniform(low, high, size=(B, N, 1))                         # (B, N, 1)
    x_q = rng.uniform(low, high, size=(B, 1))                          # (B, 1)
    Y = a[:, None, None] * np.sin(X + rho[:, None, None])              # (B, N, 1)
    y_q = a[:, None] * np.sin(x_q + rho[:, None])                      # (B, 1)
    W = np.stack([a, rho], axis=1)[:, None, :]                         # (B, 1, 2)
    return Tasks(*(xp.asarray(v.astype(dtype)) for v in (X, Y, x_q, y_q, W)))


def _check_named_range(name, r):
    """(low, high) as floats; TypeError unless r is a pair of numbers, ValueError unless
    finite with low < high (the messages name ``name``)."""
    try:
        low, high = (float(v) for v in r)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a pair (low, high) of numbers, got {r!r}") from exc
    if not (np.isfinite(low) and np.isfinite(high)) or not low < high:
        raise ValueError(f"{name} must satisfy low < high (finite), got ({low}, {high})")
    return low, high


@dataclass(frozen=True)
class SineTaskSpec:
    """What sine-regression tasks a training run draws (:func:`sample_sine_tasks`);
    d = d_y = 1, so tokens are (x, y) of width 2."""

    N: int = 10
    B: int = 2048
    x_range: tuple = (-5.0, 5.0)
    amp_range: tuple = (0.1, 0.5)
    phase: str = "tied"
    d = 1
    d_y = 1

    def __post_init__(self):
        check_int("N", self.N, 1)
        check_int("B", self.B, 1)
        _check_range(self.x_range)
        _check_named_range("amp_range", self.amp_range)
        if self.phase not in SINE_PHASES:
            raise ValueError(f"phase must be one of {SINE_PHASES}, got {self.phase!r}")

    @property
    def D(self):
        return 2

    def sample(self, rng, B=None, dtype=np.float64, xp=np):
        return sample_sine_tasks(rng, self.B if B is None else B, self.N, x_range=self.x_range,
                                 amp_range=self.amp_range, phase=self.phase, dtype=dtype, xp=xp)
