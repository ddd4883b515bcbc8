"""Batched greedy generation of short answers (left padding, chat template)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .capture import format_prompts


def output_cache(out):
    """The key/value cache of a model output: ``cache`` (transformers >= 5; reading the old
    ``past_key_values`` name there prints a deprecation warning) or ``past_key_values``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@contextmanager
def contiguous_unembedding_input(model):
    """Hand the unembedding a contiguous input inside the block.

    ``generate``'s prompt pass keeps only the last position (``hidden[:, -1:, :]``, a strided
    view); on the CPU builds here ``F.linear`` on that view takes a slow path (88 x 576 @ the
    49152-token unembedding: 450 ms strided vs 54 ms contiguous). One copy of B x d floats
    avoids it; the logits are the same product."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(
        lambda m, args: (args[0].contiguous(), *args[1:]) if args else None)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 12,
                     batch_size: int = 32, chat_template: bool | None = None,
                     progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens stripped)."""
    texts, used = format_prompts(tokenizer, list(prompts), chat_template)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch",
                          disable=not progress, leave=False):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=not used).to(device)
            with contiguous_unembedding_input(model):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out
