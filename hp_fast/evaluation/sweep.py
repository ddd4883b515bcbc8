"""The edit sweep every task runs (docs/method.md §6): at each gain and k, the SOMP top k, the
Logit-Lens top k and random head sets with SOMP's per-layer counts, disjoint from it; every
configuration generated in one batched run, each metric divided by the unedited model's.

``sweep`` is the whole thing for text prompts. Tasks that generate otherwise (images, several
concepts in one batch) use its two halves: ``edit_plan`` (the configurations) and
``sweep_rows`` (normalized rows from each configuration's metrics).
"""
from __future__ import annotations

import statistics
from typing import Callable, NamedTuple, Sequence

from ..edits import uniform_gains
from ..generation.configs import generate_configs
from ..ranking import HeadRanking, random_control

Metric = Callable[[list[str], list], dict]


def normalized(values: dict, base: dict) -> dict:
    """values / base per key (NaN where the base is 0): "relative to the unedited model"."""
    return {k: (v / base[k] if base.get(k) else float("nan")) for k, v in values.items()}


def quartiles(values: list[float]) -> list[float]:
    """[q1, median, q3] (all equal for a single value)."""
    if len(values) < 2:
        return [values[0]] * 3 if values else [float("nan")] * 3
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], statistics.median(values), q[2]]


class EditSet(NamedTuple):
    """One edited configuration of the sweep: ``heads`` at gain ``alpha``."""

    alpha: float
    k: int
    name: str                    # "somp", "logit_lens", "random0", "random1", ...
    heads: list[tuple[int, int]]


def edit_plan(ranking: HeadRanking, ll_ranking: HeadRanking, ks: Sequence[int], n_random: int,
              num_layers: int, num_heads: int, alphas: Sequence[float] = (-1.0,)) -> list[EditSet]:
    """Every edited configuration, by alpha, then k, then SOMP / logit lens / random sets.

    The random sets of a k match SOMP's top k layer by layer, are disjoint from it, and are the
    same at every alpha (seed = k).
    """
    plan = []
    for alpha in alphas:
        for k in ks:
            top = ranking.top(k)
            plan += [EditSet(alpha, k, "somp", top), EditSet(alpha, k, "logit_lens", ll_ranking.top(k))]
            plan += [EditSet(alpha, k, f"random{i}", heads) for i, heads
                     in enumerate(random_control(top, num_layers, num_heads, n_random, seed=k))]
    return plan


def plan_configs(plan: Sequence[EditSet]) -> list[dict]:
    """The gains of each planned configuration (put ``None``, the unedited model, first)."""
    return [uniform_gains(e.heads, e.alpha) for e in plan]


def sweep_rows(plan: Sequence[EditSet], base: dict, values: Sequence[dict], num_layers: int,
               num_heads: int, answers: Sequence[list[str]] | None = None,
               base_answers: list[str] | None = None) -> list[dict]:
    """One row per (alpha, k): metrics / unedited for SOMP and logit lens, random quartiles.

    base: the unedited model's metrics; values[i]: the metrics of ``plan[i]``. With
    ``answers`` (one list per planned configuration) and ``base_answers``, rows also carry
    every configuration's generations under "answers" ("none" = unedited).
    """
    rows = []
    for alpha, k in dict.fromkeys((e.alpha, e.k) for e in plan):
        got = {e.name: (normalized(v, base), e.heads, v, None if answers is None else answers[i])
               for i, (e, v) in enumerate(zip(plan, values)) if e.k == k and e.alpha == alpha}
        rand = [v[0] for n, v in got.items() if n.startswith("random")]
        row = {"alpha": alpha, "k": k, "percent_heads": round(100 * k / (num_layers * num_heads), 2),
               "heads": got["somp"][1], "somp": got["somp"][0],
               "logit_lens_heads": got["logit_lens"][1], "logit_lens": got["logit_lens"][0],
               "random": {key: quartiles([r[key] for r in rand]) for key in base},
               "random_values": rand,
               "random_sets": [got[n][1] for n in got if n.startswith("random")],
               "raw": {n: v[2] for n, v in got.items()}}
        if answers is not None:
            row["answers"] = {"none": base_answers, **{n: v[3] for n, v in got.items()}}
        rows.append(row)
    return rows


def sweep(model, tok, test, ranking, ll_ranking, ks, n_random, num_layers, num_heads, *,
          alphas=(-1.0,), metric: Metric, generate=generate_configs, max_new_tokens=10,
          keep_answers=False) -> tuple[dict, list[dict]]:
    """(unedited metrics, rows): metrics / unedited for SOMP / logit-lens / random sets at each
    gain and k, all generated in one batched run.

    test: items with a ``.prompt``; metric(answers, test) -> {name: value}. Rows are ordered by
    alpha, then k. keep_answers: also put every configuration's generations in the rows.
    generate: ``generate_configs``' signature (e.g. ``generate_configs_shared_prefix``).
    """
    plan = edit_plan(ranking, ll_ranking, ks, n_random, num_layers, num_heads, alphas)
    answers = generate(model, tok, [q.prompt for q in test], [None] + plan_configs(plan),
                       max_new_tokens=max_new_tokens, desc="edited answers")
    values = [metric(a, test) for a in answers]
    rows = sweep_rows(plan, values[0], values[1:], num_layers, num_heads,
                      answers[1:] if keep_answers else None, answers[0])
    return values[0], rows
