"""icgd reference: the readable NumPy specification of transformers (linear
self-attention first) that learn in context by gradient descent.

This package is the spec. It holds the layer types (``reference.layers``: lsa,
softmax, mlp, embed, posenc, pre_ln) with hand-written forward and backward passes,
the model as a stack of them (``reference.model``), the hand constructions of von
Oswald et al. (ICML 2023), explicit solvers (GD, GD++, least squares), a slow
loop-level oracle, gradient checking, and a training run's configuration and loop
(``reference.config``, ``reference.trainer``). It is written once, generic over the
array namespace (NumPy, or CuPy on a GPU). Fast backends (Numba, CuPy kernels) live in
``reference.backends`` and are tested against this code.

Dimension letters used everywhere: B tasks, N context tokens, T = N + 1 tokens,
d input width, d_y label width, D = d + d_y token width, H heads, K layers.
"""

__version__ = "0.1.0"

from .xp import get_xp, to_numpy
from .tasks import Tasks, TaskSpec, sample_tasks, step_rng, uniform_moments
from .tokens import EmbeddedLayout, TokenLayout, build_tokens, readout, readout_backward, split_token
from .classic_tokens import ClassicLayout, build_classic_tokens, classic_layout
from .layers import LayerSpec, LayerType, InitSettings, get_layer, layer_types, register
from .layers.lsa import (
    LSA,
    LSAParams,
    MergedParams,
    lsa_forward,
    lsa_backward,
    to_merged,
    init_lsa_params,
)
from .model import (
    Arch,
    lsa_stack,
    transformer_stack,
    model_forward,
    model_backward,
    loss_forward,
    loss_backward,
    loss_and_grads,
    layer_predictions,
    predict,
)
from .constructions import gd_layer, gdpp_layer, gd_stack, gdpp_stack, gdpp_model
from .config import TrainConfig, ConfigError
from .errors import TrainingDiverged
from .solvers import (
    gd_predict,
    gdpp_predict,
    least_squares_predict,
    line_search_eta,
    optimal_one_step_eta,
    expected_one_step_loss,
    ETA_GRID,
)

__all__ = [name for name in dir() if not name.startswith("_")]
