"""hp_fast.ops.head_gain vs its plain-PyTorch twin head_gain_reference.

Both paths are tested: the compiled op ("compiled", skipped if hp_fast._C was not built)
and the PyTorch fallback ("fallback", the extension monkeypatched away).

Tolerance: none. The op converts each element to float32 (float64 for float64 input),
multiplies it by one float32 gain and rounds once to the input dtype; the reference does
(attn.float() * g).to(attn.dtype), the same single multiply and single rounding. So fp32 and
fp64 outputs are bit-identical, and fp16/bf16 outputs are too: both compute the same fp32
product and round it once.
"""
import itertools
import os
import subprocess
import sys
import textwrap
import warnings
import zlib

import pytest
import torch

from hp_fast import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (B, T, H, dh): B=1, odd T and H, dh in {1, 7, 40, 64}, one big enough for several threads
SHAPES = [(1, 1, 1, 1), (1, 7, 3, 7), (2, 5, 9, 64), (3, 17, 5, 1), (2, 9, 4, 40), (2, 300, 9, 64)]
LAYOUTS = ["bthd", "bhtd", "bhtd_view", "bthd_view", "strided_dh", "offset"]

# The fallback path warns once by design; test_fallback_warns_once checks that warning itself.
pytestmark = pytest.mark.filterwarnings("ignore:hp_fast.*PyTorch fallback:RuntimeWarning")

needs_ext = pytest.mark.skipif(not ops.extension_available(),
                               reason="hp_fast._C not built (pip install --no-build-isolation -e .)")


@pytest.fixture(params=["compiled", "fallback"])
def impl(request, monkeypatch):
    """Run the test through the compiled op, then through the torch fallback."""
    if request.param == "compiled":
        if not ops.extension_available():
            pytest.skip("hp_fast._C not built")
    else:
        monkeypatch.setattr(ops, "_HAS_OP", False)
        monkeypatch.setattr(ops, "_warned", set())
    return request.param


def make_attn(shape, layout, dtype, device, gen):
    """attn for logical (B, T, H, dh) in a given memory layout; returns (attn, heads_first)."""
    B, T, H, dh = shape

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    if layout == "bthd":        # contiguous (B, T, H, dh)
        return rnd(B, T, H, dh), False
    if layout == "bhtd":        # contiguous (B, H, T, dh), as SDPA returns
        return rnd(B, H, T, dh), True
    if layout == "bhtd_view":   # transposed view of a (B, T, H, dh) tensor
        return rnd(B, T, H, dh).transpose(1, 2), True
    if layout == "bthd_view":   # transposed view of a (B, H, T, dh) tensor
        return rnd(B, H, T, dh).transpose(1, 2), False
    if layout == "strided_dh":  # dh not contiguous (stride 2)
        return rnd(B, T, H, 2 * dh)[..., ::2], False
    if layout == "offset":      # storage offset 1 element: misaligned for 16-byte loads
        return rnd(B, H, T, dh + 1)[..., 1:], True
    raise ValueError(layout)


ALPHAS = torch.tensor([-1.0, 0.0, 2.0, 3.0, 5.0, 7.0, 1.5, 0.75, -3.0])


def gains_for(kind, B, H, gen):
    if kind == "shared":
        return torch.randn(H, generator=gen) * 4            # (H,)
    if kind == "alphas":  # the paper's gains: few mantissa bits, so products often tie when rounded
        return ALPHAS[torch.randint(len(ALPHAS), (B, H), generator=gen)]
    return torch.randn(B, H, generator=gen) * 4             # (B, H)


def mask_for(kind, B, T, gen):
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(B, T, generator=gen) > 0.5
    return torch.zeros(B, T, dtype=torch.bool) if kind == "all_false" else torch.ones(B, T, dtype=torch.bool)


def op_backend_missing(device):
    return ops.op_backend(device) == "torch-fallback"


# ---- values -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_bitwise(impl, layout, dtype, device):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{layout}{dtype}".encode()))
    for shape in SHAPES:
        if shape[1] == 300 and (dtype != torch.float32 or layout not in ("bthd", "bhtd_view")):
            continue  # the multi-thread shape: a few cases are enough
        B, T, H, dh = shape
        attn, hf = make_attn(shape, layout, dtype, device, gen)
        for gkind, mkind in itertools.product(["shared", "per_row", "alphas"],
                                        ["none", "random", "all_false", "all_true"]):
            g = gains_for(gkind, B, H, gen).to(device)
            mask = mask_for(mkind, B, T, gen)
            mask = None if mask is None else mask.to(device)
            out = ops.head_gain(attn, g, mask, hf)
            ref = ops.head_gain_reference(attn, g, mask, hf)
            assert out.shape == (B, T, H * dh) and out.dtype == dtype and out.is_contiguous()
            torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=lambda m: (
                f"{impl} {layout} {dtype} {shape} gains={gkind} mask={mkind}: {m}"))


def test_reference_is_the_formula():
    """The twin itself against a per-head loop of the formula in the docstring."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, dh = 2, 5, 3, 4
    attn = torch.randn(B, H, T, dh, generator=gen, dtype=torch.float64)
    g = torch.randn(B, H, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.5
    want = torch.empty(B, T, H * dh, dtype=torch.float64)
    for b, t, h in itertools.product(range(B), range(T), range(H)):
        want[b, t, h * dh:(h + 1) * dh] = attn[b, h, t] * (g[b, h] if mask[b, t] else 1.0)
    torch.testing.assert_close(ops.head_gain_reference(attn, g, mask, True), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gain_one_and_masked_rows_are_exact_copies(impl, dtype):
    gen = torch.Generator().manual_seed(1)
    B, T, H, dh = 2, 7, 5, 64
    x = torch.randn(B, T, H, dh, generator=gen).to(dtype)      # (B, T, H, dh)
    attn = x.transpose(1, 2)                                    # (B, H, T, dh) view
    want = x.reshape(B, T, H * dh)
    assert torch.equal(ops.head_gain(attn, torch.ones(H), None, True), want)
    all_false = torch.zeros(B, T, dtype=torch.bool)
    assert torch.equal(ops.head_gain(attn, torch.full((B, H), 5.0), all_false, True), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(impl, dtype):
    """inf, nan, signed zeros, subnormals, overflow to inf: same as the reference (NaN payloads
    may differ between vectorized and scalar conversions, so NaN only has to stay NaN)."""
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40,
                             6e4, -6e4, 3e38, 1.0, -2.5, 1e-8, 7.0, 0.1, 65504.0])
    attn = specials.to(dtype).reshape(1, 2, 1, 8).expand(2, 2, 4, 8)    # (B, T, H, dh), stride 0s
    gains = torch.tensor([0.0, -1.0, 5.0, float("inf")])
    out = ops.head_gain(attn, gains)
    ref = ops.head_gain_reference(attn, gains)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@needs_ext
def test_portable_cpu_loops_match_reference():
    """ATEN_CPU_CAPABILITY=default makes the CPU kernel use its portable loops instead of the
    AVX2 ones (chosen once per process, hence the subprocess)."""
    code = textwrap.dedent("""
        import torch
        from hp_fast import ops
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        gen = torch.Generator().manual_seed(3)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for dh in (1, 7, 64):
                attn = torch.randn(2, 5, 3, dh, generator=gen).to(dtype).transpose(1, 2)
                gains = torch.randn(2, 3, generator=gen) * 4
                mask = torch.rand(2, 5, generator=gen) > 0.5
                out = ops.head_gain(attn, gains, mask, True)
                ref = ops.head_gain_reference(attn, gains, mask, True)
                assert torch.equal(out, ref), (dtype, dh)
        print("ok")
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_scalar_gain_broadcasts(impl):
    attn = torch.randn(2, 3, 4, 8)
    torch.testing.assert_close(ops.head_gain(attn, -1.0), -attn.reshape(2, 3, 32), rtol=0, atol=0)


# ---- errors -------------------------------------------------------------------------------

BAD = [  # (attn, gains, mask, heads_first, word the message must contain)
    (torch.randn(2, 5, 3, 4), torch.ones(4), None, False, "gains"),              # H=3
    (torch.randn(2, 5, 3, 4), torch.ones(3, 3), None, False, "gains"),           # B=2
    (torch.randn(2, 5, 3, 4), torch.ones(3), torch.ones(2, 4, dtype=torch.bool), False, "mask"),
    (torch.randn(2, 5, 3, 4), torch.ones(3), torch.ones(2, 5), False, "mask"),   # not bool
    (torch.randn(2, 5, 12), torch.ones(3), None, False, "attn"),                 # 3-D
    (torch.ones(2, 5, 3, 4, dtype=torch.int32), torch.ones(3), None, False, "attn"),
]


@pytest.mark.parametrize("attn,gains,mask,hf,word", BAD)
def test_bad_inputs_raise_valueerror_naming_the_argument(impl, attn, gains, mask, hf, word):
    with pytest.raises(ValueError, match=word):
        ops.head_gain(attn, gains, mask, hf)


@needs_ext
@pytest.mark.parametrize("attn,gains,mask,hf,word", BAD + [
    (torch.randn(2, 5, 3, 4), torch.ones(3, dtype=torch.float64), None, False, "gains"),  # dtype
    (torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.ones(3), None, False, "gains"),
])
def test_raw_op_checks_raise_runtimeerror_naming_the_argument(attn, gains, mask, hf, word):
    with pytest.raises(RuntimeError, match=f"head_gain: {word}"):
        torch.ops.hp_fast.head_gain(attn, gains, mask, hf)


# ---- autograd, fake kernel ----------------------------------------------------------------

def _grad_case(layout, gkind, mkind, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(2)
    B, T, H, dh = 2, 3, 3, 5
    attn, hf = make_attn((B, T, H, dh), layout, dtype, device, gen)
    attn = attn.detach().requires_grad_()
    g = gains_for(gkind, B, H, gen).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    mask = mask_for(mkind, B, T, gen)
    return attn, g.requires_grad_(), None if mask is None else mask.to(device), hf


@pytest.mark.parametrize("layout,gkind,mkind", [
    ("bthd", "shared", "none"), ("bhtd_view", "per_row", "random"), ("strided_dh", "shared", "random"),
    ("bhtd", "per_row", "all_false"),
])
def test_gradcheck_float64(impl, layout, gkind, mkind):
    attn, g, mask, hf = _grad_case(layout, gkind, mkind, torch.float64)
    assert torch.autograd.gradcheck(lambda a, w: ops.head_gain(a, w, mask, hf), (attn, g))


@needs_ext
def test_gradgradcheck_float64():
    attn, g, mask, hf = _grad_case("bhtd_view", "per_row", "random", torch.float64)
    assert torch.autograd.gradgradcheck(lambda a, w: ops.head_gain(a, w, mask, hf), (attn, g))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_gradients_match_reference(dtype):
    attn, g, mask, hf = _grad_case("bhtd_view", "per_row", "random", dtype)
    grads = []
    for fn in (ops.head_gain, ops.head_gain_reference):
        out = fn(attn, g, mask, hf)
        grads.append(torch.autograd.grad(out, (attn, g), torch.ones_like(out)))
    (ga, gg), (ra, rg) = grads
    torch.testing.assert_close(ga, ra, rtol=0, atol=0)   # grad_out * g, one rounding
    torch.testing.assert_close(gg, rg)                   # sums: summation order may differ


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,gkind,mkind,dtype,grad", [
    ("bthd", "shared", "none", torch.float32, False),
    ("bhtd_view", "per_row", "random", torch.float32, True),
    ("strided_dh", "shared", "random", torch.float16, False),
    ("offset", "per_row", "none", torch.float64, True),
])
def test_opcheck(layout, gkind, mkind, dtype, grad, device):
    if op_backend_missing(device):
        pytest.skip(f"no compiled head_gain kernel for {device}")
    attn, g, mask, hf = _grad_case(layout, gkind, mkind, dtype, device)
    attn, g = attn.detach().requires_grad_(grad), g.detach().requires_grad_(grad)
    torch.library.opcheck(torch.ops.hp_fast.head_gain.default, (attn, g, mask, hf))


# ---- backends -----------------------------------------------------------------------------

def test_fallback_warns_once_and_reports_backend(monkeypatch):
    monkeypatch.setattr(ops, "_HAS_OP", False)
    monkeypatch.setattr(ops, "_warned", set())
    assert not ops.extension_available()
    assert ops.op_backend("cpu") == "torch-fallback" and ops.op_backend("cuda") == "torch-fallback"
    attn = torch.randn(1, 2, 3, 4)
    with pytest.warns(RuntimeWarning, match="not available"):
        ops.head_gain(attn, torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a second call must not warn again
        ops.head_gain(attn, torch.ones(3))


@needs_ext
def test_compiled_backend_names():
    assert ops.op_backend("cpu") == "cpp-cpu"
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("hp_fast::head_gain", "CUDA")
    assert ops.op_backend("cuda") == ("cuda-kernel" if has_cuda_kernel else "torch-fallback")
