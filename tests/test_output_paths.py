"""Output paths of every command that writes a file: ``python -m verify --json/--markdown``,
``icgd prove --json``, the benchmarks' ``--json`` and ``icgd train --out`` (a run directory).

For each kind of path the command either writes correctly or refuses with a message naming
the option and exit code 2 before any work:

- written: a new file, an existing file (replaced atomically, mode kept), a symlink to a
  file (followed: the link stays a link and its target gets the content), a symlink to a
  missing file in an existing folder (the target is created), a path in a missing folder
  (created), a FIFO (written directly, not replaced), a null device, a link to
  /proc/self/fd/1 (what /dev/stdout is: the text comes out on standard output);
- refused before work: a directory, a path under a regular file, a folder nobody may
  create files in (/proc, for root too; a mode-0555 folder unless the tests run as root),
  the empty path;
- a write that fails at the end (a full device): a message naming the option, exit 2, no
  traceback, the device left as it was.

The system's own /dev/null, /dev/full and /dev/stdout are not handed to the writers: as
root a writer that replaces instead of writing would replace the machine's device nodes.
The tests use equal ones made in tmp_path (mknod as root, or the system nodes, which a
non-root process cannot replace) and a link to /proc/self/fd/1.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0
MARK = "fake.output_paths"          # the id of the fake claim; it appears in every report


# ---- kinds of path -------------------------------------------------------------------

def _device(tmp_path, name, system_path):
    """A character device equal to ``system_path``: a copy (mknod) in tmp_path when root,
    the system node otherwise (a non-root process cannot replace it)."""
    if not IS_ROOT:
        return system_path
    path = str(tmp_path / name)
    os.mknod(path, 0o666 | stat.S_IFCHR, os.stat(system_path).st_rdev)
    return path


class Target:
    """One output path made in tmp_path, with what must hold after the command ran."""

    def __init__(self, kind, tmp_path):
        self.kind, self.tmp, self.reader = kind, tmp_path, None
        getattr(self, "make_" + kind)()

    # written ---------------------------------------------------------------------------
    def make_new_file(self):
        self.path = str(self.tmp / "report.out")

    def make_existing_file(self):
        self.path = str(self.tmp / "report.out")
        with open(self.path, "w") as f:
            f.write("old contents\n")
        os.chmod(self.path, 0o640)
        self.ino = os.stat(self.path).st_ino

    def make_symlink_to_file(self):
        self.target = str(self.tmp / "target.out")
        with open(self.target, "w") as f:
            f.write("old contents\n")
        self.path = str(self.tmp / "link.out")
        os.symlink(self.target, self.path)

    def make_dangling_symlink(self):
        self.target = str(self.tmp / "missing.out")
        self.path = str(self.tmp / "link.out")
        os.symlink(self.target, self.path)

    def make_missing_folder(self):
        self.path = str(self.tmp / "a" / "b" / "report.out")

    def make_fifo(self):
        self.path = str(self.tmp / "fifo")
        os.mkfifo(self.path)
        # a reader that does not block: the writer's open then succeeds, and a writer that
        # replaced the FIFO instead leaves the reader at end of file
        self.reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def make_null_device(self):
        self.path = _device(self.tmp, "null", "/dev/null")
        self.rdev = os.stat(self.path).st_rdev

    def make_stdout_link(self):
        self.path = str(self.tmp / "stdout")
        os.symlink("/proc/self/fd/1", self.path)

    # refused before work ---------------------------------------------------------------
    def make_directory(self):
        self.path = str(self.tmp / "dir")
        os.mkdir(self.path)

    def make_under_a_file(self):
        with open(self.tmp / "file", "w") as f:
            f.write("a file, not a folder\n")
        self.path = str(self.tmp / "file" / "report.out")

    def make_proc_folder(self):
        self.path = "/proc/icgd-test-output/report.out"

    def make_read_only_folder(self):
        if IS_ROOT:
            pytest.skip("running as root: permission bits do not stop root (the /proc case covers an "
                        "unwritable folder here)")
        d = self.tmp / "ro"
        d.mkdir()
        d.chmod(0o555)
        self.path = str(d / "report.out")

    def make_empty(self):
        self.path = ""

    # a write that fails at the end -----------------------------------------------------
    def make_full_device(self):
        self.path = _device(self.tmp, "full", "/dev/full")
        self.rdev = os.stat(self.path).st_rdev

    # checks ------------------------------------------------------------------------------
    def written(self, stdout):
        """The text the command wrote there (asserting the path kept its kind)."""
        k = self.kind
        if k in ("new_file", "missing_folder"):
            assert stat.S_ISREG(os.lstat(self.path).st_mode)
            return _read(self.path)
        if k == "existing_file":
            st = os.stat(self.path)
            assert st.st_ino != self.ino, "an existing file must be replaced (atomically), not rewritten in place"
            assert stat.S_IMODE(st.st_mode) == 0o640, oct(st.st_mode)
            return _read(self.path)
        if k in ("symlink_to_file", "dangling_symlink"):
            assert os.path.islink(self.path), "the symlink was replaced instead of followed"
            assert os.readlink(self.path) == self.target
            return _read(self.target)
        if k == "fifo":
            assert stat.S_ISFIFO(os.lstat(self.path).st_mode), "the FIFO was replaced"
            chunks = []
            while True:
                try:
                    b = os.read(self.reader, 1 << 16)
                except BlockingIOError:
                    break
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks).decode()
        if k == "null_device":
            st = os.lstat(self.path)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == self.rdev, "the device node was replaced"
            return None
        if k == "stdout_link":
            assert os.path.islink(self.path) and os.readlink(self.path) == "/proc/self/fd/1"
            return stdout
        raise AssertionError(k)

    def unchanged(self):
        if self.kind == "full_device":
            st = os.lstat(self.path)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == self.rdev, "the device node was replaced"
        elif self.kind == "directory":
            assert os.path.isdir(self.path) and not os.listdir(self.path)
        elif self.kind == "under_a_file":
            assert _read(self.tmp / "file") == "a file, not a folder\n"
        elif self.kind == "proc_folder":
            assert not os.path.exists(os.path.dirname(self.path))
        leftovers = [n for n in os.listdir(self.tmp) if n.startswith(".")]
        assert not leftovers, leftovers

    def close(self):
        if self.reader is not None:
            os.close(self.reader)


def _read(path):
    with open(path) as f:
        return f.read()


WRITTEN = ("new_file", "existing_file", "symlink_to_file", "dangling_symlink", "missing_folder", "fifo",
           "null_device", "stdout_link")
REFUSED = ("directory", "under_a_file", "proc_folder", "read_only_folder", "empty")


@pytest.fixture(params=WRITTEN)
def good(request, tmp_path):
    t = Target(request.param, tmp_path)
    yield t
    t.close()


@pytest.fixture(params=REFUSED)
def bad(request, tmp_path):
    return Target(request.param, tmp_path)


def _outcome(call):
    """The exit code of an in-process CLI call; argparse's exit counts as its code, any
    other exception propagates (a traceback is a failure)."""
    try:
        rc = call()
    except SystemExit as exc:
        rc = exc.code
    return rc


# ---- the commands, each with its work counted ---------------------------------------

class Verify:
    """python -m verify with one fake claim (so "before any claim runs" can be seen)."""

    def __init__(self, monkeypatch, option="--json"):
        from verify import registry

        self.option, self.ran = option, []
        claim = registry.Claim(MARK, "a fake claim", "-", "-", self._claim)
        monkeypatch.setattr(registry, "discover", lambda: {MARK: claim})
        monkeypatch.setattr(registry, "import_errors", lambda: {})
        monkeypatch.setattr(registry, "import_error_rows", lambda: [])

    def _claim(self, ctx):
        from verify.registry import Outcome

        self.ran.append(ctx)
        return Outcome.at_most(0.0, 1.0, "a fake tolerance")

    def __call__(self, path):
        from verify import runner

        return runner.main([self.option, path])

    @property
    def worked(self):
        return bool(self.ran)


class Prove:
    """icgd prove --json on one fast theorem."""

    def __init__(self, monkeypatch):
        from symbolic import core

        self.ran, real = [], core.run_theorem

        def counted(t, **kw):
            self.ran.append(t.id)
            return real(t, **kw)

        monkeypatch.setattr(core, "run_theorem", counted)

    def __call__(self, path):
        from verify import cli

        return cli.main(["prove", "--only", "klayers.step.general", "--brief", "--json", path])

    @property
    def worked(self):
        return bool(self.ran)


class WholeRun:
    """python -m benchmarks.whole_run --json with its worker processes faked."""

    def __init__(self, monkeypatch):
        from benchmarks import whole_run

        self.ran = []

        def fake_run(cmd, **kw):
            self.ran.append(cmd)
            row = {"backend": cmd[cmd.index("--worker") + 1], "total_s": 1.0, "mark": MARK}
            return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")

        monkeypatch.setattr(whole_run.subprocess, "run", fake_run)

    def __call__(self, path):
        from benchmarks import whole_run

        return whole_run.main(["--steps", "2", "--backends", "numpy", "--json", path])

    @property
    def worked(self):
        return bool(self.ran)


class Bench:
    """python -m benchmarks --json with the worker processes and the machine probes faked."""

    def __init__(self, monkeypatch):
        from benchmarks import bench

        self.ran = []

        def fake_worker(args, timeout, threads=None):
            self.ran.append(args)
            return {} if "--rates" in args else {"error": MARK}

        monkeypatch.setattr(bench, "run_worker_process", fake_worker)
        monkeypatch.setattr(bench, "machine_info", lambda: {"cpu": "fake", "simd": "-", "usable_cores": 1, "mem_gib": 1.0,
                                                            "python": "3"})
        monkeypatch.setattr(bench, "versions", lambda: {})

    def __call__(self, path):
        from benchmarks import bench

        return bench.main(["--configs", "a", "--impls", "numpy", "--json", path])

    @property
    def worked(self):
        return bool(self.ran)


class Gpu:
    """python -m benchmarks.gpu --json: only the checks before work (timing needs a GPU)."""

    def __init__(self, monkeypatch):
        from benchmarks import gpu

        self.ran = []
        monkeypatch.setattr(gpu, "run", lambda args: self.ran.append(args) or 0)

    def __call__(self, path):
        from benchmarks import gpu

        return gpu.main(["--json", path])

    @property
    def worked(self):
        return bool(self.ran)


COMMANDS = {"verify --json": lambda mp: Verify(mp, "--json"), "verify --markdown": lambda mp: Verify(mp, "--markdown"),
            "prove --json": Prove, "whole_run --json": WholeRun, "bench --json": Bench}
OPTION = {"verify --json": "--json", "verify --markdown": "--markdown", "prove --json": "--json",
          "whole_run --json": "--json", "bench --json": "--json", "gpu --json": "--json"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_report_is_written_to_every_kind_of_writable_path(command, good, monkeypatch, capfd):
    cmd = COMMANDS[command](monkeypatch)
    rc = _outcome(lambda: cmd(good.path))
    out, err = capfd.readouterr()
    assert rc in (0, 1), (rc, err)      # bench: the fake implementation is "not timed" (1)
    assert "Traceback" not in err, err
    text = good.written(out)
    if text is not None:
        assert MARK in text or "klayers.step.general" in text, text[:500]
    if command == "bench --json":       # the markdown table goes beside a JSON file, not beside a stream
        md = os.path.splitext(good.path)[0] + ".md"
        if good.kind in ("fifo", "null_device", "stdout_link"):
            assert not os.path.exists(md), md
        else:
            assert MARK in _read(md), "the markdown table beside the JSON"


@pytest.mark.parametrize("command", list(COMMANDS) + ["gpu --json"])
def test_an_unusable_report_path_is_refused_before_any_work(command, bad, monkeypatch, capfd):
    cmd = (COMMANDS.get(command) or Gpu)(monkeypatch)
    rc = _outcome(lambda: cmd(bad.path))
    out, err = capfd.readouterr()
    assert rc == 2, (rc, out, err)
    assert OPTION[command] in err, err
    assert "Traceback" not in err, err
    assert not cmd.worked, "the work ran before the output path was checked"
    bad.unchanged()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_write_that_fails_at_the_end_says_so_and_leaves_the_device(command, tmp_path, monkeypatch, capfd):
    full = Target("full_device", tmp_path)
    cmd = COMMANDS[command](monkeypatch)
    rc = _outcome(lambda: cmd(full.path))
    out, err = capfd.readouterr()
    assert rc == 2, (rc, out, err)
    assert OPTION[command] in err and full.path in err, err
    assert "Traceback" not in err, err
    full.unchanged()


# ---- icgd train --out -------------------------------------------------------------------

def _train(out, *extra):
    from verify import cli

    return cli.main(["train", "one_layer", "--set=backend=numpy", "--out", out, *extra])


def _run_dir(kind, tmp_path):
    if kind == "file":
        p = tmp_path / "file"
        p.write_text("a file\n")
        return str(p)
    if kind == "null_device":
        return _device(tmp_path, "null", "/dev/null")
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return str(tmp_path / "fifo")
    if kind == "under_a_file":
        (tmp_path / "file").write_text("a file\n")
        return str(tmp_path / "file" / "run")
    if kind == "proc_folder":
        return "/proc/icgd-test-run"
    if kind == "read_only_folder":
        if IS_ROOT:
            pytest.skip("running as root: permission bits do not stop root (the /proc case covers it)")
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        return str(tmp_path / "ro" / "run")
    if kind == "empty":
        return ""
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["file", "null_device", "fifo", "under_a_file", "proc_folder",
                                  "read_only_folder", "empty"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_train_refuses_an_unusable_run_directory_before_work(kind, dry_run, tmp_path, monkeypatch, capfd):
    from verify import runs

    trained = []
    monkeypatch.setattr(runs, "train_run", lambda *a, **kw: trained.append(a))
    out = _run_dir(kind, tmp_path)
    before = sorted(os.listdir(tmp_path))
    rc = _outcome(lambda: _train(out, *(["--dry-run"] if dry_run else [])))
    _, err = capfd.readouterr()
    assert rc == 2, (rc, err)
    assert "--out" in err and "Traceback" not in err, err
    assert not trained and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "symlink_to_dir"])
def test_train_accepts_a_usable_run_directory(kind, tmp_path, capfd):
    out = tmp_path / "a" / "run"
    if kind == "empty_dir":
        out = tmp_path / "run"
        out.mkdir()
    elif kind == "symlink_to_dir":
        (tmp_path / "real").mkdir()
        out = tmp_path / "run"
        out.symlink_to(tmp_path / "real")
    assert _outcome(lambda: _train(str(out), "--dry-run")) == 0, capfd.readouterr().err
    assert kind != "missing" or not (tmp_path / "a").exists(), "--dry-run created the run directory"


def test_the_output_dir_check_is_public_for_the_run_directory_code(tmp_path):
    from reference.files import OutputPathError, check_output_dir

    check_output_dir(str(tmp_path / "new" / "run"), "--out")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=r"--out .*f: .*not a directory"):
        check_output_dir(str(tmp_path / "f"), "--out")
    with pytest.raises(ValueError):      # an OutputPathError is a ValueError
        check_output_dir("", "--out")


# ---- the writer itself ------------------------------------------------------------------

def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    from reference.files import write_text_atomic

    p = tmp_path / "report.json"
    p.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(str(p), "bad \udc80 text")        # a lone surrogate cannot be encoded
    assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["report.json"]


def test_write_text_atomic_gives_a_new_file_the_umask_mode(tmp_path):
    from reference.files import write_text_atomic

    mask = os.umask(0o022)
    try:
        write_text_atomic(str(tmp_path / "new.txt"), "x\n")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o644


@pytest.mark.parametrize("redirect", ["pipe", "file"])
def test_a_link_to_standard_output_appends_after_what_was_printed(redirect, tmp_path):
    """What ``--json /dev/stdout`` does: with stdout a pipe or a file (the shell's ``>``),
    the text comes after what the program printed before, nothing is truncated, and the
    file the shell opened is not replaced."""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    code = ("from reference.files import write_text_atomic; print('before', flush=True); "
            f"write_text_atomic({str(link)!r}, 'REPORT\\n'); print('after')")
    if redirect == "pipe":
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        out = r.stdout
    else:
        dest = tmp_path / "log.txt"
        with open(dest, "w") as f:
            r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=f, stderr=subprocess.PIPE, text=True,
                               timeout=60)
        out = dest.read_text()
    assert r.returncode == 0, r.stderr
    assert out == "before\nREPORT\nafter\n"
    assert link.is_symlink()
