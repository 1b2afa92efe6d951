"""icgd symbolic: SymPy proofs of the equivalence claims of von Oswald et al. (ICML 2023).

Each theorem is algebra, proved as algebra, and decided only by a zero residual:

* ``prop1``     Prop. 1 (one LSA layer = one GD step) for general d, d_y, N with block
                matrix expressions, and at explicit sizes; K layers = K GD steps
                (general induction step, K = 2, 3 composed, explicit sizes);
* ``gdpp``      the GD++ token update and the eigenvalue map lambda -> lambda (1 - gamma lambda)^2;
* ``gradients`` the reference's hand-written backward, executed on exact polynomials,
                equals the derivative of the symbolic loss;
* ``step_size`` the optimal one-step eta and its expected loss, and the moment formula;
* ``bridge``    every symbolic result evaluated at random points against the reference.

The transcriptions of the reference's equations live in ``algebra`` (and the forward in
``gradients``); ``core`` holds the proof machinery. Run ``python -m symbolic`` (or
``icgd prove``); each theorem is also a claim of ``python -m verify`` (ids ``symbolic.*``).
This package imports ``reference``; ``reference`` never imports SymPy.
"""

from .core import THEOREMS, Proof, Result, Theorem, load_all, run_theorem, theorem

__all__ = ["THEOREMS", "Proof", "Result", "Theorem", "load_all", "run_theorem", "theorem"]
