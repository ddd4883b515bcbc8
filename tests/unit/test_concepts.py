"""Concept word lists and their mapping to token ids (hp_fast.concepts)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import tokenizers_fixtures as F
from hp_fast.concepts import (BUILTIN_CONCEPTS, ConceptTokens, WordListNotFoundError,
                              builtin_concepts, builtin_path, concept_tokens, load_words,
                              surface_forms)

ROOT = Path(__file__).resolve().parents[2]
TINY = sorted(F.ALL_TINY)


@pytest.fixture(scope="module")
def smol():
    return F.smollm2()


def ids_of(tok, *token_strings):
    return [tok.convert_tokens_to_ids(t) for t in token_strings]


# ----------------------------------------------------------------------------- word lists

def test_builtins_listed_and_loadable():
    assert builtin_concepts() == list(BUILTIN_CONCEPTS)
    sizes = {name: len(load_words(name)) for name in builtin_concepts()}
    assert 40 <= sizes["colors"] <= 50
    assert 200 <= sizes["countries"] <= 300
    assert sizes["numbers"] == 43
    assert 1500 <= sizes["sentiments"] <= 2500
    assert 30 <= sizes["toxic"] <= 150


@pytest.mark.parametrize("name", BUILTIN_CONCEPTS)
def test_builtin_files_have_a_source_header_and_no_duplicates(name):
    lines = builtin_path(name).read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), "first line must say what the list is"
    body = [l for l in lines if l and not l.startswith("#")]
    assert len(body) == len(set(body)) == len(load_words(name))
    assert all(l == l.strip() for l in body)
    stated = {f"# {len(body)} entries.", f"# {len(body)} entries, one per line, sorted."}
    assert stated & set(lines), "the header must state the number of entries"


def test_builtin_contents():
    colors = load_words("colors")
    assert {"red", "blue", "green", "gray", "grey", "turquoise"} <= set(colors)
    countries = set(load_words("countries"))
    assert {"France", "Germany", "USA", "United States", "United Kingdom", "UK", "Netherlands",
            "Ivory Coast", "Kosovo"} <= countries
    # dissolved, uninhabited or not a country at all
    assert not {"Netherlands Antilles", "Serbia and Montenegro", "Antarctica", "The Netherlands",
                "French", "Paris"} & countries
    numbers = load_words("numbers")
    assert numbers[:3] == ["zero", "one", "two"] and "dozen" in numbers
    assert [str(d) for d in range(10)] == numbers[-10:]
    sentiments = load_words("sentiments")
    assert all(w.isalpha() and w.islower() for w in sentiments)
    assert {"awesome", "horrible", "love", "hate"} <= set(sentiments)
    assert not {"lol", "aml", "good", "bad-ass"} & set(sentiments)  # acronym block; |v| < 2
    toxic = set(load_words("toxic"))
    assert {"fuck", "shit", "idiot"} <= toxic and "hello" not in toxic


def test_generated_lists_are_up_to_date():
    spec = importlib.util.spec_from_file_location("build_wordlists",
                                                  ROOT / "scripts" / "build_wordlists.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    assert set(built) == {"countries.txt", "sentiments.txt", "toxic.txt", "elements.txt",
                          "us_states.txt", "languages.txt"}
    for name, text in built.items():
        assert (ROOT / "hp_fast" / "data" / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run python scripts/build_wordlists.py")
    assert module.build() == built  # deterministic


def test_load_words_from_txt_file(tmp_path):
    path = tmp_path / "fruits.txt"
    path.write_text("# fruits, by hand\n apple \n\nbanana  # yellow\napple\n#cherry\nC#\n"
                    "kiwi fruit\n", encoding="utf-8")
    assert load_words(path) == ["apple", "banana", "C#", "kiwi fruit"]
    assert load_words(str(path)) == ["apple", "banana", "C#", "kiwi fruit"]


def test_load_words_from_json_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["x", " y ", "x", ""]), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"words": ["z"]}), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"nope": 1}), encoding="utf-8")
    assert load_words(tmp_path / "a.json") == ["x", "y"]
    assert load_words(tmp_path / "b.json") == ["z"]
    with pytest.raises(ValueError, match="c.json"):
        load_words(tmp_path / "c.json")


def test_load_words_from_iterable():
    assert load_words(["b", "a", " b", "", "a "]) == ["b", "a"]
    assert load_words(w for w in ("x", "y")) == ["x", "y"]
    assert load_words(("red",)) == ["red"]
    with pytest.raises(ValueError, match="empty"):
        load_words(["", "  "])
    with pytest.raises(TypeError, match="string"):
        load_words(["red", 3])
    with pytest.raises(TypeError):
        load_words({"red": 1})
    with pytest.raises(TypeError):
        load_words(42)


def test_load_words_errors_name_the_input(tmp_path):
    with pytest.raises(ValueError) as err:
        load_words("colours")
    msg = str(err.value)
    assert "colours" in msg and all(b in msg for b in BUILTIN_CONCEPTS) and ".txt" in msg

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        load_words(empty)

    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        load_words(missing)
    with pytest.raises(FileNotFoundError):
        load_words(str(missing))
    assert issubclass(WordListNotFoundError, ValueError)

    with pytest.raises(ValueError, match="directory"):
        load_words(tmp_path)


# ----------------------------------------------------------------------------- tokens

def test_surface_forms():
    assert surface_forms("red") == [" red", "red", " Red", "Red"]
    assert surface_forms("USA") == [" USA", "USA"]  # not "Usa"
    assert surface_forms("red", ("space",)) == [" red"]
    assert surface_forms("red", ("bare", "capitalized")) == ["red", "Red"]
    with pytest.raises(ValueError, match="base form"):
        surface_forms("red", ("capitalized",))
    with pytest.raises(ValueError, match="unknown variants"):
        surface_forms("red", ("spaced",))


@pytest.mark.parametrize("name", TINY)
def test_fixture_vocabularies_hold_their_word_tokens(name):
    tok = F.ALL_TINY[name]()
    marker = "Ġ" if name == "bytelevel_bpe" else "▁"
    for w in F.WORD_TOKENS:
        token = w.replace(" ", marker)
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id, token
    if name == "bytelevel_bpe":  # bare forms are reachable from plain text too
        for w in F.WORD_TOKENS:
            assert len(tok.encode(w, add_special_tokens=False)) == 1, w


@pytest.mark.parametrize("name", TINY)
def test_space_and_bare_forms_on_every_tokenizer_family(name):
    tok = F.ALL_TINY[name]()
    m = "Ġ" if name == "bytelevel_bpe" else "▁"
    ct = concept_tokens(tok, ["red", "blue", "green", "France", "Germany", "United States",
                              "turquoise", "7"])
    assert ct.kept["red"] == ids_of(tok, f"{m}red", "red", f"{m}Red", "Red")
    assert ct.kept["blue"] == ids_of(tok, f"{m}blue")  # no bare, no capitalized token
    assert ct.kept["France"] == ids_of(tok, f"{m}France", "France")
    assert ct.kept["Germany"] == ids_of(tok, f"{m}Germany")
    assert ct.kept["7"] == ids_of(tok, "7")  # " 7" is two tokens (space, digit)
    assert ct.split["United States"] == [f"{m}United", f"{m}States"]
    assert "turquoise" in ct.split and "turquoise" not in ct.kept
    assert ct.missing == []
    # the double-space token of SentencePiece vocabularies is never taken for a word
    if m == "▁":
        assert tok.convert_tokens_to_ids("▁▁") not in ct.ids.tolist()
        assert tok.convert_tokens_to_ids("▁") not in ct.ids.tolist()


def test_legacy_llama_layout_would_fool_a_plain_encode():
    tok = F.llama_sp_bpe(legacy=True)
    # the trap: encoding " red" alone gives a double-space token and the *bare* token
    assert tok.convert_ids_to_tokens(tok.encode(" red", add_special_tokens=False)) == ["▁▁", "red"]
    ct = concept_tokens(tok, ["red"], variants=("space",))
    assert [ct.tokens[i] for i in ct.kept["red"]] == ["▁red"]
    ct = concept_tokens(tok, ["red"], variants=("bare",))
    assert [ct.tokens[i] for i in ct.kept["red"]] == ["red"]


def test_multi_token_first_keeps_the_first_real_piece():
    tok = F.sp_unigram()  # " turquoise" -> ["▁", "tur", "quo", "ise"]
    ct = concept_tokens(tok, ["turquoise", "United States", "red"], multi_token="first")
    assert [ct.tokens[i] for i in ct.kept["turquoise"]] == ["tur"]
    assert [ct.tokens[i] for i in ct.kept["United States"]] == ["▁United"]
    assert set(ct.split) == {"turquoise", "United States"}
    assert "first token kept" in ct.summary()
    dropped = concept_tokens(tok, ["turquoise", "United States", "red"])
    assert set(dropped.kept) == {"red"} and len(dropped) == 4


def test_missing_words_are_reported():
    tok = F.sp_unigram()  # no byte fallback: "é" -> ["▁", "<unk>"]
    ct = concept_tokens(tok, ["red", "é", "ééé"], multi_token="first")
    assert ct.missing == ["é", "ééé"] and set(ct.kept) == {"red"}
    assert "2 missing: é, ééé" in ct.summary()


def test_no_token_kept_raises_with_a_hint():
    tok = F.bytelevel_bpe()
    with pytest.raises(ValueError, match=r"'greys'.*multi_token='first'"):
        concept_tokens(tok, ["turquoise", "United States"], name="greys")
    with pytest.raises(ValueError, match="multi_token"):
        concept_tokens(tok, ["red"], multi_token="all")


def test_concept_tokens_result_shape_summary_and_json(tmp_path):
    tok = F.bytelevel_bpe()
    path = tmp_path / "shades.txt"
    path.write_text("red\nRed\nblue\nturquoise\n", encoding="utf-8")
    ct = concept_tokens(tok, path)
    assert ct.name == "shades" and ct.words == ["red", "Red", "blue", "turquoise"]
    assert ct.ids.dtype == torch.long and ct.ids.dim() == 1
    assert ct.ids.tolist() == sorted(set(ct.ids.tolist()))
    # "red" and "Red" share their capitalized forms: ids are unique
    assert set(ct.ids.tolist()) == {i for v in ct.kept.values() for i in v}
    assert len(ct) == 5
    assert ct.summary() == ("shades: 4 words -> 5 tokens; 1 split into several tokens (dropped): "
                            "turquoise; 0 missing")
    back = ConceptTokens.from_json(ct.to_json())
    assert torch.equal(back.ids, ct.ids) and back.to_dict() == ct.to_dict()
    assert json.loads(ct.to_json())["tokens"][str(ct.kept["blue"][0])] == "Ġblue"


def test_smollm2_colors_and_numbers(smol):
    ct = concept_tokens(smol, "colors")
    assert ct.kept["red"] == ids_of(smol, "Ġred", "red", "ĠRed", "Red")
    assert len(ct.kept) >= 30 and ct.missing == []
    nums = concept_tokens(smol, "numbers")
    assert nums.kept["7"] == ids_of(smol, "7")  # SmolLM2 writes " 7" as ["Ġ", "7"]
    assert ids_of(smol, "Ġ")[0] not in nums.ids.tolist()
    assert ids_of(smol, "Ġseven")[0] in nums.kept["seven"]
    assert nums.split == {}


def test_smollm2_countries_split_and_first(smol):
    ct = concept_tokens(smol, "countries")
    assert ct.split["United States"] == ["ĠUnited", "ĠStates"]
    assert ids_of(smol, "ĠFrance")[0] in ct.kept["France"]
    first = concept_tokens(smol, "countries", multi_token="first")
    assert first.kept["United States"] == ids_of(smol, "ĠUnited")
    assert len(first) > len(ct)
    assert ct.summary().startswith(f"countries: {len(ct.words)} words -> {len(ct)} tokens; ")


def test_every_builtin_maps_on_smollm2(smol):
    for name in builtin_concepts():
        ct = concept_tokens(smol, name)
        assert len(ct) > 0 and ct.missing == []
        assert ct.ids.max() < len(smol)
