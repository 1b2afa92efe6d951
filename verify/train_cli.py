"""``icgd train``: train an LSA transformer from scratch and write a run directory.

    icgd train one_layer --out runs/one_layer
    icgd train recurrent2 --steps 2000 --set lr=5e-4 --out runs/r2
    icgd train --out runs/r2 --resume                   (continue an interrupted run; its
                                                         config.json is reused, --steps may grow)
    icgd train --list                                   (the named experiments)

The experiment's config (``verify.experiments.EXPERIMENTS``) is overridden field by
field, either as ``--set KEY=VALUE`` (KEY a flat name such as ``lr`` or a dotted one
such as ``optim.lr``) or as ``--KEY VALUE``; values are converted by the field's type,
unknown keys are refused, and the effective config is printed before any work. The
run directory (``verify.runs``) gets config.json, metrics.jsonl, checkpoint.npz,
summary.json and plots/*.png.

Each field may be given once, in one spelling (``--lr`` and ``--set optim.lr=`` together
are refused, as is ``--lr`` twice); option names are not abbreviated. ``--out`` must be a
directory that can be written, or made (``reference.files.check_output_dir``), checked
before the config is printed. Ctrl-C stops the run, keeping its last checkpoint, and
says how to resume it.

Exit codes: 0 done, 2 bad configuration or usage, 3 training diverged, 4 checkpoint
refused, 130 interrupted.
"""

import argparse
import json
import os
import shlex
import sys

import numpy as np

from reference.config import ConfigError, LEAVES, config_from_dict, dotted_name, field_path, type_name
from reference.errors import TrainingDiverged
from reference.trainer import BASELINE_NAMES
from reference.files import OutputPathError, check_output_dir

from . import runs
from .cli import INTERRUPTED
from .experiments import EXPERIMENTS, get_experiment
from .progress import Progress
from .settings import apply_overrides


def add_arguments(p):
    p.add_argument("experiment", nargs="?", help="a named experiment (see --list)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/EXPERIMENT-seedSEED)")
    p.add_argument("--set", metavar="KEY=VALUE", action=_Override, default=[], dest="overrides",
                   help="override a config field (repeatable), e.g. --set steps=2000 --set lr=5e-4")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    how.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--list", action="store_true", help="list the named experiments and exit")
    p.add_argument("--dry-run", action="store_true", help="print the effective config and exit")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    g = p.add_argument_group("config fields", "every field of the config can be given as --FIELD VALUE "
                                              "(same as --set FIELD=VALUE or --set GROUP.FIELD=VALUE)")
    for (group, name), tp in LEAVES.items():
        if name == "experiment":
            continue
        g.add_argument(f"--{name}", dest="overrides", action=_Override, field=name, metavar=_metavar(tp),
                       help=dotted_name(name) if group else None)


class _Override(argparse.Action):
    """Collects ``--set KEY=VALUE`` and ``--FIELD VALUE`` in command-line order, as
    (option as typed, field name or None for --set, text), into ``args.overrides``."""

    def __init__(self, option_strings, dest, field=None, **kw):
        super().__init__(option_strings, dest, **kw)
        self.field = field

    def __call__(self, parser, namespace, value, option_string=None):
        given = list(getattr(namespace, self.dest, None) or [])
        given.append((option_string, self.field, value))
        setattr(namespace, self.dest, given)


def _metavar(tp):
    """INT, FLOAT, BOOL, STR, or FLOAT|none for an optional field."""
    return "|".join("none" if n == "None" else n.upper() for n in type_name(tp).split(" or "))


def _overrides(args):
    """{name as typed: text} of the command line's overrides; ConfigError for a --set
    without KEY=VALUE or a field given more than once (in any spelling)."""
    over, where, errs = {}, {}, []
    for opt, field, text in args.overrides:
        if field is None:
            if "=" not in text:
                errs.append(f"--set expects KEY=VALUE, got {text!r}")
                continue
            key, text = text.split("=", 1)
            key = key.strip()
            given = f"--set {key}={text}"
        else:
            key, given = field, f"{opt} {text}"
        try:
            path = field_path(key)
        except ConfigError:
            path = (key,)                # unknown or ambiguous: apply_overrides says which
        if path in where:
            errs.append(f"{'.'.join(path)}: given twice ({where[path]} and {given}); give each field once")
            continue
        where[path], over[key] = given, text
    if errs:
        raise ConfigError("invalid override(s):\n  " + "\n  ".join(errs))
    return over


def effective_config(args):
    """The experiment's config with the command-line overrides applied (ConfigError if bad).
    With --resume and an existing run in --out, the run's config.json is the base (so
    the overrides need not be repeated; the experiment name is optional)."""
    over = _overrides(args)
    saved = os.path.join(args.out, runs.CONFIG_FILE) if args.out else None
    if args.resume and saved and os.path.exists(saved):
        try:
            with open(saved) as f:
                base = config_from_dict(json.load(f))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{saved}: unreadable config ({exc})") from exc
        if args.experiment and args.experiment != base.experiment:
            raise ConfigError(f"{args.out} holds a run of {base.experiment!r}, not {args.experiment!r}")
        return apply_overrides(base, over), _names(over)
    if not args.experiment:
        raise ConfigError("name an experiment (one of: " + ", ".join(EXPERIMENTS) + "); see --list")
    exp = get_experiment(args.experiment)
    return apply_overrides(exp.config, over), _names(over)


def _names(over):
    """The flat names of the overridden fields (dotted names resolved)."""
    return sorted(field_path(k)[-1] for k in over)


def format_config(cfg, overridden=()):
    lines = [f"effective config ({cfg.experiment}; * = overridden):"]
    group = None
    for (g, name) in LEAVES:
        if g != group and g is not None:
            lines.append(f"   [{g}]")
        group = g
        mark = "*" if name in overridden else " "
        lines.append(f" {mark} {name:<18} = {cfg.get(name)!r}")
    return "\n".join(lines)


def _list():
    for name, e in EXPERIMENTS.items():
        m, c = e.config.model, e.config
        print(f"{name:<12} K={m.n_layers} {'recurrent' if m.recurrent else 'separate '} H={m.heads} "
              f"steps={c.steps} lr={c.optim.lr:g} grad_clip={c.optim.grad_clip} token_clip={m.token_clip}\n"
              f"             {e.description}")


def run(args):
    if args.list:
        _list()
        return 0
    try:
        cfg, overridden = effective_config(args)
        out = args.out if args.out is not None else os.path.join("runs", f"{cfg.experiment}-seed{cfg.seed}")
        check_output_dir(out, "--out")
        runs.check_runnable(cfg)
    except (ConfigError, OutputPathError) as exc:
        print(f"icgd train: {exc}", file=sys.stderr)
        return 2
    print(format_config(cfg, overridden))
    print(f"run directory: {out}", flush=True)
    if args.dry_run:
        return 0
    try:
        res = runs.train_run(cfg, out, resume=args.resume, overwrite=args.overwrite,
                             progress=Progress(cfg.steps, enabled=not args.quiet),
                             log=None if args.quiet else runs.log_to_stderr)
    except (ConfigError, OutputPathError) as exc:
        print(f"icgd train: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"icgd train: {exc}", file=sys.stderr)
        return 3
    except runs.CheckpointError as exc:
        print(f"icgd train: cannot resume: {exc}", file=sys.stderr)
        return 4
    except runs.RunInterrupted as exc:
        print(f"\nicgd train: {interrupted_text(exc, exc.run_dir or out)}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:          # while setting up (baselines, evaluation tasks): no step taken
        what = (f"resume again with: icgd train --out {shlex.quote(out)} --resume" if args.resume
                else "nothing to resume; run the same command again to start over")
        print(f"\nicgd train: interrupted before training started; {what}", file=sys.stderr)
        return INTERRUPTED
    print(summary_text(res))
    if not args.no_plots:
        from . import plots

        try:
            paths = plots.make_plots(out)
        except KeyboardInterrupt:
            print(f"\nicgd train: interrupted while drawing the plots; the run in {out} is complete", file=sys.stderr)
            return INTERRUPTED
        print("plots: " + ", ".join(os.path.relpath(p, out) for p in paths))
    return 0


def interrupted_text(exc, out):
    """What to do after Ctrl-C stopped a run (a :class:`verify.runs.RunInterrupted`)."""
    if exc.checkpoint_step is None:
        return (f"interrupted at step {exc.step}, before the first checkpoint: no checkpoint was written, so there "
                "is nothing to resume; run the same command again to start over")
    return (f"interrupted at step {exc.step}; resume with: icgd train --out {shlex.quote(out)} --resume "
            f"(it continues from the checkpoint at step {exc.checkpoint_step})")


def summary_text(res):
    if res.config.is_sequence:
        return seq_summary_text(res)
    b, f, s = res.baselines, res.summary.get("final") or {}, res.summary
    K = res.config.model.n_layers
    lines = [f"final eval loss {f.get('loss', float('nan')):.5f} after {res.config.steps} steps; "
             f"GD-{K} {b['gd_loss']:.5f} (eta {b['gd_eta']:.3f}), GD++ {b['gdpp_loss']:.5f}, "
             f"least squares {b['lstsq_loss']:.3g}"]
    if f:
        lines.append(f"alignment vs GD: preds diff {f['preds_diff_gd']:.4f}, model cos {f['model_cos_gd']:.4f}, "
                     f"model diff {f['model_diff_gd']:.4f}; vs GD++: preds diff {f['preds_diff_gdpp']:.4f}, "
                     f"model cos {f['model_cos_gdpp']:.4f}, model diff {f['model_diff_gdpp']:.4f}")
    for name in b.get("failed", {}):
        lines.append(f"warning: the {BASELINE_NAMES[name]} baseline failed (its loss is above the zero predictor's "
                     f"{b['zero_loss']:.4g}); comparisons with it are not meaningful")
    weights = s.get("weights", [])
    if isinstance(weights, dict):
        lines.append(f"weights skipped: {weights.get('skipped')}")
        weights = []
    for k, w in enumerate(weights):
        lines.append(f"layer {k}: beta {w['beta']:.4f}, |W_KQ/beta - C| / |C| {w['kq_rel_err']:.4f}, "
                     f"|W_PV*beta - C| / |C| {w['pv_rel_err']:.4f} (C = {s['construction'].upper()} construction)")
    for name in ("ood", "rollout"):
        if "skipped" in (s.get(name) or {}):
            lines.append(f"{name} skipped: {s[name]['skipped']}")
    i = s.get("interpolation")
    if i and "skipped" in i:
        lines.append(f"interpolation skipped: {i['skipped']}")
    elif i:
        lines.append(f"interpolated model loss {i['loss_interpolated']:.5f} (model {i['loss_model']:.5f}, "
                     f"construction {i['loss_construction']:.5f})")
    if res.run_dir:
        lines.append(f"wrote {res.run_dir}/: " + ", ".join(runs.RUN_FILES))
    return "\n".join(lines)


def seq_summary_text(res):
    """The end-of-run lines of an lds-task run (``reference.seq_training``)."""
    b, f, s = res.baselines, res.summary.get("final") or {}, res.summary
    K = b.get("depth", res.config.model.n_layers)
    pt = f.get("per_t") or []
    late = lambda per_t: float(np.mean(per_t[-10:])) if per_t else float("nan")      # noqa: E731
    refs = [("GD", "gd"), ("ridge", "lstsq"), (f"Prop. 2 ({K} layers)", "prop2"), ("Chebyshev as coded", "cheb")]
    lines = [f"final eval loss {f.get('loss', float('nan')):.5f} after {res.config.steps} steps (t = 41..50: "
             f"{late(pt):.5f}); " + ", ".join(f"{n} {b[k + '_loss']:.5f} ({late(b[k + '_per_t']):.5f})"
                                               for n, k in refs if b.get(k + "_loss") is not None)]
    if f:
        lines.append("prediction alignment: " + ", ".join(
            f"cos({r}) {f['pred_cos_' + r]:.4f}, diff({r}) {f['preds_diff_' + r]:.4f}" for r in ("gd", "prop2", "ridge")
            if "pred_cos_" + r in f))
    w = s.get("gd_weights")
    if w:
        lines.append(f"weights vs the Prop. 1 construction: tensor cos {w['tensor_cos']:.4f}, rel. err "
                     f"{w['tensor_rel_err']:.4f}, learned eta {w['scale']:.4f} (line search {b['gd_eta']:.3f})")
    if s.get("mesa_lam"):
        lines.append(f"mesa lam: {np.round(s['mesa_lam'], 4).tolist()}")
    if res.run_dir:
        lines.append(f"wrote {res.run_dir}/: " + ", ".join(runs.RUN_FILES))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="icgd train", description="Train an LSA transformer from scratch.",
                                allow_abbrev=False)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
