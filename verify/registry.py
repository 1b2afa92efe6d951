"""The claim registry.

A claim has an id, a statement, its source in the papers, how it is checked, and a
function that measures one number and compares it with a tolerance whose reason is
stated. A claim that raises is reported as failed with the error, never skipped.

    @claim("prop1.float64", statement="...", source="ICML'23 Prop. 1",
           method="construction vs explicit GD on random configurations")
    def _(ctx):
        err = ...
        return Outcome.at_most(err, 1e-12, "float64 rounding of ...")
"""

import dataclasses
import fnmatch
import importlib
import pkgutil
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


@dataclass
class Outcome:
    measured: float
    tolerance: float
    comparison: str           # "<=" (measured at most tolerance) or ">=" (at least)
    tolerance_reason: str
    details: dict = field(default_factory=dict)

    @classmethod
    def at_most(cls, measured, tolerance, reason, **details):
        return cls(float(measured), float(tolerance), "<=", reason, details)

    @classmethod
    def at_least(cls, measured, tolerance, reason, **details):
        return cls(float(measured), float(tolerance), ">=", reason, details)

    @property
    def passed(self):
        m = self.measured
        if not np.isfinite(m):
            return False
        return m <= self.tolerance if self.comparison == "<=" else m >= self.tolerance


@dataclass
class Claim:
    id: str
    statement: str
    source: str
    method: str
    fn: Callable
    modes: tuple = ("quick", "full")
    module: str = ""


@dataclass
class Context:
    """What a claim function may use: the mode, a seed, a work directory, whether
    finished training runs already in the work directory may be reused, and the ids of
    the claims this run selected (None: not known, e.g. a claim called on its own)."""

    mode: str = "quick"
    seed: int = 0
    workdir: str = "runs/verify"
    reuse_runs: bool = False
    records: Optional[str] = None      # committed run records (verify.records), read with reuse_runs
    older_records: bool = False        # records trained by other reference/ sources count too (named in the report)
    no_train: bool = False             # with reuse_runs: a claim whose runs are missing fails, nothing trains
    selected: Optional[list] = None

    @property
    def full(self):
        return self.mode == "full"

    def rng(self, salt=0):
        return np.random.default_rng([self.seed, salt])


_REGISTRY: dict = {}
_IMPORT_ERRORS: dict = {}


def claim(id, *, statement, source, method, modes=("quick", "full")):
    """Register a claim function ``fn(ctx) -> Outcome``."""

    def deco(fn):
        if id in _REGISTRY:
            raise ValueError(f"claim id {id!r} registered twice")
        _REGISTRY[id] = Claim(id, statement, source, method, fn, tuple(modes), fn.__module__)
        return fn

    return deco


def discover():
    """Import every ``verify.claims_*`` module. An import failure becomes a failing claim."""
    import verify

    for info in sorted(pkgutil.iter_modules(verify.__path__), key=lambda m: m.name):
        if info.name.startswith("claims_"):
            name = f"verify.{info.name}"
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported as a failed claim
                _IMPORT_ERRORS[name] = traceback.format_exc()
    return dict(_REGISTRY)


def select(claims, mode, only=None):
    """Claims for ``mode``, filtered by ``only`` (a glob if it has * ? [, else a substring)."""
    out = [c for c in claims.values() if mode in c.modes]
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]

        def hit(cid):
            return any(fnmatch.fnmatchcase(cid, p) if any(ch in p for ch in "*?[") else p in cid for p in pats)

        out = [c for c in out if hit(c.id)]
    return sorted(out, key=lambda c: c.id)


def run_claim(c, ctx):
    """Run one claim; returns the report row (a dict with the stable field names)."""
    t0 = time.perf_counter()
    row = {"id": c.id, "statement": c.statement, "source": c.source, "method": c.method}
    try:
        out = c.fn(ctx)
        if not isinstance(out, Outcome):
            raise TypeError(f"claim {c.id} returned {type(out).__name__}, not Outcome")
        row.update(measured=out.measured, tolerance=out.tolerance, comparison=out.comparison,
                   tolerance_reason=out.tolerance_reason, passed=bool(out.passed),
                   details=_jsonable(out.details), error=None)
    except Exception as exc:  # noqa: BLE001 - a crashing claim is a failed claim
        row.update(measured=None, tolerance=None, comparison=None, tolerance_reason=None,
                   passed=False, details={}, error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


_REUSED: list = []


def note_reused(run_dir):
    """Record that a claim used a finished run found on disk instead of training it."""
    if run_dir not in _REUSED:
        _REUSED.append(run_dir)


def reused_runs():
    """The run directories reused in this process (``--reuse-runs``), in order."""
    return list(_REUSED)


def import_errors():
    """{module: traceback} of the claims modules that failed to import."""
    return dict(_IMPORT_ERRORS)


def import_error_rows():
    return [{"id": f"import:{name}", "statement": f"module {name} imports", "source": "-",
             "method": "import", "measured": None, "tolerance": None, "comparison": None,
             "tolerance_reason": None, "passed": False, "details": {}, "seconds": 0.0,
             "error": tb.strip().splitlines()[-1], "traceback": tb}
            for name, tb in _IMPORT_ERRORS.items()]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return _jsonable(dataclasses.asdict(x))
    return x
