"""The NumPy reference behind the adapter protocol (SPEC.md section 14).

``icgd conformance verify.adapters.numpy_adapter`` runs every vector case through this
file; it passes them all. Each function is one kind of the manifest, named after it,
and takes the case's inputs as keyword arguments the way the kit hands them:

* data as float64 NumPy arrays (``E``, ``dout``, ``X``, ...);
* configuration as Python values (``causal`` a bool, ``K`` an int, ``clip`` a float,
  ``+inf`` meaning no clipping) or, when 1-d, a float64 array (``etas``, ``eta_grid``);
* one layer's parameters as separate keyword arguments (``W_Q``, ``W_K``, ``W_V``,
  ``P``, or merged ``W_KQ``, ``W_PV``); the ``layer<k>.`` keys of a stack as the list
  ``layer`` of dicts (``layer[1]["P"]`` is the stored ``layer1.P``), dotted prefixes
  as nested dicts (``m["layer"][0]["W_Q"]`` is ``m.layer0.W_Q``).

It returns a dict of the outputs in the same structure. A port's adapter looks the
same with its own functions in place of ``reference``'s.
"""

import numpy as np

import reference as R
from reference.layers.layernorm import layernorm_backward, layernorm_forward
from reference.layers.posenc import positional_encoding
from reference.optim import AdamHP, AdamState, adam_init, adam_update
from reference.tokens import EmbeddedLayout
from reference.train_step import train_step

NAME = "the NumPy reference"


def _params(arrays, grad=False):
    """One layer's parameter NamedTuple from ``{"W_Q": ..., ...}`` (gradients: ``{"dW_Q": ...}``)."""
    g = "d" if grad else ""
    kind = R.MergedParams if g + "W_KQ" in arrays else R.LSAParams
    return kind(*(arrays[g + field] for field in kind._fields))


def _arrays(p, grad=False):
    """``{"W_Q": ..., ...}`` (gradients: ``{"dW_Q": ...}``) from a parameter NamedTuple."""
    return {("d" if grad else "") + field: a for field, a in zip(p._fields, p)}


def _clip(c):
    return None if c == float("inf") else c


def _arch(K, recurrent, causal, clip):
    return R.lsa_stack(K, recurrent=recurrent, causal=causal, clip=_clip(clip))


def layer(E, dout, causal, clip, **params):
    out, cache = R.lsa_forward(E, _params(params), causal=causal, clip=_clip(clip))
    dE, dp = R.lsa_backward(dout, cache)
    return {"out": out, "dE": dE, **_arrays(dp, grad=True)}


def stack(E, layer, dout, K, recurrent, causal, clip):
    out, cache = R.model_forward(E, tuple(_params(p) for p in layer), _arch(K, recurrent, causal, clip))
    dE, grads = R.model_backward(dout, cache)
    return {"out": out, "dE": dE, "layer": [_arrays(g, grad=True) for g in grads]}


def loss(E, y_q, layer, d, K, recurrent, causal, clip):
    L, grads, aux = R.loss_and_grads(E, y_q, tuple(_params(p) for p in layer), _arch(K, recurrent, causal, clip),
                                     R.TokenLayout(d, y_q.shape[1]))
    return {"pred": aux["pred"], "L": L, "dE": aux["dE"], "layer": [_arrays(g, grad=True) for g in grads]}


def _construction(X, Y, x_q, W_0, params, arch):
    layout = R.TokenLayout(X.shape[2], Y.shape[2])
    E = layout.build(X, Y, x_q, W_0=W_0)                               # query slot -W_0 x_q
    out, _ = R.model_forward(E, params, arch)
    return {"E": E, "layer": [_arrays(p) for p in params], "out": out, "pred": layout.readout(out)}


def gd(X, Y, x_q, W_0, eta, K, recurrent):
    params, arch = R.gd_stack(K, X.shape[2], Y.shape[2], X.shape[1], eta, W_0, recurrent=recurrent)
    pred_gd, W_gd = R.gd_predict(X, Y, x_q, eta, K, W_0=W_0)
    return {**_construction(X, Y, x_q, W_0, params, arch), "pred_gd": pred_gd, "W_gd": W_gd}


def gdpp(X, Y, x_q, W_0, etas, gammas):
    etas, gammas = [float(e) for e in etas], [float(g) for g in gammas]
    params, arch = R.gdpp_stack(X.shape[2], Y.shape[2], X.shape[1], etas, gammas, W_0)
    return {**_construction(X, Y, x_q, W_0, params, arch), "pred_gdpp": R.gdpp_predict(X, Y, x_q, etas, gammas, W_0=W_0)}


def adam(layer, m, v, t, lr, b1, b2, eps, clip_norm):
    """``layer[k]`` holds the parameters (``W_Q`` ...) and their gradients (``dW_Q`` ...)."""
    params = tuple(_params(p) for p in layer)
    grads = tuple(_params(p, grad=True) for p in layer)
    state = AdamState(tuple(_params(p) for p in m["layer"]), tuple(_params(p) for p in v["layer"]), t)
    new, st, norm = adam_update(params, grads, state, AdamHP(lr, b1, b2, eps, _clip(clip_norm)))
    return {"new": {"layer": [_arrays(p) for p in new]}, "new_m": {"layer": [_arrays(p) for p in st.m]},
            "new_v": {"layer": [_arrays(p) for p in st.v]}, "new_t": st.t, "grad_norm": norm}


def _spec(d, N, d_y, B, x_range, w_scale, noise_std, n_distractors):
    return R.TaskSpec(d, N, d_y, B, tuple(float(x) for x in x_range), w_scale, noise_std, n_distractors)


def train(layer, seed, n_steps, d, N, d_y, B, x_range, w_scale, noise_std, n_distractors, K, recurrent, causal, clip,
          lr, b1, b2, eps, clip_norm):
    """Steps s = 0 .. n_steps-1: tasks from default_rng([seed, s]), the loss before the update, Adam t = s + 1."""
    spec = _spec(d, N, d_y, B, x_range, w_scale, noise_std, n_distractors)
    arch, hp = _arch(K, recurrent, causal, clip), AdamHP(lr, b1, b2, eps, _clip(clip_norm))
    params = tuple(_params(p) for p in layer)
    state = adam_init(params)
    steps, losses, norms = [], [], []
    for s in range(n_steps):
        tasks = spec.sample(R.step_rng(seed, s))
        steps.append({"X": tasks.X, "Y": tasks.Y, "x_q": tasks.x_q, "y_q": tasks.y_q})
        res = train_step(params, state, tasks, arch, hp)
        params, state = res.params, res.state
        losses.append(res.loss)
        norms.append(res.grad_norm)
    return {"losses": losses, "grad_norms": norms, "step": steps, "final": {"layer": [_arrays(p) for p in params]}}


def tasks(seed, step, d, N, d_y, B, x_range, w_scale, noise_std, n_distractors):
    t = _spec(d, N, d_y, B, x_range, w_scale, noise_std, n_distractors).sample(R.step_rng(seed, step))
    return dict(zip(t._fields, t))


def init(seed, D, H, K, scale, key_size=None, value_size=None, merged=False):
    p = R.init_lsa_params(np.random.default_rng(seed), D, H=H, key_size=key_size, value_size=value_size,
                          n_layers_for_scale=K, scale=scale, dtype=np.float64, merged=merged)
    return _arrays(p)


def baselines(X, Y, x_q, y_q, eta, n_steps, ridge, eta_grid):
    """``eta`` is one float, or an array of one per step."""
    eta = eta if isinstance(eta, float) else [float(e) for e in eta]
    pred_gd, W_gd = R.gd_predict(X, Y, x_q, eta, n_steps)
    eta_ls, losses_ls = R.line_search_eta(X, Y, x_q, y_q, n_steps=n_steps, grid=eta_grid)
    return {"pred_gd": pred_gd, "W_gd": W_gd, "pred_ls": R.least_squares_predict(X, Y, x_q),
            "pred_ridge": R.least_squares_predict(X, Y, x_q, ridge=ridge), "eta_ls": eta_ls, "losses_ls": losses_ls}


def eta(d, N, d_y, x_range, w_scale, noise_std, eta):
    m2, m4 = R.uniform_moments(tuple(float(x) for x in x_range))
    eta_star, L_star = R.optimal_one_step_eta(d, N, m2, m4, w_scale, d_y, noise_std)
    L_eta = R.expected_one_step_loss(eta, d, N, m2, m4, w_scale, d_y, noise_std)
    return {"m2": m2, "m4": m4, "eta_star": eta_star, "L_star": L_star, "L_eta": L_eta}


# ---- the layer types after LSA (reference/layers/; SPEC.md section 5a) ---------------------

def _one_layer(kind, options, E, dout, params):
    """A layer spec's forward and its backward for ``dout``: out, dE, d<field>."""
    spec = R.LayerSpec(kind, options)
    out, cache = spec.forward(E, spec.param_type()(**params))
    dE, dp = spec.backward(dout, cache)
    return {"out": out, "dE": dE, **_arrays(dp, grad=True)}


def _gelu(gelu_erf):
    return "erf" if gelu_erf else "tanh"


def softmax_layer(E, dout, causal, clip, **params):
    return _one_layer("softmax", {"causal": causal, "clip": _clip(clip)}, E, dout, params)


def mlp_layer(E, dout, gelu_erf, clip, **params):
    return _one_layer("mlp", {"gelu": _gelu(gelu_erf), "clip": _clip(clip)}, E, dout, params)


def layernorm(E, ln_scale, ln_offset, dout, eps):
    out, cache = layernorm_forward(E, ln_scale, ln_offset, eps)
    dE, dln_scale, dln_offset = layernorm_backward(dout, cache)
    return {"out": out, "dE": dE, "dln_scale": dln_scale, "dln_offset": dln_offset}


def pre_ln_attention(E, dout, softmax, causal, eps, clip, **params):
    options = {"block": "softmax" if softmax else "lsa", "block_options": (("causal", causal),), "eps": eps,
               "clip": _clip(clip)}
    return _one_layer("pre_ln", options, E, dout, params)


def pre_ln_mlp(E, dout, gelu_erf, eps, clip, **params):
    options = {"block": "mlp", "block_options": (("gelu", _gelu(gelu_erf)),), "eps": eps, "clip": _clip(clip)}
    return _one_layer("pre_ln", options, E, dout, params)


def posenc(E, dout, concat, width):
    """pe (T, width) added to the tokens (width = D) or concatenated to them."""
    spec = R.LayerSpec("posenc", {"mode": "concat", "width": width} if concat else {})
    out, cache = spec.forward(E, spec.param_type()())
    dE, _ = spec.backward(dout, cache)
    return {"pe": positional_encoding(E.shape[1], width), "out": out, "dE": dE}


def embedded_loss(E, y_q, layer0, layer1, layer2, gelu_erf):
    """layer0 an embedding (W, b) to the model width, layer1 a residual MLP, layer2 LSA (the
    kind writes these keys literally, so they arrive as three arguments); the prediction is
    minus the last d_y features of the query token."""
    width, d_y = layer0["W"].shape[0], y_q.shape[1]
    arch = R.Arch((R.LayerSpec("embed", {"width": width, "bias": True}),
                   R.LayerSpec("mlp", {"width": layer1["W_1"].shape[0], "gelu": _gelu(gelu_erf)}), R.LayerSpec("lsa")))
    params = tuple(spec.param_type()(**p) for spec, p in zip(arch.layers, (layer0, layer1, layer2)))
    L, grads, aux = R.loss_and_grads(E, y_q, params, arch, EmbeddedLayout(E.shape[2] - d_y, d_y, width=width))
    return {"pred": aux["pred"], "L": L, "dE": aux["dE"], **{f"layer{k}": _arrays(g, grad=True) for k, g in enumerate(grads)}}


def causal_gd(X, Y, Phi_0, eta):
    """Sequence tokens and the causal Prop. 1 layer (SPEC.md section 15)."""
    from reference import causal_constructions as CC
    from reference import sequences as S

    d = X.shape[2]
    E = S.seq_tokens(X, Phi_0)
    p = CC.causal_gd_layer(d, eta, Phi_0)
    out, _ = R.lsa_forward(E, p, causal=True)
    E_code = S.code_tokens(X)
    out_code, _ = R.lsa_forward(S.mask_forward(E_code, 2 * d)[0], CC.causal_gd_layer(d, eta, layout="code"), causal=True)
    L, per_t, _ = S.seq_loss_forward(out[..., :d], Y)
    return {"E": E, **_arrays(p), "out": out, "pred": out[..., :d], "pred_gd": CC.causal_gd_predict(X, eta, Phi_0),
            "E_code": E_code, "pred_code": out_code[..., :d], "L": L, "per_t": per_t}


# ---- the mesa layer and the delta rule (SPEC.md section 16) ---------------------------------

MESA_FORMS = ("sm", "direct", "cg")          # the stored int64 form codes
DELTA_FORMS = ("recurrent", "chunked")


def mesa_layer(E, dout, forget, form, **params):
    """params W_Q, W_K, W_V, P, lam; ``form`` 0 Sherman-Morrison, 1 direct, 2 CG."""
    return _one_layer("mesa", {"forget": forget, "form": MESA_FORMS[form]}, E, dout, params)


def delta_layer(E, dout, gate, form, chunk=16, beta=None, **params):
    """params W_Q, W_K, W_V, P and, with beta learned (``beta`` absent), w_beta, b_beta, with
    ``gate``, w_alpha, b_alpha; ``form`` 0 recurrent, 1 chunked (``chunk`` tokens)."""
    options = {"beta": beta, "gate": gate, "form": DELTA_FORMS[form], "chunk": chunk}
    return _one_layer("delta", options, E, dout, params)


def classic_loss(X, Y, x_q, y_q, layer1, layer2, width):
    """Classic tokens, posenc concat (width) -> softmax (layer1) -> LSA (layer2), the loss
    and its gradients (SPEC.md section 5b)."""
    from reference.classic_tokens import classic_layout
    from reference.layers.posenc import PosEncParams
    from reference.layers.softmax import SoftmaxParams

    arch = R.Arch((R.LayerSpec("posenc", {"mode": "concat", "width": width}), R.LayerSpec("softmax"), R.LayerSpec("lsa")))
    layout = classic_layout(arch, X.shape[2], Y.shape[2])
    E = layout.build(X, Y, x_q)
    params = (PosEncParams(), SoftmaxParams(**layer1), R.LSAParams(**layer2))
    L, grads, aux = R.loss_and_grads(E, y_q, params, arch, layout)
    return {"E": E, "pred": aux["pred"], "L": L, "dE": aux["dE"],
            "layer1": _arrays(grads[1], grad=True), "layer2": _arrays(grads[2], grad=True)}


def copy_construction(X, Y, x_q, eta, width):
    """The Prop. 3 copy and GD layers on classic tokens (SPEC.md section 5b)."""
    from reference import copy_construction as CC
    from reference.classic_tokens import classic_layout

    d, N, d_y = X.shape[2], X.shape[1], Y.shape[2]
    arch, params = CC.fit_copy_layers(d, N, width, d_y, eta=eta)
    layout = classic_layout(arch, d, d_y)
    E = layout.build(X, Y, x_q)
    out, _ = R.model_forward(E, params, arch)
    return {"E": E, "layer1": _arrays(params[1]), "layer2": _arrays(params[2]), "out": out,
            "pred": layout.readout(out), "pred_gd": R.gd_predict(X, Y, x_q, eta, 1)[0]}


def causal_prop2(X, ridge, iteration, K, omega=None, omegas=None, alphas=None, betas=None, nu=None):
    """Prop. 2 on sequence tokens: K preconditioning layers and the GD readout layer;
    ``iteration`` 0 Neumann (omega), 1 Richardson (omegas, K + 1), 2 fixed-normaliser
    Chebyshev (alphas, betas: K each; nu; gamma_k = 1/nu) (SPEC.md section 15)."""
    from reference import causal_constructions as CC

    d = X.shape[2]
    if iteration == 0:
        gammas, coeffs = CC.neumann_coefficients(omega, K, ridge)
    elif iteration == 1:
        gammas, coeffs = CC.richardson_coefficients(omegas, ridge)
    else:
        gammas = np.full(K, 1.0 / nu)
        coeffs = CC.polynomial_coefficients(CC.chebyshev_polynomial(alphas, betas, nu), gammas, ridge)
    params, _ = CC.prop2_stack(d, gammas, coeffs)
    E = CC.precond_tokens(X, K)
    h, outs = E, []
    for p in params:
        h, _ = R.lsa_forward(h, p, causal=True)
        outs.append(h)
    return {"E": E, "gammas": np.asarray(gammas, np.float64), "coeffs": np.asarray(coeffs, np.float64),
            "layer": [_arrays(p) for p in params], "outs": np.stack(outs), "pred": h[..., :d],
            "pred_ridge": CC.ridge_predict(X, ridge)}


def lds_sampler(seed, step, variant, B, T, d, d_obs, init_range, noise_std, obs_noise_std, clip=None, mlp_seed=0,
                teacher_seed=0):
    """sample_sequences(default_rng([seed, step]), ...) for variant 0 linear, 1 partial,
    2 nonlinear, 3 contracting, 4 fixed; clip None: the variant's (SPEC.md section 15)."""
    from reference import sequences as S

    spec = S.SequenceSpec(variant=S.VARIANTS[variant], T=T, B=B, d=d, d_obs=d_obs, init_range=init_range,
                          noise_std=noise_std, obs_noise_std=obs_noise_std, clip=clip, mlp_seed=mlp_seed,
                          teacher_seed=teacher_seed)
    s = S.sample_sequences(R.step_rng(seed, step), spec, B)
    return dict(zip(s._fields, s))
