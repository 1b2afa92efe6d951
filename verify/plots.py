"""PNG plots of a training run directory (matplotlib, Agg backend; no display needed).

``make_plots(run_dir)`` reads config.json, metrics.jsonl, summary.json and the
checkpoint of a run directory (``verify.runs``) and draws, under run_dir/plots/:

* loss.png: eval and training loss against the step, with GD-K, GD++ and least squares;
* alignment.png: preds diff, model cos and model diff against GD and GD++;
* ood.png: loss against the input scale and the teacher scale (model, GD, GD++, LSQ);
* weights.png: heat maps of W_KQ = W_K^T W_Q and W_PV = P W_V per layer and head,
  next to the construction's;
* rollout.png: the damped roll-out of a one-layer model against damped GD;
* sine.png (sine task): the learned features and the predictions against the true sine;
* induction.png (classic tokens): the loss against GD-1 and GD-2, and the first attention
  layer's copy sensitivities (self, next, other) over training;
* attention.png (classic tokens): each attention layer's map (query token x key token,
  per head, averaged over eval tasks) at the end of training.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reference import analysis as A  # noqa: E402
from . import runs  # noqa: E402

COLORS = {"model": "C0", "gd": "C1", "gdpp": "C2", "lstsq": "C3", "interp": "C4"}


def make_plots(run_dir, out=None, compare=()):
    """Draw every plot the run's files allow into ``out`` (default run_dir/plots);
    returns the list of PNG paths. ``compare``: further run directories of the same
    task whose models the sine plot draws beside this one (e.g. MLP + GD)."""
    cfg, ck, rows, summary = runs.load_run(run_dir)
    params = None if ck is None else ck.params
    others = []
    for d in compare:                      # checked before anything is drawn
        c2, ck2, _, _ = runs.load_run(d)
        if cfg.data.task != "sine" or c2.data.task != "sine" or ck2 is None:
            raise ValueError(f"compare: {d} and {run_dir} must both be sine-task runs with a checkpoint")
        others.append((c2.experiment, c2, ck2.params))
    out = os.path.join(run_dir, "plots") if out is None else out
    os.makedirs(out, exist_ok=True)
    base = next((r for r in rows if r.get("kind") == "baselines"), None)
    hist = [r for r in rows if r.get("kind") == "eval"]
    paths = []
    if cfg.is_sequence:                    # the lds task: per-time-step curves (verify.seq_plots)
        from . import seq_plots

        return seq_plots.make_seq_plots(cfg, params, hist, base, summary, out)
    if hist and base:
        paths.append(plot_loss(cfg, hist, base, summary, os.path.join(out, "loss.png")))
        paths.append(plot_alignment(cfg, hist, os.path.join(out, "alignment.png")))
    if summary and "input" in summary.get("ood", {}):
        paths.append(plot_ood(cfg, summary["ood"], os.path.join(out, "ood.png")))
    if params is not None and base and set(cfg.arch().kinds()) == {"lsa"}:    # the weights of lsa layers
        paths.append(plot_weights(cfg, params, base, os.path.join(out, "weights.png")))
    if summary and "model" in summary.get("rollout", {}):
        paths.append(plot_rollout(cfg, summary["rollout"], os.path.join(out, "rollout.png")))
    if params is not None and cfg.data.task == "sine":
        paths.append(plot_sine(cfg, params, os.path.join(out, "sine.png"), others=others))
    if cfg.data.tokens == "classic" and hist and base:
        paths.append(plot_induction(cfg, hist, base, os.path.join(out, "induction.png")))
    if cfg.data.tokens == "classic" and params is not None:
        paths.append(plot_attention(cfg, params, os.path.join(out, "attention.png")))
    return paths


def plot_induction(cfg, hist, base, path):
    """Classic tokens: (left) the eval loss against GD-1 (the run's baseline) and GD-2
    (line-searched for two steps on the same tasks); (right) the copy sensitivities that
    every evaluation row carries (``copy_self``, ``copy_next``, ``copy_other``), with the
    step where the loss drops (``runs.loss_drop_step``: halfway from the zero predictor's
    loss, the plateau before any copy, to GD-1)."""
    from reference.trainer import gd_k_baseline

    gd2, eta2 = gd_k_baseline(cfg, 2)
    steps = [r["step"] for r in hist]
    loss = [r["loss"] for r in hist]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.2))
    a0.plot(steps, loss, color=COLORS["model"], lw=2, label="trained model (eval set)")
    a0.axhline(base["gd_loss"], color=COLORS["gd"], ls="--", label=f"GD-1, eta {base['gd_eta']:.2f}: {base['gd_loss']:.4f}")
    a0.axhline(gd2, color=COLORS["gdpp"], ls=":", lw=2, label=f"GD-2, eta {eta2:.2f}: {gd2:.4f}")
    a0.axhline(base["zero_loss"], color="0.3", ls="-.", lw=1, label=f"zero predictor: {base['zero_loss']:.4f}")
    a0.set(yscale="log", xlabel="training step", ylabel="loss 0.5 (y_hat - y)^2", title="loss")
    a0.grid(alpha=0.3, which="both")
    drop = runs.loss_drop_step(hist, base)
    for key, ls, label in (("copy_next", "-", "next token: |d t(e_j) / d e_j+1|"),
                           ("copy_self", "--", "itself: |d t(e_j) / d e_j|"),
                           ("copy_other", ":", "other tokens (mean): |d t(e_j) / d e_i|")):
        pts = [(r["step"], r[key]) for r in hist if r.get(key) is not None]
        if pts:
            a1.plot(*zip(*pts), ls=ls, lw=2, label=label)
    if drop is not None:
        for ax in (a0, a1):
            ax.axvline(drop, color="0.5", lw=1, label=f"loss halfway from zero predictor to GD-1 (step {drop})")
    a0.legend(fontsize=8)
    a1.set(xlabel="training step", ylabel="Frobenius norm, mean over x tokens j",
           title="first attention layer: copy sensitivities")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    fig.suptitle(f"{_title(cfg)}: classic tokens", fontsize=10)
    return _save(fig, path)


def plot_attention(cfg, params, path, n_tasks=256):
    """Classic tokens: every attention layer's map at the end of training, per head,
    averaged over the first ``n_tasks`` eval tasks (softmax weights; LSA scores)."""
    from reference import copy_analysis as C
    from reference.tasks import STREAM_EVAL, stream_rng

    ev = A.cast_tasks(cfg.task_spec(n_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_EVAL)), cfg.np_dtype)
    arch = cfg.arch()
    maps = C.attention_maps(params, arch, cfg.layout(), ev)
    kinds = [arch.layers[k].kind for k in C.attention_layers(arch)]
    panels = [(k, kind, h, m[h]) for k, (kind, m) in enumerate(zip(kinds, maps)) for h in range(m.shape[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    T = maps[0].shape[1]
    names = [f"x{j // 2 + 1}" if j % 2 == 0 else f"y{j // 2 + 1}" for j in range(T - 1)] + ["x_q"]
    for ax, (k, kind, h, M) in zip(axes[0], panels):
        im = ax.imshow(M, cmap="viridis" if kind == "softmax" else "RdBu_r", aspect="auto",
                       **({} if kind == "softmax" else {"vmin": -np.abs(M).max(), "vmax": np.abs(M).max()}))
        ax.set(title=f"attention layer {k + 1} ({kind}), head {h + 1}", xlabel="key token", ylabel="query token")
        tick = list(range(0, M.shape[0], 2))
        ax.set_yticks(tick, [names[i] for i in tick], fontsize=6)
        ax.set_xticks(list(range(0, M.shape[1], 2)), [names[i] for i in range(0, M.shape[1], 2)], fontsize=6,
                      rotation=90)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{_title(cfg)}: attention maps at step {cfg.steps} (mean over {n_tasks} eval tasks)", fontsize=10)
    return _save(fig, path)


def plot_sine(cfg, params, path, n_tasks=4, n_features=8, others=()):
    """A sine-task model: (left) the features its first two layers (embedding, MLP) give
    single tokens (x, 0) over the input range; (right) its predictions on ``n_tasks`` eval
    tasks over the range against the true a sin(x + rho), with the context pairs.
    ``others``: (label, config, params) of further models drawn on the same tasks."""
    from reference import sine_analysis as S
    from reference.tasks import STREAM_EVAL, stream_rng

    ev = cfg.task_spec(n_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_EVAL))
    grid = S.query_grid((cfg.data.x_low, cfg.data.x_high), 101)
    fig, axes = plt.subplots(1, 1 + n_tasks, figsize=(4 + 3.2 * n_tasks, 3.6))
    F = S.learned_features(params, cfg.arch(), grid, min(2, cfg.arch().n_layers - 1), dtype=cfg.np_dtype)
    for c in range(min(n_features, F.shape[1])):
        axes[0].plot(grid, F[:, c], lw=1)
    axes[0].set(title=f"features after embed + MLP (first {min(n_features, F.shape[1])} of {F.shape[1]})",
                xlabel="x (token (x, 0))", ylabel="feature value")
    curves = [(cfg.experiment, S.sine_curves(params, cfg.arch(), ev, grid, cfg.np_dtype))]
    curves += [(label, S.sine_curves(p, c.arch(), ev, grid, c.np_dtype)) for label, c, p in others]
    for b in range(n_tasks):
        ax = axes[1 + b]
        ax.plot(grid, curves[0][1].truth[b], color="k", lw=2, label="a sin(x + rho)")
        for i, (label, cv) in enumerate(curves):
            ax.plot(grid, cv.pred[b], color=f"C{i}", lw=1.5, ls="-" if i == 0 else "--", label=label)
        ax.scatter(ev.X[b, :, 0], ev.Y[b, :, 0], color="k", s=14, zorder=3, label="context pairs")
        a, rho = ev.W[b, 0]
        ax.set(title=f"task {b}: a={a:.2f}, rho={rho:.2f}", xlabel="query x_q", ylabel="y")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{_title(cfg)}: learned features and predictions", fontsize=10)
    return _save(fig, path)


def _title(cfg):
    kind = "recurrent" if cfg.model.recurrent else "separate"
    return (f"{cfg.experiment}: K={cfg.model.n_layers} {kind}, H={cfg.model.heads}, d={cfg.data.d}, N={cfg.data.N}, "
            f"seed {cfg.seed}")


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(cfg, hist, base, summary, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in hist]
    ax.plot(steps, [r["loss"] for r in hist], color=COLORS["model"], lw=2, label="trained LSA (eval set)")
    tr = [(r["step"], r["train_loss"]) for r in hist if r.get("train_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), color=COLORS["model"], lw=1, alpha=0.4, label="trained LSA (training batches)")
    K = cfg.model.n_layers
    ax.axhline(base["gd_loss"], color=COLORS["gd"], ls="--", label=f"GD-{K}, eta {base['gd_eta']:.2f}: {base['gd_loss']:.4f}")
    gdpp_kind = f"{'shared' if cfg.gdpp_shared else 'per layer'}, {cfg.baselines.gdpp_steps} meta-steps"
    ax.axhline(base["gdpp_loss"], color=COLORS["gdpp"], ls=":", lw=2, label=f"GD++ ({gdpp_kind}): {base['gdpp_loss']:.4f}")
    lo = min(min(r["loss"] for r in hist), base["gd_loss"], base["gdpp_loss"])
    if base["lstsq_loss"] > 1e-3 * lo:
        ax.axhline(base["lstsq_loss"], color=COLORS["lstsq"], ls="-.", label=f"least squares: {base['lstsq_loss']:.4f}")
    else:
        ax.plot([], [], color=COLORS["lstsq"], ls="-.", label=f"least squares: {base['lstsq_loss']:.1e} (off scale)")
    if summary and "loss_interpolated" in summary.get("interpolation", {}):
        li = summary["interpolation"]["loss_interpolated"]
        ax.plot([steps[-1]], [li], marker="*", ms=12, ls="", color=COLORS["interp"], label=f"interpolated model: {li:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss 0.5 (y_hat - y)^2")
    ax.set_title(_title(cfg), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_alignment(cfg, hist, path):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    steps = [r["step"] for r in hist]
    for ax, key, label in zip(axes, ("preds_diff", "model_cos", "model_diff"), ("Preds diff", "Model cos", "Model diff")):
        for ref, name in (("gd", f"GD-{cfg.model.n_layers}"), ("gdpp", "GD++")):
            ax.plot(steps, [r[f"{key}_{ref}"] for r in hist], color=COLORS[ref], label=f"vs {name}",
                    ls="-" if ref == "gd" else "--")
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if key == "model_cos":
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
        else:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(_title(cfg), fontsize=9)
    return _save(fig, path)


def plot_ood(cfg, ood, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, xl in zip(axes, ("input", "teacher"), ("input scale alpha: x ~ U(-alpha/2, alpha/2)",
                                                         "teacher scale alpha: W ~ alpha N(0, I)")):
        r = ood[kind]
        a = r["alpha"]
        ax.plot(a, r["model"], color=COLORS["model"], lw=2, label="trained LSA")
        ax.plot(a, r["gd"], color=COLORS["gd"], ls="--", label=f"GD-{cfg.model.n_layers}")
        ax.plot(a, r["gdpp"], color=COLORS["gdpp"], ls=":", lw=2, label="GD++")
        if max(r["lstsq"]) > 1e-6:
            ax.plot(a, r["lstsq"], color=COLORS["lstsq"], ls="-.", label="least squares")
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        top = 10 * max(max(r["model"]), max(r["gd"]))
        if max(r["gdpp"]) > top:   # per-layer GD++ with large step sizes can blow up far out
            ax.set_ylim(0.5 * min(min(r["model"]), min(r["gd"]), min(r["gdpp"])), top)
            ax.text(0.02, 0.02, "GD++ leaves the plot above", transform=ax.transAxes, fontsize=7, color=COLORS["gdpp"])
        ax.set_xlabel(xl)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(_title(cfg) + f" - out of distribution ({cfg.analysis.ood_tasks} tasks per point)", fontsize=9)
    return _save(fig, path)


def plot_weights(cfg, params, base, path):
    """Heat maps of the trained products per layer and head (columns), rows W_KQ and
    W_PV, then the construction's W_KQ and W_PV for the same layer."""
    consts = A.construction_layers(cfg, base, np.float64)
    cols = []
    for k, layer in enumerate(params):
        KQ, PV = A.layer_products(layer)
        CKQ, CPV = (a[0] for a in A.layer_products(consts[min(k, len(consts) - 1)]))
        for h in range(KQ.shape[0]):
            name = ("shared layer" if cfg.model.recurrent else f"layer {k}") + (f" head {h}" if KQ.shape[0] > 1 else "")
            cols.append((name, KQ[h], PV[h], CKQ, CPV))
    cname = "GD" if cfg.model.n_layers == 1 else "GD++"
    one = len(cols) == 1   # one layer and head: a 2 x 2 grid (trained row, construction row)
    if one:
        fig, grid = plt.subplots(2, 2, figsize=(8, 7), squeeze=False)
        axes = np.array([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]).reshape(4, 1)
    else:
        fig, axes = plt.subplots(4, len(cols), figsize=(3.3 * len(cols) + 0.5, 12.5), squeeze=False)
    for j, (name, KQ, PV, CKQ, CPV) in enumerate(cols):
        for i, (M, mname) in enumerate(((KQ, f"{name}: W_KQ"), (PV, f"{name}: W_PV"),
                                        (CKQ, f"{cname} construction: W_KQ"), (CPV, f"{cname} construction: W_PV"))):
            ax = axes[i, j]
            v = float(np.max(np.abs(M))) or 1.0
            im = ax.imshow(M, cmap="RdBu_r", vmin=-v, vmax=v)
            ax.set_title(mname, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(_title(cfg) + "\nW_KQ = W_K^T W_Q, W_PV = P W_V (raw, not rescaled);\ntoken layout (x_1 .. x_d, y)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rollout(cfg, ro, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    n = np.arange(1, len(ro["model"]) + 1)
    ax.plot(n, ro["model"], color=COLORS["model"], lw=2, label=f"trained layer, y-slot updates damped by {ro['damping']}")
    ax.plot(n, ro["gd"], color=COLORS["gd"], ls="--", label=f"GD with step {ro['damping']} * eta")
    ax.set_yscale("log")
    ax.set_xlabel("applications / GD steps")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(_title(cfg) + " - roll-out", fontsize=9)
    return _save(fig, path)


# ---- icgd plots -------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (icgd train, verify's runs/verify/...)")
    p.add_argument("--out", metavar="DIR", help="where to draw (default RUN_DIR/plots)")
    p.add_argument("--compare", metavar="RUN_DIR", action="append", default=[],
                   help="sine task: another run whose predictions the sine plot draws beside (repeatable)")


def run(args):
    import sys

    for d in [args.run_dir, *args.compare]:
        if not os.path.isfile(os.path.join(d, runs.CONFIG_FILE)):
            print(f"icgd plots: {d}: not a run directory (no {runs.CONFIG_FILE})", file=sys.stderr)
            return 2
    try:
        paths = make_plots(args.run_dir, args.out, args.compare)
    except (ValueError, OSError, runs.CheckpointError) as exc:
        print(f"icgd plots: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
