"""Readable forms of vocabulary tokens, for people (the head atlas, reports).

A raw vocabulary entry is hard to read: byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM) writes
a leading space as ``Ġ``, a newline as ``Ċ`` and every non-ASCII byte as a stand-in
character; SentencePiece (Llama-2, Mistral, Gemma) writes a space as ``▁`` and unknown bytes
as ``<0xE2>`` tokens. ``readable_token`` undoes the tokenizer's own encoding and then makes
what would be invisible visible:

* a leading or trailing space is shown as ``␣`` (``Ġred`` and ``▁red`` both read ``␣red``);
* control characters and bytes that are not valid UTF-8 on their own are shown as escapes,
  ``⟨0x0A⟩`` for a newline, ``⟨0xE2⟩`` for the first byte of a split multi-byte character;
  other invisible characters (zero-width, non-breaking spaces) as ``⟨U+200B⟩``;
* special tokens (``<|endoftext|>``, ``<s>``) are kept as they are.

``search_key`` is the form searches compare: the readable text without the ``␣`` markers,
trimmed and lower-cased (``"␣France"`` -> ``"france"``).
"""
from __future__ import annotations

import json
import re
import unicodedata
import weakref
from functools import lru_cache

SPACE_MARK = "␣"
SP_MARK = "▁"
SCHEMES = ("bytelevel", "sentencepiece", "plain")
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_scheme_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[str, int]:
    """Stand-in character -> byte of the GPT-2 byte-level alphabet (256 entries).

    Printable Latin-1 bytes stand for themselves; the other bytes (controls, space, the
    non-printing Latin-1 range) are given the code points 256, 257, ... in byte order.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in kept}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _component_json(component) -> str:
    if component is None:
        return ""
    try:
        return json.dumps(json.loads(component.__getstate__()), ensure_ascii=False)
    except Exception:  # an object without a JSON state: judge by its type name
        return type(component).__name__


def token_scheme(tokenizer) -> str:
    """How ``tokenizer`` spells its tokens: ``"bytelevel"``, ``"sentencepiece"`` or ``"plain"``.

    Read from the fast tokenizer's decoder and pre-tokenizer (``ByteLevel``; ``Metaspace`` or
    a ``▁`` replacement), or the slow tokenizer's ``byte_decoder`` / ``sp_model``.
    """
    try:
        return _scheme_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = ""
    if backend is not None:
        parts = _component_json(backend.decoder) + _component_json(backend.pre_tokenizer)
    if "ByteLevel" in parts or hasattr(tokenizer, "byte_decoder"):
        scheme = "bytelevel"
    elif ("Metaspace" in parts or SP_MARK in parts or "ByteFallback" in parts
          or hasattr(tokenizer, "sp_model")):
        scheme = "sentencepiece"
    else:
        scheme = "plain"
    try:
        _scheme_cache[tokenizer] = scheme
    except TypeError:
        pass
    return scheme


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
        return f"⟨0x{code - 0xDC00:02X}⟩"
    if code < 0x100:
        return f"⟨0x{code:02X}⟩"
    return f"⟨U+{code:04X}⟩"


def _invisible(ch: str) -> bool:
    if ch == " ":
        return False
    if 0xDC80 <= ord(ch) <= 0xDCFF:
        return True
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")


def visible_text(text: str) -> str:
    """``text`` with leading/trailing spaces as ``␣`` and invisible characters escaped."""
    body = "".join(_escape_char(c) if _invisible(c) else c for c in text)
    stripped = body.strip(" ")
    if not stripped:
        return SPACE_MARK * len(body)
    lead = len(body) - len(body.lstrip(" "))
    trail = len(body) - len(body.rstrip(" "))
    return SPACE_MARK * lead + stripped + SPACE_MARK * trail


def bytes_text(data: bytes) -> str:
    """UTF-8 text of ``data``; bytes that do not decode become ``⟨0xHH⟩`` escapes later."""
    return data.decode("utf-8", errors="surrogateescape")


def _is_special(tokenizer, token_id: int) -> bool:
    return token_id in set(getattr(tokenizer, "all_special_ids", None) or [])


def raw_token(tokenizer, token_id: int) -> str | None:
    """The vocabulary entry of ``token_id`` as stored (``"Ġred"``).

    None for an id past the tokenizer's vocabulary: models often pad their unembedding
    with rows no text maps to. A negative id raises ``ValueError``.
    """
    token_id = int(token_id)
    if token_id < 0:
        raise ValueError(f"token id {token_id} is negative; ids start at 0")
    if token_id >= len(tokenizer):
        return None
    return tokenizer.convert_ids_to_tokens(token_id)


def readable_token(tokenizer, token_id: int) -> str:
    """A readable, unambiguous form of one token (see the module docstring).

    An id with no vocabulary entry (unembedding padding) reads ``⟨unused id N⟩``.
    """
    raw = raw_token(tokenizer, token_id)
    if raw is None:
        return f"⟨unused id {int(token_id)}⟩"
    if _is_special(tokenizer, int(token_id)):
        return raw
    scheme = token_scheme(tokenizer)
    if scheme == "bytelevel":
        table = byte_alphabet()
        if all(c in table for c in raw):
            return visible_text(bytes_text(bytes(table[c] for c in raw)))
        return visible_text(raw)  # an added token written in plain text
    if scheme == "sentencepiece":
        byte = _SP_BYTE.match(raw)
        if byte:
            return visible_text(bytes_text(bytes([int(byte.group(1), 16)])))
        return visible_text(raw.replace(SP_MARK, " "))
    return visible_text(raw)


def readable_tokens(tokenizer, token_ids) -> list[str]:
    """``readable_token`` of each id."""
    return [readable_token(tokenizer, int(t)) for t in token_ids]


def search_key(readable: str) -> str:
    """The form a search compares: ``␣`` markers removed, trimmed, lower-cased."""
    return readable.replace(SPACE_MARK, " ").strip().lower()
