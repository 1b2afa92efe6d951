"""The CuPy backend's training step: flat parameters, one fused Adam, on-device tasks.

Generic over the array namespace and the kernels: :mod:`.cupy_backend` builds these
objects with CuPy and the CUDA kernels of :mod:`._cupy_kernels`; the CPU tests build
them with NumPy and the kernels' NumPy twins and compare with ``reference.train_step``.

What a step does (no host round trip: loss and norm stay 0-d device arrays):

    E, y_q  = device_tokens(...)                  tasks drawn on the device (step only)
    L, g    = covariance-form loss and grads      (_cupy_lsa; reference code if causal)
    |g|     = l2norm(flat g)                      one reduction kernel
    p, m, v = adam(flat p, g, m, v, |g|, ...)     one elementwise kernel over all params

Parameters, gradients and Adam moments live in flat vectors (one per step, allocated
from the device memory pool); the per-layer LSAParams/MergedParams handed back are
views into them. When the caller passes back the very tuples returned by the previous
step (the usual training loop), the flat vectors are reused without copying; any
other params are packed (one concatenate).
"""

import numpy as np

from ..layers.lsa import LSAParams, MergedParams
from ..model import loss_and_grads as reference_loss_and_grads
from ._lsa_stack import lsa_stack_of
from ..optim import AdamState
from ..tasks import Tasks
from ..tokens import TokenLayout
from ..train_step import StepResult, check_step_inputs, check_step_state
from . import _cupy_lsa


class FlatLayout:
    """Where each parameter array sits in one flat vector: the layer types and shapes."""

    def __init__(self, params, dtype):
        if not isinstance(params, (tuple, list)) or not params:
            raise TypeError("params must be a non-empty tuple of per-layer LSAParams/MergedParams, "
                            f"got {type(params).__name__}")
        for p in params:
            if not isinstance(p, (LSAParams, MergedParams)):
                raise TypeError(f"each layer's params must be LSAParams or MergedParams, got {type(p).__name__}")
        self.kinds = tuple(type(p) for p in params)
        self.shapes = tuple(tuple(tuple(a.shape) for a in p) for p in params)
        self.dtype = np.dtype(dtype)
        self.offsets = []
        n = 0
        for layer in self.shapes:
            offs = []
            for shape in layer:
                offs.append(n)
                n += int(np.prod(shape))
            self.offsets.append(tuple(offs))
        self.size = n

    def matches(self, tree):
        return (isinstance(tree, (tuple, list)) and tuple(type(p) for p in tree) == self.kinds
                and tuple(tuple(tuple(a.shape) for a in p) for p in tree) == self.shapes)

    def pack(self, tree, xp, what):
        """One flat vector (size,) holding every array of ``tree`` in order."""
        if not self.matches(tree):
            raise ValueError(f"{what} does not match the parameter layout this stepper was built for "
                             f"({[k.__name__ for k in self.kinds]} with shapes {self.shapes})")
        leaves = [a for p in tree for a in p]
        for a in leaves:
            if np.dtype(a.dtype) != self.dtype:
                raise TypeError(f"{what} must have dtype {self.dtype} (the stepper's dtype), got {a.dtype}")
        return xp.concatenate([xp.asarray(a).reshape(-1) for a in leaves])

    def unpack(self, flat):
        """Per-layer params (views into ``flat``)."""
        out = []
        for kind, shapes, offs in zip(self.kinds, self.shapes, self.offsets):
            out.append(kind(*(flat[o:o + int(np.prod(s))].reshape(s) for s, o in zip(shapes, offs))))
        return tuple(out)


class FusedEngine:
    """Loss, gradients and one clipped Adam update on flat parameters."""

    def __init__(self, arch, hp, dtype, xp, kernels):
        self.stack = lsa_stack_of(arch, "cupy")      # what the covariance-form kernels read
        self.arch, self.hp, self.xp, self.k = arch, hp.validate(), xp, kernels
        self.dtype = np.dtype(dtype)
        self.layout = None
        self._last = {}   # "p" / "m" / "v" -> (tree handed out, flat vector behind it)

    # -- flat vectors ----------------------------------------------------------
    def _flat(self, tree, which, what):
        last = self._last.get(which)
        if last is not None and tree is last[0]:
            return last[1]
        if self.layout is None:
            self.layout = FlatLayout(tree, self.dtype)
        return self.layout.pack(tree, self.xp, what)

    def _hand_out(self, which, flat):
        tree = self.layout.unpack(flat)
        self._last[which] = (tree, flat)
        return tree

    # -- math ----------------------------------------------------------------
    def loss_and_grads(self, E, y_q, layers, d, need_dE=False):
        """(L 0-d, grads tree, pred, dE or None) on tokens E; covariance form unless causal."""
        if self.stack.causal:
            L, grads, aux = reference_loss_and_grads(E, y_q, layers, self.arch, d)
            return L, grads, aux["pred"], aux["dE"] if need_dE else None
        return _cupy_lsa.loss_and_grads(E, y_q, layers, self.stack, d, self.xp, self.k.half_mean_sumsq, need_dE)

    def check_dtype(self, dtype):
        if np.dtype(dtype) != self.dtype:
            raise TypeError(f"params must have dtype {self.dtype} (the stepper's dtype), got {np.dtype(dtype)}")

    def step_on(self, params, state, tasks):
        """One step on given tasks (host or device arrays), after the reference's checks
        (``train_step.check_step_inputs``) and the stepper's dtype."""
        layout, dtype = check_step_inputs(params, state, tasks, self.arch, self.hp)
        self.check_dtype(dtype)
        E, y_q = tokens_of(tasks, self.xp, self.dtype)
        return self.update(params, state, E, y_q, layout.d)

    def update(self, params, state, E, y_q, d):
        """One step on tokens E (B, T, D) with targets y_q (B, d_y), unchecked (the entry
        points check first). Returns StepResult whose loss and grad_norm are 0-d arrays
        (float() them to read; that syncs)."""
        xp, hp = self.xp, self.hp
        if not isinstance(state, AdamState):
            raise TypeError(f"state must be an AdamState (reference.optim.adam_init), got {type(state).__name__}")
        p = self._flat(params, "p", "params")
        m = self._flat(state.m, "m", "state.m")
        v = self._flat(state.v, "v", "state.v")
        if E.dtype != self.dtype:
            raise TypeError(f"tokens must have dtype {self.dtype} (the stepper's dtype), got {E.dtype}")
        L, grads, _, _ = self.loss_and_grads(E, y_q, self.layout.unpack(p), d)
        g = xp.concatenate([a.reshape(-1) for layer in grads for a in layer])   # (size,)
        norm = self.k.l2norm(g)
        t = state.t + 1
        clip = -1.0 if hp.clip_norm is None else float(hp.clip_norm)
        p1, m1, v1 = self.k.adam(p, g, m, v, norm, clip, hp.lr, hp.b1, hp.b2, hp.eps,
                                 1.0 - hp.b1 ** t, 1.0 - hp.b2 ** t)
        new_state = AdamState(self._hand_out("m", m1), self._hand_out("v", v1), t)
        return StepResult(self._hand_out("p", p1), new_state, L, norm)


# -- tasks on the device ----------------------------------------------------------

def seed_for(seed, step):
    """The 64-bit generator seed of training step ``step``: SeedSequence([seed, step]),
    the entropy ``reference.tasks.step_rng`` uses (the draws themselves differ)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0])


class HostDraw:
    """NumPy stand-in for the device generator (same interface), for CPU tests."""

    def __init__(self):
        self._rng = np.random.default_rng(0)

    def reseed(self, seed):
        self._rng = np.random.default_rng(seed)

    def normal(self, shape, dtype):
        return self._rng.standard_normal(shape, dtype=dtype)

    def uniform01(self, shape, dtype):
        return self._rng.random(shape, dtype=dtype)


class DeviceDraw:
    """cupy.random's cuRAND generator (Philox4x32-10: reseeding costs no state setup),
    reseeded once per step from (seed, step). Draws straight into float32/float64."""

    def __init__(self, cupy):
        from cupy.cuda import curand

        self._rs = cupy.random.RandomState(0, method=curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)

    def reseed(self, seed):
        self._rs.seed(seed)

    def normal(self, shape, dtype):
        return self._rs.standard_normal(shape, dtype=dtype)

    def uniform01(self, shape, dtype):
        return self._rs.random_sample(shape, dtype=dtype)


def device_tokens(draw, spec, B, dtype, xp):
    """Draw B tasks of ``spec`` (a TaskSpec) with ``draw`` and build their tokens.

    Order of draws: W (B, d_y, d) normal, inputs (B, N+1, d) uniform (context then
    query), label noise (B, N, d_y), distractor labels (B, n_distractors, d_y).
    Returns (E (B, N+1, D), y_q (B, d_y), Tasks)."""
    d, N, d_y = spec.d, spec.N, spec.d_y
    dtype = np.dtype(dtype)
    low, high = (float(v) for v in spec.x_range)
    W = draw.normal((B, d_y, d), dtype)                                # (B, d_y, d)
    if spec.w_scale != 1.0:
        W = W * dtype.type(spec.w_scale)
    x = draw.uniform01((B, N + 1, d), dtype) * dtype.type(high - low) + dtype.type(low)  # (B, T, d)
    y = xp.matmul(x, xp.swapaxes(W, 1, 2))                             # (B, T, d_y) W x for every token
    y_q = y[:, N].copy()                                               # (B, d_y) clean query target
    if spec.noise_std > 0:
        y[:, :N] += dtype.type(spec.noise_std) * draw.normal((B, N, d_y), dtype)
    if spec.n_distractors > 0:
        y[:, :spec.n_distractors] = draw.normal((B, spec.n_distractors, d_y), dtype)
    y[:, N] = 0                                                        # the query's y-slot starts at 0
    E = xp.concatenate([x, y], axis=2)                                 # (B, T, D)
    return E, y_q, Tasks(x[:, :N], y[:, :N], x[:, N], y_q, W)


def tokens_of(tasks, xp, dtype):
    """Tokens of given tasks (like reference.build_tokens, without its host-side checks)."""
    X, Y, x_q = (xp.asarray(a) for a in (tasks.X, tasks.Y, tasks.x_q))
    for name, a in (("X", X), ("Y", Y), ("x_q", x_q), ("y_q", tasks.y_q)):
        if np.dtype(a.dtype) != np.dtype(dtype):
            raise TypeError(f"tasks.{name} must have dtype {np.dtype(dtype)} (the stepper's dtype), got {a.dtype}")
    B, N, d = X.shape
    ctx = xp.concatenate([X, Y], axis=2)                               # (B, N, D)
    q = xp.concatenate([x_q, xp.zeros((B, Y.shape[2]), dtype=X.dtype)], axis=1)  # (B, D)
    return xp.concatenate([ctx, q[:, None]], axis=1), xp.asarray(tasks.y_q)       # (B, T, D), (B, d_y)


class FusedStepper:
    """The backend stepper: ``step`` draws the step's tasks on the device from
    (seed, step); ``step_on`` trains on given tasks (how backends are compared)."""

    def __init__(self, arch, hp, spec, seed, dtype, xp, kernels, draw):
        self.arch, self.spec, self.seed = arch, spec, int(seed)
        self.hp = hp.validate()
        self.dtype = np.dtype(dtype)
        self.xp, self._draw = xp, draw
        self.layout = TokenLayout(spec.d, spec.d_y)
        self.engine = FusedEngine(arch, self.hp, self.dtype, xp, kernels)

    def sample(self, step):
        """Tasks of training step ``step`` (on the device)."""
        return self._tokens(step)[2]

    def _tokens(self, step):
        self._draw.reseed(seed_for(self.seed, step))
        return device_tokens(self._draw, self.spec, self.spec.B, self.dtype, self.xp)

    def step(self, params, state, step):
        self.engine.check_dtype(check_step_state(params, state, self.arch, self.hp, self.layout))
        E, y_q, _ = self._tokens(step)
        return self.engine.update(params, state, E, y_q, self.spec.d)

    def step_on(self, params, state, tasks):
        return self.engine.step_on(params, state, tasks)
