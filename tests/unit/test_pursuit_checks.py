"""Input checks of the pursuit (hp_fast.pursuit.result): the finiteness test never holds a mask
the size of the dictionary, and still tells overflow of its own sum apart from NaN/Inf."""
import pytest
import torch

from hp_fast.pursuit import somp_heads
from hp_fast.pursuit.result import all_finite


@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 9, 4), (10000, 2)])
def test_all_finite_matches_the_elementwise_check(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g)
    assert all_finite(x) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone().view(-1)
        y[int(torch.randint(y.numel(), (1,), generator=g))] = bad
        y = y.view(shape)
        assert all_finite(y, chunk_rows=3) is False == bool(torch.isfinite(y).all())


def test_finite_values_whose_sum_overflows_are_finite():
    x = torch.full((8, 4), 3e38)  # every entry finite, the fp32 sum is inf
    assert not torch.isfinite(x.sum())
    assert all_finite(x, chunk_rows=3) is True


def test_nan_dictionary_is_a_clear_error():
    z, w_o, D = torch.randn(1, 3, 2), torch.randn(1, 2, 5), torch.randn(9, 5)
    D[4, 1] = float("nan")
    with pytest.raises(ValueError, match="dictionary contains NaN or Inf"):
        somp_heads(z, w_o, D, 2)
    z[0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        somp_heads(z, w_o, torch.randn(9, 5), 2)
