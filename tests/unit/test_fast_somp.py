"""The fast torch path (hp_fast.pursuit.torch_backend) against the float64 reference.

Inputs have a unique greedy path (sparse combinations of planted atoms with weights 8, 4, 2, 1, ...
and small noise), so a different support is a bug, not a tie. EVR tolerance: 2e-5 absolute; the
fast path computes in fp32 and the EVR is a ratio of sums of squares, good to about 1e-6.
"""
import pytest
import torch

from hp_fast.pursuit import resolve_backend, somp, somp_heads
from hp_fast.pursuit.reference import somp_reference
from helpers.planted import (CASES, CRITERIA, EVR_ATOL, check_same, planted, planted_heads,
                             stable_seed)

@pytest.fixture(params=["atom_space", "atom_space_torch", "dictionary_space", "bounded"])
def path(request, monkeypatch):
    """Every CPU algorithm: atom space for small dictionaries (the compiled kernel for l2/ormp
    when the extension is built, and its PyTorch twin), and for large ones the dense
    D-product loop (the default) and the opt-in bounded one (bounded.py)."""
    import hp_fast.pursuit.small_dictionary as sd
    import hp_fast.pursuit.torch_backend as tb
    if request.param in ("dictionary_space", "bounded"):
        monkeypatch.setattr(sd, "SMALL_V", 0)
        monkeypatch.setattr(tb, "LARGE_METHOD", "dense" if request.param == "dictionary_space"
                            else "bounded")
    if request.param == "atom_space_torch":
        monkeypatch.setattr(sd, "COMPILED_SMALL", False)
    return request.param


def test_compiled_atom_space_kernel_is_used_and_matches_its_twin(monkeypatch):
    """csrc/somp_small.cpp vs pursue_small on fresh random heads (unique greedy path) of
    several shapes, float32 and float64: same supports, EVR within 1e-6 (float32: both
    accumulate the same sums in a different order) or 1e-12 (float64)."""
    import hp_fast.pursuit.small_dictionary as sd
    import hp_fast.pursuit.torch_backend as fs
    if not sd.small_kernel_available(torch.zeros(1, 1), "ormp"):
        pytest.skip("hp_fast._C not built: the PyTorch twin is the only atom-space path")
    for (B, n, dh, d, v, ks) in [(3, 9, 5, 17, 23, 4), (2, 1, 8, 16, 40, 3), (4, 40, 16, 48, 301, 6),
                                 (1, 3, 2, 7, 1, 1)]:
        for dt, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
            z, w_o, D = planted_heads(B, n, dh, d, v, ks, stable_seed(B, n, v, str(dt)))
            for crit in ("l2", "ormp"):
                for norm in (True, False):
                    k = min(ks, v)
                    st = {}
                    got = fs.somp_heads_torch(z, w_o, D, k, criterion=crit, normalize=norm,
                                              dtype=dt, stats=st)
                    assert st["path"] == "small-compiled"
                    monkeypatch.setattr(sd, "COMPILED_SMALL", False)
                    want = fs.somp_heads_torch(z, w_o, D, k, criterion=crit, normalize=norm,
                                               dtype=dt, stats=st)
                    monkeypatch.setattr(sd, "COMPILED_SMALL", True)
                    assert st["path"] == "small-torch"
                    assert torch.equal(got.support, want.support)
                    assert float((got.evr - want.evr).abs().max()) <= tol


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("center", [False, True])
def test_torch_matches_reference(case, criterion, normalize, center, path):
    B, n, d, v, ks, k, extra = CASES[case]
    H, D = planted(B, n, d, v, ks, seed=stable_seed(case, criterion), **extra)
    ref = somp_reference(H, D, k, criterion=criterion, normalize=normalize, center=center,
                         return_coefficients=True)
    got = somp(H, D, k, criterion=criterion, normalize=normalize, center=center,
               return_coefficients=True, backend="torch")
    assert got.backend == "torch"
    check_same(ref, got, coef=True)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_torch_float64_flag(criterion, path):
    from hp_fast.pursuit.torch_backend import somp_torch
    H, D = planted(2, 8, 18, 31, 4, seed=5)
    ref = somp_reference(H, D, 4, criterion=criterion)
    got = somp_torch(H, D, 4, criterion=criterion, dtype=torch.float64)
    assert got.evr.dtype == torch.float64
    assert torch.equal(ref.support, got.support)
    torch.testing.assert_close(got.evr, ref.evr, atol=1e-10, rtol=0)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("center", [False, True])
def test_heads_match_reference(criterion, center, path):
    z, w_o, D = planted_heads(3, 9, 6, 21, 40, 4, seed=7)
    ref = somp_heads(z, w_o, D, 4, criterion=criterion, center=center, backend="reference")
    got = somp_heads(z, w_o, D, 4, criterion=criterion, center=center, backend="torch")
    check_same(ref, got)
    # more steps than planted atoms, several head batches (tiny memory budget), n < dh
    from hp_fast.pursuit.torch_backend import somp_heads_torch
    z2 = z[:, :4]
    ref = somp_heads(z2, w_o, D, 6, criterion=criterion, center=center, backend="reference")
    st = {}
    got = somp_heads_torch(z2, w_o, D, 6, criterion=criterion, center=center, memory=1, stats=st)
    assert st["head_batch"] == 1
    assert torch.equal(ref.support[:, :4], got.support[:, :4])
    torch.testing.assert_close(got.evr.double(), ref.evr, atol=EVR_ATOL, rtol=0)


def test_heads_bf16_inputs_and_progress():
    z, w_o, D = planted_heads(2, 8, 8, 16, 30, 3, seed=8)
    z, w_o, D = z.bfloat16(), w_o.bfloat16(), D.bfloat16()
    ref = somp_heads(z, w_o, D, 3, backend="reference")
    got = somp_heads(z, w_o, D, 3, backend="torch", progress=True)
    check_same(ref, got)


def test_exhausted_dictionary_pads_with_minus_one(path):
    # 3 atoms spanning a 2-d space: after two picks nothing is left
    D = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    H = torch.tensor([[[3.0, 1.0, 0.0], [2.0, 0.5, 0.0]]])
    for criterion in CRITERIA:
        ref = somp_reference(H, D, 3, criterion=criterion)
        got = somp(H, D, 3, criterion=criterion, backend="torch")
        check_same(ref, got)
        assert int(got.support[0, 2]) == -1


def test_dispatch_and_errors(monkeypatch):
    H, D = planted(1, 3, 8, 6, 2, seed=9)
    assert somp(H, D, 2).backend == "torch"  # auto on CPU
    assert somp(H, D, 2, backend="reference").backend == "reference"
    monkeypatch.setenv("HP_FAST_SOMP_BACKEND", "reference")
    assert somp(H, D, 2, backend="torch").backend == "reference"
    monkeypatch.setenv("HP_FAST_SOMP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="HP_FAST_SOMP_BACKEND"):
        somp(H, D, 2)
    monkeypatch.delenv("HP_FAST_SOMP_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        somp(H, D, 2, backend="cuda")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="k=7"):
        somp(H, D, 7, backend="torch")
    z, w_o, D2 = planted_heads(2, 4, 3, 8, 5, 2, seed=10)
    with pytest.raises(ValueError, match="k=6"):
        somp_heads(z, w_o, D2, 6)
    with pytest.raises(ValueError, match="w_o"):
        somp_heads(z, w_o[:1], D2, 2)
    z[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        somp_heads(z, w_o, D2, 2)


def test_backend_info_reports_the_small_kernel(monkeypatch):
    import hp_fast
    import hp_fast.pursuit.small_dictionary as sd
    built = sd.small_kernel_available(torch.zeros(1, 1), "l2")
    assert built == hp_fast.ops.somp_small_available()
    info = hp_fast.backend_info()["somp_small_cpu"]
    assert info.startswith("cpp") == built
    assert not sd.small_kernel_available(torch.zeros(1, 1), "l1")  # L1 stays in PyTorch
    monkeypatch.setattr(sd, "COMPILED_SMALL", False)
    assert hp_fast.backend_info()["somp_small_cpu"] == "torch (forced)"


@pytest.mark.parametrize("group", [1, 3, 64])
def test_l1_candidate_groups_match_reference(group, monkeypatch, path):
    """The pruned L1 step scores heads in groups sorted by candidate count (L1_GROUP): several
    groups of unequal sizes (11 heads in groups of 1 and 3) and one group give the reference's
    supports."""
    import hp_fast.pursuit.l1_pruning as l1
    import hp_fast.pursuit.torch_backend as fs
    monkeypatch.setattr(l1, "L1_GROUP", group)
    z, w_o, D = planted_heads(11, 13, 6, 24, 57, 4, stable_seed("groups", group))
    ref = somp_reference(torch.bmm(z, w_o).double(), D.double(), 4, criterion="l1")
    st = {}
    got = fs.somp_heads_torch(z, w_o, D, 4, criterion="l1", stats=st)
    check_same(ref, got)
