"""Random models built from a config, with a word-level tokenizer, for benchmarks that need a
model of a given size and no download (``bench_gains.py --model random-1b`` on a GPU machine).

* ``random-1b``: Llama-3.2-1B's shape (16 layers, 32 heads of 64, d=2048, 8 KV heads, MLP 8192),
  a vocabulary of 32000 (1.0 B parameters with the untied head);
* ``random-tiny``: 4 layers, 8 heads of 8, vocabulary 512 (the dry run; 32 heads, so the
  16-head edit sets fit).

The tokenizer knows every word of ``words`` plus filler tokens up to the vocabulary size (so any
id the random model generates decodes), has pad/bos/eos and a minimal chat template
(``<user> ... <assistant>``), which is all ``encode_prompts`` and ``generate_configs`` use.
"""
from __future__ import annotations

import re

import torch

SHAPES = {
    "random-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "random-tiny": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=512),
}
CHAT_TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def word_tokenizer(words, vocab_size: int):
    """A fast word-level tokenizer: specials, ``words``, then filler tokens to ``vocab_size``."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>"])}
    for w in words:
        vocab.setdefault(w, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(name: str, texts, device: str = "cpu", dtype: torch.dtype = torch.float32,
          attn: str = "sdpa", seed: int = 0):
    """(model, tokenizer): a random Llama of ``SHAPES[name]`` in eval mode on ``device``, and a
    word-level tokenizer covering the words of ``texts``."""
    import transformers as tf
    if name not in SHAPES:
        raise ValueError(f"model {name!r} is unknown; use one of {sorted(SHAPES)}")
    cfg = tf.LlamaConfig(**SHAPES[name], max_position_embeddings=2048, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    words = sorted({w for t in texts for w in re.findall(r"\S+", t)})
    return model, word_tokenizer(words, cfg.vocab_size)
