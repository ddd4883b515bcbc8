"""Greedy answers of a vision-language model for images under edit configurations.

Rows are (configuration, image) pairs; the VLM's own processor builds each chunk (left
padding) and ``generate_rows`` runs it with per-row gains. ``positions`` may restrict the
gains to the image-patch tokens or to the text tokens of the prompt
(``hp_fast.models.vlm.image_positions_mask``).
"""
from __future__ import annotations

from typing import Sequence

from ..data.images import ImageLike
from ..edits import Gains
from ..models import vlm
from ..models.devices import input_device
from .loop import by_config, config_gains, config_rows, generate_rows

POSITIONS = ("all", "prompt", "generated", "image", "text")


def _positions(model, positions: str):
    """``edit_heads``' positions, or for "image" / "text" a function of the chunk's inputs
    giving the (B, T) bool mask of those prompt tokens."""
    if positions not in ("image", "text"):
        return positions
    return lambda enc: vlm.image_positions_mask(model, enc["input_ids"], enc["attention_mask"],
                                                positions)


def generate_images(model, processor, images: Sequence[ImageLike], prompts, *,
                    configs: Sequence[Gains | None] = (None,), positions: str = "all",
                    max_new_tokens: int = 12, batch_size: int = 8,
                    chat_template: bool | None = None, progress: bool = True,
                    desc: str = "generate") -> list[list[str]]:
    """Greedy answers for every image under every edit configuration: ``answers[c][i]``.

    configs: gains per configuration ({(layer, head): gain}, a (layers, heads) tensor, or
    None for the unedited model); rows of one batch carry different configurations.
    positions: where the gains apply: "all", "prompt", "generated" (edit_heads' own options),
    "image" (image-patch tokens only) or "text" (non-image prompt tokens).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: use one of {POSITIONS}")
    vlm.check_vlm(model)
    images, prompts = vlm.check_image_inputs(images, prompts)
    texts, used = vlm.format_vlm_prompts(processor, model, prompts, chat_template)
    gains = config_gains(model, configs)  # (C, L, H)
    rows = config_rows(range(len(texts)), len(configs))
    device = input_device(model)
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(chunk):
        return vlm.encode(processor, [texts[i] for _, i in chunk], [images[i] for _, i in chunk],
                          used_template=used, padding_side="left", device=device)

    answers = generate_rows(model, tok, rows, encode, gains=gains,
                            positions=_positions(model, positions), max_new_tokens=max_new_tokens,
                            batch_size=batch_size, pad_token_id=pad, progress=progress, desc=desc)
    return by_config(rows, answers, len(configs), len(texts))


__all__ = ["POSITIONS", "generate_images"]
