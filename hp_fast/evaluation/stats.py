"""Statistics for every evaluation result: bootstrap intervals and ranks among random controls.

Normalized metrics
    An edit's normalized metric is ``mean(edited) / mean(unedited)`` over the same evaluation
    items (``sweep.normalized``). ``ratio_ci`` gives a bootstrap 95 % interval for it, resampling
    the items *jointly* (one resample draws item indices; numerator and denominator are both
    taken on those items), via ``scipy.stats.bootstrap`` with a fixed seed.

Specificity index
    ``drop = 1 - normalized``; the index of an edit is ``drop(target) - drop(other)``, i.e.
    ``normalized(other) - normalized(target)`` (``specificity_index``): positive when the edit
    removes more of the target than of the other items. ``index_ci`` resamples the target items
    and the other items independently (two samples, each resampled within itself).

Interval method: "percentile" (``METHOD``). The items here are mostly 0/1 outcomes (an answer
kept or lost) on a few dozen items, and on known items the unedited metric is often constant
(every answer right). BCa needs a jackknife acceleration estimate, which is 0/0 when every
jackknife value is equal (an edit that keeps or loses every item), and scipy then returns NaN
with a warning; the percentile interval is defined in those cases, respects the [0, 1] range of
an accuracy, and is transformation-invariant. Its coverage is slightly worse than BCa's for
skewed statistics on small samples; with 60 items per group we prefer an interval that is always
defined. ``method="BCa"`` is accepted for users who want it.

Random controls
    ``control_rank`` places a selection's value among the values of ``n`` random control sets:
    rank 1 = more extreme than every control, and the empirical p-value
    ``(1 + #controls at least as extreme) / (1 + n)`` (ties count against the selection; the
    smallest reachable p is ``1 / (1 + n)``, so p < 0.05 needs at least 20 sets).
    ``control_rank_reference`` is the plain-loop twin the tests compare it with.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METHOD = "percentile"
N_RESAMPLES = 2000
LEVEL = 0.95
SEED = 0

__all__ = ["METHOD", "N_RESAMPLES", "LEVEL", "SEED", "ratio", "ratio_ci", "specificity_index",
           "index_ci", "control_rank", "control_rank_reference", "normalized_with_ci",
           "sweep_statistics", "per_item_values"]


def _array(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a flat list of per-item values, got shape {a.shape}")
    return a


def ratio(edited: Sequence[float], base: Sequence[float]) -> float:
    """mean(edited) / mean(base) (NaN when the base mean is 0 or there are no items)."""
    e, b = _array(edited, "edited"), _array(base, "base")
    if len(e) != len(b):
        raise ValueError(f"edited has {len(e)} items but base has {len(b)}; give one value per item")
    if len(b) == 0 or b.mean() == 0:
        return float("nan")
    return float(e.mean() / b.mean())


def _check_method(method: str) -> None:
    if method not in ("percentile", "BCa", "basic"):
        raise ValueError(f"method={method!r}: use 'percentile' (default), 'BCa' or 'basic'")


def _bootstrap(samples: tuple, statistic, *, n_resamples: int, level: float, seed: int,
               method: str) -> tuple[float, float]:
    """scipy.stats.bootstrap on index arrays (so any statistic of the items can be resampled)."""
    import warnings
    from scipy.stats import DegenerateDataWarning, bootstrap
    _check_method(method)
    if any(len(s) < 2 for s in samples):
        return float("nan"), float("nan")
    run = dict(n_resamples=n_resamples, confidence_level=level, method=method, vectorized=True)
    with warnings.catch_warnings():
        # every resample equal (an edit that keeps or loses every item): the percentile interval
        # is that value, which is the right answer; scipy still warns
        warnings.simplefilter("ignore", DegenerateDataWarning)
        try:
            res = bootstrap(samples, statistic, rng=np.random.default_rng(seed), **run)
        except TypeError:  # scipy < 1.15 spells the generator argument random_state
            res = bootstrap(samples, statistic, random_state=np.random.default_rng(seed), **run)
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


def _mean_ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """mean(num[idx]) / mean(den[idx]) along the last axis; idx (..., n) integer-valued."""
    i = idx.astype(np.int64)
    d = den[i].mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, np.nan, num[i].mean(-1) / np.where(d == 0, 1.0, d))


def ratio_ci(edited: Sequence[float], base: Sequence[float], *, n_resamples: int = N_RESAMPLES,
             level: float = LEVEL, seed: int = SEED, method: str = METHOD) -> tuple[float, float]:
    """Bootstrap interval of mean(edited) / mean(base), items resampled jointly."""
    e, b = _array(edited, "edited"), _array(base, "base")
    if len(e) != len(b):
        raise ValueError(f"edited has {len(e)} items but base has {len(b)}; give one value per item")
    idx = np.arange(len(e), dtype=np.float64)
    return _bootstrap((idx,), lambda i, axis=-1: _mean_ratio(e, b, i), n_resamples=n_resamples,
                      level=level, seed=seed, method=method)


def specificity_index(norm_target: float, norm_other: float) -> float:
    """drop(target) - drop(other), drop = 1 - normalized; > 0: the target falls more."""
    return (1.0 - norm_target) - (1.0 - norm_other)


def index_ci(target_edited, target_base, other_edited, other_base, *,
             n_resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = SEED,
             method: str = METHOD) -> tuple[float, float]:
    """Bootstrap interval of the specificity index; target and other items resampled
    independently, each jointly with its own unedited values."""
    te, tb = _array(target_edited, "target_edited"), _array(target_base, "target_base")
    oe, ob = _array(other_edited, "other_edited"), _array(other_base, "other_base")
    if len(te) != len(tb) or len(oe) != len(ob):
        raise ValueError("each edited list needs one value per item of its unedited list")
    ti, oi = np.arange(len(te), dtype=np.float64), np.arange(len(oe), dtype=np.float64)

    def stat(i, j, axis=-1):
        return specificity_index(_mean_ratio(te, tb, i), _mean_ratio(oe, ob, j))
    return _bootstrap((ti, oi), stat, n_resamples=n_resamples, level=level, seed=seed, method=method)


def control_rank(value: float, controls: Sequence[float], *, higher: bool = True) -> dict:
    """Where ``value`` falls among the control values (module docstring).

    higher: True when a larger value is more extreme (the specificity index, a metric the edit
    should raise); False when smaller is (a normalized target metric the edit should lower).
    Returns {"rank": 1 + #controls at least as extreme, "p": (1 + that) / (1 + n), "n": n}.
    NaN controls are left out; a NaN value gets rank and p NaN.
    """
    c = np.asarray([x for x in controls if not (isinstance(x, float) and math.isnan(x))], dtype=float)
    n = int(c.size)
    if isinstance(value, float) and math.isnan(value):
        return {"rank": float("nan"), "p": float("nan"), "n": n}
    as_extreme = int((c >= value).sum() if higher else (c <= value).sum())
    return {"rank": 1 + as_extreme, "p": (1 + as_extreme) / (1 + n), "n": n}


def control_rank_reference(value: float, controls: Sequence[float], *, higher: bool = True) -> dict:
    """Plain-loop twin of ``control_rank``."""
    kept = [x for x in controls if x == x]  # NaN != NaN
    if value != value:
        return {"rank": float("nan"), "p": float("nan"), "n": len(kept)}
    count = 0
    for x in kept:
        if (higher and x >= value) or (not higher and x <= value):
            count += 1
    return {"rank": 1 + count, "p": (1 + count) / (1 + len(kept)), "n": len(kept)}


def normalized_with_ci(edited: Sequence[float], base: Sequence[float], **kw) -> dict:
    """{"value": ratio, "ci": [lo, hi]} for one normalized metric."""
    lo, hi = ratio_ci(edited, base, **kw)
    return {"value": ratio(edited, base), "ci": [lo, hi]}


def sweep_statistics(per_item: dict, base: dict, pairs: dict, *, selections=("somp", "logit_lens"),
                     control_prefix: str = "random", n_resamples: int = N_RESAMPLES,
                     seed: int = SEED, method: str = METHOD) -> dict:
    """Intervals and control ranks for one (gain, k) row of an edit sweep.

    per_item[name][metric]: per-item values of configuration ``name`` ("somp", "logit_lens",
    "random0", ...) over that metric's items; base[metric]: the unedited model's values on the
    same items. pairs: {family: (target metric, other metric)}, e.g. {"f1": ("country_f1",
    "other_f1")}. Returns, for each selection: "ci" {metric: [lo, hi]} of the normalized metric,
    "index" {family: {"value", "ci"}}, and "vs_random" {family: {"n", "target", "other",
    "index"}} (``control_rank``: target lower, other and index higher are more extreme)."""
    kw = dict(n_resamples=n_resamples, seed=seed, method=method)
    controls = [n for n in per_item if n.startswith(control_prefix)]
    norm = {n: {m: ratio(v, base[m]) for m, v in per_item[n].items()} for n in per_item}
    out = {}
    for name in selections:
        if name not in per_item:
            continue
        vals = per_item[name]
        st = {"ci": {m: list(ratio_ci(v, base[m], **kw)) for m, v in vals.items()},
              "index": {}, "vs_random": {}}
        for fam, (t, o) in pairs.items():
            idx = specificity_index(norm[name][t], norm[name][o])
            st["index"][fam] = {"value": idx, "ci": list(index_ci(vals[t], base[t], vals[o], base[o], **kw))}
            ct = [norm[c][t] for c in controls]
            co = [norm[c][o] for c in controls]
            st["vs_random"][fam] = {
                "n": len(controls), "target": control_rank(norm[name][t], ct, higher=False),
                "other": control_rank(norm[name][o], co, higher=True),
                "index": control_rank(idx, [specificity_index(a, b) for a, b in zip(ct, co)])}
        out[name] = st
    return out


def per_item_values(metric, answers: dict, items, keys: Sequence[str]) -> tuple[dict, dict]:
    """(per_item, base) for ``sweep_statistics`` from a sweep row's answers {"none": unedited,
    "somp": ..., "random0": ...}: each metric key evaluated on every item alone
    (``metric([answer], [item])[key]``), which is the per-item term of a metric that is a mean
    over items (rates, counts, BLEU, ROUGE-L; not corpus-level CIDEr-D, whose idf needs the
    whole corpus)."""
    def values(texts):
        rows = [metric([a], [it]) for a, it in zip(texts, items)]
        return {k: [r[k] for r in rows] for k in keys}
    base = values(answers["none"])
    return {n: values(a) for n, a in answers.items() if n != "none"}, base
