"""What the fused LSA kernels of the Numba and CuPy backends need to know about an
:class:`reference.model.Arch`: a uniform stack of ``lsa`` layers (one ``causal`` and
one ``clip`` value for every layer, any weight tying, any heads and sizes per
parameter set). Anything else is refused with the reason (see ``supports``)."""

from typing import NamedTuple


class LSAStack(NamedTuple):
    n_layers: int
    n_param_layers: int
    tie: tuple
    causal: bool
    clip: object     # float or None

    def layer_index(self, k):
        return self.tie[k]


def lsa_stack_reason(arch, backend):
    """None when ``arch`` is a uniform LSA stack the fused kernels run, else the reason."""
    kinds = sorted(set(arch.kinds()))
    if kinds != ["lsa"]:
        return (f"the {backend} backend runs stacks of 'lsa' layers only; this model has layer kinds {kinds} "
                "(use backend 'numpy', the reference)")
    for name in ("causal", "clip"):
        try:
            arch.option(name)
        except ValueError:
            return (f"the {backend} backend needs one value of the lsa option {name!r} for every layer, got "
                    f"{[s.opts[name] for s in arch.layers]} (use backend 'numpy', the reference)")
    return None


def lsa_stack_of(arch, backend):
    """The :class:`LSAStack` of ``arch``; ValueError with the reason if it is not one."""
    from ..model import Arch

    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
    reason = lsa_stack_reason(arch, backend)
    if reason is not None:
        raise ValueError(reason)
    return LSAStack(arch.n_layers, arch.n_param_layers, arch.tie, arch.option("causal"), arch.option("clip"))
