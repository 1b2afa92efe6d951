"""What a training run depends on: one frozen, grouped configuration.

    TrainConfig(experiment, seed, steps, dtype, backend,
                data=DataConfig(...), model=ModelConfig(...), optim=OptimConfig(...),
                eval=EvalConfig(...), baselines=BaselineConfig(...), analysis=AnalysisConfig(...))

Defaults: the one-layer experiment of the official code (paper-settings.md sections 1,
4, 5). Every field has a unique name across the groups (its "flat" name, e.g. ``lr``,
``eval_tasks``), which is how the command line and version-1 ``config.json`` files
address it; ``optim.lr`` is its dotted name. Every problem with a config is reported
at construction (:class:`ConfigError`, all at once, each naming the field).

The objects a run derives from a config (:meth:`TrainConfig.arch`,
:meth:`TrainConfig.task_spec`, :meth:`TrainConfig.adam_hp`, :meth:`TrainConfig.layout`)
are what a port needs to reproduce a run; parsing of command-line text lives in the
application (``verify``).
"""

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .backends import DEFAULT_TRAIN_BACKEND, SEQ_BACKENDS, backend_names, layout_support, seq_support
from .classic_tokens import TOKEN_KINDS, classic_layout
from .layers import LayerSpec
from .model import Arch, lsa_stack
from .optim import AdamHP
from .tasks import SINE_PHASES, SineTaskSpec, TaskSpec

MAX_STEPS = 2 ** 31


class ConfigError(ValueError):
    """A configuration value or override is invalid (raised before any work)."""


@dataclass(frozen=True)
class DataConfig:
    """Regression tasks: inputs U(x_low, x_high)^d, teacher W ~ w_scale N(0, I) (d_y x d),
    label noise noise_std, n_distractors context labels replaced by noise; N context
    pairs; batch fresh tasks per training step.

    task: ``"linear"`` (the above) or ``"sine"`` (``tasks.sample_sine_tasks``: d = d_y = 1,
    y = a sin(x + rho), a ~ U(amp_low, amp_high), rho ~ U(0, pi), tied to a through one
    draw when sine_phase is ``"tied"`` (the code) or drawn separately when
    ``"independent"`` (the paper's text); x ~ U(x_low, x_high)). The amp and phase fields
    are read by the sine task only and must keep their defaults otherwise.

    tokens: ``"constructed"`` (one token (x_i, y_i) per pair, the query (x_q, 0): the
    layouts of ``reference.tokens``) or ``"classic"`` (``reference.classic_tokens``:
    x_1, (0, y_1), ..., x_N, (0, y_N), x_q, 2N+1 tokens of width d, d_y <= d; positional
    encodings are a layer of ``model.layers``; trained by the backends whose
    ``backends.LAYOUT_KINDS`` lists "classic").

    task ``"lds"`` (the mesa paper's sequences, ``reference.sequences``, trained by
    ``reference.seq_training``): batch sequences of seq_len observations of the
    linear dynamical system ``seq_variant`` (one of ``sequences.VARIANTS``), hidden
    dimension seq_dim (None: the variant's default), on the code's constructed tokens
    [0, x_t, x_t, x_{t-1}]; d, N, d_y and the regression/sine fields are not read and
    must keep their defaults. seq_* are read by the lds task only."""

    d: int = 10
    N: int = 10
    d_y: int = 1
    batch: int = 2048
    x_low: float = -0.5
    x_high: float = 0.5
    w_scale: float = 1.0
    noise_std: float = 0.0
    n_distractors: int = 0
    task: str = "linear"
    amp_low: float = 0.1
    amp_high: float = 0.5
    sine_phase: str = "tied"
    tokens: str = "constructed"
    seq_variant: str = "linear"
    seq_len: int = 50
    seq_dim: Optional[int] = None


@dataclass(frozen=True)
class ModelConfig:
    """A stack of n_layers LSA layers (weight-tied when recurrent). Every lsa option is a
    field: heads, key_size / value_size (None: D), merged parameterisation, causal
    attention, token_clip (clip tokens to [-c, c] after every layer; None = off; the
    code uses 10 when K > 3). init_scale: variance scaling scale / K over fan-in.

    layers (None: the LSA stack above): an explicit architecture as JSON text, a list of
    layer dicts (``[{"kind": "pre_ln", "block": "softmax"}, {"kind": "mlp"}]``, separate
    weights) or an ``Arch.to_dict()`` object ``{"layers": [...], "tie": [...]}``. Layers
    may change the token width (an ``embed`` first, as the sine model): tokens are built
    at width d + d_y and the prediction is read from the last d_y features of the query
    at the last layer's width (:meth:`TrainConfig.layout`). With it, the LSA fields above keep their defaults
    and n_layers is still the K of the init scale / K and of the GD-K baseline.

    input_mask (lds task only): the first input_mask token channels are zeroed before the
    first layer (the mesa code's one-layer models: 2 d). init_std (None: the variance
    scaling above): every weight matrix drawn from normal(0, init_std) instead (the mesa
    code's 0.0002; a mesa layer's lam still starts at 1)."""

    n_layers: int = 1
    recurrent: bool = False
    heads: int = 1
    key_size: Optional[int] = None
    value_size: Optional[int] = None
    merged: bool = False
    causal: bool = False
    token_clip: Optional[float] = None
    init_scale: float = 0.002
    layers: Optional[str] = None
    input_mask: int = 0
    init_std: Optional[float] = None


@dataclass(frozen=True)
class OptimConfig:
    """Adam (lr, b1, b2, eps) after global-norm clipping at grad_clip (None = off; the
    code uses 0.001 when K <= 2, else 10). weight_decay > 0: AdamW's decoupled decay
    (optax.adamw); elementwise_clip: clip every gradient entry to [-c, c] first
    (optax.clip; None = off). The mesa code: elementwise_clip 1, weight_decay 0.1,
    grad_clip None, b2 0.999 (``reference.optim``). Only the numpy backend runs the last two."""

    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    grad_clip: Optional[float] = 0.001
    weight_decay: float = 0.0
    elementwise_clip: Optional[float] = None


@dataclass(frozen=True)
class EvalConfig:
    """eval_tasks fixed tasks from eval_seed, evaluated every eval_every steps; a
    checkpoint every checkpoint_every steps (a multiple of eval_every). Divergence rule:
    the run stops when the eval loss is above diverge_factor times its reference (the
    larger of the step-0 eval loss and the zero predictor's loss) at diverge_evals
    evaluations in a row."""

    eval_tasks: int = 10_000
    eval_seed: int = 2023
    eval_every: int = 100
    checkpoint_every: int = 500
    diverge_factor: float = 10.0
    diverge_evals: int = 3


@dataclass(frozen=True)
class BaselineConfig:
    """line_search_tasks for the GD eta; GD++ meta-trained by Adam (gdpp_lr, b1 0.9,
    gdpp_b2, eps 1e-8) on gdpp_batch tasks per step for gdpp_steps steps."""

    line_search_tasks: int = 10_000
    gdpp_steps: int = 1000
    gdpp_lr: float = 1e-3
    gdpp_b2: float = 0.999
    gdpp_batch: int = 512


@dataclass(frozen=True)
class AnalysisConfig:
    """ood_tasks tasks per OOD point; a roll-out of rollout_steps damped applications
    (rollout_damping) of a one-layer model."""

    ood_tasks: int = 1000
    rollout_steps: int = 50
    rollout_damping: float = 0.75


TASKS = ("linear", "sine", "lds")
_DATA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)}
_OPTIM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OptimConfig)}

GROUPS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "eval": EvalConfig,
          "baselines": BaselineConfig, "analysis": AnalysisConfig}
TOP_LEVEL = ("experiment", "seed", "steps", "dtype", "backend")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (see the module docstring)."""

    experiment: str = "custom"
    seed: int = 0
    steps: int = 5000
    dtype: str = "float32"
    backend: str = DEFAULT_TRAIN_BACKEND
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self):
        errors = _config_errors(self)
        if errors:
            raise ConfigError("invalid training configuration:\n  " + "\n  ".join(errors))

    # derived objects -------------------------------------------------------------
    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    @property
    def gdpp_shared(self):
        """GD++ has one (eta, gamma) when the model shares its layer (or has one)."""
        return self.model.recurrent or self.model.n_layers == 1

    @property
    def is_sequence(self):
        """True for the mesa paper's sequence task (``data.task == "lds"``)."""
        return self.data.task == "lds"

    def layout(self):
        """The tokens and readout of the run: ``arch().layout(d, d_y)`` (a TokenLayout,
        or an EmbeddedLayout when the layers change the token width); with
        ``data.tokens = "classic"`` a ClassicLayout read at the last layer's width."""
        if self.data.tokens == "classic":
            return classic_layout(self.arch(), self.data.d, self.data.d_y)
        return self.arch().layout(self.data.d, self.data.d_y)

    def seq_token_width(self):
        """lds task: the width 4 d_obs of the code's constructed tokens [0, x_t, x_t, x_{t-1}]."""
        return 4 * self.task_spec(1).d_obs

    def arch(self):
        m = self.model
        if m.layers is not None:
            return arch_from_text(m.layers)
        return lsa_stack(m.n_layers, m.recurrent, m.causal, m.token_clip, heads=m.heads, key_size=m.key_size,
                         value_size=m.value_size, merged=m.merged)

    def task_spec(self, B=None):
        t = self.data
        if t.task == "lds":
            from .sequences import SequenceSpec

            return SequenceSpec(t.seq_variant, T=t.seq_len, B=t.batch if B is None else B, d=t.seq_dim)
        if t.task == "sine":
            return SineTaskSpec(N=t.N, B=t.batch if B is None else B, x_range=(t.x_low, t.x_high),
                                amp_range=(t.amp_low, t.amp_high), phase=t.sine_phase)
        return TaskSpec(d=t.d, N=t.N, d_y=t.d_y, B=t.batch if B is None else B, x_range=(t.x_low, t.x_high),
                        w_scale=t.w_scale, noise_std=t.noise_std, n_distractors=t.n_distractors)

    def adam_hp(self):
        o = self.optim
        return AdamHP(lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.grad_clip, weight_decay=o.weight_decay,
                      clip_value=o.elementwise_clip)

    # names and values ------------------------------------------------------------
    def get(self, name):
        """A field by flat or dotted name."""
        path = field_path(name)
        obj = self
        for part in path:
            obj = getattr(obj, part)
        return obj

    def to_dict(self):
        """Grouped dict (what config.json holds, with ``format_version`` 2 added by the writer)."""
        return dataclasses.asdict(self)

    def leaf(self, group, name):
        """The value of field ``name`` of ``group`` (None: a top-level field)."""
        return getattr(self, name) if group is None else getattr(getattr(self, group), name)

    def flat_dict(self):
        """{flat name: value} over every field."""
        return {name: self.leaf(g, name) for (g, name) in LEAVES}

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **values):
        """A new config with fields replaced, by flat or dotted name (already typed values)."""
        top, groups = {}, {g: {} for g in GROUPS}
        for name, v in values.items():
            path = field_path(name)
            if len(path) == 1:
                top[path[0]] = v
            else:
                groups[path[0]][path[1]] = v
        for g, vals in groups.items():
            if vals:
                top[g] = dataclasses.replace(getattr(self, g), **vals)
        return dataclasses.replace(self, **top)


# ---- field names ------------------------------------------------------------------------

def _leaf_types():
    """{(group or None, name): type} for every leaf field, in declaration order."""
    out = {}
    hints = typing.get_type_hints(TrainConfig)
    for name in TOP_LEVEL:
        out[(None, name)] = hints[name]
    for g, cls in GROUPS.items():
        for name, tp in typing.get_type_hints(cls).items():
            out[(g, name)] = tp
    return out


LEAVES = _leaf_types()


def flat_names():
    """Every field's flat name, in declaration order."""
    return [name for (_, name) in LEAVES]


def dotted_name(flat):
    """The dotted name of a (unique) flat name."""
    return ".".join(field_path(flat))


def field_path(name):
    """('group', 'field') or ('field',) for a flat or dotted name; ConfigError if the name
    is unknown or, as a flat name, would match fields of several groups."""
    if not isinstance(name, str):
        raise ConfigError(f"config field names are strings, got {name!r}")
    if "." in name:
        g, _, n = name.partition(".")
        if (g, n) in LEAVES:
            return (g, n)
        raise ConfigError(_unknown(name))
    hits = [(g, n) for (g, n) in LEAVES if n == name]
    if not hits:
        raise ConfigError(_unknown(name))
    if len(hits) > 1:
        raise ConfigError(f"config field {name!r} is ambiguous: it names "
                          f"{', '.join(n if g is None else f'{g}.{n}' for g, n in hits)}; use the dotted name")
    g, n = hits[0]
    return (n,) if g is None else (g, n)


def field_type(name):
    path = field_path(name)
    return LEAVES[(None, path[0])] if len(path) == 1 else LEAVES[path]


def _unknown(name):
    import difflib

    names = flat_names() + [dotted_name(n) for n in flat_names()]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown config field {name!r}{hint}; known fields: {', '.join(flat_names())}"


# ---- from dicts (config.json, checkpoints) ----------------------------------------------

def config_from_dict(d):
    """A config from its dict: grouped (format 2) or flat (format 1, every field at the
    top level). Unknown keys are refused."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
    d = {k: v for k, v in d.items() if k != "format_version"}
    if any(g in d and isinstance(d[g], dict) for g in GROUPS):
        unknown = sorted(set(d) - set(TOP_LEVEL) - set(GROUPS))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        kw = {k: d[k] for k in TOP_LEVEL if k in d}
        for g, cls in GROUPS.items():
            sub = d.get(g, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"config group {g!r} must be an object, got {type(sub).__name__}")
            names = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(sub) - names)
            if bad:
                raise ConfigError(f"unknown config field(s) {[f'{g}.{b}' for b in bad]}")
            kw[g] = _build_group(cls, sub)
        return TrainConfig(**kw)
    unknown = sorted(k for k in d if k not in flat_names())
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}")
    return TrainConfig().replace(**d)


def _build_group(cls, values):
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


# ---- validation ---------------------------------------------------------------------------

def _config_errors(c):
    """All problems with a config, as messages naming the field (checked together)."""
    errs = []
    for g, cls in GROUPS.items():
        if not isinstance(getattr(c, g), cls):
            errs.append(f"{g}: expected a {cls.__name__}, got {type(getattr(c, g)).__name__}")
    if errs:
        return errs
    v = {name: c.leaf(g, name) for (g, name) in LEAVES}
    for (g, name), tp in LEAVES.items():
        if not _has_type(v[name], tp):
            errs.append(f"{name}: expected {type_name(tp)}, got {type(v[name]).__name__} {v[name]!r}")
    if errs:
        return errs

    def need(cond, msg):
        if not cond:
            errs.append(msg)

    for name in ("d", "N", "d_y", "batch", "n_layers", "heads", "steps", "eval_tasks", "eval_every",
                 "checkpoint_every", "line_search_tasks", "gdpp_batch", "ood_tasks", "rollout_steps", "diverge_evals"):
        need(v[name] >= 1, f"{name}: must be >= 1, got {v[name]}")
    for name in ("key_size", "value_size"):
        need(v[name] is None or v[name] >= 1, f"{name}: must be >= 1 or None (= D), got {v[name]}")
    for name in ("seed", "eval_seed", "n_distractors", "gdpp_steps", "input_mask"):
        need(v[name] >= 0, f"{name}: must be >= 0, got {v[name]}")
    floats = ("x_low", "x_high", "amp_low", "amp_high", "w_scale", "noise_std", "init_scale", "lr", "b1", "b2", "eps", "gdpp_lr",
              "gdpp_b2", "rollout_damping", "token_clip", "grad_clip", "diverge_factor", "weight_decay",
              "elementwise_clip", "init_std")
    for name in floats:
        need(v[name] is None or np.isfinite(v[name]), f"{name}: must be finite, got {v[name]}")
    if errs:
        return errs
    need(v["steps"] < MAX_STEPS, f"steps: must be < {MAX_STEPS}, got {v['steps']}")
    need(v["n_distractors"] <= v["N"], f"n_distractors: must be <= N={v['N']}, got {v['n_distractors']}")
    need(v["x_low"] < v["x_high"], f"x_low, x_high: need x_low < x_high, got ({v['x_low']}, {v['x_high']})")
    need(v["w_scale"] >= 0, f"w_scale: must be >= 0, got {v['w_scale']}")
    need(v["noise_std"] >= 0, f"noise_std: must be >= 0, got {v['noise_std']}")
    for name in ("init_scale", "lr", "gdpp_lr", "rollout_damping"):
        need(v[name] > 0, f"{name}: must be > 0, got {v[name]}")
    for name in ("b1", "b2", "gdpp_b2"):
        need(0 <= v[name] < 1, f"{name}: must be in [0, 1), got {v[name]}")
    need(v["eps"] > 0, f"eps: must be > 0 (0 gives 0/0 on a zero gradient), got {v['eps']}")
    need(v["diverge_factor"] > 1, f"diverge_factor: must be > 1, got {v['diverge_factor']}")
    for name in ("token_clip", "grad_clip", "elementwise_clip", "init_std"):
        need(v[name] is None or v[name] > 0, f"{name}: must be > 0 or None (off), got {v[name]}")
    need(v["weight_decay"] >= 0, f"weight_decay: must be >= 0, got {v['weight_decay']}")
    for name in ("weight_decay", "elementwise_clip"):
        if v[name] != _OPTIM_DEFAULTS[name]:
            need(v["backend"] == "numpy" or (v["task"] == "lds" and v["backend"] in SEQ_BACKENDS),
                 f"{name}: only the numpy backend implements it (and, for the lds task, the sequence steps of "
                 f"{list(SEQ_BACKENDS)}); set backend=numpy (got backend={v['backend']!r})")
    need(v["task"] in TASKS, f"task: must be one of {TASKS}, got {v['task']!r}")
    need(v["sine_phase"] in SINE_PHASES, f"sine_phase: must be one of {SINE_PHASES}, got {v['sine_phase']!r}")
    need(v["amp_low"] < v["amp_high"], f"amp_low, amp_high: need amp_low < amp_high, got ({v['amp_low']}, {v['amp_high']})")
    if v["task"] == "lds":
        errs += _sequence_errors(c, v)
    else:
        for name in ("seq_variant", "seq_len", "seq_dim", "input_mask"):
            default = _DATA_DEFAULTS.get(name, 0)
            need(v[name] == default, f"{name}: read by the lds task only (task={v['task']!r}); leave it at "
                                     f"{default!r}, got {v[name]!r}")
    if v["task"] == "sine":
        for name in ("d", "d_y"):
            need(v[name] == 1, f"{name}: the sine task has scalar inputs and labels, so {name} must be 1, got {v[name]}")
        for name in ("w_scale", "noise_std", "n_distractors"):
            need(v[name] == _DATA_DEFAULTS[name], f"{name}: not used by the sine task; leave it at "
                                                    f"{_DATA_DEFAULTS[name]!r}, got {v[name]!r}")
    else:
        for name in ("amp_low", "amp_high", "sine_phase"):
            need(v[name] == _DATA_DEFAULTS[name], f"{name}: read by the sine task only (task={v['task']!r}); leave "
                                                    f"it at {_DATA_DEFAULTS[name]!r}, got {v[name]!r}")
    need(v["dtype"] in ("float32", "float64"), f"dtype: must be 'float32' or 'float64', got {v['dtype']!r}")
    need(v["backend"] in backend_names(), f"backend: must be one of {backend_names()}, got {v['backend']!r}")
    need(v["tokens"] in TOKEN_KINDS, f"tokens: must be one of {TOKEN_KINDS}, got {v['tokens']!r}")
    if v["tokens"] == "classic":
        need(v["d_y"] <= v["d"], f"d_y: classic tokens put y_j in the last d_y of d features, so d_y <= d={v['d']} "
                                 f"is needed, got {v['d_y']}")
        need(v["layers"] is not None, "layers: classic tokens need an explicit layer list (the positional encodings "
                                      "are a layer, e.g. [{\"kind\": \"posenc\", \"mode\": \"concat\", \"width\": 10}, ...]); "
                                      "the default LSA stack and its weight analyses read constructed tokens")
        if v["backend"] in backend_names():
            reason = layout_support(v["backend"], "classic")
            need(reason is None, f"backend: {reason}")
    need(v["checkpoint_every"] % v["eval_every"] == 0,
         f"checkpoint_every: must be a multiple of eval_every={v['eval_every']}, got {v['checkpoint_every']}")
    if v["layers"] is not None:
        errs += _layers_errors(c)
    return errs


def _sequence_errors(c, v):
    """Problems with an lds-task config: the unused fields, the sequence fields, the
    backend (one with a sequence step that computes the model), causal attention and the input mask."""
    from .sequences import VARIANTS

    errs = []
    for name in ("d", "N", "d_y", "x_low", "x_high", "w_scale", "noise_std", "n_distractors", "amp_low", "amp_high",
                 "sine_phase", "tokens"):
        if v[name] != _DATA_DEFAULTS[name]:
            errs.append(f"{name}: not used by the lds task (its sizes are seq_variant, seq_dim and seq_len); leave it "
                        f"at {_DATA_DEFAULTS[name]!r}, got {v[name]!r}")
    if v["seq_variant"] not in VARIANTS:
        errs.append(f"seq_variant: must be one of {VARIANTS}, got {v['seq_variant']!r}")
    if v["seq_len"] < 1:
        errs.append(f"seq_len: must be >= 1, got {v['seq_len']}")
    low = 2 if v["seq_variant"] == "contracting" else 1
    if v["seq_dim"] is not None and v["seq_dim"] < low:
        errs.append(f"seq_dim: must be >= {low} or None (the variant's default), got {v['seq_dim']}")
    if v["backend"] not in SEQ_BACKENDS:
        errs.append(f"backend: the lds task trains on the backends with a sequence step, {list(SEQ_BACKENDS)} "
                    f"(reference.seq_training); got {v['backend']!r}")
    if v["layers"] is None and not v["causal"]:
        errs.append("causal: the lds task needs causal attention (token t sees tokens s <= t); set causal=true")
    if errs:
        return errs
    D = c.seq_token_width()
    if v["input_mask"] > D:
        errs.append(f"input_mask: must be <= the token width {D}, got {v['input_mask']}")
    try:
        arch = c.arch()
    except (ValueError, TypeError, KeyError):                         # the layers check names the problem
        arch = None
    if arch is not None and v["backend"] != "numpy":
        reason = seq_support(v["backend"], arch)
        if reason is not None:
            errs.append(f"backend: {reason}")
    return errs

def arch_from_text(text):
    """The :class:`Arch` of a ``model.layers`` JSON text: a list of layer dicts
    (separate weights) or ``{"layers": [...], "tie": [...]}``. Raises ValueError."""
    d = json.loads(text)
    if isinstance(d, list):
        d = {"layers": d, "tie": list(range(len(d)))}
    if not (isinstance(d, dict) and set(d) == {"layers", "tie"} and isinstance(d["layers"], list)
            and all(isinstance(s, dict) and isinstance(s.get("kind"), str) for s in d["layers"])
            and isinstance(d["tie"], list)):
        raise ValueError('expected a list of layer objects {"kind": ..., option: value} or '
                         '{"layers": [...], "tie": [...]}')
    return Arch.from_dict(d)


def _layers_errors(c):
    """Problems with ``model.layers``: its JSON, its layers, and LSA fields set beside it."""
    m = c.model
    try:
        arch = arch_from_text(m.layers)
        classic = c.data.tokens == "classic"
        D = c.data.d if classic else c.data.d + c.data.d_y          # the width of the tokens the layout builds
        T = 2 * c.data.N + 1 if classic else c.data.N + 1
        if c.is_sequence:
            D, T = c.seq_token_width(), c.data.seq_len
        widths = arch.widths(D)
        for s in dict.fromkeys(arch.layers):
            s.check_tokens(T)
    except (ValueError, TypeError, KeyError) as exc:
        return [f"layers: {type(exc).__name__}: {exc}"]
    errs = []
    if c.is_sequence:
        d_obs = D // 4
        if widths[-1] < d_obs:
            errs.append(f"layers: the last layer's token width is {widths[-1]}, the readout needs the first "
                        f"d_obs = {d_obs} channels")
        for k, s in enumerate(arch.layers):
            if s.kind in ("lsa", "softmax") and s.opts.get("causal") is not True:
                errs.append(f"layers: layer {k} ({s.kind}) must be causal for the lds task (option causal: true)")
    elif widths[-1] <= c.data.d_y:
        errs.append(f"layers: the last layer's token width is {widths[-1]}, the readout needs more than "
                    f"d_y = {c.data.d_y} features")
    if arch.param_floats(D) == 0:
        errs.append("layers: the model has no parameters to train")
    lsa_fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                  if f.name in ("recurrent", "heads", "key_size", "value_size", "merged", "causal", "token_clip")}
    changed = [n for n, default in lsa_fields.items() if getattr(m, n) != default]
    if changed:
        errs.append(f"layers: the layer list is the whole architecture; leave {', '.join(changed)} at their defaults "
                    "and give such options in the list")
    return errs


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


def type_name(tp):
    """'int', 'float or None', ... for messages and the CLI's metavars."""
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(type_name(t) for t in typing.get_args(tp))
    return "None" if tp is type(None) else tp.__name__


def config_differences(a, b, ignore=()):
    """Messages for every field (flat name) where configs a and b differ."""
    return [f"{n}: checkpoint {a.leaf(g, n)!r} vs now {b.leaf(g, n)!r}"
            for (g, n) in LEAVES if n not in ignore and a.leaf(g, n) != b.leaf(g, n)]
