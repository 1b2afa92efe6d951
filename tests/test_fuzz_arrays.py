"""Bad arrays into every public function and fast path: a clear error before any work.

Each test draws (Hypothesis, ``strategies.bad_calls``) a valid call of one entry point
and makes one array argument invalid: None, a dtype it cannot take (object, int,
float16, bool, complex, the other float dtype), NaN or inf entries, a wrong number of
dimensions or a size that does not fit the other arguments, overflow-scale task data,
a negative second moment of Adam, or the call built with B = 0 tasks or N = 0 context
pairs. It asserts that

* a ValueError or TypeError is raised, whose message names the argument;
* it is raised by a validator (the innermost frame of the traceback is a ``check*`` /
  ``validate`` function of ``reference``), not from inside NumPy or Numba, so no NaN
  result is returned and nothing is read out of bounds;
* on the fast paths no kernel ran (the Numba kernels and the CuPy step's math are
  replaced by tripwires during the call).

Entry points that hold a model are parametrised over the layer registry
(``reference.layers.layer_types()``, each kind with its default options, two separate
layers); the backend entry points over ``reference.backends.backend_names()`` (skipped,
with the reason, where ``check_available()`` fails or the backend does not support the
kind) plus ``cupy-host-twin``, the CuPy backend's step code on NumPy, as in
``tests/test_conformance.py`` (through its stepper, whose ``step_on`` is what the
backend's ``train_step`` runs). A newly registered layer or backend is covered by
registering it.
"""

import contextlib
import re
from typing import Callable, NamedTuple
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference as R
import strategies as S
import test_conformance as C
from reference.backends import _cupy_step, _numba_mixed, backend_names, numba_backend
from reference.backends._cupy_kernels import HostKernels
from reference.layers import InitSettings, LayerSpec, layer_types
from reference.model import Arch, model_backward, model_forward
from reference.optim import AdamHP, AdamState, adam_update, clip_by_global_norm, global_norm
from reference.tasks import TaskSpec
from reference.train_step import train_step
from reference.tree import tree_map

ArrayArg, ValidCall = S.ArrayArg, S.ValidCall
KINDS = sorted(layer_types())
HP = AdamHP(lr=1e-2, clip_norm=1.0)


# ------------------------------------------------------------------ valid calls ----

def _arch(kind):
    """Two layers of ``kind``; a kind without parameters (positional encodings) is
    followed by an LSA layer instead, so that the model has parameters to train."""
    spec = LayerSpec(kind)
    return Arch((spec, LayerSpec("lsa") if spec.param_floats(4) == 0 else spec))


def _needs_context(arch):
    """Whether some layer refuses a single token (N = 0 context pairs): per-token layers
    (an MLP, an embedding) take any T >= 1, context-only attention needs T >= 2."""
    for spec in arch.layers:
        try:
            spec.check_tokens(1)
        except ValueError:
            return True
    return False


def _params(rng, arch, D, dtype):
    return arch.init(rng, D, InitSettings(scale=0.3, n_layers=1, dtype=dtype))


def _leaf_args(tree, path, names=None, **flags):
    """An ArrayArg for every leaf of the parameter tree at ``path`` in the call's
    arguments; every axis is fixed (by the other leaves of its layer or by the token
    width). An error must name ``names`` (params: the leaf's field or "params")."""
    out = []
    for i, layer in enumerate(tree):
        for f, a in zip(layer._fields, layer):
            own = (f, "params") if names is None else names
            tied = own + tuple(layer._fields) + ("E",) if names is None else own
            out.append(ArrayArg(path + (i, f), own, tuple(range(a.ndim)), tied, **flags))
    return out


def _state(rng, params):
    """A nonzero Adam state (m any sign, v >= 0) at step 3."""
    m = tree_map(lambda p: (0.01 * rng.standard_normal(p.shape)).astype(p.dtype), params)
    v = tree_map(lambda p: (1e-4 * rng.random(p.shape)).astype(p.dtype), params)
    return AdamState(m, v, 3)


def _task_args():
    tn = ("X", "Y", "x_q", "y_q")
    return [ArrayArg(("tasks", "X"), ("X",), (0, 1, 2), tn, data=True),
            ArrayArg(("tasks", "Y"), ("Y",), (0, 1, 2), tn, data=True),
            ArrayArg(("tasks", "x_q"), ("x_q",), (0, 1), tn, data=True),
            ArrayArg(("tasks", "y_q"), ("y_q",), (0, 1), tn, data=True)]


def _state_args(state):
    return (_leaf_args(state.m, ("state", "m"), ("state.m",))
            + _leaf_args(state.v, ("state", "v"), ("state.v",), nonneg=True))


def step_call(kind):
    """params, state, tasks of a training step (train_step, stepper.step_on)."""
    arch = _arch(kind)

    def build(rng, dims, dtype):
        t = S.small_tasks(rng, dims, dtype)
        params = _params(rng, arch, dims["d"] + dims["d_y"], dtype)
        state = _state(rng, params)
        arrays = _task_args() + _leaf_args(params, ("params",)) + _state_args(state)
        return ValidCall({"params": params, "state": state, "tasks": t, "dims": dims, "dtype": dtype}, tuple(arrays),
                         {"B": "X", "N": "X"})
    return arch, build


def drawn_step_call(kind):
    """params, state of a stepper's ``step`` (the stepper draws its own tasks)."""
    arch = _arch(kind)

    def build(rng, dims, dtype):
        params = _params(rng, arch, dims["d"] + dims["d_y"], dtype)
        state = _state(rng, params)
        arrays = _leaf_args(params, ("params",)) + _state_args(state)
        return ValidCall({"params": params, "state": state, "dims": dims, "dtype": dtype}, tuple(arrays))
    return arch, build


def model_call(kind, with_targets, n_layers=2):
    """E (and y_q) and params of a model call (``n_layers`` separate layers of ``kind``)."""
    arch = _arch(kind) if n_layers == 2 else Arch((LayerSpec(kind),))

    def build(rng, dims, dtype):
        t = S.small_tasks(rng, dims, dtype)
        params = _params(rng, arch, dims["d"] + dims["d_y"], dtype)
        args = {"E": S.raw_tokens(t), "params": params}
        free = not any(len(p) for p in params)    # no parameters (a positional encoding alone): any width and dtype
        tied = ((0,) if with_targets else ()) if free else ((0, 2) if with_targets else (2,))
        arrays = [ArrayArg(("E",), ("E",), tied, ("E", "y_q", "params"), data=True, shared_dtype=not free,
                           complex_ok=free)]
        if with_targets:
            args["y_q"] = t.y_q
            arrays.append(ArrayArg(("y_q",), ("y_q",), (0, 1), ("E", "y_q"), data=True))
        arrays += _leaf_args(params, ("params",))
        return ValidCall({**args, "layout": R.TokenLayout(dims["d"], dims["d_y"])}, tuple(arrays),
                         {"B": "E", **({"N": "E"} if _needs_context(arch) else {})})
    return arch, build


def backward_call(kind, layer):
    """dout and the cache of a valid forward (the model's, or its first layer's)."""
    arch = _arch(kind)

    def build(rng, dims, dtype):
        t = S.small_tasks(rng, dims, dtype)
        params = _params(rng, arch, dims["d"] + dims["d_y"], dtype)
        E = S.raw_tokens(t)
        out, cache = arch.layers[0].forward(E, params[0]) if layer else model_forward(E, params, arch)
        dout = rng.standard_normal(out.shape).astype(dtype)
        return ValidCall({"dout": dout, "cache": cache}, (ArrayArg(("dout",), ("dout",), (0, 1, 2)),))
    return build


def data_call(with_W_0=False, W_0_batched=False, W_0_either=False, with_y_q=False, free_d_y=True):
    """X, Y, x_q (W_0, y_q) of a task-data function. ``W_0_either``: the function takes
    W_0 of shape (d_y, d) or (B, d_y, d), so adding or dropping an axis may be valid."""
    def build(rng, dims, dtype):
        t = S.small_tasks(rng, dims, dtype)
        tn = ("X", "Y", "x_q", "y_q", "W_0")
        args = {"X": t.X, "Y": t.Y, "x_q": t.x_q}
        arrays = [ArrayArg(("X",), ("X",), (0, 1, 2), tn, data=True),
                  ArrayArg(("Y",), ("Y",), (0, 1) if free_d_y and not with_y_q and not with_W_0 else (0, 1, 2), tn,
                           data=True),
                  ArrayArg(("x_q",), ("x_q",), (0, 1), tn, data=True)]
        if with_y_q:
            args["y_q"] = t.y_q
            arrays.append(ArrayArg(("y_q",), ("y_q",), (0, 1), tn, data=True))
        if with_W_0:
            shape = (max(dims["B"], 1), dims["d_y"], dims["d"]) if W_0_batched else (dims["d_y"], dims["d"])
            args["W_0"] = (0.3 * rng.standard_normal(shape)).astype(dtype)
            arrays.append(ArrayArg(("W_0",), ("W_0",), tuple(range(len(shape))), tn, shared_dtype=False, optional=True,
                                   fixed_ndim=not W_0_either))
        return ValidCall(args, tuple(arrays), {"B": "X", "N": "X"})
    return build


def adam_call(kind, with_state=True):
    """params, grads, state of one Adam update (or grads alone)."""
    arch = _arch(kind)

    def build(rng, dims, dtype):
        params = _params(rng, arch, dims["d"] + dims["d_y"], dtype)
        grads = tree_map(lambda p: (0.1 * rng.standard_normal(p.shape)).astype(p.dtype), params)
        if not with_state:
            arrays = _leaf_args(grads, ("grads",), ("grads",), fixed_ndim=False, shared_dtype=False, optional=True)
            arrays = [a._replace(tied=()) for a in arrays]
            return ValidCall({"grads": grads}, tuple(arrays))
        state = _state(rng, params)
        arrays = _leaf_args(params, ("params",)) + _leaf_args(grads, ("grads",), ("grads",)) + _state_args(state)
        return ValidCall({"params": params, "grads": grads, "state": state}, tuple(arrays))
    return build


# --------------------------------------------------------------- the entry points ----

class Entry(NamedTuple):
    id: str
    build: Callable      # (rng, dims, dtype) -> ValidCall
    call: Callable       # (**args) -> anything


def _reference_entries():
    out = [
        Entry("build_tokens", data_call(with_W_0=True, W_0_either=True), lambda X, Y, x_q, W_0: R.build_tokens(X, Y, x_q, W_0)),
        Entry("TokenLayout.build", _with_layout(data_call()), lambda X, Y, x_q, layout: layout.build(X, Y, x_q)),
        Entry("gd_predict", data_call(with_W_0=True, W_0_batched=True, W_0_either=True),
              lambda X, Y, x_q, W_0: R.gd_predict(X, Y, x_q, [0.5, 0.2], 2, W_0=W_0)),
        Entry("gdpp_predict", data_call(with_W_0=True),
              lambda X, Y, x_q, W_0: R.gdpp_predict(X, Y, x_q, [0.5, 0.3], [0.1, 0.0], W_0=W_0)),
        Entry("least_squares_predict", data_call(), lambda X, Y, x_q: R.least_squares_predict(X, Y, x_q, ridge=0.0)),
        Entry("ridge_predict", data_call(), lambda X, Y, x_q: R.least_squares_predict(X, Y, x_q, ridge=0.1)),
        Entry("line_search_eta", data_call(with_y_q=True),
              lambda X, Y, x_q, y_q: R.line_search_eta(X, Y, x_q, y_q, n_steps=2, grid=[0.1, 0.5, 1.0])),
        Entry("gd_layer", _W_0_only, lambda W_0, d, d_y: R.gd_layer(d, d_y, 4, 0.5, W_0)),
        Entry("gdpp_layer", _W_0_only, lambda W_0, d, d_y: R.gdpp_layer(d, d_y, 4, 0.5, 0.1, W_0)),
        Entry("loss_forward", _loss_call, lambda pred, y_q: R.loss_forward(pred, y_q)),
        Entry("readout", _readout_call, lambda E: R.readout(E, 1)),
        Entry("to_merged", _lsa_params_call, lambda params: R.to_merged(params[0])),
    ]
    for kind in KINDS:
        arch, model = model_call(kind, False)
        _, loss = model_call(kind, True)
        _, step = step_call(kind)
        out += [
            Entry(f"model_forward-{kind}", model, lambda E, params, layout, arch=arch: model_forward(E, params, arch)),
            Entry(f"predict-{kind}", model, lambda E, params, layout, arch=arch: R.predict(E, params, arch, layout)),
            Entry(f"loss_and_grads-{kind}", loss,
                  lambda E, y_q, params, layout, arch=arch: R.loss_and_grads(E, y_q, params, arch, layout)),
            Entry(f"layer_forward-{kind}", model_call(kind, False, n_layers=1)[1],
                  lambda E, params, layout, arch=arch: arch.layers[0].forward(E, params[0])),
            Entry(f"model_backward-{kind}", backward_call(kind, False), lambda dout, cache: model_backward(dout, cache)),
            Entry(f"layer_backward-{kind}", backward_call(kind, True),
                  lambda dout, cache, arch=arch: arch.layers[0].backward(dout, cache)),
            Entry(f"train_step-{kind}", step,
                  lambda params, state, tasks, arch=arch, **_: train_step(params, state, tasks, arch, HP)),
            Entry(f"adam_update-{kind}", adam_call(kind), lambda params, grads, state: adam_update(params, grads, state, HP)),
            Entry(f"global_norm-{kind}", adam_call(kind, with_state=False), lambda grads: global_norm(grads)),
            Entry(f"clip_by_global_norm-{kind}", adam_call(kind, with_state=False),
                  lambda grads: clip_by_global_norm(grads, 0.5)),
        ]
    return out


def _W_0_only(rng, dims, dtype):
    W_0 = rng.standard_normal((dims["d_y"], dims["d"]))
    return ValidCall({"W_0": W_0, "d": dims["d"], "d_y": dims["d_y"]},
                     (ArrayArg(("W_0",), ("W_0",), (0, 1), shared_dtype=False, optional=True),))


def _with_layout(build):
    def with_layout(rng, dims, dtype):
        valid = build(rng, dims, dtype)
        return valid._replace(args={**valid.args, "layout": R.TokenLayout(dims["d"], dims["d_y"])})
    return with_layout


def _loss_call(rng, dims, dtype):
    t = S.small_tasks(rng, dims, dtype)
    pred = (t.y_q + 0.1).astype(dtype)
    return ValidCall({"pred": pred, "y_q": t.y_q},
                     (ArrayArg(("pred",), ("pred",), (), data=True),
                      ArrayArg(("y_q",), ("y_q",), (0, 1), ("pred",), data=True)), {"B": "pred"})


def _readout_call(rng, dims, dtype):
    E = S.raw_tokens(S.small_tasks(rng, dims, dtype))
    return ValidCall({"E": E}, (ArrayArg(("E",), ("E",), shared_dtype=False, complex_ok=True),))


def _lsa_params_call(rng, dims, dtype):
    arch = R.lsa_stack(1)
    params = _params(rng, arch, dims["d"] + dims["d_y"], dtype)
    return ValidCall({"params": params}, tuple(_leaf_args(params, ("params",))))


REFERENCE_ENTRIES = _reference_entries()


# ------------------------------------------------------------------ the checks ----

def _named(name, msg):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def check_rejected(bad, call):
    """``call(**bad.args)`` raises bad.exc from a validator, naming one of bad.names."""
    with pytest.raises((ValueError, TypeError)) as info:
        result = call(**bad.args)
        pytest.fail(f"{bad.what}: no error, returned {type(result).__name__}")
    err = info.value
    # a subclass (reference._checks.NonFiniteError is a ValueError) counts; the frame check
    # below makes sure it came from a validator, not from deep inside NumPy
    assert isinstance(err, bad.exc), f"{bad.what}: expected {bad.exc.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert any(_named(n, msg) for n in bad.names), f"{bad.what}: the message names none of {bad.names}: {msg}"
    tb = info.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    where = f"{frame.f_code.co_filename}:{frame.f_code.co_name}"
    assert "/reference/" in frame.f_code.co_filename and re.match(r"_?check|validate$", frame.f_code.co_name), (
        f"{bad.what}: raised outside the validators, at {where}: {type(err).__name__}: {msg}")


@pytest.mark.parametrize("entry", REFERENCE_ENTRIES, ids=[e.id for e in REFERENCE_ENTRIES])
@given(data=st.data())
def test_reference_rejects_bad_arrays(entry, data):
    bad = data.draw(S.bad_calls(entry.build), label="bad call")
    check_rejected(bad, entry.call)


# ------------------------------------------------------------------- fast paths ----

def _tripwire(what):
    def ran(*args, **kwargs):
        raise AssertionError(f"{what} ran on invalid input")
    return ran


@contextlib.contextmanager
def no_kernels():
    """The Numba kernels and the CuPy step's math (host twin) replaced by tripwires."""
    with contextlib.ExitStack() as stack:
        for name in ("run_batch", "run_batch_dspace", "adam_flat", "sample_to_arrays"):
            stack.enter_context(mock.patch.object(numba_backend, name, _tripwire(f"numba kernel {name}")))
        for name in ("forward", "backward"):                      # every mixed-stack kernel runs under these
            stack.enter_context(mock.patch.object(_numba_mixed, name, _tripwire(f"numba mixed-stack {name}")))
        stack.enter_context(mock.patch.object(_cupy_step._cupy_lsa, "loss_and_grads", _tripwire("CuPy LSA math")))
        stack.enter_context(mock.patch.object(_cupy_step, "reference_loss_and_grads", _tripwire("CuPy causal math")))
        for name in ("adam", "l2norm"):
            stack.enter_context(mock.patch.object(HostKernels, name, _tripwire(f"CuPy kernel twin {name}")))
        yield


def _stepper(impl, arch, dims, dtype):
    """A stepper for tasks of ``dims`` (sizes below 1 raised to 1: the stepper's own
    spec is valid; the bad sizes are in the tasks given to ``step_on``)."""
    spec = TaskSpec(**{k: max(int(v), 1) for k, v in dims.items()})
    return impl.make_stepper(arch, HP, spec, 0, dtype)


def _backend_entries(impl_name):
    """(entry id, make(kind) -> (arch, builder), call(impl, arch) -> the call) for one
    implementation: its stepper's step_on and step, and (where its entry points are the
    backend's own) model_forward, loss_and_grads and train_step."""
    out = [("step_on", step_call,
            lambda impl, arch: lambda params, state, tasks, dims, dtype:
            _stepper(impl, arch, dims, dtype).step_on(params, state, tasks)),
           ("step", drawn_step_call,
            lambda impl, arch: lambda params, state, dims, dtype:
            _stepper(impl, arch, dims, dtype).step(params, state, 3))]
    if C.IMPLS[impl_name].validates_input:
        out += [("model_forward", lambda kind: model_call(kind, False),
                 lambda impl, arch: lambda E, params, layout: impl.model_forward(E, params, arch)),
                ("loss_and_grads", lambda kind: model_call(kind, True),
                 lambda impl, arch: lambda E, y_q, params, layout: impl.loss_and_grads(E, y_q, params, arch, layout)),
                ("train_step", step_call,
                 lambda impl, arch: lambda params, state, tasks, **_: impl.train_step(params, state, tasks, arch, HP))]
    return out


BACKEND_CASES = [pytest.param(name, kind, eid, make, call, id=f"{name}-{eid}-{kind}",
                              marks=[pytest.mark.gpu] if C.IMPLS[name].needs_device else [])
                 for name in list(backend_names()) + [C.CupyHostTwin.name]
                 for eid, make, call in _backend_entries(name) for kind in KINDS]


@pytest.mark.parametrize("impl_name, kind, eid, make, call", BACKEND_CASES)
@given(data=st.data())
def test_fast_paths_reject_bad_arrays_before_any_kernel(impl_name, kind, eid, make, call, data):
    impl = C.IMPLS[impl_name]
    impl.require()
    arch, build = make(kind)
    reason = impl.supports(arch)
    if reason is not None:
        pytest.skip(f"{impl_name} does not run layer kind {kind!r}: {reason}")
    bad = data.draw(S.bad_calls(build), label="bad call")
    with no_kernels():
        check_rejected(bad, call(impl, arch))
