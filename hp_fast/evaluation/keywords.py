"""``hp-fast eval keywords``: concept words in free generation (docs/method.md §6, captioning
experiment transposed to text): inhibition (gain -1) and enhancement (gains 2..8).

For each concept (colors, sentiments = VADER list, numbers):
1. The concept's word list is split: a selection part (heads are ranked with it) and a
   held-out part (only counted in the evaluation), so a drop in held-out words shows the heads
   carry the concept, not the listed tokens.
2. Heads are ranked on the outputs of descriptive prompts (one template per concept,
   ``PROMPTS``, e.g. "Write a one-sentence caption for a photo of a {object}.") over selection
   objects; generations are evaluated on disjoint test objects.
3. At each k: SOMP, Logit Lens and random layer-matched disjoint sets at gains -1 and 5 (one
   batched generation, ``protocol.sweep``); a gain sweep of the SOMP heads (0, 2, 8 next to -1, 5).
4. Metrics per generation, averaged, divided by the unedited model's: keyword counts (all
   words, selection words, held-out words); quality against the unedited generation of the same
   prompt (BLEU-4 with +1 smoothing, ROUGE-L, CIDEr-D with the unedited text as the one
   reference); perplexity of the edited text under the unedited model (SOMP / Logit Lens).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..capture import capture_many
from ..concepts import load_words
from ..edits import uniform_gains
from .metrics import bleu, cider_d_scores, keyword_hits, rouge_l, words as word_list
from ..generation.prefix import generate_configs_shared_prefix
from .protocol import (Perplexity, Setting, describe_top_heads, machine_state, normalized,
                       split_items, split_words, sweep)
from .stats import per_item_values, sweep_statistics

PROMPT = "Describe {article} {object} in one sentence."
# One descriptive template per concept, chosen so the unedited SmolLM2 uses the concept often
# enough to measure a drop: with PROMPT alone it wrote 0.2 color words, 0.2 strong sentiment
# words and no number words per sentence on 10 test objects; with these, on 8 test objects,
# 0.6 color words (a caption, the paper's setting), 1.25 sentiment words, 0.5 number words.
PROMPTS = {"colors": "Write a one-sentence caption for a photo of {article} {object}.",
           "sentiments": "Describe how you feel about {article} {object} in one sentence.",
           "numbers": "How big is {article} {object}? Answer in one sentence."}
CONCEPTS = ("colors", "sentiments", "numbers")
CONTROL_ALPHAS = (-1.0, 5.0)
SWEEP_ALPHAS = (-1.0, 0.0, 2.0, 5.0, 8.0)

# Everyday things whose plain description tends to mention colors, feelings or quantities.
OBJECTS = """apple banana strawberry lemon orange tomato carrot pumpkin watermelon grape
cherry sunflower rose tulip daisy forest meadow desert beach ocean lake river mountain
volcano rainbow sunset sunrise thunderstorm snowman flag parrot flamingo peacock zebra
tiger penguin spider octopus butterfly ladybug goldfish horse elephant giraffe kitten
puppy clock calendar dice chessboard piano guitar violin bicycle motorcycle bus train
airplane ship lighthouse castle bridge cathedral skyscraper kitchen bakery market
birthday party wedding funeral hospital classroom playground library museum garden
""".split()


@dataclass(frozen=True)
class TextItem:
    """A prompt and, once known, the unedited model's generation for it."""

    object: str
    reference: str = ""
    template: str = PROMPT

    @property
    def prompt(self) -> str:
        article = "an" if self.object[0] in "aeiou" else "a"
        return self.template.format(article=article, object=self.object)


def keyword_metric(all_words, selection, held_out):
    """metric(answers, items) for ``protocol.sweep``: keyword counts and quality vs the reference."""
    all_words = list(all_words)
    sel = {" ".join(word_list(w)) for w in selection}
    held = {" ".join(word_list(w)) for w in held_out}

    def metric(answers: list[str], items: list[TextItem]) -> dict[str, float]:
        n = max(1, len(answers))
        hits = [keyword_hits(a, all_words) for a in answers]  # one pass per text (large lists)
        refs = [it.reference for it in items]
        have = [i for i, r in enumerate(refs) if word_list(r)]
        cider = cider_d_scores([answers[i] for i in have], [refs[i] for i in have]) if len(have) > 1 else []
        return {"keywords": sum(sum(h.values()) for h in hits) / n,
                "keywords_selection": sum(c for h in hits for w, c in h.items() if w in sel) / n,
                "keywords_held_out": sum(c for h in hits for w, c in h.items() if w in held) / n,
                "bleu": sum(bleu(answers[i], refs[i]) for i in have) / max(1, len(have)),
                "rouge_l": sum(rouge_l(answers[i], refs[i]) for i in have) / max(1, len(have)),
                "cider_d": sum(cider) / max(1, len(cider)),
                "words": sum(len(word_list(a)) for a in answers) / n}
    return metric


def run_concept(model, tok, concept, acts, test, setting: Setting, ks, n_random, *, held_out=0.3,
                max_new_tokens=20, generate=generate_configs_shared_prefix, words=None, ppl=None,
                log=print) -> tuple[dict, object]:
    """One concept: ranking on its selection words, the gain sweeps, metrics. Returns (results, ranking).

    words: the concept's word list (default: the built-in list named ``concept``)."""
    words = load_words(words if words is not None else concept)
    selection, held = split_words(words, held_out, seed=0)
    ranking = setting.rank(acts, model, tok, selection)
    ll_ranking = setting.logit_lens(acts, model, tok, selection)
    L, H = ranking.num_layers, ranking.num_heads
    metric = keyword_metric(words, selection, held)
    ppl = ppl or Perplexity(model, tok)
    prompts = [it.prompt for it in test]
    base, rows = sweep(model, tok, test, ranking, ll_ranking, ks, n_random, L, H, alphas=CONTROL_ALPHAS,
                       metric=metric, generate=generate, max_new_tokens=max_new_tokens,
                       keep_answers=True)
    base_texts = rows[0]["answers"]["none"]
    base_ppl = ppl(prompts, base_texts)
    for r in rows:
        r["perplexity"] = {n: ppl(prompts, r["answers"][n]) / base_ppl for n in ("somp", "logit_lens")}
    extra = [a for a in SWEEP_ALPHAS if a not in CONTROL_ALPHAS]
    configs = [uniform_gains(ranking.top(k), a) for a in extra for k in ks]
    answers = generate(model, tok, [it.prompt for it in test], configs, max_new_tokens=max_new_tokens,
                       desc=f"{concept}: gain sweep") if configs else []
    gain_sweep = []
    got = iter(answers)
    for a in extra:
        for k in ks:
            texts = next(got)
            gain_sweep.append({"alpha": a, "k": k, "somp": normalized(metric(texts, test), base),
                               "perplexity": ppl(prompts, texts) / base_ppl})
    for r in rows:  # the control alphas belong to the sweep too
        gain_sweep.append({"alpha": r["alpha"], "k": r["k"], "somp": r["somp"],
                           "perplexity": r["perplexity"]["somp"]})
    gain_sweep.sort(key=lambda g: (g["k"], g["alpha"]))
    k_show = rows[-1]["k"]
    samples = [{"prompt": test[i].prompt, "unedited": base_texts[i],
                **{f"alpha={r['alpha']:g} {n}": r["answers"][n][i] for r in rows if r["k"] == k_show
                   for n in ("somp", "logit_lens", "random0") if n in r["answers"]}}
               for i in range(min(3, len(test)))]
    keys = ("keywords", "keywords_held_out", "bleu", "rouge_l")
    for r in rows:  # bootstrap CIs; index and control ranks for inhibition rows (gain < 1)
        per_item, base_items = per_item_values(metric, r["answers"], test, keys)
        pairs = ({"keywords": ("keywords", "bleu"), "keywords_held_out": ("keywords_held_out", "bleu")}
                 if r["alpha"] < 1 else {})
        r["stats"] = sweep_statistics(per_item, base_items, pairs)
    for r in rows:
        r.pop("answers", None)
        log(f"  {concept:<10} alpha={r['alpha']:+g} k={r['k']:>2} ({r['percent_heads']:.1f}%)  keywords / "
            f"unedited: SOMP {r['somp']['keywords']:.2f} (held-out {r['somp']['keywords_held_out']:.2f}, "
            f"BLEU {r['somp']['bleu']:.2f}, ppl x{r['perplexity']['somp']:.2f}) | LL "
            f"{r['logit_lens']['keywords']:.2f} | random median {r['random']['keywords'][1]:.2f} "
            f"[{r['random']['keywords'][0]:.2f}-{r['random']['keywords'][2]:.2f}]")
    descriptions = describe_top_heads(acts[setting.aggregate], model, tok, ranking,
                                      ranking.top(max(ks))[:8])
    sel_tokens = set(int(i) for i in ranking.support.flatten().tolist() if i >= 0) if ranking.support is not None else set()
    return ({"concept": concept, "n_words": len(words), "selection_words": len(selection),
             "held_out_words": held, "base": base, "base_perplexity": base_ppl, "rows": rows,
             "gain_sweep": gain_sweep, "samples": samples,
             "descriptions": descriptions,
             "support_tokens": len(sel_tokens)}, ranking)


def run_keywords(model, tok, out, *, concepts=CONCEPTS, ks=(3, 8, 16), n_random: int = 10,
                 quick: bool = False, setting: Setting | None = None, n_select: int | None = None,
                 n_test: int | None = None, max_new_tokens: int = 20,
                 generate=generate_configs_shared_prefix, log=print) -> dict:
    """Run the keyword evaluation for ``concepts``; returns the results (files written to ``out``).

    concepts: built-in names, or a mapping name -> word list (e.g. for tests)."""
    from .report import write_task_report
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ks = sorted(set(ks))
    setting = setting or Setting()
    n_select = n_select or (12 if quick else 40)
    n_test = n_test or (6 if quick else 24)
    sel_objs, test_objs = split_items(OBJECTS, n_select, n_test, seed=0)
    word_lists = dict(concepts) if isinstance(concepts, dict) else {c: None for c in concepts}
    concepts = list(word_lists)
    log(f"[keywords 1/{len(concepts) + 1}] {len(sel_objs)} selection objects, {len(test_objs)} test "
        f"objects; setting {setting.key}")
    results = {"task": "keywords", "setting": setting.to_json(), "setting_key": setting.key, "ks": ks,
               "n_random": n_random, "quick": quick, "n_select": len(sel_objs), "n_test": len(test_objs),
               "max_new_tokens": max_new_tokens, "control_alphas": list(CONTROL_ALPHAS),
               "sweep_alphas": list(SWEEP_ALPHAS), "prompts": {}, "concepts": {}}
    rankings = {}
    ppl = Perplexity(model, tok)
    for i, concept in enumerate(concepts, 2):
        template = PROMPTS.get(concept, PROMPT)
        log(f"[keywords {i}/{len(concepts) + 1}] {concept}: \"{template}\"")
        acts = capture_many(model, tok, [TextItem(o, template=template).prompt for o in sel_objs],
                            aggregates=(setting.aggregate,))
        refs = generate(model, tok, [TextItem(o, template=template).prompt for o in test_objs], [None],
                        max_new_tokens=max_new_tokens, desc="unedited")[0]
        test = [TextItem(o, r, template) for o, r in zip(test_objs, refs)]
        res, rankings[concept] = run_concept(model, tok, concept, acts, test, setting, ks, n_random,
                                             max_new_tokens=max_new_tokens, generate=generate,
                                             words=word_lists[concept], ppl=ppl, log=log)
        results["concepts"][concept] = res
        results["prompts"][concept] = template
        results["model"] = acts[setting.aggregate].meta["model"]
    L, H = rankings[concepts[0]].num_layers, rankings[concepts[0]].num_heads
    results.update(num_layers=L, num_heads=H, machine=machine_state(), seconds=round(time.time() - t0, 1))
    write_task_report(out, results, rankings)
    log(f"[keywords] done in {results['seconds']:.0f} s; wrote {out}/results.json, report.md, PNGs")
    return results
