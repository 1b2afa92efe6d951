"""Mixed-stack training steps in the CPU benchmark (``python -m benchmarks --configs
sine,softmax2``): ms per step of our backends and the PyTorch / JAX peers of
``benchmarks/peers/mixed.py``, float32, verified before timed (``benchmarks/bench.py``
runs each row in its own processes, as for the LSA configurations).

    sine       tokens (x, y) -> embed 40 (no bias) -> MLP 160 (biases, tanh GELU) -> LSA
               (one head, key 40), minus feature 39 of the query; sine tasks, N = 10,
               B = 2048
    softmax2   one softmax layer, 2 heads, d = 10, N = 10 (D = T = 11), B = 2048

Both with the training defaults (Adam lr 1e-3, global-norm clip 0.001). One step = draw
B fresh tasks (ours: on the host, ``spec.sample(step_rng(seed, step))``, the same for
numba and numpy), forward, loss, backward, clip and Adam.

Verification (float64 reference on the reference's tasks, the float32 "algebra"
tolerance): ``numba``: loss and gradients at the initial parameters and at parameters
whose layers change the tokens (init scale 1 or 3), and one ``step_on`` against the
NumPy backend's float64 step; ``numpy``: its float32 loss and gradients; a peer: its
loss and gradients at the same two parameter sets.
"""

import numpy as np

MIXED_CONFIGS = {
    "sine": dict(model="sine", N=10, B=2048),
    "softmax2": dict(model="softmax", d=10, N=10, B=2048, heads=2),
}
BIG_SCALE = {"sine": 1.0, "softmax": 3.0}


def problem(cfg, seed=0):
    """Arch, AdamHP, task spec, float32 initial params (the official init) and float32
    verification tasks drawn by the reference."""
    from reference import Arch, InitSettings, LayerSpec
    from reference.optim import AdamHP
    from reference.tasks import SineTaskSpec, TaskSpec, step_rng

    if cfg["model"] == "sine":
        arch = Arch((LayerSpec("embed", (("width", 40),)), LayerSpec("mlp", (("width", 160),)), LayerSpec("lsa")))
        spec = SineTaskSpec(N=cfg["N"], B=cfg["B"])
    else:
        arch = Arch((LayerSpec("softmax", (("heads", cfg["heads"]),)),))
        spec = TaskSpec(d=cfg["d"], N=cfg["N"], B=cfg["B"])
    hp = AdamHP(lr=1e-3, clip_norm=0.001)
    params = arch.init(np.random.default_rng(seed), spec.d + spec.d_y, InitSettings(dtype=np.float32))
    tasks = spec.sample(step_rng(seed + 1000, 0), dtype=np.float32)
    return arch, hp, spec, params, tasks


def big_params(cfg, arch, seed=1):
    from reference import InitSettings

    return arch.init(np.random.default_rng(seed), 2 if cfg["model"] == "sine" else cfg["d"] + 1,
                     InitSettings(scale=BIG_SCALE[cfg["model"]], dtype=np.float32))


def _loss_grads64(tasks, params, arch):
    from reference import loss_and_grads
    from reference.tree import tree_leaves, tree_map

    c = lambda a: np.asarray(a, np.float64)  # noqa: E731
    lay = arch.layout(tasks.X.shape[2], tasks.Y.shape[2])
    E = lay.build(c(tasks.X), c(tasks.Y), c(tasks.x_q))
    L, g, _ = loss_and_grads(E, c(tasks.y_q), tree_map(c, params), arch, lay)
    return float(L), tree_leaves(g)


def _rel(a, b):
    from .bench import _rel as rel

    return rel(a, b)


def _verdict(checks):
    from .bench import _verdict as verdict

    return verdict(checks)


def _checks(label, L1, g1, L0, g0):
    flat = lambda gs: np.concatenate([np.ravel(a) for a in gs])  # noqa: E731
    return [dict(what=f"loss vs reference f64 ({label})", rel_err=_rel([float(L1)], [L0])),
            dict(what=f"grads vs reference f64 ({label})", rel_err=_rel(flat(g1), flat(g0)))]


class OursMixed:
    def __init__(self, name, cfg, seed=0):
        from reference.backends import get_backend
        from reference.optim import adam_init

        self.name, self.cfg = name, cfg
        self.backend = get_backend(name)
        self.arch, self.hp, self.spec, self.params0, self.vtasks = problem(cfg, seed)
        self.stepper = self.backend.make_stepper(self.arch, self.hp, self.spec, seed, np.float32)
        self.params, self.state = self.params0, adam_init(self.params0)
        self.t = 0
        self.last_loss = float("nan")

    def step(self):
        r = self.stepper.step(self.params, self.state, self.t)
        self.params, self.state, self.last_loss = r.params, r.state, r.loss
        self.t += 1

    def verify(self):
        from reference.backends import numpy_backend
        from reference.optim import adam_init
        from reference.tasks import Tasks
        from reference.tree import to_vector, tree_leaves, tree_map

        t = self.vtasks
        lay = self.arch.layout(t.X.shape[2], t.Y.shape[2])
        E = lay.build(t.X, t.Y, t.x_q)
        sets = (("init", self.params0),) if self.name == "numpy" else (("init", self.params0),
                                                                        ("big", big_params(self.cfg, self.arch)))
        checks = []
        for label, params in sets:
            L1, g1, _ = self.backend.loss_and_grads(E, t.y_q, params, self.arch, lay)
            checks += _checks(label, L1, tree_leaves(g1), *_loss_grads64(t, params, self.arch))
        if self.name == "numba":
            flat = lambda r: to_vector(r.params, np.float64)  # noqa: E731
            p64 = tree_map(lambda a: np.asarray(a, np.float64), self.params0)
            t64 = Tasks(*(np.asarray(a, np.float64) for a in t))
            r64 = numpy_backend.make_stepper(self.arch, self.hp, self.spec, 0, np.float64).step_on(
                p64, adam_init(p64), t64)
            r1 = self.stepper.step_on(self.params0, adam_init(self.params0), t)
            checks.append(dict(what="step_on params vs numpy backend float64 step", rel_err=_rel(flat(r1), flat(r64))))
        return _verdict(checks)

    def parts(self):
        from reference import loss_and_grads
        from reference.backends import numba_backend
        from reference.optim import adam_update

        t = self.vtasks
        lay = self.arch.layout(t.X.shape[2], t.Y.shape[2])
        E = lay.build(t.X, t.Y, t.x_q)
        p, st, hp = self.params, self.state, self.hp
        _, grads, _ = loss_and_grads(E, t.y_q, p, self.arch, lay)
        if self.name == "numba":
            lg = lambda: numba_backend.loss_and_grads(E, t.y_q, p, self.arch, lay, need_dE=False)  # noqa: E731
            adam = lambda: numba_backend.adam_update(p, grads, st, hp, np.dtype(np.float32))  # noqa: E731
        else:
            lg = lambda: loss_and_grads(E, t.y_q, p, self.arch, lay)  # noqa: E731
            adam = lambda: adam_update(p, grads, st, hp)  # noqa: E731
        return {"sample": lambda: self.stepper.sample(1), "backward": lg, "adam": adam}

    def threads(self):
        from .bench import Ours

        return Ours.threads(self)                     # the LSA rows' record (it reads self.name only)


class PeerMixed:
    def __init__(self, name, cfg, seed=0):
        from .peers.mixed import make_mixed_peer
        from reference.tree import tree_leaves

        self.name, self.cfg = name, cfg
        self.arch, hp, _, params0, self.vtasks = problem(cfg, seed)
        self.peer = make_mixed_peer(name, cfg["model"], cfg, tree_leaves(params0), hp, seed=seed)
        self.params0 = params0
        self.last_loss = float("nan")

    def step(self):
        self.peer.step()
        self.last_loss = self.peer.loss()

    def verify(self):
        from reference.tree import tree_leaves

        t = self.vtasks
        checks = []
        for label, params in (("init", self.params0), ("big", big_params(self.cfg, self.arch))):
            self.peer.set_params(tree_leaves(params))
            L1, g1 = self.peer.forward_loss(t.X, t.Y, t.x_q, t.y_q), self.peer.grads(t.X, t.Y, t.x_q, t.y_q)
            checks += _checks(label, L1, g1, *_loss_grads64(t, params, self.arch))
        self.peer.set_params(tree_leaves(self.params0))
        return _verdict(checks)

    def parts(self):
        return {}

    def threads(self):
        return self.peer.threads()


def make_mixed_impl(name, cfg):
    from .bench import OURS

    return OursMixed(name, cfg) if name in OURS else PeerMixed(name, cfg)
