"""Question sets from files, for the QA evaluation (``hp-fast eval qa --questions FILE``).

A file (any format of ``data.prompts.read_records``: .jsonl, .json, .csv, .parquet, a
``datasets`` folder) holds one record per question with

* ``question``: the question text;
* ``answer`` (or ``answers``): the accepted answers, as a string, a list of strings, or
  TriviaQA's object ``{"value": ..., "aliases": [...], "normalized_aliases": [...]}`` (all of
  them count; SQuAD's ``{"text": [...]}`` too). In a .csv cell a JSON list (``["a", "b"]``) is a list;
* optionally ``kind``: ``country`` or ``other``.

Field names match case-insensitively (raw TriviaQA JSON spells them ``Question``, ``Answer``,
``Aliases``). Without ``kind``, a question is a *country* question when one of its answers is a
country name of the built-in ``countries`` list, else *other* (``country_question``). Answers are
kept lowercase and de-duplicated, as ``data.qa.Question`` wants them.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from typing import Any, Sequence

from .prompts import read_records, resolve_field
from .qa import Question

QUESTION_FIELDS = ("question",)
ANSWER_FIELDS = ("answer", "answers")
ANSWER_KEYS = ("value", "aliases", "normalized_aliases", "normalizedaliases", "text")
KINDS = ("country", "other")


@lru_cache(maxsize=1)
def country_names() -> frozenset[str]:
    """The built-in country list (``hp_fast.load_words("countries")``), lowercase."""
    from ..concepts import load_words
    return frozenset(w.lower() for w in load_words("countries"))


def country_question(answers: Sequence[str]) -> bool:
    """Whether one of the (lowercase) answers is a country name of the built-in list."""
    names = country_names()
    return any(a in names for a in answers)


def parse_answers(value: Any, where: str) -> tuple[str, ...]:
    """A string, a list of strings or a TriviaQA/SQuAD answer object -> lowercase answers."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)  # a CSV cell holding a JSON list
        except json.JSONDecodeError:
            pass
    if isinstance(value, dict):
        parts = [value[k] for k in (resolve_field(list(value), [key]) for key in ANSWER_KEYS)
                 if k is not None and value[k] is not None]
        value = [a for p in parts for a in (p if isinstance(p, (list, tuple)) else [p])]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(a, str) for a in items):
        raise ValueError(f"{where}: the answer must be a string, a list of strings or an object "
                         f"with value/aliases, got {type(value).__name__}")
    out = tuple(dict.fromkeys(a.strip().lower() for a in items if a.strip()))
    if not out:
        raise ValueError(f"{where}: the answer is empty")
    return out


def load_questions(path, *, question_field: str | None = None,
                   answer_field: str | None = None) -> list[Question]:
    """The questions of a file (module docstring) as ``Question`` objects, in file order."""
    qf = [question_field] if question_field else list(QUESTION_FIELDS)
    af = [answer_field] if answer_field else list(ANSWER_FIELDS)
    fields, records = read_records(path, [*qf, *af, "kind"])
    for wanted, what in ((qf, "question"), (af, "answer")):
        if fields and resolve_field(fields, wanted) is None:
            raise ValueError(f"{path} has no {what} field ({' or '.join(map(repr, wanted))}); fields "
                             f"present: {', '.join(map(str, fields))}")
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"{where} is not an object with a question and its answers")
        out.append(_question(rec, where, qf, af))
    if not out:
        raise ValueError(f"question file {path} is empty")
    return out


def _question(rec: dict, where: str, qf, af) -> Question:
    qk, ak = resolve_field(list(rec), qf), resolve_field(list(rec), af)
    if qk is None or ak is None:
        raise ValueError(f"{where} needs a question and an answer field; fields there: "
                         f"{', '.join(map(str, rec))}")
    text = rec[qk]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: the question must be a non-empty string, got {type(text).__name__}")
    answers = parse_answers(rec[ak], where)
    kk = resolve_field(list(rec), ["kind"])
    kind = rec[kk] if kk is not None and rec[kk] not in (None, "") else None
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{where}: kind {kind!r} is unknown; use one of {KINDS} or leave it out")
    kind = kind or ("country" if country_question(answers) else "other")
    return Question(text.strip(), answers, kind)


def train_pool(questions, n_train: int, n_pool: int, seed: int = 0
               ) -> tuple[list[Question], list[Question]]:
    """Disjoint train / evaluation-pool lists, half country and half other questions each.

    A ``(train, pool)`` pair is returned as given. From a flat list each kind gives
    ``n_train // 2`` and ``n_pool // 2`` questions (shuffled with ``seed``); a kind with fewer
    is split in the same proportion."""
    if (isinstance(questions, tuple) and len(questions) == 2
            and all(isinstance(part, list) for part in questions)):
        return list(questions[0]), list(questions[1])
    rng = random.Random(seed)
    train, pool = [], []
    a, b = n_train // 2, n_pool // 2
    for kind in KINDS:
        qs = [q for q in questions if q.kind == kind]
        if len(qs) < 2:
            raise ValueError(f"the question set has {len(qs)} {kind!r} question(s); the QA protocol "
                             "compares country with other questions and needs at least 2 of each "
                             "(country: an answer is a country name of the built-in list, or kind=country)")
        rng.shuffle(qs)
        na = a if len(qs) >= a + b else min(len(qs) - 1, max(1, round(len(qs) * a / max(1, a + b))))
        train += qs[:na]
        pool += qs[na:na + b]
    return train, pool
