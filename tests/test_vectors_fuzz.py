"""The golden-vector checker on randomly broken folders (Hypothesis).

Each example copies verify/vectors/ to a temporary folder and breaks it as drawn by
``strategies.manifest_corruptions`` (the manifest's ``cases`` or ``format_version``
missing or replaced by any JSON value) or ``strategies.vector_corruption_sets`` (one
to three cases, each broken its own way: a manifest field missing or of the wrong
type, the case dropped, repeated or replaced in the list, an output or input removed
from both npz and manifest, an array of another dtype, a configuration value out of
range, a data array of a huge shape, a shape claimed in the manifest, an extra key,
garbage or truncated bytes, a key stored twice, a path out of the folder or a link).
Array corruptions come with a forged manifest (checksum and descriptions agree), so
only the kind's own rules can catch them. A corruption that changes nothing is
skipped.

Asserted for every example: ``check_vectors`` returns, not ok; every broken case has a
FAIL result of its own and every other case of the generator has a PASS (the problems
stop nothing); ``icgd vectors check`` exits 1, prints no traceback and its summary is
a failure.
"""

import contextlib
import hashlib
import io
import json
import math
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import assume, given

import strategies as S
from verify import golden
from verify.cli import main as icgd_main

NAMES = [c.name for c in golden.CASES]


class Folder:
    """A copy of the committed vectors in ``root/vectors`` and its manifest (edited in
    memory, written by :meth:`save`); ``root`` itself is outside the folder."""

    def __init__(self, root):
        self.root, self.dir = Path(root), Path(root) / "vectors"
        shutil.copytree(golden.DEFAULT_DIR, self.dir)
        self.man = json.loads((self.dir / golden.MANIFEST).read_text())

    def entry(self, name):
        return next(e for e in self.man["cases"] if isinstance(e, dict) and e.get("name") == name)

    def arrays(self, name):
        with np.load(self.dir / f"{name}.npz", allow_pickle=False) as z:
            return {k: z[k].copy() for k in z.files}

    def forge(self, name, data):
        """Write ``data`` as the case's file and its sha256 into the manifest."""
        (self.dir / f"{name}.npz").write_bytes(data)
        self.entry(name)["sha256"] = hashlib.sha256(data).hexdigest()

    def write_arrays(self, name, arrays, new_part="inputs"):
        """Rewrite the case's npz from ``arrays`` and forge the manifest to agree (keys not
        yet listed go into ``new_part``)."""
        e = self.entry(name)
        self.forge(name, golden.npz_bytes(arrays))
        listed = {k: part for part in ("inputs", "outputs") for k in e[part]}
        for part in ("inputs", "outputs"):
            e[part] = {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()
                       if listed.get(k, new_part) == part}

    def save(self):
        (self.dir / golden.MANIFEST).write_text(json.dumps(self.man))


def _same(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _npz_with_member_twice(arrays, key):
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")                                # zipfile warns on the repeated name
        for k in list(arrays) + [key]:
            b = io.BytesIO()
            np.lib.format.write_array(b, arrays[k], allow_pickle=False)
            zf.writestr(f"{k}.npy", b.getvalue())
    return buf.getvalue()


def _config_value(kind, key, a, which):
    spec = golden.KINDS[kind].config[key]
    if spec.dtype == "bool":
        return np.logical_not(a)
    return np.full(a.shape, S.BAD_CONFIG_VALUES[spec.dtype][which], dtype=spec.dtype)


def apply_corruption(f, name, c):
    """Break case ``name`` of folder ``f`` as ``c`` says. Returns False when that would
    change nothing (the example is then skipped)."""
    e = f.entry(name)
    kind = e["kind"]
    arrays = f.arrays(name)
    inputs, outputs = list(e["inputs"]), list(e["outputs"])
    if c.op in ("entry_drop", "entry_set"):
        field = S.VECTOR_ENTRY_FIELDS[c.key]
        if c.op == "entry_set" and _same(e[field], c.value):
            return False
        if c.op == "entry_drop":
            del e[field]
        else:
            e[field] = c.value
    elif c.op == "list_drop":
        f.man["cases"].remove(e)
    elif c.op == "list_duplicate":
        f.man["cases"].append(json.loads(json.dumps(e)))
    elif c.op == "list_junk":
        f.man["cases"][f.man["cases"].index(e)] = c.value
    elif c.op in ("drop_output", "drop_all_outputs", "drop_input"):
        pool = inputs if c.op == "drop_input" else outputs
        gone = outputs if c.op == "drop_all_outputs" else [pool[c.key % len(pool)]]
        if c.op == "drop_input" and golden.KINDS[kind].config.get(gone[0], golden.Config("")).default is not None:
            return False                                               # an optional input may hold its default
        f.write_arrays(name, {k: a for k, a in arrays.items() if k not in gone})
    elif c.op == "dtype":
        key = (inputs + outputs)[c.key % len(inputs + outputs)]
        if arrays[key].dtype == np.dtype(c.value):
            return False
        with np.errstate(invalid="ignore"):                            # inf or NaN cast to an integer
            arrays[key] = arrays[key].astype(c.value)
        f.write_arrays(name, arrays)
    elif c.op == "config_value":
        pool = [k for k in inputs if k in golden.KINDS[kind].config]
        key = pool[c.key % len(pool)]
        if key == "recurrent" and int(arrays.get("K", 2)) == 1:
            return False                                               # one layer: recurrent or not is the same
        arrays[key] = _config_value(kind, key, arrays[key], c.value)
        f.write_arrays(name, arrays)
    elif c.op == "data_shape":
        pool = [k for k in inputs if k not in golden.KINDS[kind].config]
        if not pool:
            return False
        arrays[pool[c.key % len(pool)]] = np.zeros(c.value)
        f.write_arrays(name, arrays)
    elif c.op == "claimed_shape":
        key = (inputs + outputs)[c.key % len(inputs + outputs)]
        desc = e["inputs" if key in e["inputs"] else "outputs"][key]
        if desc["shape"] == c.value:
            return False
        desc["shape"] = c.value
    elif c.op == "extra_key":
        if c.value in arrays:
            return False
        f.write_arrays(name, {**arrays, c.value: np.ones(3)}, new_part=("inputs", "outputs")[c.key])
    elif c.op == "garbage":
        f.forge(name, c.value)
    elif c.op == "truncate":
        data = (f.dir / f"{name}.npz").read_bytes()
        f.forge(name, data[:c.key % len(data)])
    elif c.op == "member_twice":
        f.forge(name, _npz_with_member_twice(arrays, list(arrays)[c.key % len(arrays)]))
    elif c.op == "path":
        outside = f.root / f"{name}.npz"                               # a valid copy, outside the folder
        shutil.copy(f.dir / f"{name}.npz", outside)
        if c.value == "symlink":
            (f.dir / f"{name}.npz").unlink()
            (f.dir / f"{name}.npz").symlink_to(outside)
        else:
            (f.dir / "sub").mkdir(exist_ok=True)
            shutil.copy(outside, f.dir / "sub" / f"{name}.npz")
            e["file"] = c.value.format(name=name, outside=outside)
    else:
        raise AssertionError(f"unknown corruption {c.op}")
    return True


def _cli(folder):
    """(exit code, stdout) of ``icgd vectors check folder``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = icgd_main(["vectors", "check", str(folder)])
    return rc, out.getvalue()


def _check(f):
    """(results, failed names): check_vectors and the CLI on the folder, which must both
    fail without raising or printing a traceback."""
    f.save()
    ok, results = golden.check_vectors(f.dir)
    assert not ok
    assert all(isinstance(r.message, str) and r.message for r in results if not r.ok)
    rc, out = _cli(f.dir)
    assert rc == 1
    assert "Traceback" not in out and out.splitlines()[-1].startswith("FAILED:"), out[-400:]
    return results, {r.name for r in results if not r.ok}


@given(corruptions=S.vector_corruption_sets)
def test_each_broken_case_fails_on_its_own_line_and_the_others_pass(corruptions):
    picked = {}
    for c in corruptions:                                              # distinct cases, each broken once
        i = c.case % len(NAMES)
        while NAMES[i] in picked:
            i = (i + 1) % len(NAMES)
        picked[NAMES[i]] = c
    with tempfile.TemporaryDirectory() as tmp:
        f = Folder(tmp)
        assume(all([apply_corruption(f, name, c) for name, c in picked.items()]))
        results, failed = _check(f)
        assert set(picked) <= failed, {n: c.op for n, c in picked.items() if n not in failed}
        passed = {r.name for r in results if r.ok}                     # a repeated case's first entry passes too
        assert set(NAMES) - set(picked) <= passed <= set(NAMES), sorted(set(NAMES) - set(picked) - passed)


@given(c=S.manifest_corruptions)
def test_a_broken_manifest_fails_and_names_the_manifest(c):
    field = ("cases", "format_version")[c.key]
    with tempfile.TemporaryDirectory() as tmp:
        f = Folder(tmp)
        if c.op == "manifest_drop":
            del f.man[field]
        else:
            assume(not (_same(f.man[field], c.value) or (field == "format_version" and c.value == 1
                                                         and type(c.value) is int)))
            f.man[field] = c.value
        results, failed = _check(f)
        assert "manifest" in failed or field == "cases", results
        if field == "cases" or "manifest" not in failed:
            assert set(NAMES) <= failed                                # no list of cases: every case fails
        assert not any(r.ok for r in results) or field == "cases" and isinstance(c.value, list)


def test_an_untouched_copy_passes():
    """The harness itself: a copy with nothing broken passes, so the failures above come
    from the corruptions."""
    with tempfile.TemporaryDirectory() as tmp:
        f = Folder(tmp)
        f.save()
        ok, results = golden.check_vectors(f.dir)
        assert ok and {r.name for r in results} == set(NAMES)
        assert _cli(f.dir)[0] == 0
