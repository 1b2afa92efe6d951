"""The sequence-step benchmark's entry point (``python -m benchmarks seq``), its protocol
with the peer processes (faked here: no jax or torch needed) and, where torch is
importable, the PyTorch peer ``benchmarks/peers/seq_torch.py`` itself (its float64
verification accepts the right model and refuses a wrong one)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_m_benchmarks_seq_help_works():
    res = subprocess.run([sys.executable, "-m", "benchmarks", "seq", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m benchmarks seq")
    for word in ("--peer-python", "--peers", "jax-jit", "torch-eager", "torch-compile"):
        assert word in res.stdout


def test_without_a_subcommand_python_m_benchmarks_is_the_lsa_benchmark(monkeypatch):
    import benchmarks.__main__ as entry

    seen = []
    monkeypatch.setattr(entry, "main", lambda argv=None: seen.append(argv) or 0)
    assert entry.dispatch(["--configs", "a"]) == 0
    monkeypatch.setattr(sys, "argv", ["benchmarks"])
    assert entry.dispatch() == 0
    assert seen == [["--configs", "a"], None]


@pytest.mark.parametrize("args", [["--peers", "torch"], ["--peers", "jax-jit,jax-jit"], ["--configs", "lsa3"],
                                  ["--configs", ","], ["--repeats", "0"], ["--warmup", "-1"]])
def test_seq_refuses_bad_names_and_counts_before_any_work(monkeypatch, capsys, args):
    import benchmarks.__main__ as entry
    from benchmarks import seq

    started = []
    monkeypatch.setattr(seq, "verify", lambda cfg: started.append(cfg))
    with pytest.raises(SystemExit) as e:
        entry.dispatch(["seq"] + args)
    assert e.value.code == 2
    assert args[0] in capsys.readouterr().err
    assert not started


def _fake_benchmark(monkeypatch, verdicts):
    """benchmarks.seq with our verification and timing faked and each peer process faked
    to print a row with the verdict ``verdicts[impl]`` (None: the process prints nothing)."""
    from benchmarks import seq

    calls = []
    monkeypatch.setattr(seq, "verify", lambda cfg: {"float64": (True, 1e-16), "float32": (True, 1e-7)})
    monkeypatch.setattr(seq, "time_steps", lambda cfg, impl, r, w: dict(median_ms=1.0))

    real_run = subprocess.run

    def run(cmd, **kw):
        if "-m" not in cmd or not str(cmd[cmd.index("-m") + 1]).startswith("benchmarks.peers."):
            return real_run(cmd, **kw)                  # platform.processor() runs uname
        calls.append(cmd)
        impl = cmd[cmd.index("--impl") + 1] if "--impl" in cmd else "jax-jit"
        config = cmd[cmd.index("--config") + 1]
        v = verdicts[impl]
        out = "" if v is None else "log line\n" + json.dumps(dict(config=config, impl=impl, load="0", verified=v))
        return subprocess.CompletedProcess(cmd, 0 if v is None or v.startswith(("yes", "skipped")) else 1, out,
                                           "Traceback: no torch" if v is None else "")

    monkeypatch.setattr(subprocess, "run", run)
    return seq, calls


def test_seq_runs_the_torch_peers_beside_the_jax_peer_with_the_same_python(monkeypatch, capsys):
    seq, calls = _fake_benchmark(monkeypatch, {"jax-jit": "yes (f64 1e-15)", "torch-eager": "yes (f64 2e-15)",
                                               "torch-compile": "skipped (torch.compile failed)"})
    assert seq.main(["--configs", "lsa1,mesa", "--repeats", "1", "--peer-python", "/some/python"]) == 0
    assert [c[0] for c in calls] == ["/some/python"] * 6
    mods = [(c[c.index("-m") + 1], c[c.index("--config") + 1], c[c.index("--impl") + 1] if "--impl" in c else None)
            for c in calls]
    assert mods == [("benchmarks.peers.seq_jax", "lsa1", None), ("benchmarks.peers.seq_torch", "lsa1", "torch-eager"),
                    ("benchmarks.peers.seq_torch", "lsa1", "torch-compile"),
                    ("benchmarks.peers.seq_jax", "mesa", None), ("benchmarks.peers.seq_torch", "mesa", "torch-eager"),
                    ("benchmarks.peers.seq_torch", "mesa", "torch-compile")]
    table = capsys.readouterr().out
    assert "| mesa | torch-eager |" in table and "| lsa1 | torch-compile |" in table and "skipped" in table


@pytest.mark.parametrize("verdicts", [{"torch-eager": "NO (f64 1e-3, update 0.0e+00)"}, {"torch-eager": None}])
def test_seq_fails_when_a_torch_peer_fails_verification_or_does_not_run(monkeypatch, capsys, verdicts):
    seq, calls = _fake_benchmark(monkeypatch, verdicts)
    assert seq.main(["--configs", "lsa1", "--repeats", "1", "--peer-python", "py", "--peers", "torch-eager"]) == 1
    assert len(calls) == 1
    out = capsys.readouterr().out
    assert "| lsa1 | torch-eager |" in out and "NO" in out


# ---- the PyTorch peer itself (skipped where torch is not importable, as in the CI venv) ----------

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["lsa2", "mesa"])
def test_torch_peer_verifies_loss_gradients_and_update_in_float64(torch, name):
    from benchmarks.peers.seq_torch import verify

    ok, worst_g, worst_u = verify(torch, name, "torch-eager", B=4)
    assert ok and worst_g < 1e-12 and worst_u < 1e-10


@pytest.mark.parametrize("name, model", [("lsa1", dict(mask=0)), ("mesa", dict(mask=10)), ("lsa2", dict(kind="mesa"))])
def test_torch_peer_verification_refuses_a_different_model(torch, name, model):
    from benchmarks.peers.seq_torch import verify

    try:
        ok = verify(torch, name, "torch-eager", B=4, model=model)[0]
    except (ValueError, TypeError, RuntimeError):   # a mesa layer on LSA parameters cannot even run
        ok = False
    assert not ok


def test_torch_peer_does_not_time_what_fails_verification(torch, monkeypatch, capsys):
    from benchmarks.peers import seq_torch

    monkeypatch.setattr(seq_torch, "verify", lambda *a, **kw: (False, 1e-3, 0.0))
    monkeypatch.setattr(seq_torch, "time_step", lambda *a, **kw: pytest.fail("timed an unverified peer"))
    assert seq_torch.main(["--config", "lsa1"]) == 1
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["impl"] == "torch-eager" and row["verified"].startswith("NO")


def test_torch_peer_skips_torch_compile_where_it_does_not_work(torch, monkeypatch, capsys):
    from benchmarks.peers import seq_torch

    monkeypatch.setattr(seq_torch, "probe_compile", lambda torch: "torch.compile failed on a probe function: X")
    monkeypatch.setattr(seq_torch, "verify", lambda *a, **kw: pytest.fail("verified a peer that cannot compile"))
    assert seq_torch.main(["--config", "mesa", "--impl", "torch-compile"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["impl"] == "torch-compile" and row["verified"].startswith("skipped (torch.compile failed")


def test_seq_step_cost_is_the_hand_count():
    """lsa1 (1 layer, 2 heads, key = value = 20, T = 50, mask 20, the first 10 token channels
    zero) per head: projections 50 * 20 * 60, attention min(1275 * 40, 2 * 50 * 400), the
    output to the 10 read channels 50 * 20 * 10; backward: the weight gradients only for
    the projections (layer 0's input is data), twice the rest."""
    from benchmarks.costs import seq_step_cost

    per_head = (60000 + 40000 + 10000) + (60000 + 2 * 40000 + 2 * 10000)
    assert seq_step_cost(1, 2, mask=20)["flops"] == 2 * 256 * 2 * per_head
    # a second layer reads all 40 channels and needs its input gradient; the mesa layer adds 3 T key^2 each way
    two = seq_step_cost(2, 1)
    first = 50 * 30 * 60 + 40000 + 50 * 20 * 40
    second = 50 * 40 * 60 + 40000 + 10000
    assert two["macs_per_sequence"] == (first + 50 * 30 * 60 + 80000 + 2 * 50 * 20 * 40) + (second + 2 * second)
    assert seq_step_cost(1, 1, mesa=True)["macs_per_sequence"] - seq_step_cost(1, 1)["macs_per_sequence"] == 6 * 50 * 400


def test_seq_summary_compares_with_the_best_verified_peer_and_the_bound():
    from benchmarks import seq
    from benchmarks.costs import seq_step_cost

    rows = [dict(config="lsa1", impl="numba", median_ms=10.0), dict(config="lsa1", impl="numpy", median_ms=90.0),
            dict(config="lsa1", impl="jax-jit", median_ms=20.0, verified="yes (f64 1e-15)"),
            dict(config="lsa1", impl="torch-eager", median_ms=5.0, verified="NO (f64 1e-3)"),
            dict(config="lsa1", impl="torch-compile", verified="skipped (no compiler)")]
    s = seq.summarise(rows, gflops=100.0)["lsa1"]
    bound = 1e3 * seq_step_cost(1, 2, mask=20)["flops"] / 100e9
    assert s["best_peer"] == "jax-jit" and s["numba_over_best_peer"] == 2.0
    assert s["bound_ms"] == round(bound, 3) and s["max_possible_lead"] == round(20.0 / bound, 2)
    assert "| lsa1 |" in "\n".join(seq.summary_lines({"lsa1": s}, 100.0))
