"""Vision-language models: loading, image-token positions, prompts and processing.

A VLM's processor expands one image placeholder in the prompt into many image-patch tokens
(all with the model's ``config.image_token_id`` / ``image_token_index``); the language model
then sees the projected patch features at those positions. The paper (docs/method.md §1) averages
each head's output over those image-patch positions only:

    z[i, l, h] = mean over t with input_ids[i, t] == image_token_id of  attn_out[l][i, t, h]

``hp_fast.capture_images`` does that (``aggregate="image"``): the capture core of
``hp_fast.capture`` with the encoding here (``encode``, ``image_token_mask``). ``"text"``
averages over every other real token (template tokens and image delimiters such as
``<|vision_start|>`` or ``<start_of_image>`` count as text), ``"mean"`` over all real tokens,
``"last"`` takes the last prompt token.

Supported families (``adapters.VLM_MODEL_TYPES``): LLaVA-1.5, LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL, Gemma3, Idefics3, SmolVLM. Edits restricted to image (or text) positions use
``image_positions_mask`` with ``edit_heads(model, gains, positions=mask)``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .adapters import VLM_MODEL_TYPES, is_vlm
from .padding import padding_side as set_padding_side
from ..data.images import ImageLike, load_image


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
    check_vlm(model)
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

def check_vlm(model) -> None:
    """A ValueError unless ``model`` is a supported vision-language model."""
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


def check_image_inputs(images, prompts) -> tuple[list, list[str]]:
    """(images, prompts) as lists of equal length (one prompt string is repeated), or a
    ValueError naming the problem."""
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
    with set_padding_side(tok, padding_side):
        enc = processor(text=list(texts), images=[[load_image(im)] for im in images],
                        return_tensors="pt", padding=True, add_special_tokens=add_special)
    return enc.to(device) if device is not None else enc


__all__ = ["load_vlm", "image_token_id", "image_token_mask", "image_positions_mask",
           "image_placeholder", "format_vlm_prompts", "encode", "check_vlm",
           "check_image_inputs"]
