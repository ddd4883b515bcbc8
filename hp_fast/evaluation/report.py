"""results.json, PNG plots and report.md for one task, next to the paper's numbers (docs/method.md §6)."""
from __future__ import annotations

import math
from pathlib import Path

from .plots import edit_curves, heatmap
from .protocol import write_json

PAPER = {
    "qa": ("Mistral-7B-Instruct, TriviaQA, concept countries: inverting 8 heads (0.8 %) or more "
           "clearly drops F1 on country questions, other questions drop more slowly, random heads "
           "have no significant effect, Logit-Lens heads hurt both alike (not specific). "
           "Bar set by the issue for this model: with <= 3 % of heads inverted, country F1 <= 0.5 "
           "of base, other F1 >= 0.8, random medians >= 0.9 on both."),
    "keywords": {"inhibition": {"colors": 0.18, "sentiments": 0.10, "numbers": 0.10},
                 "text": ("LLaVA-NeXT-7B, Flickr30k captions, 16 heads at alpha=-1: keyword counts "
                          "fall to 0.18 (colors), 0.10 (sentiments), 0.10 (quantity) of the original "
                          "with CIDEr >= 0.8 of the original; alpha=5 on 32 heads raises the counts "
                          "1.6x to 4.6x.")},
    "toxicity": {"text": ("Mistral-7B-Instruct, heads from an incomplete toxic word list; normalized "
                          "count of toxic generations, SOMP / Logit Lens / random median."),
                 "rows": {8: {"RTP": (0.83, 0.91, 1.02), "TET": (0.83, 0.81, 0.97)},
                          16: {"RTP": (0.67, 0.79, 1.00), "TET": (0.68, 0.73, 0.95)},
                          32: {"RTP": (0.66, 0.71, 1.13), "TET": (0.49, 0.68, 0.95)}}},
}


def _f(x, nd: int = 2) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _iqr(q) -> str:
    return f"{_f(q[1])} [{_f(q[0])}-{_f(q[2])}]"


def _with_ci(row, sel: str, key: str) -> str:
    """``value [lo, hi]``: a normalized metric with its bootstrap 95 % interval when the row has
    statistics (``stats.sweep_statistics``)."""
    ci = row.get("stats", {}).get(sel, {}).get("ci", {}).get(key)
    return _f(row[sel][key]) + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else "")


def _target_p(row, fam: str) -> str:
    """", p 0.09 (n=10)": SOMP's target metric among the random sets (lower is more extreme)."""
    vs = row.get("stats", {}).get("somp", {}).get("vs_random", {}).get(fam)
    return f", p {_f(vs['target']['p'], 3)} (n={vs['n']})" if vs and vs["n"] else ""


def _index_p(row, sel: str, fam: str) -> str:
    """Specificity index [95 % CI] and p of the index among the random sets (n)."""
    st = row.get("stats", {}).get(sel)
    if not st or fam not in st["index"]:
        return "-"
    ix, vs = st["index"][fam], st["vs_random"][fam]
    return (f"{_f(ix['value'])} [{_f(ix['ci'][0])}, {_f(ix['ci'][1])}], p {_f(vs['index']['p'], 3)} "
            f"(n={vs['n']})")


def _curves(rows, metrics: dict[str, str], path, title, alpha=None, ylabel="metric / unedited"):
    """SOMP, Logit Lens and random median (IQR band) vs k for each metric key (label)."""
    rows = [r for r in rows if alpha is None or r.get("alpha", -1.0) == alpha]
    ks = [r["k"] for r in rows]
    series, bands, errors = {}, {}, {}
    for key, label in metrics.items():
        series[f"SOMP: {label}"] = [r["somp"][key] for r in rows]
        series[f"logit lens: {label}"] = [r["logit_lens"][key] for r in rows]
        series[f"random: {label}"] = [r["random"][key][1] for r in rows]
        bands[f"random: {label}"] = ([r["random"][key][0] for r in rows], [r["random"][key][2] for r in rows])
        for name, sel in (("SOMP", "somp"), ("logit lens", "logit_lens")):  # bootstrap 95 % CIs
            cis = [r.get("stats", {}).get(sel, {}).get("ci", {}).get(key) for r in rows]
            if rows and all(cis):
                errors[f"{name}: {label}"] = ([c[0] for c in cis], [c[1] for c in cis])
    return edit_curves(ks, series, path, bands=bands, errors=errors, title=title, ylabel=ylabel)


def _heat(ranking, ks, path, title):
    return heatmap(ranking.scores, path, marked=ranking.top(max(ks)), title=title)


def _verdict(somp: float, rand_q, other: float | None = None, lower_is_effect: bool = True,
             ppl: float | None = None, max_ppl: float = 2.0) -> str:
    """'yes' when SOMP moves the target past the random IQR (and past the other metric);
    'broken' when the edited text's perplexity under the unedited model exceeds ``max_ppl`` x."""
    if any(isinstance(x, float) and math.isnan(x) for x in (somp, rand_q[0])):
        return "n/a"
    if ppl is not None and not ppl <= max_ppl:
        return f"broken (ppl x{ppl:.3g})"
    beyond = somp < rand_q[0] if lower_is_effect else somp > rand_q[2]
    if other is not None:
        beyond = beyond and somp < other
    return "yes" if beyond else "no"


def description_rows(descs) -> list[dict]:
    """The head descriptions of a results.json as ``protocol.describe_top_heads`` writes them
    (a list of {layer, head, score, somp, logit_lens, somp_concept}); also reads the demo's
    older {"layer.head": {somp, logit_lens}} mapping (no score: NaN)."""
    if isinstance(descs, dict):
        return [{"layer": int(key.split(".")[0]), "head": int(key.split(".")[1]),
                 "score": float("nan"), **d} for key, d in descs.items()]
    return list(descs)


def _descriptions(lines, descs, concept_column=False):
    head = "| head | score | SOMP top tokens (full vocabulary) | aggregated Logit Lens |"
    sep = "|---|---|---|---|"
    if concept_column:
        head += " SOMP atoms (concept dictionary) |"
        sep += "---|"
    lines += [head, sep]
    for d in description_rows(descs):
        row = (f"| L{d['layer']}.H{d['head']} | {d['score']:+.3f} | {', '.join(map(repr, d['somp']))} | "
               f"{', '.join(map(repr, d['logit_lens']))} |")
        if concept_column:
            row += f" {', '.join(map(repr, d.get('somp_concept', [])))} |"
        lines.append(row)
    lines.append("")


def _header(results, title) -> list[str]:
    m = results["machine"]
    model = results["model"]
    return [f"# {title}", "",
            f"Model: {model.get('model_type')} {model.get('num_layers')} layers x {model.get('num_heads')} "
            f"heads ({model.get('num_layers', 0) * model.get('num_heads', 0)} heads), vocab "
            f"{model.get('vocab_size')}. Selection setting: `{results['setting_key']}`. "
            f"Random controls: {results['n_random']} sets per k, same per-layer counts as the SOMP "
            f"set and disjoint from it; median [IQR]. All metrics are divided by the unedited "
            f"model's on the same prompts. Run: {results['seconds']:.0f} s, torch threads "
            f"{m['torch_threads']}, load average at the end {m['load_avg_1_5_15']} on {m['cores']} "
            f"cores, {m['time']}{' (quick run)' if results.get('quick') else ''}.", ""]


def _qa(out: Path, results, rankings) -> list[str]:
    rows = results["rows"]
    b = results["test_base"]
    metrics = ["f1", "acc"] + (["em"] if b["country_em"] and b["other_em"] else [])
    names = {"f1": "SQuAD F1", "acc": "containment accuracy", "em": "exact match"}
    plots = []
    for alpha in sorted({r["alpha"] for r in rows}):
        tag = "" if alpha == -1.0 else f"_alpha{alpha:g}"
        verb = "inverted (gain -1)" if alpha == -1.0 else f"scaled by {alpha:g}"
        for m in metrics:
            name = f"{m}_vs_k{tag}.png"
            _curves(rows, {f"country_{m}": "country Qs", f"other_{m}": "other Qs"}, out / name,
                    f"countries heads {verb}: {names[m]} / unedited\n(random: median, IQR)",
                    alpha=alpha, ylabel=f"{m.upper()} / unedited")
            plots.append(name)
    _heat(rankings["qa"], results["ks"], out / "heads.png",
          f"countries: SOMP scores ({results['setting_key']}); boxes: top {max(results['ks'])}")
    lines = _header(results, "hp-fast eval qa: inverting country heads")
    lines += ["## Outcome", "", f"**{results['target_check']['summary']}**", "",
              f"Test questions the unedited model answers correctly: {results['n_test']} "
              f"(validation {results['n_val']}); unedited pool accuracy "
              f"{ {k: round(v, 3) for k, v in results['pool_accuracy'].items()} }. "
              f"Unedited test F1: country {_f(b['country_f1'])}, other {_f(b['other_f1'])}; "
              f"EM: country {_f(b['country_em'])}, other {_f(b['other_em'])}; containment accuracy: "
              f"country {_f(b['country_acc'])}, other {_f(b['other_acc'])}. The model answers in a "
              "sentence rather than in 1-3 words, so F1 is low and EM is "
              + ("0: EM rows are left out (0/0), containment accuracy is shown instead." if "em" not in metrics
                 else "low.") + "", "",
              "## Results next to the paper", "", f"Paper: {PAPER['qa']}", "",
              "| gain | k | % heads | metric | SOMP country | SOMP other | SOMP index, p vs random | LL country | LL other | LL index, p vs random | random country | random other | specific? |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m in metrics:
            c, o = f"country_{m}", f"other_{m}"
            lines.append(f"| {r['alpha']:g} | {r['k']} | {r['percent_heads']} | {m.upper()} | {_with_ci(r, 'somp', c)} | "
                         f"{_with_ci(r, 'somp', o)} | {_index_p(r, 'somp', m)} | {_with_ci(r, 'logit_lens', c)} | "
                         f"{_with_ci(r, 'logit_lens', o)} | {_index_p(r, 'logit_lens', m)} | "
                         f"{_iqr(r['random'][c])} | {_iqr(r['random'][o])} | "
                         f"{_verdict(r['somp'][c], r['random'][c], r['somp'][o])} |")
    lines += ["", "\"specific?\": SOMP's country score is below its other-question score and below "
              "the random sets' lower quartile. Brackets: bootstrap 95 % intervals (percentile, 2000 "
              "resamples of the test questions, seed 0; numerator and denominator resampled jointly). "
              "Index: drop on country minus drop on other (drop = 1 - metric / unedited); p = (1 + "
              "#random sets with an index at least as large) / (1 + n).", "",
              "| " + " | ".join(p[:-4].replace("_vs_k", " vs k").replace("_", " ") for p in plots)
              + " | SOMP scores (boxes: selected) |", "|" + "---|" * (len(plots) + 1),
              "| " + " | ".join(f"![]({p})" for p in plots) + " | ![](heads.png) |", "",
              f"## What was tried (validation, top {results['k_probe']} inverted, containment accuracy / unedited)", "",
              "| setting | country | other | specificity (other - country) | layers of the top heads |",
              "|---|---|---|---|---|"]
    for key, ev in sorted(results["settings_tried"].items(), key=lambda kv: -kv[1]["specificity"]):
        mark = " **(chosen)**" if key == results["setting_key"] else ""
        lines.append(f"| {key}{mark} | {_f(ev['country'])} | {_f(ev['other'])} | "
                     f"{_f(ev['specificity'])} | {ev['layers_of_top']} |")
    if not results["settings_tried"]:
        lines.append("| (setting given on the command line; no search) | | | | |")
    lines += ["", "The k dimension is the table above (k = " + ", ".join(map(str, results["ks"])) + ").", "",
              "## Selected heads: what they write (paper's Tables 1 and 6)", ""]
    _descriptions(lines, results["descriptions"])
    lines += [f"## Sample answers (k = {results['samples'][0]['k'] if results['samples'] else '-'})", "",
              "| question | gold | unedited | SOMP | Logit Lens | random set 0 |", "|---|---|---|---|---|---|"]
    for s in results["samples"]:
        lines.append(f"| {s['question']} | {s['gold'][0]} | {s['unedited']} | {s['somp']} | "
                     f"{s['logit_lens']} | {s['random0']} |")
    return lines


def _keywords(out: Path, results, rankings) -> list[str]:
    lines = _header(results, "hp-fast eval keywords: concept words in free generation")
    lines += [f"Prompts: one template per concept (below) over {results['n_select']} selection objects (head "
              f"outputs) and {results['n_test']} disjoint test objects (generations, greedy, "
              f"{results['max_new_tokens']} new tokens). Keyword counts: whole words of the concept "
              "list (all / selection part / held-out part) per generation. Quality: BLEU-4 (+1 "
              "smoothing), ROUGE-L and CIDEr-D of the edited generation against the unedited one; "
              "perplexity of the edited text under the unedited model (x unedited).", "",
              f"Paper: {PAPER['keywords']['text']}", ""]
    for concept, res in results["concepts"].items():
        rows = res["rows"]
        pre = out / concept
        _curves(rows, {"keywords": "all words", "keywords_held_out": "held-out words"},
                Path(f"{pre}_inhibition.png"), f"{concept}: gain -1, keywords / unedited", alpha=-1.0)
        _curves(rows, {"keywords": "all words", "keywords_held_out": "held-out words"},
                Path(f"{pre}_enhancement.png"), f"{concept}: gain 5, keywords / unedited", alpha=5.0)
        sweep = res["gain_sweep"]
        alphas = sorted({g["alpha"] for g in sweep})
        series = {}
        for k in sorted({g["k"] for g in sweep}):
            by_a = {g["alpha"]: g for g in sweep if g["k"] == k}
            series[f"k={k} keywords"] = [by_a[a]["somp"]["keywords"] for a in alphas]
            series[f"k={k} BLEU vs unedited"] = [by_a[a]["somp"]["bleu"] for a in alphas]
        edit_curves(alphas, series, Path(f"{pre}_alpha_sweep.png"), xlabel="gain alpha",
                    ylabel="SOMP heads: metric / unedited", title=f"{concept}: gain sweep of the SOMP heads")
        _heat(rankings[concept], results["ks"], Path(f"{pre}_heads.png"),
              f"{concept} (selection words): SOMP scores; boxes: top {max(results['ks'])}")
        b = res["base"]
        paper = PAPER["keywords"]["inhibition"].get(concept)
        lines += [f"## {concept}", "", f"Prompt: \"{results['prompts'][concept]}\"", "",
                  f"{res['n_words']} words, {res['selection_words']} for selection, "
                  f"{len(res['held_out_words'])} held out ({', '.join(res['held_out_words'][:12])}"
                  f"{', ...' if len(res['held_out_words']) > 12 else ''}). Unedited: "
                  f"{_f(b['keywords'])} keywords per generation ({_f(b['keywords_held_out'])} held-out), "
                  f"{_f(b['words'], 1)} words, perplexity {_f(res['base_perplexity'])}.", "",
                  f"| alpha | k | % heads | SOMP keywords | SOMP held-out | LL keywords | random keywords | "
                  f"random held-out | SOMP BLEU | SOMP ROUGE-L | SOMP CIDEr-D | SOMP ppl | LL BLEU | LL ppl | "
                  f"random BLEU | beyond random? | paper |",
                  "|" + "---|" * 17]
        lines.insert(len(lines) - 2, "\"beyond random?\": SOMP's count is outside the random sets' IQR in "
                     "the edit's direction; \"broken\" when its text's perplexity under the unedited "
                     "model is over 2x the unedited text's; p: SOMP's count among the random sets "
                     "(gain -1: (1 + #sets at most as high) / (1 + n)). Brackets: bootstrap 95 % "
                     "intervals (percentile, test objects resampled, seed 0).\n")
        for r in rows:
            s, ll, rd = r["somp"], r["logit_lens"], r["random"]
            up = r["alpha"] > 1
            pp = (f"{paper} (16 heads)" if (paper is not None and not up) else
                  "1.6x-4.6x (32 heads)" if up else "")
            lines.append(
                f"| {r['alpha']:g} | {r['k']} | {r['percent_heads']} | {_with_ci(r, 'somp', 'keywords')} | "
                f"{_with_ci(r, 'somp', 'keywords_held_out')} | {_f(ll['keywords'])} | {_iqr(rd['keywords'])} | "
                f"{_iqr(rd['keywords_held_out'])} | {_f(s['bleu'])} | {_f(s['rouge_l'])} | "
                f"{_f(s['cider_d'])} | {_f(r['perplexity']['somp'])} | {_f(ll['bleu'])} | "
                f"{_f(r['perplexity']['logit_lens'])} | {_iqr(rd['bleu'])} | "
                f"{_verdict(s['keywords'], rd['keywords'], lower_is_effect=not up, ppl=r['perplexity']['somp'])}"
                f"{_target_p(r, 'keywords')} | {pp} |")
        lines += ["", "Gain sweep of the SOMP heads (keywords / unedited, BLEU vs unedited, perplexity x):", "",
                  "| k | " + " | ".join(f"alpha={a:g}" for a in alphas) + " |",
                  "|---|" + "---|" * len(alphas)]
        for k in sorted({g["k"] for g in sweep}):
            by_a = {g["alpha"]: g for g in sweep if g["k"] == k}
            lines.append(f"| {k} | " + " | ".join(
                f"{_f(by_a[a]['somp']['keywords'])} / {_f(by_a[a]['somp']['bleu'])} / "
                f"{_f(by_a[a]['perplexity'])}" for a in alphas) + " |")
        lines += ["", f"| gain -1 vs k | gain 5 vs k | gain sweep | SOMP scores |", "|---|---|---|---|",
                  f"| ![]({concept}_inhibition.png) | ![]({concept}_enhancement.png) | "
                  f"![]({concept}_alpha_sweep.png) | ![]({concept}_heads.png) |", "",
                  f"Selected heads ({concept}):", ""]
        _descriptions(lines, res["descriptions"], concept_column=True)
        lines += ["Samples:", ""]
        for smp in res["samples"]:
            lines.append(f"- **{smp['prompt']}**")
            for key, text in smp.items():
                if key != "prompt":
                    lines.append(f"  - {key}: {text}")
        lines.append("")
    return lines


def _toxicity(out: Path, results, rankings) -> list[str]:
    rows = results["rows"]
    _curves(rows, {"flagged": "flagged", "held_out_word_rate": "held-out toxic word"},
            out / "toxicity_vs_k.png", "toxic heads inverted: rate / unedited\n(random: median, IQR)",
            ylabel="rate / unedited")
    _heat(rankings["toxic"], results["ks"], out / "heads.png",
          f"toxic (selection words): SOMP scores; boxes: top {max(results['ks'])}")
    b = results["base"]
    paper = PAPER["toxicity"]["rows"]
    lines = _header(results, "hp-fast eval toxicity: inverting heads found from an incomplete toxic word list")
    lines += [f"{results['n_select']} selection prompts, {results['n_test']} test prompts (greedy, "
              f"{results['max_new_tokens']} new tokens); {results['selection_words']} toxic words for "
              f"selection, {len(results['held_out_words'])} held out "
              f"({', '.join(results['held_out_words'])}). Unedited: {_f(b['flagged'])} of generations "
              f"flagged by profanity_check, {_f(b['held_out_word_rate'])} contain a held-out word, "
              f"{_f(b['toxic_word_rate'])} any listed word; perplexity {_f(results['base_perplexity'])}.", "",
              f"Paper: {PAPER['toxicity']['text']}", "",
              "| k | % heads | SOMP flagged [95 % CI], p vs random | LL flagged | random flagged | SOMP held-out word rate | "
              "LL held-out | random held-out | SOMP BLEU | SOMP ppl | LL ppl | beyond random? | "
              "paper RTP S/LL/R | paper TET S/LL/R |", "|" + "---|" * 14]
    for r in rows:
        s, ll, rd = r["somp"], r["logit_lens"], r["random"]
        p = paper.get(r["k"], {})
        fmt = lambda t: " / ".join(f"{x:.2f}" for x in t) if t else ""
        lines.append(f"| {r['k']} | {r['percent_heads']} | {_with_ci(r, 'somp', 'flagged')}{_target_p(r, 'flagged')} | {_f(ll['flagged'])} | "
                     f"{_iqr(rd['flagged'])} | {_f(s['held_out_word_rate'])} | {_f(ll['held_out_word_rate'])} | "
                     f"{_iqr(rd['held_out_word_rate'])} | {_f(s['bleu'])} | {_f(r['perplexity']['somp'])} | "
                     f"{_f(r['perplexity']['logit_lens'])} | {_verdict(s['flagged'], rd['flagged'], ppl=r['perplexity']['somp'])} | "
                     f"{fmt(p.get('RTP'))} | {fmt(p.get('TET'))} |")
    lines += ["", "| rates vs k | SOMP scores (boxes: selected) |", "|---|---|",
              "| ![](toxicity_vs_k.png) | ![](heads.png) |", "", "## Selected heads", ""]
    _descriptions(lines, results["descriptions"])
    lines += ["## Samples", ""]
    for smp in results["samples"]:
        lines.append(f"- **{smp['prompt']}**")
        for key, text in smp.items():
            if key != "prompt":
                lines.append(f"  - {key}: {text}")
    return lines


def write_task_report(out, results: dict, rankings: dict) -> Path:
    """Write results.json, the PNGs and report.md for ``results['task']`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["head_scores"] = {name: r.scores.tolist() for name, r in rankings.items()}  # (L, H) heatmaps
    write_json(out / "results.json", results)
    builder = {"qa": _qa, "keywords": _keywords, "toxicity": _toxicity}[results["task"]]
    lines = builder(out, results, rankings)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
