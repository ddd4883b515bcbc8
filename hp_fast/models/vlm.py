"""Vision-language models: head outputs over image tokens, image-position masks, generation.

A VLM's processor expands one image placeholder in the prompt into many image-patch tokens
(all with the model's ``config.image_token_id`` / ``image_token_index``); the language model
then sees the projected patch features at those positions. The paper (method.md §1) averages
each head's output over those image-patch positions only:

    z[i, l, h] = mean over t with input_ids[i, t] == image_token_id of  attn_out[l][i, t, h]

``capture_images`` does that (``aggregate="image"``) with the same hooks on the W_O input
as ``hp_fast.capture``; ``"text"`` averages over every other real token (template tokens and
image delimiters such as ``<|vision_start|>`` or ``<start_of_image>`` count as text),
``"mean"`` over all real tokens, ``"last"`` takes the last prompt token.

Supported families (``adapters.VLM_MODEL_TYPES``): LLaVA-1.5, LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL, Gemma3, Idefics3, SmolVLM. Edits restricted to image (or text) positions use
``image_positions_mask`` with ``edit_heads(model, gains, positions=mask)``.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .adapters import VLM_MODEL_TYPES, get_adapter, is_vlm
from .capture import HeadActivations, _aggregate, model_fingerprint, store_batch
from .edits import Gains, edit_heads, gains_tensor
from .generation import contiguous_unembedding_input
from .images import ImageLike, image_name, load_image

AGGREGATES = ("image", "text", "mean", "last")
POSITIONS = ("all", "prompt", "generated", "image", "text")


# ---- loading --------------------------------------------------------------------------------

def load_vlm(name_or_path: str, *, processor_kwargs: dict | None = None, **kw):
    """``(model, processor)`` of a Hugging Face VLM, in eval mode with gradients off.

    name_or_path: a local folder or a hub id already in the local cache (set
    ``HF_HUB_OFFLINE=1`` to make sure nothing is downloaded). Keyword arguments go to
    ``AutoModelForImageTextToText.from_pretrained`` (``dtype=torch.bfloat16``,
    ``device_map="cuda"``, ``attn_implementation``, ...); ``dtype`` defaults to float32.
    processor_kwargs go to ``AutoProcessor.from_pretrained`` (e.g. ``{"max_pixels": 512*28*28}``
    for Qwen2-VL, which otherwise keeps images near their native resolution).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    kw.setdefault("dtype", torch.float32)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, **(processor_kwargs or {}))
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kw)
    except OSError as err:
        raise ValueError(f"could not load VLM {name_or_path!r}: {err}. Pass a local folder or a "
                         "hub id that is in the local Hugging Face cache") from err
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"AutoProcessor gave a {type(processor).__name__} for {name_or_path!r}, "
                         "not a multimodal processor: its image or video processor failed to "
                         "load (the Qwen2-VL and SmolVLM video processors need torchvision; "
                         "install the torchvision build that matches your torch)")
    _check_vlm(model)
    return model.eval().requires_grad_(False), processor


# ---- image-token positions ------------------------------------------------------------------

def image_token_id(model) -> int:
    """The id of the image-patch placeholder token in ``model``'s input ids."""
    cfg = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model).__name__} has no config.image_token_id / image_token_index: "
                     f"is it a vision-language model? Supported VLM types: {', '.join(VLM_MODEL_TYPES)}")


def image_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where ``input_ids`` holds the model's image-patch token."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(ids.shape)}")
    return ids == image_token_id(model)


def image_positions_mask(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         which: str = "image") -> torch.Tensor:
    """(B, T) bool mask of the prompt positions an edit should touch.

    which="image": the image-patch tokens; "text": every real (non-padding) prompt token that
    is not an image-patch token. Pass the result as ``edit_heads(model, gains, positions=mask)``
    over the same padded ``input_ids``; generated tokens are outside such a mask (never edited):
    use ``positions="generated"`` or ``"all"`` for those.
    """
    img = image_token_mask(model, input_ids)
    if which == "image":
        return img
    if which == "text":
        real = torch.ones_like(img) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        return real & ~img
    raise ValueError(f"which={which!r}: use 'image' or 'text'")


# ---- prompts and processing -----------------------------------------------------------------

def _check_vlm(model) -> None:
    if not is_vlm(model):
        mtype = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"{mtype!r} is not a supported vision-language model; supported: "
                         f"{', '.join(VLM_MODEL_TYPES)} (text-only models: use hp_fast.capture)")


def image_placeholder(processor, model) -> str:
    """The text a prompt needs where the image goes (the processor expands it)."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str):
        raise ValueError(f"{type(processor).__name__} has no image_token; pass the model's own "
                         "processor (AutoProcessor.from_pretrained)")
    cfg, tok = model.config, processor.tokenizer
    start, end = getattr(cfg, "vision_start_token_id", None), getattr(cfg, "vision_end_token_id", None)
    if start is not None and end is not None:  # Qwen2-VL: <|vision_start|><|image_pad|><|vision_end|>
        token = tok.convert_ids_to_tokens(start) + token + tok.convert_ids_to_tokens(end)
    return token


def format_vlm_prompts(processor, model, prompts: Sequence[str],
                       chat_template: bool | None = None) -> tuple[list[str], bool]:
    """One text per prompt with one image placeholder.

    chat_template=None: use the processor's chat template when it has one (the image first,
    then the prompt, as one user turn, plus the generation prompt). Without a template the
    placeholder goes before the prompt unless the prompt already contains it.
    """
    has = bool(getattr(processor, "chat_template", None))
    use = has if chat_template is None else chat_template
    if use and not has:
        raise ValueError("chat_template=True but the processor has no chat template; pass "
                         "chat_template=False")
    if use:
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
        return texts, True
    ph = image_placeholder(processor, model)
    return [p if ph in p else f"{ph}\n{p}" for p in prompts], False


def _check_inputs(images, prompts) -> tuple[list, list[str]]:
    if images is None or isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
        raise ValueError("images must be a list of PIL images or file paths (wrap one image: [image])")
    images = list(images)
    if not images:
        raise ValueError("no images given: pass at least one image")
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: pass one prompt per "
                         "image, or one string for all")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompts {bad[:5]} are empty or not strings")
    return images, prompts


def encode(processor, texts: Sequence[str], images: Sequence[ImageLike], *, used_template: bool,
           padding_side: str = "right", device=None):
    """Processor outputs (tensors on ``device``) for one image per text.

    Special tokens are added unless the chat template already starts with BOS (what the
    processor's own ``apply_chat_template(tokenize=True)`` does).
    """
    tok = processor.tokenizer
    bos = getattr(tok, "bos_token", None)
    add_special = not (used_template and bos and all(t.startswith(bos) for t in texts))
    side = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = processor(text=list(texts), images=[[load_image(im)] for im in images],
                        return_tensors="pt", padding=True, add_special_tokens=add_special)
    finally:
        tok.padding_side = side
    return enc.to(device) if device is not None else enc


def _images_hash(prompts: Sequence[str], names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p, n in zip(prompts, names):
        h.update(p.encode("utf-8") + b"\x00" + n.encode("utf-8") + b"\x00")
    return h.hexdigest()[:16]


def _forward(model, enc) -> None:
    """Forward pass for the hooks only (no cache, logits of the last position at most)."""
    try:
        model(**enc, use_cache=False, logits_to_keep=1)
    except TypeError:
        model(**enc, use_cache=False)


# ---- capture --------------------------------------------------------------------------------

def capture_images(model, processor, images: Sequence[ImageLike], prompts: str | Sequence[str], *,
                   aggregate: str = "image", batch_size: int = 8, chat_template: bool | None = None,
                   progress: bool = True) -> HeadActivations:
    """Each head's output averaged over the image-patch tokens (or text / all / last).

    images: PIL images or file paths, one per prompt; prompts: one per image, or one string
    for all. Uses the model's own processor and its chat template (``chat_template``).
    Returns HeadActivations with z (n, layers, heads, dh) float32 and meta["images"].
    """
    return capture_images_many(model, processor, images, prompts, aggregates=(aggregate,),
                               batch_size=batch_size, chat_template=chat_template,
                               progress=progress)[aggregate]


@torch.no_grad()
def capture_images_many(model, processor, images: Sequence[ImageLike], prompts, *,
                        aggregates=("image", "text"), batch_size: int = 8,
                        chat_template: bool | None = None,
                        progress: bool = True) -> dict[str, HeadActivations]:
    """Like ``capture_images`` with several aggregates from one pass: {aggregate: acts}."""
    bad = [a for a in aggregates if a not in AGGREGATES]
    if bad or not aggregates:
        raise ValueError(f"aggregate={bad[0] if bad else aggregates!r} is unknown; use one of {AGGREGATES}")
    _check_vlm(model)
    images, prompts = _check_inputs(images, prompts)
    ad = get_adapter(model)
    texts, used = format_vlm_prompts(processor, model, prompts, chat_template)
    device = next(model.parameters()).device
    L, H, dh = ad.num_layers, ad.num_heads, ad.head_dim
    n = len(texts)
    z = {a: torch.empty(n, L, H, dh) for a in aggregates}
    counts = torch.empty(n, dtype=torch.long)
    state: dict = {}

    def make_hook(layer: int):
        def hook(_module, args):
            for a in aggregates:  # x (B, T, H*dh) -> (B, H*dh)
                state["out"][a][layer] = _aggregate(args[0], state["masks"][a],
                                                    "last" if a == "last" else "mean").cpu()
        return hook

    handles = [p.register_forward_pre_hook(make_hook(i)) for i, p in enumerate(ad.out_projs)]
    try:
        for start in tqdm(range(0, n, batch_size), desc="capture", unit="batch", disable=not progress):
            stop = min(start + batch_size, n)
            # right padding: real tokens keep positions 0.. without explicit position ids
            enc = encode(processor, texts[start:stop], images[start:stop], used_template=used,
                         padding_side="right", device=device)
            real = enc["attention_mask"].bool()                         # (B, T)
            img = image_token_mask(model, enc["input_ids"]) & real     # (B, T)
            counts[start:stop] = img.sum(1).cpu()
            if (img.sum(1) == 0).any():
                i = start + int(torch.nonzero(img.sum(1) == 0)[0])
                raise ValueError(f"prompt {i} has no image tokens after processing (image token id "
                                 f"{image_token_id(model)}); does the processor match the model?")
            state["masks"] = {"image": img, "text": real & ~img, "mean": real, "last": real}
            state["out"] = {a: [None] * L for a in aggregates}
            _forward(model, enc)
            store_batch(z, state["out"], start, stop, "images")
    finally:
        for h in handles:
            h.remove()
    names = [image_name(im, i) for i, im in enumerate(images)]
    meta = {"model": model_fingerprint(model), "prompt_hash": _images_hash(prompts, names),
            "chat_template": used, "num_samples": n, "shape": [n, L, H, dh], "prompts": prompts,
            "images": names, "num_image_tokens": counts.tolist(), "modality": "image"}
    return {a: HeadActivations(z[a], dict(meta, aggregate=a), ad) for a in aggregates}


# ---- generation with edits ------------------------------------------------------------------

def _edit_kwargs(positions, model, enc) -> dict:
    if positions == "all":
        return {}
    if positions in ("image", "text"):
        return {"positions": image_positions_mask(model, enc["input_ids"], enc["attention_mask"],
                                                  positions)}
    return {"positions": positions}


@torch.no_grad()
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
    _check_vlm(model)
    images, prompts = _check_inputs(images, prompts)
    ad = get_adapter(model)
    texts, used = format_vlm_prompts(processor, model, prompts, chat_template)
    gains = torch.stack([gains_tensor(c if c is not None else {}, ad.num_layers, ad.num_heads)
                         for c in configs])                              # (C, L, H)
    rows = [(c, i) for i in range(len(texts)) for c in range(len(configs))]
    answers = [[""] * len(texts) for _ in configs]
    device = next(model.parameters()).device
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        enc = encode(processor, [texts[i] for _, i in chunk], [images[i] for _, i in chunk],
                     used_template=used, padding_side="left", device=device)
        row_gains = gains[[c for c, _ in chunk]]                         # (B, L, H)
        with edit_heads(model, row_gains, **_edit_kwargs(positions, model, enc)), \
                contiguous_unembedding_input(model):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for (c, i), text in zip(chunk, decoded):
            answers[c][i] = text.strip()
    return answers


__all__ = ["AGGREGATES", "POSITIONS", "load_vlm", "image_token_id", "image_token_mask", "image_positions_mask",
           "image_placeholder", "format_vlm_prompts", "encode", "capture_images",
           "capture_images_many", "generate_images"]
