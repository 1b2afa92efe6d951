"""Run records: what a finished sequence run leaves in the repository so that it counts
in a later verify run on another machine.

The full-mode sequence claims (issue #17) need 5 seeds of seven experiments, about 15
core-hours on the Numba backend; a CI machine or a session has a few. A run directory
(``verify.runs``) lives under ``runs/``, which is not committed, so runs trained in one
place would be trained again in the next. A *record* is the part of a finished run that
the sequence claims read, committed under ``verify/results/records/<mode>/<name>/``:

    config.json    the run's config, byte for byte
    summary.json   its final numbers, per-time-step curves and baselines, byte for byte,
                   with the digest that binds them to the config, the final checkpoint
                   and the reference/ sources that trained the run

The checkpoint (parameters and Adam state, about 1 MB for six layers) is left out: the
sequence claims read summary.json alone (their model and baseline per-t curves, the
fitted GD weights, the mesa layer's lambda), so a record answers them; the claims that
read parameters or the evaluation history (the ICML, induction, layer and sine families)
cannot be answered from a record and their runs are refused here.

``python -m verify --full --reuse-runs`` answers a claim from the record of a run when
``--workdir`` holds no finished run of that config, and only when the record is intact:
its config equals the one the claim asks for (seed, backend and dtype included), its
summary is unedited (the digest's summary part), and the reference/ sources are the ones
that trained it (the digest's reference part). A change to reference/ therefore retires
every record, as it retires every reused run, unless ``--older-records`` accepts records
trained by other sources (the report then names the hash and commit that trained each).
The report lists each record used. The digest's checkpoint part cannot be rechecked
without the checkpoint; the report says so. ``provenance.json`` beside the two files
says where, when and by which commit the record was made.

    icgd record RUN_DIR ...      add finished runs (``--into``, default verify/results/records)
    icgd record --list           each record and whether verify would use it now
"""

import json
import os
import shutil
import sys

from reference.config import config_from_dict

from . import runs as R

RECORDS_DIR = os.path.join("verify", "results", "records")
RECORD_FILES = (R.CONFIG_FILE, R.SUMMARY_FILE)
PROVENANCE_FILE = "provenance.json"    # when, from where and by which commit a record was made (not compared)
MODES = ("quick", "full")


class RecordError(ValueError):
    """A run cannot be recorded, or a record cannot be read."""


def recordable(cfg):
    """Whether the claims on ``cfg``'s experiment read summary.json alone (the sequence
    experiments, task 'lds')."""
    return cfg.data.task == "lds"


def verify_mode(cfg):
    """'full' or 'quick': the verify mode whose config for (experiment, seed) is ``cfg``;
    None when it is neither (a run with overrides is not a verify run)."""
    from .claims_training import config_for
    from .registry import Context

    for mode in MODES:
        try:
            if config_for(Context(mode=mode), cfg.experiment, cfg.seed) == cfg:
                return mode
        except (KeyError, ValueError):
            continue
    return None


def record_name(cfg):
    return f"{cfg.experiment}-seed{cfg.seed}"


def record_path(root, mode, cfg):
    return os.path.join(root, mode, record_name(cfg))


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def prepare(run_dir, root=RECORDS_DIR, replace=False):
    """Check that the finished run in ``run_dir`` can be recorded under ``root``; writes
    nothing. Returns (record dir, {file: bytes}, 'add' | 'unchanged' | 'replace').
    RecordError when the run is not finished, not verify's config of a sequence
    experiment, or its digest does not match (config, checkpoint, summary, or the current
    reference/ sources), or when the record exists with other contents and ``replace`` is
    False."""
    if not os.path.isdir(run_dir):
        raise RecordError(f"{run_dir}: not a directory (give a run directory, e.g. runs/verify/full/seq_lsa4-seed0)")
    try:
        res = R.load_result(run_dir)
    except (OSError, ValueError, KeyError, R.CheckpointError) as exc:
        raise RecordError(f"{run_dir}: not a finished run ({exc})") from None
    cfg = res.config
    if not recordable(cfg):
        raise RecordError(f"{run_dir}: experiment {cfg.experiment!r} is not a sequence experiment (task {cfg.data.task!r}); "
                          "only runs whose claims read summary.json alone (task 'lds') are recorded")
    final = (res.summary.get("final") or {}).get("step")
    if final != cfg.steps:
        raise RecordError(f"{run_dir}: not finished (last evaluation at step {final}, the config trains {cfg.steps})")
    bad = R.check_digest(run_dir)
    if bad:
        raise RecordError(f"{run_dir}: its digest does not match ({'; '.join(bad)}); only an intact run trained by "
                          "the current reference/ sources is recorded")
    mode = verify_mode(cfg)
    if mode is None:
        raise RecordError(f"{run_dir}: its config is not verify's quick or full config of {cfg.experiment} seed "
                          f"{cfg.seed} (a run with overrides); verify would never ask for it")
    data = {name: _read_bytes(os.path.join(run_dir, name)) for name in RECORD_FILES}
    dest = record_path(root, mode, cfg)
    if not os.path.lexists(dest):
        return dest, data, "add"
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise RecordError(f"{dest}: exists and is not a record directory; move it away")
    old = {n: (_read_bytes(os.path.join(dest, n)) if os.path.isfile(os.path.join(dest, n)) else None)
           for n in RECORD_FILES}
    if old == data:
        return dest, data, "unchanged"
    if not replace:
        raise RecordError(f"{dest}: holds another run of {record_name(cfg)} (other files); --replace replaces it")
    return dest, data, "replace"


def provenance(run_dir):
    """What :func:`write` stores beside a record: the run directory it came from, when,
    the git commit of this checkout (and whether reference/ had uncommitted changes),
    the reference/ hash of the run's digest and the machine."""
    import datetime
    import subprocess

    from .report import machine_info

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "reference"], cwd=here,
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    with open(os.path.join(run_dir, R.SUMMARY_FILE)) as f:
        ref = (json.load(f).get("digest") or {}).get("reference")
    return {"from": os.path.abspath(run_dir), "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "commit": commit, "reference_uncommitted_changes": dirty, "reference_hash": ref,
        "machine": machine_info()}


def write(dest, data):
    """Write a record's files into ``dest``: into a temporary folder beside it, fsynced,
    then renamed into place (an old record is renamed away first and removed after), so
    that a record is never half-written."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    for name, blob in data.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    if os.path.lexists(dest):
        gone = f"{dest}.old-{os.getpid()}"
        os.rename(dest, gone)
        os.rename(tmp, dest)
        shutil.rmtree(gone, ignore_errors=True)
    else:
        os.rename(tmp, dest)


DONE = {"add": "added", "replace": "replaced", "unchanged": "unchanged"}     # prepare's action -> what happened


def _with_provenance(data, run_dir):
    return {**data, PROVENANCE_FILE: (json.dumps(provenance(run_dir), indent=2, sort_keys=True) + "\n").encode()}


def add(run_dir, root=RECORDS_DIR, replace=False):
    """Record the finished run in ``run_dir`` (:func:`prepare`, then :func:`write`).
    Returns (record dir, 'added' | 'unchanged' | 'replaced')."""
    dest, data, action = prepare(run_dir, root, replace)
    if action != "unchanged":
        write(dest, _with_provenance(data, run_dir))
    return dest, DONE[action]


def load(rec_dir):
    """(RunResult with ``params`` None and ``history`` only the final evaluation, problems): the record in
    ``rec_dir`` and what keeps verify from using it now (empty list: usable)."""
    try:
        with open(os.path.join(rec_dir, R.CONFIG_FILE)) as f:
            cfg = config_from_dict(json.load(f))
        with open(os.path.join(rec_dir, R.SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError, KeyError) as exc:
        raise RecordError(f"{rec_dir}: unreadable record ({type(exc).__name__}: {exc})") from None
    if not isinstance(summary, dict):
        raise RecordError(f"{rec_dir}: summary.json is not a JSON object")
    problems = []
    dg = summary.get("digest") or {}
    if not dg:
        problems.append("summary.json has no digest")
    else:
        if dg.get("config") != R.config_hash(cfg):
            problems.append("config.json differs from the config that trained the run")
        body = {k: v for k, v in summary.items() if k != "digest"}
        if dg.get("summary") != R.summary_hash(body):
            problems.append("summary.json was edited after the run wrote it")
        if dg.get("reference") != R.reference_hash():
            problems.append(R.REFERENCE_CHANGED)
    if not recordable(cfg):
        problems.append(f"experiment {cfg.experiment!r} is not a sequence experiment")
    if (summary.get("final") or {}).get("step") != cfg.steps:
        problems.append("not finished")
    if not isinstance(summary.get("baselines"), dict):
        problems.append("summary.json has no baselines")
    final = summary.get("final")
    res = R.RunResult(cfg, None, summary.get("baselines"), [dict(final)] if isinstance(final, dict) else [],
                      summary, rec_dir)
    return res, problems


def find(root, mode, cfg, older=False):
    """The usable record of ``cfg`` under ``root`` (a RunResult), or None; a record that
    exists but cannot be used is named on stderr with the reason. ``mode`` None: the
    record of either mode (a sweep's config names no mode). ``older``: a record trained
    by other reference/ sources is usable too (:func:`trained_by_other_sources` says so;
    the callers name it in their reports)."""
    if not recordable(cfg):
        return None
    if mode is None:
        return next((r for r in (find(root, m, cfg, older) for m in MODES if os.path.isdir(record_path(root, m, cfg)))
                     if r is not None), None)
    d = record_path(root, mode, cfg)
    if not os.path.isdir(d):
        return None
    try:
        res, problems = load(d)
    except RecordError as exc:
        print(f"not using the record {d}: {exc}", file=sys.stderr, flush=True)
        return None
    if older:
        problems = [p for p in problems if p != R.REFERENCE_CHANGED]
    if res.config != cfg:
        problems = ["its config is not the one this claim asks for"] + problems
    if problems:
        hint = " (--older-records uses records trained by other reference/ sources)" if (
            R.REFERENCE_CHANGED in problems and len(problems) == 1) else ""
        print(f"not using the record {d}: {'; '.join(problems)}{hint}", file=sys.stderr, flush=True)
        return None
    return res


def trained_by_other_sources(res):
    """None when the record's run was trained by the current reference/ sources, else a
    phrase naming the sources that did (their hash and, from provenance.json, the commit)."""
    ref = (res.summary.get("digest") or {}).get("reference")
    if ref == R.reference_hash():
        return None
    commit = None
    try:
        with open(os.path.join(res.run_dir, PROVENANCE_FILE)) as f:
            commit = json.load(f).get("commit")
    except (OSError, ValueError, AttributeError):
        pass
    return f"trained by other reference/ sources (hash {str(ref)[:12]}" + (f", commit {commit[:12]})" if commit else ")")


def listing(root=RECORDS_DIR):
    """[(record dir, problems)] of every record under ``root``, in name order."""
    out = []
    for mode in MODES:
        base = os.path.join(root, mode)
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            d = os.path.join(base, name)
            if not os.path.isdir(d) or ".writing-" in name or ".old-" in name:
                continue
            try:
                _, problems = load(d)
            except RecordError as exc:
                problems = [str(exc)]
            out.append((d, problems))
    return out


# ---- icgd record ----------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="finished run directories to record")
    p.add_argument("--into", default=RECORDS_DIR, metavar="DIR", help=f"the records folder (default {RECORDS_DIR})")
    p.add_argument("--replace", action="store_true", help="replace a record that holds another run of the same name")
    p.add_argument("--list", action="store_true", help="list the records and whether verify would use them now")


def run(args):
    if args.list:
        if args.run_dirs:
            print("icgd record: --list takes no run directories", file=sys.stderr)
            return 2
        rows = listing(args.into)
        for d, problems in rows:
            print(f"{'usable' if not problems else 'unusable':<9} {d}" + (f"  ({'; '.join(problems)})" if problems else ""))
        print(f"{len(rows)} records under {args.into}, {sum(not p for _, p in rows)} usable now")
        return 0
    if not args.run_dirs:
        print("icgd record: give run directories to record, or --list", file=sys.stderr)
        return 2
    plans, errors = [], []
    for d in args.run_dirs:
        try:
            plans.append((d,) + prepare(d, args.into, replace=args.replace))
        except RecordError as exc:
            errors.append(str(exc))
    dests = [p[1] for p in plans]
    dup = sorted({x for x in dests if dests.count(x) > 1})
    if dup:
        errors.append(f"several run directories would write the record {dup[0]}; give one run per experiment and seed")
    if errors:
        for e in errors:
            print(f"icgd record: {e}", file=sys.stderr)
        print(f"icgd record: nothing recorded ({len(errors)} problem(s))", file=sys.stderr)
        return 2
    for d, dest, data, action in plans:
        if action != "unchanged":
            write(dest, _with_provenance(data, d))
        print(f"{DONE[action]:<9} {dest}  (from {d})")
    return 0
