"""VLM tasks: image classification and captioning under head edits (docs/method.md §5, §6).

The protocol is the text tasks' (``protocol.py``):

1. Split the images into a selection part (heads are ranked on it) and an evaluation part
   (edits are scored on it); for classification the split is stratified by class.
2. ``capture_images`` on the selection images with the task prompt, ``aggregate="image"``
   (each head's output averaged over the image-patch tokens, the paper's choice for VLMs).
3. Rank heads with SOMP (``rank_heads``, method "somp") on the concept dictionary (the class
   names for ``classify``; the colors / sentiments / numbers word lists for ``caption``) and
   with the Logit Lens baseline (method "logit_lens").
4. For each k: SOMP's top k, Logit Lens's top k and ``n_random`` random sets with SOMP's
   per-layer counts, disjoint from it, all at gain ``alpha`` (-1 inverts the heads): the
   protocol's ``edit_plan``; every configuration is generated in shared batches (per-row
   gains), ``sweep_rows`` turns the scores into the protocol's rows.
5. Scores normalized to the unedited model: exact-match accuracy (classify); the concept's
   keyword count and CIDEr-D against the reference captions (caption). Random sets are
   reported as [q1, median, q3].

With several classification datasets, ``classify_many`` also reports the Jaccard overlap of
the heads selected for each pair (the paper's Figure 4).
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Mapping, Sequence

from ..models.adapters import get_adapter
from ..concepts import concept_name, load_words
from ..data.images import ImageDataset
from .metrics import cider_d, count_keywords, exact_match
from .protocol import edit_plan, plan_configs, sweep_rows, write_json
from ..ranking import rank_heads
from ..capture_images import capture_images
from ..generation import generate_images

CLASSIFY_PROMPT = ("What {object} is depicted in this image? Answer EXACTLY with one of the "
                   "following class names only: {classes}. Answer:")
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
CAPTION_CONCEPTS = ("colors", "sentiments", "numbers")  # the paper's colors/sentiments/quantity


def classify_prompt(object_name: str, classes: Sequence[str]) -> str:
    """The paper's classification prompt (Table 4)."""
    return CLASSIFY_PROMPT.format(object=object_name, classes=", ".join(classes))


def split_indices(dataset: ImageDataset, select_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(selection, evaluation) indices; stratified by label when the dataset has labels."""
    if not 0 < select_fraction < 1:
        raise ValueError(f"select_fraction={select_fraction} must be between 0 and 1")
    rng = random.Random(seed)
    groups: dict = {}
    for i in range(len(dataset)):
        groups.setdefault(dataset.labels[i] if dataset.labels else None, []).append(i)
    sel, ev = [], []
    for idx in groups.values():
        rng.shuffle(idx)
        cut = min(len(idx) - 1, max(1, round(len(idx) * select_fraction)))
        sel += sorted(idx[:cut])
        ev += sorted(idx[cut:])
    if not sel or not ev:
        raise ValueError(f"{len(dataset)} images are too few to split into selection and evaluation "
                         "parts; give at least two images (per class)")
    return sorted(sel), sorted(ev)


def jaccard(a, b) -> float:
    """|A & B| / |A | B| of two head sets (1.0 for two empty sets)."""
    a, b = {tuple(h) for h in a}, {tuple(h) for h in b}
    return len(a & b) / len(a | b) if a | b else 1.0


def head_overlap(selections: Mapping[str, Sequence]) -> dict[str, float]:
    """Jaccard overlap of every pair of named head selections: {"a|b": J}."""
    names = list(selections)
    return {f"{x}|{y}": jaccard(selections[x], selections[y])
            for i, x in enumerate(names) for y in names[i + 1:]}


def _write(out, report: dict) -> None:
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)


def run_classify(model, processor, dataset: ImageDataset, *, object_name: str = "digit",
                 ks: Sequence[int] = (8, 16, 32), alpha: float = -1.0, n_random: int = 10,
                 k_somp: int = 50, baseline: str = "random", positions: str = "all",
                 select_fraction: float = 0.5, batch_size: int = 8, max_new_tokens: int = 8,
                 seed: int = 0, out=None, log=print, progress: bool = False) -> dict:
    """Classification accuracy under edits of the heads specialized in the class names.

    dataset: labelled images (``load_image_folder`` class folders, ``digits_dataset``).
    object_name: the prompt's "{object}" ("digit", "traffic sign", "texture", ...).
    Returns (and writes to out/results.json) the unedited accuracy and, per k, the accuracy
    normalized to it for SOMP, logit lens and the random sets.
    """
    if not dataset.labels or not dataset.classes:
        raise ValueError("classify needs labelled images (class subfolders or digits_dataset)")
    t0 = time.time()
    tok = processor.tokenizer
    ad = get_adapter(model)
    L, H = ad.num_layers, ad.num_heads
    ks = sorted({int(k) for k in ks})
    prompt = classify_prompt(object_name, dataset.classes)
    sel, ev = split_indices(dataset, select_fraction, seed)
    log(f"[classify] {len(dataset.classes)} classes; {len(sel)} images to select heads, "
        f"{len(ev)} to evaluate")
    acts = capture_images(model, processor, [dataset.images[i] for i in sel], prompt,
                          aggregate="image", batch_size=batch_size, progress=progress)
    concept = list(dataset.classes)
    somp = rank_heads(acts, model, tok, concept, k=k_somp, baseline=baseline, progress=progress)
    ll = rank_heads(acts, model, tok, concept, method="logit_lens", progress=progress)
    plan = edit_plan(somp, ll, ks, n_random, L, H, alphas=(alpha,))
    configs = [None] + plan_configs(plan)
    answers = generate_images(model, processor, [dataset.images[i] for i in ev], prompt,
                              configs=configs, positions=positions, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress)
    golds = [dataset.labels[i] for i in ev]
    accs = [{"accuracy": sum(exact_match(a, g) for a, g in zip(ans, golds)) / len(golds)}
            for ans in answers]
    base = accs[0]["accuracy"]
    rows = sweep_rows(plan, accs[0], accs[1:], L, H)
    for r in rows:
        q = r["random"]["accuracy"]
        log(f"  k={r['k']:>2}  normalized accuracy: SOMP {r['somp']['accuracy']:.2f} | logit lens "
            f"{r['logit_lens']['accuracy']:.2f} | random median {q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]")
    report = {"task": "classify", "model": acts.meta["model"], "prompt": prompt,
              "classes": dataset.classes, "concept_tokens": somp.num_tokens, "alpha": alpha,
              "positions": positions, "ks": ks, "n_random": n_random, "n_select": len(sel),
              "n_eval": len(ev), "base_accuracy": base, "results": rows,
              "somp_top": somp.top(max(ks)), "logit_lens_top": ll.top(max(ks)),
              "unedited_answers": answers[0], "seconds": round(time.time() - t0, 1)}
    _write(out, report)
    return report


def classify_many(model, processor, datasets: Mapping[str, tuple[ImageDataset, str]], *,
                  out=None, log=print, **kw) -> dict:
    """``run_classify`` on each {name: (dataset, object_name)} plus the Jaccard overlap of
    the SOMP heads selected at each k between every pair of datasets (paper's Figure 4)."""
    reports = {}
    for name, (ds, obj) in datasets.items():
        log(f"[classify] dataset {name}")
        reports[name] = run_classify(model, processor, ds, object_name=obj, log=log,
                                     out=None if out is None else Path(out) / name, **kw)
    ks = next(iter(reports.values()))["ks"] if reports else []
    overlap = {k: head_overlap({n: next(r["heads"] for r in rep["results"] if r["k"] == k)
                                for n, rep in reports.items()}) for k in ks}
    summary = {"datasets": reports, "jaccard": overlap}
    _write(out, summary)
    return summary


def run_caption(model, processor, dataset: ImageDataset, *,
                concepts: Sequence = CAPTION_CONCEPTS, ks: Sequence[int] = (16,),
                alpha: float = -1.0, n_random: int = 10, k_somp: int = 50,
                baseline: str = "random", positions: str = "all", select_fraction: float = 0.5,
                prompt: str = CAPTION_PROMPT, batch_size: int = 8, max_new_tokens: int = 30,
                seed: int = 0, out=None, log=print, progress: bool = False) -> dict:
    """Captions under edits of heads specialized in each concept (colors, sentiments, ...).

    dataset: images with reference captions (``load_image_folder`` on a captions file).
    For each concept and k: the concept's keyword count in the generated captions and their
    CIDEr-D against the references, both normalized to the unedited captions. alpha=-1
    inhibits the concept, alpha=5 enhances it (paper: 5 on 32 heads).
    """
    if not dataset.captions:
        raise ValueError("caption needs reference captions (a captions.json / captions.csv file)")
    t0 = time.time()
    tok = processor.tokenizer
    ad = get_adapter(model)
    L, H = ad.num_layers, ad.num_heads
    ks = sorted({int(k) for k in ks})
    sel, ev = split_indices(dataset, select_fraction, seed)
    log(f"[caption] {len(sel)} images to select heads, {len(ev)} to evaluate; concepts "
        f"{[concept_name(c) for c in concepts]}")
    acts = capture_images(model, processor, [dataset.images[i] for i in sel], prompt,
                          aggregate="image", batch_size=batch_size, progress=progress)
    plan, configs = [], [None]
    for concept in concepts:
        somp = rank_heads(acts, model, tok, concept, k=k_somp, baseline=baseline, progress=progress)
        ll = rank_heads(acts, model, tok, concept, method="logit_lens", progress=progress)
        sets = edit_plan(somp, ll, ks, n_random, L, H, alphas=(alpha,))
        plan.append((concept, somp, sets))
        configs += plan_configs(sets)
    captions = generate_images(model, processor, [dataset.images[i] for i in ev], prompt,
                               configs=configs, positions=positions, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress)
    refs = [dataset.captions[i] for i in ev]
    base_caps = captions[0]
    base_cider = cider_d(base_caps, refs)
    results, at = {}, 1
    for concept, somp, sets in plan:
        name = concept_name(concept)
        words = load_words(concept)
        base_count = sum(count_keywords(c, words) for c in base_caps)
        base = {"keywords": base_count, "cider": base_cider}
        values = [{"keywords": sum(count_keywords(c, words) for c in caps), "cider": cider_d(caps, refs)}
                  for caps in captions[at:at + len(sets)]]
        at += len(sets)
        rows = sweep_rows(sets, base, values, L, H)
        results[name] = {"base_keyword_count": base_count, "concept_tokens": somp.num_tokens,
                         "results": rows}
        for r in rows:
            q = r["random"]["keywords"]
            log(f"  {name:<10} k={r['k']:>2}  keywords: SOMP {r['somp']['keywords']:.2f} (CIDEr "
                f"{r['somp']['cider']:.2f}) | logit lens {r['logit_lens']['keywords']:.2f} | random "
                f"median {q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]")
    report = {"task": "caption", "model": acts.meta["model"], "prompt": prompt, "alpha": alpha,
              "positions": positions, "ks": ks, "n_random": n_random, "n_select": len(sel),
              "n_eval": len(ev), "base_cider": base_cider, "concepts": results,
              "unedited_captions": base_caps, "seconds": round(time.time() - t0, 1)}
    _write(out, report)
    return report


__all__ = ["CLASSIFY_PROMPT", "CAPTION_PROMPT", "CAPTION_CONCEPTS", "classify_prompt",
           "split_indices", "jaccard", "head_overlap", "run_classify", "classify_many",
           "run_caption"]
