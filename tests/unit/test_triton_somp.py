"""The Triton kernels (hp_fast.pursuit.triton_backend) against the float64 reference, run by the Triton
interpreter on the CPU (TRITON_INTERPRET=1, set in conftest before triton is imported): tiny
shapes only. Same unique-path inputs and tolerances as tests/helpers/planted.py."""
import itertools

import pytest
import torch

pytest.importorskip("triton")

from hp_fast.pursuit import somp, somp_heads  # noqa: E402
from hp_fast.pursuit.reference import somp_reference  # noqa: E402
from helpers.planted import CASES, CRITERIA, check_same, planted, planted_heads, stable_seed  # noqa: E402

# every case under every criterion; (normalize, center) cycles so all four combos are covered
FLAGS = list(itertools.product([True, False], [False, True]))
GRID = [(case, crit, *FLAGS[i % 4])
        for i, (case, crit) in enumerate(itertools.product(sorted(CASES), CRITERIA))]


@pytest.mark.parametrize("case,criterion,normalize,center", GRID)
def test_triton_matches_reference(case, criterion, normalize, center):
    B, n, d, v, ks, k, extra = CASES[case]
    H, D = planted(B, n, d, v, ks, seed=stable_seed(case, criterion), **extra)
    ref = somp_reference(H, D, k, criterion=criterion, normalize=normalize, center=center,
                         return_coefficients=True)
    got = somp(H, D, k, criterion=criterion, normalize=normalize, center=center,
               return_coefficients=True, backend="triton")
    assert got.backend == "triton"
    check_same(ref, got, coef=True)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_triton_heads_match_reference(criterion):
    # 17 heads: more than one head block of the update kernel (16)
    z, w_o, D = planted_heads(17, 5, 6, 19, 40, 3, seed=11)
    ref = somp_heads(z, w_o, D, 3, criterion=criterion, backend="reference")
    got = somp_heads(z, w_o, D, 3, criterion=criterion, backend="triton")
    check_same(ref, got)


def test_triton_heads_bf16_and_fp16_dictionary():
    z, w_o, D = planted_heads(2, 6, 8, 16, 30, 3, seed=12)
    for dt in (torch.bfloat16, torch.float16):
        Dq, zq = D.to(dt), z.to(dt)
        ref = somp_heads(zq, w_o, Dq, 3, criterion="l2", backend="reference")
        got = somp_heads(zq, w_o, Dq, 3, criterion="l2", backend="triton")
        check_same(ref, got)


@pytest.mark.parametrize("criterion", ["l1", "l2", "ormp"])
@pytest.mark.parametrize("seed", [62, 80, 109, 140])
def test_triton_duplicate_atoms_in_one_tile_resolve_to_lowest_index(seed, criterion):
    """Seeds where an exact duplicate pair shares a vocabulary tile and fp32 put the copy a few
    ulps ahead: the kernel must pick the lowest index among near-ties, like the reference."""
    B, n, d, v, ks, k, extra = CASES["dup"]
    H, D = planted(B, n, d, v, ks, seed=seed, **extra)
    ref = somp_reference(H, D, k, criterion=criterion)
    got = somp(H, D, k, criterion=criterion, backend="triton")
    assert torch.equal(ref.support, got.support)


def test_launch_configs_list_every_configuration_the_launcher_picks(monkeypatch):
    """Every (kernel, constexprs) the launcher uses, recorded over all rules, normalize on/off and
    widths r = dh (L1) or min(n, dh) (l2/ormp) of 3, 16, 17 and 64, is in
    triton_kernels.launch_configs() (what ahead-of-time compilation builds), and the listing
    holds nothing else than those kinds of entries."""
    import hp_fast.pursuit.triton_backend as tb
    from hp_fast.pursuit.triton_kernels import launch_configs

    used = []
    for name in ("score_config", "update_config"):
        orig = getattr(tb, name)

        def record(*a, _orig=orig, _name=name):
            cfg = _orig(*a)
            used.append((_name.replace("_config", "_kernel"), cfg))
            return cfg
        monkeypatch.setattr(tb, name, record)
    for crit, norm, (n, dh) in itertools.product(CRITERIA, (True, False),
                                                 [(5, 3), (20, 16), (3, 17), (2, 64)]):
        z, w_o, D = planted_heads(2, n, dh, 24, 33, 2, seed=dh)
        somp_heads(z, w_o, D, 2, criterion=crit, normalize=norm, backend="triton")
    listed = launch_configs(max_r=64)
    assert {k for k, _ in listed} == {"score_kernel", "update_kernel"}
    assert len({(k, tuple(sorted(c.items()))) for k, c in used}) >= 8
    for entry in used:
        assert entry in listed, entry


@pytest.mark.parametrize("criterion,n,dh,normalize", [
    ("l1", 7, 128, True), ("l1", 9, 200, False), ("l2", 130, 128, True), ("l2", 140, 200, False),
    ("ormp", 130, 128, False)])
def test_triton_wide_rows_match_reference(criterion, n, dh, normalize):
    """X rows of width 128 and 256 (BR): the 16-row tiles and the 32-column walk over X that keep
    the kernels within their register budget (triton_aot.BUDGET) select what the reference
    selects. l2/ormp rows are min(n, dh) wide, hence n >= 128 there; v=53 spans four 16-row
    tiles, the last one partial."""
    from hp_fast.pursuit.triton_kernels import score_config, update_config
    z, w_o, D = planted_heads(2, n, dh, 40, 53, 4, seed=n + dh)
    r = dh if criterion == "l1" else min(n, dh)
    assert score_config(0, normalize, r)["BV"] == update_config(r)["BV"] == 16
    ref = somp_heads(z, w_o, D, 4, criterion=criterion, normalize=normalize, backend="reference")
    got = somp_heads(z, w_o, D, 4, criterion=criterion, normalize=normalize, backend="triton")
    check_same(ref, got)


def test_triton_precision_option_is_checked_and_ignored_by_the_interpreter():
    """``precision`` reaches the kernels as a constexpr; a name outside DOT_PRECISIONS is refused
    before any work. Under the interpreter every precision runs as ieee (it multiplies in fp32
    with numpy), so its exactness is decided on a GPU (tests/gpu, bench_precision.py)."""
    from hp_fast.pursuit.triton_backend import somp_heads_triton
    from hp_fast.pursuit.triton_kernels import DOT_PRECISIONS, kernel_precision
    z, w_o, D = planted_heads(2, 5, 6, 19, 40, 3, seed=5)
    with pytest.raises(ValueError, match="precision='tf32' is unknown"):
        somp_heads_triton(z, w_o, D, 3, precision="tf32")
    assert {kernel_precision(p) for p in DOT_PRECISIONS} == {"ieee"}
    ref = somp_heads(z, w_o, D, 3, backend="reference")
    check_same(ref, somp_heads_triton(z, w_o, D, 3, precision="bf16x3"))
