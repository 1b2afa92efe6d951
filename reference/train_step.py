"""One training step of an LSA model on fresh tasks: the spec every backend matches.

    tasks  = sample_tasks(rng, B, d, N, d_y, ...)           (or given)
    E      = build_tokens(X, Y, x_q)                        (B, N+1, D)
    L, g   = loss_and_grads(E, y_q, params, arch, layout)   (forward, loss, backward)
    params = adam_update(params, g, state, hp)              (global-norm clip + Adam)

Fast backends (``reference.backends``) implement :func:`train_step` with the same
signature and are tested against this function on the same tasks.
"""

from typing import NamedTuple

from .model import loss_and_grads
from .optim import adam_update
from .tokens import TokenLayout


class StepResult(NamedTuple):
    params: tuple
    state: object
    loss: float
    grad_norm: float


def train_step(params, state, tasks, arch, hp):
    """Forward, backward and one clipped Adam update on ``tasks``. Returns :class:`StepResult`."""
    layout = TokenLayout(tasks.X.shape[2], tasks.Y.shape[2])
    E = layout.build(tasks.X, tasks.Y, tasks.x_q)                       # (B, T, D)
    L, grads, _ = loss_and_grads(E, tasks.y_q, params, arch, layout)
    params, state, norm = adam_update(params, grads, state, hp)
    return StepResult(params, state, float(L), norm)
