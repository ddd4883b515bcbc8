"""Pieces every task shares: selection settings, word-list splits, perplexity, machine state.

The sweep itself (SOMP / logit lens / layer-matched random sets at each k and gain, in one
batched generation, normalized to the unedited model) is ``hp_fast.demo.sweep``; the tasks call
it with their own metric and with ``generate_configs_shared_prefix``.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from ..capture import format_prompts
from ..generation import output_cache
from ..ranking import HeadRanking, rank_heads

Metric = Callable[[list[str], list], dict]


@dataclass(frozen=True)
class Setting:
    """One documented way to rank heads (method.md §3-4)."""

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


def normalized(values: dict, base: dict) -> dict:
    """values / base per key (NaN where the base is 0)."""
    return {k: (v / base[k] if base.get(k) else float("nan")) for k, v in values.items()}


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
        from .prefix import shared_prefix_length
        tok, model = self.tok, self.model
        formatted, used = format_prompts(tok, prompts, self.chat_template)
        p_ids = [list(tok(p, add_special_tokens=not used)["input_ids"]) for p in formatted]
        c_ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        P = shared_prefix_length(p_ids)
        device = next(model.parameters()).device
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
