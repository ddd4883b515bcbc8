"""``generate_configs`` with the prompts' shared prefix computed once per configuration.

Evaluation prompts share a long head: the chat template's system turn plus the task's
instruction (the QA template is ~48 of ~67 tokens on SmolLM2). ``generate_configs`` runs
that head again for every (configuration, prompt) row. Here it runs once per configuration
(the edit changes the prefix's keys and values too, so it cannot be shared across
configurations); each batch then starts from the stacked prefix caches of its rows'
configurations and only encodes the rest of each prompt.

Row layout: ``[shared prefix (P)] [pad ...] [suffix]``, attention mask 0 on the pads; position
ids come from the mask's cumulative sum, so every real token keeps the position it has in
``generate_configs``' left-padded layout. Answers equal ``generate_configs``' up to float
summation order (tests compare them on a tiny model; on SmolLM2 128 of 128 QA answers matched).
Falls back to ``generate_configs`` when the prompts share fewer than ``min_prefix`` tokens or
the model's cache is not a plain per-layer key/value cache.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..capture import format_prompts
from ..edits import Gains, edit_heads
from ..models.devices import input_device
from .configs import generate_configs
from .loop import Encoder, by_config, config_gains, config_rows, generate_rows, output_cache
from .trunk import first_edited_layer, shared_trunk

# per layer (keys, values), each (C, kv_heads, P, dh)
PrefixCache = list[tuple[torch.Tensor, torch.Tensor]]


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token in every prompt."""
    if not ids:
        return 0
    limit = min(len(x) for x in ids) - 1
    p = 0
    while p < limit and len({x[p] for x in ids}) == 1:
        p += 1
    return max(p, 0)


def _prefix_cache(model, prefix: torch.Tensor, gains: torch.Tensor,
                  batch_size: int) -> PrefixCache | None:
    """Per-layer (keys, values) of prefix (1, P) under every config of gains (C, L, H); None
    when the model's cache is not a plain per-layer key/value cache."""
    from transformers import DynamicCache
    parts = []
    for start in range(0, gains.shape[0], batch_size):
        g = gains[start:start + batch_size]  # (c, L, H)
        with edit_heads(model, g), shared_trunk(model, first_edited_layer(g)):
            out = model(input_ids=prefix.expand(g.shape[0], -1), use_cache=True)
        cache = output_cache(out)
        if type(cache) is not DynamicCache or not all(hasattr(l, "keys") for l in cache.layers):
            return None
        parts.append([(l.keys, l.values) for l in cache.layers])
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts]))
            for i in range(len(parts[0]))]


def _prefix_encoder(ids: Sequence[Sequence[int]], prefix: torch.Tensor, kv: PrefixCache,
                    pad: int) -> Encoder:
    """Encoder of rows (c, i) -> ``[prefix][pad ...][ids[i][P:]]`` (B, P + m) with its mask
    and a DynamicCache holding the prefix keys/values of each row's configuration c."""
    from transformers import DynamicCache
    P, device = prefix.shape[1], prefix.device

    def encode(chunk):
        suffixes = [ids[i][P:] for _, i in chunk]
        m = max(len(s) for s in suffixes)
        input_ids = torch.full((len(chunk), P + m), pad, dtype=torch.long,
                               device=device)  # (B, P + m)
        mask = torch.zeros_like(input_ids)
        input_ids[:, :P] = prefix
        mask[:, :P] = 1
        for r, s in enumerate(suffixes):
            input_ids[r, P + m - len(s):] = torch.tensor(s, device=device)
            mask[r, P + m - len(s):] = 1
        cfg = torch.tensor([c for c, _ in chunk], device=kv[0][0].device)  # (B,)
        cache = DynamicCache()
        for layer, (k, v) in enumerate(kv):
            cache.update(k[cfg].clone(), v[cfg].clone(), layer)
        return {"input_ids": input_ids, "attention_mask": mask, "cache": cache}
    return encode


@torch.no_grad()
def generate_configs_shared_prefix(model, tokenizer, prompts: Sequence[str],
                                   configs: Sequence[Gains | None], *, max_new_tokens: int = 12,
                                   batch_size: int = 64, chat_template: bool | None = None,
                                   progress: bool = True, desc: str = "generate",
                                   min_prefix: int = 8, share_trunk: bool = True
                                   ) -> list[list[str]]:
    """Same contract as ``hp_fast.generate_configs``: ``answers[c][i]``."""
    texts, used = format_prompts(tokenizer, list(prompts), chat_template)
    ids = [list(tokenizer(t, add_special_tokens=not used)["input_ids"]) for t in texts]
    P = shared_prefix_length(ids)
    fallback = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, chat_template=chat_template,
                    progress=progress, desc=desc, share_trunk=share_trunk)
    if P < min_prefix or getattr(model.config, "is_encoder_decoder", False):
        return generate_configs(model, tokenizer, prompts, configs, **fallback)
    device = input_device(model)
    gains = config_gains(model, configs)  # (C, L, H)
    prefix = torch.tensor(ids[0][:P], device=device)[None]  # (1, P)
    kv = _prefix_cache(model, prefix, gains, batch_size)
    if kv is None:
        return generate_configs(model, tokenizer, prompts, configs, **fallback)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = config_rows(sorted(range(len(ids)), key=lambda i: len(ids[i])), len(configs))
    answers = generate_rows(model, tokenizer, rows, _prefix_encoder(ids, prefix, kv, pad),
                            gains=gains, share_trunk=share_trunk, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, pad_token_id=pad, progress=progress, desc=desc)
    return by_config(rows, answers, len(configs), len(ids))


__all__ = ["shared_prefix_length", "generate_configs_shared_prefix"]
