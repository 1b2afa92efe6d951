"""Numerical study of the mesa layer and the delta rule in float32 against float64.

Run ``python -m verify.mesa_study [--out verify/results/mesa-float32.md] [--quick]``. For
each form (mesa: Sherman-Morrison ``sm``, ``direct``, ``cg``; delta: ``recurrent``,
``chunked``), each sequence length T and each conditioning parameter (mesa: the ridge
parameter lam, so cond(A_t) grows like lam * sum |k|^2; delta: the step beta on unit keys,
contracting for beta < 2), the same inputs are run in float32 and in float64 and compared:

* forward: max |Delta_32 - Delta_64| / max |Delta_64| over the layer's update Delta = out - E;
* backward: the same relative error of the gradients (dE and every parameter, worst one)
  for a random upstream gradient;
* status: ``ok``, or the error the layer raised (a refusal is the intended outcome where
  float32 would give garbage; a finite wrong answer without a refusal is what the study
  looks for).

* where a guard refused, the float32 errors the layer would have returned with its guards
  switched off (the module constants ``PD_SLACK`` and ``REVERSE_RTOL`` of
  ``reference.layers.mesa`` set to infinity for that run only), so each refusal shows
  what it prevented.

Inputs: one task, D = Kd = Vd = 8, one head, W_Q = W_K = W_V = P = I. Mesa tokens: i.i.d.
normal with coordinate c scaled by 10^(-3 c / (D - 1)) (key variances from 1 to 1e-6, so
cond(A_t) = (1/lam + sum k k^T) conditioning grows with lam and T; it is reported); delta
tokens normalised to |k| = 1 (DeltaNet's key normalisation).
This module measures; the numbers live in the results file it writes, not here.
"""

import argparse
import contextlib
import os
import time

import numpy as np

from reference._checks import NonFiniteError
from reference.layers.delta import DeltaFixedParams, delta_backward, delta_forward
from reference.layers import mesa as mesa_module
from reference.layers.mesa import MesaParams, mesa_backward, mesa_forward

D = 8
T_VALUES = (64, 256, 1024, 2048)
LAM_VALUES = (1e-3, 1e-1, 1.0, 10.0, 1e3)
BETA_VALUES = (0.5, 1.0, 1.9, 2.1)
QUICK_T = (256,)
MESA_FORMS = ("sm", "direct", "cg")
DELTA_FORMS = ("recurrent", "chunked")
CHUNK = 64


def _tokens(kind, T, seed):
    rng = np.random.default_rng([seed, T])
    E = rng.standard_normal((1, T, D))
    if kind == "delta":
        return E / np.linalg.norm(E, axis=-1, keepdims=True)
    return E * 10.0 ** (-3.0 * np.arange(D) / (D - 1))


@contextlib.contextmanager
def guards_off():
    """The mesa layer's guards switched off (for the would-be errors of refused runs)."""
    saved = mesa_module.PD_SLACK, mesa_module.REVERSE_RTOL
    mesa_module.PD_SLACK = mesa_module.REVERSE_RTOL = np.inf
    try:
        yield
    finally:
        mesa_module.PD_SLACK, mesa_module.REVERSE_RTOL = saved


def ridge_condition(T, lam, seed=0):
    """cond(A_T) in float64 for the mesa study's tokens (A_T = I / lam + sum_t k_t k_t^T)."""
    k = _tokens("mesa", T, seed)[0]
    return float(np.linalg.cond(np.eye(D) / lam + k.T @ k))


def _rel(a, b):
    b = np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(np.asarray(a, np.float64) - b))) / (scale if scale > 0 else 1.0)


def _run(kind, form, E, cond, dtype, G):
    eye = np.eye(D, dtype=dtype)[None]
    if kind == "mesa":
        p = MesaParams(eye, eye, eye, eye, np.array([cond], dtype=dtype))
        out, cache = mesa_forward(E.astype(dtype), p, form=form)
        dE, dp = mesa_backward(G.astype(dtype), cache)
    else:
        p = DeltaFixedParams(eye, eye, eye, eye)
        out, cache = delta_forward(E.astype(dtype), p, beta=cond, form=form, chunk=CHUNK)
        dE, dp = delta_backward(G.astype(dtype), cache)
    return out - E.astype(dtype), [dE, *dp]


def measure(kind, form, T, cond, seed=0):
    """(forward rel err, backward rel err, status, would-be errors) of float32 against
    float64; the errors are nan where a run raised, the would-be errors (guards off) are
    nan where it did not."""
    E = _tokens(kind, T, seed)
    G = np.random.default_rng([seed, T, 1]).standard_normal(E.shape)
    try:
        d64, g64 = _run(kind, form, E, cond, np.float64, G)
    except (NonFiniteError, ValueError) as exc:
        return float("nan"), float("nan"), f"float64 refused: {type(exc).__name__}", (float("nan"),) * 2
    try:
        d32, g32 = _run(kind, form, E, cond, np.float32, G)
    except (NonFiniteError, ValueError) as exc:
        status = f"refused: {str(exc).split(':')[0]}"
        would = (float("nan"), float("nan"))
        if kind == "mesa" and form == "sm":
            with guards_off(), np.errstate(all="ignore"):
                try:
                    d32, g32 = _run(kind, form, E, cond, np.float32, G)
                    would = (_rel(d32, d64), max(_rel(a, b) for a, b in zip(g32, g64)))
                except (NonFiniteError, ValueError):
                    pass
        return float("nan"), float("nan"), status, would
    return _rel(d32, d64), max(_rel(a, b) for a, b in zip(g32, g64)), "ok", (float("nan"),) * 2


def study(T_values=T_VALUES, seed=0):
    rows = []
    for kind, forms, conds in (("mesa", MESA_FORMS, LAM_VALUES), ("delta", DELTA_FORMS, BETA_VALUES)):
        for form in forms:
            for cond in conds:
                for T in T_values:
                    t0 = time.perf_counter()
                    fwd, bwd, status, would = measure(kind, form, T, cond, seed)
                    condA = ridge_condition(T, cond, seed) if kind == "mesa" else float("nan")
                    rows.append({"kind": kind, "form": form, "cond": cond, "T": T, "condA": condA, "forward": fwd,
                                 "backward": bwd, "status": status, "would": would,
                                 "seconds": time.perf_counter() - t0})
    return rows


def _fmt(x):
    return "-" if not np.isfinite(x) else f"{x:.1e}"


def markdown(rows):
    lines = ["# Mesa layer and delta rule: float32 against float64",
             "",
             "Written by `python -m verify.mesa_study` (see its docstring for the inputs). Relative errors "
             "max|x_32 - x_64| / max|x_64| of the layer update (forward) and of the worst gradient (backward); "
             "param is lam for the mesa layer (anisotropic keys; cond(A_T) in float64 is listed) and the fixed "
             "step beta for the delta rule (unit keys; the step contracts for beta < 2). \"refused\": the layer "
             "raised NonFiniteError instead of returning (a guard fired); \"guards off\": the float32 errors it "
             "would have returned without its guards (forward / backward).",
             "",
             "| layer | form | param | T | cond(A_T) | forward rel err | backward rel err | status | guards off |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        would = " / ".join(_fmt(x) for x in r["would"]) if np.isfinite(r["would"][0]) else ""
        lines.append(f"| {r['kind']} | {r['form']} | {r['cond']:g} | {r['T']} | {_fmt(r['condA'])} | "
                     f"{_fmt(r['forward'])} | {_fmt(r['backward'])} | {r['status']} | {would} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m verify.mesa_study", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("verify", "results", "mesa-float32.md"))
    ap.add_argument("--quick", action="store_true", help=f"T in {QUICK_T} only")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rows = study(QUICK_T if a.quick else T_VALUES, a.seed)
    text = markdown(rows)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
