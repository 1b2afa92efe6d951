"""Golden vectors (verify/vectors/): confirmed by an independent computation, and
the checker can fail.

* every committed case is recomputed independently (loop oracle, complex-step
  derivatives of the oracle entry by entry, explicit GD / GD++ loops, a hand
  transcription of Adam, hand draws of the sampler) and every stored output is covered;
* ``check`` passes on the committed vectors and on a fresh ``write``; ``write`` is
  deterministic;
* ``check`` fails on a perturbed entry (checksum, and values once the checksum is
  forged), on a manifest format-version bump (with the hint to regenerate), on a
  missing case; the independent check fails on a perturbed gradient;
* the NumPy-only port example in SPEC.md runs against the vectors.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from verify import claims_vectors as cv
from verify import golden
from verify.cli import main as icgd_main

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = cv.load_committed()
IDS = [e["name"] for e, _, _ in COMMITTED]


@pytest.mark.parametrize("case", COMMITTED, ids=IDS)
def test_independent_recomputation_confirms_case(case):
    entry, inputs, outputs = case
    rows = cv.independent_reports(entry["kind"], inputs, outputs)
    bad = [f"{key} [{kind}]: {detail}" for key, kind, ok, _, _, detail in rows if not ok]
    assert not bad, "\n".join(bad)
    # every stored output is covered by some independent comparison
    assert set(outputs) <= {r[0] for r in rows}


def test_committed_cases_cover_every_kind_and_match_the_generator():
    assert [e["name"] for e, _, _ in COMMITTED] == [c.name for c in golden.CASES]
    assert {e["kind"] for e, _, _ in COMMITTED} == set(golden.COMPUTE)
    layer = {e["name"] for e, _, _ in COMMITTED if e["kind"] == "layer"}
    assert len(layer) == 16   # H in {1, 2} x {ctx, causal} x {noclip, clip} x {factored, merged}


def test_vectors_are_small_and_float64():
    size = sum((golden.DEFAULT_DIR / e["file"]).stat().st_size for e, _, _ in COMMITTED)
    assert size < 1_000_000
    for e, inputs, outputs in COMMITTED:
        for k, a in {**inputs, **outputs}.items():
            assert a.dtype in (np.float64, np.int64, np.bool_), (e["name"], k, a.dtype)
        if "E" in inputs or "E" in outputs:
            B, T, D = (inputs.get("E") if "E" in inputs else outputs["E"]).shape
            assert B == 2 and T <= 6 and D <= 5, e["name"]


def test_clipped_cases_really_clip():
    """A clip case whose clip never acts would test nothing beyond the no-clip case."""
    for e, inputs, outputs in COMMITTED:
        if "clip" in inputs and np.isfinite(inputs["clip"]) and "out" in outputs:
            assert np.any(np.abs(outputs["out"]) == inputs["clip"]), e["name"]


def test_check_passes_on_committed_vectors(capsys):
    ok, results = golden.check_vectors()
    assert ok, [r for r in results if not r.ok]
    assert len(results) == len(golden.CASES)
    assert icgd_main(["vectors", "check"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS ") == len(golden.CASES) and "FAIL" not in out


def test_write_then_check_and_write_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert icgd_main(["vectors", "write", str(a)]) == 0
    golden.write_vectors(b)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    man = json.loads((a / golden.MANIFEST).read_text())
    for e in man["cases"]:
        assert hashlib.sha256((a / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    ok, results = golden.check_vectors(a)
    assert ok, [r for r in results if not r.ok]
    # the npz files are plain: numpy.load without pickles reads them
    with np.load(a / man["cases"][0]["file"], allow_pickle=False) as z:
        assert "E" in z.files


def _copy(tmp_path):
    d = tmp_path / "vectors"
    shutil.copytree(golden.DEFAULT_DIR, d)
    return d


def _rewrite(d, name, mutate, forge_checksum):
    """Mutate one case's arrays in place; optionally update the manifest's sha256."""
    path = d / f"{name}.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    mutate(arrays)
    data = golden.npz_bytes(arrays)
    path.write_bytes(data)
    if forge_checksum:
        man = json.loads((d / golden.MANIFEST).read_text())
        for e in man["cases"]:
            if e["name"] == name:
                e["sha256"] = hashlib.sha256(data).hexdigest()
        (d / golden.MANIFEST).write_text(json.dumps(man))


def _bump(key, rel=1e-9):
    """Perturb one entry by ``rel`` times the array's largest magnitude (1000x the tolerance)."""
    def mutate(arrays):
        a = arrays[key]
        a.flat[min(1, a.size - 1)] += rel * np.abs(a).max()
    return mutate


def test_tampered_npz_fails_checksum_with_hint(tmp_path, capsys):
    d = _copy(tmp_path)
    _rewrite(d, "layer-H2-causal-clip-factored", _bump("out"), forge_checksum=False)
    ok, results = golden.check_vectors(d)
    bad = [r for r in results if not r.ok]
    assert not ok and [r.name for r in bad] == ["layer-H2-causal-clip-factored"]
    assert "sha256" in bad[0].message and "icgd vectors write" in bad[0].message
    assert icgd_main(["vectors", "check", str(d)]) == 1
    assert "FAIL  layer-H2-causal-clip-factored" in capsys.readouterr().out


@pytest.mark.parametrize("name,key", [("layer-H1-ctx-clip-merged", "out"), ("layer-H2-ctx-noclip-factored", "dW_V"),
                                      ("stack-recurrent-K3-H1-ctx-clip-factored", "layer0.dP"),
                                      ("loss-K1-H1-ctx-noclip-factored", "L"), ("adam-clip-2layers-factored", "new_v.layer1.P"),
                                      ("train-5steps-K1-H1", "losses"), ("gdpp-2layers-W0", "pred"),
                                      ("layer-H1-causal-noclip-factored", "E")])
def test_small_perturbation_fails_values_even_with_a_forged_checksum(tmp_path, name, key):
    d = _copy(tmp_path)
    _rewrite(d, name, _bump(key), forge_checksum=True)
    ok, results = golden.check_vectors(d)
    bad = [r for r in results if not r.ok]
    assert not ok and [r.name for r in bad] == [name], results
    if key != "E":   # a perturbed input shows up in whichever output it moves most
        assert bad[0].message.startswith(f"{key}:"), bad[0].message


def test_independent_check_rejects_a_perturbed_gradient():
    entry, inputs, outputs = next(c for c in COMMITTED if c[0]["name"] == "layer-H2-causal-clip-factored")
    wrong = {k: v.copy() for k, v in outputs.items()}
    wrong["dW_Q"] = np.swapaxes(wrong["dW_Q"], 0, 1).reshape(wrong["dW_Q"].shape)  # heads and rows mixed up
    rows = cv.independent_reports(entry["kind"], inputs, wrong)
    assert [r[0] for r in rows if not r[2]] == ["dW_Q"]


def test_manifest_version_bump_fails_with_regenerate_hint(tmp_path, capsys):
    d = _copy(tmp_path)
    man = json.loads((d / golden.MANIFEST).read_text())
    man["format_version"] = golden.FORMAT_VERSION + 1
    (d / golden.MANIFEST).write_text(json.dumps(man))
    ok, results = golden.check_vectors(d)
    assert not ok and "format version" in results[0].message and "icgd vectors write" in results[0].message
    assert icgd_main(["vectors", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "icgd vectors write" in out


def test_missing_case_or_manifest_fails(tmp_path):
    d = _copy(tmp_path)
    man = json.loads((d / golden.MANIFEST).read_text())
    man["cases"] = man["cases"][1:]
    (d / golden.MANIFEST).write_text(json.dumps(man))
    ok, results = golden.check_vectors(d)
    assert not ok and "missing" in results[0].message
    ok, results = golden.check_vectors(tmp_path / "nowhere")
    assert not ok and "icgd vectors write" in results[0].message


def test_python_m_verify_golden_runs():
    r = subprocess.run([sys.executable, "-m", "verify.golden", "check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(golden.CASES)} passed, 0 failed" in r.stdout


def test_spec_port_example_runs_and_can_fail(tmp_path):
    """The NumPy-only example in SPEC.md checks the layer vectors; it must pass on the
    committed vectors and fail on a perturbed one."""
    text = (ROOT / "SPEC.md").read_text()
    m = re.search(r"<!-- port-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "SPEC.md lost its port example"
    code = m.group(1)
    r = subprocess.run([sys.executable, "-c", code, str(golden.DEFAULT_DIR)], capture_output=True, text=True)
    assert r.returncode == 0 and "16 layer cases agree" in r.stdout, r.stdout + r.stderr
    d = _copy(tmp_path)
    _rewrite(d, "layer-H2-ctx-clip-factored", _bump("out"), forge_checksum=False)
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True)
    assert r.returncode != 0 and "layer-H2-ctx-clip-factored" in r.stdout + r.stderr
