"""What is specific to the layer types after LSA (the conformance suite checks what they
share: oracle, complex step, batching, dtypes, bad input, backends' refusal):

* softmax attention: large logits up to the float's range give no NaN, inf or warning
  and saturate to hard attention; beyond, a clear NonFiniteError; the masks; the
  backward's memory is O(T^2), not O(T^3);
* GELU: the tanh form is jax.nn.gelu's formula, the erf form is accurate (against
  ``math.erf``), the two differ by at most ~5e-4, both derivatives equal complex-step
  derivatives, both saturate without overflow;
* LayerNorm: eps 1e-5 as Haiku, the biased variance, the exact backward (complex step,
  entry by entry, also where the variance is ~eps);
* positional encodings: the official formula's values, add and concat;
* pre-LN: e + f(LN(e)), not LN(e) + f(LN(e)); init draws the block's numbers;
  transformer_stack places LayerNorm as the official code;
* a mixed stack trains through verify.runs with checkpoint and resume bit-identical,
  from a config's layer list; a width-changing model has one loss_and_grads through
  EmbeddedLayout;
* cache_floats and param_floats of every new kind.
"""

import json
import math
import os
import tracemalloc
import warnings

import numpy as np
import pytest

import reference as R
from reference._checks import NonFiniteError
from reference.backends import get_backend
from reference.config import ConfigError, ModelConfig, TrainConfig, config_from_dict
from reference.gradcheck import check_gradients, numerical_gradient
from reference.layers import InitSettings, LayerSpec
from reference.layers.layernorm import LN_EPS, layernorm_backward, layernorm_forward
from reference.layers.mlp import erf, gelu, gelu_grad
from reference.layers.posenc import PosEncParams, positional_encoding
from reference.layers.pre_ln import split_params
from reference.layers.softmax import SoftmaxParams, masked_softmax, softmax_backward, softmax_forward
from reference.model import Arch, lsa_stack, model_forward, transformer_stack
from reference.oracle import oracle_loss, oracle_model
from reference.tokens import EmbeddedLayout
from reference.tolerances import assert_close
from reference.tree import tree_leaves, tree_unflatten

NEW_KINDS = ("softmax", "mlp", "embed", "posenc", "pre_ln")
RAISE = dict(over="raise", invalid="raise", divide="raise")   # underflow to 0 is expected and fine


def _tokens(B=2, d=3, N=5, d_y=1, seed=0):
    t = R.sample_tasks(np.random.default_rng(seed), B, d, N, d_y)
    return R.build_tokens(t.X, t.Y, t.x_q), t


def _softmax_params(rng, D, H=1, Kd=None, scale=1.0):
    Kd = D if Kd is None else Kd
    return SoftmaxParams(scale * rng.standard_normal((H, Kd, D)), scale * rng.standard_normal((H, Kd, D)),
                         scale * rng.standard_normal((H, D, D)), scale * rng.standard_normal((H, D, D)))


# ---- softmax attention -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_rows_spanning_the_whole_float_range_are_exact(dtype):
    """Logits from -max to +max in one row: the max-subtracted softmax gives the one-hot
    weights, with no overflow, NaN or warning (the subtraction Z - m would overflow
    without the floor at m - max)."""
    big = np.finfo(dtype).max
    Z = np.array([[-big, big, 0.0, big / 2], [-big, -big, -big / 3, -big]], dtype=dtype)
    with np.errstate(**RAISE):
        A = masked_softmax(Z)
    assert A.dtype == dtype
    np.testing.assert_array_equal(A, np.array([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=dtype))
    Zc = np.array([[-big, 0.0, big]]) + 1e-30j                         # complex step: decided on real parts
    assert np.isfinite(masked_softmax(Zc)).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_finite_logits_saturate_to_hard_attention(dtype, causal):
    """W_Q scaled so the logits reach ~1e300 (float64) or ~1e36 (float32): forward and
    backward finite, without warnings; each query attends to its largest logit only, and
    the gradient through the logits vanishes (dW_Q = dW_K = 0)."""
    E, _ = _tokens()
    rng = np.random.default_rng(1)
    p = _softmax_params(rng, 4)
    s = 1e300 if dtype == np.float64 else 1e36
    p = SoftmaxParams(p.W_Q * s, p.W_K, p.W_V, p.P)
    E, p = E.astype(dtype), SoftmaxParams(*(a.astype(dtype) for a in p))
    with np.errstate(**RAISE):
        out, cache = softmax_forward(E, p, causal=causal)
        dE, g = softmax_backward(rng.standard_normal(out.shape).astype(dtype), cache)
    assert np.isfinite(out).all() and np.isfinite(dE).all() and all(np.isfinite(a).all() for a in g)
    assert set(np.unique(cache.A)) <= {0.0, 1.0} and np.all(cache.A.sum(axis=-1) == 1)
    assert not g.W_Q.any() and not g.W_K.any()


def test_logits_beyond_the_float_range_are_refused_clearly():
    E, _ = _tokens()
    p = _softmax_params(np.random.default_rng(2), 4)
    p = SoftmaxParams(p.W_Q * 1e200, p.W_K * 1e200, p.W_V, p.P)         # q . k ~ 1e400: overflow
    with np.errstate(over="ignore"), pytest.raises(NonFiniteError, match="logits overflowed"):
        softmax_forward(E, p)


def test_masks_context_only_and_causal():
    """Context-only: the query is never a key, so changing it changes only its own row;
    causal: token j ignores tokens after it and its weights on them are exactly 0."""
    E, _ = _tokens(N=4)
    p = _softmax_params(np.random.default_rng(3), 4, H=2)
    E2 = E.copy()
    E2[:, -1] += 0.3
    a, _ = softmax_forward(E, p)
    b, _ = softmax_forward(E2, p)
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    E3 = E.copy()
    E3[:, 2:] += 0.3
    a, cache = softmax_forward(E, p, causal=True)
    b, _ = softmax_forward(E3, p, causal=True)
    np.testing.assert_array_equal(a[:, :2], b[:, :2])
    assert not np.triu(cache.A, 1).any()
    assert_close(cache.A.sum(axis=-1), np.ones(cache.A.shape[:-1]), "algebra")


def test_softmax_backward_memory_is_quadratic_in_the_tokens():
    """At T = 240 a (T, T, T) array would take 110 MB; the backward's peak allocation stays
    within a few (B, H, T, T) arrays (the row-sum form of the softmax Jacobian)."""
    T, D = 240, 4
    rng = np.random.default_rng(4)
    E = rng.uniform(-0.5, 0.5, (1, T, D))
    out, cache = softmax_forward(E, _softmax_params(rng, D), causal=True)
    dout = rng.standard_normal(out.shape)
    tracemalloc.start()
    softmax_backward(dout, cache)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * T * T * 8, f"backward peak {peak} bytes, {T}^2 floats are {T * T * 8}"


# ---- GELU and erf ------------------------------------------------------------------------

def test_tanh_gelu_is_jax_nn_gelu_default():
    """jax.nn.gelu(x) (approximate=True, the default the official MLP calls) computes
    x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))); transcribed here."""
    x = np.linspace(-9.5, 9.5, 2001)
    jax_default = x * (0.5 * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * (x ** 3)))))
    assert_close(gelu(x), jax_default, "algebra")
    assert_close(gelu(x, "tanh"), jax_default, "algebra")


@pytest.mark.parametrize("dtype, bound", [(np.float64, 4e-15), (np.float32, 2e-6)])
def test_erf_accuracy_against_math_erf(dtype, bound):
    x = np.concatenate([np.linspace(-8.0, 8.0, 16001), [0.0, 1e-30, -1e-12, 5.999999, 6.000001, 40.0, -1e30]])
    want = np.array([math.erf(v) for v in x])
    got = erf(x.astype(dtype))
    assert got.dtype == dtype
    assert np.abs(got.astype(np.float64) - want).max() <= bound


def test_tanh_and_erf_gelu_differ_by_at_most_5e_4():
    x = np.linspace(-12, 12, 48001)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.abs(gelu(x, "erf") - exact).max() <= 2e-14
    diff = np.abs(gelu(x, "tanh") - exact).max()
    assert 4e-4 < diff <= 5e-4


@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_gelu_derivative_equals_complex_step(form):
    """Across the curved part and the saturation at |x| = 10 (complex-step derivatives of
    the forward itself: it is analytic)."""
    x = np.concatenate([np.linspace(-11, 11, 4401), [-10.0, 10.0, 0.0]])
    h = 1e-30
    cs = np.imag(gelu(x + 1j * h, form)) / h
    assert np.abs(gelu_grad(x, form) - cs).max() <= 1e-13
    z = np.linspace(-7, 7, 1401)
    assert np.abs(np.imag(erf(z + 1j * h)) / h - 2 / np.sqrt(np.pi) * np.exp(-z * z)).max() <= 1e-13


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_gelu_saturates_without_overflow(dtype, form):
    big = np.finfo(dtype).max
    x = np.array([-big, -1e10, -10.5, 10.5, 1e10, big], dtype=dtype)
    with np.errstate(**RAISE):
        g, dg = gelu(x, form), gelu_grad(x, form)
    np.testing.assert_array_equal(g, np.where(x > 0, x, 0))
    np.testing.assert_array_equal(dg, (x > 0).astype(dtype))
    assert g.dtype == dg.dtype == dtype


# ---- LayerNorm -----------------------------------------------------------------------------

def test_layernorm_eps_and_biased_variance_as_haiku():
    """eps = 1e-5 (Haiku's default); var is the biased variance (np.var, ddof 0); a
    constant token normalises to 0 (the offset) instead of dividing by zero."""
    assert LN_EPS == 1e-5 and LayerSpec("pre_ln").opts["eps"] == 1e-5
    rng = np.random.default_rng(5)
    E = rng.standard_normal((2, 3, 5))
    E[1, 2] = 0.7
    scale, offset = rng.standard_normal(5), rng.standard_normal(5)
    out, _ = layernorm_forward(E, scale, offset)
    mu, var = E.mean(-1, keepdims=True), E.var(-1, keepdims=True)
    assert_close(out, scale * (E - mu) / np.sqrt(var + 1e-5) + offset, "algebra")
    np.testing.assert_array_equal(out[1, 2], offset)


@pytest.mark.parametrize("spread", [1.0, 3e-3, 1e3])
def test_layernorm_backward_is_exact(spread):
    """Entry by entry against complex-step derivatives, random upstream gradient; tokens
    of spread 3e-3 have var ~ eps, where dropping eps or the mean's dependence shows."""
    rng = np.random.default_rng(6)
    E = 0.2 + spread * rng.standard_normal((2, 3, 4))
    scale, offset = 1 + 0.3 * rng.standard_normal(4), 0.1 * rng.standard_normal(4)
    out, cache = layernorm_forward(E, scale, offset)
    G = rng.standard_normal(out.shape)
    dE, dscale, doffset = layernorm_backward(G, cache)
    res = check_gradients(lambda a: np.sum(G * layernorm_forward(*a)[0]), [E, scale, offset], [dE, dscale, doffset],
                          rng, entrywise=True)
    assert res.ok, res.detail


# ---- positional encodings -------------------------------------------------------------------

def test_positional_encoding_values_are_the_official_formula():
    """create_pos_encoding(T, P): position * exp(arange(0, P, 2) * -(log 10000 / P)), sin on
    even columns, cos on odd ones; row 0 = (0, 1, 0, 1, ...)."""
    T, P = 21, 10                                                      # the classic-token setting
    pe = positional_encoding(T, P)
    div = np.exp(np.arange(0, P, 2) * (-math.log(10000.0) / P))
    want = np.zeros((T, P))
    want[:, 0::2] = np.sin(np.arange(T)[:, None] * div)
    want[:, 1::2] = np.cos(np.arange(T)[:, None] * div)
    np.testing.assert_array_equal(pe, want)
    np.testing.assert_array_equal(pe[0], [0, 1] * 5)
    assert pe[3, 0] == math.sin(3) and pe[3, 1] == math.cos(3)
    assert abs(pe[7, 4] - math.sin(7 / 10000 ** (4 / 10))) < 1e-15
    odd = positional_encoding(4, 5)                                    # odd P: the last column is a sine
    assert_close(odd[:, 4], np.sin(np.arange(4) / 10000 ** (4 / 5)), "algebra")


def test_posenc_add_and_concat():
    E, _ = _tokens(d=3, N=4)
    add = LayerSpec("posenc")
    out, _ = add.forward(E.astype(np.float32), PosEncParams())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, E.astype(np.float32) + positional_encoding(5, 4).astype(np.float32))
    cat = LayerSpec("posenc", (("mode", "concat"), ("width", 6)))
    out, _ = cat.forward(E, PosEncParams())
    assert cat.out_width(4) == 10 and out.shape == (2, 5, 10)
    np.testing.assert_array_equal(out[..., :4], E)
    np.testing.assert_array_equal(out[0, :, 4:], positional_encoding(5, 6))
    with pytest.raises(ValueError, match="only with mode 'concat'"):
        LayerSpec("posenc", (("width", 4),))


# ---- pre-LN and its placement ------------------------------------------------------------

def test_pre_ln_is_e_plus_the_block_branch_of_the_normalised_tokens():
    """out = e + f(LN(e)) with f the attention's output (the official block), which is not
    the stack LN layer -> lsa layer (that gives LN(e) + f(LN(e)))."""
    E, _ = _tokens()
    spec = LayerSpec("pre_ln", (("block", "lsa"),))
    p = spec.init(np.random.default_rng(7), 4, InitSettings(scale=1.0, dtype=np.float64))
    ln_scale, ln_offset, lsa_p = split_params(p)
    ln_scale, ln_offset = 1 + 0.1 * np.arange(4), 0.05 * np.arange(4)
    p = type(p)(ln_scale, ln_offset, *lsa_p)
    out, _ = spec.forward(E, p)
    n, _ = layernorm_forward(E, ln_scale, ln_offset)
    block, _ = R.lsa_forward(n, lsa_p)
    assert_close(out, E + _attention_output(n, lsa_p, softmax=False), "algebra")
    assert np.abs(out - block).max() > 0.1                             # LN layer then LSA layer differs


def test_pre_ln_init_draws_the_blocks_numbers_and_unit_layernorm():
    for block, options in (("lsa", {}), ("softmax", {"heads": 2}), ("mlp", {"width": 5})):
        inner = LayerSpec(block, tuple(options.items()))
        wrapped = LayerSpec("pre_ln", (("block", block), ("block_options", options)))
        st = InitSettings(scale=0.5, n_layers=2, dtype=np.float32)
        p, q = wrapped.init(np.random.default_rng(8), 6, st), inner.init(np.random.default_rng(8), 6, st)
        assert p._fields == ("ln_scale", "ln_offset", *q._fields)
        assert all(np.array_equal(a, b) for a, b in zip(p[2:], q))
        np.testing.assert_array_equal(p.ln_scale, np.ones(6, np.float32))
        np.testing.assert_array_equal(p.ln_offset, np.zeros(6, np.float32))


def test_pre_ln_refuses_a_clipping_or_non_residual_block():
    with pytest.raises(ValueError, match="give clip to pre_ln"):
        LayerSpec("pre_ln", (("block_options", {"clip": 1.0}),))
    with pytest.raises(ValueError, match="pre_ln block must be one of"):
        LayerSpec("pre_ln", (("block", "embed"),))


def _attention_output(n, p, softmax):
    """The official MultiHeadAttention's output (no residual), written out: context-only
    keys and values, logits q . k (/ sqrt(Kd) and a softmax over the keys when softmax)."""
    q = np.einsum("hkd,btd->bhtk", p.W_Q, n)
    k = np.einsum("hkd,bsd->bhsk", p.W_K, n[:, :-1])
    v = np.einsum("hvd,bsd->bhsv", p.W_V, n[:, :-1])
    A = np.einsum("bhtk,bhsk->bhts", q, k)
    if softmax:
        A = np.exp(A / np.sqrt(q.shape[-1]))
        A = A / A.sum(axis=-1, keepdims=True)
    return np.einsum("hdv,bhts,bhsv->btd", p.P, A, v)


def _mlp_output(n, p):
    """The official MLP: Linear(4D, bias) -> gelu (tanh) -> Linear(D, bias)."""
    h = n @ p.W_1.T + p.b_1
    a = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return a @ p.W_2.T + p.b_2


def test_transformer_stack_places_layernorm_as_the_official_code():
    """Non-recurrent, K = 3: no LN before the first attention, LN before the later ones,
    LN before every MLP; first layer softmax. Its forward equals trans_block applied
    three times with those parameters."""
    arch = transformer_stack(3, first_softmax=True, layer_norm=True, mlp=True, mlp_width=6)
    assert arch.kinds() == ("softmax", "pre_ln", "pre_ln", "pre_ln", "pre_ln", "pre_ln")
    assert [s.opts.get("block") for s in arch.layers] == [None, "mlp", "lsa", "mlp", "lsa", "mlp"]
    E, _ = _tokens()
    params = arch.init(np.random.default_rng(9), 4, InitSettings(scale=1.0, dtype=np.float64))
    h = E                                                              # trans_block, three times
    for nl in range(3):
        pa, pm = params[2 * nl], params[2 * nl + 1]
        n = h
        if nl > 0:
            ln_scale, ln_offset, pa = split_params(pa)
            n = layernorm_forward(h, ln_scale, ln_offset)[0]
        h = h + _attention_output(n, pa, softmax=nl == 0)
        ln_scale, ln_offset, pm = split_params(pm)
        h = h + _mlp_output(layernorm_forward(h, ln_scale, ln_offset)[0], pm)
    assert_close(model_forward(E, params, arch)[0], h, "algebra")
    rec = transformer_stack(4, recurrent=True, layer_norm=True, mlp=True)
    assert rec.tie == (0, 1, 0, 1, 0, 1, 0, 1) and rec.kinds() == ("pre_ln",) * 8
    front = transformer_stack(1, front=(LayerSpec("embed", (("width", 8),)), LayerSpec("mlp")))
    assert front.widths(2) == [2, 8, 8, 8] and front.tie == (0, 1, 2)
    with pytest.raises(ValueError, match="first_softmax needs separate layers"):
        transformer_stack(2, recurrent=True, first_softmax=True)


# ---- mixed stacks: training, checkpoint and resume; width-changing models ------------------

MIXED_LAYERS = [{"kind": "posenc"}, {"kind": "softmax", "heads": 2}, {"kind": "mlp", "width": 8, "gelu": "erf"},
                {"kind": "pre_ln", "block": "lsa", "clip": 10.0}]


def test_a_mixed_stack_trains_checkpoints_and_resumes_bit_identically(tmp_path):
    from test_training import checkpoint_of, eval_rows, metrics_of, same_params, tiny, train

    layers = json.dumps(MIXED_LAYERS)
    cfg = tiny(layers=layers, n_layers=2)
    assert cfg.arch().kinds() == ("posenc", "softmax", "mlp", "pre_ln")
    full = train(cfg, tmp_path / "full")
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    train(tiny(layers=layers, n_layers=2, steps=20), tmp_path / "part")
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert same_params(full.params, resumed.params) and same_params(resumed.params, checkpoint_of(tmp_path / "part").params)
    assert eval_rows(metrics_of(tmp_path / "full")) == eval_rows(metrics_of(tmp_path / "part"))
    with open(os.path.join(tmp_path / "full", "config.json")) as f:
        assert config_from_dict(json.load(f)) == cfg
    assert [type(p).__name__ for p in full.params] == ["PosEncParams", "SoftmaxParams", "MLPParams",
                                                       "PreLNLSAParams"]


def test_a_mixed_stack_run_with_analyses_writes_its_summary_and_plots(tmp_path):
    """The LSA weight analyses are skipped with the reason for a mixed stack; the OOD
    sweeps (through the model itself) are computed; the plots that apply are drawn."""
    from test_training import tiny
    from verify import plots, runs

    res = runs.train_run(tiny(layers=json.dumps(MIXED_LAYERS), n_layers=2, steps=20), str(tmp_path / "m"))
    s = res.summary
    for name in ("weights", "interpolation", "products"):
        assert "products W_K^T W_Q" in s[name]["skipped"], name
    assert len(s["ood"]["input"]["model"]) == len(s["ood"]["input"]["alpha"])
    drawn = {os.path.basename(p) for p in plots.make_plots(str(tmp_path / "m"))}
    assert {"loss.png", "alignment.png", "ood.png"} <= drawn and "weights.png" not in drawn


def test_config_layers_are_checked_and_default_to_the_lsa_stack():
    assert TrainConfig().model.layers is None and TrainConfig().arch() == lsa_stack(1)
    tied = json.dumps({"layers": [{"kind": "mlp"}, {"kind": "lsa"}, {"kind": "mlp"}], "tie": [0, 1, 0]})
    assert TrainConfig(model=ModelConfig(layers=tied)).arch().tie == (0, 1, 0)
    for bad, msg in (("[", "JSONDecodeError"), ('[{"kind": "lsa", "cilp": 1}]', "no option"),
                     ('[{"kind": "embed", "width": 1}]', "token width is 1"),
                     ('[{"kind": "posenc"}]', "no parameters")):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(model=ModelConfig(layers=bad))
    with pytest.raises(ConfigError, match="leave heads, token_clip at their defaults"):
        TrainConfig(model=ModelConfig(layers='[{"kind": "lsa"}]', heads=2, token_clip=1.0))


def test_a_width_changing_model_has_one_loss_and_grads():
    """The sine-task shape: tokens (x, y) of width 2, embed to 8, residual MLP, one LSA
    layer; the prediction is minus the last feature of the query (EmbeddedLayout).
    Loss gradients against complex-step derivatives of the oracle."""
    arch = transformer_stack(1, front=(LayerSpec("embed", (("width", 8),)), LayerSpec("mlp", (("width", 12),))))
    lay = EmbeddedLayout(1, 1, width=8)
    rng = np.random.default_rng(10)
    t = R.sample_tasks(rng, 3, 1, 4, 1)
    E = lay.build(t.X, t.Y, t.x_q)
    params = arch.init(rng, lay.D_in, InitSettings(scale=1.0, dtype=np.float64))
    L, grads, aux = R.loss_and_grads(E, t.y_q, params, arch, lay)
    out, _ = model_forward(E, params, arch)
    np.testing.assert_array_equal(aux["pred"], -out[:, -1, 7:])

    def f(a):
        return oracle_loss(lay.readout(oracle_model(a[0], tree_unflatten(params, a[1:]), arch)), t.y_q)

    res = check_gradients(f, [E, *tree_leaves(params)], [aux["dE"], *tree_leaves(grads)], rng)
    assert res.ok, res.detail
    assert_close(np.asarray(L), np.asarray(f([E, *tree_leaves(params)])), "algebra")
    with pytest.raises(ValueError, match="token width D=2 for this layout after the last layer, got 8"):
        R.loss_and_grads(E, t.y_q, params, arch, R.TokenLayout(1, 1))


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_fused_backends_refuse_the_new_kinds_naming_them(kind):
    """The CuPy backend runs LSA stacks only; the Numba backend runs these kinds on its
    mixed-stack kernels (tests/test_numba_mixed.py)."""
    arch = Arch((LayerSpec(kind), LayerSpec("lsa")))
    reason = get_backend("cupy").supports(arch)
    assert isinstance(reason, str) and kind in reason, ("cupy", reason)
    assert get_backend("numba").supports(arch) is None
    assert get_backend("numpy").supports(arch) is None


# ---- memory and parameter counts -------------------------------------------------------------

def _arrays(x):
    """Every ndarray inside a cache (nested NamedTuples and LayerSpecs skipped over)."""
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, tuple):
        for y in x:
            yield from _arrays(y)


SPECS = [LayerSpec("softmax", (("heads", 2), ("key_size", 3), ("value_size", 5))),
         LayerSpec("softmax", (("causal", True), ("clip", 0.3))),
         LayerSpec("mlp", (("width", 6),)), LayerSpec("mlp", (("bias", False), ("clip", 0.3))),
         LayerSpec("embed", (("width", 7),)), LayerSpec("embed", (("bias", True),)),
         LayerSpec("posenc"), LayerSpec("posenc", (("mode", "concat"), ("width", 3))),
         LayerSpec("pre_ln"), LayerSpec("pre_ln", (("block", "softmax"), ("clip", 0.3))),
         LayerSpec("pre_ln", (("block", "mlp"), ("block_options", {"width": 5})))]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_cache_floats_and_param_floats_count_what_is_kept_and_drawn(spec):
    """cache_floats: the distinct memory the forward keeps (cache and output; views and
    the input counted once), per task; param_floats: the numbers init draws."""
    E, _ = _tokens(B=3, N=6)
    arch = Arch((spec,))
    params = arch.init(np.random.default_rng(11), 4, InitSettings(dtype=np.float64))
    out, cache = model_forward(E, params, arch)
    owners = {}
    for a in [E, out, *cache.outputs, *_arrays(tuple(cache.layer_caches))]:
        base = a if a.base is None else a.base
        owners[id(base)] = base.size
    param_ids = {id(a) for p in params for a in p}
    kept = sum(n for i, n in owners.items() if i not in param_ids)
    assert arch.cache_floats(7, 4) * E.shape[0] == kept
    assert arch.param_floats(4) == sum(a.size for p in params for a in p)


def test_numerical_gradient_of_posenc_passes_only_the_token_columns():
    """Concat mode: dE is the first D columns of dout (the encoding has no input)."""
    E, _ = _tokens(B=1, N=2)
    spec = LayerSpec("posenc", (("mode", "concat"), ("width", 2)))
    out, cache = spec.forward(E, PosEncParams())
    G = np.random.default_rng(12).standard_normal(out.shape)
    dE, _ = spec.backward(G, cache)
    num = numerical_gradient(lambda a: np.sum(G * spec.oracle(a[0], PosEncParams())), [E])[0]
    assert_close(dE, num, "complex_step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(dE, G[..., :4])


# ---- the golden vectors of these layers exercise what they are for -------------------------

def test_layer_vectors_exercise_their_edge():
    """softmax-H2-ctx-large-logits has logits beyond exp's float64 range (only a
    max-subtracted softmax computes it); layernorm-variance-near-eps has variances of the
    order of eps; mlp-tanh-nobias is the bias-free MLP (zero biases)."""
    from verify import claims_vectors as cv

    cases = {e["name"]: (i, o) for e, i, o in cv.load_committed()}
    a, _ = cases["softmax-H2-ctx-large-logits"]
    q = np.einsum("hkd,btd->bhtk", a["W_Q"], a["E"])
    k = np.einsum("hkd,bsd->bhsk", a["W_K"], a["E"][:, :-1])
    Z = np.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(a["W_Q"].shape[1])
    assert np.abs(Z).max() > math.log(np.finfo(np.float64).max)
    a, _ = cases["layernorm-variance-near-eps"]
    assert 0.1 < np.median(a["E"].var(axis=-1)) / 1e-5 < 10
    a, _ = cases["mlp-tanh-nobias"]
    assert not a["b_1"].any() and not a["b_2"].any()
