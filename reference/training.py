"""Training LSA transformers from scratch, with the paper's baselines and analyses.

von Oswald et al. 2023, Sec. 3-4 and App. A (paper-settings.md sections 4-7). The
training loop drives a backend stepper only (``get_backend(cfg.backend)
.make_stepper(arch, hp, spec, seed, dtype)``), so the NumPy reference and the fast
backends run the same loop; evaluation and the analyses use the reference functions.

What one run does (:func:`train`):

1. baselines on fixed task sets that do not depend on the training seed:
   GD-K with eta from the paper's line search (arange(0.001, 25, 0.1), on
   ``line_search_tasks`` tasks), GD++ with (eta, gamma) meta-trained by Adam
   (shared when the model is recurrent or has one layer, one pair per layer
   otherwise; initialised at gamma = eta / N^2 from the line search), least squares;
2. Adam with global-norm clipping on fresh tasks every step (the tasks of step s come
   from ``step_rng(seed, s)``, so a resumed run is bit-for-bit the uninterrupted one);
3. every ``eval_every`` steps: the loss on a fixed evaluation set (``eval_tasks``
   tasks from ``eval_seed``) and the alignment metrics against GD and GD++;
4. at the end: per-layer weights against the construction (scale symmetry removed),
   the interpolated model, the OOD sweeps and the damped roll-out.

GD++ gradient (hand-derived): the GD++ layer is the construction of
``constructions.gdpp_layer`` whose only (eta, gamma)-dependent weight is
P = diag(-gamma I_d, (eta/N) I_y), linear in both. So with dP = dL/dP from the
hand-written model backward,

    dL/deta = (1/N) tr(dP[d:, d:])        dL/dgamma = -tr(dP[:d, :d])

(per layer; for a weight-tied stack the model backward has already summed over the
K applications).

Run directory (``out_dir``): config.json (the effective config), metrics.jsonl
(one JSON object per line: ``kind`` = 'baselines', then 'eval' rows), checkpoint.npz
(written atomically, see :func:`save_checkpoint`), summary.json (final numbers and
analyses). Plots are drawn by ``verify.plots`` from these files.
"""

import dataclasses
import difflib
import json
import os
import sys
import tempfile
import time
import typing
import zipfile
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from ._io import write_text_atomic  # noqa: F401  (also used by the CLI)
from . import analysis as A
from .backends import BACKENDS, DEFAULT_TRAIN_BACKEND, get_backend
from .layers.lsa import LSAParams, init_lsa_params
from .model import Arch, loss_and_grads, lsa_stack, model_forward
from .optim import AdamHP, AdamState, adam_init, adam_update
from .solvers import gdpp_predict, least_squares_predict, line_search_eta
from .tasks import TaskSpec
from .tokens import build_tokens, readout
from .xp import get_xp, to_numpy

FORMAT_VERSION = 1
HOST_BACKENDS = ("numpy", "numba")   # backends whose loss_and_grads take NumPy arrays

# Random streams. Training step s draws from default_rng([seed, s]) (tasks.step_rng);
# every other stream is default_rng([seed or eval_seed, TAG, ...]) with a TAG far above
# any step index, so no two streams coincide (SeedSequence ignores trailing zeros,
# hence the nonzero tags).
MAX_STEPS = 2 ** 31
_INIT, _EVAL, _LINE_SEARCH, _GDPP, _OOD, _ROLLOUT = (2 ** 32 - k for k in range(1, 7))


class ConfigError(ValueError):
    """A configuration value or override is invalid (raised before any work)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not belong to this configuration."""


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became non-finite."""

    def __init__(self, message, step, checkpoint_step=None):
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults: the one-layer experiment of the
    official code (paper-settings.md sections 1, 4, 5).

    Data: d, N, d_y, batch (tasks per step), inputs U(x_low, x_high), teacher scale
    w_scale, label noise noise_std, n_distractors.
    Model: n_layers (K), recurrent (weight-tied), heads (H), token_clip (clip tokens
    to [-c, c] after every layer; None = off; the code uses 10 when K > 3),
    init_scale (variance scaling scale / K over fan-in, truncated normal).
    Optimiser: Adam lr, b1, b2, eps; grad_clip = global-norm clip (None = off; the code
    uses 0.001 when K <= 2, else 10); steps; seed; dtype ('float32' or 'float64');
    backend ('numpy', 'numba', 'cupy').
    Evaluation: eval_tasks tasks from eval_seed, every eval_every steps; a checkpoint
    every checkpoint_every steps (a multiple of eval_every).
    Baselines: line_search_tasks for the GD eta; GD++ meta-training with Adam
    (gdpp_lr, b1 = 0.9, gdpp_b2, eps 1e-8), gdpp_batch tasks per step, gdpp_steps.
    Analyses: ood_tasks per OOD point; a roll-out of rollout_steps damped applications
    (rollout_damping) of a weight-shared layer.
    """

    experiment: str = "custom"
    # data
    d: int = 10
    N: int = 10
    d_y: int = 1
    batch: int = 2048
    x_low: float = -0.5
    x_high: float = 0.5
    w_scale: float = 1.0
    noise_std: float = 0.0
    n_distractors: int = 0
    # model
    n_layers: int = 1
    recurrent: bool = False
    heads: int = 1
    token_clip: Optional[float] = None
    init_scale: float = 0.002
    # optimiser
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    grad_clip: Optional[float] = 0.001
    steps: int = 5000
    seed: int = 0
    dtype: str = "float32"
    backend: str = DEFAULT_TRAIN_BACKEND
    # evaluation and checkpoints
    eval_tasks: int = 10_000
    eval_seed: int = 2023
    eval_every: int = 100
    checkpoint_every: int = 500
    # baselines
    line_search_tasks: int = 10_000
    gdpp_steps: int = 1000
    gdpp_lr: float = 1e-3
    gdpp_b2: float = 0.999
    gdpp_batch: int = 512
    # analyses
    ood_tasks: int = 1000
    rollout_steps: int = 50
    rollout_damping: float = 0.75

    def __post_init__(self):
        errors = _config_errors(self)
        if errors:
            raise ConfigError("invalid training configuration:\n  " + "\n  ".join(errors))

    # derived objects -------------------------------------------------------------
    @property
    def D(self):
        return self.d + self.d_y

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    @property
    def gdpp_shared(self):
        """GD++ has one (eta, gamma) when the model shares its layer (or has one)."""
        return self.recurrent or self.n_layers == 1

    def arch(self):
        return lsa_stack(n_layers=self.n_layers, recurrent=self.recurrent, clip=self.token_clip)

    def task_spec(self, B=None):
        return TaskSpec(d=self.d, N=self.N, d_y=self.d_y, B=self.batch if B is None else B,
                        x_range=(self.x_low, self.x_high), w_scale=self.w_scale,
                        noise_std=self.noise_std, n_distractors=self.n_distractors)

    def adam_hp(self):
        return AdamHP(lr=self.lr, b1=self.b1, b2=self.b2, eps=self.eps, clip_norm=self.grad_clip)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def _config_errors(c):
    """All problems with a config, as messages naming the field (checked together)."""
    errs = []
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        v = getattr(c, f.name)
        if not _has_type(v, hints[f.name]):
            errs.append(f"{f.name}: expected {_type_name(hints[f.name])}, got {type(v).__name__} {v!r}")
    if errs:
        return errs

    def need(cond, msg):
        if not cond:
            errs.append(msg)

    for name in ("d", "N", "d_y", "batch", "n_layers", "heads", "steps", "eval_tasks", "eval_every",
                 "checkpoint_every", "line_search_tasks", "gdpp_batch", "ood_tasks", "rollout_steps"):
        need(getattr(c, name) >= 1, f"{name}: must be >= 1, got {getattr(c, name)}")
    for name in ("seed", "eval_seed", "n_distractors", "gdpp_steps"):
        need(getattr(c, name) >= 0, f"{name}: must be >= 0, got {getattr(c, name)}")
    floats = ("x_low", "x_high", "w_scale", "noise_std", "init_scale", "lr", "b1", "b2", "eps", "gdpp_lr",
              "gdpp_b2", "rollout_damping", "token_clip", "grad_clip")
    for name in floats:
        v = getattr(c, name)
        need(v is None or np.isfinite(v), f"{name}: must be finite, got {v}")
    if errs:
        return errs
    need(c.steps < MAX_STEPS, f"steps: must be < {MAX_STEPS}, got {c.steps}")
    need(c.n_distractors <= c.N, f"n_distractors: must be <= N={c.N}, got {c.n_distractors}")
    need(c.x_low < c.x_high, f"x_low, x_high: need x_low < x_high, got ({c.x_low}, {c.x_high})")
    need(c.w_scale >= 0, f"w_scale: must be >= 0, got {c.w_scale}")
    need(c.noise_std >= 0, f"noise_std: must be >= 0, got {c.noise_std}")
    for name in ("init_scale", "lr", "gdpp_lr", "rollout_damping"):
        need(getattr(c, name) > 0, f"{name}: must be > 0, got {getattr(c, name)}")
    for name in ("b1", "b2", "gdpp_b2"):
        need(0 <= getattr(c, name) < 1, f"{name}: must be in [0, 1), got {getattr(c, name)}")
    need(c.eps >= 0, f"eps: must be >= 0, got {c.eps}")
    for name in ("token_clip", "grad_clip"):
        v = getattr(c, name)
        need(v is None or v > 0, f"{name}: must be > 0 or None (off), got {v}")
    need(c.dtype in ("float32", "float64"), f"dtype: must be 'float32' or 'float64', got {c.dtype!r}")
    need(c.backend in BACKENDS, f"backend: must be one of {sorted(BACKENDS)}, got {c.backend!r}")
    need(c.checkpoint_every % c.eval_every == 0,
         f"checkpoint_every: must be a multiple of eval_every={c.eval_every}, got {c.checkpoint_every}")
    return [e for e in errs if e]


def _has_type(v, tp):
    if typing.get_origin(tp) is typing.Union:
        return any(_has_type(v, t) for t in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, tp)


def _type_name(tp):
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return "None" if tp is type(None) else tp.__name__


def parse_value(name, text):
    """Convert the override text for field ``name`` to the field's type.
    Raises ConfigError for unknown fields or text of the wrong type."""
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise ConfigError(_unknown_field_message(name))
    tp = hints[name]
    options = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    s = str(text).strip()
    if type(None) in options and s.lower() in ("none", "null", "off"):
        return None
    for t in options:
        if t is bool:
            if s.lower() in ("true", "yes", "1", "on"):
                return True
            if s.lower() in ("false", "no", "0", "off"):
                return False
        elif t is int:
            try:
                return int(s.replace("_", ""))
            except ValueError:
                try:  # allow 5e4 or 2000.0 when the value is integral
                    f = float(s)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        elif t is float:
            try:
                return float(s)
            except ValueError:
                pass
        elif t is str:
            return s
    raise ConfigError(f"{name}: cannot read {text!r} as {_type_name(tp)}")


def _unknown_field_message(name):
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown config field {name!r}{hint}; known fields: {', '.join(names)}"


def apply_overrides(cfg, overrides):
    """A new config with ``overrides`` (a mapping field -> value or text) applied.
    Texts are converted by the field's type; every problem is reported before any work."""
    values, errs = {}, []
    for k, v in overrides.items():
        try:
            values[k] = parse_value(k, v) if isinstance(v, str) else v
        except ConfigError as exc:
            errs.append(str(exc))
    if errs:
        raise ConfigError("invalid override(s):\n  " + "\n  ".join(errs))
    return dataclasses.replace(cfg, **values)


def parse_set_args(pairs):
    """['steps=2000', 'lr=5e-4'] -> {'steps': '2000', 'lr': '5e-4'}."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


def config_from_dict(d):
    """A config from its JSON dict (unknown keys refused)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}")
    return TrainConfig(**d)


def check_backend_available(name):
    """Import the backend now, so a missing one fails before any work, with the reason."""
    try:
        mod = get_backend(name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"backend {name!r} is not available in this build ({exc}); "
                          f"use backend=numpy") from exc
    except ImportError as exc:
        raise ConfigError(f"backend {name!r} cannot be imported: {exc}; use backend=numpy") from exc
    if not hasattr(mod, "make_stepper"):
        raise ConfigError(f"backend {name!r} has no make_stepper(); it cannot train yet")
    if hasattr(mod, "check_available"):
        try:
            mod.check_available()
        except (RuntimeError, ImportError, OSError) as exc:
            raise ConfigError(f"backend {name!r} cannot run here: {exc}") from exc
    return mod


# --------------------------------------------------------------------------------------
# Named experiments (paper-settings.md sections 5 and 7)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    config: TrainConfig


def _exp(name, description, **fields):
    return Experiment(name, description, TrainConfig(experiment=name, **fields))


EXPERIMENTS = {e.name: e for e in [
    _exp("one_layer",
         "One LSA layer (K=1, one head), the paper's Fig. 2: reaches the GD-1 loss, aligns with GD, "
         "weights equal the Prop. 1 construction up to scale. Adam lr 1e-3, clip 0.001, 5000 steps.",
         n_layers=1, steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("two_heads",
         "One layer with two heads (K=1, H=2), otherwise as one_layer. The paper reports that two heads remove the "
         "early plateau some one-head seeds show (with batch 2048 we saw no plateau on 5 one-head seeds).",
         n_layers=1, heads=2, steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("recurrent2",
         "Two weight-tied layers (recurrent K=2), the paper's Fig. 4: below GD-2, near GD++ (shared eta, gamma). "
         "lr 1e-3, clip 0.001, 5000 steps.",
         n_layers=2, recurrent=True, steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("recurrent10",
         "Ten weight-tied layers (recurrent K=10) vs GD-10 and shared GD++. lr 5e-4, clip 10, token clip 10 "
         "(the code's rule for K > 3), 5000 steps.",
         n_layers=10, recurrent=True, steps=5000, lr=5e-4, grad_clip=10.0, token_clip=10.0),
    _exp("layers5",
         "Five separate layers (non-recurrent K=5) vs per-layer GD++. lr 5e-4, clip 10, token clip 10, "
         "50,000 steps; GD++ meta-trained 30,000 steps per layer as in the paper.",
         n_layers=5, recurrent=False, steps=50_000, lr=5e-4, grad_clip=10.0, token_clip=10.0,
         gdpp_steps=30_000, checkpoint_every=1000),
]}


def get_experiment(name):
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown experiment {name!r}{hint}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


# --------------------------------------------------------------------------------------
# Task sets and baselines
# --------------------------------------------------------------------------------------

def eval_tasks(cfg):
    """The fixed evaluation set (float64; independent of the training seed)."""
    return cfg.task_spec(cfg.eval_tasks).sample(np.random.default_rng([cfg.eval_seed, _EVAL]))


def _cast(tasks, dtype):
    return type(tasks)(*(a.astype(dtype) for a in tasks))


class GDPPParams(NamedTuple):
    """What Adam meta-trains for GD++: the entries of the construction's P."""
    a: object      # (L,) a = eta / N, the y-block of P; L = 1 (shared) or K
    gamma: object  # (L,) curvature corrections, minus the x-block of P


def gdpp_loss_and_grads(tasks, etas, gammas, recurrent, loss_and_grads_fn=loss_and_grads):
    """Loss of the GD++ construction on ``tasks`` and its gradient in (eta, gamma).

    Forward: the model of ``analysis.gdpp_params`` (gdpp_layer weights); backward: the
    hand-written model backward gives dP per layer, chained through
    P = diag(-gamma I_d, (eta/N) I_y):  deta = tr(dP_yy) / N,  dgamma = -tr(dP_xx).
    ``recurrent``: one shared layer applied len(etas) times (all etas and gammas equal);
    its dP already sums the applications, so deta and dgamma have length 1.
    ``loss_and_grads_fn``: the reference's (default) or a backend's, same signature.
    Returns (L, deta (L,), dgamma (L,)).
    """
    B, N, d = tasks.X.shape
    d_y = tasks.Y.shape[2]
    params, arch = A.gdpp_params(d, d_y, N, etas, gammas, recurrent, dtype=tasks.X.dtype)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)                                # (B, T, D)
    L, dparams, _ = loss_and_grads_fn(E, tasks.y_q, params, arch, d)
    deta = np.array([np.trace(g.P[0, d:, d:]) / N for g in dparams])             # (L,)
    dgamma = np.array([-np.trace(g.P[0, :d, :d]) for g in dparams])              # (L,)
    return float(L), deta, dgamma


def meta_train_gdpp(cfg, eta0, log=None):
    """Adam on GD++'s (eta, gamma) (paper-settings.md section 4), in float64.

    Shared (one pair) when ``cfg.gdpp_shared``, one pair per layer otherwise.
    Initialised at eta = eta0 (the GD-K line search), gamma = eta0 / N^2. Adam acts on
    the entries of P, a = eta / N and gamma (dL/da = N dL/deta): Adam moves every
    coordinate by about lr per step whatever its scale, and with eta itself as the
    coordinate 1000 steps at lr 1e-3 move eta by at most ~1, too little to leave the
    line-search value (measured for recurrent K=2: eta 6.0 -> 6.96, loss 0.146; on P's
    entries: eta 12.6, gamma 0.167, loss 0.114 after 1000 steps, the paper's gamma 0.179
    at convergence). Tasks of step s come from default_rng([eval_seed, GDPP tag, s + 1]),
    independent of the training seed. The forward and backward run on the configured
    backend's ``loss_and_grads`` when it takes host arrays (numpy, numba), else on the
    reference. Returns (etas (K,), gammas (K,), last loss)."""
    K, N = cfg.n_layers, cfg.N
    lag = get_backend(cfg.backend).loss_and_grads if cfg.backend in HOST_BACKENDS else loss_and_grads
    n = 1 if cfg.gdpp_shared else K
    p = (GDPPParams(np.full(n, float(eta0) / N), np.full(n, float(eta0) / N ** 2)),)
    hp = AdamHP(lr=cfg.gdpp_lr, b1=0.9, b2=cfg.gdpp_b2, eps=1e-8, clip_norm=None)
    state = adam_init(p)
    spec = cfg.task_spec(cfg.gdpp_batch)
    L = float("nan")
    for s in range(cfg.gdpp_steps):
        t = spec.sample(np.random.default_rng([cfg.eval_seed, _GDPP, s + 1]))
        etas, gammas = _expand(p[0], K, N)
        L, de, dg = gdpp_loss_and_grads(t, etas, gammas, recurrent=cfg.gdpp_shared, loss_and_grads_fn=lag)
        if not np.isfinite(L):
            raise TrainingDiverged(f"GD++ meta-training diverged at step {s + 1} (loss {L})", s + 1)
        # chain rule to P's entries: a = eta / N, so dL/da = N dL/deta
        p, state, _ = adam_update(p, (GDPPParams(N * de, dg),), state, hp)
        if log is not None and (s + 1) % max(1, cfg.gdpp_steps // 10) == 0:
            log(s + 1, L)
    etas, gammas = _expand(p[0], K, N)
    return np.asarray(etas), np.asarray(gammas), L


def _expand(p, K, N):
    """Per-step (etas, gammas) lists of length K from shared (length-1) or per-layer GDPPParams."""
    eta, gamma = N * np.asarray(p.a), np.asarray(p.gamma)
    if eta.size == 1:
        return [float(eta[0])] * K, [float(gamma[0])] * K
    return [float(e) for e in eta], [float(g) for g in gamma]


def compute_baselines(cfg, evals, log=None):
    """GD-K (line-searched eta), GD++ (meta-trained), least squares, on the eval set."""
    t0 = time.perf_counter()
    K = cfg.n_layers
    ls = cfg.task_spec(cfg.line_search_tasks).sample(np.random.default_rng([cfg.eval_seed, _LINE_SEARCH]))
    eta, _ = line_search_eta(ls.X, ls.Y, ls.x_q, ls.y_q, n_steps=K)
    pred_gd, _ = A.gd_reference(evals, eta, K)
    gd_loss = A.mean_loss(pred_gd, evals.y_q)
    if log:
        log(f"baselines: GD-{K} eta {eta:.3f} (line search on {cfg.line_search_tasks} tasks), eval loss {gd_loss:.5f}")
    gdpp_log = None
    if log and cfg.gdpp_steps >= 2000:
        def gdpp_log(s, L):
            log(f"baselines: GD++ meta-training step {s}/{cfg.gdpp_steps}, batch loss {L:.5f}")
    etas, gammas, _ = meta_train_gdpp(cfg, eta, log=gdpp_log)
    gdpp_loss = A.mean_loss(gdpp_predict(evals.X, evals.Y, evals.x_q, etas, gammas), evals.y_q)
    ls_loss = A.mean_loss(least_squares_predict(evals.X, evals.Y, evals.x_q), evals.y_q)
    if log:
        log(f"baselines: GD++ ({'shared' if cfg.gdpp_shared else 'per layer'}, {cfg.gdpp_steps} Adam steps on P) "
            f"eta {np.round(etas, 3).tolist()} gamma {np.round(gammas, 4).tolist()}, eval loss {gdpp_loss:.5f}; "
            f"least squares {ls_loss:.5f} ({time.perf_counter() - t0:.0f} s)")
    return {"gd_eta": float(eta), "gd_loss": gd_loss, "gdpp_etas": [float(e) for e in etas],
            "gdpp_gammas": [float(g) for g in gammas], "gdpp_loss": gdpp_loss, "lstsq_loss": ls_loss,
            "seconds": round(time.perf_counter() - t0, 2)}


class References(NamedTuple):
    """Predictions and implicit linear models of GD and GD++ on the eval set."""
    gd: tuple    # (pred (B, d_y), g (B, d_y, d))
    gdpp: tuple


def references(cfg, evals, baselines):
    gd = A.gd_reference(evals, baselines["gd_eta"], cfg.n_layers)
    gdpp = A.gdpp_reference(evals, baselines["gdpp_etas"], baselines["gdpp_gammas"])
    return References(gd, gdpp)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

def evaluate(params, cfg, E_eval, evals, refs):
    """Eval loss and the alignment metrics against GD and GD++ (one forward+backward)."""
    pred, g = A.sensitivity(E_eval, params, cfg.arch(), cfg.d)
    row = {"loss": A.mean_loss(pred, evals.y_q)}
    for name, (p_ref, g_ref) in (("gd", refs.gd), ("gdpp", refs.gdpp)):
        for k, v in A.alignment(pred, g, p_ref, g_ref).items():
            row[f"{k}_{name}"] = v
    return row


def init_params(cfg):
    """The paper's initialisation (lsa.init_lsa_params, scale init_scale / K), from
    default_rng([seed, INIT tag]). Returns a tuple of LSAParams (one per distinct layer)."""
    rng = np.random.default_rng([cfg.seed, _INIT])
    arch = cfg.arch()
    return tuple(init_lsa_params(rng, cfg.D, H=cfg.heads, n_layers_for_scale=cfg.n_layers, scale=cfg.init_scale,
                                 dtype=cfg.np_dtype) for _ in range(arch.n_param_layers))


def params_finite(params):
    """True when every parameter array (NumPy or CuPy; None entries skipped) is finite.
    Runs every training step: NumPy arrays are checked one by one (no stacking), CuPy
    arrays with a single device-to-host transfer."""
    arrays = [a for layer in params for a in layer if a is not None]
    xp = get_xp(*arrays)
    if xp is np:
        return all(bool(np.isfinite(a).all()) for a in arrays)
    return bool(xp.stack([xp.isfinite(a).all() for a in arrays]).all())


def host_params(params):
    """The parameters as host NumPy arrays (CuPy arrays are copied; NumPy ones returned as is)."""
    return tuple(type(layer)(*(to_numpy(a) for a in layer)) for layer in params)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

# fields that may differ between a checkpoint and the config resuming it: they do not
# change the trajectory (steps only decides where the run stops).
RESUME_MAY_CHANGE = ("steps", "checkpoint_every")


def save_checkpoint(path, cfg, step, params, state, extra):
    """Write a checkpoint atomically: a temp file in the same folder, then os.replace.

    Plain .npz (readable without this code): format_version, config (JSON), step,
    params.{layer}.{W_Q,W_K,W_V,P}, adam.m.*, adam.v.*, adam.t, extra (JSON)."""
    arrays = {"format_version": np.array(FORMAT_VERSION), "config": np.array(cfg.to_json()),
              "step": np.array(step), "adam.t": np.array(state.t), "extra": np.array(json.dumps(extra))}
    for prefix, tree in (("params", params), ("adam.m", state.m), ("adam.v", state.v)):
        for i, layer in enumerate(tree):
            for name, a in zip(layer._fields, layer):
                arrays[f"{prefix}.{i}.{name}"] = to_numpy(a)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".ckpt-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Checkpoint(NamedTuple):
    config: TrainConfig
    step: int
    params: tuple
    state: AdamState
    extra: dict


def load_checkpoint(path, expect_config=None):
    """Read a checkpoint; refuse it (CheckpointError, with the reason) if it cannot be
    read, has another format version, or was written by a different configuration
    (fields other than RESUME_MAY_CHANGE)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if "format_version" not in files:
                raise CheckpointError(f"{path}: not an icgd checkpoint (no format_version)")
            version = int(z["format_version"])
            if version != FORMAT_VERSION:
                raise CheckpointError(f"{path}: checkpoint format version {version}, this code reads version "
                                      f"{FORMAT_VERSION}; retrain, or use the code that wrote it")
            cfg = config_from_dict(json.loads(str(z["config"])))
            step = int(z["step"])
            n = cfg.arch().n_param_layers

            def tree(prefix):
                return tuple(LSAParams(*(np.array(z[f"{prefix}.{i}.{f}"]) for f in LSAParams._fields))
                             for i in range(n))

            params = tree("params")
            state = AdamState(tree("adam.m"), tree("adam.v"), int(z["adam.t"]))
            extra = json.loads(str(z["extra"]))
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError, ConfigError,
            TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not params_finite(params):
        raise CheckpointError(f"{path}: checkpoint holds non-finite parameters")
    if expect_config is not None:
        diff = config_differences(cfg, expect_config)
        if diff:
            raise CheckpointError(f"{path}: checkpoint was written by a different configuration: " + "; ".join(diff)
                                  + f" (only {', '.join(RESUME_MAY_CHANGE)} may change on --resume)")
        if step > expect_config.steps:
            raise CheckpointError(f"{path}: checkpoint is at step {step}, beyond steps={expect_config.steps}")
    return Checkpoint(cfg, step, params, state, extra)


def config_differences(a, b, ignore=RESUME_MAY_CHANGE):
    return [f"{f.name}: checkpoint {getattr(a, f.name)!r} vs now {getattr(b, f.name)!r}"
            for f in dataclasses.fields(TrainConfig)
            if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)]


# --------------------------------------------------------------------------------------
# Files of a run directory
# --------------------------------------------------------------------------------------

CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE = "config.json", "metrics.jsonl", "checkpoint.npz", "summary.json"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, SUMMARY_FILE)


def read_metrics(path):
    """The rows of a metrics.jsonl file (a truncated last line is dropped)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


class _Metrics:
    """metrics.jsonl, appended line by line (or in memory only when there is no run dir)."""

    def __init__(self, path, rows=()):
        self.path, self.rows = path, list(rows)
        if path is not None:
            write_text_atomic(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in self.rows))

    def add(self, row):
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(_jsonable(row)) + "\n")


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------

class Progress:
    """A plain-text progress bar on stderr with the current loss. On a terminal it
    redraws one line (at most 4 times a second); otherwise it prints a line every 10%."""

    def __init__(self, total, start=0, stream=None, enabled=True):
        self.total, self.start = total, start
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.last_decile = -1

    def update(self, step, loss, extra=""):
        if not self.enabled:
            return
        now = time.perf_counter()
        frac = step / self.total
        decile = int(frac * 10)
        if self.tty and now - self.last_draw < 0.25 and step != self.total:
            return
        if not self.tty and decile == self.last_decile and step != self.total:
            return
        self.last_draw, self.last_decile = now, decile
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        text = (f"[{bar}] step {step}/{self.total}  loss {loss:.5f}{extra}  "
                f"{_fmt_time(now - self.t0)} elapsed, {_fmt_time(left)} left")
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_time(s):
    if not np.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------

class RunResult(NamedTuple):
    config: TrainConfig
    params: tuple
    baselines: dict
    history: list     # the 'eval' rows
    summary: dict
    run_dir: Optional[str]


def train(cfg, out_dir=None, *, resume=False, overwrite=False, progress=True, log=None, analyses=True,
          _fault=None):
    """Train ``cfg`` and return a :class:`RunResult`.

    ``out_dir``: the run directory (None: nothing is written). ``resume``: continue from
    its checkpoint (refused if the checkpoint is unreadable or from another config).
    Without resume an existing run in ``out_dir`` is refused unless ``overwrite``.
    ``progress``: the stderr progress bar. ``log``: a function for one-line messages
    (default: stderr when progress is on). ``analyses``: run the final analyses.
    ``_fault``: test hook ``fn(step, StepResult) -> StepResult`` applied after each step.
    Raises ConfigError before any work, TrainingDiverged on a non-finite loss or
    parameters (the last good checkpoint is kept), CheckpointError on a bad resume.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    backend = check_backend_available(cfg.backend)
    paths = {k: (None if out_dir is None else os.path.join(out_dir, k)) for k in RUN_FILES}
    ckpt_path = paths[CHECKPOINT_FILE]

    if resume:
        if out_dir is None:
            raise ConfigError("resume needs a run directory")
        ck = load_checkpoint(ckpt_path, expect_config=cfg)
        params, state, step, baselines = ck.params, ck.state, ck.step, ck.extra["baselines"]
        elapsed0 = float(ck.extra.get("seconds", 0.0))
        old = read_metrics(paths[METRICS_FILE])
        rows = [r for r in old if r.get("kind") == "baselines" or (r.get("kind") == "eval" and r["step"] <= step)]
        log(f"resuming {out_dir} at step {step} of {cfg.steps}")
    else:
        if out_dir is not None:
            existing = [k for k in RUN_FILES if os.path.exists(paths[k])]
            if existing and not overwrite:
                raise ConfigError(f"{out_dir} already holds a run ({', '.join(existing)}); pass resume to continue "
                                  "it, or choose another output directory")
            for k in existing:
                os.unlink(paths[k])
        params, step, elapsed0, rows = init_params(cfg), 0, 0.0, []
        state = adam_init(params)
        baselines = None

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        write_text_atomic(paths[CONFIG_FILE], cfg.to_json())
    dtype = cfg.np_dtype
    evals = eval_tasks(cfg)
    if baselines is None:
        baselines = compute_baselines(cfg, evals, log=log)
        rows = [dict(kind="baselines", **baselines)]
    metrics = _Metrics(paths[METRICS_FILE], rows)
    refs = references(cfg, evals, baselines)
    evals_m = _cast(evals, dtype)
    E_eval = build_tokens(evals_m.X, evals_m.Y, evals_m.x_q)                     # (B_eval, T, D)
    t_start = time.perf_counter()

    def seconds():
        return round(elapsed0 + time.perf_counter() - t_start, 2)

    def extra():
        return {"baselines": baselines, "seconds": seconds()}

    def eval_row(step_, train_loss, grad_norm):
        row = {"kind": "eval", "step": step_, **evaluate(host_params(params), cfg, E_eval, evals, refs),
               "train_loss": train_loss, "grad_norm": grad_norm, "seconds": seconds()}
        if not np.isfinite(row["loss"]):
            _diverged(step_, row["loss"], True)
        metrics.add(row)
        return row

    last_ckpt = [step if resume else None]

    def _diverged(step_, loss, finite_params, grad_norm=None):
        where = ""
        if ckpt_path is not None and last_ckpt[0] is not None:
            where = f"; the last good checkpoint (step {last_ckpt[0]}) is kept at {ckpt_path}"
        elif ckpt_path is not None:
            where = "; no checkpoint had been written yet"
        what = [f"loss {loss}"]
        if grad_norm is not None and not np.isfinite(grad_norm):
            what.append(f"gradient norm {grad_norm}")
        if not finite_params:
            what.append("non-finite parameters")
        raise TrainingDiverged(f"training diverged at step {step_} of {cfg.steps}: {', '.join(what)}{where}. "
                               "Lower lr or set grad_clip.", step_, last_ckpt[0])

    if not resume:
        eval_row(0, None, None)
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, cfg, 0, params, state, extra())
            last_ckpt[0] = 0

    arch, hp, spec = cfg.arch(), cfg.adam_hp(), cfg.task_spec()
    stepper = backend.make_stepper(arch, hp, spec, cfg.seed, dtype)
    bar = Progress(cfg.steps, start=step, enabled=progress)
    losses, norms = [], []
    gd_text = f" (GD-{cfg.n_layers} {baselines['gd_loss']:.4f}, GD++ {baselines['gdpp_loss']:.4f})"
    eval_text = ""
    while step < cfg.steps:
        res = stepper.step(params, state, step)
        if _fault is not None:
            res = _fault(step, res)
        step += 1
        loss, gnorm = float(res.loss), float(res.grad_norm)
        finite = params_finite(res.params)
        if not (np.isfinite(loss) and np.isfinite(gnorm) and finite):
            _diverged(step, loss, finite, gnorm)
        params, state = res.params, res.state
        losses.append(loss)
        norms.append(gnorm)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = eval_row(step, float(np.mean(losses)), float(np.mean(norms)))
            eval_text = f", eval {row['loss']:.5f}, cos(GD) {row['model_cos_gd']:.3f}"
            losses, norms = [], []
        if ckpt_path is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(ckpt_path, cfg, step, params, state, extra())
            last_ckpt[0] = step
        bar.update(step, loss, eval_text + gd_text)
    bar.close()
    params = host_params(params)

    history = [r for r in metrics.rows if r.get("kind") == "eval"]
    summary = {"experiment": cfg.experiment, "steps": cfg.steps, "seed": cfg.seed, "baselines": baselines,
               "final": history[-1] if history else None, "seconds": seconds()}
    if analyses:
        t0 = time.perf_counter()
        summary.update(final_analyses(cfg, params, baselines, evals))
        summary["analysis_seconds"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        write_text_atomic(paths[SUMMARY_FILE], json.dumps(_jsonable(summary), indent=1) + "\n")
    return RunResult(cfg, params, baselines, history, summary, out_dir)


# --------------------------------------------------------------------------------------
# Final analyses
# --------------------------------------------------------------------------------------

def _construction_layers(cfg, baselines, dtype):
    """The construction each trained layer is compared with: GD (Prop. 1) for one layer,
    the GD++ layer (meta-trained eta_k, gamma_k) for deeper models."""
    if cfg.n_layers == 1:
        return [A.gd_construction_layer(cfg.d, cfg.d_y, cfg.N, baselines["gd_eta"], dtype=dtype)]
    from .constructions import gdpp_layer
    etas, gammas = baselines["gdpp_etas"], baselines["gdpp_gammas"]
    n = cfg.arch().n_param_layers
    return [gdpp_layer(cfg.d, cfg.d_y, cfg.N, etas[k], gammas[k], dtype=dtype) for k in range(n)]


def final_analyses(cfg, params, baselines, evals):
    """Weights vs construction, interpolation, OOD sweeps, roll-out. Returns a dict."""
    out = {}
    dtype = cfg.np_dtype
    evals_m = _cast(evals, dtype)
    E = build_tokens(evals_m.X, evals_m.Y, evals_m.x_q)
    consts = _construction_layers(cfg, baselines, np.float64)
    out["construction"] = "gd" if cfg.n_layers == 1 else "gdpp"
    if cfg.heads == 1:
        out["weights"] = [A.construction_match(p, c, cfg.d) for p, c in zip(params, consts)]
        out["interpolation"] = _interpolation(cfg, params, baselines, evals, E)
    out["products"] = [{"W_KQ": A.layer_products(p)[0].tolist(), "W_PV": A.layer_products(p)[1].tolist()}
                       for p in params]
    out["ood"] = ood_sweeps(cfg, params, baselines)
    if cfg.n_layers == 1:
        rr = cfg.task_spec(cfg.ood_tasks).sample(np.random.default_rng([cfg.eval_seed, _ROLLOUT]))
        out["rollout"] = {
            "model": A.rollout_losses(params[0], _cast(rr, dtype), cfg.rollout_steps, cfg.rollout_damping,
                                      clip=cfg.token_clip).tolist(),
            "gd": A.damped_gd_losses(rr, baselines["gd_eta"], cfg.rollout_steps, cfg.rollout_damping).tolist(),
            "damping": cfg.rollout_damping}
    return out


def _interpolation(cfg, params, baselines, evals, E):
    """Loss of the model averaged (t = 0.5) with its construction, in the model's arch.

    Only meaningful when the model's architecture can represent the construction: with
    token clipping the construction's tokens may exceed the clip (per-layer GD++ with
    large step sizes does), and then the construction inside the clipped arch is another
    function; the analysis is skipped with that reason."""
    arch, dtype = cfg.arch(), cfg.np_dtype
    consts_m = tuple(_construction_layers(cfg, baselines, dtype))
    out_c, cache_c = model_forward(E, consts_m, lsa_stack(arch.n_layers, recurrent=arch.recurrent))
    res = {"loss_construction": A.mean_loss(readout(out_c, cfg.d), evals.y_q)}
    peak = max(float(np.max(np.abs(o))) for o in cache_c.outputs)
    if arch.clip is not None and peak > arch.clip:
        res["skipped"] = (f"the construction's tokens reach {peak:.3g}, beyond the token clip {arch.clip:g}: the "
                          "clipped architecture cannot represent it")
        return res
    interp = tuple(A.interpolate(p, c, cfg.d, 0.5) for p, c in zip(params, consts_m))
    pred_i, _ = A.sensitivity(E, interp, arch, cfg.d)
    pred_m, _ = A.sensitivity(E, params, arch, cfg.d)
    res.update(loss_interpolated=A.mean_loss(pred_i, evals.y_q), loss_model=A.mean_loss(pred_m, evals.y_q))
    return res


def ood_sweeps(cfg, params, baselines, input_scales=None, teacher_scales=None):
    """Loss of the model, GD-K, GD++ and least squares as the input range or the teacher
    scale is multiplied by alpha (the paper's grids by default), ood_tasks tasks each."""
    input_scales = A.INPUT_SCALES if input_scales is None else np.asarray(input_scales)
    teacher_scales = A.TEACHER_SCALES if teacher_scales is None else np.asarray(teacher_scales)
    arch, dtype, K = cfg.arch(), cfg.np_dtype, cfg.n_layers
    res = {}
    for ki, (kind, scales) in enumerate((("input", input_scales), ("teacher", teacher_scales))):
        rows = {"alpha": [float(a) for a in scales], "model": [], "gd": [], "gdpp": [], "lstsq": []}
        for ai, alpha in enumerate(scales):
            rng = np.random.default_rng([cfg.eval_seed, _OOD, ki + 1, ai + 1])
            t = A.ood_tasks(rng, cfg.ood_tasks, cfg.d, cfg.N, cfg.d_y, kind, float(alpha), np.float64,
                            base_range=(cfg.x_low, cfg.x_high))
            tm = _cast(t, dtype)
            pred, _ = A.sensitivity(build_tokens(tm.X, tm.Y, tm.x_q), params, arch, cfg.d)
            rows["model"].append(A.mean_loss(pred, t.y_q))
            rows["gd"].append(A.mean_loss(A.gd_reference(t, baselines["gd_eta"], K)[0], t.y_q))
            rows["gdpp"].append(A.mean_loss(gdpp_predict(t.X, t.Y, t.x_q, baselines["gdpp_etas"],
                                                         baselines["gdpp_gammas"]), t.y_q))
            rows["lstsq"].append(A.mean_loss(least_squares_predict(t.X, t.Y, t.x_q), t.y_q))
        res[kind] = rows
    return res


def load_result(run_dir):
    """The :class:`RunResult` of a finished run directory (as :func:`train` returned it)."""
    cfg, params, rows, summary = load_run(run_dir)
    if summary is None or params is None:
        raise CheckpointError(f"{run_dir}: not a finished run (no summary.json or checkpoint.npz)")
    base = next((r for r in rows if r.get("kind") == "baselines"), None)
    base = {k: v for k, v in base.items() if k != "kind"} if base else summary.get("baselines")
    return RunResult(cfg, params, base, [r for r in rows if r.get("kind") == "eval"], summary, run_dir)


def train_to_dir(cfg_dict, out_dir):
    """Train a config given as a dict into ``out_dir`` (overwriting) without progress
    output; returns out_dir. A picklable entry point for worker processes."""
    train(config_from_dict(cfg_dict), out_dir, overwrite=True, progress=False)
    return out_dir


def load_run(run_dir):
    """(config, checkpoint params or None, metrics rows, summary or None) of a run directory."""
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        cfg = config_from_dict(json.load(f))
    ck_path = os.path.join(run_dir, CHECKPOINT_FILE)
    params = load_checkpoint(ck_path).params if os.path.exists(ck_path) else None
    rows = read_metrics(os.path.join(run_dir, METRICS_FILE))
    sp = os.path.join(run_dir, SUMMARY_FILE)
    summary = None
    if os.path.exists(sp):
        with open(sp) as f:
            summary = json.load(f)
    return cfg, params, rows, summary
