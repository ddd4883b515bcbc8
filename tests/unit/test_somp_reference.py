"""Invariants of the float64 reference SOMP (hp_fast.pursuit.reference), the ground truth of every fast path."""
import pytest
import torch

from hp_fast.pursuit.reference import somp_reference


def _planted(B, n, d, v, ks, seed):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(v, d, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(v, generator=g)[:ks] for _ in range(B)])
    w = 8.0 * 2.0 ** -torch.arange(ks, dtype=torch.float64)
    C = (torch.rand(B, n, ks, generator=g, dtype=torch.float64) + 0.5) * w
    H = torch.einsum("bnk,bkd->bnd", C, D[idx]) + 0.01 * torch.randn(B, n, d, generator=g,
                                                                      dtype=torch.float64)
    return H, D, idx


@pytest.mark.parametrize("criterion", ["l1", "l2", "ormp"])
def test_evr_monotone_bounded_distinct_support_orthogonal_residual(criterion):
    H, D, _ = _planted(2, 9, 16, 30, 4, 0)
    r = somp_reference(H, D, 8, criterion=criterion, return_coefficients=True)
    assert (r.evr[:, 1:] >= r.evr[:, :-1] - 1e-12).all()
    assert (r.evr <= 1 + 1e-12).all() and (r.evr >= -1e-12).all()
    for b in range(2):
        s = r.support[b]
        assert len(set(s.tolist())) == s.numel()
        R = H[b] - r.coefficients[b] @ D[s]  # residual is orthogonal to every chosen atom
        assert (R @ D[s].T).abs().max() < 1e-8 * H[b].abs().max() * D.abs().max()


def test_planted_atoms_found_in_weight_order():
    H, D, idx = _planted(3, 11, 24, 40, 4, 1)
    r = somp_reference(H, D, 4, criterion="l1")
    assert torch.equal(r.support, idx)


def test_batched_equals_looped():
    H, D, _ = _planted(4, 6, 12, 20, 3, 2)
    H = H.reshape(2, 2, 6, 12)
    r = somp_reference(H, D, 5, criterion="l2", center=True)
    assert r.support.shape == (2, 2, 5)
    for i in range(2):
        for j in range(2):
            one = somp_reference(H[i, j], D, 5, criterion="l2", center=True)
            assert torch.equal(one.support, r.support[i, j])
            assert torch.allclose(one.evr, r.evr[i, j])


def test_clear_errors():
    H, D, _ = _planted(1, 3, 8, 5, 2, 3)
    with pytest.raises(ValueError, match="k=6"):
        somp_reference(H, D, 6)
    Hn = H.clone()
    Hn[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        somp_reference(Hn, D, 2)
    with pytest.raises(ValueError, match="d="):
        somp_reference(H[..., :7], D, 2)


def test_one_step_one_sample_is_logit_lens():
    g = torch.Generator().manual_seed(4)
    D = torch.randn(50, 16, generator=g, dtype=torch.float64)
    D = D / D.norm(dim=1, keepdim=True)
    h = torch.randn(1, 16, generator=g, dtype=torch.float64)
    for criterion in ("l1", "l2", "ormp"):
        r = somp_reference(h, D, 1, criterion=criterion)
        assert int(r.support[0]) == int((D @ h[0]).abs().argmax())
    # with a positive top logit the pursuit's pick is the logit lens' top token
    h = D[7:8] * 3 + 0.1 * torch.randn(1, 16, generator=g, dtype=torch.float64)
    assert int(somp_reference(h, D, 1).support[0]) == int((D @ h[0]).argmax()) == 7


@pytest.mark.parametrize("criterion", ["l1", "l2", "ormp"])
@pytest.mark.parametrize("shape", [(2, 9, 16, 30, 4), (1, 1, 8, 12, 1), (3, 4, 20, 7, 3)])
def test_float32_run_is_the_same_loop(criterion, shape):
    """dtype=torch.float32 (the benchmarks' naive baseline) runs the same textbook loop: on planted
    inputs (a unique greedy path) it picks the float64 supports, with EVRs within 1e-5 (fp32 sums of
    squares are good to about 1e-6 relative) and coefficients within 1e-4 of the largest."""
    B, n, d, v, ks = shape
    H, D, _ = _planted(B, n, d, v, ks, 5)
    k = ks
    ref = somp_reference(H, D, k, criterion=criterion, return_coefficients=True)
    got = somp_reference(H.float(), D.float(), k, criterion=criterion, return_coefficients=True,
                         dtype=torch.float32)
    assert got.evr.dtype == got.coefficients.dtype == torch.float32
    assert torch.equal(ref.support, got.support)
    assert float((got.evr.double() - ref.evr).abs().max()) < 1e-5
    scale = float(ref.coefficients.abs().max())
    assert float((got.coefficients.double() - ref.coefficients).abs().max()) < 1e-4 * scale


def test_dtype_must_be_float32_or_float64():
    H, D, _ = _planted(1, 3, 8, 5, 2, 3)
    with pytest.raises(ValueError, match="dtype"):
        somp_reference(H, D, 2, dtype=torch.float16)
