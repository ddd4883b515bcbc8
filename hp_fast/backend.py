"""Which implementation of each fast path is active on this install."""
from __future__ import annotations

import os

import torch


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed or broken: the torch paths still work
        return None
    return triton.__version__


def backend_info() -> dict:
    """Report compiled extension, gain-op backends and pursuit backends."""
    from . import ops
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda_available": cuda,
        "extension_built": ops.extension_available(),
        "head_gain_cpu": ops.op_backend(torch.device("cpu")),
        "head_gain_cuda": ops.op_backend(torch.device("cuda")) if cuda else None,
        "triton": _triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "somp_backend_forced": os.environ.get("HP_FAST_SOMP_BACKEND"),
        "somp_auto_cpu": "torch",
        "somp_auto_cuda": "triton" if (cuda and _triton_version()) else "torch",
        "somp_small_cpu": _small_kernel(),
    }


def _small_kernel() -> str:
    """Which code runs l2/ormp over small (concept) dictionaries on the CPU."""
    from .pursuit import small_dictionary
    if small_dictionary.small_kernel_available(torch.zeros(1, 1), "ormp"):
        return "cpp (hp_fast._C somp_small)"
    return ("torch (compiled kernel not built)" if small_dictionary.COMPILED_SMALL
            else "torch (forced)")
