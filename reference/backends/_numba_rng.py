"""Counter-based random numbers and the task sampler of the Numba backend (private).

The Numba stepper draws its tasks inside the fused kernel, so it cannot use NumPy's
``Generator``. Its stream is a pure function of (seed, step, task index, element
index) -- never of the thread count, the block size or the order the threads run in:

    run_key  = mix(mix(seed * GAMMA + SEED_SALT) ^ mix(step + GAMMA))        (host side)
    task_key = mix(run_key + (b + 1) * GAMMA)                                task b of the step
    key_s    = mix(task_key + s * STREAM)                                    stream s of task b
    word_n   = mix(key_s + (n + 1) * GAMMA)                                  n-th 64-bit word

``mix`` is the SplitMix64 output function (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014; the multipliers are Stafford's
"variant 13"); ``word_n`` for n = 0, 1, ... is exactly a SplitMix64 sequence started
at ``key_s``. Streams: 0 uniforms (X then x_q), 1 teacher W, 2 label noise,
3 distractor labels.

* uniforms on [0, 1): float64 from the top 53 bits of a word; float32 two per word
  (bits 40..63, then 8..31), 24 bits each. x = low + (high - low) * u, in the
  working dtype.
* normals: Marsaglia's polar method on float64 uniforms (pairs (v1, v2) in the unit
  disc, z = v * sqrt(-2 log s / s)), consuming words of the stream in order; then
  cast to the working dtype.
* labels y = W x are computed from the cast W and X, accumulated in float64.

These tasks are therefore NOT the ones ``reference.tasks.sample_tasks`` draws for the
same (seed, step) (that one uses NumPy's PCG64); ``step_on`` with given tasks is how
the backends are compared. The distribution is the same (tested).
"""

import numpy as np
from numba import njit

from .config import STRICT

MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_SEED_SALT = 0x2545F4914F6CDD1D
_STREAM = 0xD1B54A32D192ED03

GAMMA = np.uint64(_GAMMA)
M1 = np.uint64(_M1)
M2 = np.uint64(_M2)
STREAM = np.uint64(_STREAM)
SH30 = np.uint64(30)
SH27 = np.uint64(27)
SH31 = np.uint64(31)
SH11 = np.uint64(11)
SH40 = np.uint64(40)
SH8 = np.uint64(8)
LOW24 = np.uint64(0xFFFFFF)
ONE = np.uint64(1)
TWO_M53 = 1.0 / 9007199254740992.0   # 2^-53
TWO_M24 = 1.0 / 16777216.0           # 2^-24

# streams of one task
S_UNIFORM, S_TEACHER, S_NOISE, S_DISTRACT = 0, 1, 2, 3


def _mix_int(z):
    """SplitMix64 output function on Python ints (host side, no overflow warnings)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def run_key(seed, step):
    """The 64-bit key of step ``step`` of a run with ``seed`` (both ints >= 0)."""
    h = _mix_int(seed * _GAMMA + _SEED_SALT)
    return np.uint64(_mix_int(h ^ _mix_int(step + _GAMMA)))


@njit(**STRICT)
def mix64(z):
    z = (z ^ (z >> SH30)) * M1
    z = (z ^ (z >> SH27)) * M2
    return z ^ (z >> SH31)


@njit(**STRICT)
def task_key(key, b):
    return mix64(key + (np.uint64(b) + ONE) * GAMMA)


@njit(**STRICT)
def stream_key(tkey, s):
    return mix64(tkey + np.uint64(s) * STREAM)


@njit(**STRICT)
def word(skey, n):
    return mix64(skey + (np.uint64(n) + ONE) * GAMMA)


@njit(**STRICT)
def uniform64(skey, n):
    """The n-th float64 uniform on [0, 1) of a stream."""
    return np.float64(word(skey, n) >> SH11) * TWO_M53


@njit(**STRICT)
def normal_pairs(skey, n_out, out):
    """Fill out[:n_out] with standard normals (polar method) from stream ``skey``."""
    n = 0
    c = 0
    while n < n_out:
        v1 = 2.0 * uniform64(skey, c) - 1.0
        v2 = 2.0 * uniform64(skey, c + 1) - 1.0
        c += 2
        s = v1 * v1 + v2 * v2
        if s >= 1.0 or s == 0.0:
            continue
        f = np.sqrt(-2.0 * np.log(s) / s)
        out[n] = v1 * f
        n += 1
        if n < n_out:
            out[n] = v2 * f
            n += 1


@njit(**STRICT)
def uniforms_lanes(ukeys, nvalid, n, U, f32):
    """U[c, l] = c-th uniform on [0, 1) of stream ``ukeys[l]``, for c < n and lanes l < nvalid.

    float32 mode takes two 24-bit uniforms per word; float64 one 53-bit uniform per word.
    The loop over lanes is innermost so LLVM vectorises it (one SplitMix64 per lane).
    """
    if f32:
        nw = (n + 1) // 2
        for w in range(nw):
            inc = (np.uint64(w) + ONE) * GAMMA
            c = 2 * w
            for l in range(nvalid):
                z = mix64(ukeys[l] + inc)
                U[c, l] = np.float64(z >> SH40) * TWO_M24
                if c + 1 < n:
                    U[c + 1, l] = np.float64((z >> SH8) & LOW24) * TWO_M24
    else:
        for c in range(n):
            inc = (np.uint64(c) + ONE) * GAMMA
            for l in range(nvalid):
                U[c, l] = np.float64(mix64(ukeys[l] + inc) >> SH11) * TWO_M53


@njit(**STRICT)
def sample_block(key, bidx, nvalid, d, N, d_y, low, high, w_scale, noise_std, n_dis, f32,
                 E, yq, W, U, ukeys, nbuf):
    """Draw tasks bidx[0 .. nvalid-1] (global task indices) into one lane block.

    E (T, D, L): context tokens (x_i, y_i), query token (x_q, 0); yq (d_y, L) clean
    query targets; W (d_y, d, L) the teachers (working dtype). Lanes l >= nvalid are
    zero (padding: zero tokens give zero loss and zero gradients). Scratch: U (N*d + d,
    L) float64, ukeys (L,) uint64, nbuf (>= max(d_y*d, N*d_y) + 1,) float64.
    """
    T, D, L = E.shape
    E[:] = 0
    yq[:] = 0
    W[:] = 0
    nu = N * d + d
    for l in range(nvalid):
        tk = task_key(key, bidx[l])
        ukeys[l] = stream_key(tk, S_UNIFORM)
        normal_pairs(stream_key(tk, S_TEACHER), d_y * d, nbuf)
        for r in range(d_y):
            for a in range(d):
                W[r, a, l] = w_scale * nbuf[r * d + a]
    uniforms_lanes(ukeys, nvalid, nu, U, f32)
    width = high - low
    for i in range(N + 1):
        for a in range(d):
            c = i * d + a
            for l in range(nvalid):
                E[i, a, l] = low + width * U[c, l]
    # labels from the cast W and X, accumulated in float64
    for r in range(d_y):
        for i in range(N + 1):
            for l in range(nvalid):
                acc = 0.0
                for a in range(d):
                    acc += np.float64(W[r, a, l]) * np.float64(E[i, a, l])
                if i < N:
                    E[i, d + r, l] = acc
                else:
                    yq[r, l] = acc
    if noise_std > 0.0:
        for l in range(nvalid):
            normal_pairs(stream_key(task_key(key, bidx[l]), S_NOISE), N * d_y, nbuf)
            for i in range(N):
                for r in range(d_y):
                    E[i, d + r, l] = np.float64(E[i, d + r, l]) + noise_std * nbuf[i * d_y + r]
    if n_dis > 0:
        for l in range(nvalid):
            normal_pairs(stream_key(task_key(key, bidx[l]), S_DISTRACT), n_dis * d_y, nbuf)
            for i in range(n_dis):
                for r in range(d_y):
                    E[i, d + r, l] = nbuf[i * d_y + r]
