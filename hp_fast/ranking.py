"""Ranking heads for a concept, describing heads, random control sets (method.md §4).

Defaults and why:
* ``criterion="l1"``: the paper's selection rule.
* ``normalize=True``: atoms at unit norm, so frequent tokens with large unembedding norms do
  not win on norm alone (method.md §3 option).
* ``center=False``: the paper decomposes the raw (token-averaged) writes.
* ``baseline="random"``: the score is the head's concept EVR minus the mean EVR that random
  vocabulary sets of the same size reach on the same head with the same k. A head whose
  writes any large dictionary explains (e.g. early heads of tied-embedding models that
  copy input tokens) scores near 0; a head that prefers the concept's tokens scores high.
  ``baseline="none"`` gives the paper's raw EVR ranking.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .adapters import get_adapter
from .capture import HeadActivations
from .concepts import concept_name, concept_tokens
from .pursuit import somp_heads

METHODS = ("somp", "logit_lens")
BASELINES = ("random", "none")


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


def _head_tensors(acts: HeadActivations, model, layers: list[int]):
    """z (B, n, dh) and w_o (B, dh, d) for the heads of ``layers``, layer-major."""
    ad = get_adapter(model)
    if acts.adapter is None:
        acts.bind(model)
    z = acts.z[:, layers].permute(1, 2, 0, 3).reshape(-1, acts.num_samples, ad.head_dim)
    return z, ad.all_head_w_o(layers)


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
               progress: bool = True) -> HeadRanking:
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
    ad = get_adapter(model)
    layers = _check_layers(layers, ad.num_layers)
    tokens = concept_tokens(tokenizer, concept)
    ids = tokens.ids
    D = ad.unembedding().detach().float()  # (v, d)
    z, w_o = _head_tensors(acts, model, layers)  # (B, n, dh), (B, dh, d)
    scores = torch.full((ad.num_layers, ad.num_heads), float("nan"))
    k_used = min(int(k), len(ids))
    opts = {"criterion": criterion, "normalize": normalize, "center": center,
            "baseline": baseline if method == "somp" else "none", "layers": layers,
            "aggregate": acts.meta.get("aggregate"), "num_samples": acts.num_samples}
    name = concept_name(concept)
    if method == "logit_lens":
        mean_write = torch.bmm(z.mean(1, keepdim=True), w_o)[:, 0]  # (B, d)
        ll = mean_write @ D[ids].mean(0)  # (B,) mean logit over concept tokens
        scores[layers] = ll.view(len(layers), ad.num_heads)
        return HeadRanking(scores, name, method, 0, int(k), len(ids), opts)
    res = somp_heads(z, w_o, D[ids], k_used, criterion=criterion, normalize=normalize,
                     center=center, backend=backend, progress=progress)
    raw = torch.full_like(scores, float("nan"))
    raw[layers] = res.final_evr.float().view(len(layers), ad.num_heads)
    support = torch.full((ad.num_layers, ad.num_heads, k_used), -1, dtype=torch.long)
    sup = res.support.view(len(layers), ad.num_heads, k_used)
    support[layers] = torch.where(sup >= 0, ids[sup.clamp_min(0)], sup)
    scores = raw.clone()
    if baseline == "random":
        base = torch.zeros(len(layers) * ad.num_heads)
        for rand_ids in _random_token_sets(D.shape[0], len(ids), n_random, ids, seed):
            r = somp_heads(z, w_o, D[rand_ids], k_used, criterion=criterion, normalize=normalize,
                           center=center, backend=backend, progress=False)
            base += r.final_evr.float() / n_random
        scores[layers] = raw[layers] - base.view(len(layers), ad.num_heads)
        opts["n_random"] = n_random
        opts["seed"] = seed
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
    z = torch.stack([acts.z[:, l, h] for l, h in heads])  # (B, n, dh)
    w_o = torch.stack([ad.head_w_o(l, h).detach().float() for l, h in heads])  # (B, dh, d)
    D = ad.unembedding().detach().float()
    res = somp_heads(z, w_o, D, k, criterion=criterion, normalize=normalize, center=center,
                     backend=backend)
    return {hd: [tokenizer.decode([int(t)]) for t in res.support[i] if t >= 0]
            for i, hd in enumerate(heads)}


def logit_lens_tokens(acts: HeadActivations, model, tokenizer, heads, k: int = 5):
    """Aggregated Logit Lens: top-k tokens of each head's mean write (the paper's baseline)."""
    ad = get_adapter(model)
    D = ad.unembedding().detach().float()
    out = {}
    for l, h in heads:
        write = acts.z[:, l, h].mean(0) @ ad.head_w_o(l, h).detach().float()  # (d,)
        out[(l, h)] = [tokenizer.decode([int(t)]) for t in torch.topk(D @ write, k).indices]
    return out


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
