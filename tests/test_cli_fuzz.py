"""Bad command-line values, drawn by Hypothesis, for ``icgd train`` (every config field),
``python -m verify`` / ``icgd prove`` and the benchmarks' programs; and Ctrl-C.

Every bad value must give a message naming the option or field and exit code 2 before any
work: no traceback, no claim run, no run directory made, no worker started. ``icgd train``
is called with ``--dry-run`` (nothing is trained; the checks are the same as for a run).
Ctrl-C gives "interrupted ..." and exit code 130, with no half-written file.

The strategies are here, not in tests/strategies.py: they draw command-line text, not
arrays.
"""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.config import LEAVES, MAX_STEPS, dotted_name
from verify.experiments import EXPERIMENTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = EXPERIMENTS["one_layer"].config


def call(fn, argv):
    """(exit code, stdout, stderr) of an in-process CLI call: argparse's SystemExit counts
    as its code; any other exception propagates (a traceback is a failure)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = fn(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_refused(rc, err, *names):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert any(n in err for n in names), (names, err)


# ---- icgd train: the config fields ------------------------------------------------------

def _base_type(tp):
    """(int / float / bool / str, optional?) of a field's annotation."""
    opts = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    base = [t for t in opts if t is not type(None)]
    return base[0], type(None) in opts


FIELDS = {name: (group, *_base_type(tp)) for (group, name), tp in LEAVES.items() if name != "experiment"}
TRAIN_OPTIONS = ("out", "set", "resume", "overwrite", "list", "dry-run", "no-plots", "quiet", "help")
VALID_BACKEND = "numpy"


def train(argv, tmp):
    """icgd train one_layer ARGV --dry-run into a run directory that must not appear."""
    from verify import cli

    extra = [] if any(a.startswith(("--backend", "--set=backend")) for a in argv) \
        else [f"--set=backend={VALID_BACKEND}"]
    return call(cli.main, ["train", "one_layer", *extra, *argv, "--out", str(tmp / "run"), "--dry-run"])


def spelled(name, value, how):
    """The override of field ``name`` as --NAME=V, --set=NAME=V or --set=GROUP.NAME=V."""
    if how == "option":
        return f"--{name}={value}"
    return f"--set={name if how == 'flat' else dotted_name(name)}={value}"


def spellings(name):
    group = FIELDS[name][0]
    return st.sampled_from(("option", "flat", "dotted") if group else ("option", "flat"))


NO_KEYWORD = st.text(alphabet="qxzjkQXZJK#@", min_size=1, max_size=6)   # no number, bool or 'none'


def wrong_type(base):
    if base is int:
        return st.one_of(st.sampled_from(["abc", "1.5", "2.5e0", "nan", "inf", "-inf", "", "true", "0x10", "1e400",
                                          "1,000"]), NO_KEYWORD)
    if base is float:
        return st.one_of(st.sampled_from(["abc", "", "true", "1,5", "0x1p3", "1.0.0"]), NO_KEYWORD)
    if base is bool:
        return st.one_of(st.sampled_from(["2", "-1", "0.5", "", "maybe", "none"]), NO_KEYWORD)
    return None


NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "-Infinity", "1e999", "-1e999"])


def out_of_range(name):
    """Values the config's checks refuse for ``name`` (its docs and reference/config.py)."""
    ints_ge1 = ("d", "N", "d_y", "batch", "n_layers", "heads", "steps", "eval_tasks", "eval_every",
                "checkpoint_every", "line_search_tasks", "gdpp_batch", "ood_tasks", "rollout_steps",
                "key_size", "value_size", "diverge_evals")
    if name in ints_ge1:
        s = st.integers(max_value=0)
        if name == "steps":
            s = st.one_of(s, st.integers(min_value=MAX_STEPS, max_value=10 ** 30))
        if name == "checkpoint_every":
            s = st.one_of(s, st.integers(1, 10 ** 6).filter(lambda v: v % BASE.eval.eval_every))
        if name == "eval_every":
            s = st.one_of(s, st.integers(1, 10 ** 6).filter(lambda v: BASE.eval.checkpoint_every % v))
        return s.map(str)
    if name == "n_distractors":
        return st.one_of(st.integers(max_value=-1), st.integers(min_value=BASE.data.N + 1)).map(str)
    if name in ("seed", "eval_seed", "gdpp_steps"):
        return st.integers(max_value=-1).map(str)
    finite = dict(allow_nan=False, allow_infinity=False)
    if name in ("w_scale", "noise_std", "eps"):
        return st.floats(max_value=-1e-6, **finite).map(repr)
    if name in ("init_scale", "lr", "gdpp_lr", "rollout_damping", "token_clip", "grad_clip"):
        return st.floats(max_value=0.0, **finite).map(repr)
    if name == "diverge_factor":
        return st.floats(max_value=1.0, **finite).map(repr)
    if name in ("b1", "b2", "gdpp_b2"):
        return st.one_of(st.floats(max_value=-1e-9, **finite), st.floats(min_value=1.0, **finite)).map(repr)
    if name == "x_low":
        return st.floats(min_value=BASE.data.x_high, **finite).map(repr)
    if name == "x_high":
        return st.floats(max_value=BASE.data.x_low, **finite).map(repr)
    if name == "dtype":
        return st.text(max_size=8).filter(lambda s: s.strip() not in ("float32", "float64"))
    if name == "backend":
        from reference.backends import backend_names

        return st.text(max_size=8).filter(lambda s: s.strip() not in backend_names())
    if name in ("recurrent", "merged", "causal"):
        return wrong_type(bool)
    if name == "layers":
        return st.sampled_from(["[", "[]", "{}", "[1]", '[{"kind": "no_such_kind"}]', '[{"kind": "lsa", "heads": 0}]',
                                '[{"kind": "embed", "width": 1}]', '[{"kind": "posenc"}]'])
    if name in ("task", "sine_phase", "tokens"):
        from reference.config import SINE_PHASES, TASKS, TOKEN_KINDS

        known = {"task": TASKS, "sine_phase": SINE_PHASES, "tokens": TOKEN_KINDS}[name]
        return st.text(max_size=8).filter(lambda s: s.strip() not in known)
    if name == "amp_low":        # above amp_high, and read by the sine task only
        return st.floats(min_value=BASE.data.amp_high, **finite).map(repr)
    if name == "amp_high":
        return st.floats(max_value=BASE.data.amp_low, **finite).map(repr)
    if name == "seq_variant":    # not a variant (and read by the lds task only)
        from reference.sequences import VARIANTS

        return st.text(max_size=8).filter(lambda s: s.strip() not in VARIANTS)
    if name in ("seq_len", "seq_dim"):
        return st.integers(max_value=0).map(str)
    if name == "input_mask":
        return st.integers(max_value=-1).map(str)
    if name in ("init_std", "elementwise_clip"):
        return st.floats(max_value=0.0, **finite).map(repr)
    if name == "weight_decay":
        return st.floats(max_value=-1e-6, **finite).map(repr)
    raise AssertionError(f"no out-of-range values for field {name!r}: add them here")


def bad_value(name):
    """Any value this test knows to be bad for field ``name``."""
    _, base, _ = FIELDS[name]
    options = [out_of_range(name)]
    if wrong_type(base) is not None:
        options.append(wrong_type(base))
    if base is float:
        options.append(NON_FINITE)
    return st.one_of(options)


@st.composite
def bad_field_value(draw):
    name = draw(st.sampled_from(sorted(FIELDS)))
    return name, draw(bad_value(name)), draw(spellings(name))


def test_every_field_has_bad_values():
    for name in FIELDS:
        bad_value(name)


@given(bad_field_value())
def test_train_refuses_a_bad_value_of_any_field_before_work(tmp_path_factory, case):
    name, value, how = case
    tmp = tmp_path_factory.mktemp("bad")
    rc, _, err = train([spelled(name, value, how)], tmp)
    assert_refused(rc, err, name)
    assert not (tmp / "run").exists()


def valid_text(name):
    v = BASE.get(name) if name != "backend" else VALID_BACKEND
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


@given(st.sampled_from(sorted(FIELDS)).flatmap(lambda n: st.tuples(st.just(n), spellings(n), spellings(n),
                                                                     st.booleans())))
def test_train_refuses_a_field_given_twice_in_any_spelling(tmp_path_factory, case):
    """Twice, with the same or different (valid) values: --lr, --set lr=, --set optim.lr=."""
    name, how1, how2, same = case
    v1 = valid_text(name)
    v2 = v1 if same else {"none": "1", "true": "false", "false": "true"}.get(v1, v1 + "0" if v1[-1].isdigit()
                                                                              else v1)
    rc, _, err = train([spelled(name, v1, how1), spelled(name, v2, how2)], tmp_path_factory.mktemp("dup"))
    assert_refused(rc, err, name)
    assert "given twice" in err, err


@given(st.from_regex(r"\A[a-z][a-z_]{0,14}\Z").filter(lambda k: k not in FIELDS and k not in TRAIN_OPTIONS
                                                      and k != "experiment"),
       st.sampled_from(["option", "set", "dotted"]))
def test_train_refuses_an_unknown_key(tmp_path_factory, key, how):
    """Unknown names, including prefixes of real ones (``--ste`` is not ``--steps``)."""
    arg = {"option": f"--{key}=1", "set": f"--set={key}=1", "dotted": f"--set=optim.{key}=1"}[how]
    rc, _, err = train([arg], tmp_path_factory.mktemp("unk"))
    assert_refused(rc, err, key)


@pytest.mark.parametrize("argv", [["--ste=5"], ["--eval_e=50"], ["--l=0.1"]])
def test_train_refuses_an_abbreviated_field(argv, tmp_path):
    rc, _, err = train(argv, tmp_path)
    assert_refused(rc, err, argv[0].split("=")[0])


@given(st.sampled_from(sorted(FIELDS)),
       st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12))
def test_train_takes_any_text_for_any_field_without_a_traceback(tmp_path_factory, name, text):
    tmp = tmp_path_factory.mktemp("any")
    rc, _, err = train([spelled(name, text, "flat")], tmp)
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 2:     # the field named, or the memory estimate (a product of several sizes) refused
        assert name in err or "of memory" in err, err
    assert not (tmp / "run").exists()


@pytest.mark.parametrize("argv", [["--set=lr=1e-3", "--set=lr=2e-3"], ["--lr=1e-3", "--lr=2e-3"],
                                  ["--set=lr=1e-3", "--lr=1e-3"], ["--steps=5", "--set=steps=5"]])
def test_train_refuses_the_issue_s_duplicates(argv, tmp_path):
    rc, _, err = train(argv, tmp_path)
    assert_refused(rc, err, "given twice")


def test_train_refuses_resume_with_overwrite(tmp_path):
    rc, _, err = train(["--resume", "--overwrite"], tmp_path)
    assert_refused(rc, err, "--overwrite")


def test_train_refuses_set_without_a_value_and_a_bad_spelling(tmp_path):
    for argv in (["--set=lr"], ["--set="], ["--set==1"]):
        rc, _, err = train(argv, tmp_path)
        assert_refused(rc, err, "--set", "unknown config field")


# ---- python -m verify and icgd prove ------------------------------------------------------

class FakeClaims:
    """The registry reduced to one claim that records whether it ran."""

    def __init__(self, monkeypatch, module="tests.fake"):
        from verify import registry

        self.ran = []
        claim = registry.Claim("fake.one", "a fake claim", "-", "-", self.fn, module=module)
        monkeypatch.setattr(registry, "discover", lambda: {"fake.one": claim})
        monkeypatch.setattr(registry, "import_errors", lambda: {})
        monkeypatch.setattr(registry, "import_error_rows", lambda: [])

    def fn(self, ctx):
        from verify.registry import Outcome

        self.ran.append(ctx.seed)
        return Outcome.at_most(0.0, 1.0, "fake")


def verify_main(argv):
    from verify import runner

    return runner.main(argv)


SEPARATORS_ONLY = st.text(alphabet=" ,\t", max_size=5)
BAD_SEED = st.one_of(st.integers(max_value=-1).map(str), NO_KEYWORD, st.sampled_from(["1.5", "", "nan", "1e3"]))


@given(st.one_of(st.tuples(st.just("--only"), SEPARATORS_ONLY), st.tuples(st.just("--seed"), BAD_SEED),
                 st.tuples(st.sampled_from(["--json", "--markdown"]), st.just(""))))
def test_verify_refuses_bad_option_values_before_any_claim_runs(case):
    option, value = case
    with pytest.MonkeyPatch.context() as mp:
        claims = FakeClaims(mp)
        rc, _, err = call(verify_main, [f"{option}={value}"])
    assert_refused(rc, err, option)
    assert not claims.ran


@given(st.text(alphabet="QXZ#", min_size=1, max_size=5))
def test_verify_only_matching_nothing_is_refused(pattern):
    with pytest.MonkeyPatch.context() as mp:
        claims = FakeClaims(mp)
        rc, _, err = call(verify_main, ["--only", pattern])
    assert_refused(rc, err, "no claim matches")
    assert not claims.ran


def test_verify_refuses_a_workdir_that_is_a_file_when_training_claims_run(monkeypatch, tmp_path):
    claims = FakeClaims(monkeypatch, module="verify.claims_training")
    (tmp_path / "f").write_text("x")
    rc, _, err = call(verify_main, ["--workdir", str(tmp_path / "f")])
    assert_refused(rc, err, "--workdir")
    assert not claims.ran
    claims = FakeClaims(monkeypatch)        # no training claim: the workdir is not used
    rc, _, err = call(verify_main, ["--workdir", str(tmp_path / "f")])
    assert rc == 0 and claims.ran, err


def prove_main(argv):
    from verify import cli

    return cli.main(["prove", *argv])


@given(st.one_of(st.tuples(st.just("--only"), SEPARATORS_ONLY), st.tuples(st.just("--seed"), BAD_SEED),
                 st.tuples(st.just("--json"), st.just(""))))
def test_prove_refuses_bad_option_values_before_any_proof(case):
    from symbolic import core

    ran, (option, value) = [], case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core, "run_theorem", lambda t, **kw: ran.append(t))
        rc, _, err = call(prove_main, [f"{option}={value}"])
    assert_refused(rc, err, option)
    assert not ran


# ---- the benchmarks ---------------------------------------------------------------------------

NOT_POSITIVE_INT = st.one_of(st.integers(max_value=0).map(str), NO_KEYWORD, st.sampled_from(["1.5", "", "nan"]))
NEGATIVE_INT = st.one_of(st.integers(max_value=-1).map(str), NO_KEYWORD, st.sampled_from(["1.5", ""]))
NOT_POSITIVE_FLOAT = st.one_of(st.floats(max_value=0.0, allow_nan=False).map(repr), NON_FINITE, NO_KEYWORD)
UNKNOWN_NAMES = st.one_of(SEPARATORS_ONLY, st.text(alphabet="qxz", min_size=1, max_size=4).map(lambda s: "a," + s))


def whole_run_bad():
    return st.one_of(st.tuples(st.sampled_from(["--steps", "--batch", "--eval-every", "--eval-tasks"]),
                               NOT_POSITIVE_INT),
                     st.tuples(st.just("--backends"), st.one_of(SEPARATORS_ONLY, st.sampled_from(
                         ["foo", "numpy,foo", "numpy,numpy", "numba,,x"]))))


@given(whole_run_bad())
def test_whole_run_refuses_bad_values_before_starting_a_worker(case):
    from benchmarks import whole_run

    started, (option, value) = [], case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(whole_run.subprocess, "run", lambda *a, **kw: started.append(a))
        rc, _, err = call(whole_run.main, [f"{option}={value}"])
    assert_refused(rc, err, option)
    assert not started


def bench_bad():
    return st.one_of(st.tuples(st.sampled_from(["--repeats", "--timeout", "--threads"]), NOT_POSITIVE_INT),
                     st.tuples(st.just("--warmup"), NEGATIVE_INT),
                     st.tuples(st.sampled_from(["--configs", "--impls"]), UNKNOWN_NAMES))


@given(bench_bad())
def test_bench_refuses_bad_values_before_starting_a_worker(case):
    from benchmarks import bench

    started, (option, value) = [], case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run_worker_process", lambda *a, **kw: started.append(a) or {})
        mp.setattr(bench, "machine_info", lambda: started.append("machine") or {})
        rc, _, err = call(bench.main, [f"{option}={value}"])
    assert_refused(rc, err, option)
    assert not started


def gpu_bad():
    return st.one_of(st.tuples(st.sampled_from(["--repeats", "--verify-batch"]), NOT_POSITIVE_INT),
                     st.tuples(st.just("--warmup"), NEGATIVE_INT),
                     st.tuples(st.sampled_from(["--target-ms", "--peak-tflops", "--peak-gbps"]), NOT_POSITIVE_FLOAT),
                     st.tuples(st.sampled_from(["--configs", "--impls"]), UNKNOWN_NAMES))


@given(gpu_bad())
def test_gpu_benchmark_refuses_bad_values_before_any_work(case):
    from benchmarks import gpu

    started, (option, value) = [], case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu, "run", lambda args: started.append(args) or 0)
        mp.setattr(gpu, "check_peers_cpu", lambda args: started.append(args) or 0)
        rc, _, err = call(gpu.main, [f"{option}={value}"])
    assert_refused(rc, err, option)
    assert not started


# ---- Ctrl-C ----------------------------------------------------------------------------------

def test_train_interrupted_names_the_step_and_the_resume_command(monkeypatch, tmp_path):
    from verify import cli, runs

    out = str(tmp_path / "run")

    def interrupted(cfg, out_dir, **kw):
        raise runs.RunInterrupted(37, 20, out_dir)

    monkeypatch.setattr(runs, "train_run", interrupted)
    rc, _, err = call(cli.main, ["train", "one_layer", "--set=backend=numpy", "--out", out, "--quiet"])
    assert rc == 130, err
    assert f"interrupted at step 37; resume with: icgd train --out {out} --resume" in err, err
    assert "Traceback" not in err


def test_train_interrupted_before_a_checkpoint_says_there_is_nothing_to_resume(monkeypatch, tmp_path):
    from verify import cli, runs

    def interrupted(cfg, out_dir, **kw):
        raise runs.RunInterrupted(3, None, out_dir)

    monkeypatch.setattr(runs, "train_run", interrupted)
    rc, _, err = call(cli.main, ["train", "one_layer", "--set=backend=numpy", "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 130 and "interrupted at step 3" in err and "no checkpoint" in err, err


def test_train_interrupted_while_setting_up(monkeypatch, tmp_path):
    from verify import cli, runs

    def interrupted(cfg, out_dir, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train_run", interrupted)
    out = str(tmp_path / "r")
    rc, _, err = call(cli.main, ["train", "one_layer", "--set=backend=numpy", "--out", out, "--quiet"])
    assert rc == 130 and "interrupted before training started; nothing to resume" in err, err
    rc, _, err = call(cli.main, ["train", "one_layer", "--set=backend=numpy", "--out", out, "--quiet", "--resume"])
    assert rc == 130 and f"resume again with: icgd train --out {out} --resume" in err, err


def test_verify_interrupted_writes_no_report(monkeypatch, tmp_path):
    from verify import registry

    def slow(ctx):
        raise KeyboardInterrupt

    claim = registry.Claim("fake.slow", "a claim that is interrupted", "-", "-", slow)
    monkeypatch.setattr(registry, "discover", lambda: {"fake.slow": claim})
    monkeypatch.setattr(registry, "import_errors", lambda: {})
    monkeypatch.setattr(registry, "import_error_rows", lambda: [])
    rc, _, err = call(verify_main, ["--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    assert rc == 130 and "interrupted" in err and "fake.slow" in err, err
    assert os.listdir(tmp_path) == []


def test_prove_interrupted(monkeypatch, tmp_path):
    from symbolic import core

    def interrupted(t, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "run_theorem", interrupted)
    rc, _, err = call(prove_main, ["--only", "prop1.general", "--json", str(tmp_path / "p.json")])
    assert rc == 130 and "interrupted" in err, err
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_a_real_training_run(tmp_path):
    """SIGINT to ``icgd train`` while it trains: exit 130, the message, no temporary or
    half-written file, and a checkpoint that --resume accepts."""
    out = tmp_path / "run"
    sets = ["--set=d=2", "--set=N=3", "--set=batch=8", "--set=eval_every=10", "--set=checkpoint_every=10",
            "--set=eval_tasks=20", "--set=line_search_tasks=20", "--set=gdpp_steps=2", "--set=gdpp_batch=8",
            "--set=backend=numpy"]
    cmd = [sys.executable, "-m", "verify.train_cli", "one_layer", "--steps", "100000000", *sets, "--out", str(out),
           "--no-plots", "--quiet"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.npz").exists():       # wait for training to be under way
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        time.sleep(0.5)                                     # into the training steps
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"resume with: icgd train --out {out} --resume" in stderr, stderr[-3000:]
    assert not [n for n in os.listdir(out) if n.startswith(".")], os.listdir(out)
    from verify import runs

    ck = runs.load_checkpoint(str(out / "checkpoint.npz"))            # whole, and readable by --resume
    assert f"from the checkpoint at step {ck.step})" in stderr, stderr[-3000:]
