"""The named training experiments of the ICML paper (paper-settings.md sections 5 and 7),
each a TrainConfig. ``icgd train NAME`` and the ``training.*`` claims start from these."""

import difflib
import json
from dataclasses import dataclass

from reference.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    config: TrainConfig


def _exp(name, description, **fields):
    return Experiment(name, description, TrainConfig(experiment=name).replace(**fields))


def _layers(*specs):
    return json.dumps(list(specs))


# The sine-regression model of the official code (paper-settings.md 7, 7a): tokens (x, y)
# -> linear embedding to width 40 -> residual MLP 40 -> 160 -> 40 (GELU tanh, bias) -> the
# last layer; the prediction is minus feature 39 of the query. The transformer ends in one
# LSA layer (key size 40); the "MLP + GD" baseline in the frozen GD layer (eta / N = 0.01).
SINE_FEATURES = ({"kind": "embed", "width": 40}, {"kind": "mlp", "width": 160, "bias": True})
SINE_DATA = dict(task="sine", d=1, N=10, x_low=-5.0, x_high=5.0, batch=2048, eval_tasks=2048, eval_every=500,
                 checkpoint_every=1000, steps=20_000, grad_clip=100.0, gdpp_steps=200)


EXPERIMENTS = {e.name: e for e in [
    _exp("one_layer",
         "One LSA layer (K=1, one head), the paper's Fig. 2: reaches the GD-1 loss, aligns with GD, "
         "weights equal the Prop. 1 construction up to scale. Adam lr 1e-3, clip 0.001, 5000 steps.",
         n_layers=1, steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("two_heads",
         "One layer with two heads (K=1, H=2), otherwise as one_layer. The paper reports that two heads remove the "
         "early plateau some one-head seeds show (with batch 2048 we saw no plateau on 5 one-head seeds).",
         n_layers=1, heads=2, steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("recurrent2",
         "Two weight-tied layers (recurrent K=2), the paper's Fig. 4: below GD-2, near GD++ (shared eta, gamma). "
         "lr 1e-3, clip 0.001, 5000 steps.",
         n_layers=2, recurrent=True, steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("recurrent10",
         "Ten weight-tied layers (recurrent K=10) vs GD-10 and shared GD++. lr 5e-4, clip 10, token clip 10 "
         "(the code's rule for K > 3), 5000 steps.",
         n_layers=10, recurrent=True, steps=5000, lr=5e-4, grad_clip=10.0, token_clip=10.0),
    _exp("layers5",
         "Five separate layers (non-recurrent K=5) vs per-layer GD++. lr 5e-4, clip 10, token clip 10, "
         "50,000 steps; GD++ meta-trained 30,000 steps per layer as in the paper.",
         n_layers=5, recurrent=False, steps=50_000, lr=5e-4, grad_clip=10.0, token_clip=10.0,
         gdpp_steps=30_000, checkpoint_every=1000),
    _exp("softmax1",
         "One softmax self-attention layer, one head (d = N = 10), otherwise as one_layer: the paper reports that "
         "one head does not reach the GD-1 loss (App. A.9).",
         layers=_layers({"kind": "softmax"}), steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("softmax2",
         "One softmax self-attention layer with two heads (d = N = 10), otherwise as one_layer: reaches the GD-1 "
         "loss and aligns with GD; the heads' W_KQ carry sign-reversed parts that cancel (App. A.9).",
         layers=_layers({"kind": "softmax", "heads": 2}), steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("ln1",
         "LayerNorm before one LSA layer (pre-LN inside the residual), otherwise as one_layer: worse than GD-1 "
         "in distribution, better out of distribution for large input scales (App. A.9).",
         layers=_layers({"kind": "pre_ln", "block": "lsa"}), steps=5000, lr=1e-3, grad_clip=0.001),
    _exp("ln2",
         "Two separate LSA layers, no LayerNorm before layer 1 and LayerNorm before layer 2 (the official "
         "placement), vs GD-2: worse in distribution, better for large input scales (App. A.9).",
         layers=_layers({"kind": "lsa"}, {"kind": "pre_ln", "block": "lsa"}), n_layers=2, steps=5000, lr=1e-3,
         grad_clip=0.001),
    _exp("sine",
         "Sine regression (y = a sin(x + rho), x ~ U(-5, 5), N = 10; a ~ U(0.1, 0.5) with rho tied to a, as the "
         "code): embedding 2 -> 40, residual MLP 40 -> 160 -> 40, one LSA layer (key 40), readout minus feature 39. "
         "Adam lr 1e-3, clip 100, batch 2048, 20,000 steps.",
         layers=_layers(*SINE_FEATURES, {"kind": "lsa"}), lr=1e-3, **SINE_DATA),
    _exp("sine_mlp_gd",
         "The 'MLP + GD' baseline of the sine task: the same embedding and MLP (the same seed draws the same "
         "initial weights) meta-trained through a frozen GD layer (eta 0.1, eta / N = 0.01). Adam lr 3e-4, "
         "otherwise as sine.",
         layers=_layers(*SINE_FEATURES, {"kind": "gd", "eta": 0.1}), lr=3e-4, **SINE_DATA),
]}


def get_experiment(name):
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown experiment {name!r}{hint}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
