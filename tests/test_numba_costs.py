"""The benchmark's analytic cost model (benchmarks/costs.py) against the multiply-adds the
Numba kernels actually perform.

Without JIT (NUMBA_DISABLE_JIT=1) the kernels are plain Python and call their product
primitives through module globals, so wrapping those primitives counts every
multiply-add a run performs. The count runs in a subprocess (the flag must be set
before Numba compiles anything).
"""

import json
import os
import subprocess
import sys

from benchmarks.costs import dspace_macs, token_macs, choose_path, step_cost

_SCRIPT = r"""
import json, sys
import numpy as np
from reference import lsa_stack, build_tokens, init_lsa_params, sample_tasks
from reference.backends import numba_backend as nb, _numba_dspace as ds, _numba_layers as ly

count = [0]

def wrap(mod, name, macs):
    f = getattr(mod, name)
    def g(*a):
        count[0] += macs(*a)
        return f(*a)
    setattr(mod, name, g)

# D x D path primitives
wrap(ds, "mm", lambda X, Y, Z, acc: X.shape[0] * X.shape[1] * Y.shape[1])
wrap(ds, "mv", lambda W, x, y, acc: W.shape[0] * W.shape[1])
wrap(ds, "mtv", lambda W, x, y, acc: W.shape[0] * W.shape[1])
wrap(ds, "outer_acc", lambda u, v, Z, s: u.shape[0] * v.shape[0])
# token path primitives (per task: divide by the lanes)
wrap(ly, "sl", lambda W, Y2, Z2, acc: W.shape[0] * W.shape[1] * Y2.shape[1])
wrap(ly, "lmm", lambda X, Y, Z, acc: X.shape[0] * X.shape[1] * Y.shape[1] * X.shape[2])
wrap(ly, "lmm_tn", lambda X, Y, Z, acc: X.shape[0] * X.shape[1] * Y.shape[1] * X.shape[2])
wrap(ly, "lmm_nt", lambda X, Y, Z, acc: X.shape[0] * X.shape[1] * Y.shape[0] * X.shape[2])
wrap(ly, "gacc", lambda X, Y, Out: X.shape[0] * X.shape[1] * Y.shape[0] * X.shape[2])

out = []
for path, d, N, K, H in json.loads(sys.argv[1]):
    rng = np.random.default_rng(0)
    tasks = sample_tasks(rng, 1, d, N)
    params = tuple(init_lsa_params(rng, d + 1, H=H, scale=0.01, dtype=np.float64) for _ in range(K))
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    count[0] = 0
    run = nb.BatchRun(lsa_stack(K), params, 1, N, d, 1, np.float64, path=path)
    run(E=E, y_q=tasks.y_q)
    out.append(dict(path=run.path, d=d, N=N, K=K, H=H, macs=count[0] / (run.L if run.path == "tokens" else 1)))
print(json.dumps(out))
"""


def _counted(cases):
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", ICGD_NUMBA_CACHE="0", ICGD_NUMBA_LANES="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dspace_count_is_exact():
    """Every product of the D x D path (C_0, dense layers, the tail, factored and dense
    backward layers, several K and heads) is in the model, and nothing else."""
    cases = [["dspace", 7, 9, K, H] for K, H in ((2, 1), (3, 1), (4, 1), (5, 2))] + [["dspace", 23, 30, 8, 1]]
    for row in _counted(cases):
        assert row["path"] == "dspace"
        want = dspace_macs(row["d"], row["N"], row["K"], row["H"])[0]
        assert row["macs"] == want, row


def test_token_path_full_layer_count():
    """One more full layer on the token path costs what the model says (forward C, M and
    pre; backward G, dA, V, dB, dE, dC, dE_ctx). The query-only last layer's own loops are
    written inline and counted analytically only."""
    cases = [["tokens", 5, 6, K, H] for H in (1, 2) for K in (2, 3, 4)]
    rows = _counted(cases)
    for H in (1, 2):
        r = {row["K"]: row["macs"] for row in rows if row["H"] == H}
        for K in (3, 4):
            want = token_macs(5, 6, K, H, 1)[0] - token_macs(5, 6, K - 1, H, 1)[0]
            assert r[K] - r[K - 1] == want, (H, K, r)


def test_path_rule_matches_the_backend():
    assert choose_path(40, 80, 4) == "dspace" and choose_path(10, 10, 6) == "tokens"
    assert choose_path(40, 80, 1) == "tokens" and choose_path(40, 20, 4) == "tokens"
    assert step_cost(10, 10, 2048, 1)["path"] == "tokens" and step_cost(40, 80, 1024, 4)["path"] == "dspace"


def test_sine_step_bound_counts_the_dense_products():
    """By hand for the paper's sizes (N = 10, T = 11, S = 10, width 40, hidden 160, key 40):
    embed 2 * 11 * 2 * 40 = 1760; MLP 2 products x 3 (forward, dW, dX) x 11 * 40 * 160
    = 422400; LSA 3 x (16000 + 16000 + 1600 + 400 + 400 + 1600) = 108000."""
    from benchmarks.costs import sine_step_cost

    c = sine_step_cost(10, 2048)
    assert c["macs_per_task"] == 1760 + 422400 + 108000
    assert c["flops"] == 2 * 2048 * (1760 + 422400 + 108000)
