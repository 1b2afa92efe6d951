"""Claims of the mesa layer and the delta rule (issue #16, reference/layers/mesa.py and
delta.py): the three mesa forwards agree, the reverse Sherman-Morrison backward equals
complex-step derivatives and the plain backward through the solves, the delta rule's
chunked form equals its recurrence, both backwards equal complex step, and float32 never
returns a wrong answer silently on the study's grid (``verify/mesa_study.py``)."""

import numpy as np

from reference.gradcheck import check_gradients
from reference.layers import InitSettings, LayerSpec
from reference.layers.delta import delta_backward, delta_forward
from reference.layers.mesa import MesaParams, mesa_backward, mesa_forward
from reference.oracle import oracle_delta_layer, oracle_mesa_layer
from reference.tolerances import tolerance

from . import mesa_study
from .registry import Outcome, claim

SRC_MESA = "von Oswald et al. 2023 (arXiv 2309.05858), mesa layer"
SRC_DELTA = "Schlag et al. 2021; Yang et al. 2024 (DeltaNet, Gated DeltaNet)"
FLOAT32_BOUND = 2e-3     # the float32 study's bound for an answer that is returned


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _mesa_config(rng, max_T):
    D = int(rng.integers(2, 6))
    # key_size <= D and forget >= 0.9: A_t stays well conditioned (Kd > D keys span a subspace, and the prior
    # g^t I / lam then vanishes over long sequences: the reverse walk refuses such cases, see SPEC section 16)
    opts = {"heads": int(rng.integers(1, 3)), "key_size": int(rng.integers(1, D + 1)),
            "value_size": int(rng.integers(1, 4))}
    forget = None if rng.random() < 0.5 else float(rng.uniform(0.9, 1.0))
    p = LayerSpec("mesa", tuple(opts.items())).init(rng, D, InitSettings(scale=1.0, dtype=np.float64))
    p = p._replace(lam=rng.uniform(0.1, 3.0, p.lam.shape))
    E = rng.uniform(-1, 1, (2, int(rng.integers(1, max_T + 1)), D))
    return E, p, forget


def _delta_config(rng, max_T):
    D = int(rng.integers(2, 6))
    beta = None if rng.random() < 0.5 else float(rng.uniform(0.1, 1.0))
    gate = bool(rng.random() < 0.5)
    opts = {"heads": int(rng.integers(1, 3)), "key_size": int(rng.integers(1, 5)),
            "value_size": int(rng.integers(1, 4)), "beta": beta, "gate": gate}
    p = LayerSpec("delta", tuple(opts.items())).init(rng, D, InitSettings(scale=1.0, dtype=np.float64))
    E = rng.uniform(-1, 1, (2, int(rng.integers(1, max_T + 1)), D))
    return E, p, beta, gate


@claim("mesa.forms_agree", source=SRC_MESA,
       statement="The Sherman-Morrison, direct-solve and conjugate-gradient forms of the mesa layer give the same "
                 "output, equal to the loop oracle (ridge solve by Gaussian elimination per token)",
       method="random (D, heads, key sizes <= D, value sizes, T <= 40, forget in [0.9, 1], lam in [0.1, 3]) in float64; worst relative "
              "error of direct and cg against sm, and of sm against the oracle (T <= 8)")
def _(ctx):
    rng = ctx.rng(161)
    worst, n = 0.0, 40 if ctx.full else 12
    for i in range(n):
        E, p, forget = _mesa_config(rng, 40)
        ref, _ = mesa_forward(E, p, forget=forget, form="sm")
        for form in ("direct", "cg"):
            worst = max(worst, _rel(mesa_forward(E, p, forget=forget, form=form)[0], ref))
        if E.shape[1] <= 8:
            worst = max(worst, _rel(ref, oracle_mesa_layer(E, p, forget=forget)))
    tol = tolerance(np.float64, "algebra")
    return Outcome.at_most(worst, tol.rtol, "well-conditioned ridge systems (cond(A) <= ~1e2): float64 rounding of "
                           "the recursion, the LU solve and CG to its 1e-12 residual", configurations=n)


@claim("mesa.backward.complex_step", source=SRC_MESA,
       statement="The memory-light reverse Sherman-Morrison backward (dL/dlam = Tr(dL/dR_0)) and the plain backward "
                 "through the solves equal complex-step derivatives of the layer",
       method="random configurations in float64; f = sum(G * out) for a random upstream G; 4 random directions over "
              "E and every parameter (lam included) per configuration; forms sm and direct; worst relative error")
def _(ctx):
    rng = ctx.rng(162)
    worst, n = 0.0, 12 if ctx.full else 4
    for i in range(n):
        E, p, forget = _mesa_config(rng, 12)
        for form in ("sm", "direct"):
            out, cache = mesa_forward(E, p, forget=forget, form=form)
            G = rng.standard_normal(out.shape)
            dE, dp = mesa_backward(G, cache)

            def f(args):
                return np.sum(G * mesa_forward(args[0], MesaParams(*args[1:]), forget=forget, form=form)[0])

            res = check_gradients(f, [E, *p], [dE, *dp], rng)
            if not res.ok:
                return Outcome.at_most(float("inf"), 0, "a gradient check failed", detail=res.detail)
            worst = max(worst, res.rel_err)
    tol = tolerance(np.float64, "complex_step")
    return Outcome.at_most(worst, tol.rtol, tol.reason, configurations=n)


@claim("mesa.backward.reverse_sm_vs_direct", source=SRC_MESA,
       statement="The reverse Sherman-Morrison backward equals the plain backward through the direct solves "
                 "(dE and every parameter gradient, lam's included)",
       method="random configurations in float64, T <= 64; the same random upstream gradient through forms sm and "
              "direct; worst relative error over all gradients")
def _(ctx):
    rng = ctx.rng(163)
    worst, n = 0.0, 30 if ctx.full else 10
    for _ in range(n):
        E, p, forget = _mesa_config(rng, 64)
        out, c_sm = mesa_forward(E, p, forget=forget, form="sm")
        _, c_dir = mesa_forward(E, p, forget=forget, form="direct")
        G = rng.standard_normal(out.shape)
        g_sm, g_dir = mesa_backward(G, c_sm), mesa_backward(G, c_dir)
        worst = max([worst, _rel(g_sm[0], g_dir[0])] + [_rel(a, b) for a, b in zip(g_sm[1], g_dir[1])])
    tol = tolerance(np.float64, "algebra")
    return Outcome.at_most(worst, tol.rtol, "two backward computations of one function: float64 rounding of the "
                           "reverse recursion vs LU solves on well-conditioned systems", configurations=n)


@claim("delta.chunked_equals_recurrent", source=SRC_DELTA,
       statement="The chunked (UT-transform) form of the delta rule equals its recurrence and the loop oracle, with "
                 "and without the gate, for learned and fixed beta",
       method="random (D, heads, sizes, T <= 40, chunk in 1..9, beta, gate) in float64; worst relative error of "
              "chunked vs recurrent, and recurrent vs the oracle (T <= 8)")
def _(ctx):
    rng = ctx.rng(164)
    worst, n = 0.0, 40 if ctx.full else 15
    for _ in range(n):
        E, p, beta, gate = _delta_config(rng, 40)
        ref, _ = delta_forward(E, p, beta=beta, gate=gate)
        chunk = int(rng.integers(1, 10))
        worst = max(worst, _rel(delta_forward(E, p, beta=beta, gate=gate, form="chunked", chunk=chunk)[0], ref))
        if E.shape[1] <= 8:
            worst = max(worst, _rel(ref, oracle_delta_layer(E, p, beta=beta)))
    tol = tolerance(np.float64, "algebra")
    return Outcome.at_most(worst, tol.rtol, tol.reason, configurations=n)


@claim("delta.backward.complex_step", source=SRC_DELTA,
       statement="The delta rule's hand-written backward (through the recurrence; the chunked form recomputing each "
                 "chunk's states) equals complex-step derivatives",
       method="random configurations in float64; f = sum(G * out), 4 random directions over E and every parameter; "
              "both forms; worst relative error")
def _(ctx):
    rng = ctx.rng(165)
    worst, n = 0.0, 12 if ctx.full else 4
    for _ in range(n):
        E, p, beta, gate = _delta_config(rng, 12)
        for form, chunk in (("recurrent", 16), ("chunked", int(rng.integers(1, 5)))):
            out, cache = delta_forward(E, p, beta=beta, gate=gate, form=form, chunk=chunk)
            G = rng.standard_normal(out.shape)
            dE, dp = delta_backward(G, cache)

            def f(args):
                return np.sum(G * delta_forward(args[0], type(p)(*args[1:]), beta=beta, gate=gate, form=form,
                                                chunk=chunk)[0])

            res = check_gradients(f, [E, *p], [dE, *dp], rng)
            if not res.ok:
                return Outcome.at_most(float("inf"), 0, "a gradient check failed", detail=res.detail)
            worst = max(worst, res.rel_err)
    tol = tolerance(np.float64, "complex_step")
    return Outcome.at_most(worst, tol.rtol, tol.reason, configurations=n)


@claim("mesa.float32_safe_region", source="verify/mesa_study.py (this repository)",
       statement="In float32 every form of the mesa layer and the delta rule either returns an answer within 2e-3 "
                 "relative of float64 (forward and every gradient) or refuses with NonFiniteError; on the study's "
                 "grid the direct form and the delta rule never refuse, and sm and cg answer up to lam = 1",
       method="verify.mesa_study.measure over every form and the study's lam / beta values at T = 256 (quick) or "
              "T in 64..2048 (full); measured = the worst float32 error among the answers returned; the refusals and "
              "the safe-region answers are in the details")
def _(ctx):
    T_values = mesa_study.T_VALUES if ctx.full else mesa_study.QUICK_T
    worst, refused, unsafe_refusals = 0.0, [], 0
    for row in mesa_study.study(T_values, ctx.seed):
        if row["status"] == "ok":
            worst = max(worst, row["forward"], row["backward"])
            continue
        refused.append(f"{row['kind']} {row['form']} param={row['cond']:g} T={row['T']}")
        safe = row["form"] == "direct" or row["kind"] == "delta" or row["cond"] <= 1.0
        unsafe_refusals += safe
    if unsafe_refusals:
        return Outcome.at_most(float("inf"), FLOAT32_BOUND, "a form refused inside its safe region",
                               refused=refused)
    return Outcome.at_most(worst, FLOAT32_BOUND, "float32 eps 1.2e-7 times cond(A_T) <= ~1e4 on the grid's answered "
                           "points; beyond the guards refuse", refused=refused)
