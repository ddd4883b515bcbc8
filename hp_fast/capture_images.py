"""Capture head outputs of a vision-language model over image tokens (docs/method.md §1).

The loop is ``hp_fast.capture``'s (``capture_batches``); what is VLM-specific is how a batch
is built: the model's processor encodes one image per prompt (``models.vlm.encode``) and
``models.vlm.image_token_mask`` marks the image-patch positions. Aggregates: ``"image"``
averages each head's output over the image-patch tokens (the paper's choice), ``"text"``
over every other real token, ``"mean"`` over all real tokens, ``"last"`` takes the last one.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .capture import (CaptureBatch, HeadActivations, MemorySink, capture_batches, check_aggregates,
                      check_batch_size, finish_capture, is_store_path, model_fingerprint,
                      prompts_hash)
from .data.images import ImageLike, image_name
from .models.adapters import get_adapter
from .models.devices import input_device
from .models.vlm import (check_image_inputs, check_vlm, encode, format_vlm_prompts, image_token_id,
                         image_token_mask)

IMAGE_AGGREGATES = ("image", "text", "mean", "last")


def images_hash(prompts: Sequence[str], names: Sequence[str]) -> str:
    """A short hash of the (prompt, image name) pairs, like ``capture.prompts_hash``."""
    h = hashlib.sha256()
    for p, n in zip(prompts, names):
        h.update(p.encode("utf-8") + b"\x00" + n.encode("utf-8") + b"\x00")
    return h.hexdigest()[:16]


def image_batch_encoder(model, processor, texts: Sequence[str], images: Sequence[ImageLike], *,
                        used_template: bool, aggregates: Sequence[str], counts: torch.Tensor):
    """make_batch(start, stop) -> CaptureBatch for ``capture_batches``: processed images with
    each aggregate's mask; writes the image-token count of every sample into ``counts`` (n,)."""
    device = input_device(model)

    def make_batch(start: int, stop: int) -> CaptureBatch:
        # right padding: real tokens keep positions 0.. without explicit position ids
        enc = encode(processor, texts[start:stop], images[start:stop], used_template=used_template,
                     padding_side="right", device=device)
        real = enc["attention_mask"].bool()                      # (B, T)
        img = image_token_mask(model, enc["input_ids"]) & real  # (B, T)
        per_row = img.sum(1)                                     # (B,)
        counts[start:stop] = per_row.cpu()
        if (per_row == 0).any():
            i = start + int(torch.nonzero(per_row == 0)[0])
            raise ValueError(f"prompt {i} has no image tokens after processing (image token id "
                             f"{image_token_id(model)}); does the processor match the model?")
        masks = {"image": img, "text": real & ~img, "mean": real, "last": real}
        return CaptureBatch(enc, {a: masks[a] for a in aggregates})

    return make_batch


def capture_images(model, processor, images: Sequence[ImageLike], prompts: str | Sequence[str], *,
                   aggregate: str = "image", batch_size: int = 8, chat_template: bool | None = None,
                   progress: bool = True, out=None, shard_size: int | None = None,
                   overwrite: bool = False) -> HeadActivations:
    """Each head's output averaged over the image-patch tokens (or text / all / last).

    images: PIL images or file paths, one per prompt; prompts: one per image, or one string
    for all. Uses the model's own processor and its chat template (``chat_template``).
    out / shard_size / overwrite: as in ``hp_fast.capture`` (a .safetensors file, or a resumable
    folder of shards; image names and prompts must match to resume).
    Returns HeadActivations with z (n, layers, heads, dh) float32 and meta["images"].
    """
    return capture_images_many(model, processor, images, prompts, aggregates=(aggregate,),
                               batch_size=batch_size, chat_template=chat_template,
                               progress=progress, out=out, shard_size=shard_size,
                               overwrite=overwrite)[aggregate]


def capture_images_many(model, processor, images: Sequence[ImageLike], prompts, *,
                        aggregates=("image", "text"), batch_size: int = 8,
                        chat_template: bool | None = None, progress: bool = True, out=None,
                        shard_size: int | None = None,
                        overwrite: bool = False) -> dict[str, HeadActivations]:
    """Like ``capture_images`` with several aggregates from one pass: {aggregate: acts}."""
    aggregates = check_aggregates(aggregates, IMAGE_AGGREGATES)
    check_batch_size(batch_size)
    if out is not None and not is_store_path(out) and len(aggregates) > 1:
        finish_capture(dict.fromkeys(aggregates), out)  # the error, before any work
    check_vlm(model)
    images, prompts = check_image_inputs(images, prompts)
    ad = get_adapter(model)
    texts, used = format_vlm_prompts(processor, model, prompts, chat_template)
    n = len(texts)
    L, H, dh = ad.num_layers, ad.num_heads, ad.head_dim
    counts = torch.empty(n, dtype=torch.long)  # (n,) image tokens per sample
    make_batch = image_batch_encoder(model, processor, texts, images, used_template=used,
                                     aggregates=aggregates, counts=counts)
    names = [image_name(im, i) for i, im in enumerate(images)]
    meta = {"model": model_fingerprint(model), "prompt_hash": images_hash(prompts, names),
            "chat_template": used, "num_samples": n, "shape": [n, L, H, dh], "modality": "image"}
    if is_store_path(out):
        from .store import capture_to_store, store_header
        settings = {"modality": "image", "aggregates": list(aggregates), "chat_template": used,
                    "texts_hash": prompts_hash(texts)}
        header = store_header(model, meta, settings, shard_size)
        capture_to_store(model, n, make_batch, aggregates, header, out, batch_size=batch_size,
                         overwrite=overwrite, progress=progress,
                         prompts={"prompts": prompts, "images": names}, what="images",
                         extras=lambda a, b: {"num_image_tokens": counts[a:b].clone()})
        return {a: HeadActivations.load(out, model, aggregate=a) for a in aggregates}
    sink = MemorySink(n, aggregates, (L, H, dh))
    capture_batches(model, n, make_batch, aggregates, sink, batch_size=batch_size, what="images",
                    progress=progress)
    meta.update(prompts=prompts, images=names, num_image_tokens=counts.tolist())
    return finish_capture({a: HeadActivations(sink.z[a], dict(meta, aggregate=a), ad)
                           for a in aggregates}, out)


__all__ = ["IMAGE_AGGREGATES", "capture_images", "capture_images_many", "image_batch_encoder",
           "images_hash"]
