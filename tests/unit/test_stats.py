"""Bootstrap intervals against a hand-written percentile bootstrap, ranks and empirical p-values
among random controls on constructed distributions, the specificity index."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hp_fast.evaluation.stats import (control_rank, control_rank_reference, index_ci, ratio,
                                      ratio_ci, specificity_index)


def hand_percentile(stat, samples, n_resamples, level, seed):
    """Percentile bootstrap written out: resample each sample's items with replacement."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_resamples):
        idx = [rng.integers(0, len(s), len(s)) for s in samples]
        vals.append(stat(*idx))
    a = (1 - level) / 2
    return np.quantile(vals, a), np.quantile(vals, 1 - a)


# Monte Carlo tolerance: with B = 20000 resamples the standard error of a 2.5 % quantile of a
# mean of 60 Bernoulli-ish items is about sqrt(q(1-q)/B)/f(x) ~ 0.004; two independent runs differ
# by at most ~0.02 with overwhelming probability, while the interval is ~0.25 wide.
TOL = 0.02
B = 20000


def test_ratio_ci_matches_hand_percentile_bootstrap():
    rng = np.random.default_rng(3)
    base = (rng.random(60) < 0.6).astype(float)
    edited = base * (rng.random(60) < 0.55)
    lo, hi = ratio_ci(edited, base, n_resamples=B, seed=1)
    hlo, hhi = hand_percentile(lambda i: edited[i].mean() / base[i].mean(), [edited], B, 0.95, 7)
    assert abs(lo - hlo) < TOL and abs(hi - hhi) < TOL
    assert lo < ratio(edited, base) < hi
    # a different answer (the interval of the wrong statistic) would be caught
    wrong_lo, _ = hand_percentile(lambda i: edited[i].mean(), [edited], B, 0.95, 7)
    assert abs(lo - wrong_lo) > TOL


def test_index_ci_matches_hand_bootstrap_with_two_independent_samples():
    rng = np.random.default_rng(5)
    tb, ob = np.ones(40), (rng.random(70) < 0.8).astype(float) + 0.5
    te, oe = (rng.random(40) < 0.3).astype(float), ob * (rng.random(70) < 0.9)
    lo, hi = index_ci(te, tb, oe, ob, n_resamples=B, seed=2)

    def stat(i, j):
        return specificity_index(te[i].mean() / tb[i].mean(), oe[j].mean() / ob[j].mean())
    hlo, hhi = hand_percentile(stat, [te, oe], B, 0.95, 11)
    assert abs(lo - hlo) < TOL and abs(hi - hhi) < TOL
    point = specificity_index(ratio(te, tb), ratio(oe, ob))
    assert lo < point < hi


def test_ci_is_seeded_and_degenerate_cases_are_defined():
    e, b = [1, 0, 1, 1, 0, 1], [1] * 6
    assert ratio_ci(e, b, seed=4) == ratio_ci(e, b, seed=4)
    assert ratio_ci([1] * 10, [1] * 10) == (1.0, 1.0)  # every item kept: a point, not NaN
    assert all(math.isnan(x) for x in ratio_ci([1], [1]))  # one item: no interval
    with pytest.raises(ValueError, match="items"):
        ratio_ci([1, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="method"):
        ratio_ci(e, b, method="normal")


def test_specificity_index():
    assert specificity_index(0.4, 0.9) == pytest.approx(0.5)  # target lost 0.6, other 0.1
    assert specificity_index(1.0, 1.0) == 0.0
    assert specificity_index(0.9, 0.5) == pytest.approx(-0.4)


@pytest.mark.parametrize("higher", [True, False])
def test_control_rank_constructed(higher):
    controls = [0.1, 0.2, 0.3, 0.3, 0.5]
    best = 0.9 if higher else -0.1
    worst = -0.1 if higher else 0.9
    r = control_rank(best, controls, higher=higher)  # more extreme than every control
    assert r == {"rank": 1, "p": 1 / 6, "n": 5}
    r = control_rank(worst, controls, higher=higher)  # every control more extreme
    assert r == {"rank": 6, "p": 1.0, "n": 5}
    r = control_rank(0.3, controls, higher=higher)  # ties count against the selection
    assert r["rank"] == 1 + (3 if higher else 4)
    assert r["p"] == pytest.approx(r["rank"] / 6)


def test_control_rank_twenty_sets_reach_p_below_005_and_nan_handling():
    r = control_rank(1.0, [0.0] * 20)
    assert r["p"] == pytest.approx(1 / 21) and r["p"] < 0.05
    assert control_rank(1.0, [0.0] * 19)["p"] == 0.05  # 19 sets: 1/20, never below 0.05
    assert control_rank(0.5, [float("nan"), 0.1, 0.9])["n"] == 2
    assert math.isnan(control_rank(float("nan"), [0.1])["p"])


def test_control_rank_matches_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 20, 33):
        for _ in range(20):
            controls = list(np.round(rng.random(n), 1))  # rounding makes ties
            value = float(np.round(rng.random(), 1))
            for higher in (True, False):
                assert control_rank(value, controls, higher=higher) == \
                    control_rank_reference(value, controls, higher=higher)
