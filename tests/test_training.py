"""Tests of the training path (reference/training.py, reference/analysis.py,
verify/train_cli.py): resume, divergence, configuration and checkpoint errors, the
GD++ gradient, the alignment metrics, and the run directory of the CLI.

Every run here is tiny (d=3, N=5, a few dozen steps) so the file stays fast."""

import json
import os

import numpy as np
import pytest

import reference as R
from reference import analysis as A
from reference import training as T
from reference.gradcheck import CENTRAL_H
from reference.tolerances import assert_close, tolerance

TINY = dict(d=3, N=5, batch=64, steps=40, eval_every=10, checkpoint_every=20, eval_tasks=200,
            line_search_tasks=200, gdpp_steps=5, gdpp_batch=32, ood_tasks=20, rollout_steps=3, backend="numpy")


def tiny(**kw):
    return T.TrainConfig(**{**TINY, **kw})


def _eval_rows(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r.get("kind") == "eval"]


def _same_params(a, b):
    return all(np.array_equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


# ---- resume -----------------------------------------------------------------------

class Interrupt(Exception):
    pass


def _numba_or_skip():
    try:
        T.check_backend_available("numba")
    except T.ConfigError as exc:
        pytest.skip(str(exc))
    return "numba"


@pytest.mark.parametrize("kw", [dict(), dict(n_layers=2, recurrent=True, dtype="float64"), "numba"])
def test_resume_equals_uninterrupted(tmp_path, kw):
    if kw == "numba":
        kw = dict(backend=_numba_or_skip(), n_layers=3, token_clip=1.0, grad_clip=10.0)
    cfg = tiny(**kw)
    full = T.train(cfg, str(tmp_path / "full"), progress=False, analyses=False)

    def stop_at_25(step, res):
        if step == 25:
            raise Interrupt
        return res

    run = str(tmp_path / "cut")
    with pytest.raises(Interrupt):
        T.train(cfg, run, progress=False, analyses=False, _fault=stop_at_25)
    assert T.load_checkpoint(os.path.join(run, "checkpoint.npz")).step == 20
    resumed = T.train(cfg, run, resume=True, progress=False, analyses=False)
    assert _same_params(full.params, resumed.params), "resumed params differ from the uninterrupted run"
    assert _eval_rows(T.read_metrics(os.path.join(run, "metrics.jsonl"))) == _eval_rows(full.history)


def test_resume_may_extend_steps(tmp_path):
    run = str(tmp_path / "r")
    T.train(tiny(steps=20), run, progress=False, analyses=False)
    longer = T.train(tiny(steps=40), run, resume=True, progress=False, analyses=False)
    full = T.train(tiny(steps=40), None, progress=False, analyses=False)
    assert _same_params(full.params, longer.params)


def test_existing_run_not_overwritten_without_flag(tmp_path):
    run = str(tmp_path / "r")
    T.train(tiny(steps=10), run, progress=False, analyses=False)
    with pytest.raises(T.ConfigError, match="already holds a run"):
        T.train(tiny(steps=10), run, progress=False, analyses=False)


# ---- divergence -------------------------------------------------------------------

def test_divergence_with_huge_lr_names_step_and_keeps_checkpoint(tmp_path):
    run = str(tmp_path / "div")
    cfg = tiny(lr=1e3, grad_clip=None, init_scale=50.0, steps=200, checkpoint_every=10, eval_every=10)
    with pytest.raises(T.TrainingDiverged) as ei:
        T.train(cfg, run, progress=False, analyses=False)
    msg = str(ei.value)
    assert f"step {ei.value.step} of 200" in msg and "last good checkpoint" in msg
    ck = T.load_checkpoint(os.path.join(run, "checkpoint.npz"))
    assert ck.step == ei.value.checkpoint_step < ei.value.step
    assert T.params_finite(ck.params)


def test_injected_nan_stops_at_that_step(tmp_path):
    run = str(tmp_path / "nan")

    def nan_at_15(step, res):
        if step == 14:   # the 15th update
            bad = tuple(type(layer)(*(a * np.nan for a in layer)) for layer in res.params)
            return res._replace(params=bad)
        return res

    cfg = tiny(steps=40, checkpoint_every=10, eval_every=10)
    with pytest.raises(T.TrainingDiverged, match=r"step 15 of 40.*non-finite parameters.*step 10"):
        T.train(cfg, run, progress=False, analyses=False, _fault=nan_at_15)
    assert T.load_checkpoint(os.path.join(run, "checkpoint.npz")).step == 10


# ---- configuration ----------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (dict(lr=-1.0), "lr: must be > 0"),
    (dict(steps=0), "steps: must be >= 1"),
    (dict(steps=2.5), "steps: expected int"),
    (dict(dtype="float16"), "dtype"),
    (dict(b2=1.0), r"b2: must be in \[0, 1\)"),
    (dict(x_low=1.0, x_high=0.0), "x_low < x_high"),
    (dict(checkpoint_every=15, eval_every=10), "multiple of eval_every"),
    (dict(backend="tpu"), "backend"),
    (dict(recurrent="yes"), "recurrent: expected bool"),
    (dict(grad_clip=0.0), "grad_clip: must be > 0 or None"),
])
def test_bad_config_values_rejected(bad, match):
    with pytest.raises(T.ConfigError, match=match):
        tiny(**bad)


def test_overrides_typed_and_unknown_keys_rejected():
    base = T.EXPERIMENTS["one_layer"].config
    c = T.apply_overrides(base, {"steps": "2_000", "lr": "5e-4", "recurrent": "true", "grad_clip": "none",
                                 "token_clip": "10"})
    assert (c.steps, c.lr, c.recurrent, c.grad_clip, c.token_clip) == (2000, 5e-4, True, None, 10.0)
    with pytest.raises(T.ConfigError, match="unknown config field 'step'.*did you mean steps"):
        T.apply_overrides(base, {"step": "10"})
    with pytest.raises(T.ConfigError, match="steps: cannot read 'abc' as int"):
        T.apply_overrides(base, {"steps": "abc"})
    with pytest.raises(T.ConfigError, match="unknown experiment"):
        T.get_experiment("one-layer-please")


def test_missing_backend_is_a_clear_error_before_work(tmp_path, monkeypatch):
    from reference import backends

    monkeypatch.setitem(backends.BACKENDS, "ghost", "reference.backends.ghost_backend_does_not_exist")
    cfg = tiny(backend="ghost")
    with pytest.raises(T.ConfigError, match="backend 'ghost' is not available"):
        T.train(cfg, str(tmp_path / "g"), progress=False)
    assert not (tmp_path / "g").exists()


def test_experiments_are_valid_and_documented():
    for name, e in T.EXPERIMENTS.items():
        assert e.config.experiment == name and len(e.description) > 20
    c = T.EXPERIMENTS["layers5"].config
    assert (c.n_layers, c.recurrent, c.lr, c.grad_clip, c.token_clip, c.steps) == (5, False, 5e-4, 10.0, 10.0, 50_000)
    c = T.EXPERIMENTS["one_layer"].config
    assert (c.b2, c.grad_clip, c.batch, c.eval_tasks, c.eval_every) == (0.98, 0.001, 2048, 10_000, 100)


# ---- checkpoints ------------------------------------------------------------------

def test_mismatched_or_corrupt_checkpoint_refused(tmp_path):
    run = str(tmp_path / "r")
    T.train(tiny(steps=20), run, progress=False, analyses=False)
    path = os.path.join(run, "checkpoint.npz")
    with pytest.raises(T.CheckpointError, match="different configuration: lr"):
        T.train(tiny(steps=40, lr=5e-4), run, resume=True, progress=False)
    with pytest.raises(T.CheckpointError, match="beyond steps"):
        T.train(tiny(steps=10), run, resume=True, progress=False)
    # another format version
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["format_version"] = np.array(T.FORMAT_VERSION + 1)
    np.savez(os.path.join(run, "v.npz"), **arrays)
    with pytest.raises(T.CheckpointError, match="format version"):
        T.load_checkpoint(os.path.join(run, "v.npz"))
    # a missing array
    del arrays["adam.t"]
    arrays["format_version"] = np.array(T.FORMAT_VERSION)
    np.savez(os.path.join(run, "m.npz"), **arrays)
    with pytest.raises(T.CheckpointError, match="unreadable"):
        T.load_checkpoint(os.path.join(run, "m.npz"))
    # garbage bytes and a truncated file
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(T.CheckpointError, match="unreadable"):
        T.train(tiny(steps=40), run, resume=True, progress=False)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(T.CheckpointError, match="unreadable"):
        T.load_checkpoint(path)


# ---- GD++ gradient ----------------------------------------------------------------

@pytest.mark.parametrize("recurrent, K", [(True, 2), (False, 3), (True, 1)])
def test_gdpp_gradient_matches_central_differences(recurrent, K):
    rng = np.random.default_rng(7)
    t = R.sample_tasks(rng, 16, 3, 6)
    n = 1 if recurrent else K
    eta = rng.uniform(0.5, 2.0, n)
    gamma = rng.uniform(0.0, 0.3, n)

    def f(e, g):
        ee, gg = (list(e) * K, list(g) * K) if recurrent else (list(e), list(g))
        return T.gdpp_loss_and_grads(t, ee, gg, recurrent)[0]

    ee, gg = (list(eta) * K, list(gamma) * K) if recurrent else (list(eta), list(gamma))
    _, de, dg = T.gdpp_loss_and_grads(t, ee, gg, recurrent)
    h = CENTRAL_H
    num_e = np.array([(f(eta + h * np.eye(n)[i], gamma) - f(eta - h * np.eye(n)[i], gamma)) / (2 * h) for i in range(n)])
    num_g = np.array([(f(eta, gamma + h * np.eye(n)[i]) - f(eta, gamma - h * np.eye(n)[i])) / (2 * h) for i in range(n)])
    assert_close(de, num_e, "central_diff", what="dL/deta")
    assert_close(dg, num_g, "central_diff", what="dL/dgamma")
    if K == 1:
        assert np.all(np.abs(dg) < 1e-12), "gamma cannot change a one-layer readout"


def test_gdpp_gradient_same_on_the_backends():
    backend = _numba_or_skip()
    from reference.backends import get_backend

    t = R.sample_tasks(np.random.default_rng(8), 32, 3, 6)
    ref = T.gdpp_loss_and_grads(t, [1.2, 0.8], [0.1, 0.2], False)
    fast = T.gdpp_loss_and_grads(t, [1.2, 0.8], [0.1, 0.2], False, get_backend(backend).loss_and_grads)
    for a, b in zip(ref[1:], fast[1:]):
        assert_close(b, a, "algebra")


def test_gdpp_meta_training_lowers_the_loss_below_gd():
    cfg = tiny(n_layers=2, recurrent=True, gdpp_steps=150, gdpp_batch=256, d=4, N=8, line_search_tasks=2000)
    ev = cfg.task_spec(2000).sample(np.random.default_rng(3))
    base = T.compute_baselines(cfg, ev)
    assert base["gdpp_loss"] < base["gd_loss"]
    assert base["gdpp_gammas"][0] > 0


# ---- alignment metrics -------------------------------------------------------------

def test_alignment_of_gd_construction_is_exact_and_perturbation_detected():
    rng = np.random.default_rng(1)
    d, N, eta, K = 4, 7, 1.3, 3
    t = R.sample_tasks(rng, 50, d, N)
    params, arch = R.gd_stack(K, d, 1, N, eta, recurrent=True)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    pred, g = A.sensitivity(E, params, arch, d)
    pred_gd, W = A.gd_reference(t, eta, K)
    m = A.alignment(pred, g, pred_gd, W)
    tol = tolerance(np.float64, "construction")
    # cos of g with itself is |g|^2 / (|g| + 1e-8)^2 = 1 - O(1e-8 / |g|) by the metric's guard
    self_cos = A.alignment(pred_gd, W, pred_gd, W)["model_cos"]
    assert abs(m["model_cos"] - self_cos) <= tol.rtol and abs(self_cos - 1.0) < 1e-6
    assert m["model_diff"] <= tol.rtol * np.abs(W).max() and m["preds_diff"] <= tol.rtol * np.abs(pred_gd).max()
    assert_close(g, W, "construction", what="sensitivity of the GD construction vs GD's weight")
    # a perturbed model is detected by all three metrics
    p = params[0]
    bad = (p._replace(W_Q=p.W_Q + 0.05 * rng.standard_normal(p.W_Q.shape)),)
    pred_b, g_b = A.sensitivity(E, bad, arch, d)
    mb = A.alignment(pred_b, g_b, pred_gd, W)
    assert mb["model_cos"] < 0.999 and mb["model_diff"] > 1e-3 and mb["preds_diff"] > 1e-3


def test_sensitivity_matches_finite_differences_of_the_prediction():
    rng = np.random.default_rng(2)
    d, N = 3, 5
    t = R.sample_tasks(rng, 4, d, N, d_y=2)
    params = tuple(R.init_lsa_params(rng, d + 2, H=2, scale=5.0, dtype=np.float64) for _ in range(2))
    arch = R.lsa_stack(2)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    _, g = A.sensitivity(E, params, arch, d)
    h = CENTRAL_H
    num = np.zeros_like(g)
    for i in range(d):
        Ep, Em = E.copy(), E.copy()
        Ep[:, -1, i] += h
        Em[:, -1, i] -= h
        num[:, :, i] = (R.predict(Ep, params, arch, d) - R.predict(Em, params, arch, d)) / (2 * h)
    assert_close(g, num, "central_diff", what="sensitivity vs finite differences")


def test_construction_match_removes_scale_and_interpolation_of_construction_is_itself():
    d, N, eta = 4, 6, 2.0
    c = R.gd_layer(d, 1, N, eta)
    beta = -0.37
    scaled = c._replace(W_Q=c.W_Q * beta, P=c.P / beta)
    m = A.construction_match(scaled, c, d)
    assert abs(m["beta"] - beta) < 1e-12 and m["rel_err"] < 1e-12
    mi = A.interpolate(scaled, c, d)
    mc = R.to_merged(c)
    assert_close(mi.W_KQ, mc.W_KQ, "algebra") and assert_close(mi.W_PV, mc.W_PV, "algebra")


def test_readout_map_is_what_the_prediction_reads_and_sees_through_head_splits():
    rng = np.random.default_rng(11)
    d, N, H = 4, 6, 2
    D = d + 1
    layer = R.init_lsa_params(rng, D, H=H, scale=1.0, dtype=np.float64)
    KQ, PV = A.layer_products(layer)
    T = A.readout_map(KQ, PV, d)
    tasks = R.sample_tasks(rng, 7, d, N, 1, dtype=np.float64)
    E = R.build_tokens(tasks.X, tasks.Y, tasks.x_q)
    out, _ = R.model_forward(E, (layer,), R.lsa_stack(1))
    C = np.einsum("nia,nic->nac", E[:, :N], E[:, :N])
    pred = -np.einsum("abj,nab,nj->n", T, C, tasks.x_q)[:, None]
    assert_close(pred, R.readout(out, d), "algebra")
    # a GD construction split over two heads by a term that cancels in the sum
    c = R.gd_layer(d, 1, N, 1.5)
    cKQ, cPV = (a[0] for a in A.layer_products(c))
    G = rng.standard_normal((D, D))
    beta = -0.6
    split = (np.stack([(cKQ + G) * beta, cKQ - G]), np.stack([cPV / 2 / beta, cPV / 2]))
    m = A.readout_map_match(*split, c, d)
    assert m["rel_err"] < 1e-12 and min(m["per_head_rel_err"]) > 0.1
    bad = (split[0], np.stack([cPV / 2 / beta, cPV / 3]))        # the heads no longer add up to GD
    assert A.readout_map_match(*bad, c, d)["rel_err"] > 0.1
    with pytest.raises(ValueError, match="W_KQ and W_PV"):
        A.readout_map(KQ, PV[:, :, :3], d)


def test_rollout_of_the_gd_layer_is_damped_gd():
    rng = np.random.default_rng(4)
    d, N, eta = 3, 8, 1.5
    t = R.sample_tasks(rng, 30, d, N)
    a = A.rollout_losses(R.gd_layer(d, 1, N, eta), t, 10, 0.75)
    b = A.damped_gd_losses(t, eta, 10, 0.75)
    assert_close(a, b, "construction", what="roll-out of the GD layer vs damped GD")


# ---- the CLI ----------------------------------------------------------------------

def _cli(argv):
    from verify import cli

    return cli.main(["train", *argv])


def test_cli_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k != "steps"]
    rc = _cli(["one_layer", "--steps", "20", *sets, "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "effective config (one_layer" in text and "* steps" in text and "final eval loss" in text
    for f in ("config.json", "metrics.jsonl", "checkpoint.npz", "summary.json"):
        assert (out / f).is_file(), f
    for f in ("loss.png", "alignment.png", "ood.png", "weights.png", "rollout.png"):
        assert (out / "plots" / f).stat().st_size > 1000, f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["steps"] == 20 and cfg["experiment"] == "one_layer"
    rows = T.read_metrics(str(out / "metrics.jsonl"))
    assert rows[0]["kind"] == "baselines" and [r["step"] for r in rows[1:]] == [0, 10, 20]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["ood"]) == {"input", "teacher"} and len(summary["ood"]["input"]["alpha"]) == len(A.INPUT_SCALES) == 51


def test_cli_bad_config_fails_before_work(tmp_path, capsys):
    out = tmp_path / "never"
    assert _cli(["one_layer", "--set", "stepz=10", "--out", str(out)]) == 2
    assert "unknown config field 'stepz'" in capsys.readouterr().err
    assert _cli(["one_layer", "--lr", "-3", "--out", str(out)]) == 2
    assert "lr: must be > 0" in capsys.readouterr().err
    assert _cli(["one_layer", "--steps", "5", "--set", "steps=6", "--out", str(out)]) == 2
    assert _cli(["no_such_experiment", "--out", str(out)]) == 2
    assert not out.exists()
    assert _cli(["--list"]) == 0 and "recurrent2" in capsys.readouterr().out


def test_cli_resume_reuses_the_run_config(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k != "steps"]
    assert _cli(["recurrent2", "--steps", "20", *sets, "--out", str(out), "--quiet", "--no-plots"]) == 0
    assert _cli(["--out", str(out), "--resume", "--steps", "40", "--quiet", "--no-plots"]) == 0
    rows = T.read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows if r.get("kind") == "eval"] == [0, 10, 20, 30, 40]
    full = T.train(T.apply_overrides(T.EXPERIMENTS["recurrent2"].config, {**TINY, "steps": 40}), None,
                   progress=False, analyses=False)
    assert _same_params(full.params, T.load_checkpoint(str(out / "checkpoint.npz")).params)
    capsys.readouterr()
    assert _cli(["--out", str(out), "--resume", "--lr", "0.5", "--quiet", "--no-plots"]) == 4
    assert "different configuration: lr" in capsys.readouterr().err
    assert _cli(["one_layer", "--out", str(out), "--resume", "--quiet"]) == 2


def test_interpolation_skipped_when_the_clip_cannot_represent_the_construction():
    cfg = tiny(n_layers=2, recurrent=False, token_clip=0.5, dtype="float64")
    ev = cfg.task_spec(50).sample(np.random.default_rng(5))
    E = R.build_tokens(ev.X, ev.Y, ev.x_q)
    params = T.init_params(cfg)
    big = {"gd_eta": 1.0, "gdpp_etas": [40.0, 40.0], "gdpp_gammas": [0.1, 0.1]}
    res = T._interpolation(cfg, params, big, ev, E)
    assert "skipped" in res and "beyond the token clip" in res["skipped"]
    small = {"gd_eta": 1.0, "gdpp_etas": [0.5, 0.5], "gdpp_gammas": [0.01, 0.01]}
    res = T._interpolation(T.TrainConfig(**{**TINY, "n_layers": 2, "dtype": "float64"}), params, small, ev, E)
    assert set(res) == {"loss_construction", "loss_interpolated", "loss_model"}


# ---- host copies and backend availability ------------------------------------------

def test_params_finite_sees_every_array_and_host_params_keeps_the_layout():
    params = T.init_params(tiny(n_layers=2, recurrent=False))
    assert T.params_finite(params)
    bad = list(params)
    W = bad[1].W_V.copy()
    W[0, 1, 2] = np.nan
    bad[1] = bad[1]._replace(W_V=W)
    assert not T.params_finite(tuple(bad))
    host = T.host_params(params)
    assert type(host[0]) is type(params[0]) and _same_params(host, params)


def test_unusable_cupy_backend_is_a_config_error_before_work(tmp_path):
    try:
        from reference.backends import cupy_backend
        cupy_backend.check_available()
    except (ImportError, RuntimeError):
        pass
    else:
        pytest.skip("CuPy and a CUDA device are usable here")
    with pytest.raises(T.ConfigError, match="backend 'cupy'"):
        T.train(tiny(backend="cupy"), str(tmp_path / "c"), progress=False)
    assert not (tmp_path / "c").exists()


# ---- verify --reuse-runs ---------------------------------------------------------------

def test_verify_reuses_only_a_finished_run_of_the_same_config(tmp_path, monkeypatch):
    from verify import claims_training as CT
    from verify import registry

    cfg = tiny(steps=20)
    monkeypatch.setattr(CT, "config_for", lambda ctx, experiment, seed: T.apply_overrides(cfg, {"seed": seed}))
    monkeypatch.setattr(CT, "_prefetch", lambda ctx: None)
    monkeypatch.setattr(CT, "_MEMO", {})
    trained = []
    real_train = T.train

    def counting_train(c, out_dir=None, **kw):
        trained.append((c.seed, c.lr))
        return real_train(c, out_dir, **kw)

    monkeypatch.setattr(T, "train", counting_train)
    ctx = registry.Context(mode="quick", seed=0, workdir=str(tmp_path), reuse_runs=True)
    first = CT.run_for(ctx, "one_layer", 0)
    assert trained == [(0, cfg.lr)]
    CT._MEMO.clear()
    again = CT.run_for(ctx, "one_layer", 0)                      # same config, finished: reused
    assert trained == [(0, cfg.lr)] and _same_params(again.params, first.params)
    assert again.run_dir in registry.reused_runs()
    CT._MEMO.clear()
    no_reuse = registry.Context(mode="quick", seed=0, workdir=str(tmp_path), reuse_runs=False)
    CT.run_for(no_reuse, "one_layer", 0)                         # without the flag: retrained
    assert len(trained) == 2
    CT._MEMO.clear()
    cfg = tiny(steps=20, lr=2e-3)                                # another config in the same directory
    CT.run_for(ctx, "one_layer", 0)
    assert trained[-1] == (0, 2e-3)
    CT._MEMO.clear()
    run_dir = CT._run_dir(ctx, cfg)                              # an interrupted run is not finished
    os.unlink(os.path.join(run_dir, T.SUMMARY_FILE))
    CT.run_for(ctx, "one_layer", 0)
    assert len(trained) == 4


def test_report_lists_reused_runs():
    from verify import report

    rep = {"version": "x", "mode": "full", "machine": {"platform": "p", "cpus": 2}, "seconds": 0.0, "n_passed": 0,
           "n_failed": 0, "reused_runs": ["runs/verify/full/one_layer-seed0"], "claims": []}
    md = report.to_markdown(rep)
    assert "not retrained here: `runs/verify/full/one_layer-seed0`" in md
    assert "reused" not in report.to_markdown(dict(rep, reused_runs=[]))
