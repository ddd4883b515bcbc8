"""The CUDA head_gain kernel (csrc/cuda/head_gain.cu, with csrc/checks.h) compiles with nvcc for
sm_80 and sm_90 on a machine without a GPU, and its kernels fit their registers without spilling
(cuobjdump -res-usage on the object). The CPU build of torch lacks a generated CUDA header; the
build writes a stand-in into tmp_path (hp_fast.nvcc_aot.stub_cuda_macros). One nvcc run takes
about 80 s of CPU here (ATen headers), hence slow."""
from __future__ import annotations

from pathlib import Path

import pytest

from hp_fast import nvcc_aot
from hp_fast.pursuit import triton_aot

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(nvcc_aot.nvcc_path() is None, reason="nvcc not installed (CUDA toolkit)")
@pytest.mark.skipif(triton_aot.nvidia_tool("cuobjdump") is None,
                    reason="cuobjdump not found (bundled with triton, or the CUDA toolkit)")
def test_head_gain_cu_compiles_for_sm80_and_sm90(tmp_path):
    obj, seconds = nvcc_aot.compile_head_gain(str(tmp_path), archs=(80, 90), root=str(ROOT))
    rows = nvcc_aot.kernel_resources(obj)
    print(f"\n[nvcc] {obj} in {seconds:.0f} s")
    for r in rows:
        print(f"  {r['arch']} {r['kernel']}: REG {r['registers']} STACK {r['stack_bytes']} "
              f"SHARED {r['static_shared_bytes']}")
    # 2 kernels (vectorized, scalar) x 4 dtypes x 2 index types, for each arch
    for arch in ("sm_80", "sm_90"):
        mine = [r for r in rows if r["arch"] == arch]
        assert len(mine) == 16, [r["kernel"] for r in mine]
        assert {r["kernel"].split("<")[0] for r in mine} == {"head_gain_vec_kernel",
                                                             "head_gain_scalar_kernel"}
    assert all(0 < r["registers"] <= 64 and r["stack_bytes"] == 0 for r in rows), rows


def test_stub_header_is_written(tmp_path):
    folder = nvcc_aot.stub_cuda_macros(str(tmp_path))
    text = (Path(folder) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").read_text()
    assert "#pragma once" in text and "C10_CUDA_BUILD_SHARED_LIBS" in text


def test_missing_source_is_named(tmp_path):
    if nvcc_aot.nvcc_path() is None:
        pytest.skip("nvcc not installed")
    with pytest.raises(FileNotFoundError, match="head_gain.cu not found"):
        nvcc_aot.compile_head_gain(str(tmp_path), root=str(tmp_path))
