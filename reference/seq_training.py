"""Training on sequences (mesa paper, arXiv 2309.05858): the pieces of a run of the
``"lds"`` task that differ from the regression trainer, which calls them
(``reference.trainer`` dispatches on ``cfg.is_sequence``; the loop, the divergence rule,
checkpoints and resume are the regression trainer's, unchanged).

One run of an lds :class:`reference.config.TrainConfig` (paper-settings.md 8, 8a, 8b;
SPEC.md section 17):

1. baselines on fixed sequence sets independent of the training seed
   (:func:`compute_baselines`): GD (causal Prop. 1, eta line-searched on
   ``line_search_tasks`` sequences), ridge on the pairs strictly before t (r = 1e-3, the
   code's), for a K-layer model with K >= 2 the Prop. 2 layer construction with the same
   K layers (K - 1 Neumann preconditioning layers and the GD readout layer, the step
   omega line-searched on the same sequences) and, for K in (2, 6), the code's
   normalised Chebyshev iteration with its learned coefficients; every one with its
   per-time-step losses on the evaluation set;
2. initial parameters (:func:`init_normal` when ``init_std`` is set: every weight matrix
   normal(0, init_std), drawn in order from ``stream_rng(seed, STREAM_INIT)``; 1-d
   parameters such as a mesa layer's lam keep their layer's init);
3. the step (:func:`seq_train_step`): the sequences of step s from ``step_rng(seed, s)``
   (``SequenceSpec.sample``), tokens ``code_tokens(X)`` = [0, x_t, x_t, x_{t-1}], the
   input mask, the sequence loss and its backward (``sequences.seq_loss_and_grads``),
   then ``optim.adam_apply`` (element-wise clip, AdamW);
4. evaluation (:func:`evaluate`) on a fixed set of ``eval_tasks`` sequences from
   ``stream_rng(eval_seed, STREAM_EVAL)``: the loss, the per-time-step losses l_t
   (t = 1 .. T, 1-based in the rows) and the alignment of the predictions with GD, the
   Prop. 2 construction and ridge. A fixed set instead of the code's 10 fresh batches:
   curves are comparable across runs and steps (a deliberate departure).

This module writes no files and knows nothing of run directories.
"""

from typing import NamedTuple

import numpy as np

from . import causal_constructions as CC
from ._checks import check_data, check_int
from .layers import InitSettings
from .model import model_forward
from .optim import adam_apply
from .sequences import Sequences, code_tokens, mask_forward, seq_loss_and_grads, seq_loss_forward
from .tasks import STREAM_EVAL, STREAM_INIT, STREAM_LINE_SEARCH, step_rng, stream_rng
from .train_step import StepResult, check_step_state

EVAL_CHUNK = 256          # sequences per evaluation forward (bounds the caches' memory)
OMEGA_GRID = np.geomspace(1e-4, 1.0, 81)   # Prop. 2 Neumann step candidates
CHEBYSHEV_CODED = {2: CC.CHEBYSHEV_2, 6: CC.CHEBYSHEV_6}   # depths with the code's learned coefficients
COS_EPS = 1e-12


class SeqLayout(NamedTuple):
    """The code's constructed tokens for observations of width d: [0, x_t, x_t, x_{t-1}]
    (width 4 d), the prediction read from the first d channels with a plus sign."""
    d: int
    kind: str = "lds"

    @property
    def D_in(self):
        return 4 * self.d

    @property
    def D(self):
        return 4 * self.d

    def build(self, X):
        return code_tokens(X)                                          # (B, T, 4d)


def layout_of(cfg):
    return SeqLayout(cfg.task_spec(1).d_obs)


# ---- the step ----------------------------------------------------------------------------

def check_sequences(seqs, d):
    """Raise unless ``seqs`` is a :class:`reference.sequences.Sequences` with X, Y
    (B, T, d) of one float dtype. Returns the dtype."""
    if not isinstance(seqs, Sequences):
        raise TypeError(f"seqs must be a reference.sequences.Sequences, got {type(seqs).__name__}")
    check_data("seqs.X", seqs.X, dims=("B", "T", "d"), allow_complex=False)
    check_data("seqs.Y", seqs.Y, shape=tuple(seqs.X.shape), allow_complex=False)
    if seqs.X.shape[2] != d or seqs.X.dtype != seqs.Y.dtype:
        raise ValueError(f"seqs.X and seqs.Y must be (B, T, {d}) of one dtype, got {seqs.X.shape} {seqs.X.dtype} "
                         f"and {seqs.Y.shape} {seqs.Y.dtype}")
    return seqs.X.dtype


def check_seq_step_inputs(params, state, seqs, arch, hp):
    """What a sequence step refuses before any work (every backend's sequence step runs
    it): sequences (:func:`check_sequences`) in the dtype of params and state that one
    step can update (``train_step.check_step_state`` on the code layout). Returns (d, dtype)."""
    if not isinstance(seqs, Sequences):
        raise TypeError(f"seqs must be a reference.sequences.Sequences, got {type(seqs).__name__}")
    check_data("seqs.X", seqs.X, dims=("B", "T", "d"), allow_complex=False)
    d = seqs.X.shape[2]
    dtype = check_step_state(params, state, arch, hp, SeqLayout(d))
    if check_sequences(seqs, d) != dtype:
        raise TypeError(f"seqs.X and seqs.Y must have the params' dtype {dtype}, got {seqs.X.dtype}")
    return d, dtype


def seq_train_step(params, state, seqs, arch, hp, mask=0):
    """One training step on sequences: E = code_tokens(X) (B, T, 4d), the first ``mask``
    channels zeroed, L and its gradients (``seq_loss_and_grads``), then the clipped
    Adam/AdamW update. Returns :class:`reference.train_step.StepResult` (the loss before
    the update; the raw gradient's global norm)."""
    d, _ = check_seq_step_inputs(params, state, seqs, arch, hp)
    E = code_tokens(seqs.X)                                            # (B, T, 4d)
    L, grads, _ = seq_loss_and_grads(E, seqs.Y, params, arch, d, mask)
    params, state, norm = adam_apply(params, grads, state, hp)
    return StepResult(params, state, float(L), norm)


class SeqStepper:
    """``step(params, state, s)``: one update on the sequences of ``step_rng(seed, s)``;
    ``step_on(params, state, seqs)``: on given sequences (the NumPy reference's stepper
    interface, ``reference.backends.numpy_backend``)."""

    def __init__(self, arch, hp, spec, seed, dtype=np.float32, mask=0):
        self.arch, self.hp, self.spec, self.seed = arch, hp.validate(), spec, check_int("seed", seed, 0)
        self.dtype, self.mask = np.dtype(dtype), check_int("mask", mask, 0)

    def sample(self, step):
        return self.spec.sample(step_rng(self.seed, step), dtype=self.dtype)

    def step(self, params, state, step):
        return self.step_on(params, state, self.sample(step))

    def step_on(self, params, state, seqs):
        return seq_train_step(params, state, seqs, self.arch, self.hp, self.mask)


def make_stepper(cfg):
    """The configured backend's sequence stepper (``make_seq_stepper``; the NumPy
    backend's is :class:`SeqStepper`), after checking that backend computes the model
    (``seq_supports``: ValueError with its reason otherwise)."""
    from .backends import seq_backend

    backend = seq_backend(cfg.backend, cfg.arch())
    return backend.make_seq_stepper(cfg.arch(), cfg.adam_hp(), cfg.task_spec(), cfg.seed, cfg.np_dtype,
                                    cfg.model.input_mask)


# ---- initialisation ------------------------------------------------------------------------

def init_normal(arch, D_in, std, rng, dtype):
    """The mesa code's init: every parameter array with ndim >= 2 (weight matrices) drawn
    from normal(0, std), in parameter-set order and field order, from ``rng``; 1-d arrays
    (a mesa layer's lam, biases, LayerNorm scales) keep the layer's own init."""
    template = arch.init(np.random.default_rng(0), D_in, InitSettings(1.0, 1, np.float64))
    out = []
    for p in template:
        out.append(type(p)(*(None if a is None else
                             (rng.normal(0.0, std, a.shape) if a.ndim >= 2 else a).astype(dtype) for a in p)))
    return tuple(out)


def init_params(cfg, D_in):
    return init_normal(cfg.arch(), D_in, cfg.model.init_std, stream_rng(cfg.seed, STREAM_INIT), cfg.np_dtype)


# ---- evaluation set and baselines -------------------------------------------------------------

def eval_sequences(cfg):
    """The fixed evaluation sequences (float64; independent of the training seed)."""
    return cfg.task_spec(cfg.eval.eval_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_EVAL))


def line_search_sequences(cfg):
    return cfg.task_spec(cfg.baselines.line_search_tasks).sample(stream_rng(cfg.eval.eval_seed, STREAM_LINE_SEARCH))


def neumann_matrix_predict(X, omega, K, ridge=CC.RIDGE, system=None):
    """M_t u_t with u_t = omega sum_{j<K} (I - omega A_t)^j x_t (K Richardson steps from 0),
    by matrices: what the K-layer Prop. 2 construction computes (SPEC 15), for the search.
    ``system``: (A, M) of ``ridge_system(X, ridge)`` when already built."""
    A, M = CC.ridge_system(X, ridge) if system is None else system    # (B, T, d, d) each
    u = np.zeros_like(X)
    for _ in range(K):
        u = u + omega * (X - np.einsum("btij,btj->bti", A, u))        # (B, T, d)
    return np.einsum("btij,btj->bti", M, u)


def line_search_omega(X, Y, K, grid=OMEGA_GRID):
    """The grid omega whose K-layer Neumann construction has the least sequence loss
    (first on ties; a non-finite loss never wins). Returns (omega, losses)."""
    system = CC.ridge_system(X)
    losses = []
    for w in grid:
        with np.errstate(over="ignore", invalid="ignore"):
            L = seq_loss_forward(neumann_matrix_predict(X, float(w), K, system=system), Y)[0]
        losses.append(L if np.isfinite(L) else np.inf)
    losses = np.asarray(losses)
    return float(grid[int(np.argmin(losses))]), losses


def prop2_layers_predict(X, omega, K):
    """The K-layer Prop. 2 construction (K - 1 Neumann preconditioning layers, step omega,
    then the GD readout layer; ``causal_constructions.prop2_stack``) run as causal LSA
    layers on ``precond_tokens``: predictions (B, T, d) from the first slot."""
    gammas, coeffs = CC.neumann_coefficients(omega, K - 1)
    params, arch = CC.prop2_stack(X.shape[2], gammas, coeffs, dtype=X.dtype)
    E = CC.precond_tokens(X, K - 1)
    return _chunked_forward(E, params, arch, X.shape[2])


def _chunked_forward(E, params, arch, d, mask=0):
    out = []
    for i in range(0, E.shape[0], EVAL_CHUNK):
        Ec, _ = mask_forward(E[i:i + EVAL_CHUNK], mask)
        o, _ = model_forward(Ec, params, arch)
        out.append(o[:, :, :d])
    return np.concatenate(out, axis=0)                                 # (B, T, d)


def _losses(pred, Y):
    with np.errstate(over="ignore", invalid="ignore"):
        L, per_t, _ = seq_loss_forward(np.asarray(pred, np.float64), Y)
    return float(L), [float(v) for v in per_t]


def reference_predictions(cfg, evals, baselines):
    """{name: predictions (B, T, d)} of the baselines on the eval set (float64)."""
    X = evals.X
    refs = {"gd": CC.causal_gd_predict(X, baselines["gd_eta"]), "ridge": CC.ridge_predict(X)}
    if baselines.get("prop2_omega") is not None:
        refs["prop2"] = prop2_layers_predict(X, baselines["prop2_omega"], baselines["prop2_layers"])
    steps = baselines.get("cheb_steps")
    if steps is not None:
        refs["cheb"] = CC.chebyshev_predict(X, *CHEBYSHEV_CODED[steps])[-1]
    return refs


def compute_baselines(cfg, evals, log=None):
    """GD (line-searched eta), ridge strictly before t, the same-depth Prop. 2 layer
    construction (line-searched omega) and the code's Chebyshev iteration (K = 2, 6) on
    the eval set, with per-time-step losses (lists over t = 1 .. T). JSON-able dict."""
    import time

    t0 = time.perf_counter()
    K = cfg.arch().n_layers
    ls = line_search_sequences(cfg)
    eta, _ = CC.line_search_eta(ls.X, ls.Y)
    out = {"depth": K, "gd_eta": eta, "prop2_omega": None, "prop2_layers": None, "cheb_steps": None}
    if K >= 2:
        out["prop2_omega"], _ = line_search_omega(ls.X, ls.Y, K)
        out["prop2_layers"] = K
    if K in CHEBYSHEV_CODED:
        out["cheb_steps"] = K
    refs = reference_predictions(cfg, evals, out)
    names = {"gd": "gd", "ridge": "lstsq", "prop2": "prop2", "cheb": "cheb"}
    for name, pred in refs.items():
        out[f"{names[name]}_loss"], out[f"{names[name]}_per_t"] = _losses(pred, evals.Y)
    out["zero_loss"], out["zero_per_t"] = _losses(np.zeros_like(evals.Y), evals.Y)
    out["failed"] = {k: out[f"{k}_loss"] for k in ("gd", "lstsq", "prop2", "cheb")
                     if f"{k}_loss" in out and not (np.isfinite(out[f"{k}_loss"]) and out[f"{k}_loss"] <= out["zero_loss"])}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if log:
        extra = "" if K < 2 else f", Prop. 2 ({K} layers, Neumann omega {out['prop2_omega']:.4g}) {out['prop2_loss']:.5f}"
        if out["cheb_steps"]:
            extra += f", Chebyshev as coded ({K} steps) {out['cheb_loss']:.5f}"
        log(f"baselines: GD eta {eta:.3f} {out['gd_loss']:.5f}, ridge {out['lstsq_loss']:.5f}{extra} "
            f"({out['seconds']:.0f} s)")
    return out


class SeqEvalSet(NamedTuple):
    """The fixed evaluation sequences (float64), their tokens in the model's dtype, the
    baselines' predictions on them and the zero predictor's loss."""
    tasks: object     # Sequences
    E: object         # (B_eval, T, 4d)
    refs: dict        # name -> predictions (B_eval, T, d) float64
    zero_loss: float


def eval_set(cfg, evals, baselines):
    E = code_tokens(evals.X.astype(cfg.np_dtype))
    refs = reference_predictions(cfg, evals, baselines)
    refs.pop("cheb", None)
    return SeqEvalSet(evals, E, refs, baselines["zero_loss"])


def predictions(params, cfg, E):
    """The model's predictions (B, T, d) on tokens E, in chunks."""
    return _chunked_forward(E, params, cfg.arch(), layout_of(cfg).d, cfg.model.input_mask)


def pred_alignment(pred, ref):
    """Per-(sequence, t) alignment of predictions with a reference, averaged: preds_diff =
    mean ||y - y_ref||, pred_cos = mean cos(y, y_ref), and pred_cos per t (list)."""
    p, r = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    diff = np.linalg.norm(p - r, axis=2)                               # (B, T)
    cos = (p * r).sum(2) / (np.linalg.norm(p, axis=2) * np.linalg.norm(r, axis=2) + COS_EPS)   # (B, T)
    return {"preds_diff": float(diff.mean()), "pred_cos": float(cos.mean()),
            "pred_cos_per_t": [float(c) for c in cos.mean(0)]}


def evaluate(params, cfg, es):
    """Eval loss, per-time-step losses (t = 1 .. T) and the prediction alignment with the
    references (gd, ridge and, for K >= 2, prop2)."""
    pred = predictions(params, cfg, es.E)
    L, per_t = _losses(pred, es.tasks.Y)
    row = {"loss": L, "per_t": per_t}
    for name, ref in es.refs.items():
        a = pred_alignment(pred, ref)
        row[f"preds_diff_{name}"], row[f"pred_cos_{name}"] = a["preds_diff"], a["pred_cos"]
        if name == "gd":
            row["pred_cos_gd_per_t"] = a["pred_cos_per_t"]
    return row


# ---- end-of-run analyses --------------------------------------------------------------------

def gd_weight_match(params, d, mask):
    """How far a one-layer causal LSA (params of ``lsa``, heads h) is from the Prop. 1
    construction on the code's layout, up to the model's symmetries.

    The layer's readout is sum_h W_PV,h S_t W_KQ,h^T ... : with W_KQ,h = W_K,h^T W_Q,h and
    W_PV,h = P_h W_V,h it depends on the heads only through the tensor
    T = sum_h W_PV,h (x) W_KQ,h, restricted to what the readout sees (rows < d of W_PV)
    and to the unmasked channels (>= mask; the masked ones are 0 in every token). The
    construction's tensor is W_PV = [I at (slot 0, slot 2)], W_KQ = [I at (slot 3 keys,
    slot 2 queries)], so T_c's scale is eta. Invariant to rescaling a head's factors and
    to how the heads split T. Returns dict(tensor_cos, tensor_rel_err (after the best
    scale), scale (the best beta with T ~ beta T_c: the learned eta))."""
    W_Q, W_K, W_V, P = (np.asarray(a, np.float64) for a in params)
    KQ = np.swapaxes(W_K, 1, 2) @ W_Q                                  # (H, D, D)
    PV = P @ W_V                                                       # (H, D, D)
    D = KQ.shape[1]
    KQ, PV = KQ[:, mask:, mask:], PV[:, :d, mask:]
    KQc, PVc = np.zeros((D, D)), np.zeros((d, D))
    KQc[3 * d:4 * d, 2 * d:3 * d] = np.eye(d)
    PVc[:, 2 * d:3 * d] = np.eye(d)
    KQc, PVc = KQc[mask:, mask:], PVc[:, mask:]
    Tm = np.einsum("hi,hj->ij", PV.reshape(len(PV), -1), KQ.reshape(len(KQ), -1))   # (d (D-m), (D-m)^2)
    Tc = np.outer(PVc.ravel(), KQc.ravel())
    nm, nc = np.linalg.norm(Tm), np.linalg.norm(Tc)
    beta = float((Tm * Tc).sum() / nc ** 2)
    if nm == 0:
        return {"tensor_cos": float("nan"), "tensor_rel_err": float("nan"), "scale": 0.0}
    return {"tensor_cos": float((Tm * Tc).sum() / (nm * nc)), "tensor_rel_err": float(np.linalg.norm(Tm - beta * Tc) / nm),
            "scale": beta}


def final_analyses(cfg, params, baselines, evals):
    """The end of an lds run: for a one-layer LSA its match with the Prop. 1 construction
    (:func:`gd_weight_match`); for mesa layers the learned lam."""
    arch, out = cfg.arch(), {}
    d = layout_of(cfg).d
    if arch.kinds() == ("lsa",) and len(params) == 1 and hasattr(params[0], "W_Q"):
        out["gd_weights"] = gd_weight_match(params[0], d, cfg.model.input_mask)
    lams = [np.asarray(p.lam, np.float64).tolist() for p in params if hasattr(p, "lam")]
    if lams:
        out["mesa_lam"] = lams
    return out


def memory_estimate(cfg):
    """Bytes at the peak (as ``trainer.memory_estimate``): parameters with gradients, Adam
    moments and the updated copy; the eval set (float64 sequences, tokens, the references'
    predictions); the largest pass (a training step with the forward's caches and as much
    again for the backward; an evaluation chunk; the baselines' A_t, M_t on the line-search
    or eval set)."""
    arch, item, sp, lay = cfg.arch(), cfg.np_dtype.itemsize, cfg.task_spec(1), layout_of(cfg)
    T, d, D = sp.T, sp.d_obs, lay.D_in
    seq = (T + 1) * (sp.d + d) + sp.d * sp.d + d * sp.d                # floats per sequence (H, O, W, C)
    cache = arch.cache_floats(T, D)
    B_eval, B_ls = cfg.eval.eval_tasks, cfg.baselines.line_search_tasks
    passes = {"train_step": cfg.data.batch * (seq * (8 + item) + 2 * cache * item),
              "eval_pass": min(EVAL_CHUNK, B_eval) * 2 * cache * max(item, 8),
              "baselines": max(B_ls, B_eval) * (seq + 4 * T * d * d) * 8}
    parts = {"params": 5 * arch.param_floats(D) * item,
             "eval": B_eval * (seq * 8 + T * D * item + 4 * T * d * 8)}
    peak = max(passes, key=passes.get)
    parts[peak] = passes[peak]
    return {"parts": parts, "passes": passes, "total": int(sum(parts.values()))}


__all__ = ["SeqLayout", "seq_train_step", "SeqStepper", "make_stepper", "init_normal", "init_params",
           "eval_sequences", "compute_baselines", "line_search_omega", "neumann_matrix_predict",
           "prop2_layers_predict", "eval_set", "evaluate", "predictions", "pred_alignment", "gd_weight_match",
           "final_analyses", "memory_estimate", "reference_predictions"]
