"""The proof machinery: theorems, their labelled steps, and how a step is decided.

A theorem is a function returning a :class:`Proof`: a list of labelled steps, each an
assertion "this residual is zero" (exact algebra) or "this number is within the
tolerance table's bound" (the numeric bridge). A step is decided only by a residual:

* matrix expressions (MatrixSymbol / BlockMatrix): ``expand(residual.doit())`` must
  reduce to ``ZeroMatrix`` (blockwise for block matrices);
* scalar polynomials and explicit matrices: ``expand`` (or ``cancel`` for rational
  functions) of every entry of ``lhs - rhs`` must be exactly 0.

Never ``lhs == rhs`` on expression trees. A theorem is established when every step
holds and at least one residual was examined (a proof with no assertion fails); a
theorem that raises is reported as failed with its error, never skipped.
"""

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

import numpy as np


# --- deciding residuals -------------------------------------------------------------

def matexpr_normal(e, rounds=3):
    """A normal form of a matrix expression: push transposes in (doit) and distribute
    products over sums (expand), repeated until it stops changing."""
    for _ in range(rounds):
        n = sp.expand(e.doit())
        if n == e:  # structural fixed point of the rewriting, not a proof of anything
            break
        e = n
    return e


def matexpr_is_zero(e):
    """True when the matrix expression's normal form is the zero matrix."""
    n = matexpr_normal(e)
    return isinstance(n, sp.ZeroMatrix) or n.is_ZeroMatrix is True or (not isinstance(n, MatrixExpr) and n == 0)


def scalar_is_zero(e, reduce=sp.expand):
    """True when ``reduce(e)`` (expand by default; cancel for rational functions) is 0."""
    return sp.sympify(reduce(e)) == 0


def entries(m):
    """The entries of an explicit matrix (or a scalar as a one-entry list)."""
    if isinstance(m, sp.MatrixBase):
        return list(m)
    return [m]


def _short(e, n=160):
    s = str(e)
    return s if len(s) <= n else s[:n] + " ..."


# --- proofs ---------------------------------------------------------------------------

@dataclass
class Step:
    label: str            # the statement this assertion establishes
    where: str            # the hypotheses it was decided under (sizes, or "symbolic dimensions")
    checked: int          # residual blocks / entries / comparisons examined
    failed: int           # of which did not reduce to zero (or exceeded the tolerance)
    how: str              # how it was decided
    error: float = 0.0    # bridge steps: relative error
    tolerance: float = 0.0
    witness: str = ""     # a residual that did not vanish (abbreviated), for failures

    @property
    def holds(self):
        return self.checked > 0 and self.failed == 0


class Proof:
    """The steps of one proof, in order. Each call decides one labelled assertion."""

    def __init__(self):
        self.steps = []

    def _add(self, label, where, checked, failed, how, witness="", **kw):
        self.steps.append(Step(label, where, checked, failed, how, witness=witness, **kw))
        return failed == 0 and checked > 0

    def blocks_zero(self, label, lhs, rhs, where="symbolic dimensions"):
        """Blockwise: lhs is a BlockMatrix (block_collapse'd), rhs a nested list of blocks
        (or a BlockMatrix of the same block shape). Every block residual must expand to
        ZeroMatrix."""
        L = lhs.blocks
        Rb = rhs.blocks if isinstance(rhs, sp.BlockMatrix) else sp.Matrix(rhs)
        if L.shape != Rb.shape:
            raise ValueError(f"{label}: block shapes differ, {L.shape} vs {Rb.shape}")
        bad, witness = 0, ""
        for i in range(L.shape[0]):
            for j in range(L.shape[1]):
                if L[i, j].shape != Rb[i, j].shape:
                    raise ValueError(f"{label}: block ({i},{j}) shapes differ, {L[i, j].shape} vs {Rb[i, j].shape}")
                if not matexpr_is_zero(L[i, j] - Rb[i, j]):
                    bad += 1
                    witness = witness or f"block ({i},{j}): {_short(matexpr_normal(L[i, j] - Rb[i, j]))}"
        n = L.shape[0] * L.shape[1]
        return self._add(label, where, n, bad, f"blockwise residual expanded to ZeroMatrix ({n} blocks)", witness)

    def matexpr_zero(self, label, residual, where="symbolic dimensions"):
        """A matrix-expression residual must expand to ZeroMatrix."""
        ok = matexpr_is_zero(residual)
        return self._add(label, where, 1, 0 if ok else 1, "matrix-expression residual expanded to ZeroMatrix",
                         "" if ok else _short(matexpr_normal(residual)))

    def entries_zero(self, label, lhs, rhs, where, reduce=sp.expand):
        """Entrywise: every entry of lhs - rhs reduces to 0 by ``reduce`` (expand for
        polynomials, cancel for rational functions)."""
        a, b = entries(lhs), entries(rhs)
        if isinstance(lhs, sp.MatrixBase) and isinstance(rhs, sp.MatrixBase) and lhs.shape != rhs.shape:
            raise ValueError(f"{label}: shapes differ, {lhs.shape} vs {rhs.shape}")
        if len(a) != len(b):
            raise ValueError(f"{label}: {len(a)} vs {len(b)} entries")
        bad, witness = 0, ""
        for x, y in zip(a, b):
            r = reduce(x - y)
            if sp.sympify(r) != 0:
                bad += 1
                witness = witness or _short(r)
        verb = {"expand": "expanded", "cancel": "cancelled"}.get(getattr(reduce, "__name__", ""), "reduced")
        return self._add(label, where, len(a), bad, f"residual {verb} to 0 ({len(a)} entries)", witness)

    def polys_zero(self, label, lhs, rhs, where):
        """Entrywise in a polynomial ring (sympy.polys.rings): every lhs - rhs must be the
        zero polynomial (canonical sparse form, so this is expand(residual) == 0)."""
        lhs, rhs = list(lhs), list(rhs)
        if len(lhs) != len(rhs):
            raise ValueError(f"{label}: {len(lhs)} vs {len(rhs)} entries")
        bad, witness = 0, ""
        for x, y in zip(lhs, rhs):
            r = x - y
            if r:  # a nonzero polynomial has at least one monomial
                bad += 1
                witness = witness or _short(r.as_expr() if hasattr(r, "as_expr") else r)
        return self._add(label, where, len(lhs), bad, f"residual is the zero polynomial ({len(lhs)} entries)", witness)

    def holds(self, label, condition, how, where="symbolic"):
        """A decided fact that is not a residual (e.g. positivity from the symbols' assumptions)."""
        ok = bool(condition)
        return self._add(label, where, 1, 0 if ok else 1, how)

    def close(self, label, actual, desired, where, kind="algebra"):
        """Numeric bridge: relative error max|a - d| / max|d| (reference.tolerances.
        allclose_report, which also checks shapes) within the table's rtol for (float64, kind)."""
        from reference.tolerances import allclose_report

        a = np.asarray(actual, dtype=np.float64)
        d = np.asarray(desired, dtype=np.float64)
        rep = allclose_report(a, d, kind)
        ok = bool(np.isfinite(rep.rel_err)) and rep.rel_err <= rep.tol.rtol
        return self._add(label, where, 1, 0 if ok else 1, f"float64 relative error <= rtol {rep.tol.rtol:g} ({kind})",
                         "" if ok else str(rep), error=rep.rel_err, tolerance=rep.tol.rtol)

    @property
    def established(self):
        return bool(self.steps) and all(s.holds for s in self.steps)


# --- theorems ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Theorem:
    id: str
    statement: str
    hypotheses: str
    source: str
    fn: Callable
    kind: str = "exact"      # "exact" (zero residuals) or "bridge" (numeric vs reference)
    slow: bool = False


THEOREMS: dict = {}


def theorem(id, *, statement, hypotheses, source, kind="exact", slow=False):
    """Register ``fn(**injections) -> Proof``; keyword arguments default to the correct
    construction, so tests can inject a wrong one and see the proof fail."""
    if kind not in ("exact", "bridge"):
        raise ValueError(f"kind must be 'exact' or 'bridge', got {kind!r}")

    def deco(fn):
        if id in THEOREMS:
            raise ValueError(f"theorem {id!r} registered twice")
        THEOREMS[id] = Theorem(id, statement, hypotheses, source, fn, kind, slow)
        return fn

    return deco


@dataclass
class Result:
    id: str
    statement: str
    hypotheses: str
    source: str
    kind: str
    established: bool
    steps: list
    seconds: float
    error: str = None
    traceback: str = None
    details: dict = field(default_factory=dict)

    @property
    def measured(self):
        """Exact proofs: the number of residual entries/blocks that did not vanish.
        Bridges: the worst relative error. A crashed or empty proof measures infinity."""
        if self.error is not None or not self.steps:
            return float("inf")
        if self.kind == "exact":
            return float(sum(s.failed for s in self.steps))
        return float(max(s.error for s in self.steps))

    @property
    def tolerance(self):
        """0 for exact proofs; for bridges the (single) rtol their steps were judged by."""
        if self.kind == "exact":
            return 0.0
        tols = {s.tolerance for s in self.steps}
        return float(min(tols)) if tols else 0.0

    def as_dict(self):
        return {"id": self.id, "statement": self.statement, "hypotheses": self.hypotheses, "source": self.source,
                "kind": self.kind, "established": self.established, "measured": self.measured,
                "tolerance": self.tolerance, "seconds": self.seconds, "error": self.error,
                "steps": [dataclasses.asdict(s) for s in self.steps]}


def run_theorem(th, **injections):
    """Run one theorem; a raising proof is a failed proof with its error."""
    t0 = time.perf_counter()
    try:
        proof = th.fn(**injections)
        if not isinstance(proof, Proof):
            raise TypeError(f"theorem {th.id} returned {type(proof).__name__}, not Proof")
        res = Result(th.id, th.statement, th.hypotheses, th.source, th.kind, proof.established, proof.steps, 0.0)
    except Exception as exc:  # noqa: BLE001 - a crashing proof is a failed proof
        res = Result(th.id, th.statement, th.hypotheses, th.source, th.kind, False, [], 0.0,
                     error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


MODULE_ORDER = ("prop1", "gdpp", "gradients", "step_size", "bridge")


def load_all():
    """Import every proof module so its theorems register; returns the theorems in
    report order (by module as in MODULE_ORDER, then in order of definition)."""
    from . import bridge, gdpp, gradients, prop1, step_size  # noqa: F401
    from . import causal  # noqa: F401  (mesa paper: causal Prop. 1)
    from . import mesa  # noqa: F401  (mesa layer: Sherman-Morrison, delta rule = GD, small lam)
    from . import copy  # noqa: F401  (Prop. 3: copy layer then one GD step on classic tokens)

    def rank(item):
        mod = item[1].fn.__module__.rsplit(".", 1)[-1]
        return MODULE_ORDER.index(mod) if mod in MODULE_ORDER else len(MODULE_ORDER)

    return dict(sorted(THEOREMS.items(), key=rank))   # sorted() is stable: definition order within a module
