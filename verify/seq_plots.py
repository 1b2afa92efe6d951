"""PNG plots of an lds-task run directory (the mesa paper's sequence models,
``reference.seq_training``), drawn by ``verify.plots.make_plots``:

* loss.png: eval and training loss against the training step, with GD, ridge and the
  Prop. 2 / Chebyshev baselines;
* per_t.png: the final per-time-step eval loss l_t (t = 1 .. T) of the model and of
  every baseline (log scale), the mesa paper's main figure;
* alignment.png: cos(model prediction, GD prediction) per time step at the last
  evaluation, and the mean prediction cosines against the references over training.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINES = (("gd", "GD (Prop. 1, eta line-searched)", "C1", "--"), ("lstsq", "ridge before t", "C3", "-."),
             ("prop2", "Prop. 2 layers (Neumann)", "C2", ":"), ("cheb", "Chebyshev as coded", "C4", ":"))


def _title(cfg, base):
    kinds = "+".join(dict.fromkeys(cfg.arch().kinds()))
    return (f"{cfg.experiment}: {base.get('depth', cfg.model.n_layers)} x {kinds}, {cfg.data.seq_variant}, "
            f"T={cfg.data.seq_len}, seed {cfg.seed}")


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_seq_plots(cfg, params, hist, base, summary, out):
    paths = []
    if hist and base:
        paths.append(plot_loss(cfg, hist, base, os.path.join(out, "loss.png")))
        paths.append(plot_per_t(cfg, hist, base, os.path.join(out, "per_t.png")))
        paths.append(plot_alignment(cfg, hist, base, os.path.join(out, "alignment.png")))
    return paths


def plot_loss(cfg, hist, base, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [r["step"] for r in hist]
    ax.plot(steps, [r["loss"] for r in hist], color="C0", lw=2, label="model (eval set)")
    tr = [(r["step"], r["train_loss"]) for r in hist if r.get("train_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), color="C0", lw=1, alpha=0.4, label="model (training batches)")
    for key, name, color, ls in BASELINES:
        if base.get(f"{key}_loss") is not None:
            ax.axhline(base[f"{key}_loss"], color=color, ls=ls, label=f"{name}: {base[key + '_loss']:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean over t of 0.5 ||y_hat_t - y_t||^2")
    ax.set_title(_title(cfg, base), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_per_t(cfg, hist, base, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    last = hist[-1]
    t = list(range(1, len(last["per_t"]) + 1))
    ax.plot(t, last["per_t"], color="C0", lw=2, label=f"model, step {last['step']}")
    for key, name, color, ls in BASELINES:
        if base.get(f"{key}_per_t") is not None:
            ax.plot(t, base[f"{key}_per_t"], color=color, ls=ls, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("l_t = mean over sequences of 0.5 ||y_hat_t - y_t||^2")
    ax.set_title(_title(cfg, base), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_alignment(cfg, hist, base, path):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    last = hist[-1]
    if last.get("pred_cos_gd_per_t"):
        a1.plot(range(1, len(last["pred_cos_gd_per_t"]) + 1), last["pred_cos_gd_per_t"], color="C1")
    a1.set_xlabel("time step t")
    a1.set_ylabel("cos(model prediction, GD prediction)")
    a1.grid(alpha=0.3)
    steps = [r["step"] for r in hist]
    for ref, color in (("gd", "C1"), ("prop2", "C2"), ("ridge", "C3")):
        if f"pred_cos_{ref}" in last:
            a2.plot(steps, [r[f"pred_cos_{ref}"] for r in hist], color=color, label=f"cos vs {ref}")
    a2.set_xlabel("training step")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(_title(cfg, base), fontsize=9)
    return _save(fig, path)
