"""The bounded large-dictionary path (hp_fast.pursuit.bounded / bounds) against the float64
reference and its own invariants.

Supports must equal the reference's exactly (inputs with a unique greedy path, or exact ties that
the lowest-index rule decides) and EVRs agree within 2e-5 (helpers.planted). The bound itself is
checked directly: at every step of random supports, every atom's fp32 bound is at least its
float64 score; and the fp32 drift of the stored coordinates stays well inside the margin.
"""
import math

import pytest
import torch

import hp_fast.pursuit.bounded as bd
import hp_fast.pursuit.small_dictionary as sd
import hp_fast.pursuit.torch_backend as tb
from hp_fast.pursuit.bounds import drift_eps
from hp_fast.pursuit.numerics import orthonormalize
from hp_fast.pursuit.reference import somp_reference
from helpers.planted import CRITERIA, EVR_ATOL, check_same, planted_heads, stable_seed


@pytest.fixture
def large(monkeypatch):
    """Every dictionary counts as large, so the bounded loop runs."""
    monkeypatch.setattr(sd, "SMALL_V", 0)
    monkeypatch.setattr(tb, "LARGE_METHOD", "bounded")


def reference_heads(z, w_o, D, k, criterion, normalize=True):
    return somp_reference(torch.bmm(z.double(), w_o.double()), D.double(), k, criterion=criterion,
                          normalize=normalize)


def steep_heads(B, n, dh, d, v, seed, decay=0.35):
    """z whose columns fall off geometrically (a steep spectrum, like real heads), random w_o."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(v, d, generator=g)
    scale = decay ** torch.arange(dh, dtype=torch.float32)
    z = torch.randn(B, n, dh, generator=g) * scale
    w_o = torch.randn(B, dh, d, generator=g) / math.sqrt(d)
    return z, w_o, D


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("normalize", [True, False])
def test_steep_spectrum_matches_reference_and_prunes(criterion, normalize, large):
    """Steep spectra (the real-activation case): same supports, most atoms never scored."""
    z, w_o, D = steep_heads(5, 40, 16, 48, 1500, stable_seed("steep", criterion, normalize))
    D[7] = 0.0  # a zero atom is never chosen
    ref = reference_heads(z, w_o, D, 6, criterion, normalize)
    st = {}
    got = tb.somp_heads_torch(z, w_o, D, 6, criterion=criterion, normalize=normalize, stats=st)
    check_same(ref, got)
    assert st["path"] == "bounded" and st["fallback_heads"] == 0
    assert st["exact_fraction"] < 0.1, st["exact_fraction"]
    assert len(st["exact_fraction_per_step"]) == 6


@pytest.mark.parametrize("criterion", CRITERIA)
def test_flat_spectrum_random_z_is_exact(criterion, large):
    """Random normal z and w_o (flat spectra, the worst case: the bound admits most atoms): still
    the reference's selections, through more exact scores or the dense rerun."""
    g = torch.Generator().manual_seed(stable_seed("flat", criterion))
    z = torch.randn(4, 60, 32, generator=g)
    w_o = torch.randn(4, 32, 64, generator=g)
    D = torch.randn(700, 64, generator=g)
    ref = reference_heads(z, w_o, D, 5, criterion)
    st = {}
    got = tb.somp_heads_torch(z, w_o, D, 5, criterion=criterion, stats=st)
    assert torch.equal(ref.support, got.support)
    torch.testing.assert_close(got.evr.double(), ref.evr, atol=EVR_ATOL, rtol=0)
    assert st["exact_fraction"] > 0.05 or st["fallback_heads"] > 0  # the bound was weak


@pytest.mark.parametrize("criterion", CRITERIA)
def test_duplicates_and_near_duplicates(criterion, large):
    """Exact copies tie (the lowest index wins) and leave the span together with the chosen atom
    (SPAN_TOL); a near copy (3e-2 away, so that fp32 can rank it) is ranked exactly. Six planted
    atoms for six steps: every step has signal (with four, the last steps picked among the noise,
    where fp32 rounding differs by CPU: the dense path failed the same way on an AMD EPYC)."""
    z, w_o, D = planted_heads(3, 9, 6, 24, 300, 6, stable_seed("dups", criterion))
    D[200] = D[5]
    D[201] = D[5] * 2.0
    g = torch.Generator().manual_seed(1)
    D[202] = D[5] + 3e-2 * torch.randn(24, generator=g)
    w_o[0] = w_o[0] + 3.0 * torch.randn(6, 1, generator=g) * D[200]
    ref = reference_heads(z, w_o, D, 6, criterion)
    got = tb.somp_heads_torch(z, w_o, D, 6, criterion=criterion)
    check_same(ref, got)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_sample_and_k_near_v(criterion, large):
    """n = 1 and k = v - 1 (13 atoms in 24 dimensions, so the residual never vanishes)."""
    g = torch.Generator().manual_seed(stable_seed("n1", criterion))
    z, w_o = torch.randn(2, 1, 5, generator=g), torch.randn(2, 5, 24, generator=g)
    D = torch.randn(13, 24, generator=g)
    ref = reference_heads(z, w_o, D, 12, criterion)
    got = tb.somp_heads_torch(z, w_o, D, 12, criterion=criterion)
    assert torch.equal(ref.support, got.support)
    torch.testing.assert_close(got.evr.double(), ref.evr, atol=EVR_ATOL, rtol=0)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_just_above_small_v_by_default(criterion):
    """v = SMALL_V + 1 takes the large-dictionary path with no size setting changed (bounded
    by method=), bf16 inputs upcast."""
    v = sd.SMALL_V + 1
    z, w_o, D = planted_heads(2, 6, 4, 16, v, 3, stable_seed("above", criterion))
    z, w_o, D = z.bfloat16(), w_o.bfloat16(), D.bfloat16()
    ref = reference_heads(z.float(), w_o.float(), D.float(), 4, criterion)
    st = {}
    got = tb.somp_heads_torch(z, w_o, D, 4, criterion=criterion, stats=st, method="bounded")
    assert st["path"] == "bounded"
    check_same(ref, got)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_refinement_and_fallback_stay_exact(criterion, large, monkeypatch):
    """Forced refinement (more directions for every head) and forced dense reruns give the
    reference's supports, and the counters say they happened."""
    z, w_o, D = steep_heads(3, 20, 24, 40, 500, stable_seed("refine", criterion), decay=0.97)
    ref = reference_heads(z, w_o, D, 5, criterion)
    monkeypatch.setattr(bd, "MIN_COUNT", 0)
    monkeypatch.setattr(bd, "REFINE_FRAC", 0.0)
    monkeypatch.setattr(bd, "FALLBACK_FRAC", 1.0)
    monkeypatch.setattr(bd, "HOPELESS_FRAC", 1.0)
    st = {}
    got = tb.somp_heads_torch(z, w_o, D, 5, criterion=criterion, stats=st)
    check_same(ref, got)
    assert st["refined"] > 0 and st["fallback_heads"] == 0
    monkeypatch.setattr(bd, "HOPELESS_FRAC", 0.0)
    st = {}
    got = tb.somp_heads_torch(z, w_o, D, 5, criterion=criterion, stats=st)
    check_same(ref, got)
    assert st["fallback_heads"] >= 1


def test_method_switch_and_bad_method(large):
    z, w_o, D = planted_heads(2, 5, 4, 12, 60, 3, 3)
    st = {}
    tb.somp_heads_torch(z, w_o, D, 3, method="dense", stats=st)
    assert st["path"] == "large"
    with pytest.raises(ValueError, match="method"):
        tb.somp_heads_torch(z, w_o, D, 3, method="fast")


def random_supports(B, d, steps, g):
    """Orthonormal support rows (steps, B, d) made the way the pursuit makes them (fp32)."""
    Q = torch.zeros(B, steps, d)
    for t in range(steps):
        q, _, _ = orthonormalize(torch.randn(B, d, generator=g), Q[:, :t])
        Q[:, t] = q
    return Q


def exact64(D, Q, M, Z, criterion, normalize):
    """float64 truth (B, v) of every atom's score with support rows Q (B, t, d); chosen-free."""
    D64, Q64, M64, Z64 = D.double(), Q.double(), M.double(), Z.double()
    X = D64[None] - torch.bmm(torch.bmm(D64[None].expand(Q.shape[0], -1, -1),
                                        Q64.transpose(1, 2)), Q64)  # (B, v, d) = rows of D P
    C = torch.bmm(torch.bmm(X, M64.transpose(1, 2)), Z64.transpose(1, 2))  # (B, v, n)
    sq = D64.square().sum(1)
    if criterion == "l1":
        s = C.abs().sum(2)
        return (s / sq.sqrt() if normalize else s).square()  # bounds are of the squared score
    s = C.square().sum(2)
    if criterion == "ormp":
        return s / X.square().sum(2)
    return s / sq if normalize else s


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("shape", [(3, 20, 8, 96, 300), (2, 3, 16, 64, 200), (2, 50, 12, 256, 150)])
def test_bound_is_above_the_float64_score_at_every_step(criterion, shape):
    """Along 12 random supports, every atom's fp32 bound (margins included) is >= its float64
    score: the property that makes the pruning exact."""
    B, n, dh, d, v = shape
    g = torch.Generator().manual_seed(stable_seed("bound", criterion, shape))
    Z = torch.randn(B, n, dh, generator=g) * 0.7 ** torch.arange(dh, dtype=torch.float32)
    M = torch.randn(B, dh, d, generator=g)
    D = torch.randn(v, d, generator=g) * (0.5 + torch.rand(v, 1, generator=g))
    st = bd.Batch(Z, M, D, D.square().sum(1), 12, criterion, True, 1 << 26)
    Q = random_supports(B, d, 12, g)
    never = torch.full((B,), math.inf)
    for t in range(13):
        if t:
            st.Q[:, t - 1] = Q[:, t - 1]
            st.t, st.eps = t, drift_eps(torch.float32, d, t)
            st.scan(Q[:, t - 1], never)  # the rank-one update of step t
        ub = st.bounds(torch.arange(B)).double()
        truth = exact64(D, Q[:, :t], M, Z, criterion, True)
        assert bool((ub >= truth).all()), float((truth - ub).max())


def test_fp32_drift_stays_inside_the_margin():
    """After 50 rank-one updates (d = 1024) the stored yt and o differ from their float64 values
    by far less than the margin eps ||d_j|| (resp. eps ||d_j||^2) of drift_eps."""
    B, n, dh, d, v, steps = 2, 30, 16, 1024, 400, 50
    g = torch.Generator().manual_seed(11)
    Z = torch.randn(B, n, dh, generator=g)
    M = torch.randn(B, dh, d, generator=g)
    D = torch.randn(v, d, generator=g)
    sq = D.square().sum(1)
    st = bd.Batch(Z, M, D, sq, steps, "ormp", True, 1 << 26)  # ormp: o is kept up to date
    Q = random_supports(B, d, steps, g)
    never = torch.full((B,), math.inf)
    for t in range(steps):
        st.scan(Q[:, t], never)
    st.catch_up()  # the last pending rank-one updates
    X = D.double()[None] - torch.bmm(torch.bmm(D.double()[None].expand(B, -1, -1),
                                               Q.double().transpose(1, 2)), Q.double())
    yt = torch.bmm(X, st.dirs.U.double()) * st.dirs.sqrt_c.double()[:, None, :]  # (B, v, Rc)
    eps = drift_eps(torch.float32, d, steps)
    scale = st.dirs.sqrt_c.double().abs().max(dim=1).values[:, None, None] * sq.double().sqrt()[
        None, :, None]
    err_y = ((st.yt.double().transpose(1, 2) - yt).abs() / scale).max()
    err_o = ((st.o.double() - X.square().sum(2)).abs() / sq.double()).max()
    assert float(err_y) < eps / 10 and float(err_o) < eps / 10, (float(err_y), float(err_o), eps)
