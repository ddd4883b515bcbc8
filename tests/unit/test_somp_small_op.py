"""The compiled operator hp_fast::somp_small (csrc/somp_small.cpp) through hp_fast.ops.

Its numerics are compared with the PyTorch twin in tests/unit/test_fast_somp.py
(test_compiled_atom_space_kernel_is_used_and_matches_its_twin); here: the operator's
registration (torch.library.opcheck: schema, fake kernel, dispatch), that the fake kernel in
hp_fast/ops.py gives the real op's output shapes and dtypes, that ops.somp_small is the op, and
that bad arguments raise errors that name them. Skipped when hp_fast._C is not built.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hp_fast import ops
from hp_fast.pursuit.numerics import REFRESH_DROP, TIE_RTOL, gram_factor
from hp_fast.pursuit.result import SPAN_TOL

pytestmark = pytest.mark.skipif(not ops.somp_small_available(),
                                reason="hp_fast._C not built (pip install --no-build-isolation -e .)")

# (B, n, r, d, v, k): odd sizes, one sample (n < r), one atom, n > r (Cholesky factor), k = v
SHAPES = [(2, 5, 3, 7, 11, 3), (1, 1, 4, 6, 1, 1), (3, 9, 4, 12, 20, 5), (2, 2, 5, 5, 4, 4)]


def small_args(B, n, r, d, v, k, dtype, ormp, normalize, seed):
    """The somp_small arguments for random heads Z (B, n, r), M (B, r, d), D (v, d), as
    hp_fast.pursuit.small_dictionary.pursue_small_compiled builds them (E a strided view)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(B, n, r, generator=g, dtype=torch.float64).to(dtype)
    M = torch.randn(B, r, d, generator=g, dtype=torch.float64).to(dtype)
    D = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype)
    G = Z.transpose(1, 2) @ Z  # (B, r, r)
    L = gram_factor(Z, G).contiguous()  # (B, r, rr)
    E = (D @ M.reshape(B * r, d).T).view(v, B, r).transpose(0, 1)  # (B, v, r), unit last stride
    total = (G * (M @ M.transpose(1, 2))).sum(dim=(1, 2))  # (B,)
    return (E, D @ D.T, G.contiguous(), L, D.square().sum(dim=1), total, k, ormp, normalize,
            TIE_RTOL[dtype], SPAN_TOL, REFRESH_DROP[dtype])


CASES = [(shape, dt, ormp, norm) for shape in SHAPES for dt in (torch.float32, torch.float64)
         for ormp, norm in ((False, True), (True, False))] + [(SHAPES[0], torch.float32, False, False)]


@pytest.mark.parametrize("shape,dtype,ormp,normalize", CASES)
def test_opcheck(shape, dtype, ormp, normalize):
    args = small_args(*shape, dtype, ormp, normalize, seed=sum(shape))
    torch.library.opcheck(torch.ops.hp_fast.somp_small.default, args)


@pytest.mark.parametrize("shape,dtype", [(s, dt) for s in SHAPES
                                         for dt in (torch.float32, torch.float64)])
def test_fake_kernel_shapes_and_dtypes_equal_the_real_ops(shape, dtype):
    B, n, r, d, v, k = shape
    args = small_args(*shape, dtype, True, False, seed=3)
    real = ops.somp_small(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = ops.somp_small(*fake_args)
    want = [((B, k), torch.long), ((B, k), dtype), ((B, k, r), dtype), ((B, k, k), dtype)]
    assert [(tuple(x.shape), x.dtype) for x in real] == want
    assert [(tuple(x.shape), x.dtype) for x in fake] == want
    assert all(x.is_contiguous() for x in real) and all(x.is_contiguous() for x in fake)


def test_wrapper_is_the_op():
    args = small_args(3, 9, 4, 12, 20, 5, torch.float32, False, True, seed=4)
    got = ops.somp_small(*args)
    want = torch.ops.hp_fast.somp_small.default(*args)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    sup = got[0]
    assert ((sup >= 0) & (sup < 20)).all()  # 20 random atoms in 12 dims: 5 picks always exist
    assert all(len(set(row.tolist())) == 5 for row in sup)  # no atom chosen twice


@pytest.mark.parametrize("bad,word", [(2, "G"), (3, "L"), (1, "Gd"), (4, "atom_sq")])
def test_bad_arguments_raise_runtimeerror_naming_them(bad, word):
    args = list(small_args(2, 5, 3, 7, 11, 3, torch.float32, False, True, seed=5))
    x = args[bad]
    args[bad] = x[:, :-1] if x.dim() == 3 else x[:-1]  # one row short
    with pytest.raises(RuntimeError, match=f"somp_small: {word}"):
        ops.somp_small(*args)
    args = list(small_args(2, 5, 3, 7, 11, 3, torch.float32, False, True, seed=5))
    args[6] = 0
    with pytest.raises(RuntimeError, match="k must be"):
        ops.somp_small(*args)
