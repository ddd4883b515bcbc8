"""results.json, report.md and PNGs of ``hp-fast eval specificity`` (``specificity.py``)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .plots import edit_curves, interval_points
from .protocol import write_json


def _f(x, nd: int = 2) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(v, ci) -> str:
    return f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]"


def _p(vs: dict | None) -> str:
    if not vs or not vs.get("n"):
        return "-"
    return f"{_f(vs['index']['p'], 3)} (rank {vs['index']['rank']}/{vs['n'] + 1})"


def _median(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _quantile(xs, q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _concept_plot(out: Path, concept: str, cells: dict, rule: str) -> str:
    """Chosen rule's target / other accuracy vs k with 95 % intervals, control medians + IQR."""
    ks = sorted(cells[rule])
    cs = [cells[rule][k] for k in ks]
    series = {"selection: target": [c["acc"]["target"] for c in cs],
              "selection: other": [c["acc"]["other"] for c in cs]}
    errors = {"selection: target": ([c["acc"]["target_ci"][0] for c in cs], [c["acc"]["target_ci"][1] for c in cs]),
              "selection: other": ([c["acc"]["other_ci"][0] for c in cs], [c["acc"]["other_ci"][1] for c in cs])}
    bands = {}
    for kind, label in (("layer_matched", "layer-matched"), ("uniform", "uniform")):
        if all(f"vs_{kind}" in c and c[f"vs_{kind}"]["n"] for c in cs):
            for part in ("target", "other"):
                vals = [c[f"vs_{kind}"][f"controls_{part}"] for c in cs]
                name = f"{label} random: {part}"
                series[name] = [_median(v) for v in vals]
                bands[name] = ([_quantile(v, 0.25) for v in vals], [_quantile(v, 0.75) for v in vals])
    name = f"{concept}_curves.png"
    edit_curves(ks, series, out / name, bands=bands, errors=errors,
                title=f"{concept}, rule {rule}: accuracy / unedited\n(bars: bootstrap 95 % CI; "
                      "random: median, IQR)", ylabel="known answers kept")
    return name


def _index_plot(out: Path, results: dict, k: int) -> str:
    rep = results["report"]
    concepts = list(rep)
    series = {}
    for r in results["rules"]:
        cs = [rep[c]["cells"][r].get(k) for c in concepts]
        if all(cs):
            series[r] = ([c["acc"]["index"] for c in cs], [c["acc"]["index_ci"][0] for c in cs],
                         [c["acc"]["index_ci"][1] for c in cs])
    chosen = results["chosen"]
    refs = {}
    lm = [rep[c]["cells"][chosen][k].get("vs_layer_matched") for c in concepts]
    if all(lm):
        refs[f"best layer-matched set ({chosen})"] = [max(v["controls_index"], default=float("nan"))
                                                      for v in lm]
    labels = [f"{c}{' (tuning)' if c in results['tuning'] else ''}" for c in concepts]
    name = f"index_k{k}.png"
    interval_points(labels, series, out / name, refs=refs, ylabel="drop(target) - drop(other)",
                    title=f"specificity index at k={k} (bars: bootstrap 95 % CI)")
    return name


def load_results(path) -> dict:
    """A results.json of ``hp-fast eval specificity`` with its integer k keys restored."""
    import json
    res = json.loads(Path(path).read_text())
    for rep in res["report"].values():
        rep["cells"] = {r: {int(k): v for k, v in by_k.items()} for r, by_k in rep["cells"].items()}
    for by_rule in res["tuning_evidence"].values():
        for r, by_k in by_rule.items():
            by_rule[r] = {int(k): v for k, v in by_k.items()}
    return res


def write_report(out, results: dict, rankings: dict | None) -> Path:
    """Write results.json, the PNGs and report.md into ``out`` (rankings: {concept: {rule:
    HeadRanking}} for the head-score arrays, or None to keep the ones in ``results``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rankings is not None:  # None: regenerate from a results.json that has them
        results["head_scores"] = {c: {r: rk.scores.tolist() for r, rk in rs.items()}
                                  for c, rs in rankings.items()}
    write_json(out / "results.json", results)
    rep, chosen, sz = results["report"], results["chosen"], results["sizes"]
    total = results["num_layers"] * results["num_heads"]
    plots = [_concept_plot(out, c, rep[c]["cells"], chosen) for c in rep]
    plots += [_index_plot(out, results, k) for k in sz["ks"]]
    m = results["machine"]
    lines = ["# hp-fast eval specificity: selection rules on held-out concepts", "",
             f"Model: {results['model'].get('model_type')} {results['num_layers']} layers x "
             f"{results['num_heads']} heads ({total} heads). Tuning concepts: "
             f"{', '.join(results['tuning'])}; held out: {', '.join(results['held_out'])}. "
             f"Run: {results['seconds']:.0f} s, torch threads {m['torch_threads']}, load average at "
             f"the end {m['load_avg_1_5_15']} on {m['cores']} cores, {m['time']}"
             f"{' (quick run)' if results.get('quick') else ''}.", "",
             f"**{results['summary']['line']}**", "",
             "## Protocol", "",
             "Items are completion prompts whose next word is a concept word; an item counts when "
             "the unedited model's greedy next token starts an accepted answer (known items only), "
             "so accuracy / unedited is the share of known answers kept. *Other* items are known "
             "items of the other concepts (round-robin). Heads are inverted (gain -1). Rules are "
             "`baseline/aggregate` of `rank_heads` (none = the paper's raw EVR, random = EVR minus "
             "random-vocabulary EVR, contrastive = EVR on the concept's prompts minus EVR on the "
             "other concepts' prompts). The rule is chosen on the tuning concepts' validation items, "
             + ("criterion `bar`: most (concept, k) cells with target <= 0.5 and other >= 0.8, then the "
                "largest mean index among cells keeping other >= 0.8"
                if results.get("criterion", "bar") == "bar" else
                "criterion `index`: the largest mean specificity index over concepts and ks")
             + ", then frozen; every number below is on test items.", "",
             f"Statistics: bootstrap 95 % intervals ({results['bootstrap']['method']}, "
             f"{results['bootstrap']['n_resamples']} resamples, seed {results['bootstrap']['seed']}; "
             "items resampled jointly for each ratio, target and other items independently for the "
             "index). Specificity index = drop(target) - drop(other), drop = 1 - accuracy / unedited. "
             "p = (1 + #controls with an index at least as large) / (1 + #controls); rank r/(n+1). "
             f"Layer-matched controls: {sz['n_controls']} sets per k for the chosen rule, "
             f"{sz['n_rule_controls']} for the others (same per-layer counts as the selection, "
             f"disjoint from it); uniform: {sz['n_uniform']} sets of k heads per k, shared by "
             "the rules. The bar: k <= 3 % of the heads, target <= 0.5, other >= 0.8, index p < 0.05 "
             "against >= 20 layer-matched sets.", "",
             "## Items", "", "| concept | split | items | scored | known: test / val / spare | "
             "test target + other |", "|---|---|---|---|---|---|"]
    for c in rep:
        n = results["counts"][c]
        lines.append(f"| {c} | {'tuning' if c in results['tuning'] else 'held out'} | {n['items']} | "
                     f"{n['scored']} | {n['test']} / {n['val']} / {n['spare']} | "
                     f"{rep[c]['n_target']} + {rep[c]['n_other']} |")
    lines += ["", "## Results (test items)", "",
              "| concept | rule | k | target acc [95 % CI] | other acc [95 % CI] | index [95 % CI] | "
              "p index vs layer-matched | p index vs uniform | p target / other (layer-matched) | "
              "target prob | other prob | layers | bar |", "|" + "---|" * 13]
    for c in rep:
        for r, by_k in rep[c]["cells"].items():
            for k, cell in sorted(by_k.items()):
                a, pr = cell["acc"], cell["prob"]
                lm = cell.get("vs_layer_matched")
                pt = (f"{_f(lm['target']['p'], 3)} / {_f(lm['other']['p'], 3)}" if lm and lm["n"] else "-")
                mark = "**" if r == chosen else ""
                lines.append(
                    f"| {c} | {mark}{r}{mark} | {k} | {_ci(a['target'], a['target_ci'])} | "
                    f"{_ci(a['other'], a['other_ci'])} | {_ci(a['index'], a['index_ci'])} | "
                    f"{_p(lm)} | {_p(cell.get('vs_uniform'))} | {pt} | {_f(pr['target'])} | "
                    f"{_f(pr['other'])} | {cell['layers']} | {'MET' if cell['passes'] else '-'} |")
    lines += ["", "## Rules on the held-out concepts", "",
              "| rule | concepts meeting the bar | held-out cells with target <= 0.5 and other >= 0.8 | "
              "mean index of held-out cells keeping other >= 0.8 (cells) | mean held-out index by k |",
              "|---|---|---|---|---|"]
    for r, s in results["summary"]["rules"].items():
        lines.append(f"| {r}{' (chosen)' if r == chosen else ''}"
                     f"{' (best held out)' if r == results['summary']['best_held_out'] else ''} | "
                     f"{', '.join(s['passing']) or '-'} | {s.get('held_out_accuracy_bar_cells', '-')} | "
                     f"{_f(s.get('held_out_index_other_kept'))} ({s.get('held_out_cells_other_kept', '-')}) | "
                     + ", ".join(f"k={k}: {_f(v)}" for k, v in s["held_out_mean_index"].items()) + " |")
    lines += ["", "## Tuning evidence (validation items of the tuning concepts, index by k)", "",
              "| concept | rule | " + " | ".join(f"k={k}" for k in sz["ks"]) + " |",
              "|---|---|" + "---|" * len(sz["ks"])]
    for c, by_rule in results["tuning_evidence"].items():
        for r, by_k in by_rule.items():
            lines.append(f"| {c} | {r} | " + " | ".join(
                f"{_f(by_k[k]['index'])} (t {_f(by_k[k]['target'])}, o {_f(by_k[k]['other'])})"
                for k in sz["ks"]) + " |")
    lines += ["", "## Plots", "", " ".join(f"![]({p})" for p in plots), ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
