"""The GPU benchmark program (benchmarks/gpu.py), as far as it runs without a GPU.

* its analytic FLOP count equals the matmul FLOPs the covariance-form code really
  performs (counted by a NumPy proxy that tallies every matmul / tensordot);
* without a GPU it exits with status 2 and the reason, and writes nothing;
* its verify -> time -> JSON flow, run with the CuPy backend's host twin standing in
  for the device (machine info faked), produces complete rows, and a wrong
  implementation is caught by the verification and never timed;
* the PyTorch / JAX peers match the NumPy reference in float64 on the CPU.

No test here times anything for a result: the timings in the flow test are thrown away.
"""

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from benchmarks import gpu
from reference import build_tokens, sample_tasks
from reference.backends._cupy_kernels import HostKernels
from reference.backends._cupy_step import FusedEngine, FusedStepper, HostDraw
from reference.optim import AdamHP


class CountingNumpy:
    """numpy, with every matmul / tensordot's FLOPs (2 per multiply-add) added up."""

    def __init__(self):
        self.flops = 0

    def __getattr__(self, name):
        return getattr(np, name)

    def matmul(self, a, b):
        out = np.matmul(a, b)
        self.flops += 2 * out.size * a.shape[-1]
        return out

    def tensordot(self, a, b, axes):
        out = np.tensordot(a, b, axes)
        self.flops += 2 * out.size * int(np.prod([a.shape[i] for i in axes[0]]))
        return out


@pytest.mark.parametrize("K", [1, 2, 4])
def test_step_cost_counts_the_algorithms_matmul_flops(K):
    cfg = dict(d=3, N=5, B=4, K=K)
    arch, _, _ = gpu.settings(cfg)
    params = gpu.init_params(cfg, dtype=np.float64)
    t = sample_tasks(np.random.default_rng(0), 4, 3, 5, dtype=np.float64)
    xp = CountingNumpy()
    engine = FusedEngine(arch, AdamHP(), np.float64, xp, HostKernels())   # what the CuPy backend runs, on xp
    engine.loss_and_grads(build_tokens(t.X, t.Y, t.x_q), t.y_q, params, 3)
    D = 4
    param_sized = K * (2 * 2 * D ** 3 + 4 * 2 * D ** 3)   # merge KQ, PV; unmerge 4 grads (left out of step_cost)
    flops, nbytes = gpu.step_cost(cfg)
    assert xp.flops == flops + param_sized
    assert nbytes > 0


def test_exits_with_the_reason_without_a_gpu(tmp_path):
    from reference.backends import cupy_backend

    try:
        cupy_backend.require_cupy()
        pytest.skip("a GPU is present here; the no-GPU exit path cannot be shown")
    except RuntimeError:
        pass
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--json", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "benchmarks.gpu: cannot run:" in r.stderr and "pip install icgd[gpu]" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


class HostTwinImpl(gpu.IcgdCupy):
    """gpu.IcgdCupy with the backend's host twin in place of CuPy and the device."""

    def __init__(self, cfg, wrong=False):
        self.cfg, self.wrong = cfg, wrong
        self.cupy = types.SimpleNamespace(asarray=np.asarray)

        def make_stepper(arch, hp, spec, seed, dtype):
            if wrong:   # a planted bug: the learning rate tripled
                hp = hp._replace(lr=hp.lr * 3)
            return FusedStepper(arch, hp, spec, seed, dtype, np, HostKernels(), HostDraw())

        self.cb = types.SimpleNamespace(make_stepper=make_stepper)

    def sync(self):
        pass


def _fake_gpu(monkeypatch, wrong=False):
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    monkeypatch.setattr(gpu, "require_gpu", lambda: types.SimpleNamespace(get_default_memory_pool=lambda: pool))
    monkeypatch.setattr(gpu, "machine_info", lambda cupy, a, b: {
        "gpu": "host twin (no GPU)", "compute_capability": "0.0", "sms": 0, "peak_fp32_tflops": 1.0,
        "peak_gbps": 100.0, "cupy": None, "torch": None, "jax": None})
    monkeypatch.setattr(gpu, "CONFIGS", {"tiny": dict(d=3, N=5, B=32, K=4)})
    monkeypatch.setattr(gpu, "make_impl", lambda name, cfg, on_cpu=False: HostTwinImpl(cfg, wrong))


def test_verify_time_json_flow(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch)
    out = tmp_path / "gpu.json"
    rc = gpu.main(["--configs", "tiny", "--impls", "icgd-cupy", "--json", str(out), "--warmup", "1",
                   "--repeats", "3", "--target-ms", "1", "--verify-batch", "8"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["gpu"] == "host twin (no GPU)"
    (row,) = doc["rows"]
    assert row["status"] == "ok" and row["verify_ok"] and row["verify_rel_err"] < 1e-12
    for key in ("config", "impl", "ms_median", "ms_p10", "ms_p90", "flop_frac", "bw_frac", "inner"):
        assert row[key] is not None, key
    assert row["ms_p10"] <= row["ms_median"] <= row["ms_p90"] and row["loss_finite"]


def test_a_wrong_implementation_fails_verification_and_is_not_timed(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, wrong=True)
    out = tmp_path / "gpu.json"
    rc = gpu.main(["--configs", "tiny", "--impls", "icgd-cupy", "--json", str(out), "--verify-batch", "8"])
    assert rc == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "verify-failed" and "MISMATCH" in row["verify_detail"] and "ms_median" not in row


def test_peers_match_the_reference_on_cpu():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--check-peers-cpu", "--configs", "a",
                        "--impls", "torch-eager,jax-jit"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("PASS") == 2, r.stdout
