"""The evaluation protocol every task follows (docs/method.md §6), in one place.

- ``Setting``: one documented way to rank heads; ``CHOICES`` / ``choose_setting``: the
  settings compared on validation and the most specific one; ``probe_settings``: the
  comparison itself (top ``k_probe`` of each ranking inverted, one batched generation).
- ``split_words`` / ``split_items``: seeded selection / held-out splits; ``known_items``: the
  evaluation pool cut down to what the unedited model gets right, as validation and test.
- ``sweep`` (from ``sweep.py``, with ``edit_plan`` / ``sweep_rows`` / ``normalized`` /
  ``quartiles``): SOMP / Logit Lens / layer-matched random sets at each k and gain, one
  batched generation, normalized to the unedited model.
- ``describe_top_heads``: what the selected heads write, in the one shape results.json uses.
- ``Perplexity``, ``set_threads``, ``machine_state``, ``write_json`` (atomic).

The tasks (``qa``, ``keywords``, ``toxicity``, ``vlm``, ``demo``) import from here only.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..capture import format_prompts
from ..edits import uniform_gains
from ..generation.configs import generate_configs
from ..generation.loop import output_cache
from ..models.devices import input_device
from ..ranking import HeadRanking, describe_heads, logit_lens_tokens, rank_heads
from .sweep import EditSet, Metric, edit_plan, normalized, plan_configs, quartiles, sweep, sweep_rows

# (aggregate, baseline, first layer): the selection settings compared on validation. The
# random baseline is the default of rank_heads; "first layer 2" is the hand-made filter that
# skips the embedding-adjacent layers, shown for comparison.
CHOICES = [("mean", "none", 0), ("mean", "random", 0), ("last", "none", 0), ("last", "random", 0),
           ("mean", "none", 2), ("last", "none", 2)]


@dataclass(frozen=True)
class Setting:
    """One documented way to rank heads (docs/method.md §3-4)."""

    aggregate: str = "mean"      # token mean of the prompt ("mean") or its last token ("last")
    baseline: str = "random"     # score = EVR - random-vocabulary EVR ("random") or raw EVR ("none")
    criterion: str = "l1"        # SOMP selection rule: l1 (paper), l2, ormp (SPAMS)
    layers: tuple[int, ...] | None = None  # only these layers (None: all)

    @property
    def key(self) -> str:
        s = f"aggregate={self.aggregate}, baseline={self.baseline}, criterion={self.criterion}"
        if self.layers is not None:
            s += f", layers={self.layers[0]}-{self.layers[-1]}"
        return s

    def rank(self, acts: dict, model, tok, concept) -> HeadRanking:
        """SOMP ranking under this setting (``acts``: ``capture_many``'s dict by aggregate)."""
        return rank_heads(acts[self.aggregate], model, tok, concept, criterion=self.criterion,
                          baseline=self.baseline, layers=self.layers, progress=False)

    def logit_lens(self, acts: dict, model, tok, concept) -> HeadRanking:
        """The Logit-Lens baseline ranking on the same activations and layers."""
        return rank_heads(acts[self.aggregate], model, tok, concept, method="logit_lens",
                          layers=self.layers, progress=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


def set_threads(threads: int | str = "auto") -> dict:
    """Pick torch's CPU thread count; return what was chosen and the load it saw.

    "auto": 1 thread when the 1-minute load average is at least the core count, else torch's
    default. On a shared 2-core machine, two threads that each wait for the other at every
    small op (OpenMP barriers) made one decode step 20x slower (10.7 s vs 0.5 s for a batch of
    64 on SmolLM2 at load ~6); one thread never waits.
    """
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads == "auto":
        n = 1 if load >= cores else torch.get_num_threads()
    else:
        n = int(threads)
        if n < 1:
            raise ValueError(f"--threads {threads!r}: give a positive count or 'auto'")
    torch.set_num_threads(n)
    return {"threads": n, "cores": cores, "load_1min_at_start": round(load, 2)}


def machine_state() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"load_avg_1_5_15": [round(x, 2) for x in load], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def split_words(words: Sequence[str], held_out: float = 0.3, seed: int = 0) -> tuple[list[str], list[str]]:
    """(selection words, held-out words): a seeded random ``held_out`` fraction is kept apart."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out={held_out}: give a fraction strictly between 0 and 1")
    words = list(dict.fromkeys(words))
    if len(words) < 2:
        raise ValueError(f"need at least 2 words to hold some out, got {len(words)}")
    order = list(range(len(words)))
    random.Random(seed).shuffle(order)
    n_held = min(len(words) - 1, max(1, round(held_out * len(words))))
    held = {words[i] for i in order[:n_held]}
    return [w for w in words if w not in held], [w for w in words if w in held]


def split_items(items: Sequence, n_select: int, n_test: int, seed: int = 0) -> tuple[list, list]:
    """Disjoint (selection, test) lists drawn from ``items`` with a seeded shuffle."""
    items = list(items)
    if n_select + n_test > len(items):
        raise ValueError(f"asked for {n_select} selection + {n_test} test items but only "
                         f"{len(items)} exist; lower the counts")
    random.Random(seed).shuffle(items)
    return items[:n_select], items[n_select:n_select + n_test]


def setting_key(choice) -> str:
    """The name of a ``CHOICES`` entry (aggregate, baseline, first layer) in results and logs."""
    agg, baseline, first = choice
    return f"aggregate={agg}, baseline={baseline}" + (f", layers>={first}" if first else "")


def choice_setting(choice, num_layers: int) -> Setting:
    """The ``Setting`` of a ``CHOICES`` entry (criterion l1; layers from its first layer on)."""
    agg, baseline, first = choice
    return Setting(agg, baseline, "l1", tuple(range(first, num_layers)) if first else None)


def evaluate(model, tok, items, configs, metric: Metric, *, generate=generate_configs,
             max_new_tokens: int = 10, desc: str = "evaluate") -> list[dict]:
    """metric(answers, items) for each gain configuration (None = unedited), one batched run."""
    answers = generate(model, tok, [q.prompt for q in items], configs,
                       max_new_tokens=max_new_tokens, desc=desc)
    return [metric(a, items) for a in answers]


def known_items(model, tok, pool, n_val: int, n_test: int, *, kinds: Sequence[str],
                correct: Callable, metric: Metric, generate=generate_configs,
                max_new_tokens: int = 10) -> tuple[list, list, dict]:
    """(validation, test, unedited metric on the pool): the pool items the unedited model gets
    right (``correct(answer, item)``), the first ``n_val`` of each kind for validation and the
    next ``n_test`` for test, so a normalized score reads as "share of known answers kept".
    A ValueError when some kind has no test item left."""
    answers = generate(model, tok, [q.prompt for q in pool], [None], max_new_tokens=max_new_tokens,
                       desc="unedited answers")[0]
    ok = [q for q, a in zip(pool, answers) if correct(a, q)]
    base = metric(answers, pool)
    by_kind = {kind: [q for q in ok if q.kind == kind] for kind in kinds}
    val = [q for kind in kinds for q in by_kind[kind][:n_val]]
    test = [q for kind in kinds for q in by_kind[kind][n_val:n_val + n_test]]
    if not all(any(q.kind == kind for q in test) for kind in kinds):
        raise ValueError(f"the model answered too few pool questions correctly ({base}) to "
                         "measure what an edit removes; use a model that knows some answers")
    return val, test, base


def probe_settings(model, tok, acts: dict, val, settings: dict, k_probe: int, *, concept,
                   metric: Metric, generate=generate_configs, target: str = "country",
                   other: str = "other", desc: str = "choose setting", log=print,
                   width: int = 46) -> tuple[dict, dict]:
    """Rank under each of ``settings`` ({key: Setting}) and invert each ranking's top
    ``k_probe`` on the validation items (one batched run).

    Returns (rankings {key: HeadRanking}, evidence {key: {target, other: metric / unedited,
    "specificity": other - target, "layers_of_top"}}).
    """
    rankings = {key: s.rank(acts, model, tok, concept) for key, s in settings.items()}
    configs = [None] + [uniform_gains(r.top(k_probe), -1.0) for r in rankings.values()]
    accs = evaluate(model, tok, val, configs, metric, generate=generate, desc=desc)
    evidence = {}
    for key, acc in zip(rankings, accs[1:]):
        norm = normalized(acc, accs[0])
        evidence[key] = {target: norm[target], other: norm[other],
                         "specificity": norm[other] - norm[target],
                         "layers_of_top": rankings[key].layer_histogram(k_probe)}
        log(f"  {key:<{width}} top-{k_probe} inverted: {target} {norm[target]:.2f}, {other} "
            f"{norm[other]:.2f}; layers {evidence[key]['layers_of_top']}")
    return rankings, evidence


def choose_setting(model, tok, acts: dict, val, k_probe: int, log=print, *, concept,
                   metric: Metric, generate=generate_configs, target: str = "country",
                   other: str = "other", choices=CHOICES):
    """The most specific of ``choices`` on validation: (choice, its ranking, evidence by
    ``setting_key``). Most specific = largest other-minus-target score after inverting the top
    ``k_probe``; on a tie, the one that keeps more of the other items."""
    num_layers = next(iter(acts.values())).z.shape[1]
    settings = {setting_key(c): choice_setting(c, num_layers) for c in choices}
    rankings, evidence = probe_settings(model, tok, acts, val, settings, k_probe, concept=concept,
                                        metric=metric, generate=generate, target=target,
                                        other=other, log=log)
    best = max(choices, key=lambda c: (round(evidence[setting_key(c)]["specificity"], 6),
                                       evidence[setting_key(c)][other]))
    return best, rankings[setting_key(best)], evidence


def describe_top_heads(acts, model, tok, ranking: HeadRanking, heads, *, k: int = 5,
                       log=None) -> list[dict]:
    """What the selected heads write (paper's Tables 1 and 6), one dict per head:
    layer, head, score, "somp" (SOMP's top tokens on the full vocabulary), "logit_lens"
    (aggregated Logit Lens), "somp_concept" (SOMP's first atoms in the concept dictionary)."""
    desc = describe_heads(acts, model, tok, heads, k=k)
    lens = logit_lens_tokens(acts, model, tok, heads, k=k)
    rows = []
    for l, h in heads:
        atoms = ranking.support[l, h][:k] if ranking.support is not None else []
        rows.append({"layer": l, "head": h, "score": float(ranking.scores[l, h]),
                     "somp": desc[(l, h)], "logit_lens": lens[(l, h)],
                     "somp_concept": [tok.decode([int(t)]) for t in atoms if t >= 0]})
        if log is not None:
            log(f"  L{l:>2} H{h}  score {rows[-1]['score']:+.3f}  SOMP {rows[-1]['somp']} | "
                f"LL {rows[-1]['logit_lens']}")
    return rows


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


class Perplexity:
    """Perplexity of texts as continuations of their prompts under the model as it is now.

    Every (prompt, text) pair is scored once and remembered, so configurations whose
    generations repeat the unedited ones cost nothing; the prompts' shared prefix (chat
    template's system turn, instruction) is encoded once.
    """

    def __init__(self, model, tok, *, batch_size: int = 32, chat_template: bool | None = None):
        self.model, self.tok, self.batch_size, self.chat_template = model, tok, batch_size, chat_template
        self.memo: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> float:
        """exp(total NLL / total tokens) over the non-empty texts (NaN if all are empty)."""
        todo = list(dict.fromkeys((p, t) for p, t in zip(prompts, texts)
                                  if t and (p, t) not in self.memo))
        if todo:
            for pair, score in zip(todo, self._score([p for p, _ in todo], [t for _, t in todo])):
                self.memo[pair] = score
        scored = [self.memo[(p, t)] for p, t in zip(prompts, texts) if t and self.memo[(p, t)][1]]
        n = sum(c for _, c in scored)
        return float(torch.exp(torch.tensor(sum(s for s, _ in scored) / n))) if n else float("nan")

    @torch.no_grad()
    def _score(self, prompts: list[str], texts: list[str]) -> list[tuple[float, int]]:
        from ..generation.prefix import shared_prefix_length
        tok, model = self.tok, self.model
        formatted, used = format_prompts(tok, prompts, self.chat_template)
        p_ids = [list(tok(p, add_special_tokens=not used)["input_ids"]) for p in formatted]
        c_ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        P = shared_prefix_length(p_ids)
        device = input_device(model)
        prefix_kv = None
        if P:
            from transformers import DynamicCache
            cache = output_cache(model(input_ids=torch.tensor([p_ids[0][:P]], device=device),
                                       use_cache=True))
            if type(cache) is DynamicCache and all(hasattr(l, "keys") for l in cache.layers):
                prefix_kv = [(l.keys, l.values) for l in cache.layers]
            else:
                P = 0
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(p_ids[i]) + len(c_ids[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = [i for i in order[start:start + self.batch_size] if c_ids[i]]
            if not chunk:
                continue
            rest = [p_ids[i][P:] + c_ids[i] for i in chunk]  # prompt tail + continuation
            T = max(len(r) for r in rest)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long, device=device)
            mask = torch.zeros((len(chunk), P + T), dtype=torch.long, device=device)
            mask[:, :P] = 1
            target = torch.full_like(ids, -100)  # target[t]: the token predicted at position t
            for r, i in enumerate(chunk):
                n_p = len(p_ids[i]) - P
                ids[r, :len(rest[r])] = torch.tensor(rest[r], device=device)
                mask[r, P:P + len(rest[r])] = 1
                target[r, n_p - 1:len(rest[r]) - 1] = torch.tensor(c_ids[i], device=device)
            kw = {}
            if prefix_kv is not None:
                from transformers import DynamicCache
                cache = DynamicCache()
                for layer, (k, v) in enumerate(prefix_kv):
                    cache.update(k.expand(len(chunk), -1, -1, -1).contiguous(),
                                 v.expand(len(chunk), -1, -1, -1).contiguous(), layer)
                kw["cache"] = cache
            logits = model(input_ids=ids, attention_mask=mask, **kw).logits.float()  # (B, T, v)
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                                    ignore_index=-100, reduction="none").view(ids.shape)
            for r, i in enumerate(chunk):
                out[i] = (float(nll[r].sum()), int((target[r] != -100).sum()))
        return out


__all__ = ["Setting", "CHOICES", "setting_key", "choice_setting", "set_threads", "machine_state",
           "split_words", "split_items", "evaluate", "known_items", "probe_settings",
           "choose_setting", "describe_top_heads", "write_json", "Perplexity", "Metric",
           "EditSet", "edit_plan", "plan_configs", "sweep_rows", "sweep", "normalized", "quartiles"]
