"""Analytic cost of one training step of the Numba backend's algorithm (for the roofline).

Counted for exactly the loops the backend runs on a context-only stack (configurations
a, b, c), per task, then times B, following the backend's own choice of path
(``reference/backends/config.py``: D x D space when K >= 2, D >= 24 and N + 1 >= D,
else tokens). Conventions: one multiply-add (MAC) = 2 FLOPs; elementwise adds = 1
FLOP; comparisons, copies and transposes = 0. T = N + 1, D = d + d_y, S = N key tokens,
H heads, K layers, one label (d_y = 1).

Token path (``_numba_layers``):

* forward, full layer (every layer but the last): C = E_ctx^T E_ctx (N D^2 MACs; all
  D^2 entries are computed), per head B_h^T C and A_h (C B_h) (2 D^3), pre = E + E M^T
  (T D^2 MACs + T D adds);
* forward, last layer (query token only): per head u = B e_q (D^2), s = E u (S D),
  w = E^T s (S D), A[y] w (D);
* backward, last layer: per head dA[y] (D), r = A[y]^T g (D), ds (S D), du (S D),
  dB (D^2); when K > 1 also dE (2 S D) and B^T du (D^2);
* backward, full layer k: G = dpre^T E (T D^2), per head dA (D^3), V = A^T G (D^3),
  dB = C V (D^3); for k > 0 also dE = dpre + dpre M (T D^2 + T D), per head
  dC^T = B V^T (D^3) and S += dC + dC^T (2 D^2), dE_ctx += E_ctx S (N D^2).

D x D path (``_numba_dspace``), nd = K - 2 dense layers then the two-layer tail:

* C_0 = E_ctx^T E_ctx (N D^2); dense layer forward: per head C B_h and A_h (C B_h)
  (2 D^3), L C and (L C) M^T (2 D^3), q' = L q (D^2);
* tail forward: q1 = L q (3H D^2), per last-layer head alpha and beta (3H D^2 each),
  b = B' q1 and C beta (D^2 each); tail backward: per last-layer head C beta, C alpha
  (2 D^2), L dalpha, L dbeta (3H D^2 each), one outer product and B'^T db (2 D^2); L^T dq
  (3H D^2); per dM term (2H + 1 of them) and head: four matrix-vector products and two
  outer products (6 D^2);
* a factored layer with P pairs: 4P D^2 (L^T and C on both vectors of each pair) plus
  6H D^2 per term (2P + 1 terms), dq: D^2 (not for layer 0); a dense backward layer:
  (3 + 4H) D^3 + 2 D^2 ((1 + 3H) D^3 + D^2 for layer 0) plus 2P D^2 to build S from
  pairs once; the same cost rule as the kernel decides which one runs.

``tests/test_numba_costs.py`` checks the D x D count against the multiply-adds the kernel's
products actually perform (counted by wrapping them, without JIT).

Both paths: sampling, labels y = W x ((N + 1) d MACs); random numbers: the uniforms as
64-bit words (float32 takes two uniforms per word, float64 one) and the d d_y normals of
the teacher (polar method), charged at the generator's measured word and normal rates;
clip + Adam 14 FLOPs per parameter.

Bytes: ``dram_bytes`` is the compulsory traffic (parameters, gradients, Adam moments:
7 arrays of all parameters, read or written once); tasks are drawn inside the kernel
and never stored, and one block's scratch is sized to stay in cache. ``scratch_bytes``
counts the per-task scratch written once and read back once (the traffic if nothing
stayed in cache), an upper bound reported for reference.
"""

import math


def choose_path(d, N, K, d_y=1):
    """The backend's automatic choice (reference/backends/numba_backend.py, BatchRun)."""
    D = d + d_y
    return "dspace" if (K >= 2 and d_y == 1 and D >= 24 and N + 1 >= D) else "tokens"


def token_macs(d, N, K, H, d_y):
    D, T, S = d + d_y, N + 1, N
    mac = add = 0.0
    for _ in range(K - 1):
        mac += N * D * D + 2 * H * D ** 3 + T * D * D
        add += T * D
    mac += H * (D * D + 2 * S * D + d_y * D)
    mac += H * (2 * d_y * D + 2 * S * D + D * D)
    if K > 1:
        mac += H * (2 * S * D + D * D)
    for k in range(K - 1):
        mac += T * D * D + 3 * H * D ** 3
        if k > 0:
            mac += T * D * D + H * D ** 3 + N * D * D
            add += T * D + 2 * H * D * D
    scratch = T * D + (K - 1) * (2 * T * D + (3 + H) * D * D) + H * (2 * D + S) \
        + (K - 1) * (T * D + 5 * D * D) + T * D
    return mac, add, scratch


def dspace_macs(d, N, K, H):
    D = d + 1
    D2, D3 = D * D, D ** 3
    nd = K - 2
    mac = N * D2                                       # C_0
    mac += nd * (2 * H * D3 + 2 * D3 + D2)             # dense forward layers
    mac += 3 * H * D2 + H * (6 * H * D2 + 2 * D2)      # tail forward
    nt = 2 * H + 1
    mac += H * (4 * D2 + 6 * H * D2) + 3 * H * D2 + nt * H * 6 * D2  # tail backward
    P = 2 * H * (H + 1) if nd > 0 else 0
    P_cap = max(2 * D + 8 * H, P + H * (2 * P + 1))
    dense = False
    for k in range(nd - 1, -1, -1):
        if not dense:
            f_cost = 4 * P + 6 * H * (2 * P + 1)
            d_cost = D * ((1 + 3 * H) if k == 0 else (3 + 4 * H)) + 2 * P
            P_new = 0 if k == 0 else P + H * (2 * P + 1)
            if k == nd - 1 or (f_cost < d_cost and P_new <= P_cap):
                mac += (f_cost + (0 if k == 0 else 1)) * D2
                P = P_new
                continue
            mac += 2 * P * D2
            dense = True
        mac += ((1 + 3 * H) * D3 + D2) if k == 0 else ((3 + 4 * H) * D3 + 2 * D2)
    scratch = (nd + 1) * D2 + nd * (H + 2) * D2 + 12 * D2 + (N + 1) * D
    return mac, 0.0, scratch


def step_cost(d, N, B, K, H=1, d_y=1, itemsize=4, path=None):
    """dict(path, flops, dram_bytes, scratch_bytes, random_words, macs_per_task) of one step."""
    path = choose_path(d, N, K, d_y) if path is None else path
    D = d + d_y
    if path == "dspace":
        mac, add, scratch = dspace_macs(d, N, K, H)
    else:
        mac, add, scratch = token_macs(d, N, K, H, d_y)
    mac += (N + 1) * d * d_y                           # labels
    n_params = K * 4 * H * D * D
    flops = B * (2 * mac + add) + 14 * n_params
    uniforms = (N + 1) * d
    words = math.ceil(uniforms / 2) if itemsize == 4 else uniforms
    return dict(path=path, flops=flops, dram_bytes=7 * n_params * itemsize, scratch_bytes=2 * B * scratch * itemsize,
                random_words=B * words, normals=B * d * d_y, macs_per_task=mac)


def bound(cost, rates):
    """Lower bound (ms) from the machine's rates: the slowest of compute, DRAM and RNG."""
    terms = {
        "compute_ms": 1e3 * cost["flops"] / (rates["matmul_gflops"] * 1e9),
        "dram_ms": 1e3 * cost["dram_bytes"] / (rates["copy_gbs"] * 1e9),
        "rng_ms": 1e3 * (cost["random_words"] / rates["rng_words_per_s"] + cost["normals"] / rates["rng_normals_per_s"]),
    }
    terms["bound_ms"] = max(terms.values())
    terms["bound_by"] = max((k for k in terms if k != "bound_ms"), key=terms.get).replace("_ms", "")
    return terms


def sine_step_cost(N, B, width=40, hidden=160, key=40):
    """FLOPs of the dense products of one sine-model training step (embed 2 -> width, MLP
    width -> hidden -> width, one LSA layer of key size ``key``, readout of the query):
    a lower bound on the work of any implementation of this step, so FLOPs / matmul rate
    bounds the step time from below. Per task, T = N + 1 tokens, S = N context tokens:

    * embed: forward T 2 width, dW T 2 width (the raw tokens need no gradient);
    * each MLP product (up and down): forward T width hidden, dW and dX the same again;
    * LSA, query row only (the loss reads the query): keys S width key, values
      S width width, query width key, scores S key, weighted sum S width, output
      projection width width; backward twice the forward (one product for each operand).

    Elementwise work (GELU, biases, residual adds, Adam) is not counted: a bound."""
    T, S, D = N + 1, N, width
    embed = 2 * T * 2 * D
    mlp = 2 * 3 * T * D * hidden
    lsa = 3 * (S * D * key + S * D * D + D * key + S * key + S * D + D * D)
    mac = embed + mlp + lsa
    return dict(path="sine (dense products)", flops=2 * B * mac, macs_per_task=mac)


def seq_step_cost(n_layers, heads, T=50, B=256, width=40, key=20, value=20, mask=0, d=10, mesa=False):
    """FLOPs of the dense products of one sequence-model training step (the ``seq_*``
    experiments: causal linear attention or the mesa layer on constructed tokens
    e_t = [0, s_t, s_t, s_{t-1}] of width 40, the prediction read from the first d = 10
    output channels, the loss at every t): a lower bound on the work of any
    implementation of this step, so FLOPs / matmul rate bounds the step time from below.
    Per sequence and head of layer k:

    * projections q, k, v from the layer's input: T w_in (2 key + value), with w_in the
      input channels that can be non-zero (layer 0: width - max(mask, d), since the
      first d channels of e_t are zero and ``mask`` more are zeroed; later layers: width);
    * causal attention including the diagonal, the cheaper of its two forms: scores and
      weighted sum over s <= t, T (T + 1) / 2 (key + value), or the running state
      sum_s v_s k_s^T updated and read at every t, 2 T key value;
    * the output projection to the channels that are read on: T value w_out (the last
      layer: the d predicted channels; the others: width);
    * mesa layer: the Sherman-Morrison recursion of its key x key inverse, R k, the
      rank-one update and R q at every t, 3 T key^2;
    * backward: twice the forward for the projections (the weight gradient and the input
      gradient; no input gradient into layer 0, whose input is data), the attention
      (both operands of each product) and the output projection; the mesa recursion
      once its forward (a conservative count: each of its products has at least one).

    Elementwise work (clip, residual adds, the loss, AdamW) and sampling are not counted:
    a bound."""
    mac = 0.0
    for k in range(n_layers):
        w_in = width - max(mask, d) if k == 0 else width
        w_out = d if k == n_layers - 1 else width
        proj = T * w_in * (2 * key + value)
        attn = min(T * (T + 1) / 2 * (key + value), 2 * T * key * value)
        out = T * value * w_out
        sm = 3 * T * key * key if mesa else 0
        fwd = proj + attn + out + sm
        bwd = proj * (2 if k > 0 else 1) + 2 * attn + 2 * out + sm
        mac += heads * (fwd + bwd)
    return dict(path=f"{n_layers} x {'mesa' if mesa else 'causal LSA'} (dense products)", flops=2 * B * mac,
                macs_per_sequence=mac)
