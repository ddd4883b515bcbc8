"""Many edit configurations in one batched ``generate`` (per-row head gains).

Row ``r`` of every batch carries its own (layers, heads) gains, so the unedited model, a
SOMP selection and ten random control sets run side by side instead of one after another.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .adapters import get_adapter
from .capture import format_prompts
from .edits import Gains, edit_heads, gains_tensor
from .generation import contiguous_unembedding_input
from .trunk import first_edited_layer, shared_trunk


@torch.no_grad()
def generate_configs(model, tokenizer, prompts: Sequence[str], configs: Sequence[Gains | None], *,
                     max_new_tokens: int = 12, batch_size: int = 64,
                     chat_template: bool | None = None, progress: bool = True,
                     desc: str = "generate", share_trunk: bool = True) -> list[list[str]]:
    """Greedy answers of every prompt under every configuration.

    configs: gains per configuration ({(layer, head): gain}, a (layers, heads) tensor, or
    None for the unedited model). Returns ``answers[c][i]`` for config c and prompt i.
    Rows are (config, prompt) pairs; prompts are sorted by length inside each batch so
    left padding stays small. With ``share_trunk`` the layers below the first edited layer run
    once per group of identical rows (``hp_fast.trunk``): the configurations of one prompt
    share them until their generated tokens differ.
    """
    ad = get_adapter(model)
    L, H = ad.num_layers, ad.num_heads
    texts, used = format_prompts(tokenizer, list(prompts), chat_template)
    gains = torch.stack([gains_tensor(c or {}, L, H) for c in configs])  # (C, L, H)
    rows = [(c, i) for i in sorted(range(len(texts)), key=lambda i: len(texts[i]))
            for c in range(len(configs))]
    answers = [[""] * len(texts) for _ in configs]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch",
                          disable=not progress, leave=False):
            chunk = rows[start:start + batch_size]
            enc = tokenizer([texts[i] for _, i in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=not used).to(device)
            row_gains = gains[[c for c, _ in chunk]]  # (B, L, H)
            upto = first_edited_layer(row_gains) if share_trunk else 0
            with edit_heads(model, row_gains), shared_trunk(model, upto), \
                    contiguous_unembedding_input(model):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for (c, i), text in zip(chunk, decoded):
                answers[c][i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return answers
