"""Optional PyTorch / JAX peers of one LSA training step, for benchmarking.

The icgd package never imports this.  torch and jax are imported lazily, only
when a peer is probed or built.

    from benchmarks.peers import available_peers, make_peer
    for name in available_peers():
        peer = make_peer(name, dict(d=10, N=10, B=2048, K=1), seed=0)
        peer.step(); print(name, peer.loss())

A peer has ``step()``, ``loss()``, ``parts()`` (callables "sample", "forward",
"backward", "adam"), ``get_params()``/``set_params(list)``,
``forward_loss(X, Y, xq, yq)``, ``grads(X, Y, xq, yq)`` and, for
verification, ``step_on(X, Y, xq, yq)`` (one step on given data).
"""

from __future__ import annotations

PEER_NAMES = (
    "torch-eager-attn",
    "torch-eager-cov",
    "torch-compile-attn",
    "torch-compile-cov",
    "jax-jit-attn",
    "jax-jit-cov",
)

#: peer name -> why it cannot run here (filled in by ``available_peers``).
UNAVAILABLE_REASONS: dict[str, str] = {}

_probed: list[str] | None = None


def _probe_torch_compile() -> str | None:
    """Return None if torch.compile (inductor, CPU) works here, else a reason."""
    try:
        import torch

        def f(a, b):
            return torch.sum(torch.sin(a) * b)

        cf = torch.compile(f, fullgraph=True)
        a, b = torch.ones(3), torch.full((3,), 2.0)
        if not torch.allclose(cf(a, b), f(a, b)):
            return "torch.compile gave a wrong result on a probe function"
    except Exception as exc:  # compiler missing, inductor broken, ...
        return f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def available_peers(refresh: bool = False) -> list[str]:
    """Names of the peers that can run here (probes once, then cached).

    Probing torch.compile compiles a tiny function (seconds on first use).
    """
    global _probed
    if _probed is not None and not refresh:
        return list(_probed)
    UNAVAILABLE_REASONS.clear()
    ok: list[str] = []
    try:
        import torch  # noqa: F401

        have_torch = True
    except Exception as exc:
        have_torch = False
        for n in PEER_NAMES:
            if n.startswith("torch-"):
                UNAVAILABLE_REASONS[n] = f"torch not importable: {exc}"
    if have_torch:
        ok += ["torch-eager-attn", "torch-eager-cov"]
        why = _probe_torch_compile()
        if why is None:
            ok += ["torch-compile-attn", "torch-compile-cov"]
        else:
            UNAVAILABLE_REASONS["torch-compile-attn"] = why
            UNAVAILABLE_REASONS["torch-compile-cov"] = why
    try:
        import jax  # noqa: F401
        import jax.numpy  # noqa: F401

        ok += ["jax-jit-attn", "jax-jit-cov"]
    except Exception as exc:
        for n in ("jax-jit-attn", "jax-jit-cov"):
            UNAVAILABLE_REASONS[n] = f"jax not importable: {exc}"
    _probed = ok
    return list(ok)


def make_peer(name: str, cfg: dict, seed: int = 0):
    """Build the peer ``name`` for ``cfg`` (keys d, N, B, K) with init ``seed``.

    Raises ImportError if the framework is missing, ValueError for bad names.
    """
    if name not in PEER_NAMES:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEER_NAMES)}")
    framework, mode, form = name.split("-")
    if framework == "torch":
        from .torch_peer import TorchPeer

        return TorchPeer(cfg, seed=seed, form=form, compile=(mode == "compile"))
    from .jax_peer import JaxPeer

    return JaxPeer(cfg, seed=seed, form=form)


__all__ = ["PEER_NAMES", "UNAVAILABLE_REASONS", "available_peers", "make_peer"]
