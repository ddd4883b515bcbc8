"""Marks of the GPU tests (tests/gpu, ``pytest -m gpu``; scripts/gpu_check.sh runs them)."""
from __future__ import annotations

import os

import pytest
import torch

NO_CUDA = ("no CUDA device (torch.cuda.is_available() is False): GPU tests run on a GPU machine, "
           "`bash scripts/gpu_check.sh`")


def gpu_marks() -> list:
    """``pytestmark`` of a GPU test module: the ``gpu`` marker, skipped without CUDA."""
    return [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def skip_unless_triton_compiles() -> None:
    """Skip unless Triton imports and compiles for the GPU (the interpreter is off): tests/conftest
    turns TRITON_INTERPRET on by default, gpu_check.sh runs these with TRITON_INTERPRET=0."""
    try:
        import triton
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton not importable ({type(e).__name__}: {e})")
    interpreting = getattr(getattr(triton, "knobs", None), "runtime", None)
    on = bool(interpreting.interpret) if interpreting is not None else \
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if on:
        pytest.skip("TRITON_INTERPRET is on: run with TRITON_INTERPRET=0 so the Triton kernels "
                    "compile for the GPU (scripts/gpu_check.sh does)")
