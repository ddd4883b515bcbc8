"""Ranking heads for a concept, describing heads, random control sets (docs/method.md section 4).

Defaults and why:
* ``criterion="l1"``: the paper's selection rule.
* ``normalize=True``: atoms at unit norm, so frequent tokens with large unembedding norms do
  not win on norm alone (docs/method.md section 3, an option).
* ``center=False``: the paper decomposes the raw (token-averaged) writes.
* ``baseline="random"``: the score is the head's concept EVR minus the mean EVR that random
  vocabulary sets of the same size reach on the same head with the same k. A head whose
  writes any large dictionary explains (e.g. early heads of tied-embedding models that
  copy input tokens) scores near 0; a head that prefers the concept's tokens scores high.
  ``baseline="none"`` gives the paper's raw EVR ranking. ``baseline="contrastive"``: the
  concept EVR on the concept's prompts minus the same head's concept EVR on unrelated prompts
  (``contrast=``, activations of the same model with the same aggregate): a head that writes
  the concept's tokens whatever the prompt scores near 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .models.adapters import get_adapter
from .capture import HeadActivations
from .concepts import concept_name, concept_tokens
from .distributed_work import somp_heads_split as somp_heads  # split over torch.distributed ranks
from .pursuit.result import SOMPResult

METHODS = ("somp", "logit_lens")
BASELINES = ("random", "none", "contrastive")


@dataclass
class HeadRanking:
    """Per-head concept scores.

    scores: (layers, heads) float; NaN for heads left out by ``layers``
    raw_evr: (layers, heads) final concept EVR (somp) before the baseline correction
    support: (layers, heads, k) token ids chosen by SOMP (-1 when nothing was left), or None
    """

    scores: torch.Tensor
    concept: str
    method: str
    k: int
    k_requested: int
    num_tokens: int
    options: dict = field(default_factory=dict)
    raw_evr: torch.Tensor | None = None
    support: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_heads(self) -> int:
        return self.scores.shape[1]

    def top(self, n: int) -> list[tuple[int, int]]:
        """The n best (layer, head) pairs, best first (heads left out are never returned)."""
        flat = self.scores.flatten().clone()
        flat[torch.isnan(flat)] = -torch.inf
        n = min(int(n), int(torch.isfinite(flat).sum()))
        idx = torch.argsort(flat, descending=True, stable=True)[:n]
        return [(int(i) // self.num_heads, int(i) % self.num_heads) for i in idx]

    def layer_histogram(self, n: int) -> dict[int, int]:
        """How many of the top n heads sit in each layer."""
        hist: dict[int, int] = {}
        for layer, _ in self.top(n):
            hist[layer] = hist.get(layer, 0) + 1
        return dict(sorted(hist.items()))

    def to_json(self) -> dict:
        def tl(t):
            return None if t is None else torch.nan_to_num(t.float(), nan=float("nan")).tolist()
        return {"concept": self.concept, "method": self.method, "k": self.k,
                "k_requested": self.k_requested, "num_tokens": self.num_tokens,
                "options": self.options, "scores": tl(self.scores), "raw_evr": tl(self.raw_evr),
                "support": None if self.support is None else self.support.tolist(),
                "top": self.top(min(32, self.scores.numel()))}

    @classmethod
    def from_json(cls, data: dict) -> "HeadRanking":
        def tt(x, dtype=torch.float32):
            return None if x is None else torch.tensor(x, dtype=dtype)
        return cls(scores=tt(data["scores"]), concept=data["concept"], method=data["method"],
                   k=data["k"], k_requested=data["k_requested"], num_tokens=data["num_tokens"],
                   options=data.get("options", {}), raw_evr=tt(data.get("raw_evr")),
                   support=tt(data.get("support"), torch.long))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "HeadRanking":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path} is not a HeadRanking JSON file ({err})") from err


def _check_layers(layers, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    layers = sorted({int(l) for l in layers})
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has {num_layers} layers")
    return layers


def _head_batches(acts: HeadActivations, model, layers: list[int]):
    """Yield z (b, n, dh) and w_o (b, dh, d) for the heads of ``layers``, layer-major, a batch
    of heads at a time (``HeadActivations.head_batches``: z bytes bounded, sharded z read lazily)."""
    ad = get_adapter(model)
    if acts.adapter is None:
        acts.bind(model)
    w_all = ad.all_head_w_o(layers)  # (len(layers) * H, dh, d)
    heads = [(l, h) for l in layers for h in range(ad.num_heads)]
    done = 0
    for chunk, z in acts.head_batches(heads):
        yield z, w_all[done:done + len(chunk)]
        done += len(chunk)


def _concat_results(parts: list[SOMPResult]) -> SOMPResult:
    """One SOMPResult from the results of consecutive head batches."""
    if len(parts) == 1:
        return parts[0]
    return SOMPResult(torch.cat([p.support for p in parts]), torch.cat([p.evr for p in parts]),
                      None, parts[0].criterion, parts[0].backend)


def _random_token_sets(vocab: int, size: int, count: int, exclude: torch.Tensor,
                       seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[exclude] = False
    pool = torch.nonzero(allowed).flatten()
    return [pool[torch.randperm(len(pool), generator=gen)[:size]].sort().values for _ in range(count)]


def rank_heads(acts: HeadActivations, model, tokenizer, concept, *, k: int = 50,
               criterion: str = "l1", method: str = "somp", layers: Sequence[int] | None = None,
               normalize: bool = True, center: bool = False, baseline: str = "random",
               n_random: int = 3, seed: int = 0, backend: str = "auto",
               progress: bool = True, contrast: HeadActivations | None = None) -> HeadRanking:
    """Score every head for ``concept`` (built-in name, word list or word-list file).

    method="somp": final EVR of SOMP on the concept dictionary (k capped at its size),
    minus the random-vocabulary baseline when baseline="random" (module docstring).
    method="logit_lens": mean logit of the head's write on the concept tokens.
    layers: restrict to these layers (others get NaN).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {METHODS}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r} is unknown; use one of {BASELINES}")
    if method == "somp" and baseline == "contrastive":
        if contrast is None:
            raise ValueError("baseline='contrastive' needs contrast=: the head activations of "
                             "unrelated prompts (same model, same aggregate)")
        if tuple(contrast.z.shape[1:3]) != tuple(acts.z.shape[1:3]):
            raise ValueError(f"contrast activations have {tuple(contrast.z.shape[1:3])} (layers, "
                             f"heads) but acts have {tuple(acts.z.shape[1:3])}; capture both "
                             "with the same model")
    ad = get_adapter(model)
    layers = _check_layers(layers, ad.num_layers)
    tokens = concept_tokens(tokenizer, concept)
    ids = tokens.ids
    D = ad.unembedding().detach().float()  # (v, d)
    scores = torch.full((ad.num_layers, ad.num_heads), float("nan"))
    k_used = min(int(k), len(ids))
    opts = {"criterion": criterion, "normalize": normalize, "center": center,
            "baseline": baseline if method == "somp" else "none", "layers": layers,
            "aggregate": acts.meta.get("aggregate"), "num_samples": acts.num_samples}
    name = concept_name(concept)
    if method == "logit_lens":
        concept_mean = D[ids].mean(0)  # (d,)
        ll = torch.cat([torch.bmm(z.mean(1, keepdim=True), w_o)[:, 0] @ concept_mean  # (b,)
                        for z, w_o in _head_batches(acts, model, layers)])
        scores[layers] = ll.view(len(layers), ad.num_heads)
        return HeadRanking(scores, name, method, 0, int(k), len(ids), opts)
    rand_dicts = ([D[r] for r in _random_token_sets(D.shape[0], len(ids), n_random, ids, seed)]
                  if baseline == "random" else [])
    parts, bases = [], []
    for z, w_o in _head_batches(acts, model, layers):  # (b, n, dh), (b, dh, d)
        parts.append(somp_heads(z, w_o, D[ids], k_used, criterion=criterion, normalize=normalize,
                                center=center, backend=backend, progress=progress))
        base = torch.zeros(len(z))
        for rand_dict in rand_dicts:
            r = somp_heads(z, w_o, rand_dict, k_used, criterion=criterion, normalize=normalize,
                           center=center, backend=backend, progress=False)
            base += r.final_evr.float() / n_random
        bases.append(base)
    res = _concat_results(parts)
    raw = torch.full_like(scores, float("nan"))
    raw[layers] = res.final_evr.float().view(len(layers), ad.num_heads)
    support = torch.full((ad.num_layers, ad.num_heads, k_used), -1, dtype=torch.long)
    sup = res.support.view(len(layers), ad.num_heads, k_used)
    support[layers] = torch.where(sup >= 0, ids[sup.clamp_min(0)], sup)
    scores = raw.clone()
    if baseline == "random":
        scores[layers] = raw[layers] - torch.cat(bases).view(len(layers), ad.num_heads)
        opts["n_random"] = n_random
        opts["seed"] = seed
    if baseline == "contrastive":  # the same dictionary on the unrelated prompts' writes
        other = torch.cat([somp_heads(z, w_o, D[ids], k_used, criterion=criterion,
                                      normalize=normalize, center=center, backend=backend,
                                      progress=False).final_evr.float()
                           for z, w_o in _head_batches(contrast, model, layers)])
        scores[layers] = raw[layers] - other.view(len(layers), ad.num_heads)
        opts["contrast_samples"] = contrast.num_samples
    return HeadRanking(scores, name, method, k_used, int(k), len(ids), opts, raw, support)


def describe_heads(acts: HeadActivations, model, tokenizer, heads, k: int = 5, *,
                   criterion: str = "l1", normalize: bool = True, center: bool = False,
                   backend: str = "auto") -> dict[tuple[int, int], list[str]]:
    """Top-k tokens each head writes, from SOMP on the full vocabulary (paper's Table 1)."""
    ad = get_adapter(model)
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        return {}
    for l, h in heads:
        ad._check_head(l, h)
    if acts.adapter is None:
        acts.bind(model)
    D = ad.unembedding().detach().float()
    parts = []
    for chunk, z in acts.head_batches(heads):  # z (b, n, dh)
        w_o = torch.stack([w.to(D.device) for w in ad.heads_w_o(chunk)])  # (b, dh, d)
        parts.append(somp_heads(z, w_o, D, k, criterion=criterion, normalize=normalize,
                                center=center, backend=backend))
    res = _concat_results(parts)
    return {hd: [tokenizer.decode([int(t)]) for t in res.support[i] if t >= 0]
            for i, hd in enumerate(heads)}


def vocabulary_pursuit(acts: HeadActivations, model, k: int, *, layers: Sequence[int] | None = None,
                       criterion: str = "l1", normalize: bool = True, center: bool = False,
                       backend: str = "auto", progress: bool = False):
    """SOMP of every head of ``layers`` (default all) on the full unembedding.

    The inputs of ``describe_heads``, batched: returns the ``SOMPResult`` with support and
    evr (len(layers) * H, k), heads layer-major (row ``i`` is layer ``layers[i // H]``,
    head ``i % H``); support holds vocabulary ids (-1 when nothing was left).
    """
    ad = get_adapter(model)
    layers = _check_layers(layers, ad.num_layers)
    D = ad.unembedding().detach().float()  # (v, d)
    return _concat_results([somp_heads(z, w_o, D, k, criterion=criterion, normalize=normalize,
                                       center=center, backend=backend, progress=progress)
                            for z, w_o in _head_batches(acts, model, layers)])


def logit_lens_ids(acts: HeadActivations, model, heads, k: int = 5) -> dict:
    """Aggregated Logit Lens: (l, h) -> ids of the top-k tokens of the head's mean write.

    The heads' mean writes go through the unembedding in one product per 256 heads (reading
    the (v, d) unembedding once rather than once per head); z is read a batch of heads at a
    time (``HeadActivations.head_batches``)."""
    ad = get_adapter(model)
    heads = [(int(l), int(h)) for l, h in heads]
    D = ad.unembedding().detach().float()  # (v, d)
    means = (torch.cat([z.mean(1) for _, z in acts.head_batches(heads)]).to(D.device)
             if heads else None)  # (B, dh)
    out = {}
    for start in range(0, len(heads), 256):
        chunk = heads[start:start + 256]
        writes = torch.stack([means[start + j] @ w.to(D.device)  # each layer's W_O read once
                              for j, w in enumerate(ad.heads_w_o(chunk))])  # (c, d)
        top = torch.topk(writes @ D.T, k, dim=1).indices  # (c, k)
        out.update({hd: [int(t) for t in row] for hd, row in zip(chunk, top)})
    return out


def logit_lens_tokens(acts: HeadActivations, model, tokenizer, heads, k: int = 5):
    """Aggregated Logit Lens: top-k tokens of each head's mean write (the paper's baseline)."""
    return {hd: [tokenizer.decode([t]) for t in ids]
            for hd, ids in logit_lens_ids(acts, model, heads, k).items()}


def random_control(selected, num_layers: int, num_heads: int, n_sets: int = 10,
                   seed: int = 0) -> list[list[tuple[int, int]]]:
    """Random head sets matching ``selected``'s size and per-layer counts, disjoint from it.

    Fallback when a layer has fewer free heads than it needs: the shortfall is drawn from
    the nearest layers (by distance, lower layer first on ties) that still have free heads.
    If the whole model has fewer free heads than needed, each set is all free heads.
    Never raises for lack of heads; never overlaps ``selected``; no duplicates in a set.
    """
    selected = {(int(l), int(h)) for l, h in selected}
    for l, h in selected:
        if not (0 <= l < num_layers and 0 <= h < num_heads):
            raise ValueError(f"selected head ({l}, {h}) is outside {num_layers} x {num_heads}")
    need = [0] * num_layers
    for l, _ in selected:
        need[l] += 1
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        free = {l: [h for h in torch.randperm(num_heads, generator=gen).tolist()
                    if (l, h) not in selected] for l in range(num_layers)}
        chosen: list[tuple[int, int]] = []
        short = 0
        for l in range(num_layers):
            take = min(need[l], len(free[l]))
            chosen += [(l, free[l].pop()) for _ in range(take)]
            short += need[l] - take
        if short:
            chosen += _fill_shortfall(need, free, short)
        sets.append(sorted(chosen))
    return sets


def _fill_shortfall(need: list[int], free: dict, short: int) -> list[tuple[int, int]]:
    """Take ``short`` heads from the layers nearest to those that ran out."""
    out = []
    lacking = [l for l, c in enumerate(need) if c and not free[l]]
    order = sorted(free, key=lambda o: (min(abs(o - l) for l in lacking), o))
    for other in order:
        while short and free[other]:
            out.append((other, free[other].pop()))
            short -= 1
    return out
