"""One training step of an LSA model on fresh tasks: the spec every backend matches.

    tasks  = sample_tasks(rng, B, d, N, d_y, ...)           (or given)
    E      = build_tokens(X, Y, x_q)                        (B, N+1, D)
    L, g   = loss_and_grads(E, y_q, params, arch, layout)   (forward, loss, backward)
    params = adam_apply(params, g, state, hp)               (global-norm clip + Adam)

Fast backends (``reference.backends``) implement :func:`train_step` with the same
signature and are tested against this function on the same tasks. What a step refuses
is decided here once: :func:`check_step_inputs` (and :func:`check_step_state` for a
stepper that draws its own tasks) runs before any work in this function and in every
backend's ``train_step``, ``stepper.step_on`` and ``stepper.step``.
"""

from typing import NamedTuple

import numpy as np

from ._checks import FLOAT_DTYPES, check_data, check_same_dtype
from .model import Arch, check_model_params, loss_and_grads
from .optim import adam_apply, check_adam_state, check_hp
from .tasks import Tasks
from .tokens import TokenLayout, check_task_data


class StepResult(NamedTuple):
    params: tuple
    state: object
    loss: float
    grad_norm: float


# ---- the checks every backend's training step shares (one validator, not copies) -------

def check_tasks(tasks):
    """Raise unless ``tasks`` is a :class:`reference.tasks.Tasks` whose X (B, N, d),
    Y (B, N, d_y), x_q (B, d) and y_q (B, d_y) are task data (finite, within the data
    limit, every size >= 1) of one float dtype. ``W`` is not read. Returns (the tasks'
    :class:`TokenLayout`, their dtype)."""
    if not isinstance(tasks, Tasks):
        raise TypeError(f"tasks must be a reference.tasks.Tasks, got {type(tasks).__name__}")
    B, N, d, d_y = check_task_data(tasks.X, tasks.Y, tasks.x_q, names=("tasks.X", "tasks.Y", "tasks.x_q"))
    check_data("tasks.y_q", tasks.y_q, shape=(B, d_y), allow_complex=False)
    dt = check_same_dtype(**{"tasks.X": tasks.X, "tasks.y_q": tasks.y_q})
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"tasks.X must have dtype float32 or float64 for training, got {dt}")
    return TokenLayout(d, d_y), dt


def check_step_state(params, state, arch, hp, layout):
    """Raise unless one training step can update ``params`` (one finite parameter set per
    distinct layer of ``arch`` for tokens of ``layout``'s width, float32 or float64, one
    dtype) with ``state`` (:func:`reference.optim.check_adam_state`) and ``hp`` (an
    AdamHP). What a step that draws its own tasks checks. Returns the params' dtype."""
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    check_hp(hp)
    check_model_params(params, arch, layout.D_in)
    dts = {np.dtype(a.dtype) for p in params for a in p if a is not None}
    if len(dts) != 1 or not dts <= set(FLOAT_DTYPES):
        raise TypeError(f"params must share one dtype, float32 or float64, for training, got {sorted(map(str, dts))}")
    check_adam_state(params, state)
    return dts.pop()


def check_step_inputs(params, state, tasks, arch, hp, layout=None):
    """Everything :func:`train_step` refuses before any work: :func:`check_step_state`
    and :func:`check_tasks` in the params' dtype. Every backend's ``train_step`` and
    ``stepper.step_on`` call this. Returns (the model's layout on the tasks, ``arch.layout(d, d_y)``:
    a TokenLayout, or an EmbeddedLayout when the model changes the token width; the dtype).
    ``layout`` (optional): the layout to train with instead (e.g. a ``ClassicLayout``),
    checked against the tasks' d, d_y and the model's output width."""
    task_layout, task_dtype = check_tasks(tasks)
    if layout is not None:
        check_given_layout(layout, task_layout, arch)
    elif isinstance(arch, Arch):
        layout = arch.layout(task_layout.d, task_layout.d_y)   # the readout at the model's output width
    else:
        layout = task_layout
    dtype = check_step_state(params, state, arch, hp, layout)
    if task_dtype != dtype:
        raise TypeError(f"tasks.X, tasks.Y, tasks.x_q and tasks.y_q must have the params' dtype {dtype}, "
                        f"got {task_dtype}")
    return layout, dtype


def check_given_layout(layout, task_layout, arch):
    """Raise unless ``layout`` (a TokenLayout or subclass) fits tasks of ``task_layout``'s
    d and d_y and the output width of ``arch`` on its tokens."""
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a reference.tokens.TokenLayout (or a subclass such as ClassicLayout), "
                        f"got {type(layout).__name__}")
    if (layout.d, layout.d_y) != (task_layout.d, task_layout.d_y):
        raise ValueError(f"layout must have the tasks' d={task_layout.d}, d_y={task_layout.d_y}, got "
                         f"d={layout.d}, d_y={layout.d_y} ({layout.kind} layout)")
    if isinstance(arch, Arch) and arch.widths(layout.D_in)[-1] != layout.D:
        raise ValueError(f"layout reads tokens of width {layout.D}, but the model maps its tokens of width "
                         f"{layout.D_in} to width {arch.widths(layout.D_in)[-1]} ({layout.kind} layout)")


def train_step(params, state, tasks, arch, hp, layout=None):
    """Forward, backward and one clipped Adam update on ``tasks``. Returns :class:`StepResult`.
    Bad input is refused first (:func:`check_step_inputs`); a gradient norm that
    overflows the dtype comes back as inf (``grad_norm``), which the training loop
    reports as divergence. ``layout`` (optional, the NumPy reference only): train with
    that layout's tokens and readout (a ``ClassicLayout``) instead of ``arch.layout``."""
    layout, _ = check_step_inputs(params, state, tasks, arch, hp, layout)
    E = layout.build(tasks.X, tasks.Y, tasks.x_q)                       # (B, T, D)
    L, grads, _ = loss_and_grads(E, tasks.y_q, params, arch, layout)
    params, state, norm = adam_apply(params, grads, state, hp)
    return StepResult(params, state, float(L), norm)
