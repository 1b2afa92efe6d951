"""Claims of the symbolic proofs (issue #3): every theorem of the ``symbolic`` package is
a claim with id ``symbolic.<theorem id>``.

* exact theorems (prop1.*, klayers.*, gdpp.*, gradients.*, step_size.*): measured = the
  number of residual entries or blocks that did not reduce to exactly zero; tolerance 0.
* bridges (bridge.*): measured = the worst float64 relative error of a symbolic result,
  evaluated at random points, against the reference implementation; tolerance = the
  table's rtol for (float64, "algebra").

A proof that raises is a failed claim with its error (the runner reports it), never skipped.
"""

import numpy as np

from reference.tolerances import tolerance
from symbolic import load_all, run_theorem

from .registry import Outcome, claim

EXACT_REASON = ("exact algebra: every residual must reduce to exactly 0 (ZeroMatrix blockwise, 0 entrywise, or the "
                "zero polynomial); a single nonzero residual entry or block is a failure")


def _method(th):
    if th.kind == "exact":
        return f"SymPy, decided by zero residuals; hypotheses: {th.hypotheses}"
    return f"symbolic result lambdified/evaluated at random points vs the reference; {th.hypotheses}"


def _register(th):
    @claim(f"symbolic.{th.id}", statement=th.statement, source=th.source, method=_method(th))
    def _(ctx):
        res = run_theorem(th, **({"seed": ctx.seed} if th.kind == "bridge" else {}))
        if res.error is not None:
            raise RuntimeError(f"proof {th.id} raised: {res.error}")
        details = {"steps": len(res.steps), "residuals_checked": sum(s.checked for s in res.steps),
                   "proof_seconds": res.seconds}
        failed = [f"{s.label} at {s.where}: {s.witness}" for s in res.steps if not s.holds]
        if failed:
            details["not_established"] = failed[:5]
        if th.kind == "exact":
            return Outcome.at_most(res.measured, 0, EXACT_REASON, **details)
        tol = tolerance(np.float64, "algebra")
        return Outcome.at_most(res.measured, tol.rtol, tol.reason, **details)


for _th in load_all().values():
    _register(_th)
