"""The named training experiments of the ICML paper (paper-settings.md sections 5 and 7)
and the mesa paper's sequence models (``seq_*``, sections 8, 8a), each a TrainConfig. ``icgd train NAME`` and the ``training.*`` claims start from these."""

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
    _exp("induction",
         "Classic tokens x_1, (0, y_1), ..., x_N, (0, y_N), x_q with sin/cos encodings of width 10 concatenated "
         "(width 20), layer 1 softmax, layer 2 linear, one head, key size 20 (ICML Sec. 4): the first layer learns "
         "to copy each label into its input's token, the second does one GD step. Init 0.01, Adam lr 1e-3 (b2 0.98), "
         "batch 2048, global-norm clip 10, 10,000 steps, evaluation every 500 steps; n_layers 1 makes the GD "
         "baseline GD-1 and the init scale 0.01 itself.",
         tokens="classic", layers=_layers({"kind": "posenc", "mode": "concat", "width": 10},
                                          {"kind": "softmax", "key_size": 20}, {"kind": "lsa", "key_size": 20}),
         init_scale=0.01, steps=10_000, lr=1e-3, grad_clip=10.0, eval_every=500, checkpoint_every=1000),
    _exp("induction_linear",
         "As induction with both layers linear (the paper could not train this model to GD-1).",
         tokens="classic", layers=_layers({"kind": "posenc", "mode": "concat", "width": 10},
                                          {"kind": "lsa", "key_size": 20}, {"kind": "lsa", "key_size": 20}),
         init_scale=0.01, steps=10_000, lr=1e-3, grad_clip=10.0, eval_every=500, checkpoint_every=1000),
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

# The mesa paper's constructed-token sequence models (paper-settings.md 8, 8a, 8b; SPEC.md
# section 17): the code's tokens [0, x_t, x_t, x_{t-1}] (width 40), causal LSA with token
# clip 4 or one mesa layer, init normal(0, 0.0002), element-wise gradient clip 1 then AdamW
# (b2 0.999, weight decay 0.1), batch 256 fresh sequences per step, no schedule; a fixed
# evaluation set of 2048 sequences (the code: 10 fresh batches).
SEQ_COMMON = dict(task="lds", seq_len=50, batch=256, b2=0.999, eps=1e-8, grad_clip=None, elementwise_clip=1.0,
                  weight_decay=0.1, init_std=0.0002, backend="numba", dtype="float32", eval_tasks=2048,
                  line_search_tasks=2048, eval_every=100, checkpoint_every=500, causal=True)
# Every one trains on the Numba backend's sequence step (causal LSA stacks and the mesa
# layer, form "sm"; tests/test_numba_seq.py checks it against reference.seq_training on the
# same sequences); backend="numpy" runs the reference's.
SEQ_LSA = dict(key_size=20, value_size=20, token_clip=4.0)
SEQ_MESA = _layers({"kind": "mesa", "heads": 4, "key_size": 20, "value_size": 20})
# The mesa models train in float64: in float32 the memory-light backward of form "sm" (the
# reverse Sherman-Morrison walk) loses its precision once the learned lam grows, and its
# guard stops the run (measured: seq_mesa seed 0 refused at step 645 of 5000, denominators
# off by 1.9e-3 relative against the allowed 1e-3; verify/results/mesa-float32.md has the
# float32 study). The official code backpropagates through the stored recursion instead.
SEQ_MESA_DTYPE = "float64"


def _seq(name, description, **fields):
    return _exp(name, description, **{**SEQ_COMMON, **fields})


EXPERIMENTS.update({e.name: e for e in [
    _seq("seq_lsa1",
         "Mesa paper: one causal LSA layer (2 heads, key 20, first 20 input channels masked) on the linear LDS; "
         "matches the causal Prop. 1 GD construction per time step. lr 1e-4, 5000 steps.",
         n_layers=1, heads=2, input_mask=20, lr=1e-4, steps=5000, **SEQ_LSA),
    _seq("seq_lsa2", "Mesa paper: two causal LSA layers (4 heads, key 20) vs the 2-layer Prop. 2 construction. "
                     "lr 1e-4, 5000 steps.", n_layers=2, heads=4, lr=1e-4, steps=5000, **SEQ_LSA),
    _seq("seq_lsa4", "Mesa paper: four causal LSA layers (4 heads, key 20) vs the 4-layer Prop. 2 construction "
                     "(Neumann, line-searched step). lr 1e-4, 10,000 steps.",
         n_layers=4, heads=4, lr=1e-4, steps=10_000, **SEQ_LSA),
    _seq("seq_lsa6", "Mesa paper: six causal LSA layers (4 heads, key 20) vs the 6-layer Prop. 2 construction and "
                     "the code's 6-step Chebyshev. lr 1e-4, 15,000 steps.",
         n_layers=6, heads=4, lr=1e-4, steps=15_000, **SEQ_LSA),
    _seq("seq_mesa", "Mesa paper: one mesa layer (4 heads, key 20, lam init 1, first 20 input channels masked): "
                     "close to ridge at late t, beats six LSA layers. lr 4e-4, 5000 steps, float64.",
         layers=SEQ_MESA, input_mask=20, lr=4e-4, steps=5000, causal=False, dtype=SEQ_MESA_DTYPE),
    # 20,000 steps (the length 8a gives the contracting runs), not seq_lsa1's 5000: paper-settings
    # gives no length for the fixed teacher, and at 5000 the model is still far from its memoriser
    # (measured, seed 0: late-t loss 0.41 at step 5000, 0.24 at 8000, 0.16 at 11,000, 0.12 at
    # 20,000; GD 0.68; the 2-head telescoping memoriser of the claim's reason 0.10). Seed 4 stays
    # on a plateau near 0.30 from step 12,000 to 20,000.
    _seq("seq_fixed_lsa1", "Mesa paper, fixed teacher (one W for every sequence): one causal LSA layer as seq_lsa1; "
                           "beats GD by a large factor at late t. lr 1e-4, 20,000 steps.",
         seq_variant="fixed", n_layers=1, heads=2, input_mask=20, lr=1e-4, steps=20_000, **SEQ_LSA),
    _seq("seq_contracting_mesa", "Mesa paper, contracting dynamics (data clip 2): one mesa layer as seq_mesa; close "
                                 "to ridge at t = 50. lr 4e-4, 20,000 steps.",
         seq_variant="contracting", layers=SEQ_MESA, input_mask=20, lr=4e-4, steps=20_000, causal=False,
         dtype=SEQ_MESA_DTYPE),
    _seq("seq_contracting_lsa6", "Mesa paper, contracting dynamics: six causal LSA layers as seq_lsa6. lr 1e-4, "
                                 "20,000 steps.", seq_variant="contracting", n_layers=6, heads=4, lr=1e-4,
         steps=20_000, **SEQ_LSA),
]})
SEQ_EXPERIMENTS = tuple(n for n in EXPERIMENTS if n.startswith("seq_"))


def get_experiment(name):
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown experiment {name!r}{hint}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
