"""The NumPy backend: the reference itself, behind the backend interface.

Besides the reference functions it provides :func:`make_stepper`, the object a
training loop drives. Every backend offers the same: ``stepper.step(params, state,
step)`` draws the step's tasks (from ``step_rng(seed, step)`` here; a fast backend
may use its own generator, seeded from (seed, step) too) and does one update;
``stepper.step_on(params, state, tasks)`` does the update on given tasks, which is how
backends are compared with each other.
"""

import numpy as np

from ..model import loss_and_grads, model_forward
from ..tasks import sample_tasks, step_rng
from ..train_step import train_step

NAME = "numpy"
HOST_ARRAYS = True


def check_available():
    """The reference needs nothing beyond NumPy."""


def supports(arch):
    """The reference computes every Arch of registered layers."""
    return None


class Stepper:
    def __init__(self, arch, hp, spec, seed, dtype=np.float32, layout=None):
        self.arch, self.hp, self.spec, self.seed = arch, hp.validate(), spec, seed
        self.dtype = np.dtype(dtype)
        self.layout = layout          # None: arch.layout(d, d_y) on the tasks

    def sample(self, step):
        return self.spec.sample(step_rng(self.seed, step), dtype=self.dtype)

    def step(self, params, state, step):
        return self.step_on(params, state, self.sample(step))

    def step_on(self, params, state, tasks):
        return train_step(params, state, tasks, self.arch, self.hp, self.layout)


def make_stepper(arch, hp, spec, seed, dtype=np.float32, layout=None):
    """A :class:`Stepper` for ``arch`` (Arch), ``hp`` (AdamHP), ``spec`` (TaskSpec);
    ``layout``: the token layout to train with (None: ``arch.layout``; a
    ``ClassicLayout`` for classic tokens)."""
    return Stepper(arch, hp, spec, seed, dtype, layout)


def seq_supports(arch):
    """The reference's sequence step (``reference.seq_training``) computes every Arch."""
    return None


def make_seq_stepper(arch, hp, spec, seed, dtype=np.float32, mask=0):
    """``reference.seq_training.SeqStepper``: the lds task's step on sequences of ``spec``."""
    from ..seq_training import SeqStepper

    return SeqStepper(arch, hp, spec, seed, dtype, mask)


__all__ = ["NAME", "seq_supports", "make_seq_stepper", "HOST_ARRAYS", "check_available", "supports", "sample_tasks", "loss_and_grads", "model_forward", "train_step", "make_stepper"]
