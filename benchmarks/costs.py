"""Analytic cost of one training step of the Numba backend's algorithm (for the roofline).

Counted for exactly the loops ``reference/backends/_numba_layers.py`` runs (context-only
stacks, as in configurations a, b, c), per task, then times B. Conventions:

* one multiply-add (MAC) = 2 FLOPs; elementwise adds (residuals, S = dC + dC^T) = 1
  FLOP; comparisons (clipping) and copies/transposes = 0 FLOPs;
* T = N + 1 tokens, D = d + d_y, S = N key tokens, H heads, K layers;
* forward, full context-only layer (every layer but the last): C = E_ctx^T E_ctx
  (N D^2 MACs; the kernel computes all D^2 entries), per head B_h^T C and A_h (C B_h)
  (2 D^3), pre = E + E M^T (T D^2 MACs + T D adds);
* forward, last layer (query token only): per head u = B e_q (D^2), s = E u (S D),
  w = E^T s (S D), A[y] w (d_y D);
* backward, last layer: per head dA[y] (d_y D), r = A[y]^T g (d_y D), ds (S D),
  du (S D), dB (D^2); when K > 1 also dE (2 S D) and B^T du (D^2);
* backward, full layer k: G = dpre^T E (T D^2), per head dA (D^3), V = A^T G (D^3),
  dB = C V (D^3); for k > 0 also dE = dpre + dpre M (T D^2 + T D), per head
  dC^T = B V^T (D^3) and S += dC + dC^T (2 D^2), dE_ctx += E_ctx S (N D^2);
* sampling: labels y = W x ((N + 1) d d_y MACs); random 64-bit words: float32 takes two
  uniforms per word, float64 one; a normal costs 4/pi words on average (polar method:
  two words per attempt for two normals, accepted with probability pi/4);
* clip + Adam: 2 FLOPs per parameter for the norm, 12 for the update.

Bytes: ``dram_bytes`` is the compulsory traffic (parameters, gradients, Adam moments:
read and written once, 7 arrays of all parameters); tasks are drawn inside the kernel
and never stored, and one block's scratch is sized to stay in cache. ``scratch_bytes``
counts every per-block scratch array written once and read back once (the traffic if
nothing stayed in cache): an upper bound, reported for reference.
"""

import math


def step_cost(d, N, B, K, H=1, d_y=1, itemsize=4):
    """dict(flops, dram_bytes, scratch_bytes, random_words) of one step (context-only stack)."""
    D, T, S = d + d_y, N + 1, N
    mac = 0.0      # multiply-adds per task
    add = 0.0      # plain adds per task
    # forward
    for _ in range(K - 1):
        mac += N * D * D + 2 * H * D ** 3 + T * D * D
        add += T * D
    mac += H * (D * D + 2 * S * D + d_y * D)
    # backward, last layer
    mac += H * (2 * d_y * D + 2 * S * D + D * D)
    if K > 1:
        mac += H * (2 * S * D + D * D)
    # backward, full layers K-2 .. 0
    for k in range(K - 1):
        mac += T * D * D + 3 * H * D ** 3
        if k > 0:
            mac += T * D * D + H * D ** 3 + N * D * D
            add += T * D + 2 * H * D * D
    # sampling: labels
    mac += (N + 1) * d * d_y
    n_params = K * 4 * H * D * D
    flops = B * (2 * mac + add) + 14 * n_params
    uniforms = (N + 1) * d
    words = (math.ceil(uniforms / 2) if itemsize == 4 else uniforms) + (4 / math.pi) * d * d_y
    dram = 7 * n_params * itemsize
    # scratch per task: forward caches of full layers (pre, out, C, CB_h, M, tmp), the
    # input block, the last layer (u, s, w), backward buffers per layer (dE, G, V, Vt, dCt, S)
    per_task = T * D + (K - 1) * (2 * T * D + (3 + H) * D * D) + H * (2 * D + S) \
        + (K - 1) * (T * D + 5 * D * D) + T * D
    scratch = 2 * B * per_task * itemsize
    return dict(flops=flops, dram_bytes=dram, scratch_bytes=scratch, random_words=B * words,
                macs_per_task=mac)


def bound(cost, rates):
    """Lower bound (ms) from the machine's rates: the slowest of compute, DRAM and RNG."""
    terms = {
        "compute_ms": 1e3 * cost["flops"] / (rates["matmul_gflops"] * 1e9),
        "dram_ms": 1e3 * cost["dram_bytes"] / (rates["copy_gbs"] * 1e9),
        "rng_ms": 1e3 * cost["random_words"] / (rates["rng_words_per_s"]),
    }
    terms["bound_ms"] = max(terms.values())
    terms["bound_by"] = max((k for k in terms if k != "bound_ms"), key=terms.get).replace("_ms", "")
    return terms
