"""Many edit configurations in one batched ``generate`` (per-row head gains).

Row ``r`` of every batch carries its own (layers, heads) gains, so the unedited model, a
SOMP selection and ten random control sets run side by side instead of one after another.
"""
from __future__ import annotations

from typing import Sequence

from ..capture import format_prompts
from ..edits import Gains
from ..models.devices import input_device
from .loop import by_config, config_gains, config_rows, generate_rows, text_encoder


def generate_configs(model, tokenizer, prompts: Sequence[str], configs: Sequence[Gains | None], *,
                     max_new_tokens: int = 12, batch_size: int = 64,
                     chat_template: bool | None = None, progress: bool = True,
                     desc: str = "generate", share_trunk: bool = True) -> list[list[str]]:
    """Greedy answers of every prompt under every configuration.

    configs: gains per configuration ({(layer, head): gain}, a (layers, heads) tensor, or
    None for the unedited model). Returns ``answers[c][i]`` for config c and prompt i.
    Rows are (config, prompt) pairs; prompts are sorted by length inside each batch so
    left padding stays small. With ``share_trunk`` the layers below the first edited layer run
    once per group of identical rows (``hp_fast.generation.trunk``): the configurations of one
    prompt share them until their generated tokens differ.
    """
    texts, used = format_prompts(tokenizer, list(prompts), chat_template)
    gains = config_gains(model, configs)  # (C, L, H)
    rows = config_rows(sorted(range(len(texts)), key=lambda i: len(texts[i])), len(configs))
    device = input_device(model)
    encode = text_encoder(tokenizer, texts, add_special_tokens=not used, device=device)
    answers = generate_rows(model, tokenizer, rows, encode, gains=gains, share_trunk=share_trunk,
                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                            pad_token_id=tokenizer.pad_token_id, progress=progress, desc=desc)
    return by_config(rows, answers, len(configs), len(texts))


__all__ = ["generate_configs"]
