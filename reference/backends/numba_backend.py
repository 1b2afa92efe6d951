"""The Numba backend: the whole training step of LSA models as fused CPU kernels
(``--backend numba``).

Same interface as :mod:`.numpy_backend` (``sample_tasks``, ``loss_and_grads``,
``model_forward``, ``train_step``, ``make_stepper``) and tested against it and the loop
oracle (``tests/test_numba_backend.py``), in float32 and float64, and once more with
``NUMBA_DISABLE_JIT=1``. What is different, and why:

* one kernel call does the batch (``_numba_step.run_batch``): a ``prange`` over chunks
  of tasks, blocks of L tasks laid out with the task as the innermost ("lane") axis so
  every per-task loop vectorises, per-chunk float64 gradient accumulators added in
  chunk order (results do not depend on the thread count);
* the layers run in merged form (A_h = P_h W_V,h, B_h = W_K,h^T W_Q,h; gradients of
  factored parameters by the chain rule: dW_Q = W_K dB, dW_K = W_Q dB^T,
  dW_V = P^T dA, dP = dA W_V^T);
* token path (``_numba_layers``): context-only layers in covariance form (per task
  C = E_ctx^T E_ctx, D x D), causal layers in attention form, and the last layer for
  the query token only, since only its y-slot is read: one layer costs O(N D + D^2) per
  task instead of O(T N D + T D^2);
* D x D path (``_numba_dspace``, context-only stacks of K >= 2 layers with one label,
  when only the loss and weight gradients are needed): without clipping every token is
  mapped by the same L = I + sum_h A_h C B_h, so a layer maps (C, q) to (L C L^T, L q)
  at O(H D^3) per task whatever N is; the last two layers reduce to matrix-vector
  products and the backward near the end runs on low-rank factors. Tasks whose tokens
  could reach the clip value (a per-coordinate bound) go through the token path, so the
  result is always the reference's function. ``ICGD_NUMBA_PATH`` (config.py) chooses;
  by default D x D when D >= 24 and N + 1 >= D;
* ``stepper.step`` draws its tasks inside the kernel with a counter-based generator
  (SplitMix64) keyed by (seed, step, task): NOT the tasks the NumPy backend draws for
  the same (seed, step), same distribution (``_numba_rng``). ``step_on`` with given
  tasks matches the reference;
* clip-by-global-norm and Adam are one pass over a flat vector of all parameters, in
  the working dtype with the reference's order of operations.

Every other Arch of the layer kinds embed, mlp, lsa, softmax, gd, posenc and pre_ln
(mixed stacks: the sine model, softmax layers, pre-LN blocks, ...) runs on the
mixed-stack kernels of ``_numba_mixed`` (its docstring says how); their ``stepper.step``
draws its tasks on the host exactly as the NumPy backend does
(``spec.sample(step_rng(seed, step))``), so for the same seed both backends train on
the same tasks. Other layer kinds are refused by :func:`supports`. Classic tokens
(``ClassicLayout``, passed as ``layout=``) run on the mixed-stack kernels for every Arch,
uniform LSA stacks included: their readout is the one those kernels compute.

The lds task's sequence step (``seq_supports``, ``seq_loss_and_grads``, ``seq_train_step``,
``make_seq_stepper``) runs uniform causal LSA stacks and mesa stacks (form "sm", no
forgetting) on ``_numba_seq`` (every token read, the per-time-step loss) and updates with
the reference's ``optim.adam_apply`` (element-wise clip, AdamW); its stepper draws the
NumPy backend's sequences. Other Archs are refused with the reason (they train on 'numpy').

JIT flags (parallel, fastmath, cache, lanes) come from ``config.py``. Complex inputs
(complex-step checks) are not supported here: they run on the reference ('numpy').
"""

import numpy as np

from .._checks import check_dtype, check_int
from ..layers.lsa import LSAParams, MergedParams
from ..model import Arch, check_loss_inputs, check_model_inputs
from ..optim import AdamHP, AdamState, check_adam_inputs, check_grad_norm, grad_norm_in_dtype
from ..tasks import Tasks, TaskSpec, sample_tasks as reference_sample_tasks, step_rng
from ..tokens import TokenLayout, build_tokens
from ..train_step import StepResult, check_step_inputs, check_step_state
from ..tree import from_vector, to_vector
from ..optim import adam_apply
from ..seq_training import check_seq_step_inputs
from ..sequences import check_seq_loss_inputs, code_tokens, mask_forward
from . import _numba_mixed, _numba_seq, config
from ._lsa_stack import lsa_stack_of, lsa_stack_reason
from ._numba_dspace import run_batch_dspace
from ._numba_rng import run_key
from ._numba_step import adam_flat, choose_lanes, n_chunks_for, run_batch, sample_to_arrays

NAME = "numba"
HOST_ARRAYS = True


def check_available():
    """Numba is a dependency of the package: nothing to check."""


def supports(arch):
    """None for uniform stacks of ``lsa`` layers (one causal and clip value; the fused LSA
    kernels) and for every other Arch of the kinds ``_numba_mixed.KINDS`` (the mixed-stack
    kernels), else the reason naming the layer it cannot compute."""
    if lsa_stack_reason(arch, NAME) is None:
        return None
    return _numba_mixed.mixed_reason(arch, NAME)


def _mixed(arch, layout=None):
    """True when ``arch`` runs on the mixed-stack kernels (an Arch this backend supports
    that is not a uniform LSA stack, or any supported Arch on a layout other than the
    regression ones: classic tokens, whose readout the mixed kernels share); ValueError
    with :func:`supports`'s reason for an Arch it cannot run. A non-Arch gives False (the
    LSA path's checks refuse it)."""
    if not isinstance(arch, Arch):
        return False
    other = getattr(layout, "kind", "regression") not in ("regression", "embedded")   # a layout object (or d)
    if not other and lsa_stack_reason(arch, NAME) is None:
        return False
    reason = _numba_mixed.mixed_reason(arch, NAME)
    if reason is not None:
        raise ValueError(reason)
    return True


# ------------------------------------------------------------------ task sampling ----

class NumbaRNG:
    """The Numba backend's task stream for one (seed, step): pass to :func:`sample_tasks`."""

    def __init__(self, seed, step=0):
        self.seed = check_int("seed", seed, 0)
        self.step = check_int("step", step, 0)
        self.key = run_key(self.seed, self.step)

    def __repr__(self):
        return f"NumbaRNG(seed={self.seed}, step={self.step})"


def numba_rng(seed, step=0):
    """The generator :meth:`Stepper.step` uses for step ``step`` of a run with ``seed``."""
    return NumbaRNG(seed, step)


def _draw(key, spec, B, dtype):
    dtype = np.dtype(dtype)
    d, N, d_y = spec.d, spec.N, spec.d_y
    X = np.empty((B, N, d), dtype)
    Y = np.empty((B, N, d_y), dtype)
    xq = np.empty((B, d), dtype)
    yq = np.empty((B, d_y), dtype)
    W = np.empty((B, d_y, d), dtype)
    low, high = (float(v) for v in spec.x_range)
    with np.errstate(over="ignore"):   # uint64 wrap-around is intended (only matters without JIT)
        sample_to_arrays(key, B, d, N, d_y, low, high, float(spec.w_scale), float(spec.noise_std),
                         int(spec.n_distractors), dtype == np.float32, _lanes(N + 1, d + d_y, dtype),
                         X, Y, xq, yq, W)
    return Tasks(X, Y, xq, yq, W)


def sample_tasks(rng, B, d, N, d_y=1, *, x_range=(-0.5, 0.5), w_scale=1.0, noise_std=0.0,
                 n_distractors=0, dtype=np.float64):
    """B regression tasks. ``rng`` a numpy.random.Generator: the reference's draws
    (identical to the NumPy backend); ``rng`` from :func:`numba_rng`: the Numba
    stepper's own stream (different draws, same distribution)."""
    if isinstance(rng, np.random.Generator):
        return reference_sample_tasks(rng, B, d, N, d_y, x_range=x_range, w_scale=w_scale, noise_std=noise_std,
                                      n_distractors=n_distractors, dtype=dtype)
    if not isinstance(rng, NumbaRNG):
        raise TypeError("rng must be a numpy.random.Generator or numba_backend.numba_rng(seed, step), "
                        f"got {type(rng).__name__}")
    spec = TaskSpec(d=d, N=N, d_y=d_y, B=B, x_range=tuple(x_range), w_scale=w_scale, noise_std=noise_std,
                    n_distractors=n_distractors)
    return _draw(rng.key, spec, spec.B, check_dtype("dtype", dtype))


# ------------------------------------------------------------- parameter plumbing ----

def _lanes(T, D, dtype):
    return choose_lanes(T, D, np.dtype(dtype).itemsize, config.LANES)


def _check_real(E):
    """What this backend refuses beyond the reference: complex tokens (checked first, so
    the message says why)."""
    if hasattr(E, "dtype") and np.dtype(E.dtype).kind == "c":
        raise TypeError(f"E has dtype {E.dtype}: the numba backend computes in float32 or float64; complex-step "
                        "checks run on the reference (backend 'numpy')")


def _layer_D_H(p):
    if isinstance(p, MergedParams):
        return p.W_KQ.shape[1], p.W_KQ.shape[0]
    return p.W_Q.shape[2], p.W_Q.shape[0]


def _merged_stack(params, dtype):
    """A (Lp, H, D, D) = P W_V, Bm = W_K^T W_Q per layer, in float64 then cast; layers
    with fewer heads are padded with zero heads (which add nothing and get zero gradient)."""
    D = _layer_D_H(params[0])[0]
    H = max(_layer_D_H(p)[1] for p in params)
    A = np.zeros((len(params), H, D, D))
    Bm = np.zeros((len(params), H, D, D))
    for i, p in enumerate(params):
        if isinstance(p, MergedParams):
            h = p.W_KQ.shape[0]
            A[i, :h] = p.W_PV
            Bm[i, :h] = p.W_KQ
        else:
            h = p.W_Q.shape[0]
            A[i, :h] = np.matmul(p.P.astype(np.float64), p.W_V.astype(np.float64))
            Bm[i, :h] = np.matmul(np.swapaxes(p.W_K, -1, -2).astype(np.float64), p.W_Q.astype(np.float64))
    return np.ascontiguousarray(A, dtype), np.ascontiguousarray(Bm, dtype)


def factored_grads(params, dA, dB, dtype):
    """Gradients of each layer's own parameters from dL/dA, dL/dB (float64 (Lp, H, D, D))."""
    out = []
    for i, p in enumerate(params):
        if isinstance(p, MergedParams):
            h = p.W_KQ.shape[0]
            out.append(MergedParams(dB[i, :h].astype(dtype), dA[i, :h].astype(dtype)))
            continue
        h = p.W_Q.shape[0]
        W_Q, W_K, W_V, P = (a.astype(np.float64) for a in p)
        dBi, dAi = dB[i, :h], dA[i, :h]
        # forward: B = W_K^T W_Q, so dW_Q = W_K dB and dW_K = W_Q dB^T
        dW_Q = np.matmul(W_K, dBi)
        dW_K = np.matmul(W_Q, np.swapaxes(dBi, -1, -2))
        # forward: A = P W_V, so dP = dA W_V^T and dW_V = P^T dA
        dW_V = np.matmul(np.swapaxes(P, -1, -2), dAi)
        dP = np.matmul(dAi, np.swapaxes(W_V, -1, -2))
        out.append(LSAParams(*(a.astype(dtype) for a in (dW_Q, dW_K, dW_V, dP))))
    return tuple(out)


def _check_inputs(E, params, arch):
    """The reference's checks (``model.check_model_inputs``: same exceptions and
    messages), then the dtype this backend computes in."""
    lsa_stack_of(arch, NAME)
    _check_real(E)
    check_model_inputs(E, params, arch)
    return np.dtype(E.dtype)


class BatchRun:
    """Arguments of ``run_batch`` / ``run_batch_dspace`` calls that depend only on (arch,
    params, sizes, dtype), and the choice between the two paths."""

    def __init__(self, arch, params, B, N, d, d_y, dtype, path=None):
        self.arch = arch = lsa_stack_of(arch, NAME)
        self.B, self.N, self.d, self.d_y = B, N, d, d_y
        self.dtype = dt = np.dtype(dtype)
        D = d + d_y
        self.set_params(params)
        self.lidx = np.array([arch.layer_index(k) for k in range(arch.n_layers)], dtype=np.int64)
        self.has_clip = arch.clip is not None
        self.clipv = dt.type(arch.clip if arch.clip is not None else 0.0)
        self.L = _lanes(N + 1, D, dt)
        self.n_chunks = n_chunks_for((B + self.L - 1) // self.L)
        self.tidx = np.arange(B, dtype=np.int64)
        Lp, H = self.A.shape[:2]
        self.dA = np.zeros((self.n_chunks, Lp, H, D, D))
        self.dB = np.zeros((self.n_chunks, Lp, H, D, D))
        self.loss = np.zeros(self.n_chunks)
        path = config.PATH if path is None else path
        can = (not arch.causal) and d_y == 1 and arch.n_layers >= 2
        if path == "auto":
            path = "dspace" if (can and D >= 24 and N + 1 >= D) else "tokens"
        elif path == "dspace" and not can:
            path = "tokens"
        self.path = path
        self.last_fallback = 0      # tasks the last dspace call sent to the token path

    def set_params(self, params):
        self.A, self.Bm = _merged_stack(params, self.dtype)
        self.Bt = np.ascontiguousarray(np.swapaxes(self.Bm, -1, -2))

    def _data(self, key, E, y_q, spec):
        dt, T, D, d_y = self.dtype, self.N + 1, self.d + self.d_y, self.d_y
        if key is not None:
            low, high = (float(v) for v in spec.x_range)
            opts = (low, high, float(spec.w_scale), float(spec.noise_std), int(spec.n_distractors))
            return True, key, np.zeros((1, T, D), dt), np.zeros((1, d_y), dt), opts
        E = np.ascontiguousarray(E, dt)
        y_q = np.ascontiguousarray(y_q if y_q is not None else np.zeros((E.shape[0], d_y)), dt)
        return False, np.uint64(0), E, y_q, (-0.5, 0.5, 1.0, 0.0, 0)

    def __call__(self, *, key=None, E=None, y_q=None, spec=None, full_last=False, need_grad=True,
                 need_dE=False, need_pred=False):
        dt, B, N, d, d_y = self.dtype, self.B, self.N, self.d, self.d_y
        T, D = N + 1, d + d_y
        sample, key, E, y_q, opts = self._data(key, E, y_q, spec)
        pred = np.empty((B, d_y) if need_pred else (1, 1), dt)
        dE = np.empty((B, T, D) if need_dE else (1, 1, 1), dt)
        out = np.empty((B, T, D) if full_last else (1, 1, 1), dt)
        self.dA[:] = 0
        self.dB[:] = 0
        self.loss[:] = 0
        with np.errstate(over="ignore"):   # uint64 wrap-around is intended (only matters without JIT)
            if self.path == "dspace" and not (need_dE or full_last):
                failed = np.zeros(B, dtype=np.bool_)
                run_batch_dspace(sample, key, E, y_q, self.tidx, d, N, *opts, dt == np.float32,
                                 self.A, self.Bm, self.Bt, self.lidx, self.has_clip, self.clipv, dt.type(B),
                                 need_grad, need_pred, self.L, self.n_chunks, self.loss, self.dA, self.dB, pred, failed)
                idx = np.flatnonzero(failed).astype(np.int64)
                self.last_fallback = int(idx.size)
                if idx.size:
                    # exact fallback: the flagged tasks through the token path, added in
                    loss2, dA2, dB2 = np.zeros(1), np.zeros((1,) + self.dA.shape[1:]), np.zeros((1,) + self.dB.shape[1:])
                    pred2 = np.empty((idx.size, d_y) if need_pred else (1, 1), dt)
                    run_batch(sample, key, E, y_q, idx, d, N, d_y, *opts, dt == np.float32,
                              self.A, self.Bm, self.lidx, self.arch.causal, self.has_clip, self.clipv, dt.type(B),
                              False, need_grad, False, need_pred, self.L, 1, loss2, dA2, dB2, pred2, dE, out)
                    self.loss[-1] += loss2[0]
                    self.dA[-1] += dA2[0]
                    self.dB[-1] += dB2[0]
                    if need_pred:
                        pred[idx] = pred2
            else:
                run_batch(sample, key, E, y_q, self.tidx, d, N, d_y, *opts, dt == np.float32,
                          self.A, self.Bm, self.lidx, self.arch.causal, self.has_clip, self.clipv, dt.type(B),
                          full_last, need_grad, need_dE, need_pred, self.L, self.n_chunks,
                          self.loss, self.dA, self.dB, pred, dE, out)
        return dict(loss=float(self.loss.sum() / B), dA=self.dA.sum(axis=0), dB=self.dB.sum(axis=0),
                    pred=pred, dE=dE, out=out)


# ------------------------------------------------------------- reference signatures ----

def model_forward(E, params, arch):
    """The K layers on tokens E (B, T, D). Returns (out (B, T, D_K), None)."""
    if _mixed(arch):
        _check_real(E)
        check_model_inputs(E, params, arch)
        return _numba_mixed.model_forward(E, params, arch), None
    dt = _check_inputs(E, params, arch)
    B, T, D = E.shape
    run = BatchRun(arch, params, B, T - 1, D - 1, 1, dt)
    # d only matters for the readout, which full_last skips; D = d + d_y with d_y = 1 here
    res = run(E=E, full_last=True, need_grad=False)
    return res["out"], None


def loss_and_grads(E, y_q, params, arch, layout, *, path=None, need_dE=True):
    """Loss of the model on tokens E against y_q, and its gradients, like
    ``reference.model.loss_and_grads``: (L, dparams, aux dict(pred, dE, path,
    fallback_tasks)). ``path`` forces the computation (None = config, 'tokens',
    'dspace'; 'dspace' applies only without dE, and ``path`` only to uniform LSA stacks);
    aux has dE only if ``need_dE``."""
    if _mixed(arch, layout):
        _check_real(E)
        lay = check_loss_inputs(E, y_q, params, arch, layout)
        L, grads, pred, dE = _numba_mixed.loss_and_grads(E, y_q, params, arch, lay.d_y, need_dE=need_dE)
        aux = {"pred": pred, "path": "mixed", "fallback_tasks": 0}
        if need_dE:
            aux["dE"] = dE
        return L, grads, aux
    lsa_stack_of(arch, NAME)
    _check_real(E)
    d = check_loss_inputs(E, y_q, params, arch, layout).d
    dt = np.dtype(E.dtype)
    B, T, D = E.shape
    run = BatchRun(arch, params, B, T - 1, d, D - d, dt, path=path)
    res = run(E=E, y_q=y_q, need_dE=need_dE, need_pred=True)
    grads = factored_grads(params, res["dA"], res["dB"], dt)
    aux = {"pred": res["pred"], "path": run.path, "fallback_tasks": run.last_fallback}
    if need_dE:
        aux["dE"] = res["dE"]
    return dt.type(res["loss"]), grads, aux


def _adam_flat_step(params, grads, state, hp, dtype):
    """reference.optim.adam_apply on flat vectors (one kernel pass), unchecked: returns
    (params, state, norm), the norm inf when its square overflows ``dtype`` (as the
    reference's sum in ``dtype`` does; the kernel sums in float64)."""
    t = state.t + 1
    c = dtype.type
    p, m, v, g = (to_vector(t, dtype) for t in (params, state.m, state.v, grads))
    norm = adam_flat(p, g, m, v, t, c(hp.lr), c(hp.b1), c(hp.b2), c(hp.eps), c(1 - hp.b1), c(1 - hp.b2),
                     c(1 - hp.b1 ** t), c(1 - hp.b2 ** t),
                     float(hp.clip_norm) if hp.clip_norm is not None else 0.0, hp.clip_norm is not None)
    new_state = AdamState(from_vector(m, params), from_vector(v, params), t)
    return from_vector(p, params), new_state, grad_norm_in_dtype(float(norm), dtype)


def adam_update(params, grads, state, hp, dtype):
    """reference.optim.adam_update on flat vectors (one kernel pass): the same checks
    (``optim.check_adam_inputs``; a gradient norm overflowing ``dtype`` refused, nothing
    of the caller's changed), then (params, state, norm)."""
    check_adam_inputs(params, grads, state, hp)
    dtype = check_dtype("dtype", dtype)
    new, st, norm = _adam_flat_step(params, grads, state, hp, dtype)
    check_grad_norm(norm, dtype)
    return new, st, norm


def _check_stepper_dtype(dtype, want):
    if dtype != want:
        raise TypeError(f"params have dtype {dtype} but this stepper computes in dtype {want}; "
                        f"cast them (or make the stepper with dtype={dtype})")


def _step_on_tokens(params, state, E, y_q, arch, hp, dtype, d):
    B, T, D = E.shape
    run = BatchRun(arch, params, B, T - 1, d, D - d, dtype)
    res = run(E=E, y_q=y_q)
    grads = factored_grads(params, res["dA"], res["dB"], dtype)
    new, st, norm = _adam_flat_step(params, grads, state, hp, dtype)
    return StepResult(new, st, res["loss"], norm)


def train_step(params, state, tasks, arch, hp, layout=None):
    """One clipped Adam step on ``tasks``, like ``reference.train_step.train_step``
    (its checks, ``check_step_inputs``, before any kernel runs); ``layout``: as the
    reference's (a ``ClassicLayout``: the mixed-stack kernels)."""
    if _mixed(arch, layout):
        layout, dtype = check_step_inputs(params, state, tasks, arch, hp, layout)
        return _mixed_step_on(params, state, tasks, arch, hp, layout, dtype)
    if layout is not None:                                             # a regression layout: checked, then as arch.layout
        check_step_inputs(params, state, tasks, arch, hp, layout)
    lsa_stack_of(arch, NAME)
    layout, dtype = check_step_inputs(params, state, tasks, arch, hp)
    E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
    return _step_on_tokens(params, state, E, tasks.y_q, arch, hp, dtype, layout.d)


class Stepper:
    """``.step(params, state, step)`` draws step ``step``'s tasks inside the kernel (this
    backend's own stream, see :func:`numba_rng`) and updates; ``.step_on(params, state,
    tasks)`` updates on given tasks (how the backends are compared); ``.sample(step)``
    returns the tasks ``.step`` draws."""

    def __init__(self, arch, hp, spec, seed, dtype=np.float32):
        lsa_stack_of(arch, NAME)
        if not isinstance(hp, AdamHP):
            raise TypeError(f"hp must be an AdamHP, got {type(hp).__name__}")
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"spec must be a TaskSpec, got {type(spec).__name__}")
        self.arch, self.hp, self.spec = arch, hp.validate(), spec
        self.seed = check_int("seed", seed, 0)
        self.dtype = check_dtype("dtype", dtype)
        self.layout = TokenLayout(spec.d, spec.d_y)
        self._run = None

    def sample(self, step):
        return _draw(run_key(self.seed, check_int("step", step, 0)), self.spec, self.spec.B, self.dtype)

    def _runner(self, params, B):
        r = self._run
        if r is not None and r.B == B:
            shape = r.A.shape
            r.set_params(params)
            if r.A.shape == shape:
                return r
        s = self.spec
        r = self._run = BatchRun(self.arch, params, B, s.N, s.d, s.d_y, self.dtype)
        return r

    def step(self, params, state, step):
        _check_stepper_dtype(check_step_state(params, state, self.arch, self.hp, self.layout), self.dtype)
        step = check_int("step", step, 0)
        run = self._runner(params, self.spec.B)
        res = run(key=run_key(self.seed, step), spec=self.spec)
        grads = factored_grads(params, res["dA"], res["dB"], self.dtype)
        new, st, norm = _adam_flat_step(params, grads, state, self.hp, self.dtype)
        return StepResult(new, st, res["loss"], norm)

    def step_on(self, params, state, tasks):
        layout, dtype = check_step_inputs(params, state, tasks, self.arch, self.hp)
        _check_stepper_dtype(dtype, self.dtype)
        E = build_tokens(tasks.X, tasks.Y, tasks.x_q)
        return _step_on_tokens(params, state, E, tasks.y_q, self.arch, self.hp, self.dtype, layout.d)


def _mixed_step_on(params, state, tasks, arch, hp, layout, dtype):
    """One step of a mixed stack on checked tasks: tokens at width layout.D_in, loss and
    gradients (``_numba_mixed``), then clip + Adam in one flat pass."""
    E = layout.build(tasks.X, tasks.Y, tasks.x_q)                       # (B, T, D_in)
    L, grads, _, _ = _numba_mixed.loss_and_grads(E, tasks.y_q, params, arch, layout.d_y, need_dE=False)
    new, st, norm = _adam_flat_step(params, grads, state, hp, dtype)
    return StepResult(new, st, float(L), norm)


class MixedStepper:
    """The stepper of a mixed stack: ``.step(params, state, step)`` draws step ``step``'s
    tasks on the host exactly as the NumPy backend does (``spec.sample(step_rng(seed,
    step), dtype=dtype)``; ``spec`` a TaskSpec or any spec with that ``sample``), then
    updates as ``.step_on(params, state, tasks)`` does; ``.sample(step)`` returns them.
    ``layout``: the token layout to train with (None: ``arch.layout``; a ``ClassicLayout``
    for classic tokens), as the NumPy backend's stepper."""

    def __init__(self, arch, hp, spec, seed, dtype=np.float32, layout=None):
        if not isinstance(hp, AdamHP):
            raise TypeError(f"hp must be an AdamHP, got {type(hp).__name__}")
        if not callable(getattr(spec, "sample", None)):
            raise TypeError(f"spec must be a task spec with .sample(rng, B=None, dtype=...), got {type(spec).__name__}")
        self.arch, self.hp, self.spec = arch, hp.validate(), spec
        self.seed = check_int("seed", seed, 0)
        self.dtype = check_dtype("dtype", dtype)
        self.layout = layout

    def sample(self, step):
        return self.spec.sample(step_rng(self.seed, check_int("step", step, 0)), dtype=self.dtype)

    def step(self, params, state, step):
        return self.step_on(params, state, self.sample(step))

    def step_on(self, params, state, tasks):
        layout, dtype = check_step_inputs(params, state, tasks, self.arch, self.hp, self.layout)
        _check_stepper_dtype(dtype, self.dtype)
        return _mixed_step_on(params, state, tasks, self.arch, self.hp, layout, dtype)


# ------------------------------------------------------- sequences (the lds task) ----

def seq_supports(arch):
    """None for uniform stacks of causal ``lsa`` layers and for stacks of mesa layers (form
    "sm", no forgetting) (``_numba_seq``), else the reason (every other Arch trains on
    backend 'numpy')."""
    return _numba_seq.seq_reason(arch, NAME) if isinstance(arch, Arch) else f"arch must be an Arch, got {type(arch).__name__}"


class _SeqStack:
    def __init__(self, arch):
        self.mesa = _numba_seq.is_mesa(arch)
        self.clip = None if self.mesa else arch.option("clip")
        self.lidx = np.array([arch.tie[k] for k in range(arch.n_layers)], dtype=np.int64)


def _require_seq(arch):
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    reason = _numba_seq.seq_reason(arch, NAME)
    if reason is not None:
        raise ValueError(reason)
    return _SeqStack(arch)


def _seq_run(Em, Y, params, stack, need_grad=True, need_pred=False, path=None):
    """Mesa layers: their kernels; factored LSA params: the stacked-heads kernels; merged
    (or ``path="merged"``): the fused LSA kernels' causal layers in merged form (``_numba_seq``)."""
    dt = np.dtype(Em.dtype)
    lidx = stack.lidx
    if stack.mesa:
        return _numba_seq.mesa_loss_and_grads(Em, Y, params, lidx, need_grad, need_pred)
    if path != "merged" and all(isinstance(p, LSAParams) for p in params):
        L, per_t, grads, pred = _numba_seq.factored_loss_and_grads(Em, Y, params, lidx, stack.clip, need_grad,
                                                                   need_pred)
        return L, per_t, grads, pred
    A, Bm = _merged_stack(params, dt)
    L, per_t, dA, dB, pred = _numba_seq.loss_and_merged_grads(Em, Y, A, Bm, lidx, stack.clip, need_grad, need_pred)
    grads = factored_grads(params, dA, dB, dt) if need_grad else None
    return L, per_t, grads, pred


def seq_loss_and_grads(E, Y, params, arch, d=None, mask=0, *, path=None):
    """``reference.sequences.seq_loss_and_grads`` (its checks first): (L, dparams, aux) with
    aux = dict(pred, per_t); no dE (the step does not need it). ``path="merged"`` forces
    the merged-form kernels for factored params too (tests)."""
    stack = _require_seq(arch)
    _check_real(E)
    d, Em, _ = check_seq_loss_inputs(E, Y, params, arch, d, mask)
    L, per_t, grads, pred = _seq_run(Em, Y, params, stack, need_pred=True, path=path)
    dt = np.dtype(E.dtype)
    return dt.type(L), grads, {"pred": pred, "per_t": per_t.astype(dt)}


def seq_train_step(params, state, seqs, arch, hp, mask=0):
    """``reference.seq_training.seq_train_step`` (its checks first): tokens ``code_tokens(X)``,
    the mask, loss and gradients on the sequence kernels, then the reference's
    ``optim.adam_apply`` (element-wise clip, AdamW). Returns StepResult."""
    stack = _require_seq(arch)
    check_seq_step_inputs(params, state, seqs, arch, hp)
    Em, _ = mask_forward(code_tokens(seqs.X), mask)                    # (B, T, 4d)
    L, _, grads, _ = _seq_run(Em, seqs.Y, params, stack)
    params, state, norm = adam_apply(params, grads, state, hp)
    return StepResult(params, state, L, norm)


class SeqStepper:
    """The lds task's stepper on the sequence kernels: ``.step(params, state, step)`` draws
    the NumPy backend's sequences (``spec.sample(step_rng(seed, step), dtype=dtype)``), then
    updates as ``.step_on(params, state, seqs)`` does; ``.sample(step)`` returns them."""

    def __init__(self, arch, hp, spec, seed, dtype=np.float32, mask=0):
        _require_seq(arch)
        if not isinstance(hp, AdamHP):
            raise TypeError(f"hp must be an AdamHP, got {type(hp).__name__}")
        self.arch, self.hp, self.spec = arch, hp.validate(), spec
        self.seed = check_int("seed", seed, 0)
        self.dtype = check_dtype("dtype", dtype)
        self.mask = check_int("mask", mask, 0)

    def sample(self, step):
        return self.spec.sample(step_rng(self.seed, check_int("step", step, 0)), dtype=self.dtype)

    def step(self, params, state, step):
        return self.step_on(params, state, self.sample(step))

    def step_on(self, params, state, seqs):
        return seq_train_step(params, state, seqs, self.arch, self.hp, self.mask)


def make_seq_stepper(arch, hp, spec, seed, dtype=np.float32, mask=0):
    """A :class:`SeqStepper` (ValueError with :func:`seq_supports`'s reason for an Arch the
    sequence kernels do not compute)."""
    return SeqStepper(arch, hp, spec, seed, dtype, mask)


def rng_kernels():
    """The task generator's jitted building blocks (normal_pairs, stream_key, task_key,
    uniforms_lanes), for the benchmarks' random-number rate measurements."""
    from ._numba_rng import normal_pairs, stream_key, task_key, uniforms_lanes

    return normal_pairs, stream_key, task_key, uniforms_lanes


def make_stepper(arch, hp, spec, seed, dtype=np.float32, layout=None):
    """A :class:`Stepper` for ``arch`` (Arch), ``hp`` (AdamHP), ``spec`` (TaskSpec); a
    :class:`MixedStepper` for the Archs that run on the mixed-stack kernels and for every
    Arch on classic tokens (``layout`` a ``ClassicLayout``; None: ``arch.layout``)."""
    if _mixed(arch, layout):
        return MixedStepper(arch, hp, spec, seed, dtype, layout)
    return Stepper(arch, hp, spec, seed, dtype)


__all__ = ["NAME", "HOST_ARRAYS", "check_available", "supports", "adam_update", "factored_grads", "NumbaRNG", "numba_rng", "sample_tasks", "loss_and_grads", "model_forward", "train_step",
           "make_stepper", "Stepper", "MixedStepper", "BatchRun", "rng_kernels", "seq_supports", "seq_loss_and_grads",
           "seq_train_step", "SeqStepper", "make_seq_stepper"]
