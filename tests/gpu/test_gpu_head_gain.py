"""GPU: the CUDA head_gain kernel (csrc/cuda/head_gain.cu) against its reference, bit for bit, at
odd shapes, in every memory layout (the vectorized and the scalar kernel, 32- and 64-bit
indexing), and torch.library.opcheck on CUDA. The extension must have been built with its CUDA
kernel (scripts/gpu_check.sh: FORCE_CUDA=1 python setup.py build_ext --inplace)."""
from __future__ import annotations

import pytest
import torch

from helpers.gpu import gpu_marks
from helpers.planted import stable_seed
from hp_fast import ops

pytestmark = gpu_marks()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (B, T, H, dh): one of everything, odd T/H, dh 1/7/40/64/128 (dh*2 bytes % 16 decides vec)
SHAPES = [(1, 1, 1, 1), (1, 7, 3, 7), (2, 5, 9, 64), (3, 17, 5, 1), (2, 9, 4, 40),
          (2, 300, 9, 64), (1, 33, 32, 128)]
LAYOUTS = ["bthd", "bhtd", "bhtd_view", "strided_dh", "offset"]


@pytest.fixture(autouse=True)
def cuda_kernel_built():
    if ops.op_backend("cuda") != "cuda-kernel":
        pytest.fail("hp_fast._C has no CUDA head_gain kernel: build it with FORCE_CUDA=1 "
                    "TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace "
                    f"(op_backend('cuda') = {ops.op_backend('cuda')!r})")


def make(shape, layout, dtype, gen):
    """attn on CUDA for logical (B, T, H, dh) in a memory layout; (attn, heads_first)."""
    B, T, H, dh = shape

    def rnd(*s):
        return torch.randn(*s, generator=gen).to("cuda", dtype)

    return {"bthd": lambda: (rnd(B, T, H, dh), False),
            "bhtd": lambda: (rnd(B, H, T, dh), True),
            "bhtd_view": lambda: (rnd(B, T, H, dh).transpose(1, 2), True),
            "strided_dh": lambda: (rnd(B, T, H, 2 * dh)[..., ::2], False),
            "offset": lambda: (rnd(B, H, T, dh + 1)[..., 1:], True)}[layout]()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_kernel_matches_reference_bitwise(layout, dtype):
    gen = torch.Generator().manual_seed(stable_seed(layout, str(dtype)))
    for shape in SHAPES:
        B, T, H, _ = shape
        attn, hf = make(shape, layout, dtype, gen)
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        for gains in (torch.randn(H, generator=gen) * 4, torch.randn(B, H, generator=gen) * 4):
            g = gains.to("cuda", opmath)
            for mask in (None, (torch.rand(B, T, generator=gen) > 0.5).cuda()):
                got = ops.head_gain(attn, g, mask, heads_first=hf)
                want = ops.head_gain_reference(attn, g, mask, heads_first=hf)
                assert got.is_cuda and got.is_contiguous() and got.shape == (B, T, H * shape[3])
                assert torch.equal(got, want), (shape, layout, dtype, mask is None)


def test_cuda_kernel_64bit_indexing():
    """More than 2**30 output elements take the int64 kernels (bf16: 2 GiB in, 2 GiB out)."""
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GiB of GPU memory")
    attn = torch.randn(1, 8, 1 << 16, 2048 + 8, device="cuda", dtype=torch.bfloat16)[..., 8:]
    g = torch.linspace(-2, 2, 8, device="cuda")
    got = ops.head_gain(attn, g, None, heads_first=True)  # (1, 65536, 8*2048)
    want = ops.head_gain_reference(attn[:, :, -5:], g, None, heads_first=True)
    assert torch.equal(got[:, -5:], want)
    del attn, got


@pytest.mark.parametrize("layout,grad,dtype", [("bthd", False, torch.float32),
                                               ("bhtd_view", True, torch.float32),
                                               ("strided_dh", False, torch.bfloat16),
                                               ("offset", True, torch.float64)])
def test_opcheck_on_cuda(layout, grad, dtype):
    gen = torch.Generator().manual_seed(7)
    attn, hf = make((2, 5, 3, 8), layout, dtype, gen)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    g = (torch.randn(2, 3, generator=gen)).to("cuda", opmath)
    mask = (torch.rand(2, 5, generator=gen) > 0.5).cuda()
    attn, g = attn.detach().requires_grad_(grad), g.detach().requires_grad_(grad)
    torch.library.opcheck(torch.ops.hp_fast.head_gain.default, (attn, g, mask, hf))
