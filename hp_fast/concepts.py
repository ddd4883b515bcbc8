"""Concept word lists and their token ids (docs/method.md section 2, "concept dictionary").

A concept is a list of words (colors, countries, ...). The concept dictionary of a model is
the rows of its unembedding matrix for the tokens those words become. Three steps:

``load_words(concept)``
    A built-in name (``builtin_concepts()``), a path to a word-list file, or an iterable
    of words -> a clean list of words.

``concept_tokens(tokenizer, words)``
    Words -> the token ids the model writes when it writes those words, plus a record of
    which words were kept, split into several tokens, or missing.

``ConceptTokens.ids``
    ``(t,)`` long tensor, unique and sorted: index the unembedding with it,
    ``D_c = lm_head.weight[ct.ids]``.

Word-list files
---------------
* ``.txt``: one word (or phrase) per line; blank lines and lines starting with ``#`` are
  skipped, and `` # ...`` after a word (whitespace, then ``#``) is an inline comment.
* ``.json``: a list of strings, or an object with a ``"words"`` list.
Words are stripped and de-duplicated (exact match, first occurrence kept, order kept).

Surface forms (the ``variants`` argument)
-----------------------------------------
A word can reach the vocabulary in several spellings. For ``"red"``:

* ``"space"``: ``" red"``, the form after a space, i.e. ``Ġred`` in byte-level BPE (GPT-2,
  Llama-3, Qwen, SmolLM) and ``▁red`` in SentencePiece (Llama-2, Mistral, Gemma). This is by
  far the most common form in running text.
* ``"bare"``: ``"red"``, the form with no space before it (start of a line, after a quote or
  a hyphen).
* ``"capitalized"``: first letter upper-cased (``"Red"``, ``" Red"``) for each of the forms
  above; the rest of the word is left alone (``"USA"`` stays ``"USA"``, not ``"Usa"``).

How a form is encoded. Encoding ``" red"`` on its own is not reliable: SentencePiece-style
tokenizers add a space of their own at the start of a text, so ``" red"`` becomes
``"▁▁red"``, which may encode to ``["▁", "▁red"]``, ``["▁▁red"]`` or, in the Llama-2
vocabulary, ``["▁▁", "red"]`` (a space token and the *bare* form). Each form is therefore
encoded after an anchor: ``ids(anchor + form)`` with the anchor's own ids ``ids(anchor)``
removed from the front; the anchor is a newline (``"\\n"``), and ``"."`` or ``"a"`` when the
newline's ids are not a prefix of the combined ids (the anchor merged with the form). The
added start-of-text space then lands before the anchor, not before the word. Only if no
anchor works is the form encoded alone, with a leading whitespace-only token dropped.

A form that encodes to exactly one token (other than ``unk`` or another special token)
contributes that token. The outcome for each word:

* kept:    at least one form is a single token; ``kept[word]`` = those ids, form order.
* split:   no form is a single token; ``split[word]`` = the pieces (token strings) of its first
  form (the space form when enabled). ``multi_token="drop"`` (default) leaves it out;
  ``multi_token="first"`` keeps the first piece of that form that is neither whitespace nor
  unknown (``" United States"`` -> ``" United"``) and the word then appears in both ``kept``
  and ``split``. Dropping is the default because a first piece is often a generic prefix,
  and the paper restricted one model to single-token words so that heads which merely spell
  letters are not found.
* missing: every form encodes to nothing, or only to unknown, special or whitespace tokens
  (a SentencePiece tokenizer with no byte fallback gives ``["▁", "<unk>"]`` for ``"é"``).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch

BUILTIN_CONCEPTS = ("colors", "countries", "numbers", "sentiments", "toxic")
VARIANTS = ("space", "bare", "capitalized")
MULTI_TOKEN = ("drop", "first")
WORDLIST_SUFFIXES = (".txt", ".json")
ANCHORS = ("\n", ".", "a")  # see the module docstring, "How a form is encoded"

ConceptLike = Union[str, os.PathLike, Iterable[str]]


class WordListNotFoundError(FileNotFoundError, ValueError):
    """A word-list file that does not exist (catchable as FileNotFoundError or ValueError)."""


# ----------------------------------------------------------------------------- word lists

def builtin_concepts() -> list[str]:
    """Names of the word lists shipped in ``hp_fast/data/`` (``<name>.txt``)."""
    return list(BUILTIN_CONCEPTS)


def builtin_path(name: str) -> Path:
    """Path of a built-in word list (raises like ``load_words`` for an unknown name)."""
    if name not in BUILTIN_CONCEPTS:
        raise ValueError(_unknown_message(name))
    return Path(str(resources.files("hp_fast").joinpath("data", f"{name}.txt")))


def load_words(concept: ConceptLike) -> list[str]:
    """The words of ``concept``: a built-in name, a ``.txt``/``.json`` file, or an iterable.

    Raises ``ValueError`` for an unknown name (listing the built-ins), an empty list, or a
    file with no words; ``WordListNotFoundError`` (a ``ValueError`` and a
    ``FileNotFoundError``) for a file that does not exist; ``TypeError`` for a non-string word.
    """
    return _resolve(concept)[1]


def concept_name(concept: ConceptLike) -> str:
    """A short label: the built-in name, the file's stem, or ``"custom"`` for word iterables."""
    if isinstance(concept, (str, os.PathLike)):
        text = os.fspath(concept)
        return text if text in BUILTIN_CONCEPTS else Path(text).stem
    return "custom"


def _unknown_message(name: str) -> str:
    return (f"unknown concept {name!r}; built-in concepts are {', '.join(BUILTIN_CONCEPTS)}. "
            "To use your own words pass a path to a .txt file (one word per line, '#' comments) "
            "or to a .json list of words, or pass the words themselves as a list")


def _looks_like_path(text: str) -> bool:
    return (Path(text).suffix.lower() in WORDLIST_SUFFIXES or os.sep in text or "/" in text
            or (os.altsep is not None and os.altsep in text) or os.path.exists(text))


def _resolve(concept: ConceptLike) -> tuple[str, list[str]]:
    """(label, words) for anything ``load_words`` accepts."""
    if isinstance(concept, (str, os.PathLike)):
        text = os.fspath(concept)
        if isinstance(concept, str) and text in BUILTIN_CONCEPTS:
            return text, _read_file(builtin_path(text))
        if isinstance(concept, str) and not _looks_like_path(text):
            raise ValueError(_unknown_message(text))
        path = Path(text)
        return path.stem, _read_file(path)
    if isinstance(concept, (bytes, bytearray)):
        raise TypeError("concept must be a name, a path or an iterable of words, not bytes")
    if isinstance(concept, Mapping):
        raise TypeError("concept must be a name, a path or an iterable of words, not a mapping; "
                        "pass list(your_dict) or the list of words")
    if not isinstance(concept, Iterable):
        raise TypeError(f"concept must be a name, a path or an iterable of words, "
                        f"got {type(concept).__name__}")
    words = _clean(concept, where="the given words")
    if not words:
        raise ValueError("the given word list is empty (after stripping blank entries)")
    return "custom", words


def _read_file(path: Path) -> list[str]:
    if not path.exists():
        raise WordListNotFoundError(f"word-list file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"word-list path {str(path)!r} is a directory; pass a .txt or .json file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"word-list file {str(path)!r} is not valid JSON: {err}") from None
        if isinstance(data, dict):
            data = data.get("words")
        if not isinstance(data, list):
            raise ValueError(f"word-list file {str(path)!r} must hold a JSON list of words "
                             'or an object with a "words" list')
        words = _clean(data, where=f"word-list file {str(path)!r}")
    else:
        words = _clean(_strip_comments(text.splitlines()), where=f"word-list file {str(path)!r}")
    if not words:
        raise ValueError(f"word-list file {str(path)!r} holds no words "
                         "(only blank or '#' comment lines)")
    return words


_INLINE_COMMENT = re.compile(r"\s+#.*$")


def _strip_comments(lines: Iterable[str]) -> list[str]:
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(_INLINE_COMMENT.sub("", line))
    return out


def _clean(items: Iterable[Any], where: str) -> list[str]:
    """Strip, drop blanks, de-duplicate keeping the first occurrence."""
    seen: dict[str, None] = {}
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{where}: every word must be a string, got {item!r}")
        word = item.strip()
        if word:
            seen.setdefault(word, None)
    return list(seen)


# ----------------------------------------------------------------------------- tokens

@dataclass
class ConceptTokens:
    """Token ids of a concept, with the record of how each word fared.

    ids:     (t,) long tensor, unique, sorted ascending (rows of the unembedding to keep)
    words:   the concept's words, in list order
    kept:    word -> ids it contributed (form order); split words too with multi_token="first"
    split:   word -> pieces (token strings) of its first form, for words with no single-token form
    missing: words that encode to nothing (or only to unknown/special tokens)
    tokens:  id -> token string, for every id in ``ids``
    """

    ids: torch.Tensor
    words: list[str]
    kept: dict[str, list[int]]
    split: dict[str, list[str]]
    missing: list[str]
    name: str = "custom"
    multi_token: str = "drop"
    variants: tuple[str, ...] = VARIANTS
    tokens: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def summary(self, max_listed: int = 8) -> str:
        """One line: ``colors: 45 words -> 78 tokens; 13 split ... (dropped): ...; 0 missing``."""
        def listed(words: list[str]) -> str:
            head = ", ".join(words[:max_listed])
            more = len(words) - max_listed
            return head + (f" (+{more} more)" if more > 0 else "")

        fate = "dropped" if self.multi_token == "drop" else "first token kept"
        parts = [f"{self.name}: {len(self.words)} words -> {len(self)} tokens"]
        split = list(self.split)
        parts.append(f"{len(split)} split into several tokens ({fate})"
                     + (f": {listed(split)}" if split else ""))
        parts.append(f"{len(self.missing)} missing" + (f": {listed(self.missing)}"
                                                        if self.missing else ""))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"name": self.name, "ids": [int(i) for i in self.ids.tolist()],
                "words": list(self.words), "kept": {w: list(v) for w, v in self.kept.items()},
                "split": {w: list(v) for w, v in self.split.items()},
                "missing": list(self.missing), "multi_token": self.multi_token,
                "variants": list(self.variants),
                "tokens": {str(k): v for k, v in self.tokens.items()}}

    def to_json(self, indent: int | None = None) -> str:
        """JSON text of ``to_dict()`` (``from_json`` reads it back)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "ConceptTokens":
        d = json.loads(text)
        return cls(ids=torch.tensor(d["ids"], dtype=torch.long), words=d["words"],
                   kept=d["kept"], split=d["split"], missing=d["missing"], name=d["name"],
                   multi_token=d["multi_token"], variants=tuple(d["variants"]),
                   tokens={int(k): v for k, v in d["tokens"].items()})


def surface_forms(word: str, variants: Iterable[str] = VARIANTS) -> list[str]:
    """The strings tried for ``word``, in order: " word", "word", " Word", "Word" (no repeats)."""
    variants = _check_variants(variants)
    bases = [word]
    if "capitalized" in variants:
        cap = word[:1].upper() + word[1:]
        if cap != word:
            bases.append(cap)
    forms: list[str] = []
    for base in bases:
        if "space" in variants:
            forms.append(" " + base)
        if "bare" in variants:
            forms.append(base)
    return list(dict.fromkeys(forms))


def _check_variants(variants: Iterable[str]) -> tuple[str, ...]:
    if isinstance(variants, str):
        variants = (variants,)
    variants = tuple(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}; choose among {VARIANTS}")
    if "space" not in variants and "bare" not in variants:
        raise ValueError(f"variants={variants} has no base form; include 'space' and/or 'bare' "
                         "('capitalized' only adds capitalized copies of them)")
    return variants


class FormEncoder:
    """Encodes surface forms as they appear inside a text (see "How a form is encoded").

    ``encoder(" red")`` -> the ids of ``" red"`` after a newline, without the newline's ids.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.anchors = [(a, self._raw(a)) for a in ANCHORS]

    def _raw(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def __call__(self, form: str) -> list[int]:
        for anchor, prefix in self.anchors:
            full = self._raw(anchor + form)
            if full[:len(prefix)] == prefix:
                return full[len(prefix):]
        ids = self._raw(form)
        if form[:1].isspace() and len(ids) > 1 and self.is_blank(ids[0]):
            ids = ids[1:]
        return ids

    def is_blank(self, token_id: int) -> bool:
        return self.tokenizer.decode([token_id]).strip() == ""


def concept_tokens(tokenizer, words: ConceptLike, *, variants: Iterable[str] = VARIANTS,
                   multi_token: str = "drop", name: str | None = None) -> ConceptTokens:
    """Map a concept's words to the ids of their single-token surface forms.

    tokenizer:   a ``transformers`` tokenizer (``encode``, ``convert_ids_to_tokens``, ``decode``)
    words:       anything ``load_words`` accepts (built-in name, file, iterable of words)
    variants:    surface forms to try, a subset of ``("space", "bare", "capitalized")``
    multi_token: ``"drop"`` or ``"first"``, what to do with words that have no single-token form
    name:        label used in ``summary()`` (default: built-in name, file stem, or "custom")

    Raises ``ValueError`` if no token at all is kept.
    """
    variants = _check_variants(variants)
    if multi_token not in MULTI_TOKEN:
        raise ValueError(f"multi_token={multi_token!r} is unknown; use one of {MULTI_TOKEN}")
    label, word_list = _resolve(words)
    label = name or label
    encode = FormEncoder(tokenizer)
    invalid = set(getattr(tokenizer, "all_special_ids", []) or [])
    if getattr(tokenizer, "unk_token_id", None) is not None:
        invalid.add(tokenizer.unk_token_id)

    kept: dict[str, list[int]] = {}
    split: dict[str, list[str]] = {}
    missing: list[str] = []
    for word in word_list:
        encoded = [encode(form) for form in surface_forms(word, variants)]
        singles = [ids[0] for ids in encoded if len(ids) == 1 and ids[0] not in invalid]
        if singles:
            kept[word] = list(dict.fromkeys(singles))
            continue
        usable = [ids for ids in encoded
                  if any(i not in invalid and not encode.is_blank(i) for i in ids)]
        if not usable:
            missing.append(word)
            continue
        pieces = usable[0]
        split[word] = list(tokenizer.convert_ids_to_tokens(pieces))
        if multi_token == "first":
            first = next((i for i in pieces if i not in invalid and not encode.is_blank(i)), None)
            if first is not None:
                kept[word] = [first]

    all_ids = sorted({i for ids in kept.values() for i in ids})
    if not all_ids:
        hint = (" or pass multi_token='first' to keep the first token of multi-token words"
                if multi_token == "drop" and split else "")
        raise ValueError(f"concept {label!r}: none of its {len(word_list)} words has a "
                         f"single-token form in this tokenizer (variants={variants}); "
                         f"check the word list{hint}")
    token_strings = tokenizer.convert_ids_to_tokens(all_ids)
    return ConceptTokens(ids=torch.tensor(all_ids, dtype=torch.long), words=word_list,
                         kept=kept, split=split, missing=missing, name=label,
                         multi_token=multi_token, variants=variants,
                         tokens=dict(zip(all_ids, token_strings)))
