"""The one batched greedy generation loop, and ``generate_answers`` on top of it.

Every entry point (``generate_answers``, ``generate_configs``,
``generate_configs_shared_prefix``, ``generate_images``) lists its work as rows, (config,
item) pairs, and hands ``generate_rows`` an encoder that builds the model inputs of a chunk
of rows: the tokenizer with left padding (text), the ``[prefix][pad][suffix]`` layout with a
stacked prefix cache (shared prefix), or the VLM processor (images). The loop applies each
chunk's per-row gains (``edit_heads``), optionally shares the unedited trunk
(``hp_fast.generation.trunk``), hands the unembedding a contiguous input, generates greedily
and decodes the new tokens. See docs/architecture.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..capture import format_prompts
from ..edits import Gains, edit_heads, gains_tensor
from ..models.adapters import get_adapter
from ..models.devices import input_device
from ..models.padding import padding_side
from .trunk import first_edited_layer, shared_trunk

Row = tuple[int, int]  # (configuration index, item index)
Encoder = Callable[[Sequence[Row]], Mapping[str, object]]


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


def config_gains(model, configs: Sequence[Gains | None]) -> torch.Tensor:
    """(C, L, H) float32 gains of every configuration (None: the unedited model)."""
    ad = get_adapter(model)
    return torch.stack([gains_tensor(c if c is not None else {}, ad.num_layers, ad.num_heads)
                        for c in configs])


def config_rows(items: Sequence[int], num_configs: int) -> list[Row]:
    """Rows for every configuration of every item, the configurations of one item adjacent
    (so a batch holds few distinct prompts and the shared trunk has groups to share)."""
    return [(c, i) for i in items for c in range(num_configs)]


def by_config(rows: Sequence[Row], answers: Sequence[str], num_configs: int,
              num_items: int) -> list[list[str]]:
    """Answers of ``rows`` (one per row) rearranged as ``out[config][item]``."""
    out = [[""] * num_items for _ in range(num_configs)]
    for (c, i), text in zip(rows, answers):
        out[c][i] = text
    return out


def text_encoder(tokenizer, texts: Sequence[str], *, add_special_tokens: bool, device) -> Encoder:
    """Encoder of rows (c, i) -> ``texts[i]`` tokenized with left padding, on ``device``."""
    def encode(chunk: Sequence[Row]):
        with padding_side(tokenizer, "left"):  # generation appends on the right
            return tokenizer([texts[i] for _, i in chunk], return_tensors="pt", padding=True,
                             add_special_tokens=add_special_tokens).to(device)
    return encode


@contextmanager
def _chunk_edits(model, row_gains: torch.Tensor | None, positions, share_trunk: bool):
    """Per-row gains (B, L, H) (none: no edit here), the shared trunk, contiguous unembedding."""
    if row_gains is None:
        with contiguous_unembedding_input(model):
            yield
        return
    upto = first_edited_layer(row_gains) if share_trunk else 0
    with edit_heads(model, row_gains, positions=positions), shared_trunk(model, upto), \
            contiguous_unembedding_input(model):
        yield


@torch.no_grad()
def generate_rows(model, tokenizer, rows: Sequence[Row], encode: Encoder, *,
                  gains: torch.Tensor | None = None, positions="all", share_trunk: bool = False,
                  max_new_tokens: int = 12, batch_size: int = 32, pad_token_id: int | None = None,
                  progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy answers of ``rows``, one per row in order (decoded, special tokens stripped).

    encode(chunk) -> the ``generate`` inputs of up to ``batch_size`` rows, on the model's
    device: ``input_ids`` (B, T) plus whatever else the model takes (attention_mask, a
    cache, pixel values); the answer is what comes after the T prompt tokens.
    gains: (C, L, H) per configuration; row (c, i) is edited with ``gains[c]`` (the rows of a
    chunk as one (B, L, H) ``edit_heads``). None: no edit here (an outer ``edit_heads`` still
    applies). positions: ``edit_heads``' positions, or a function of the chunk's inputs that
    returns them (e.g. the image-token mask). share_trunk: run the layers below the chunk's
    first edited layer once per group of identical rows (``shared_trunk``).
    tokenizer: decodes the new tokens.
    """
    out: list[str] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        inputs = encode(chunk)
        row_gains = None if gains is None else gains[[c for c, _ in chunk]]  # (B, L, H)
        where = positions(inputs) if callable(positions) else positions
        with _chunk_edits(model, row_gains, where, share_trunk):
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_token_id)
        new = gen[:, inputs["input_ids"].shape[1]:]  # (B, new tokens)
        out += [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 12,
                     batch_size: int = 32, chat_template: bool | None = None,
                     progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens stripped), in order.

    Edits in effect are the caller's (``with edit_heads(model, gains): ...``)."""
    texts, used = format_prompts(tokenizer, list(prompts), chat_template)
    device = input_device(model)
    rows = config_rows(range(len(texts)), 1)
    encode = text_encoder(tokenizer, texts, add_special_tokens=not used, device=device)
    return generate_rows(model, tokenizer, rows, encode, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                         progress=progress, desc=desc)


__all__ = ["Row", "Encoder", "output_cache", "contiguous_unembedding_input", "config_gains",
           "config_rows", "by_config", "text_encoder", "generate_rows", "generate_answers"]
