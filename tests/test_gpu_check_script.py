"""benchmarks/gpu_check.sh (issue #19) in dry-run mode, and its step-1 exit path.

Dry run: every ranked step is printed with its timeout, in order, and summarised; the
commit is recorded (from git, or from a COMMIT file in a copy of the tree without
.git). Without CuPy, step 1 fails cleanly and the run ends with status 1 and a
summary. Fast: nothing but the CuPy import probe is executed.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["0", "1", "2", "3a", "3b", "4", "5", "6"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(script, out, **env):
    e = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=e, timeout=60)


def test_dry_run_prints_every_step_with_its_timeout(tmp_path):
    r = _run(SCRIPT, tmp_path / "out", GPU_CHECK_DRY_RUN="1", GPU_CHECK_T2="77")
    assert r.returncode == 0, r.stderr
    heads = [line for line in r.stdout.splitlines() if line.startswith("=== step ")]
    assert [h.split()[2].rstrip(":") for h in heads] == STEPS
    assert "=== step 2: pytest-gpu (timeout 77s) ===" in heads
    for cmd in ("pip install --no-deps --no-build-isolation -e .", "-m pytest -m gpu -rs -x",
                "train one_layer --backend cupy", "-m benchmarks.gpu_step_check --engine cupy",
                "-m benchmarks.gpu --configs a,b,c --impls icgd-cupy,icgd-cupy-reference,jax-jit,torch-eager",
                "-m benchmarks.gpu --large"):
        assert cmd in r.stdout, cmd
    summary = (tmp_path / "out" / "SUMMARY.txt").read_text()
    assert [line.split()[0] for line in summary.splitlines()[2:]] == STEPS
    assert all(" DRY " in line for line in summary.splitlines()[2:])
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert (tmp_path / "out" / "COMMIT").read_text().strip() == head.stdout.strip()
    # the default steps 1-4 fit in about 8 minutes
    t = {h.split()[2].rstrip(":"): int(h.split("timeout ")[1].rstrip("s) =")) for h in
         _run(SCRIPT, tmp_path / "o2", GPU_CHECK_DRY_RUN="1").stdout.splitlines() if h.startswith("=== step ")}
    assert sum(t[s] for s in ("1", "2", "3a", "3b", "4")) <= 8 * 60


def test_commit_file_stands_in_for_git(tmp_path):
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "benchmarks" / "gpu_check.sh")
    (tree / "COMMIT").write_text("0123abcd\n")
    r = _run(tree / "benchmarks" / "gpu_check.sh", tmp_path / "out", GPU_CHECK_DRY_RUN="1",
             GPU_CHECK_STEPS="1", GIT_CEILING_DIRECTORIES=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "commit 0123abcd (COMMIT file)" in r.stdout
    assert (tmp_path / "out" / "COMMIT").read_text().strip() == "0123abcd"


def test_step_one_fails_cleanly_without_cupy(tmp_path):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here; the no-CuPy path cannot be shown")
    except Exception:  # noqa: BLE001
        pass
    r = _run(SCRIPT, tmp_path / "out", GPU_CHECK_STEPS="1")
    assert r.returncode == 1
    assert "=== step 1: FAIL (rc 1," in r.stdout and "No module named 'cupy'" in r.stdout
    summary = (tmp_path / "out" / "SUMMARY.txt").read_text()
    assert "cupy-info      FAIL" in summary and (tmp_path / "out" / "step-1-cupy-info.log").exists()


def test_step_check_host_twin_agrees_and_no_gpu_exit(tmp_path, capsys):
    from benchmarks import gpu_step_check

    out = tmp_path / "s.json"
    assert gpu_step_check.main(["--engine", "host-twin", "--configs", "a,c", "--batch", "32", "--steps", "2",
                                "--json", str(out)]) == 0
    assert "4/4 steps agree" in capsys.readouterr().out and out.exists()
    try:
        import cupy  # noqa: F401
    except Exception:  # noqa: BLE001
        assert gpu_step_check.main(["--configs", "a"]) == 2
        assert "cannot run" in capsys.readouterr().err


def test_benchmark_large_flag():
    from benchmarks import gpu

    assert set(gpu.LARGE_CONFIGS) <= set(gpu.CONFIGS) and gpu.CONFIGS["a64k"]["B"] == 65536
    with pytest.raises(SystemExit):
        gpu.main(["--large", "--configs", "a"])
