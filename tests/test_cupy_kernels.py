"""The CuPy backend's CUDA kernel bodies compile with NVRTC (no GPU needed).

CuPy compiles ElementwiseKernel bodies with NVRTC on first call, which needs a GPU.
This test compiles the same Adam body inside a plain wrapper (T = float and double,
the way CuPy's ElementwiseKernel binds its typed arguments) straight through NVRTC's
C API, so a syntax or overload error in the body shows up on any machine that has
NVRTC (a GPU machine, or ``pip install nvidia-cuda-nvrtc-cu12``; point
ICGD_NVRTC_LIB at libnvrtc.so.12 if it is not found). It also checks that the float
variant stays in single precision (sqrt.rn.f32). Whether the kernel then RUNS
correctly is the job of the gpu-marked tests in test_cupy_backend.py.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

import pytest

from reference.backends import _cupy_kernels as K


def _find_nvrtc():
    cands = [os.environ.get("ICGD_NVRTC_LIB")]
    found = ctypes.util.find_library("nvrtc")
    cands.append(found)
    for root in sys.path:
        cands += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    cands += ["libnvrtc.so.12", "libnvrtc.so"]
    for c in cands:
        if not c:
            continue
        try:
            return ctypes.CDLL(c), None
        except OSError:
            continue
    return None, "NVRTC (libnvrtc.so) not found; set ICGD_NVRTC_LIB or pip install nvidia-cuda-nvrtc-cu12"


def _compile(lib, src, opts):
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"icgd_kernel.cu", 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram failed with {rc}"
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace"), ptx.decode(errors="replace")


def _adam_wrapper(T):
    return f"""
typedef {T} T;
extern "C" __global__ void icgd_adam_check(const T* P, const T* G, const T* Mi, const T* Vi, const T* gnorm,
        const double clip, const double lr, const double b1, const double b2, const double eps,
        const double c1, const double c2, T* P_OUT, T* M_OUT, T* V_OUT, long long n) {{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const T p = P[i]; const T g = G[i]; const T m = Mi[i]; const T v = Vi[i];
    T &p_out = P_OUT[i]; T &m_out = M_OUT[i]; T &v_out = V_OUT[i];
{K._ADAM_BODY}
}}
"""


@pytest.mark.parametrize("T", ["float", "double"])
def test_adam_body_compiles_with_nvrtc(T):
    lib, reason = _find_nvrtc()
    if lib is None:
        pytest.skip(reason)
    rc, log, ptx = _compile(lib, _adam_wrapper(T), ["-arch=compute_80", "--std=c++17"])
    assert rc == 0, f"NVRTC failed ({rc}):\n{log}"
    if T == "float":
        assert "sqrt.rn.f32" in ptx and "sqrt.rn.f64" not in ptx, "float Adam must stay in single precision"


def test_nvrtc_check_can_fail():
    """The compile check rejects a broken body (a checker that cannot fail proves nothing)."""
    lib, reason = _find_nvrtc()
    if lib is None:
        pytest.skip(reason)
    rc, log, _ = _compile(lib, _adam_wrapper("float").replace("m_out = m1;", "m_out = m1 +;"), ["-arch=compute_80"])
    assert rc != 0 and "error" in log
