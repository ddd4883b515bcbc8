"""Tiny random vision-language models and their processors, built offline from configs.

One builder per supported family; each returns ``(model, processor)``: a random-initialized
model in eval mode (float32, eager attention) and the family's own processor class, made from
its PIL image processor (torchvision is not installed, so the torchvision-backed default
image processors cannot be used) and a word-level tokenizer that knows the family's special
image tokens. Sizes are chosen so that a 32x32 image becomes a handful of image tokens:

=============  ==================================  ======================================
family         vision tower                        image tokens per 32x32 image
=============  ==================================  ======================================
llava          CLIP, 32 px, patch 8, 2 layers      16 (4x4 patches, CLS dropped)
llava_next     CLIP, 32 px, patch 8, AnyRes grids  16 base + unpadded tiles + newlines
qwen2_vl       Qwen2-VL ViT, patch 4, merge 2      16 (8x8 patches merged 2x2)
qwen2_5_vl     Qwen2.5-VL ViT, patch 4, merge 2    16
gemma3         SigLIP, 32 px, patch 8, pooled      4 (mm_tokens_per_image)
idefics3       Idefics3 ViT, 32 px, patch 8        4 (16 patches, pixel shuffle 2)
smolvlm        SmolVLM ViT, 32 px, patch 8         4
=============  ==================================  ======================================

The language model of every family has 2 layers x 6 query heads (2 KV heads), head_dim 6
(so H*dh = 36 differs from the hidden size 48); Qwen2-VL's text config fixes head_dim = 8.
Chat templates are short imitations of each family's (user turn with the image first).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
import transformers as tf

from helpers.tiny_models import WORDS

VOCAB = 160
_TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, head_dim=6,
             max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8, projection_dim=32)
_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def vlm_tokenizer(special: list[str], named: dict[str, str] | None = None,
                  chat_template: str | None = None):
    """Word-level tokenizer over ``WORDS`` plus the family's special tokens.

    ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3; then the words; then ``special`` (added
    as special tokens so that runs like ``<image><image>`` split into single tokens).
    ``named`` sets model-specific attributes (e.g. ``{"image_token": "<image>"}``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in list(WORDS) + ["user", "assistant", "model", "system", "User", "Assistant", ":", "."]:
        vocab.setdefault(w, len(vocab))
    for s in special:
        vocab.setdefault(s, len(vocab))
    assert len(vocab) <= VOCAB, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"extra_special_tokens": dict(named)} if named else {}
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>", **kw)
    fast.add_special_tokens({"additional_special_tokens": list(special)},
                            replace_extra_special_tokens=False)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _template(user: str, image: str, assistant: str, end: str = "\n") -> str:
    """A minimal multimodal chat template: ``{user}{image}{text}{end}{assistant}``.

    Literal text goes through ``{{ ... }}`` expressions: transformers renders templates with
    ``trim_blocks``, which would eat a newline written right after a ``{% ... %}`` tag.
    """
    def lit(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}"
    return ("{% for m in messages %}{% if m['role'] == 'user' %}" + lit(user) +
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + lit(image) +
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}" + lit(end) +
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
            "{% endif %}{% endfor %}" + lit(end) + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + lit(assistant) + "{% endif %}")


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _finish(model):
    model.config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if getattr(model.config, sub, None) is not None:
            getattr(model.config, sub)._attn_implementation = "eager"
    return model.eval().requires_grad_(False)


def tiny_llava(seed: int = 0):
    """LLaVA-1.5 layout: CLIP tower, 2-layer MLP projector, Llama language model."""
    tok = vlm_tokenizer(["<image>"], {"image_token": "<image>"},
                        _template("user : ", "<image>\n", "assistant :"))
    (image_id,) = _ids(tok, "<image>")
    cfg = tf.LlavaConfig(text_config=tf.LlamaConfig(**_TEXT),
                         vision_config=tf.CLIPVisionConfig(**_CLIP), image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = _finish(tf.LlavaForConditionalGeneration(cfg))
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_mean=_MEAN, image_std=_STD)
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                             vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=tok.chat_template)
    return model, proc


def tiny_llava_next(seed: int = 0):
    """LLaVA-NeXT layout: AnyRes tiles (grids up to 64x64), image newline, Mistral LM."""
    tok = vlm_tokenizer(["<image>"], {"image_token": "<image>"},
                        _template("user : ", "<image>\n", " assistant :"))
    (image_id,) = _ids(tok, "<image>")
    grids = [[32, 32], [32, 64], [64, 32], [64, 64]]
    cfg = tf.LlavaNextConfig(text_config=tf.MistralConfig(**_TEXT),
                             vision_config=tf.CLIPVisionConfig(**_CLIP), image_token_index=image_id,
                             image_grid_pinpoints=grids, vision_feature_select_strategy="default",
                             vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = _finish(tf.LlavaNextForConditionalGeneration(cfg))
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=grids, image_mean=_MEAN, image_std=_STD)
    proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                 vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=tok.chat_template)
    return model, proc


_QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                 "<|im_start|>", "<|im_end|>"]
_QWEN_TEMPLATE = _template("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>",
                           "<|im_start|>assistant\n", end="<|im_end|>\n")


def _qwen(version: str, seed: int):
    tok = vlm_tokenizer(_QWEN_SPECIAL, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                        _QWEN_TEMPLATE)
    vs, ve, image_id, video_id = _ids(tok, *_QWEN_SPECIAL[:4])
    # Qwen2-VL's text config derives head_dim = hidden / heads (8); M-RoPE splits its 4 pairs
    text = dict(_TEXT, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [1, 1, 2]})
    ids = dict(image_token_id=image_id, video_token_id=video_id, vision_start_token_id=vs,
               vision_end_token_id=ve)
    vision = dict(depth=2, num_heads=4, in_channels=3, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    if version == "2":
        cfg = tf.Qwen2VLConfig(text_config=dict(text), vision_config=dict(
            vision, embed_dim=32, hidden_size=48, mlp_ratio=2), **ids)
        cls = tf.Qwen2VLForConditionalGeneration
    else:
        cfg = tf.Qwen2_5_VLConfig(text_config=dict(text), vision_config=dict(
            vision, hidden_size=32, intermediate_size=48, out_hidden_size=48, window_size=16,
            fullatt_block_indexes=[1]), **ids)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = _finish(cls(cfg))
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    ip = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4, merge_size=2,
                                  temporal_patch_size=2, image_mean=_MEAN, image_std=_STD)
    proc_cls = tf.Qwen2VLProcessor if version == "2" else tf.Qwen2_5_VLProcessor
    proc = _no_video(proc_cls, ip, tok)
    return model, proc


def _no_video(proc_cls, ip, tok, **kw):
    """``proc_cls`` without its video processor (those need torchvision, not installed here).

    A subclass that declares only the image processor and tokenizer as attributes; the
    parent's ``__init__`` runs unchanged with ``video_processor=None``. Images work as usual;
    ``video_processor`` is a stub with the two numbers SmolVLM's chat template reads.
    """
    sub = type(f"{proc_cls.__name__}ImagesOnly", (proc_cls,),
               {"get_attributes": classmethod(lambda cls: ["image_processor", "tokenizer"]),
                "video_processor": SimpleNamespace(num_frames=1, fps=1)})
    return sub(ip, tok, None, chat_template=tok.chat_template, **kw)


def tiny_qwen2_vl(seed: int = 0):
    """Qwen2-VL: native-resolution ViT with 2x2 patch merging, M-RoPE Qwen2 LM."""
    return _qwen("2", seed)


def tiny_qwen2_5_vl(seed: int = 0):
    """Qwen2.5-VL: windowed ViT (one full-attention block), M-RoPE Qwen2 LM."""
    return _qwen("2.5", seed)


def tiny_gemma3(seed: int = 0):
    """Gemma3 (multimodal): SigLIP tower pooled to 4 soft tokens, Gemma3 text LM."""
    special = ["<start_of_image>", "<end_of_image>", "<image_soft_token>",
               "<start_of_turn>", "<end_of_turn>"]
    tok = vlm_tokenizer(special, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"},
                        _template("<start_of_turn>user\n", "<start_of_image>",
                                  "<start_of_turn>model\n", end="<end_of_turn>\n"))
    boi, eoi, image_id = _ids(tok, *special[:3])
    text = tf.Gemma3TextConfig(**_TEXT, sliding_window=16)
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=32, patch_size=8)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=boi, eoi_token_index=eoi, image_token_index=image_id)
    torch.manual_seed(seed)
    model = _finish(tf.Gemma3ForConditionalGeneration(cfg))
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False,
                                 image_mean=_MEAN, image_std=_STD)
    proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4,
                              chat_template=tok.chat_template)
    return model, proc


_IDEFICS_SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


def _idefics(kind: str, seed: int):
    tok = vlm_tokenizer(_IDEFICS_SPECIAL, {"image_token": "<image>"},
                        _template("User : ", "<image>", "Assistant :", end="<end_of_utterance>\n"))
    (image_id,) = _ids(tok, "<image>")
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    if kind == "idefics3":
        cfg = tf.Idefics3Config(text_config=tf.LlamaConfig(**_TEXT),
                                vision_config=tf.Idefics3VisionConfig(**vision),
                                image_token_id=image_id, scale_factor=2, pad_token_id=0)
        cls = tf.Idefics3ForConditionalGeneration
    else:
        cfg = tf.SmolVLMConfig(text_config=tf.LlamaConfig(**_TEXT),
                               vision_config=tf.SmolVLMVisionConfig(**vision),
                               image_token_id=image_id, scale_factor=2, pad_token_id=0)
        cls = tf.SmolVLMForConditionalGeneration
    torch.manual_seed(seed)
    model = _finish(cls(cfg))
    if kind == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as IP)
    else:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as IP)
    ip = IP(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False,
            image_mean=_MEAN, image_std=_STD)
    if kind == "idefics3":
        proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                    chat_template=tok.chat_template)
    else:
        proc = _no_video(tf.SmolVLMProcessor, ip, tok, image_seq_len=4)
    return model, proc


def tiny_idefics3(seed: int = 0):
    """Idefics3: SigLIP-like tower, pixel-shuffle connector (x2), Llama LM."""
    return _idefics("idefics3", seed)


def tiny_smolvlm(seed: int = 0):
    """SmolVLM: the Idefics3 layout under its own model type."""
    return _idefics("smolvlm", seed)


FAMILIES = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "gemma3": tiny_gemma3,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
}


def tiny_vlm(family: str, seed: int = 0):
    """``(model, processor)`` of a tiny random VLM of ``family`` (a key of ``FAMILIES``)."""
    return FAMILIES[family](seed)
