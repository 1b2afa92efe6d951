"""Meta-tests of the conformance kit (``icgd conformance``, verify/conformance.py).

The kit is shown to fail where it must: each mistake ports actually make is planted in
a copy of the NumPy adapter and the report names it; an adapter implementing nothing is
"not implemented", never "passed"; raising adapters, bad paths and bad options give a
FAIL line or a usage error, never a traceback. The mistakes are planted in a small,
independent NumPy port written here from SPEC.md (an einsum forward as in SPEC.md
section 13, complex-step gradients): it shares no backward code with the reference or
with the kit's mistaken variants, and without a mistake it passes every case it
implements. The JAX and PyTorch example adapters run where those libraries are
installed and are skipped with the reason otherwise.
"""

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import reference as R
from reference.gradcheck import numerical_gradient
from verify import cli, golden
from verify import conformance as C
from verify.adapters import numpy_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = C.read_vectors(golden.DEFAULT_DIR)
N_CASES = len(VECTORS.entries)
PORT_KINDS = ("layer", "stack", "loss", "gd", "gdpp", "adam", "train")


def icgd(*argv):
    """(exit code, stdout, stderr) of ``icgd conformance ARGV`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(["conformance", *argv])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def run_kit(module, kinds=(), cases=(), tol=None):
    adapter = C.Adapter(module, module.__name__, getattr(module, "NAME", module.__name__), "")
    return C.run_conformance(adapter, VECTORS, tol, C.Selection(tuple(kinds), tuple(cases)))


def write_adapter(tmp_path, source, name="my_adapter.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


# ---- a small independent port with one switch per known mistake -------------------------

def _flat(layers):
    keys = [(k, n) for k, p in enumerate(layers) for n in p]
    return [layers[k][n] for k, n in keys], keys


def _rebuild(arrays, keys, n_layers, grad=False):
    out = [{} for _ in range(n_layers)]
    for (k, n), a in zip(keys, arrays):
        out[k][("d" if grad else "") + n] = a
    return out


class MiniPort:
    """The layer, stack, loss, Adam and training step from SPEC.md sections 3-6 and 10:
    forwards with einsum, gradients by complex step (reference.gradcheck.numerical_gradient,
    exact up to rounding for this polynomial code), Adam transcribed. ``mistake`` (a name
    of verify.conformance.MISTAKES) plants that mistake the way a port would write it."""

    def __init__(self, mistake=None):
        self.mistake = mistake

    def clip(self, pre, c):
        if math.isinf(c):
            return pre
        r = pre.real
        inside, level = np.abs(r) <= c, np.sign(r) * c
        if self.mistake == "straight-through-clip-gradient":      # the value clipped, the derivative passed
            return np.where(inside, pre, level + 1j * pre.imag)
        if self.mistake == "clip-gradient-halved-at-the-level":    # jnp.clip's 0.5 on the level
            return np.where(np.abs(r) == c, r + 0.5j * pre.imag, np.where(inside, pre, level))
        return np.where(inside, pre, level)

    def lsa(self, E, p, causal, clip):
        if "W_KQ" in p:
            eye = np.broadcast_to(np.eye(E.shape[2]), p["W_KQ"].shape)
            W_Q, W_K, W_V, P = p["W_KQ"], eye, p["W_PV"], eye
            if self.mistake == "W_KQ-transposed":
                W_Q = np.swapaxes(W_Q, -1, -2)
        else:
            W_Q, W_K, W_V, P = p["W_Q"], p["W_K"], p["W_V"], p["P"]
            if self.mistake == "W_KQ-transposed":
                W_Q, W_K = W_K, W_Q
        T = E.shape[1]
        S = T if causal or self.mistake == "query-used-as-key" else T - 1
        q = np.einsum("hkd,btd->bhtk", W_Q, E)
        k = np.einsum("hkd,bsd->bhsk", W_K, E[:, :S])
        v = np.einsum("hvd,bsd->bhsv", W_V, E[:, :S])
        A = np.einsum("bhtk,bhsk->bhts", q, k)
        if causal:
            A = A * np.tril(np.ones((T, T)), -1 if self.mistake == "causal-mask-without-diagonal" else 0)
        if self.mistake == "attention-divided-by-N":
            A = A / (T - 1)
        return self.clip(E + np.einsum("hdv,bhts,bhsv->btd", P, A, v), clip)

    def forward(self, E, layers, K, recurrent, causal, clip):
        for k in range(K):
            E = self.lsa(E, layers[0 if recurrent else k], causal, clip)
        return E

    def upstream(self, dout):
        return np.ones_like(dout) if self.mistake == "upstream-gradient-ones" else dout

    def layer(self, E, dout, causal, clip, **params):
        names, up = list(params), self.upstream(dout)
        g = numerical_gradient(lambda a: np.sum(up * self.lsa(a[0], dict(zip(names, a[1:])), causal, clip)),
                               [E, *params.values()])
        return {"out": np.real(self.lsa(E, params, causal, clip)), "dE": g[0],
                **{"d" + n: x for n, x in zip(names, g[1:])}}

    def stack(self, E, layer, dout, K, recurrent, causal, clip):
        flat, keys = _flat(layer)
        up = self.upstream(dout)
        g = numerical_gradient(
            lambda a: np.sum(up * self.forward(a[0], _rebuild(a[1:], keys, len(layer)), K, recurrent, causal, clip)),
            [E, *flat])
        return {"out": np.real(self.forward(E, layer, K, recurrent, causal, clip)), "dE": g[0],
                "layer": _rebuild(g[1:], keys, len(layer), grad=True)}

    def loss_value(self, E, y_q, layers, d, K, recurrent, causal, clip):
        out = self.forward(E, layers, K, recurrent, causal, clip)
        pred = (1 if self.mistake == "readout-sign-flipped" else -1) * out[:, -1, d:]
        err = pred - y_q
        L = 0.5 * np.mean(np.sum(err * err, axis=1))
        return pred, L / y_q.shape[1] if self.mistake == "loss-mean-over-d_y" else L

    def loss(self, E, y_q, layer, d, K, recurrent, causal, clip):
        flat, keys = _flat(layer)
        g = numerical_gradient(lambda a: self.loss_value(a[0], y_q, _rebuild(a[1:], keys, len(layer)), d, K,
                                                         recurrent, causal, clip)[1], [E, *flat])
        pred, L = (np.real(x) for x in self.loss_value(E, y_q, layer, d, K, recurrent, causal, clip))
        return {"pred": pred, "L": L, "dE": g[0], "layer": _rebuild(g[1:], keys, len(layer), grad=True)}

    def _readout(self, res, X):
        if self.mistake == "readout-sign-flipped":
            res["pred"] = res["out"][:, -1, X.shape[2]:]
        return res

    def gd(self, **kw):
        return self._readout(numpy_adapter.gd(**kw), kw["X"])

    def gdpp(self, **kw):
        return self._readout(numpy_adapter.gdpp(**kw), kw["X"])

    def adam_step(self, params, grads, m, v, t, lr, b1, b2, eps, clip_norm):
        norm = math.sqrt(sum(float(np.sum(g * g)) for p in grads for g in p.values()))
        scale = min(1.0, clip_norm / norm)
        t += 1
        c1, c2 = (1.0, 1.0) if self.mistake == "adam-without-bias-correction" else (1 - b1 ** t, 1 - b2 ** t)
        new, new_m, new_v = [], [], []
        for p, g, m_, v_ in zip(params, grads, m, v):
            new_m.append({n: b1 * m_[n] + (1 - b1) * scale * g[n] for n in p})
            new_v.append({n: b2 * v_[n] + (1 - b2) * (scale * g[n]) ** 2 for n in p})
            new.append({n: p[n] - lr * (new_m[-1][n] / c1) / (np.sqrt(new_v[-1][n] / c2) + eps) for n in p})
        return new, new_m, new_v, t, norm

    def adam(self, layer, m, v, t, lr, b1, b2, eps, clip_norm):
        params = [{n: p[n] for n in p if "d" + n in p} for p in layer]
        grads = [{n: p["d" + n] for n in q} for p, q in zip(layer, params)]
        new, nm, nv, t, norm = self.adam_step(params, grads, m["layer"], v["layer"], t, lr, b1, b2, eps, clip_norm)
        return {"new": {"layer": new}, "new_m": {"layer": nm}, "new_v": {"layer": nv}, "new_t": t, "grad_norm": norm}

    def train(self, layer, seed, n_steps, d, N, d_y, B, x_range, w_scale, noise_std, n_distractors, K, recurrent,
              causal, clip, lr, b1, b2, eps, clip_norm):
        spec = R.TaskSpec(d, N, d_y, B, tuple(x_range), w_scale, noise_std, n_distractors)
        params = [dict(p) for p in layer]
        m = [{n: np.zeros_like(a) for n, a in p.items()} for p in params]
        v = [{n: np.zeros_like(a) for n, a in p.items()} for p in params]
        t, first = 0, 1 if self.mistake == "steps-numbered-from-1" else 0
        steps, losses, norms = [], [], []
        for s in range(n_steps):
            tk = spec.sample(R.step_rng(seed, s + first))
            steps.append({"X": tk.X, "Y": tk.Y, "x_q": tk.x_q, "y_q": tk.y_q})
            E = np.concatenate([np.concatenate([tk.X, tk.Y], 2),
                                np.concatenate([tk.x_q, np.zeros((B, d_y))], 1)[:, None]], 1)
            flat, keys = _flat(params)
            grads = _rebuild(numerical_gradient(lambda a: self.loss_value(
                E, tk.y_q, _rebuild(a, keys, len(params)), d, K, recurrent, causal, clip)[1], flat), keys, len(params))
            losses.append(np.real(self.loss_value(E, tk.y_q, params, d, K, recurrent, causal, clip)[1]))
            params, m, v, t, norm = self.adam_step(params, grads, m, v, t, lr, b1, b2, eps, clip_norm)
            norms.append(norm)
        return {"losses": losses, "grad_norms": norms, "step": steps, "final": {"layer": params}}


def planted(mistake, kinds=PORT_KINDS):
    """A copy of the NumPy adapter whose functions of ``kinds`` are the MiniPort's with ``mistake``."""
    mod = types.ModuleType(f"planted_{mistake}")
    mod.__dict__.update({k: v for k, v in vars(numpy_adapter).items() if not k.startswith("__")})
    port = MiniPort(mistake)
    for kind in kinds:
        setattr(mod, kind, getattr(port, kind))
    mod.NAME = f"the NumPy adapter with {mistake}"
    return mod


# the kinds whose cases show each mistake (the others cannot tell it apart)
PLANTED = {
    "loss-mean-over-d_y": ("loss",),
    "causal-mask-without-diagonal": ("layer", "stack", "loss"),
    "query-used-as-key": ("layer", "stack", "loss", "train"),
    "attention-divided-by-N": ("layer", "stack", "loss", "train"),
    "straight-through-clip-gradient": ("layer", "stack", "loss"),
    "clip-gradient-halved-at-the-level": ("layer",),
    "adam-without-bias-correction": ("adam", "train"),
    "steps-numbered-from-1": ("train",),
    "readout-sign-flipped": ("loss", "gd", "gdpp", "train"),
    "W_KQ-transposed": ("layer", "stack", "loss", "train"),
    "upstream-gradient-ones": ("layer", "stack"),
}


def test_every_known_mistake_is_planted_here():
    assert set(PLANTED) == {m.name for m in C.MISTAKES}


# ---- the clean adapters pass ---------------------------------------------------------------

def test_numpy_adapter_passes_every_case():
    missing = [k for k in VECTORS.kinds if not callable(getattr(numpy_adapter, C.function_name(k), None))]
    assert not missing, (f"kinds {missing} have vectors but no function in verify/adapters/numpy_adapter.py; "
                         "add one per kind (SPEC.md section 14), as `icgd conformance --protocol` prints it")
    rc, out, err = icgd("verify.adapters.numpy_adapter")
    assert rc == 0, out + err
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "NOT IMPLEMENTED"))]
    assert len(lines) == N_CASES and all(line.startswith("PASS") for line in lines), out
    assert f"OK: {N_CASES} passed, 0 failed, 0 not implemented of {N_CASES} cases" in out
    assert "rtol 1e-12, atol 1e-14 (the manifest's)" in out


def test_independent_port_without_a_mistake_passes_what_it_implements():
    rep = run_kit(planted(None), kinds=PORT_KINDS)
    assert rep.ok() and rep.count(C.PASSED) == len(rep.cases) > 0, C.summary_line(rep)


def test_variants_without_a_mistake_reproduce_the_vectors():
    """The diagnoses' computations with every switch off are the vectors (a mistake is
    named against the reference, not against a second implementation that may differ)."""
    tol = VECTORS.tolerance()
    n = 0
    for entry in VECTORS.entries:
        if entry["kind"] not in C.diagnosable_kinds():
            continue
        inputs, expected = golden.load_case(VECTORS.directory, entry)
        got = C.compute_variant(entry["kind"], inputs, C.Variant())
        assert set(got) == set(expected), entry["name"]
        bad = [k for k in expected if not C.compare(k, got[k], expected[k], tol).ok]
        assert not bad, (entry["name"], bad)
        n += 1
    assert n > 0


# ---- each planted mistake is named ------------------------------------------------------

@pytest.mark.parametrize("mistake", sorted(PLANTED))
def test_planted_mistake_is_named_on_every_case_it_fails(mistake):
    rep = run_kit(planted(mistake), kinds=PLANTED[mistake])
    failed = [c for c in rep.cases if c.status == C.FAILED]
    assert failed, f"{mistake} planted, yet every case passed: {C.summary_line(rep)}"
    assert {c.kind for c in failed} == set(PLANTED[mistake])
    for c in failed:
        assert [d.name for d in c.diagnoses if d.full] == [mistake], (c.name, c.message, c.diagnoses)
    lines = [line for c in failed for line in C.verdict_lines(c, rep.tol)]
    assert any(line.startswith(f"    diagnosis: {mistake}: ") for line in lines)
    assert not rep.ok()


def test_a_mistake_in_the_forward_only_is_named_as_partly_explaining():
    """A hand-written port whose forward drops the diagonal but whose backward is right:
    the mistake reproduces ``out``, not the gradients, and is said so."""
    mod = planted(None)
    wrong = MiniPort("causal-mask-without-diagonal")
    mod.layer = lambda **kw: {**numpy_adapter.layer(**kw), "out": wrong.layer(**kw)["out"]}
    rep = run_kit(mod, cases=["layer-H1-causal-noclip-factored"])
    (c,) = rep.cases
    assert c.status == C.FAILED and [o.key for o in c.off()] == ["out"]
    assert [(d.name, d.full, d.keys) for d in c.diagnoses] == [("causal-mask-without-diagonal", False, ("out",))]
    assert any("partly explained by causal-mask-without-diagonal (reproduces out)" in line
               for line in C.verdict_lines(c, rep.tol))


def test_a_wrong_gradient_names_the_parameter_and_no_known_mistake():
    mod = planted(None)

    def layer(**kw):
        res = numpy_adapter.layer(**kw)
        return {**res, "dW_K": res["dW_K"] * 1.001} if "dW_K" in res else res

    mod.layer = layer
    rep = run_kit(mod, cases=["layer-H1-ctx-noclip-factored"])
    (c,) = rep.cases
    assert c.status == C.FAILED and [o.key for o in c.off()] == ["dW_K"] and not c.diagnoses
    lines = C.verdict_lines(c, rep.tol)
    assert lines[1].startswith("    off    dW_K[") and "agree  out, dE, dW_Q, dW_V, dP" in lines[2]
    assert "none of the" in lines[3] and "known mistakes reproduces" in lines[3]


# ---- not implemented is never passed; bad adapters fail their cases ----------------------

def test_adapter_implementing_nothing_reports_not_implemented_and_exits_1(tmp_path):
    path = write_adapter(tmp_path, '"""An adapter with no kinds yet."""\nNAME = "empty"\n')
    rc, out, err = icgd(path, "--json", str(tmp_path / "r.json"), "--junit-xml", str(tmp_path / "r.xml"))
    assert rc == 1, out + err
    assert "PASS" not in out and out.count("NOT IMPLEMENTED ") == N_CASES
    assert "the adapter has no function layer()" in out
    assert f"NOTHING CHECKED: 0 passed, 0 failed, {N_CASES} not implemented" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert not rep["ok"] and {c["status"] for c in rep["cases"]} == {"not implemented"}
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("skipped") == str(N_CASES) and suite.get("failures") == "0"
    assert all(tc.find("skipped") is not None for tc in suite.iter("testcase"))


def test_raising_adapter_fails_each_case_with_the_exception_and_where(tmp_path):
    path = write_adapter(tmp_path, """
        def layer(E, dout, causal, clip, **params):
            if causal:
                raise NotImplementedError("causal mode is not ported yet")
            raise ValueError("boom")

        def adam(**kw):
            raise SystemExit(3)

        def eta(**kw):
            return [1.0]
    """)
    rc, out, err = icgd(path, "--kinds", "layer,adam,eta")
    assert rc == 1 and "Traceback" not in out + err, out + err
    verdicts = out.splitlines()
    assert any(v.startswith("FAIL") and "layer-H1-ctx-noclip-factored" in v
               and "ValueError: boom (at my_adapter.py:5 in layer)" in v for v in verdicts), out
    assert any(v.startswith("NOT IMPLEMENTED") and "causal mode is not ported yet" in v for v in verdicts)
    assert any(v.startswith("FAIL") and "adam-noclip-H2-merged" in v and "SystemExit: 3" in v for v in verdicts)
    assert any(v.startswith("FAIL") and "eta-paper-defaults" in v and "returned list, not a dict" in v for v in verdicts)


@pytest.mark.parametrize("source, says", [
    (None, "no such file"),
    ("raise RuntimeError('my port needs a GPU')", "importing it failed: RuntimeError: my port needs a GPU"),
    ("import a_module_that_is_not_there", "No module named 'a_module_that_is_not_there'"),
    ("def layer(:\n", "importing it failed: SyntaxError"),
])
def test_an_adapter_that_cannot_be_loaded_is_a_usage_error(tmp_path, source, says):
    path = str(tmp_path / "missing.py") if source is None else write_adapter(tmp_path, source)
    rc, out, err = icgd(path)
    assert rc == 2 and says in err and "Traceback" not in err and not out, (out, err)


def test_usage_errors_before_any_case_runs(tmp_path):
    for argv, says in [(("no.such.module.anywhere",), "no module named no"),
                       ((), "ADAPTER: missing"),
                       (("verify.adapters.numpy_adapter", "--kinds", "layer,softmax"), "--kinds: softmax not a kind"),
                       (("verify.adapters.numpy_adapter", "--cases", "nothing-*"), "--cases: 'nothing-*' matches no case"),
                       (("verify.adapters.numpy_adapter", "--json", str(tmp_path)), "--json"),
                       (("verify.adapters.numpy_adapter", "--vectors", str(tmp_path)), "manifest.json not found")]:
        rc, out, err = icgd(*argv)
        assert rc == 2 and says in err and "PASS" not in out, (argv, out, err)
    rc, out, err = icgd("verify.adapters.numpy_adapter", "--rtol", "-1")
    assert rc == 2 and "--rtol" in err


# ---- selection, tolerance overrides, reports ----------------------------------------------

def test_kinds_and_cases_select(tmp_path):
    rc, out, _ = icgd("verify.adapters.numpy_adapter", "--kinds", "adam", "--cases", "layer-H1-*,adam-*")
    names = [line.split()[1] for line in out.splitlines() if line.startswith("PASS")]
    assert rc == 0 and names and all(n.startswith("adam-") for n in names)


def test_float32_port_is_noted_and_a_loosened_tolerance_is_reported():
    mod = planted(None)
    mod.layer = lambda **kw: {k: np.asarray(v, dtype=np.float32) for k, v in numpy_adapter.layer(**kw).items()}
    rep = run_kit(mod, kinds=["layer"])
    assert rep.count(C.FAILED) == len(rep.cases)
    assert all(n.startswith("float32-outputs: ") and "jax_enable_x64" in n for c in rep.cases for n in c.notes)
    loose = VECTORS.tolerance(rtol=1e-5, atol=1e-6)
    rep = run_kit(mod, kinds=["layer"], tol=loose)
    assert rep.ok() and loose.overridden
    assert all(C.verdict_lines(c, rep.tol)[0].endswith("[tolerance overridden]") for c in rep.cases)
    summary = C.summary_line(rep)
    assert "rtol 1e-05, atol 1e-06 (OVERRIDDEN on the command line; the manifest's: rtol 1e-12, atol 1e-14)" in summary
    report = json.loads(C.to_json(rep))
    assert report["tolerance"]["overridden"] and report["tolerance"]["rtol"] == 1e-5


def test_json_and_junit_reports_of_a_failing_run(tmp_path):
    path = write_adapter(tmp_path, """
        from verify.adapters.numpy_adapter import loss as _loss

        def loss(**kw):
            res = _loss(**kw)
            return {**res, "L": res["L"] / kw["y_q"].shape[1]}
    """)
    rc, out, err = icgd(path, "--kinds", "loss", "--json", str(tmp_path / "r.json"), "--junit-xml", str(tmp_path / "r.xml"))
    assert rc == 1, out + err
    rep = json.loads((tmp_path / "r.json").read_text())
    by_status = {c["name"]: c for c in rep["cases"]}
    assert rep["n_failed"] == 2 and rep["n_passed"] == 1                  # d_y = 1 in one case: no difference
    bad = [c for c in by_status.values() if c["status"] == "failed"]
    assert all(c["off"] == ["L"] for c in bad)
    # only L divided: the kit says which mistake reproduces L and that it does not explain the gradients it would change
    assert all(d["name"] == "loss-mean-over-d_y" and not d["full"] and d["reproduces"] == ["L"]
               for c in bad for d in c["diagnoses"])
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("failures") == "2" and suite.get("tests") == "3"
    failures = [tc.find("failure") for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert len(failures) == 2 and all("off    L" in f.text for f in failures)


def test_protocol_lists_every_kind_with_its_function():
    rc, out, err = icgd("--protocol")
    assert rc == 0, err
    for kind in VECTORS.kinds:
        assert f"\n  {C.function_name(kind)}(" in out
    assert "adam(layer, m, v, t, lr, b1, b2, eps, clip_norm)" in out
    assert "    m: {layer: [{<param>}, ...]}" in out


# ---- the protocol's nesting -------------------------------------------------------------------

def test_nesting_of_stored_keys_and_flattening_of_outputs():
    kinds = VECTORS.kinds
    a = {"layer0.W_Q": 1, "layer0.dW_Q": 2, "layer1.P": 3, "m.layer1.P": 4, "v.layer0.W_Q": 5, "t": np.asarray(4)}
    args = C.nest({k: np.asarray(v) for k, v in a.items()}, kinds["adam"])
    assert args["layer"][1]["P"] == 3 and args["layer"][0]["dW_Q"] == 2 and args["m"]["layer"][1]["P"] == 4
    assert args["t"] == 4 and type(args["t"]) is int
    assert C.key_path("W_0", kinds["gd"]["data"]) == [("W_0", None)]          # W_0 is no list entry
    assert C.key_path("step3.x_q", kinds["train"]["outputs"]) == [("step", 3), ("x_q", None)]
    for entry in VECTORS.entries:                                               # every case round-trips
        _, expected = golden.load_case(VECTORS.directory, entry)
        nested = C.nest_outputs(expected, kinds[entry["kind"]])
        assert C.flatten(nested, set(expected)).keys() == expected.keys(), entry["name"]
    assert C.flatten({"losses": [0.1, 0.2], "step": [{"X": 1}]}, {"losses", "step0.X"}) == {"losses": [0.1, 0.2],
                                                                                        "step0.X": 1}


def test_a_new_kind_needs_no_kit_code(tmp_path):
    """A vectors folder with a kind the kit has never seen: its function, named after the
    kind, gets the inputs nested by the kind's patterns and is compared; no diagnoses."""
    inputs = {"x": np.arange(6.0).reshape(2, 3), "block0.W": np.eye(3), "block1.W": 2 * np.eye(3),
              "scale": np.asarray(0.5)}
    outputs = {"y": 0.5 * inputs["x"] @ inputs["block0.W"] @ inputs["block1.W"]}
    data = golden.npz_bytes({**inputs, **outputs})
    (tmp_path / "double-1.npz").write_bytes(data)
    describe = {k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name} for k, v in {**inputs, **outputs}.items()}
    manifest = {"format_version": golden.FORMAT_VERSION, "tolerance": {"rtol": 1e-12, "atol": 1e-14, "rule": "per array"},
                "placeholders": {"<k>": "a block index"},
                "kinds": {"two-blocks": {"computes": "y = scale x W_0 W_1", "data": ["x", "block<k>.W"],
                                         "config": {"scale": "float64 ()"}, "outputs": ["y"]}},
                "cases": [{"name": "double-1", "kind": "two-blocks", "file": "double-1.npz",
                           "sha256": hashlib.sha256(data).hexdigest(),
                           "inputs": {k: describe[k] for k in inputs}, "outputs": {"y": describe["y"]}}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    path = write_adapter(tmp_path, """
        def two_blocks(x, block, scale):
            return {"y": scale * x @ block[0]["W"] @ block[1]["W"]}
    """, name="new_kind_adapter.py")
    rc, out, err = icgd(path, "--vectors", str(tmp_path))
    assert rc == 0 and "PASS             double-1" in out and "OK: 1 passed" in out, out + err
    rc, out, _ = icgd(write_adapter(tmp_path, "def two_blocks(x, block, scale):\n    return {'y': 2 * x}\n", "bad.py"),
                      "--vectors", str(tmp_path))
    assert rc == 1 and "FAIL             double-1" in out and "diagnosis" not in out


# ---- the JAX and PyTorch example adapters ------------------------------------------------

@pytest.mark.parametrize("library, adapter", [("jax", "verify.adapters.jax_adapter"),
                                              ("torch", "verify.adapters.torch_adapter")])
def test_framework_adapter_passes_every_case(library, adapter, tmp_path):
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed (an optional example, not a dependency of icgd)")
    r = subprocess.run([sys.executable, "-m", "verify.conformance", adapter, "--junit-xml", str(tmp_path / "r.xml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "PASS" in r.stdout and "FAIL" not in r.stdout and ", 0 failed, " in r.stdout   # kinds added later: not implemented
