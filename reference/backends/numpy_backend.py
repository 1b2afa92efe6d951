"""The NumPy backend: the reference itself, behind the backend interface."""

from ..model import loss_and_grads, model_forward
from ..tasks import sample_tasks
from ..train_step import train_step

NAME = "numpy"

__all__ = ["NAME", "sample_tasks", "loss_and_grads", "model_forward", "train_step"]
