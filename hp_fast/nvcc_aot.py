"""Ahead-of-time build of the CUDA head_gain kernel (csrc/cuda/head_gain.cu) for named GPU
architectures with ``nvcc``, on a machine without a GPU and with a CPU build of torch.

A CPU build of torch ships the c10/cuda headers but not the header CMake generates for CUDA
builds (``c10/cuda/impl/cuda_cmake_macros.h``); ``stub_cuda_macros`` writes a one-line stand-in
(the shared-library macro CUDA builds define) into a folder of the caller's choosing, which
goes first on the include path. The object's registers, stack and shared memory per kernel
instantiation come from ``cuobjdump -res-usage`` (``hp_fast.pursuit.triton_aot.res_usage``).
Used by tests/unit/test_cuda_build.py and benchmarks/kernel_resources.py (``--cuda``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time

CU_SOURCE = os.path.join("csrc", "cuda", "head_gain.cu")
# what torch.utils.cpp_extension gives nvcc for a CUDAExtension, plus setup.py's own flags
# (torch >= 2.10 builds extensions as C++20)
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1", "-Xcompiler", "-fPIC"]


def nvcc_path() -> str | None:
    """``nvcc`` on PATH, else under CUDA_HOME, else None."""
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if found is None and home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        found = os.path.join(home, "bin", "nvcc")
    return found


def stub_cuda_macros(folder: str) -> str:
    """Write ``folder/c10/cuda/impl/cuda_cmake_macros.h`` (missing from CPU builds of torch)."""
    path = os.path.join(folder, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return folder


def compile_head_gain(out_dir: str, archs=(80, 90), root: str | None = None,
                      timeout: float = 1200.0) -> tuple[str, float]:
    """Compile csrc/cuda/head_gain.cu (under ``root``, the repository) to ``out_dir/head_gain.o``
    with SASS for every ``sm_<arch>``; returns (object path, seconds). Raises RuntimeError with
    nvcc's output on failure."""
    from torch.utils.cpp_extension import include_paths
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH or CUDA_HOME)")
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, CU_SOURCE)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src} not found: give root= the repository folder")
    inc = [stub_cuda_macros(os.path.join(out_dir, "stub_include")), *include_paths(),
           sysconfig.get_paths()["include"]]
    obj = os.path.join(out_dir, "head_gain.o")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [nvcc, "-c", src, "-o", obj, *[f"-I{i}" for i in inc], *NVCC_FLAGS, *gencode]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"nvcc failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stderr[-6000:]}")
    return obj, time.perf_counter() - t0


def short_name(mangled: str) -> str:
    """``head_gain_vec_kernel<c10::BFloat16, long, 8>`` from a mangled kernel name."""
    try:
        out = subprocess.run(["c++filt", mangled], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return mangled
    m = re.search(r"(head_gain_\w+<[^()]*>)", out)
    return m[1] if m else out or mangled


def kernel_resources(obj: str) -> list[dict]:
    """One row per (arch, kernel instantiation) of the object: registers, stack, shared."""
    from .pursuit.triton_aot import res_usage, res_usage_table
    rows = res_usage_table(res_usage(obj))
    return [r | {"kernel": short_name(r["function"])} for r in rows]
