"""Example adapters for ``icgd conformance`` (SPEC.md section 14): one function per vector
kind, plain NumPy arrays in and out.

* ``numpy_adapter``: the NumPy reference itself through the protocol (run in CI; it
  passes every case);
* ``jax_adapter`` and ``torch_adapter``: ports written from SPEC.md alone, in float64,
  with the gradients from the library's autodiff. They need JAX or PyTorch, which are
  not dependencies of icgd; nothing imports them unless asked to.

Each is short enough to read as a porting guide. Copy one next to your port, replace
the calls into the library by calls into your code, and run
``icgd conformance my_adapter.py`` in your CI.
"""
