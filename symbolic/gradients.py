"""The hand-written LSA backward equals SymPy's derivatives of the loss, exactly.

The loss of ``reference.model.loss_and_grads`` is built symbolically at small sizes,
with every entry of the tokens E, the targets y_q and the weights a scalar symbol:

    out = LSA layer(s)(E)              (transcription of lsa_forward below)
    pred = -out[:, N, d:]              (tokens.readout)
    L = 0.5 * mean_b ||pred_b - y_q,b||^2     (model.loss_forward)

and differentiated with ``sympy.diff``. The other side is the reference's own
hand-written backward, **executed on NumPy object arrays holding SymPy expressions**:
``reference.model.loss_backward`` -> ``reference.tokens.readout_backward`` ->
``reference.layers.lsa.lsa_backward`` (or ``reference.model.model_backward`` for a stack).
Only the forward is transcribed here (the reference forward validates float dtypes and
so cannot take symbols); ``bridge.gradients`` checks that transcription against
``reference.lsa_forward`` numerically, so neither side can drift. Every entry of
backward - derivative must expand to 0.
"""

from functools import lru_cache

import numpy as np
import sympy as sp

import reference as R
from reference.layers.lsa import LSACache, LSAParams, MergedParams
from reference.model import Arch, LossCache, ModelCache, lsa_stack
from reference.tokens import TokenLayout
from reference.tree import tree_leaves, tree_map, tree_paths

from .core import Proof, theorem

SRC = "hand-written backward (reference/layers/lsa.py, reference/model.py)"

# (d, d_y, N, B) for one merged layer; B = 2 checks the 1/B of the mean.
MERGED_SIZES = ((1, 1, 2, 2), (2, 1, 2, 1), (1, 2, 1, 1))
# (d, d_y, N, B, H, key size, value size) for one factored layer with two heads.
FACTORED_SIZES = ((1, 1, 2, 1, 2, 1, 3),)
# (d, d_y, N, B, K, recurrent, fixed) for stacks of merged layers: with the weights held at
# exact rationals the tokens are symbolic, and the other way round (the fully symbolic
# loss of a 2-layer stack has ~1e5 terms).
STACK_SIZES = ((1, 1, 2, 1, 2, True, "weights"), (1, 1, 1, 1, 2, True, "tokens"),
               (1, 1, 1, 1, 2, False, "tokens"), (1, 1, 1, 1, 3, True, "weights"))


class Symbols:
    """Scalar symbols, collected in order, and their generators in the polynomial ring
    QQ[all symbols] once :meth:`ring` is called. An array made with ``symbolic=False``
    holds fixed exact rationals p/q (|p| <= 3, 1 <= q <= 3) drawn from ``rng`` instead."""

    def __init__(self, rng=None):
        self.symbols = []
        self.rng = rng

    def array(self, name, shape, symbolic=True):
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(*shape):
            if symbolic:
                out[idx] = sp.Symbol(f"{name}_{'_'.join(map(str, idx))}", real=True)
                self.symbols.append(out[idx])
            else:
                out[idx] = sp.Rational(int(self.rng.integers(-3, 4)), int(self.rng.integers(1, 4)))
        return out

    def ring(self):
        self.R, *gens = sp.ring(self.symbols, sp.QQ)
        self.gen = dict(zip(self.symbols, gens))
        return self

    def to_ring(self, arr):
        """The same array with every symbol replaced by its ring generator and every
        fixed rational by the ring's constant."""
        out = np.empty(arr.shape, dtype=object)
        for idx in np.ndindex(*arr.shape):
            x = arr[idx]
            out[idx] = self.gen[x] if isinstance(x, sp.Symbol) else self.R(x)
        return out


def named_leaves(tree):
    """[(name, leaf)] of a parameter tree (``reference.tree`` order): the field name,
    tagged ``[layer i]`` when the tree has several layers (``W_KQ[layer 1]``)."""
    out = []
    for path, a in zip(tree_paths(tree), tree_leaves(tree)):
        i, field = path.split(".", 1)
        out.append((f"{field}[layer {i}]" if len(tree) > 1 else field, a))
    return out


def _proj(Et, W):
    """Per-head projection (lsa._proj): Et (B, S, D), W (H, k, D) -> (B, H, S, k); W None = identity."""
    if W is None:
        return Et[:, None, :, :]
    return np.matmul(Et[:, None, :, :], np.swapaxes(W, -1, -2)[None])


def sym_lsa_forward(E, params):
    """lsa_forward (context-only, no clipping) on object arrays, line by line; returns
    (out, LSACache) with the reference's cache layout so its backward can run on it."""
    if isinstance(params, MergedParams):
        W_Q, W_K, W_V, P = params.W_KQ, None, params.W_PV, None      # merged: W_K = I, P = I
    else:
        W_Q, W_K, W_V, P = params
    B, T, D = E.shape
    Ec = E[:, : T - 1, :]                                              # (B, S, D) keys/values: context only
    q = _proj(E, W_Q)                                                  # (B, H, T, Kd)
    k = _proj(Ec, W_K)                                                 # (B, H, S, Kd)
    v = _proj(Ec, W_V)                                                 # (B, H, S, Vd)
    A = np.matmul(q, np.swapaxes(k, -1, -2))                           # (B, H, T, S)
    o = np.matmul(A, v)                                                # (B, H, T, Vd)
    if P is None:
        delta = o.sum(axis=1)                                          # (B, T, D)
    else:
        delta = np.matmul(o, np.swapaxes(P, -1, -2)[None]).sum(axis=1)  # (B, T, D)
    pre = E + delta                                                    # (B, T, D)
    return pre, LSACache(E, Ec, q, k, v, A, o, pre, params, False, None)


class SymProblem:
    """The symbolic loss of one configuration and its exact derivatives.

    All arithmetic runs in the polynomial ring QQ[entries of E, y_q, weights] (SymPy's
    sparse polynomials, ``sympy.polys.rings``): the loss is a polynomial, its
    derivative ``L.diff(x)`` is SymPy's exact polynomial derivative, and a residual is
    zero exactly when it is the zero polynomial (the ring's representation is canonical:
    a dict of monomials with nonzero rational coefficients). This is the same decision
    as expand(residual) == 0, without the cost of expanding expression trees.

    ``fixed`` = "weights" or "tokens" holds that part at exact rationals (seeded), so
    deeper stacks stay small: the statement is then exact in the remaining symbols.
    """

    def __init__(self, d, d_y, N, B, make_params, K=1, recurrent=True, fixed=None, seed=0):
        if fixed not in (None, "weights", "tokens"):
            raise ValueError(f"fixed must be None, 'weights' or 'tokens', got {fixed!r}")
        D = d + d_y
        self.d, self.d_y, self.N, self.B, self.K, self.fixed = d, d_y, N, B, K, fixed
        self.layout = TokenLayout(d, d_y)
        self.arch = lsa_stack(n_layers=K, recurrent=recurrent)
        S = Symbols(np.random.default_rng(seed))
        self.E_sym = S.array("e", (B, N + 1, D), symbolic=fixed != "tokens")
        self.y_sym = S.array("t", (B, d_y))
        self.params_sym = tuple(make_params(S, D, f"{i}" if self.arch.n_param_layers > 1 else "", fixed != "weights")
                                for i in range(self.arch.n_param_layers))
        self.S = S.ring()
        self.E = S.to_ring(self.E_sym)
        self.y_q = S.to_ring(self.y_sym)
        self.params = tree_map(S.to_ring, self.params_sym)
        h, caches, outputs = self.E, [], []
        for layer in range(K):
            h, c = sym_lsa_forward(h, self.params[self.arch.layer_index(layer)])
            caches.append(c)
            outputs.append(h)
        self.out = h
        self.mcache = ModelCache(caches, outputs, self.arch)
        self.pred = -h[:, -1, d:]                                      # (B, d_y)  tokens.readout
        self.err = self.pred - self.y_q                                # (B, d_y)  model.loss_forward
        self.L = sum(e * e for e in self.err.ravel()) * sp.QQ(1, 2) / B

    def derivative(self, arr):
        """dL/dx for every entry x (a ring generator) of an object array."""
        out = np.empty(arr.shape, dtype=object)
        for idx in np.ndindex(*arr.shape):
            out[idx] = self.L.diff(arr[idx])
        return out

    def reference_grads(self, backward):
        """The reference backward chain run on the symbolic arrays: loss_backward (with
        dL = 1 exactly) -> readout_backward -> backward(dout, cache) -> (dE, dparams)."""
        dpred = R.loss_backward(LossCache(self.err), 1)                # (B, d_y)
        dout = self.layout.readout_backward(dpred, self.out.shape)     # (B, T, D)
        if self.K == 1:
            dE, g = backward(dout, self.mcache.layer_caches[0])
            return dE, (g,)
        return backward(dout, self.mcache)

    def compared(self):
        """[(name, ring array)] of the symbolic arguments the gradient is checked for."""
        out = []
        if self.fixed != "weights":
            out += named_leaves(self.params)
        if self.fixed != "tokens":
            out.append(("E", self.E))
        return out

    def gradient_exprs(self):
        """[(name, array of SymPy expressions dL/dx)], for lambdify in the bridge."""
        conv = np.vectorize(lambda q: q.as_expr(), otypes=[object])
        return [(name, conv(self.derivative(a))) for name, a in self.compared()]


def _merged(S, D, tag, symbolic):
    return MergedParams(S.array(f"WKQ{tag}", (1, D, D), symbolic), S.array(f"WPV{tag}", (1, D, D), symbolic))


def _factored(H, Kd, Vd):
    def make(S, D, tag, symbolic):
        return LSAParams(S.array(f"WQ{tag}", (H, Kd, D), symbolic), S.array(f"WK{tag}", (H, Kd, D), symbolic),
                         S.array(f"WV{tag}", (H, Vd, D), symbolic), S.array(f"P{tag}", (H, D, Vd), symbolic))
    return make


@lru_cache(maxsize=None)
def problem(kind, size):
    """The cached symbolic problem for a configuration (used by the proof and the bridge)."""
    if kind == "merged":
        d, d_y, N, B = size
        return SymProblem(d, d_y, N, B, _merged)
    if kind == "factored":
        d, d_y, N, B, H, Kd, Vd = size
        return SymProblem(d, d_y, N, B, _factored(H, Kd, Vd))
    if kind == "stack":
        d, d_y, N, B, K, recurrent, fixed = size
        return SymProblem(d, d_y, N, B, _merged, K=K, recurrent=recurrent, fixed=fixed)
    raise ValueError(f"unknown kind {kind!r}")


def _compare(pf, prob, backward, where):
    dE, dparams = prob.reference_grads(backward)
    grads = {"E": dE, **dict(named_leaves(dparams))}
    n = 0
    for name, arr in prob.compared():
        g = grads.get(name)
        if g is None:
            raise ValueError(f"backward returned no gradient for {name}")
        pf.polys_zero(f"d{name} of the hand-written backward = dL/d{name} (exact derivative of the symbolic loss)",
                      np.asarray(g).ravel(), prob.derivative(arr).ravel(), where)
        n += 1
    if n == 0:
        raise ValueError("nothing to compare")


def _where(size, keys):
    return ", ".join(f"{k}={v}" for k, v in zip(keys, size))


# The smallest merged configuration on which the ring derivative is also compared with
# sympy.diff of the loss as a SymPy expression (the two routes to the same derivative).
SYMPY_DIFF_SIZE = (1, 1, 1, 1)


@theorem("gradients.merged.explicit", source=SRC,
         statement="For one merged-parameter LSA layer with readout and loss 0.5 * mean ||pred - y_q||^2, the reference's "
                   "hand-written backward (run on exact symbolic polynomials) equals the derivative of the loss with "
                   "respect to W_KQ, W_PV and the tokens E, entry by entry; at the smallest size the derivative is also "
                   "sympy.diff of the loss as an expression",
         hypotheses="(d, d_y, N, B) in " + ", ".join(map(str, MERGED_SIZES)) + "; H = 1; every entry of E, y_q, W_KQ, "
                    "W_PV a real scalar symbol")
def prove_gradients_merged(backward=R.lsa_backward, sizes=MERGED_SIZES):
    pf = Proof()
    prob = problem("merged", SYMPY_DIFF_SIZE)
    L = prob.L.as_expr()
    for name, arr in (("W_KQ", prob.params_sym[0].W_KQ), ("W_PV", prob.params_sym[0].W_PV), ("E", prob.E_sym)):
        ring = [prob.L.diff(prob.S.gen[x]).as_expr() for x in arr.ravel()]
        pf.entries_zero(f"the ring derivative dL/d{name} = sympy.diff(L, {name}) on the expression",
                        sp.Matrix([sp.diff(L, x) for x in arr.ravel()]), sp.Matrix(ring),
                        _where(SYMPY_DIFF_SIZE, ("d", "d_y", "N", "B")))
    for size in sizes:
        _compare(pf, problem("merged", size), backward, _where(size, ("d", "d_y", "N", "B")))
    return pf


@theorem("gradients.factored.explicit", source=SRC,
         statement="For one factored LSA layer with two heads (key and value sizes different from D), the hand-written "
                   "backward equals the exact derivative of the loss with respect to W_Q, W_K, W_V, P and E",
         hypotheses="(d, d_y, N, B, H, key size, value size) in " + ", ".join(map(str, FACTORED_SIZES))
                    + "; every entry a real scalar symbol")
def prove_gradients_factored(backward=R.lsa_backward, sizes=FACTORED_SIZES):
    pf = Proof()
    for size in sizes:
        _compare(pf, problem("factored", size), backward, _where(size, ("d", "d_y", "N", "B", "H", "Kd", "Vd")))
    return pf


@theorem("gradients.stack.explicit", source=SRC, slow=True,
         statement="For stacks of K = 2, 3 merged LSA layers (weight-tied or separate), the model backward (layers in "
                   "reverse, a shared layer's gradients summed) equals the exact derivative of the loss: with respect "
                   "to E for fixed rational weights, and with respect to every layer's W_KQ, W_PV for fixed rational "
                   "tokens",
         hypotheses="(d, d_y, N, B, K, recurrent, fixed part) in " + ", ".join(map(str, STACK_SIZES)) + "; the fixed "
                    "part holds seeded exact rationals p/q, every other entry (and y_q) is a real scalar symbol")
def prove_gradients_stack(backward=R.model_backward, sizes=STACK_SIZES):
    pf = Proof()
    for size in sizes:
        d, d_y, N, B, K, rec, fixed = size
        _compare(pf, problem("stack", size), backward,
                 f"d={d}, d_y={d_y}, N={N}, B={B}, K={K}, {'recurrent' if rec else 'separate'}, {fixed} fixed")
    return pf
