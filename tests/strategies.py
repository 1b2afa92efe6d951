"""Hypothesis strategies, in one place. They build valid inputs directly (sizes drawn
in small ranges, data from a drawn seed) instead of filtering invalid ones."""

import numpy as np
from hypothesis import strategies as st

import reference as R

dims = st.fixed_dictionaries({
    "d": st.integers(1, 5),
    "d_y": st.integers(1, 3),
    "N": st.integers(1, 8),
    "B": st.integers(1, 3),
})
heads = st.integers(1, 3)
layers = st.integers(1, 4)
etas = st.floats(0.05, 3.0)
gammas = st.floats(0.0, 0.5)
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


@st.composite
def regression(draw, dtype=None):
    """(dims dict, Tasks, rng) with data drawn from a seed; the dims dict also holds
    the tasks' token layout, ``dm["layout"] = TokenLayout(d, d_y)``."""
    dm = draw(dims)
    dm = {**dm, "layout": R.TokenLayout(dm["d"], dm["d_y"])}
    dt = draw(dtypes) if dtype is None else dtype
    rng = np.random.default_rng(draw(seeds))
    t = R.sample_tasks(rng, dm["B"], dm["d"], dm["N"], dm["d_y"], dtype=dt)
    return dm, t, rng


@st.composite
def layer_case(draw, dtype=None, merged=None):
    """(E, params, causal) for one LSA layer of random heads, key and value sizes."""
    dm, t, rng = draw(regression(dtype))
    D = dm["d"] + dm["d_y"]
    merged = draw(st.booleans()) if merged is None else merged
    p = R.init_lsa_params(rng, D, H=draw(heads), key_size=draw(st.integers(1, D + 1)),
                          value_size=draw(st.integers(1, D + 1)), scale=1.0,
                          dtype=t.X.dtype, merged=merged)
    return R.build_tokens(t.X, t.Y, t.x_q), p, draw(st.booleans())
