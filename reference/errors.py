"""Errors a training run raises, shared by the loop and the solvers it calls."""


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the parameters became non-finite.

    ``step``: the step (1-based count of updates) at which it was detected;
    ``checkpoint_step``: the last checkpoint's step, filled in by the application
    that writes checkpoints (None when none was written)."""

    def __init__(self, message, step, checkpoint_step=None):
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step
