"""Tiny random-initialized models built from configs (no download), one per adapter."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, head_dim=8)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_COMMON, head_dim=8)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_COMMON, head_dim=8)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_COMMON, num_local_experts=2,
                                                              num_experts_per_tok=1)),
    "olmo": lambda: tf.OlmoForCausalLM(tf.OlmoConfig(**_COMMON)),
    "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_COMMON)),
    "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**_COMMON)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=6,
                                                     n_positions=128, pad_token_id=0,
                                                     bos_token_id=1, eos_token_id=2)),
}


def tiny_model(arch: str = "llama", seed: int = 0, attn: str = "eager"):
    """A tiny random model of ``arch`` in eval mode, float32."""
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    model.config._attn_implementation = attn
    model.eval().requires_grad_(False)
    return model


WORDS = ("red green blue yellow purple orange black white pink brown "
         "france germany italy spain japan china india brazil canada mexico "
         "the a of in is what which city country capital answer question color "
         "good bad happy sad one two three four five six seven eight nine ten "
         "cat dog house tree car book sky sea sun moon river road bird fish "
         "paris berlin rome madrid tokyo describe name where how many big small "
         "and or to it this that with for on at by from").split()


def tiny_tokenizer():
    """Word-level tokenizer over ``WORDS`` (ids < VOCAB), pad=0 bos=1 eos=2, unk=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= VOCAB, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>")
    return fast


def oproj_inputs(model, enc) -> list:
    """Independent reference: the raw input of every layer's W_O, captured by a plain hook."""
    from hp_fast.models.adapters import get_adapter
    ad = get_adapter(model)
    seen = {}
    hs = [p.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].clone()))
          for i, p in enumerate(ad.out_projs)]
    try:
        model(**enc)
    finally:
        for h in hs:
            h.remove()
    return [seen[i] for i in range(ad.num_layers)]
