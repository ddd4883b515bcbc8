"""Next-token scoring of completion prompts under many edit configurations, one forward each.

The specificity protocol (``specificity.py``) asks each item as a completion whose next word is
the answer (``"Lyon is a city in the country of"`` -> ``" France"``), so one forward pass per
(configuration, item) row measures the edit: no decoding loop, logits at the last position only.

``next_token_scores`` batches the rows: each row carries its own head gains (``edit_heads``
with a (B, L, H) tensor); rows are ordered by their configuration's first edited layer and then
by item, so a chunk holds the configurations of a few items that edit the same layers, and the
layers below them run once per item (``generation.trunk.shared_trunk``). Prompts are left-padded
with position ids counted over real tokens, so padding changes nothing.
``next_token_scores_reference`` is the plain twin (one configuration, one prompt at a time, no
padding, no trunk sharing) the tests compare it with.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..capture import format_prompts, position_ids
from ..edits import Gains, edit_heads
from ..generation.loop import config_gains
from ..generation.trunk import first_edited_layer, shared_trunk
from ..models.padding import padding_side

__all__ = ["next_token_scores", "next_token_scores_reference", "answer_token_ids"]


def answer_token_ids(tok, answers: Sequence[str]) -> list[int]:
    """The first token of each accepted answer as the model writes it after a space
    (``" France"``, ``" USA"``), de-duplicated, in order."""
    out = []
    for a in answers:
        ids = tok("\n " + a, add_special_tokens=False)["input_ids"]
        anchor = tok("\n", add_special_tokens=False)["input_ids"]
        ids = ids[len(anchor):] if ids[:len(anchor)] == anchor else tok(" " + a, add_special_tokens=False)["input_ids"]
        if ids and ids[0] not in out:
            out.append(int(ids[0]))
    if not out:
        raise ValueError(f"the answers {list(answers)!r} encode to no token")
    return out


def _gold_mask(gold: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    m = torch.zeros(len(gold), vocab, dtype=torch.bool)  # (n, v)
    for i, ids in enumerate(gold):
        m[i, list(ids)] = True
    return m


@torch.no_grad()
def next_token_scores(model, tok, prompts: Sequence[str], configs: Sequence[Gains | None],
                      gold: Sequence[Sequence[int]], *, batch_size: int = 64,
                      chat_template: bool = False, progress: bool = True,
                      desc: str = "score") -> dict[str, torch.Tensor]:
    """Greedy next token and gold probability of every prompt under every configuration.

    gold[i]: accepted first-token ids of prompt i. Returns {"hit": (C, n) bool, the greedy
    next token is one of gold[i]; "prob": (C, n) float, the probability of the gold tokens
    (summed); "top": (C, n) long, the greedy next token}.
    """
    if len(gold) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(gold)} gold lists; give one per prompt")
    texts, used = format_prompts(tok, list(prompts), chat_template)
    gains = config_gains(model, configs)  # (C, L, H)
    C, n = len(configs), len(texts)
    first = [first_edited_layer(gains[c]) for c in range(C)]
    order = sorted(range(n), key=lambda i: len(texts[i]))
    rows = [(c, i) for c in sorted(range(C), key=lambda c: -first[c]) for i in order]
    # chunks of rows with the same first edited layer, item-major inside (trunk groups)
    rows = sorted(rows, key=lambda r: (-first[r[0]], r[1]))
    device = next(model.parameters()).device
    top = torch.zeros(C, n, dtype=torch.long)
    prob = torch.zeros(C, n)
    vocab = None
    mask_gold = None
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        with padding_side(tok, "left"):
            enc = tok([texts[i] for _, i in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=not used).to(device)
        g = gains[[c for c, _ in chunk]]  # (B, L, H)
        with edit_heads(model, g), shared_trunk(model, first_edited_layer(g)):
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           position_ids=position_ids(enc["attention_mask"]),
                           logits_to_keep=1).logits[:, -1].float().cpu()  # (B, v)
        if mask_gold is None:
            vocab = logits.shape[-1]
            mask_gold = _gold_mask(gold, vocab)  # (n, v)
        p = torch.softmax(logits, -1)
        cs = torch.tensor([c for c, _ in chunk])
        its = torch.tensor([i for _, i in chunk])
        top[cs, its] = logits.argmax(-1)
        prob[cs, its] = (p * mask_gold[its]).sum(-1)
    hit = mask_gold.gather(1, top.T).T if mask_gold is not None else torch.zeros(C, n, dtype=torch.bool)
    return {"hit": hit, "prob": prob, "top": top}


@torch.no_grad()
def next_token_scores_reference(model, tok, prompts, configs, gold, *,
                                chat_template: bool = False) -> dict[str, torch.Tensor]:
    """Plain twin of ``next_token_scores``: each configuration, each prompt, one at a time."""
    texts, used = format_prompts(tok, list(prompts), chat_template)
    C, n = len(configs), len(texts)
    top = torch.zeros(C, n, dtype=torch.long)
    prob = torch.zeros(C, n)
    hit = torch.zeros(C, n, dtype=torch.bool)
    for c, cfg in enumerate(configs):
        with edit_heads(model, cfg if cfg is not None else {}):
            for i, text in enumerate(texts):
                ids = tok(text, return_tensors="pt", add_special_tokens=not used)["input_ids"]
                logits = model(input_ids=ids).logits[0, -1].float()  # (v,)
                p = torch.softmax(logits, -1)
                top[c, i] = int(logits.argmax())
                prob[c, i] = float(p[list(gold[i])].sum())
                hit[c, i] = int(top[c, i]) in set(gold[i])
    return {"hit": hit, "prob": prob, "top": top}
