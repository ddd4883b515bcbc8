"""Builds the optional compiled operators in hp_fast._C.

Metadata lives in pyproject.toml; this file only declares the extension:
  * always the module and schemas (csrc/module.cpp) and the C++ CPU kernels
    (csrc/head_gain.cpp, csrc/somp_small.cpp; shared checks in csrc/checks.h), CppExtension;
  * plus the CUDA kernel (csrc/cuda/head_gain.cu, CUDAExtension) when CUDA is usable:
    torch.cuda.is_available(), or FORCE_CUDA=1 with CUDA_HOME set and a CUDA build of torch.
The extension is optional: if it fails to compile, installation still succeeds and
hp_fast.ops falls back to plain PyTorch (with a one-time warning).

    pip install --no-build-isolation -e ".[dev]"    # builds hp_fast/_C*.so in place
"""
import os
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_usable(torch, cpp_extension) -> bool:
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def _extensions_and_cmdclass():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install, fallback path
        warnings.warn("hp_fast: torch not importable at build time; skipping hp_fast._C")
        return [], {}

    # -fopenmp: ATen's OpenMP backend implements at::parallel_for inline in the
    # headers, so without it the kernel silently runs on one thread.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    sources = [os.path.join("csrc", name)
               for name in ("module.cpp", "head_gain.cpp", "somp_small.cpp")]
    depends = [os.path.join("csrc", "checks.h")]  # header shared by the CPU and CUDA kernels

    if _cuda_usable(torch, cpp_extension):
        sources.append(os.path.join("csrc", "cuda", "head_gain.cu"))
        ext = cpp_extension.CUDAExtension(
            name="hp_fast._C",
            sources=sources,
            depends=depends,
            # no --use_fast_math: results must match the CPU kernel bit for bit
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
            optional=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            name="hp_fast._C",
            sources=sources,
            depends=depends,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            optional=True,
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension that turns any build failure into a warning.

        setuptools' optional=True only catches distutils compiler errors; torch's checks
        (compiler ABI, CUDA) and its ninja build raise other exceptions, so catch them all.
        """

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure is non-fatal
                msg = (f"hp_fast: building hp_fast._C failed ({type(exc).__name__}: {exc}); "
                       "installing without compiled kernels: hp_fast.ops will use the "
                       "PyTorch fallback")
                print(msg, file=sys.stderr)
                warnings.warn(msg)

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
