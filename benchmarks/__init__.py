"""Benchmarks: separate programs that verify before they time (never imported by the
package, never run as tests).

    python -m benchmarks --json FILE      CPU: ms per training step, numba vs numpy vs the
                                          PyTorch / JAX peers, with a roofline line
                                          (benchmarks/bench.py)
    python -m benchmarks seq              the sequence training steps (lds task: causal LSA
                                          stacks, the mesa layer), numba vs numpy vs the JAX
                                          and PyTorch peers with --peer-python
                                          (benchmarks/seq.py)
    python -m benchmarks.whole_run        the paper's one-layer run end to end, numba vs numpy
    python -m benchmarks.gpu              the same step on one GPU (benchmarks/gpu.py)

Optional peers (PyTorch, JAX) live in ``benchmarks/peers`` (the sequence steps':
``seq_jax.py``, ``seq_torch.py``, run in their own process) and are never a dependency
of the package.
"""
