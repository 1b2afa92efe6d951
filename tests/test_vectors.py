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
* the NumPy-only port example in SPEC.md runs against the vectors;
* the committed files are what ``write`` produces, the cases of format version 1 are
  pinned by checksum (new cases are appended, never changed), the manifest describes
  every kind, and each case added for a port's gap really exercises it;
* a broken folder (manifest fields missing or of the wrong type, outputs or cases
  dropped or repeated, wrong dtypes, huge sizes, paths out of the folder) fails on the
  case concerned, the others are still checked, and nothing raises
  (tests/test_vectors_fuzz.py draws such folders at random).
"""

import hashlib
import json
import os
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
    assert {e["kind"] for e, _, _ in COMMITTED} == set(golden.COMPUTE) == set(golden.KINDS)
    layer = {e["name"] for e, _, _ in COMMITTED if e["kind"] == "layer"}
    grid = {f"layer-H{H}-{m}-{c}-{p}" for H in (1, 2) for m in ("ctx", "causal") for c in ("noclip", "clip")
            for p in ("factored", "merged")}
    assert grid <= layer    # H in {1, 2} x {ctx, causal} x {noclip, clip} x {factored, merged}


# The sha256 (first 16 hex digits) of every case file of format version 1. A case's file
# changes only with its meaning, and then FORMAT_VERSION goes up (and this table with it);
# new cases are appended to the generator's table and added here.
PINNED = {1: {
    "layer-H1-ctx-noclip-factored": "ee47b3a4780feb6f", "layer-H1-ctx-noclip-merged": "e3a2739e98945482",
    "layer-H1-ctx-clip-factored": "ea9a0e33fa15707d", "layer-H1-ctx-clip-merged": "b60288c86293837c",
    "layer-H1-causal-noclip-factored": "7d0c4fa2dcd4e02c", "layer-H1-causal-noclip-merged": "4e2dfef05b2eda6b",
    "layer-H1-causal-clip-factored": "611a079df29b861b", "layer-H1-causal-clip-merged": "cdfba7f59f986eeb",
    "layer-H2-ctx-noclip-factored": "17967203752577ae", "layer-H2-ctx-noclip-merged": "1be8c07a3ce564f0",
    "layer-H2-ctx-clip-factored": "2dabaedf05de1be9", "layer-H2-ctx-clip-merged": "afda910c12e90e03",
    "layer-H2-causal-noclip-factored": "28e86af6cc371e4f", "layer-H2-causal-noclip-merged": "3d423bfc085dac6b",
    "layer-H2-causal-clip-factored": "e0d1e5604887071e", "layer-H2-causal-clip-merged": "78eefda9d555ae5d",
    "stack-recurrent-K3-H1-ctx-clip-factored": "ea14ba27a2f190d4",
    "stack-separate-K2-H2-ctx-noclip-factored": "d9f7d793cdd20590",
    "stack-separate-K2-H1-causal-clip-merged": "b761bf7ff48d902c",
    "loss-K1-H1-ctx-noclip-factored": "f80bf7576f5b8ee1", "loss-recurrent-K3-H1-ctx-clip-factored": "57fa03031e235a8d",
    "loss-separate-K2-H2-causal-noclip-merged": "e1bf6eaea58749a2",
    "gd-1step-W0": "309bfe3e8e79bd86", "gd-3steps-recurrent": "b220ed65abe74a73",
    "gd-2steps-separate-W0": "9a74d65e8d718fc4", "gdpp-2layers-W0": "9b54367571342fa8",
    "adam-clip-2layers-factored": "bf1f14f540dfb0aa", "adam-noclip-H2-merged": "91a89f89cb08b5ca",
    "train-5steps-K1-H1": "5878eb0b797e0341", "tasks-noise-distractors": "b4f68afdf84f56f8",
    "init-H1": "b3d417cdd5c514bf", "baselines": "19eb466eb4f4d339",
    "eta-paper-defaults": "a95762a00c500f69", "eta-noise-dy2": "608dc11b914c4ea0",
    # added in format version 1, after the first 34
    "layer-H2-causal-clipedge-factored": "4d4cbf8813cad365", "init-H2-Vd3-redraw": "129a24f93bb59fad",
    "init-H2-merged-redraw": "015aeb631cef3164", "train-4steps-K2-H2-clipnorm": "6e90ff221903c523",
    "baselines-eta-per-step": "e58647947ec689ae", "baselines-line-search-tie": "97579b8ea992b3e4",
    # added in format version 1 with the layer types after LSA
    "softmax-H1-ctx-noclip": "c3e0c00ca4aa21f6", "softmax-H2-causal-clip": "5c40631884077353",
    "softmax-H2-ctx-large-logits": "8f84cd8d186e2c4f", "mlp-tanh-noclip": "93cbdecd26e2a66f",
    "mlp-erf-clip": "1ff647d55a252954", "mlp-tanh-nobias": "ac5d0e63f3a655f1", "layernorm": "3f2e18cbe7eee64c",
    "layernorm-variance-near-eps": "07dc5733b4732f5f", "pre_ln-lsa-ctx-noclip": "1b59ca089d2d4020",
    "pre_ln-softmax-H2-causal-clip": "ad7029730f2ffd14", "pre_ln-mlp-tanh": "1a9647dcd82c5fff",
    "posenc-add": "984df68425d59c4c", "posenc-concat-width3": "456e972244113d4d",
    "embedded-loss-tanh": "ccdb8592fc4b3b10",
    # added in format version 1 with the sequence tasks (mesa paper, SPEC.md section 15)
    "causal-gd-Phi0": "c0a4e33e70bf4c05",
    "pre_ln-mlp-erf": "bf16e16a2518f786",
    # added in format version 1 with the mesa layer and the delta rule (issue #16, SPEC.md section 16)
    "mesa-H2-sm": "f1b6424eb54c4cb0", "mesa-H2-sm-forget": "9de6c395e5727996",
    "mesa-H2-direct-forget": "d59d7fb63e9819dc", "mesa-H1-cg": "868a3a4726bd6fd2",
    "delta-H2-recurrent-gate": "ccb0a082e93614ff", "delta-H2-chunked2-gate": "30673dd89f9c4254",
    "delta-H1-chunked3-beta0.6": "61e6a3ba72deb997",
    # added in format version 1 with classic tokens and the Prop. 3 copy construction (issue #15, SPEC.md section 5b)
    "classic-loss-P4": "ecd53954b32594f1", "copy-construction-N1-P4": "aa0f873e195f8ce9",
    # added in format version 1 with the Prop. 2 causal constructions and the LDS sampler (issue #16, SPEC.md section 15)
    "causal-prop2-neumann-K2": "b774d370064e5d3d", "causal-prop2-richardson-K2": "336d7d74355718eb",
    "causal-prop2-chebyshev-K2": "11e8b632c6700476", "lds-sampler-linear": "8a39b7e3bfdfd850",
    "lds-sampler-contracting": "7cfa9344f5264bf9", "lds-sampler-partial": "1efd00bba9e10ab1",
    "lds-sampler-nonlinear": "99aeef754175b445", "lds-sampler-fixed": "480c8a9810c8108e",
}}


def test_cases_are_pinned_and_new_ones_appended():
    pins = PINNED[golden.FORMAT_VERSION]
    got = {e["name"]: hashlib.sha256((golden.DEFAULT_DIR / e["file"]).read_bytes()).hexdigest()[:16]
           for e, _, _ in COMMITTED}
    assert got == pins, {n: (got.get(n), pins.get(n)) for n in set(got) | set(pins) if got.get(n) != pins.get(n)}
    assert [c.name for c in golden.CASES][:len(PINNED[1])] == list(PINNED[1])   # generator order: appended only


# A fresh write is byte-identical to the committed files on the machine that wrote them,
# but not on every CPU: NumPy dispatches exp, erf, tanh and its sums to SIMD loops chosen
# per CPU (AVX-512 vs AVX2), OpenBLAS picks its matmul kernels per CPU, and LAPACK's
# blocked solvers (least squares, ridge) do the same. Measured on an AMD EPYC with AVX2
# against the AVX-512 machine that wrote the files: 19 of the files differ, by at most
# 2.0e-16 of the array's largest value for the plain kinds (mlp-erf, softmax, mesa, delta,
# classic-loss) and 7.8e-16 for the LAPACK kind ("baselines": 4.4e-15 on values of 5.7).
# So a file whose bytes differ must match array by array to a few dozen ulps of its scale:
# PLATFORM_RTOL (50x the largest difference measured) for plain kinds, LAPACK_RTOL for the
# LAPACK kind. Integer arrays, shapes, dtypes and keys must be equal everywhere.
LAPACK_KINDS = {"baselines"}
LAPACK_RTOL = 1e-13
PLATFORM_RTOL = 1e-14


def _same_arrays_to_rounding(fresh, committed, rtol):
    a, b = np.load(fresh), np.load(committed)
    assert sorted(a.files) == sorted(b.files), fresh.name
    for k in b.files:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{fresh.name} {k}"
        if x.dtype.kind in "fc":
            fin = np.isfinite(y)           # inf (a 'no clip' value) and nan must sit where they sat, as they were
            assert np.array_equal(fin, np.isfinite(x)) and np.array_equal(x[~fin], y[~fin], equal_nan=True), \
                f"{fresh.name} {k}: non-finite entries differ"
            scale = max(float(np.max(np.abs(y[fin]))), 1e-300) if fin.any() else 1.0
            assert np.max(np.abs(x[fin] - y[fin]), initial=0.0) <= rtol * scale, f"{fresh.name} {k}"
        else:
            assert np.array_equal(x, y), f"{fresh.name} {k}"


def test_the_rounding_comparison_can_fail(tmp_path):
    """The comparison that replaces byte identity across CPUs refuses a difference of
    1e-12 of the scale, a changed integer, key or shape, and an inf where a number was."""
    y = np.linspace(-2.0, 3.0, 12).reshape(3, 4)
    np.savez(tmp_path / "c.npz", a=y, n=np.arange(3))
    for name, arrays in (("ulp", dict(a=y + 3 * np.spacing(3.0), n=np.arange(3))),
                         ("far", dict(a=y + 1e-12 * 3.0, n=np.arange(3))),
                         ("int", dict(a=y, n=np.arange(3) + 1)), ("key", dict(a=y)),
                         ("inf", dict(a=np.where(y > 2.9, np.inf, y), n=np.arange(3))),
                         ("shape", dict(a=y.ravel(), n=np.arange(3)))):
        np.savez(tmp_path / f"{name}.npz", **arrays)
    _same_arrays_to_rounding(tmp_path / "ulp.npz", tmp_path / "c.npz", PLATFORM_RTOL)
    for name in ("far", "int", "key", "shape", "inf"):
        with pytest.raises(AssertionError):
            _same_arrays_to_rounding(tmp_path / f"{name}.npz", tmp_path / "c.npz", PLATFORM_RTOL)


def test_write_reproduces_the_committed_files(tmp_path):
    """``icgd vectors write`` gives back every committed npz: byte for byte on the CPU
    that wrote them, else array by array to rounding (see PLATFORM_RTOL), and the
    manifest entry for entry (the package and NumPy versions it records aside, and the
    checksums of the files whose bytes differ)."""
    d = tmp_path / "fresh"
    golden.write_vectors(d)
    committed = sorted(p.name for p in golden.DEFAULT_DIR.iterdir() if p.suffix == ".npz")
    assert sorted(p.name for p in d.iterdir() if p.suffix == ".npz") == committed
    fresh, man = _manifest(d), _manifest(golden.DEFAULT_DIR)
    kind_of = {e["file"]: e["kind"] for e in man["cases"]}
    differ = set()
    for name in committed:
        if (d / name).read_bytes() != (golden.DEFAULT_DIR / name).read_bytes():
            differ.add(name)
            rtol = LAPACK_RTOL if kind_of[name] in LAPACK_KINDS else PLATFORM_RTOL
            _same_arrays_to_rounding(d / name, golden.DEFAULT_DIR / name, rtol)
    for m in (fresh, man):
        del m["package_version"], m["numpy_version"]
        for e in m["cases"]:
            if e["file"] in differ:
                e.pop("sha256")
    assert fresh == man


def test_manifest_says_what_each_kind_reads_and_computes():
    """A port can be driven by the manifest: every kind says what it computes, which
    inputs are data and which configuration, and which outputs it writes; every case's
    keys are covered by its kind's description."""
    man = _manifest(golden.DEFAULT_DIR)
    assert man["format_version"] == golden.FORMAT_VERSION == 1 and "format_rule" in man
    assert man["kinds"] == golden.kinds_table() and set(man["kinds"]) == set(golden.KINDS)
    assert set(man["placeholders"]) == {"<param>", "<k>", "<s>", "<gating>"}
    for e in man["cases"]:
        k = man["kinds"][e["kind"]]
        assert k["computes"] and "section" in k["computes"]
        data, outs = [golden.key_pattern(p) for p in k["data"]], [golden.key_pattern(p) for p in k["outputs"]]
        for key in e["inputs"]:
            assert key in k["config"] or any(r.fullmatch(key) for r in data), (e["name"], key)
        for key in e["outputs"]:
            assert any(r.fullmatch(key) for r in outs), (e["name"], key)
    for e, inputs, _ in COMMITTED:
        assert golden.input_problems(e["kind"], inputs) == [], e["name"]


def _case(name):
    return next((e, i, o) for e, i, o in COMMITTED if e["name"] == name)


def test_init_cases_redraw_and_use_the_fan_in_of_P():
    """The added init cases reject draws beyond the bound, more than one per array and
    again after a redraw (so the redraw order matters), P's fan-in H * Vd differs from D,
    and a merged case exists."""
    for name, merged in (("init-H2-Vd3-redraw", False), ("init-H2-merged-redraw", True)):
        _, inputs, outputs = _case(name)
        rng = np.random.default_rng(int(inputs["seed"]))
        rounds = [cv.truncated_normal(rng, shape)[1] for _, shape, _ in cv.init_draws(inputs)]
        assert any(len(r) >= 2 and r[0] >= 2 for r in rounds), rounds   # two rejected, one rejected again
        assert set(outputs) == ({"W_KQ", "W_PV"} if merged else {"W_Q", "W_K", "W_V", "P"})
    fan_in = {n: f for n, _, f in cv.init_draws(_case("init-H2-Vd3-redraw")[1])}
    assert fan_in["P"] == 6 and fan_in["W_V"] == 4                     # H * Vd = 2 * 3 vs D = 4


def test_train_clip_case_clips_some_steps_and_not_others():
    _, inputs, outputs = _case("train-4steps-K2-H2-clipnorm")
    norms, c = outputs["grad_norms"], float(inputs["clip_norm"])
    assert np.any(norms > c) and np.any(norms < c)
    assert np.min(np.abs(norms - c)) > 0.01 * c                        # rounding in a port cannot flip a step
    _, _, quiet = _case("train-5steps-K1-H1")
    assert np.all(quiet["grad_norms"] < float(_case("train-5steps-K1-H1")[1]["clip_norm"]))


def test_line_search_tie_case_ties_exactly_and_takes_the_first():
    _, inputs, outputs = _case("baselines-line-search-tie")
    losses, grid = outputs["losses_ls"], inputs["eta_grid"]
    best = np.flatnonzero(losses == losses.min())
    assert best.size == 2 and float(outputs["eta_ls"]) == grid[best[0]] != grid[best[1]]
    assert np.all(outputs["pred_gd"] != 0) and np.all(inputs["y_q"] != 0)


def test_eta_per_step_case_uses_every_step_size():
    """GD-K from 0 on one task set is a polynomial in (1/N) X^T X, so the order of the
    steps cannot matter; what the case tests is that every step size is used: one eta
    for all steps (the first, or the mean) gives another prediction."""
    import reference as R
    _, inputs, outputs = _case("baselines-eta-per-step")
    etas = inputs["eta"]
    assert etas.shape == (int(inputs["n_steps"]),) and len(set(etas.tolist())) == etas.size
    for eta in (float(etas[0]), float(etas.mean())):
        pred, _ = R.gd_predict(inputs["X"], inputs["Y"], inputs["x_q"], eta, etas.size)
        assert np.max(np.abs(pred - outputs["pred_gd"])) > 1e-6 * np.max(np.abs(outputs["pred_gd"]))


def test_clip_edge_case_sits_on_the_level_where_the_gradient_passes():
    """Two pre-clip entries equal +-clip exactly (coordinate 0 passes the layer untouched:
    row 0 of every P_h is 0), and halving the gradient there (what an autodiff clip
    does at ties) would move dE far beyond the tolerance."""
    _, inputs, outputs = _case("layer-H2-causal-clipedge-factored")
    c, E, out, dout = float(inputs["clip"]), inputs["E"], outputs["out"], inputs["dout"]
    assert np.all(inputs["P"][:, 0, :] == 0)
    edges = np.argwhere(np.abs(E[..., 0]) == c)
    assert len(edges) == 2 and {np.sign(E[b, t, 0]) for b, t in edges} == {-1.0, 1.0}
    for b, t in edges:
        assert out[b, t, 0] == E[b, t, 0]                              # on the level: unchanged, and not clipped
    assert np.sum(np.abs(out) == c) > 2                                # other entries are clipped
    shift = min(0.5 * abs(dout[b, t, 0]) for b, t in edges)
    assert shift > 1e6 * 1e-12 * np.max(np.abs(outputs["dE"]))


def test_spec_statements_on_W0_and_moments():
    """SPEC.md sections 3, 8, 9: a per-task W_0 (B, d_y, d) reaches the tokens and GD-K but
    not a construction (its weights are shared by the batch); the closed-form moments
    refuse an asymmetric x_range."""
    import reference as R
    t = R.sample_tasks(np.random.default_rng(0), 2, 3, 4, 1)
    W_0 = np.random.default_rng(1).standard_normal((2, 1, 3))
    E = R.build_tokens(t.X, t.Y, t.x_q, W_0=W_0)
    assert np.allclose(E[:, -1, 3:], -np.einsum("bij,bj->bi", W_0, t.x_q))
    R.gd_predict(t.X, t.Y, t.x_q, 0.5, 2, W_0=W_0)
    for build in (lambda: R.gd_stack(2, 3, 1, 4, 0.5, W_0), lambda: R.gdpp_stack(3, 1, 4, [0.5], [0.1], W_0)):
        with pytest.raises(ValueError, match="W_0"):
            build()
    with pytest.raises(ValueError, match="symmetric"):
        R.uniform_moments((0.0, 1.0))


def test_write_removes_stale_files_only_inside_the_folder(tmp_path):
    d = tmp_path / "vectors"
    golden.write_vectors(d)
    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"keep me")
    (d / "old-case.npz").write_bytes(b"stale")
    man = _manifest(d)
    man["cases"] += [{"file": "../victim.npz"}, {"file": str(victim)}, {"file": "old-case.npz"}]
    _write_manifest(d, man)
    golden.write_vectors(d)
    assert victim.read_bytes() == b"keep me" and not (d / "old-case.npz").exists()


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
    bad = [r for r in results if not r.ok]
    assert not ok and [r.name for r in bad] == [golden.CASES[0].name] and "missing" in bad[0].message
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
    n_layer = sum(c.kind == "layer" for c in golden.CASES)
    assert r.returncode == 0 and f"{n_layer} layer cases agree" in r.stdout, r.stdout + r.stderr
    d = _copy(tmp_path)
    _rewrite(d, "layer-H2-ctx-clip-factored", _bump("out"), forge_checksum=False)
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True)
    assert r.returncode != 0 and "layer-H2-ctx-clip-factored" in r.stdout + r.stderr


# --------------------------------------------------------------------------------
# The checker on broken folders: every problem is a FAIL line of its own case, the
# other cases are still checked, the exit code is 1, and nothing raises.
# --------------------------------------------------------------------------------

def _manifest(d):
    return json.loads((d / golden.MANIFEST).read_text())


def _write_manifest(d, man):
    (d / golden.MANIFEST).write_text(json.dumps(man))


def _entry(man, name):
    return next(e for e in man["cases"] if isinstance(e, dict) and e.get("name") == name)


def _check_isolated(d, capsys, bad_names):
    """check_vectors and ``icgd vectors check`` on ``d``: no exception, exit code 1, the
    cases in ``bad_names`` FAIL and every other case of the generator PASSes."""
    ok, results = golden.check_vectors(d)
    failed = {r.name for r in results if not r.ok}
    assert not ok
    assert set(bad_names) <= failed, results
    passed = {r.name for r in results if r.ok}
    assert passed == {c.name for c in golden.CASES} - failed - {"manifest"}, failed
    assert set(bad_names) | passed >= {c.name for c in golden.CASES} - failed
    capsys.readouterr()
    assert icgd_main(["vectors", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out and " 0 failed" not in out
    return {r.name: r.message for r in results if not r.ok}


@pytest.mark.parametrize("how", ["absent", "null", "string"])
def test_manifest_without_a_list_of_cases_fails_every_case(tmp_path, capsys, how):
    d = _copy(tmp_path)
    man = _manifest(d)
    if how == "absent":
        del man["cases"]
    else:
        man["cases"] = None if how == "null" else "all of them"
    _write_manifest(d, man)
    ok, results = golden.check_vectors(d)
    failed = {r.name for r in results if not r.ok}
    assert not ok and {c.name for c in golden.CASES} <= failed, results
    assert any("cases" in r.message for r in results if r.name == "manifest")
    assert icgd_main(["vectors", "check", str(d)]) == 1


@pytest.mark.parametrize("field", ["name", "kind", "file", "sha256", "inputs", "outputs"])
def test_entry_without_a_field_fails_that_entry_only(tmp_path, capsys, field):
    d = _copy(tmp_path)
    man = _manifest(d)
    del _entry(man, "eta-noise-dy2")[field]
    _write_manifest(d, man)
    messages = _check_isolated(d, capsys, ["eta-noise-dy2"])
    text = " ".join(messages.values())
    assert field in text, messages


@pytest.mark.parametrize("field,value", [("name", 7), ("kind", None), ("file", ["a"]), ("sha256", 3.5),
                                         ("inputs", None), ("outputs", "L_eta")])
def test_entry_with_a_wrong_typed_field_fails_that_entry_only(tmp_path, capsys, field, value):
    d = _copy(tmp_path)
    man = _manifest(d)
    _entry(man, "eta-noise-dy2")[field] = value
    _write_manifest(d, man)
    _check_isolated(d, capsys, ["eta-noise-dy2"])


def _forge(d, name, mutate_arrays, mutate_entry=None):
    """Rewrite one case's npz and make its manifest entry agree (sha256, and the array
    descriptions of the keys that are still there), so only the kind's own rules can catch it."""
    path = d / f"{name}.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    mutate_arrays(arrays)
    data = golden.npz_bytes(arrays)
    path.write_bytes(data)
    man = _manifest(d)
    e = _entry(man, name)
    e["sha256"] = hashlib.sha256(data).hexdigest()
    for part in ("inputs", "outputs"):
        e[part] = {k: {"shape": list(arrays[k].shape), "dtype": arrays[k].dtype.name} for k in e[part] if k in arrays}
    if mutate_entry is not None:
        mutate_entry(e)
    _write_manifest(d, man)


def test_int64_tokens_fail_their_case(tmp_path, capsys):
    d = _copy(tmp_path)
    _forge(d, "layer-H1-ctx-noclip-factored", lambda a: a.update(E=(10 * a["E"]).astype(np.int64)))
    messages = _check_isolated(d, capsys, ["layer-H1-ctx-noclip-factored"])
    assert "E" in messages["layer-H1-ctx-noclip-factored"] and "float64" in messages["layer-H1-ctx-noclip-factored"]


@pytest.mark.parametrize("name,key,value", [("tasks-noise-distractors", "B", 10 ** 9),
                                            ("train-5steps-K1-H1", "n_steps", 10 ** 9),
                                            ("init-H1", "D", 2 ** 40),
                                            ("stack-separate-K2-H2-ctx-noclip-factored", "K", -3)])
def test_huge_or_negative_size_fails_its_case_without_computing(tmp_path, capsys, name, key, value):
    d = _copy(tmp_path)
    _forge(d, name, lambda a: a.update({key: np.asarray(value, dtype=np.int64)}))
    messages = _check_isolated(d, capsys, [name])
    assert key in messages[name], messages


@pytest.mark.parametrize("name,keys", [("layer-H2-ctx-clip-merged", ["dW_PV"]), ("train-5steps-K1-H1", ["step4.y_q"]),
                                       ("eta-paper-defaults", ["m2", "m4", "eta_star", "L_star", "L_eta"]),
                                       ("adam-noclip-H2-merged", None)])
def test_output_removed_from_npz_and_manifest_fails(tmp_path, capsys, name, keys):
    d = _copy(tmp_path)
    entry = _entry(_manifest(d), name)
    keys = list(entry["outputs"]) if keys is None else keys            # None: every output
    _forge(d, name, lambda a: [a.pop(k) for k in keys],
           lambda e: e.update(outputs={k: v for k, v in e["outputs"].items() if k not in keys}))
    messages = _check_isolated(d, capsys, [name])
    assert keys[0] in messages[name], messages


def test_duplicated_case_fails(tmp_path, capsys):
    d = _copy(tmp_path)
    man = _manifest(d)
    man["cases"].append(dict(_entry(man, "gd-1step-W0")))
    _write_manifest(d, man)
    ok, results = golden.check_vectors(d)
    bad = [r for r in results if not r.ok]
    assert not ok and [r.name for r in bad] == ["gd-1step-W0"], bad
    assert "twice" in bad[0].message or "duplicate" in bad[0].message
    assert icgd_main(["vectors", "check", str(d)]) == 1


def test_case_unknown_to_the_generator_fails(tmp_path, capsys):
    d = _copy(tmp_path)
    man = _manifest(d)
    extra = dict(_entry(man, "gd-1step-W0"), name="gd-9steps")
    man["cases"].append(extra)
    _write_manifest(d, man)
    messages = _check_isolated(d, capsys, ["gd-9steps"])
    assert "generator" in messages["gd-9steps"]


@pytest.mark.parametrize("file", ["../outside.npz", "{abs}", "sub/../../outside.npz", "./../outside.npz"])
def test_file_outside_the_folder_is_not_read(tmp_path, capsys, file):
    d = _copy(tmp_path)
    outside = tmp_path / "outside.npz"
    shutil.copy(d / "baselines.npz", outside)                          # a valid copy, with the right sha256
    (d / "sub").mkdir()
    man = _manifest(d)
    _entry(man, "baselines")["file"] = str(outside) if file == "{abs}" else file
    _write_manifest(d, man)
    messages = _check_isolated(d, capsys, ["baselines"])
    assert "folder" in messages["baselines"], messages


def test_symlink_out_of_the_folder_is_not_followed(tmp_path, capsys):
    d = _copy(tmp_path)
    outside = tmp_path / "outside.npz"
    shutil.move(d / "baselines.npz", outside)
    (d / "baselines.npz").symlink_to(outside)
    messages = _check_isolated(d, capsys, ["baselines"])
    assert "folder" in messages["baselines"], messages


def test_several_problems_are_each_reported_on_their_own_case(tmp_path, capsys):
    d = _copy(tmp_path)
    _forge(d, "layer-H1-ctx-noclip-factored", lambda a: a.update(E=a["E"].astype(np.int64)))
    _forge(d, "loss-K1-H1-ctx-noclip-factored", lambda a: a.pop("L"),
           lambda e: e.update(outputs={k: v for k, v in e["outputs"].items() if k != "L"}))
    _forge(d, "tasks-noise-distractors", lambda a: a.update(B=np.asarray(10 ** 9)))
    man = _manifest(d)
    _entry(man, "baselines")["file"] = "../baselines.npz"
    del _entry(man, "eta-noise-dy2")["kind"]
    _write_manifest(d, man)
    _check_isolated(d, capsys, ["layer-H1-ctx-noclip-factored", "loss-K1-H1-ctx-noclip-factored",
                                "tasks-noise-distractors", "baselines", "eta-noise-dy2"])


def test_format_version_must_be_the_integer(tmp_path):
    d = _copy(tmp_path)
    man = _manifest(d)
    man["format_version"] = True                                       # == 1 in Python, still not the version
    _write_manifest(d, man)
    ok, results = golden.check_vectors(d)
    assert not ok and "format version" in results[0].message


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{\"format_version\": 1, \"cases\": [3, null]}"])
def test_manifest_of_the_wrong_shape_fails(tmp_path, text):
    d = _copy(tmp_path)
    (d / golden.MANIFEST).write_text(text)
    ok, results = golden.check_vectors(d)
    assert not ok and results
    assert icgd_main(["vectors", "check", str(d)]) == 1


def test_odd_names_print_on_an_ascii_terminal(tmp_path):
    d = _copy(tmp_path)
    man = _manifest(d)
    _entry(man, "gd-1step-W0")["name"] = "gd-1step-W0\u00e9"
    _entry(man, "baselines")["inputs"]["\u00e9t\u00e9"] = {"shape": [], "dtype": "float64"}
    _write_manifest(d, man)
    r = subprocess.run([sys.executable, "-m", "verify.golden", "check", str(d)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "FAIL  cases[" in r.stdout and "FAIL  baselines" in r.stdout and "FAIL  gd-1step-W0 " in r.stdout


def test_spec_manifest_example_runs():
    """SPEC.md section 13's sketch of a port driven by the manifest: it reaches every case,
    runs the kinds it names and reports the others."""
    text = (ROOT / "SPEC.md").read_text()
    m = re.search(r"<!-- manifest-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "SPEC.md lost its manifest example"
    r = subprocess.run([sys.executable, "-c", m.group(1), str(golden.DEFAULT_DIR)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(golden.CASES)
    assert sum(line.startswith("RUN ") for line in lines) == sum(c.kind in ("layer", "loss", "adam") for c in golden.CASES)
    assert any("config {'causal'" in line for line in lines)


def test_mesa_and_delta_cases_cover_their_forms():
    """The mesa cases run every form (sm also with forgetting) with lam away from its init
    1; the delta cases run both forms with learned beta and gate, the chunked ones ending
    on a short chunk, and one fixed beta without a gate."""
    mesa = [i for e, i, _ in COMMITTED if e["kind"] == "mesa_layer"]
    assert {int(i["form"]) for i in mesa} == {0, 1, 2}
    assert any(int(i["form"]) == 0 and float(i["forget"]) < 1 for i in mesa)
    assert all(np.all(np.abs(i["lam"] - 1.0) > 0.03) for i in mesa)
    delta = [i for e, i, _ in COMMITTED if e["kind"] == "delta_layer"]
    gated = [int(i["form"]) for i in delta if bool(i["gate"]) and "w_alpha" in i and "w_beta" in i]
    assert set(gated) == {0, 1}
    assert all(i["E"].shape[1] % int(i["chunk"]) for i in delta if int(i["form"]) == 1)
    assert any("beta" in i and "w_beta" not in i and not bool(i["gate"]) for i in delta)
