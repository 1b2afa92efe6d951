"""The layer seam: a layer type written in one file (here, in this test, exactly as
CONTRIBUTING.md shows it) is picked up by the model, the oracle, the gradient checks
and mixed stacks through the registry alone; backends that cannot run it refuse."""

from typing import NamedTuple

import numpy as np
import pytest

import reference as R
from reference.gradcheck import check_gradients
from reference.layers import InitSettings, LayerSpec, LayerType, register, unregister
from reference.model import Arch, lsa_stack, model_forward
from reference.oracle import oracle_model
from reference.tolerances import assert_close


# ---- the example of CONTRIBUTING.md ---------------------------------------------------

class TokenMapParams(NamedTuple):
    W: object  # (D, D)


class TokenMapCache(NamedTuple):
    E: object        # (B, T, D) layer input
    params: object


def token_map_forward(E, params):
    """out_j = e_j + W e_j for every token j (a residual per-token linear map)."""
    out = E + E @ params.W.T                                           # (B, T, D)
    return out, TokenMapCache(E, params)


def token_map_backward(dout, cache):
    E, params = cache
    # forward: out = E + E W^T, so dE = dout + dout W and dW = sum_bt dout^T E
    dE = dout + dout @ params.W                                        # (B, T, D)
    dW = np.einsum("bti,btj->ij", dout, E)                              # (D, D)
    return dE, TokenMapParams(dW)


def token_map_oracle(E, params):
    B, T, D = E.shape
    out = np.array(E, dtype=np.result_type(E, params.W))
    for b in range(B):
        for j in range(T):
            for a in range(D):
                for c in range(D):
                    out[b, j, a] = out[b, j, a] + params.W[a, c] * E[b, j, c]
    return out


class TokenMap(LayerType):
    kind = "token_map"
    OPTIONS = {}

    def param_type(self, **options):
        return TokenMapParams

    def init(self, rng, D_in, settings, **options):
        std = np.sqrt(settings.scale / settings.n_layers / D_in)
        return TokenMapParams(settings.xp.asarray((std * rng.standard_normal((D_in, D_in))).astype(settings.dtype)))

    def forward(self, E, params, **options):
        return token_map_forward(E, params)

    def backward(self, dout, cache):
        return token_map_backward(dout, cache)

    def oracle(self, E, params, **options):
        return token_map_oracle(E, params)

    def cache_floats(self, T, D_in, **options):
        return T * D_in

    def param_floats(self, D_in, **options):
        return D_in * D_in

    def check_params(self, params, D_in, **options):
        if not isinstance(params, TokenMapParams) or params.W.shape != (D_in, D_in):
            raise ValueError(f"token_map params must be TokenMapParams with W ({D_in}, {D_in})")


@pytest.fixture
def token_map():
    layer = register(TokenMap())
    yield layer
    unregister("token_map")


def _mixed_arch():
    lsa = LayerSpec("lsa", (("clip", None),))
    tm = LayerSpec("token_map")
    return Arch((lsa, tm, lsa, tm), (0, 1, 0, 2))          # LSA weights shared by layers 0 and 2


def test_a_registered_layer_runs_in_a_mixed_stack_against_the_oracle(token_map):
    arch = _mixed_arch()
    assert arch.n_param_layers == 3 and arch.kinds() == ("lsa", "token_map", "lsa", "token_map")
    rng = np.random.default_rng(0)
    t = R.sample_tasks(rng, 3, 2, 4)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    params = arch.init(np.random.default_rng(1), 3, InitSettings(scale=1.0, dtype=np.float64))
    assert [type(p).__name__ for p in params] == ["LSAParams", "TokenMapParams", "TokenMapParams"]
    out, _ = model_forward(E, params, arch)
    assert_close(out, oracle_model(E, params, arch), "algebra")


def test_mixed_stack_gradients_against_complex_step(token_map):
    arch = _mixed_arch()
    rng = np.random.default_rng(2)
    t = R.sample_tasks(rng, 3, 2, 4)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    params = arch.init(rng, 3, InitSettings(scale=1.0, dtype=np.float64))
    L, grads, aux = R.loss_and_grads(E, t.y_q, params, arch, R.TokenLayout(2, 1))
    leaves = [a for p in params for a in p]

    def f(args):
        ps = []
        i = 1
        for p in params:
            ps.append(type(p)(*args[i:i + len(p)]))
            i += len(p)
        out, _ = model_forward(args[0], tuple(ps), arch)
        return R.loss_forward(R.readout(out, 2), t.y_q.astype(out.dtype))[0]

    res = check_gradients(f, [E, *leaves], [aux["dE"], *[a for g in grads for a in g]], rng, entrywise=True)
    assert res.ok, res.detail


def test_wrong_params_for_a_layer_are_refused(token_map):
    arch = _mixed_arch()
    E = np.zeros((1, 3, 3))
    params = arch.init(np.random.default_rng(3), 3, InitSettings(dtype=np.float64))
    with pytest.raises(ValueError, match="token_map params"):
        model_forward(E, (params[0], params[0], params[2]), arch)


def test_fused_backends_refuse_what_they_cannot_run(token_map):
    from reference.backends import get_backend, require_support

    arch = _mixed_arch()
    nb = get_backend("numba")
    assert "token_map" in nb.supports(arch)
    with pytest.raises(ValueError, match="cannot run this model.*has kind 'token_map'"):
        require_support(nb, arch)
    assert get_backend("numpy").supports(arch) is None
    # lsa layers of different clip values: the numba backend runs them as a mixed stack
    require_support(nb, Arch((LayerSpec("lsa", (("clip", 1.0),)), LayerSpec("lsa"))))


def test_tie_and_spec_validation():
    lsa = LayerSpec("lsa")
    with pytest.raises(ValueError, match="order of first use"):
        Arch((lsa, lsa), (1, 0))
    with pytest.raises(ValueError, match="share parameter set 0 but have different specs"):
        Arch((lsa, LayerSpec("lsa", {"clip": 2.0}.items())), (0, 0))
    with pytest.raises(ValueError, match="unknown layer kind 'no_such_kind'"):
        LayerSpec("no_such_kind")
    with pytest.raises(ValueError, match=r"no option\(s\) \['cilp'\]"):
        LayerSpec("lsa", (("cilp", 1.0),))
    with pytest.raises(TypeError, match="causal must be a bool"):
        LayerSpec("lsa", (("causal", 1),))
    a = lsa_stack(3, recurrent=True, clip=10.0)
    assert Arch.from_dict(a.to_dict()) == a and a.recurrent and a.n_param_layers == 1


def test_init_draws_in_the_documented_order():
    """A stack's init draws each parameter set in order from one generator, and for LSA
    W_Q, W_K, W_V, P: the same numbers as calling init_lsa_params set by set."""
    arch = lsa_stack(3, heads=2, key_size=4)
    got = arch.init(np.random.default_rng(9), 5, InitSettings(scale=0.002, n_layers=3, dtype=np.float32))
    rng = np.random.default_rng(9)
    want = tuple(R.init_lsa_params(rng, 5, H=2, key_size=4, n_layers_for_scale=3) for _ in range(3))
    assert all(np.array_equal(x, y) for a, b in zip(got, want) for x, y in zip(a, b))


@pytest.mark.parametrize("causal, clip", [(False, None), (True, None), (False, 0.3), (True, 0.3)])
def test_cache_size_is_what_the_forward_keeps(causal, clip):
    """cache_floats counts the distinct memory the model forward holds (input, caches and
    outputs; views counted once), per task."""
    arch = lsa_stack(2, causal=causal, clip=clip, heads=3, key_size=2, value_size=5)
    rng = np.random.default_rng(4)
    t = R.sample_tasks(rng, 2, 3, 6)
    E = R.build_tokens(t.X, t.Y, t.x_q)
    params = arch.init(rng, 4, InitSettings(dtype=np.float64))
    out, cache = model_forward(E, params, arch)
    arrays = [E, out] + list(cache.outputs) + [a for c in cache.layer_caches for a in c
                                                if isinstance(a, np.ndarray)]
    owners = {}
    for a in arrays:
        base = a if a.base is None else a.base
        owners[id(base)] = base.size
    assert arch.cache_floats(7, 4) * E.shape[0] == sum(owners.values())


@pytest.mark.parametrize("options", [{}, {"heads": 3, "key_size": 2, "value_size": 5}, {"merged": True, "heads": 2}])
def test_param_floats_is_the_size_init_draws(options):
    arch = lsa_stack(3, **options)
    params = arch.init(np.random.default_rng(0), 6, InitSettings(dtype=np.float64))
    assert arch.param_floats(6) == sum(a.size for p in params for a in p)
    assert lsa_stack(3, recurrent=True, **options).param_floats(6) == sum(a.size for a in params[0])
