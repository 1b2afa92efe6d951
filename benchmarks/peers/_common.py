"""Framework-independent pieces shared by the peer implementations.

Nothing here imports torch or jax.
"""

from __future__ import annotations

import math

B1 = 0.9
B2 = 0.98
EPS = 1e-8
TRUNC = 2.0  # truncated normal cut-off, in standard deviations
Y_SLOT = -1  # the y-entry is the last coordinate of a token


def derive(cfg: dict) -> dict:
    """Return a copy of ``cfg`` with D, T and the hyper-parameters filled in."""
    out = dict(cfg)
    d, N, B, K = int(cfg["d"]), int(cfg["N"]), int(cfg["B"]), int(cfg["K"])
    out.update(d=d, N=N, B=B, K=K, D=d + 1, T=N + 1)
    out["clip"] = 0.001 if K <= 2 else 10.0
    out["lr"] = 1e-3 if K <= 3 else 5e-4
    out["clamp"] = K > 3
    out["init_std"] = math.sqrt((0.002 / K) / (d + 1))
    return out


PARAM_NAMES = ("W_Q", "W_K", "W_V", "P")
