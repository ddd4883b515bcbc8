"""GPU: the pursuit's Triton kernels compiled for the card, and the torch backend on CUDA, against
the float64 reference (CPU) at odd shapes, every rule, wide rows (the 16-row / 32-column tiles
of triton_kernels), bf16/fp16 dictionaries and every dot precision the installed Triton offers.
Inputs are the planted unique-path problems of tests/helpers/planted.py, so any different
support is a bug, and the EVR tolerance is theirs (2e-5)."""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers.gpu import gpu_marks, skip_unless_triton_compiles
from helpers.planted import CASES, CRITERIA, check_same, planted, planted_heads, stable_seed
from hp_fast.pursuit import somp, somp_heads
from hp_fast.pursuit.reference import somp_reference

pytestmark = gpu_marks()
FLAGS = list(itertools.product([True, False], [False, True]))
GRID = [(case, crit, *FLAGS[i % 4])
        for i, (case, crit) in enumerate(itertools.product(sorted(CASES), CRITERIA))]
# (B, n, dh, d, v): one sample, 17 heads (two head blocks), dh 64/128/200 (BR 64/128/256),
# n >= dh so l2/ormp rows are wide too, vocabularies that end mid-tile
HEAD_SHAPES = [(17, 5, 6, 19, 40), (3, 1, 64, 96, 1001), (2, 9, 128, 130, 2051),
               (2, 160, 128, 200, 777), (1, 7, 200, 210, 333)]


@pytest.fixture(autouse=True)
def compiled_triton(request):
    if "triton" in request.node.name:
        skip_unless_triton_compiles()


def cuda(*xs):
    return [x.cuda() for x in xs]


@pytest.mark.parametrize("case,criterion,normalize,center", GRID)
def test_triton_signals_match_reference(case, criterion, normalize, center):
    B, n, d, v, ks, k, extra = CASES[case]
    H, D = planted(B, n, d, v, ks, seed=stable_seed(case, criterion), **extra)
    ref = somp_reference(H, D, k, criterion=criterion, normalize=normalize, center=center,
                         return_coefficients=True)
    got = somp(*cuda(H, D), k, criterion=criterion, normalize=normalize, center=center,
               return_coefficients=True, backend="triton")
    assert got.backend == "triton" and got.support.is_cuda
    check_same(ref, got, coef=True)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_heads_match_reference(shape, criterion):
    B, n, dh, d, v = shape
    z, w_o, D = planted_heads(B, n, dh, d, v, 4, seed=sum(shape))
    for normalize in (True, False):
        ref = somp_heads(z, w_o, D, 4, criterion=criterion, normalize=normalize,
                         backend="reference")
        got = somp_heads(*cuda(z, w_o, D), 4, criterion=criterion, normalize=normalize,
                         backend="triton")
        check_same(ref, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_triton_low_precision_dictionary(dtype, criterion):
    """The update kernel reads the dictionary in its own dtype; the reference gets the same
    rounded values."""
    z, w_o, D = planted_heads(3, 6, 128, 64, 301, 3, seed=12)
    Dq, zq = D.to(dtype), z.to(dtype)
    ref = somp_heads(zq, w_o, Dq, 3, criterion=criterion, backend="reference")
    got = somp_heads(*cuda(zq, w_o, Dq), 3, criterion=criterion, backend="triton")
    check_same(ref, got)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("seed", [62, 80, 109, 140])
def test_triton_duplicates_resolve_to_lowest_index(seed, criterion):
    B, n, d, v, ks, k, extra = CASES["dup"]
    H, D = planted(B, n, d, v, ks, seed=seed, **extra)
    ref = somp_reference(H, D, k, criterion=criterion)
    got = somp(*cuda(H, D), k, criterion=criterion, backend="triton")
    assert torch.equal(ref.support, got.support.cpu())


def _precisions():
    try:
        from hp_fast.pursuit.triton_kernels import supported_precisions
        return list(supported_precisions())
    except Exception:  # noqa: BLE001 - no triton: the module is skipped anyway
        return ["ieee"]


@pytest.mark.parametrize("precision", _precisions())
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_triton_precision_keeps_planted_selections(precision, criterion):
    """Every dot precision the launcher offers on this Triton keeps the planted (well separated)
    selections exact. Whether a split precision also holds on near-ties at model shapes is what
    benchmarks/bench_precision.py measures (gpu_check.sh writes its numbers)."""
    from hp_fast.pursuit.triton_backend import somp_heads_triton
    for shape in HEAD_SHAPES[1:4]:
        B, n, dh, d, v = shape
        z, w_o, D = planted_heads(B, n, dh, d, v, 4, seed=sum(shape) + 1)
        ref = somp_heads(z, w_o, D, 4, criterion=criterion, backend="reference")
        got = somp_heads_triton(*cuda(z, w_o, D), 4, criterion=criterion, precision=precision)
        check_same(ref, got)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_torch_backend_on_cuda_matches_reference(criterion):
    """The torch backend (L1 candidate pruning included) on CUDA tensors."""
    for shape in HEAD_SHAPES[:4]:
        B, n, dh, d, v = shape
        z, w_o, D = planted_heads(B, n, dh, d, v, 4, seed=sum(shape) + 2)
        ref = somp_heads(z, w_o, D, 4, criterion=criterion, backend="reference")
        got = somp_heads(*cuda(z, w_o, D), 4, criterion=criterion, backend="torch")
        assert got.backend == "torch" and got.support.is_cuda
        check_same(ref, got)


def test_auto_backend_on_cuda_is_triton():
    skip_unless_triton_compiles()
    z, w_o, D = planted_heads(2, 5, 16, 24, 50, 3, seed=3)
    got = somp_heads(*cuda(z, w_o, D), 3)
    assert got.backend == "triton"
    check_same(somp_heads(z, w_o, D, 3, backend="reference"), got)
