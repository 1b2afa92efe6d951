"""Golden test vectors: plain ``.npz`` files and a JSON manifest for ports.

``icgd vectors write [DIR]`` computes every case with the reference and writes
``DIR/<case>.npz`` plus ``DIR/manifest.json``; ``icgd vectors check [DIR]`` reads
them back, recomputes every case from its stored inputs with the reference and
compares the stored outputs, one verdict line per case, exit code 1 on any mismatch.
DIR defaults to this package's ``verify/vectors/`` (the committed vectors). Also
``python -m verify.golden write|check [DIR]``.

What this file is: the writer and the checker. Which cases exist and how their inputs
are drawn is ``verify/golden_cases.py``; what each kind is (its key format, its
reference computation and the schema of its inputs and outputs) is
``verify/vector_kinds.py``; both are re-exported here. What it is not: the independent
confirmation of the vectors, which lives in ``verify/claims_vectors.py`` (loop
oracle, complex-step derivatives, hand transcriptions) and runs in the tests.
Every key of every case is documented in SPEC.md (section "Golden vectors").

A case is a kind, a builder of inputs (seeded) and the reference function of that
kind mapping inputs to outputs. The builder runs only in ``write``; ``check``
recomputes outputs from the *stored* inputs, so a port needs only the npz. Each kind
(``KINDS``, written into the manifest) says which inputs are data and which are
configuration, with their dtypes and ranges, and which outputs it computes.

``check`` trusts nothing in the folder: the manifest's list of cases must be the
generator's (a case missing, repeated or unknown fails), a case's file is
``<name>.npz`` in the folder (no other path, no link), inputs must be what the kind
reads (dtypes, shapes, sizes, ranges: a forged file cannot ask for 10**9 tasks), and
the stored outputs must be exactly the ones the kind computes. Every problem is a FAIL
line of its own case; the other cases are still checked and nothing raises.
Format version: it changes only when the meaning of an existing case changes; new
cases are appended to the table (the case index salts its generator, so the earlier
cases keep their bytes) without a change.
Conventions inside an npz: every float is float64; configuration is stored as 0-d
arrays (``causal``, ``recurrent`` bool; ``K``, ``d``, ``seed`` int64); ``clip`` and
``clip_norm`` = +inf mean "no clipping" (clip(x, -inf, inf) = x exactly); per-layer
parameters of a stack are ``layer<k>.<name>``, gradients ``d<name>`` (the leaf of
path ``<k>.<name>`` of the parameter tree, ``reference.tree``; see ``STACK_KEY``).
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

import reference as R
from reference.files import OutputPathError, check_output_dir, write_bytes_atomic, write_text_atomic
from reference.tolerances import allclose_report, tolerance

from .golden_cases import CASES, SEED, Case, build_cases  # noqa: F401  the cases, re-exported
from .vector_kinds import (  # noqa: F401  the kinds' schema and computations, re-exported
    COMPUTE, Config, KINDS, LAYER_KEY, LIMITS, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, PLACEHOLDERS,
    _EMBEDDED, input_problems, key_pattern, kinds_table, layer_arrays, read_layer,
    read_stack, stack_arrays, tree_arrays, tree_keys,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_DIR = Path(__file__).resolve().parent / "vectors"
TOL_KIND = "algebra"   # the reference against its own vectors: same polynomial, maybe other summation order
FORMAT_RULE = ("format_version changes only when the meaning of an existing case changes (a key, a convention); new "
               "cases, of new or existing kinds, are added without a change. A port runs the cases of the kinds it "
               "knows and reports the others")
REGENERATE_HINT = "regenerate the vectors with `icgd vectors write` (or `python -m verify.golden write`)"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------
# Files: deterministic npz bytes, manifest
# --------------------------------------------------------------------------------

def npz_bytes(arrays):
    """An uncompressed .npz (readable by numpy.load) whose bytes depend only on the
    arrays and their order: fixed zip timestamps and attributes, no pickles."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            b = io.BytesIO()
            np.lib.format.write_array(b, np.array(a, order="C"), allow_pickle=False)   # 0-d stays 0-d
            zf.writestr(info, b.getvalue())
    return buf.getvalue()


def _describe(a):
    return {"shape": list(a.shape), "dtype": np.dtype(a.dtype).name}


def manifest_for(cases, files, seed=SEED):
    """The manifest dict: provenance (with the seed the cases were built from) plus, per
    case, kind, file, sha256, inputs and outputs."""
    tol = tolerance(np.float64, TOL_KIND)
    return {
        "format_version": FORMAT_VERSION,
        "generator": {"module": "verify.golden", "function": "build_cases", "seed": seed},
        "package_version": R.__version__,
        "numpy_version": np.__version__,
        "dtype": "float64",
        "tolerance": {"kind": TOL_KIND, "rtol": tol.rtol, "atol": tol.atol,
                      "rule": "per array: |actual - expected| <= atol + rtol * max|expected| elementwise"},
        "format_rule": FORMAT_RULE,
        "limits": LIMITS,
        "placeholders": PLACEHOLDERS,
        "kinds": kinds_table(),
        "cases": [{"name": c.name, "kind": c.kind, "file": f"{c.name}.npz",
                   "sha256": hashlib.sha256(files[c.name]).hexdigest(),
                   "inputs": {k: _describe(a) for k, a in c.inputs.items()},
                   "outputs": {k: _describe(a) for k, a in c.outputs.items()}} for c in cases],
    }


def write_vectors(directory=DEFAULT_DIR, seed=SEED):
    """Write every case's npz and the manifest into ``directory``. Files of cases that an
    earlier manifest there listed and this one does not are removed. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cases = build_cases(seed)
    files = {c.name: npz_bytes({**c.inputs, **c.outputs}) for c in cases}
    old = directory / MANIFEST
    if old.exists():
        try:
            listed = {e["file"] for e in json.loads(old.read_text())["cases"]}
        except (ValueError, KeyError, TypeError):
            listed = set()
        stale = {f for f in listed if isinstance(f, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.npz", f)}
    else:
        stale = set()
    # every file atomically, the manifest last, stale files only once the new manifest is in place
    for name, data in files.items():
        write_bytes_atomic(str(directory / f"{name}.npz"), data)
    man = manifest_for(cases, files, seed)
    write_text_atomic(str(directory / MANIFEST), manifest_text(man))
    for f in stale - {f"{n}.npz" for n in files}:                   # plain names in this folder only
        (directory / f).unlink(missing_ok=True)
    return man


def manifest_text(x, indent=""):
    """JSON with one line per array description (a dict or list of scalars and flat
    lists is written inline), so the manifest reads as a table."""
    inner = indent + "  "
    if isinstance(x, dict) and any(isinstance(v, dict) or (isinstance(v, list) and any(isinstance(i, (dict, list)) for i in v))
                                   for v in x.values()):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {manifest_text(v, inner)}" for k, v in x.items())
        text = "{\n" + body + "\n" + indent + "}"
    elif isinstance(x, list) and any(isinstance(v, dict) for v in x):
        text = "[\n" + ",\n".join(inner + manifest_text(v, inner) for v in x) + "\n" + indent + "]"
    else:
        text = json.dumps(x)
    return text + ("\n" if indent == "" else "")


# --------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------

class CaseResult(NamedTuple):
    name: str
    ok: bool
    rel_err: float      # worst relative error over the case's outputs (inf on a structural failure)
    message: str


class CaseError(ValueError):
    """A case's files or manifest entry are not what the format says (the message says how)."""


_NPZ_DTYPES = (np.dtype("<f8"), np.dtype("<i8"), np.dtype("|b1"))
_SHA256 = re.compile("[0-9a-f]{64}")


def _what(x):
    """A short description of a JSON value for a message (ASCII: any terminal prints it)."""
    text = ascii(x)
    return f"{type(x).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _field(entry, key):
    """How an entry's field reads in a message: "no 'kind'" or "'kind' NoneType None"."""
    return f"no {key!r}" if key not in entry else f"{key!r} {_what(entry[key])}"


def read_npz(data):
    """The arrays of an npz held in ``data`` (bytes), in file order. Refuses (CaseError)
    what a vector file is not: members other than ``<key>.npy``, a key twice, pickles,
    dtypes other than float64 / int64 / bool (little-endian, C order), arrays whose
    header does not match their bytes, more than MAX_FILE_BYTES unpacked."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise CaseError(f"not an npz (zip) file: {exc}") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise CaseError(f"a key is stored twice: {sorted({n for n in names if names.count(n) > 1})}")
        if sum(i.file_size for i in infos) > MAX_FILE_BYTES:
            raise CaseError(f"arrays unpack to more than {MAX_FILE_BYTES} bytes")
        arrays = {}
        for info in infos:
            key = info.filename[:-4]
            if not info.filename.endswith(".npy") or not key or "/" in key:
                raise CaseError(f"member {info.filename!r} is not an array <key>.npy")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise CaseError(f"{key}: .npy format version {version} (1.0 or 2.0 expected)")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                if dtype not in _NPZ_DTYPES or fortran:
                    raise CaseError(f"{key}: dtype {dtype}{' in Fortran order' if fortran else ''}; vector arrays are "
                                    "C-ordered float64, int64 or bool")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if f.tell() + nbytes != info.file_size:
                    raise CaseError(f"{key}: header says shape {shape} ({nbytes} bytes), the member holds "
                                    f"{info.file_size - f.tell()}")
                arrays[key] = np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape).copy()
    return arrays


def _descriptions(entry, part):
    """The entry's ``inputs`` or ``outputs``: {key: {"shape": [...], "dtype": str}}."""
    d = entry.get(part)
    if not isinstance(d, dict):
        raise CaseError(f"manifest entry has {_field(entry, part)}, not an object of array descriptions")
    for k, desc in d.items():
        if not (isinstance(desc, dict) and set(desc) == {"shape", "dtype"} and isinstance(desc["shape"], list)
                and all(type(n) is int and n >= 0 for n in desc["shape"]) and isinstance(desc["dtype"], str)):
            raise CaseError(f"manifest entry's {part}[{k!r}] is {_what(desc)}, not {{'shape': [...], 'dtype': ...}}")
    return d


def case_path(directory, entry):
    """The path of a case's npz: ``<name>.npz`` inside ``directory`` and nowhere else
    (no other name, no link out of the folder). Raises CaseError."""
    name, file = entry["name"], entry.get("file")
    if file != f"{name}.npz":
        raise CaseError(f"manifest entry has {_field(entry, 'file')}; a case's file is {name}.npz, in the vectors folder")
    path = Path(directory) / file
    if path.is_symlink() or path.resolve().parent != Path(directory).resolve():
        raise CaseError(f"{file} links out of the vectors folder; {REGENERATE_HINT}")
    if not path.is_file():
        raise CaseError(f"{file} is not a file in the vectors folder; {REGENERATE_HINT}")
    return path


def load_case(directory, entry):
    """The arrays of one manifest entry as (inputs dict, outputs dict). Raises CaseError
    (a ValueError) on a bad path, size, checksum, npz, or on keys, shapes or dtypes that
    differ from the manifest."""
    path = case_path(directory, entry)
    inputs, outputs = _descriptions(entry, "inputs"), _descriptions(entry, "outputs")
    if set(inputs) & set(outputs):
        raise CaseError(f"keys listed as both inputs and outputs: {sorted(set(inputs) & set(outputs))}")
    sha = entry.get("sha256")
    if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise CaseError(f"manifest entry has {_field(entry, 'sha256')}, not 64 lowercase hex digits; {REGENERATE_HINT}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CaseError(f"{path.name} has {size} bytes, more than a vector file may ({MAX_FILE_BYTES})")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise CaseError(f"sha256 of {path.name} does not match the manifest; {REGENERATE_HINT}")
    arrays = read_npz(data)
    want = {**inputs, **outputs}
    if set(arrays) != set(want):
        raise CaseError(f"{path.name} keys differ from the manifest: {sorted(set(arrays) ^ set(want))}; {REGENERATE_HINT}")
    for k, desc in want.items():
        if _describe(arrays[k]) != desc:
            raise CaseError(f"{path.name}: {k} is {_describe(arrays[k])}, manifest says {desc}; {REGENERATE_HINT}")
    return ({k: arrays[k] for k in inputs}, {k: arrays[k] for k in outputs})


def _listing(keys, n=6):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def compare_outputs(actual, expected, kind=TOL_KIND):
    """Compare output dicts array by array, in full: the same keys, dtypes and shapes,
    then the values. Returns (ok, worst rel err, worst key, detail)."""
    missing, extra = [k for k in actual if k not in expected], [k for k in expected if k not in actual]
    if missing or extra:
        detail = "; ".join(t for t in (missing and f"outputs the file lacks: {_listing(missing)}",
                                       extra and f"stored outputs the kind does not compute: {_listing(extra)}") if t)
        return False, float("inf"), (missing or extra)[0], detail
    ok, worst, worst_key, detail = True, 0.0, None, ""
    for k, e in expected.items():
        a = np.asarray(actual[k])
        if a.shape != e.shape or a.dtype != e.dtype:
            return False, float("inf"), k, f"{k}: computed {a.dtype.name} {a.shape}, stored {e.dtype.name} {e.shape}"
        if e.dtype.kind in "biu":
            good = bool(np.array_equal(a, e))
            rel = 0.0 if good else float("inf")
            msg = "" if good else f"{k}: {a!r} vs stored {e!r}"
        else:
            rep = allclose_report(a, e, kind, np.float64)
            good, rel, msg = rep.ok, rep.rel_err, f"{k}: {rep}"
        if rel >= worst:
            worst, worst_key = rel, k
        if not good:
            ok = False
            detail = detail or msg
    return ok, worst, worst_key, detail


def check_case(directory, entry):
    """One manifest entry (a dict with a known ``name`` and its ``kind``): load, check the
    inputs against the kind, recompute, compare. Every problem becomes a FAIL result;
    nothing raises."""
    name, kind = entry["name"], entry["kind"]
    try:
        inputs, expected = load_case(directory, entry)
        problems = input_problems(kind, inputs)
        if problems:
            return CaseResult(name, False, float("inf"), f"inputs refused for kind {kind}: {'; '.join(problems)}")
        actual = COMPUTE[kind](inputs)
    except CaseError as exc:
        return CaseResult(name, False, float("inf"), str(exc))
    except Exception as exc:  # noqa: BLE001 -- the reference refusing an input, or worse: a FAIL line, not a traceback
        return CaseResult(name, False, float("inf"), f"recomputing failed: {type(exc).__name__}: {exc}")
    ok, rel, key, detail = compare_outputs(actual, expected)
    return CaseResult(name, ok, rel, ("bit-exact" if rel == 0 else f"worst at {key}") if ok else detail)


def read_manifest(directory):
    """(manifest dict, None) or (None, why it cannot be read) for ``directory``."""
    path = Path(directory) / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"{path} has more than {MAX_MANIFEST_BYTES} bytes; {REGENERATE_HINT}"
        man = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path} not found; {REGENERATE_HINT}"
    except (OSError, ValueError) as exc:          # unreadable, not UTF-8, not JSON
        return None, f"{path} cannot be read as JSON ({exc}); {REGENERATE_HINT}"
    if not isinstance(man, dict):
        return None, f"{path} holds {_what(man)}, not a JSON object; {REGENERATE_HINT}"
    version = man.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        return None, (f"format version {version!r} in {path}, this checker reads version {FORMAT_VERSION}; "
                      f"{REGENERATE_HINT}")
    return man, None


def _entry_name(i, entry):
    """(the name to report entry ``i`` under, the problem with its name or None). An entry
    without a usable name is reported as ``cases[i]``."""
    if not isinstance(entry, dict):
        return f"cases[{i}]", f"manifest entry is {_what(entry)}, not an object"
    name = entry.get("name")
    if not isinstance(name, str):
        return f"cases[{i}]", f"manifest entry has {_field(entry, 'name')}, not a string"
    if not (name.isascii() and name.isprintable() and 0 < len(name) <= 80):
        return f"cases[{i}]", f"manifest entry has the unprintable or overlong name {_what(name)}"
    return name, None


def check_vectors(directory=DEFAULT_DIR):
    """Recompute every case from its stored inputs and compare. Returns (ok, [CaseResult]):
    one result per manifest entry and one per case of the generator that the manifest
    lacks; a manifest that cannot be read (or of another format version) is one result.
    The list of cases must be the generator's: a case missing, listed twice or unknown
    fails."""
    directory = Path(directory)
    man, problem = read_manifest(directory)
    if man is None:
        return False, [CaseResult("manifest", False, float("inf"), problem)]
    results = []
    entries = man.get("cases")
    if not isinstance(entries, list):
        results.append(CaseResult("manifest", False, float("inf"),
                                  f"'cases' is {_what(entries)}, not a list of case entries; {REGENERATE_HINT}"))
        entries = []
    known = {c.name: c.kind for c in CASES}
    first = {}                                                         # name -> index of its first entry
    for i, entry in enumerate(entries):
        name, problem = _entry_name(i, entry)
        if problem is None and name in first:
            problem = f"listed twice in the manifest (cases[{first[name]}] and cases[{i}])"
        elif problem is None and name not in known:
            problem = f"not a case of this generator (verify.golden); {REGENERATE_HINT}"
        elif problem is None and entry.get("kind") != known[name]:
            problem = f"manifest entry has {_field(entry, 'kind')}; this case's kind is {known[name]!r}"
        results.append(check_case(directory, entry) if problem is None else CaseResult(name, False, float("inf"), problem))
        if name in known:
            first.setdefault(name, i)
    results += [CaseResult(n, False, float("inf"), f"missing from the manifest; {REGENERATE_HINT}")
                for n in known if n not in first]
    return all(r.ok for r in results), results


def _verdict(r):
    tol = tolerance(np.float64, TOL_KIND)
    mark = "PASS" if r.ok else "FAIL"
    line = f"{mark}  {r.name:<44} rel err {r.rel_err:9.2e} (rtol {tol.rtol:g})  {r.message}"
    return line.encode("ascii", "backslashreplace").decode("ascii")     # keys and values quoted from a file


# --------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("action", choices=["write", "check"],
                   help="write: compute the cases and write DIR/*.npz and DIR/manifest.json; "
                        "check: recompute every case from its stored inputs and compare")
    p.add_argument("dir", nargs="?", default=str(DEFAULT_DIR), metavar="DIR",
                   help=f"vectors directory (default: the package's {DEFAULT_DIR})")


def run(args):
    if args.action == "write":
        try:
            check_output_dir(str(args.dir), "DIR")
        except OutputPathError as exc:
            print(f"icgd vectors write: {exc}", file=sys.stderr)
            return 2
        man = write_vectors(args.dir)
        size = sum(os.path.getsize(Path(args.dir) / e["file"]) for e in man["cases"])
        print(f"wrote {len(man['cases'])} cases ({size / 1024:.0f} KiB) and {MANIFEST} to {args.dir}")
        return 0
    ok, results = check_vectors(args.dir)
    for r in results:
        print(_verdict(r), flush=True)
    n_bad = sum(not r.ok for r in results)
    if ok:
        print(f"{len(results)} passed, 0 failed ({args.dir})")
    else:
        print(f"FAILED: {n_bad} of {len(results)} checks failed, {len(results) - n_bad} agree ({args.dir})")
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m verify.golden", description="Write or check the golden test vectors.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
