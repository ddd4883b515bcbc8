"""``hp-fast eval specificity``: selection rules compared on concepts held out from tuning.

Protocol (docs/method.md §6 made testable):

1. Items (``data.concept_sets``): for each concept, completion prompts whose next word is a
   concept word. A seeded shuffle gives each concept ``n_train`` selection prompts (head
   outputs for the rankings) and a pool; the unedited model scores the pool chunk by chunk until
   enough items are *known* (its greedy next token starts an accepted answer), so normalized
   accuracy reads "share of known answers kept". Known items are split into validation (tuning
   concepts only), test and spare. The *other* items of a concept are known items of the other
   concepts, drawn round-robin (test: from their test splits; validation: from their spares).
2. Rankings: every rule of ``RULES`` (``rank_heads`` baseline none / random / contrastive x
   aggregate mean / last; contrastive contrasts the concept's selection prompts with the other
   concepts' selection prompts).
3. Tuning: on the ``tuning`` concepts only, each rule's top k (every k) is inverted on the
   validation items; ``choose_rule`` (a function of the tuning concepts' evidence alone) picks
   the rule that meets the accuracy part of the bar most often there (criterion "bar"), or
   the one with the largest mean specificity index (criterion "index").
4. Report, everything frozen: on every concept's test items, each rule's top k, the chosen
   rule's ``n_controls`` layer-matched random sets (same per-layer counts, disjoint: the paper's
   control), ``n_rule_controls`` layer-matched sets for the other rules, and ``n_uniform``
   uniform random sets of k heads (shared by all rules), all scored in one batched pass
   (``nexttoken.next_token_scores``). Each cell gets normalized target / other accuracy and gold
   probability with bootstrap intervals, the specificity index with its interval, and its rank
   and empirical p-value among each kind of control (``stats``).

``run_specificity`` returns the results and writes results.json, report.md and PNGs
(``specificity_report``).
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from ..capture import HeadActivations, capture_many
from ..edits import uniform_gains
from ..ranking import HeadRanking, rank_heads, random_control
from ..data.concept_sets import CONCEPTS, Item, concept_items, wordlist
from .nexttoken import answer_token_ids, next_token_scores
from .protocol import machine_state, write_json
from .stats import control_rank, index_ci, ratio, ratio_ci, specificity_index

# rule name -> (aggregate, baseline of rank_heads)
RULES = {"random/mean": ("mean", "random"), "none/mean": ("mean", "none"),
         "contrastive/mean": ("mean", "contrastive"), "random/last": ("last", "random"),
         "none/last": ("last", "none"), "contrastive/last": ("last", "contrastive")}
TUNING = ("countries", "languages")
MAX_SHARE = 0.03  # the bar: at most 3 % of the heads inverted


@dataclass(frozen=True)
class Sizes:
    """How much of everything; ``FULL`` and ``QUICK`` are the CLI's two settings."""

    ks: tuple[int, ...] = (3, 8)
    n_train: int = 32          # selection prompts per concept
    n_val: int = 20            # validation items per group (target / other), tuning concepts
    n_test: int = 60           # test items per group
    pool_max: int = 400        # items scored per concept at most, looking for known ones
    n_controls: int = 20       # layer-matched sets per k for the chosen rule
    n_rule_controls: int = 0   # layer-matched sets per k for every other rule
    n_uniform: int = 5         # uniform random sets per k (shared by the rules)
    n_resamples: int = 2000    # bootstrap resamples
    batch_size: int = 64


# FULL fits about 40 minutes on a shared 2-core CPU (load ~6, one torch thread)
FULL = Sizes(ks=(2, 4), n_train=24, n_val=15, n_test=40, pool_max=256, n_controls=20,
             n_rule_controls=0, n_uniform=4)
QUICK = Sizes(ks=(2,), n_train=12, n_val=8, n_test=16, pool_max=96, n_controls=6, n_uniform=3,
              n_resamples=500)


def split_concept(items: Sequence[Item], known: Sequence[bool], n_train: int, n_val: int,
                  n_test: int) -> dict[str, list[Item]]:
    """train (first n_train, known or not), then the known ones: val, test, spare."""
    train = list(items[:n_train])
    ok = [it for it, k in zip(items[n_train:], known) if k]
    return {"train": train, "val": ok[:n_val], "test": ok[n_val:n_val + n_test],
            "spare": ok[n_val + n_test:]}


def other_items(splits: dict, concept: str, part: str, n: int) -> list[Item]:
    """Up to ``n`` items of the other concepts' ``part``, round-robin over the concepts."""
    pools = [list(splits[c][part]) for c in splits if c != concept]
    out: list[Item] = []
    while len(out) < n and any(pools):
        for p in pools:
            if p and len(out) < n:
                out.append(p.pop(0))
    return out


def known_pool(model, tok, items: Sequence[Item], need: int, pool_max: int, *, chunk: int = 64,
               log=print) -> list[bool]:
    """Score ``items`` unedited chunk by chunk until ``need`` are known or ``pool_max`` were
    scored; returns known flags for the scored prefix."""
    flags: list[bool] = []
    for start in range(0, min(len(items), pool_max), chunk):
        part = items[start:min(start + chunk, pool_max)]
        gold = [answer_token_ids(tok, it.answers) for it in part]
        r = next_token_scores(model, tok, [it.prompt for it in part], [None], gold, progress=False)
        flags += r["hit"][0].tolist()
        if sum(flags) >= need:
            break
    return flags


def subset(acts: HeadActivations, idx: Sequence[int], model) -> HeadActivations:
    """The activations of samples ``idx`` (bound to ``model``)."""
    prompts = acts.prompts
    meta = {**acts.meta, "num_samples": len(idx),
            "prompts": [prompts[i] for i in idx] if prompts else []}
    return HeadActivations(acts.z[list(idx)], meta).bind(model)


def rank_rules(model, tok, acts: dict, own: list[int], rest: list[int], words, rules: dict
               ) -> dict[str, HeadRanking]:
    """Every rule's ranking of ``words`` on the samples ``own`` (contrast: samples ``rest``).

    Per aggregate, the concept EVR on ``own`` is computed once: "none" is that raw EVR (the
    raw_evr of the "random" ranking when both are asked for) and "contrastive" is it minus the
    raw EVR on ``rest``, i.e. ``rank_heads(baseline="contrastive", contrast=...)`` without
    repeating the SOMP on ``own`` (tests/unit/test_specificity.py checks the identity)."""
    out = {}
    for agg in dict.fromkeys(a for a, _ in rules.values()):
        wanted = {b for a, b in rules.values() if a == agg}
        mine = subset(acts[agg], own, model)
        first = rank_heads(mine, model, tok, words, baseline="random" if "random" in wanted else "none",
                           progress=False)
        raw = replace(first, scores=first.raw_evr.clone(), options={**first.options, "baseline": "none"})
        by = {"random": first, "none": raw}
        if "contrastive" in wanted:
            other = rank_heads(subset(acts[agg], rest, model), model, tok, words, baseline="none",
                               progress=False)
            by["contrastive"] = replace(raw, scores=raw.raw_evr - other.raw_evr,
                                        options={**raw.options, "baseline": "contrastive",
                                                 "contrast_samples": len(rest)})
        for name, (a, b) in rules.items():
            if a == agg:
                out[name] = by[b]
    return out


def uniform_sets(k: int, num_layers: int, num_heads: int, n: int, seed: int) -> list[list]:
    """``n`` sets of ``k`` heads drawn uniformly without replacement from all heads."""
    rng = random.Random(seed)
    heads = [(l, h) for l in range(num_layers) for h in range(num_heads)]
    return [sorted(rng.sample(heads, k)) for _ in range(n)]


CRITERIA = ("bar", "index")


def choose_rule(evidence: dict, tuning: Sequence[str], criterion: str = "bar") -> str:
    """The rule the tuning concepts' validation evidence favours; concepts outside ``tuning``
    are ignored. evidence[concept][rule][k] = {"target", "other", "index"} (accuracy / unedited).

    criterion "bar" (default): most (concept, k) cells with target <= 0.5 and other >= 0.8 (the
    accuracy part of the bar), then the largest mean index over the cells that keep other >= 0.8,
    then the largest mean other. "index": the largest mean specificity index over all cells
    (ties: mean other); it rewards an edit that breaks everything as long as the target falls a
    little more (on SmolLM2 the layer-0 heads of raw EVR, benchmarks/eval/README.md)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: use one of {CRITERIA}")
    rules = None
    for c in tuning:
        if c not in evidence:
            raise ValueError(f"no tuning evidence for concept {c!r}")
        names = set(evidence[c])
        rules = names if rules is None else rules & names
    if not rules:
        raise ValueError("the tuning concepts share no rule to choose from")

    def cells(rule):
        return [cell for c in tuning for cell in evidence[c][rule].values()]

    def mean(rule, key, keep=lambda cell: True):
        vals = [cell[key] for cell in cells(rule) if keep(cell) and cell[key] == cell[key]]
        return sum(vals) / len(vals) if vals else float("-inf")

    def key(rule):
        if criterion == "index":
            return (round(mean(rule, "index"), 9), mean(rule, "other"))
        hits = sum(cell["target"] <= 0.5 and cell["other"] >= 0.8 for cell in cells(rule))
        return (hits, round(mean(rule, "index", lambda cell: cell["other"] >= 0.8), 9),
                mean(rule, "other"))
    return max(sorted(rules), key=key)


class Plan:
    """Distinct head sets to score, each labelled by the (rule, k, kind) cells that use it."""

    def __init__(self):
        self.sets: list[tuple] = []
        self.index: dict[frozenset, int] = {}

    def add(self, heads) -> int:
        key = frozenset(heads)
        if key not in self.index:
            self.index[key] = len(self.sets)
            self.sets.append(tuple(sorted(key)))
        return self.index[key]

    def configs(self) -> list:
        return [None] + [uniform_gains(list(h), -1.0) for h in self.sets]


def score_items(model, tok, items: Sequence[Item], plan: Plan, *, batch_size: int, desc: str):
    """(hit (1 + S, n) float, prob (1 + S, n)) for the unedited model and every planned set."""
    gold = [answer_token_ids(tok, it.answers) for it in items]
    r = next_token_scores(model, tok, [it.prompt for it in items], plan.configs(), gold,
                          batch_size=batch_size, desc=desc)
    return r["hit"].float(), r["prob"]


def cell(hit, prob, i: int, nt: int, controls: dict, *, n_resamples: int) -> dict:
    """Statistics of planned set ``i`` (row i + 1); items [0, nt) are target, the rest other.
    controls: {kind: [set indices]}."""
    def norm(x, row, lo, hi):
        return ratio(x[row, lo:hi], x[0, lo:hi])
    n = hit.shape[1]
    row = i + 1
    out = {}
    for name, x in (("acc", hit), ("prob", prob)):
        t = (norm(x, row, 0, nt), ratio_ci(x[row, :nt], x[0, :nt], n_resamples=n_resamples))
        o = (norm(x, row, nt, n), ratio_ci(x[row, nt:], x[0, nt:], n_resamples=n_resamples))
        out[name] = {"target": t[0], "target_ci": list(t[1]), "other": o[0], "other_ci": list(o[1]),
                     "index": specificity_index(t[0], o[0]),
                     "index_ci": list(index_ci(x[row, :nt], x[0, :nt], x[row, nt:], x[0, nt:],
                                               n_resamples=n_resamples))}
    a = out["acc"]
    for kind, rows in controls.items():
        ct = [norm(hit, j + 1, 0, nt) for j in rows]
        co = [norm(hit, j + 1, nt, n) for j in rows]
        ci = [specificity_index(t, o) for t, o in zip(ct, co)]
        out[f"vs_{kind}"] = {"n": len(rows),
                             "target": control_rank(a["target"], ct, higher=False),
                             "other": control_rank(a["other"], co, higher=True),
                             "index": control_rank(a["index"], ci, higher=True),
                             "controls_target": ct, "controls_other": co, "controls_index": ci}
    return out


def passes_bar(c: dict, k: int, total_heads: int, min_controls: int = 20) -> bool:
    """Target <= 0.5, other >= 0.8, index above every layer-matched set (p < 0.05, >= 20 sets),
    with at most 3 % of the heads."""
    lm = c.get("vs_layer_matched", {})
    return (k <= MAX_SHARE * total_heads and c["acc"]["target"] <= 0.5 and c["acc"]["other"] >= 0.8
            and lm.get("n", 0) >= min_controls and lm["index"]["p"] < 0.05)


def _prepare(model, tok, concepts, item_sets, tuning, sz: Sizes, seed: int, log):
    splits = {}
    for c in concepts:
        items = list(item_sets[c][0])
        random.Random(seed).shuffle(items)
        need = sz.n_test + (sz.n_val if c in tuning else 0) + sz.n_val  # spare feeds other-val
        flags = known_pool(model, tok, items[sz.n_train:], need, sz.pool_max, log=log)
        splits[c] = split_concept(items, flags, sz.n_train, sz.n_val if c in tuning else 0, sz.n_test)
        splits[c]["scored"] = len(flags)
        log(f"  {c:<10} {len(items)} items; {len(flags)} scored, {sum(flags)} known -> "
            f"test {len(splits[c]['test'])}, val {len(splits[c]['val'])}, spare {len(splits[c]['spare'])}")
        if not splits[c]["test"]:
            raise ValueError(f"the model knows none of the {len(flags)} scored {c!r} items; "
                             "leave the concept out or give items the model can answer")
    return splits


def _tune(model, tok, rankings, splits, tuning, sz: Sizes, log) -> dict:
    """evidence[concept][rule][k] on validation items, rules' top k only (no controls)."""
    evidence = {}
    for c in tuning:
        target, other = splits[c]["val"], other_items(splits, c, "spare", sz.n_val)
        if not target or not other:
            raise ValueError(f"tuning concept {c!r} has {len(target)} validation and {len(other)} "
                             "other validation items; raise pool_max or lower n_val")
        plan = Plan()
        idx = {(r, k): plan.add(rk.top(k)) for r, rk in rankings[c].items() for k in sz.ks}
        hit, _ = score_items(model, tok, target + other, plan, batch_size=sz.batch_size,
                             desc=f"tune {c}")
        nt = len(target)
        evidence[c] = {r: {} for r in rankings[c]}
        for (r, k), i in idx.items():
            t, o = ratio(hit[i + 1, :nt], hit[0, :nt]), ratio(hit[i + 1, nt:], hit[0, nt:])
            evidence[c][r][k] = {"target": t, "other": o, "index": specificity_index(t, o)}
        log(f"  {c}: " + "; ".join(f"{r} " + ",".join(f"k{k} {evidence[c][r][k]['index']:+.2f}"
                                                     for k in sz.ks) for r in rankings[c]))
    return evidence


def _report_concept(model, tok, c, rankings, splits, chosen, sz: Sizes, L: int, H: int, log) -> dict:
    target, other = splits[c]["test"], other_items(splits, c, "test", sz.n_test)
    plan = Plan()
    cells_plan = {}
    for r, rk in rankings.items():
        for k in sz.ks:
            top = rk.top(k)
            n_lm = sz.n_controls if r == chosen else sz.n_rule_controls
            cells_plan[(r, k)] = {
                "set": plan.add(top),
                "layer_matched": [plan.add(s) for s in random_control(top, L, H, n_lm, seed=k)],
                "uniform": [plan.add(s) for s in uniform_sets(k, L, H, sz.n_uniform, seed=1000 + k)]}
    log(f"  {c}: {len(target)} target + {len(other)} other test items x {len(plan.sets) + 1} "
        f"configurations")
    hit, prob = score_items(model, tok, target + other, plan, batch_size=sz.batch_size,
                            desc=f"report {c}")
    nt = len(target)
    cells = {}
    for (r, k), p in cells_plan.items():
        controls = {"uniform": p["uniform"]}
        if p["layer_matched"]:
            controls["layer_matched"] = p["layer_matched"]
        st = cell(hit, prob, p["set"], nt, controls, n_resamples=sz.n_resamples)
        st.update(heads=[list(h) for h in plan.sets[p["set"]]],
                  layers=rankings[r].layer_histogram(k), passes=passes_bar(st, k, L * H))
        cells.setdefault(r, {})[k] = st
    return {"n_target": nt, "n_other": len(other), "cells": cells,
            "other_kinds": sorted({it.kind for it in other}),
            "samples": [it.prompt for it in target[:3]]}


def run_specificity(model, tok, out, *, concepts: Sequence[str] = CONCEPTS,
                    tuning: Sequence[str] = TUNING, item_sets: dict | None = None,
                    sizes: Sizes | None = None, quick: bool = False, rules: dict | None = None,
                    criterion: str = "bar", seed: int = 0, log=print) -> dict:
    """The whole protocol (module docstring); returns the results (files written to ``out``).

    item_sets: {concept: (items, word list)} instead of the built-in sets (``concept_items`` and
    ``wordlist``). sizes: ``Sizes`` (default ``QUICK`` or ``FULL``)."""
    from .specificity_report import write_report
    t0 = time.time()
    rules = dict(rules or RULES)
    concepts, tuning = list(concepts), list(tuning)
    bad = [c for c in tuning if c not in concepts]
    if bad or len(tuning) >= len(concepts) or not tuning:
        raise ValueError(f"tuning concepts {tuning} must be a non-empty proper subset of {concepts}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: use one of {CRITERIA}")
    unknown = [r for r in rules.values() if r[0] not in ("mean", "last")]
    if unknown:
        raise ValueError(f"rules {unknown}: aggregate must be mean or last")
    sz = sizes or (QUICK if quick else FULL)
    item_sets = item_sets or {c: (concept_items(c, tok), wordlist(c)) for c in concepts}
    missing = [c for c in concepts if c not in item_sets]
    if missing:
        raise ValueError(f"no items for concepts {missing}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _timed(log, t0)
    log(f"[specificity 1/4] items: tuning on {tuning}, held out {[c for c in concepts if c not in tuning]}")
    splits = _prepare(model, tok, concepts, item_sets, tuning, sz, seed, log)
    prompts = [it.prompt for c in concepts for it in splits[c]["train"]]
    owner = [c for c in concepts for _ in splits[c]["train"]]
    acts = capture_many(model, tok, prompts, aggregates=tuple(sorted({a for a, _ in rules.values()})),
                        chat_template=False, progress=False)
    L, H = next(iter(acts.values())).z.shape[1:3]
    log(f"[specificity 2/4] rankings: {len(rules)} rules x {len(concepts)} concepts ({L} x {H} heads)")
    rankings = {}
    for c in concepts:
        own = [i for i, o in enumerate(owner) if o == c]
        rest = [i for i, o in enumerate(owner) if o != c]
        rankings[c] = rank_rules(model, tok, acts, own, rest, item_sets[c][1], rules)
    log(f"[specificity 3/4] tuning on {tuning} (validation items, ks {list(sz.ks)})")
    evidence = _tune(model, tok, rankings, splits, tuning, sz, log)
    chosen = choose_rule(evidence, tuning, criterion)
    log(f"        chosen on the tuning concepts: {chosen}")
    log("[specificity 4/4] report on test items, everything frozen")
    report = {}
    for c in concepts:  # partial.json after each concept: a stopped run keeps what it measured
        report[c] = _report_concept(model, tok, c, rankings[c], splits, chosen, sz, L, H, log)
        write_json(out / "partial.json", {"chosen": chosen, "tuning_evidence": evidence,
                                          "report": report, "seconds": round(time.time() - t0, 1)})
    results = {"task": "specificity", "model": acts["mean" if "mean" in acts else next(iter(acts))].meta["model"],
               "concepts": concepts, "tuning": tuning,
               "held_out": [c for c in concepts if c not in tuning], "rules": {r: list(v) for r, v in rules.items()},
               "chosen": chosen, "criterion": criterion, "tuning_evidence": evidence, "report": report,
               "sizes": asdict(sz), "quick": quick, "num_layers": L, "num_heads": H,
               "counts": {c: {p: len(splits[c][p]) for p in ("train", "val", "test", "spare")}
                          | {"scored": splits[c]["scored"], "items": len(item_sets[c][0])}
                          for c in concepts},
               "bootstrap": {"method": "percentile", "level": 0.95, "n_resamples": sz.n_resamples,
                             "seed": 0}, "machine": machine_state()}
    results["summary"] = summarize(results)
    results["seconds"] = round(time.time() - t0, 1)
    write_report(out, results, rankings)
    log(f"        {results['summary']['line']}")
    log(f"        done in {results['seconds']:.0f} s; wrote {out}/results.json, report.md, PNGs")
    return results


def _timed(log, t0: float):
    """``log`` with the elapsed minutes and seconds in front of each line."""
    def timed(msg: str = "", *a, **kw):
        dt = int(time.time() - t0)
        return log(f"[{dt // 60:02d}:{dt % 60:02d}] {msg}", *a, **kw)
    return timed


def summarize(results: dict) -> dict:
    """Per rule on the held-out concepts: concepts passing the bar (any k <= 3 %), cells meeting
    its accuracy part (target <= 0.5, other >= 0.8), mean index over the cells that keep other
    >= 0.8, mean index at each k. The best rule is ranked like ``choose_rule``'s "bar" criterion
    (concepts passing first)."""
    rep, held = results["report"], results["held_out"]
    out = {}
    for r in results["rules"]:
        passing = [c for c in rep if any(cell["passes"] for cell in rep[c]["cells"][r].values())]
        cells = [cell for c in held for cell in rep[c]["cells"][r].values()]
        ks = sorted({k for c in rep for k in rep[c]["cells"][r]})
        mean_idx = {k: sum(rep[c]["cells"][r][k]["acc"]["index"] for c in held) / max(1, len(held))
                    for k in ks}
        kept = [cell["acc"]["index"] for cell in cells if cell["acc"]["other"] >= 0.8]
        out[r] = {"passing": passing, "held_out_mean_index": mean_idx,
                  "held_out_accuracy_bar_cells": sum(cell["acc"]["target"] <= 0.5 and
                                                     cell["acc"]["other"] >= 0.8 for cell in cells),
                  "held_out_index_other_kept": sum(kept) / len(kept) if kept else float("nan"),
                  "held_out_cells_other_kept": len(kept)}

    def rank(r):
        o = out[r]
        kept = o["held_out_index_other_kept"]
        return (len([c for c in o["passing"] if c in held]), o["held_out_accuracy_bar_cells"],
                kept if kept == kept else float("-inf"))
    best = max(out, key=rank)
    chosen = results["chosen"]
    line = (f"chosen rule {chosen}: bar met on {len(out[chosen]['passing'])} of {len(rep)} concepts "
            f"({', '.join(out[chosen]['passing']) or 'none'}); best on held-out concepts: {best}")
    return {"rules": out, "best_held_out": best, "line": line}


__all__ = ["RULES", "TUNING", "Sizes", "FULL", "QUICK", "run_specificity", "choose_rule",
           "split_concept", "other_items", "uniform_sets", "passes_bar", "summarize", "Plan"]
