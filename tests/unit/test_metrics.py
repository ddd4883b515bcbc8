"""Evaluation metrics (hp_fast.evaluation.metrics) on examples computed by hand in the comments."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from hp_fast.evaluation.metrics import (bleu, cider_d, cider_d_scores, corpus_bleu, count_keywords,
                             exact_match, keyword_hits, normalize_answer, rouge_l, token_f1,
                             words)

L2 = math.log(2.0)  # idf of an n-gram seen in the references of 1 of 2 images: log(2/1)


# ----------------------------------------------------------------------------- QA

@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple, a day!  ", "apple day"),
    ("Theatre", "theatre"),                      # "the" only as a whole word
    ("U.S.A.", "usa"),
    ("don't", "dont"),                           # punctuation is deleted, not spaced
    ("red-brown", "redbrown"),
    ("«Café» — Zürich…", "café zürich"),         # Unicode punctuation deleted, accents kept
    ("ＵＳＡ", "usa"),                           # NFKC: full-width letters
    ("", ""),
    ("?!.", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match():
    assert exact_match("The Beatles!", ["beatles", "The Rolling Stones"]) == 1.0
    assert exact_match("Beatles", "the beatles") == 1.0
    assert exact_match("Beatle", ["beatles"]) == 0.0
    assert exact_match("", [""]) == 1.0
    assert exact_match("", ["Paris"]) == 0.0
    with pytest.raises(ValueError, match="gold"):
        exact_match("x", [])
    with pytest.raises(TypeError):
        exact_match(None, ["x"])


def test_token_f1_hand_computed():
    # pred "the big red car" -> [big, red, car]; gold "a red car" -> [red, car]
    # common = 2; P = 2/3, R = 2/2; F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 0.8
    assert token_f1("the big red car", "a red car") == pytest.approx(0.8)
    # max over golds: vs "blue car": common 1, P 1/3, R 1/2, F1 = (1/3) / (5/6) = 0.4
    assert token_f1("the big red car", ["blue car", "a red car"]) == pytest.approx(0.8)
    assert token_f1("the big red car", ["blue car"]) == pytest.approx(0.4)
    # repeated tokens are a bag: pred [red, red], gold [red] -> common 1, P 1/2, R 1 -> 2/3
    assert token_f1("red red", "red") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0


def test_token_f1_empty_cases():
    assert token_f1("", "") == 1.0              # SQuAD v2: no answer vs no answer
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "") == 0.0
    assert token_f1("The", "a") == 1.0          # both normalize to nothing
    assert token_f1("!!!", "Paris") == 0.0
    with pytest.raises(ValueError):
        token_f1("x", [])


# ----------------------------------------------------------------------------- keywords

def test_words():
    assert words("Red-brown, isn't it? (Dark_blue) 3.5 ＲＥＤ") == [
        "red", "brown", "isn't", "it", "dark", "blue", "3", "5", "red"]
    assert words("") == []


@pytest.mark.parametrize("text, expected", [
    ("A red car.", 1),
    ("RED, Red; red! (red) \"red\"", 5),        # case and adjacent punctuation
    ("bored reduce reds redder", 0),            # whole words only, no plural
    ("red-brown", 1),                           # hyphen separates words
    ("red\nred\tred", 3),
    ("", 0),
    ("the red's owner", 0),                     # an apostrophe joins: "red's" is one word
])
def test_count_keywords_single_word(text, expected):
    assert count_keywords(text, ["red"]) == expected


def test_count_keywords_phrases_and_overlap():
    kws = ["dark blue", "blue", "red", "brown"]
    # "Dark-blue" and "dark  blue" are the phrase (longest first), the last "blue" alone
    assert keyword_hits("Dark-blue and dark  blue, then blue", kws) == Counter(
        {"dark blue": 2, "blue": 1})
    assert count_keywords("a red-brown dog on a red, bored sofa", kws) == 3
    assert count_keywords("dark", ["dark blue"]) == 0           # half a phrase is no match
    assert count_keywords("red red", ["red", "red", "RED"]) == 2  # a keyword counts once
    assert count_keywords("one two three", "two") == 1          # a string is one keyword
    assert count_keywords("São Paulo, são paulo", ["são paulo"]) == 2
    assert count_keywords("I have 3 dogs and 12 cats", ["3", "2"]) == 1
    with pytest.raises(ValueError, match="never match"):
        count_keywords("x", ["--"])


# ----------------------------------------------------------------------------- CIDEr-D

def test_cider_d_two_image_corpus_by_hand():
    # Corpus: image A refs ["a cat sat"], image B refs ["a dog ran"]; N = 2.
    # df: "a" in both -> idf log(2/2) = 0; every other n-gram of the refs is in one image
    # -> idf log 2 = L; an n-gram in no reference has df 0 -> idf log(2/max(1, 0)) = L.
    #
    # Candidate A "a cat sat" (identical to its reference, same length -> penalty 1):
    #   k=1: c = r = {a: 0, cat: L, sat: L}: (L^2 + L^2) / (sqrt2 L * sqrt2 L) = 1
    #   k=2: {a cat: L, cat sat: L} both: 1;  k=3: {a cat sat: L}: 1;  k=4: no 4-gram: 0
    #   CIDEr-D = 10 * (1 + 1 + 1 + 0) / 4 = 7.5
    # Candidate B "a dog sat" vs "a dog ran":
    #   k=1: c {a: 0, dog: L, sat: L}, r {a: 0, dog: L, ran: L}: dot = L^2 (dog), norms
    #        sqrt2 L each -> 1/2
    #   k=2: c {a dog: L, dog sat: L (df 0)}, r {a dog: L, dog ran: L}: L^2 / 2L^2 = 1/2
    #   k=3: "a dog sat" vs "a dog ran": 0;  k=4: 0
    #   CIDEr-D = 10 * (1/2 + 1/2) / 4 = 2.5;   corpus = (7.5 + 2.5) / 2 = 5.0
    cands = ["a cat sat", "a dog sat"]
    refs = [["a cat sat"], ["a dog ran"]]
    assert cider_d_scores(cands, refs) == pytest.approx([7.5, 2.5])
    assert cider_d(cands, refs) == pytest.approx(5.0)


def test_cider_d_length_penalty_by_hand():
    # Same corpus; candidate A "cat sat" (2 words) vs "a cat sat" (3): delta = 1,
    # penalty exp(-1 / (2 * 6^2)) = exp(-1/72).
    #   k=1: c {cat: L, sat: L}, r {a: 0, cat: L, sat: L}: 2L^2 / (sqrt2 L * sqrt2 L) = 1
    #   k=2: c {cat sat: L}, r {a cat: L, cat sat: L}: L^2 / (L * sqrt2 L) = 1/sqrt2
    #   k=3, k=4: the candidate has none: 0
    # CIDEr-D = 10 * exp(-1/72) * (1 + 1/sqrt2) / 4 = 4.2089...
    expected = 10 * math.exp(-1 / 72) * (1 + 1 / math.sqrt(2)) / 4
    got = cider_d_scores(["cat sat", "a dog ran"], [["a cat sat"], ["a dog ran"]])
    assert got[0] == pytest.approx(expected)
    assert got[0] == pytest.approx(4.20890214, abs=1e-7)
    assert got[1] == pytest.approx(7.5)


def test_cider_d_clips_repeated_words():
    # Candidate A "cat cat cat" vs "a cat sat" (same length, penalty 1):
    #   k=1: c {cat: 3L}, r {a: 0, cat: L, sat: L}; clipped dot = min(3L, L) * L = L^2;
    #        |c| = 3L, |r| = sqrt2 L -> 1 / (3 sqrt2)   (unclipped it would be 1/sqrt2)
    #   k=2: c {cat cat: 2L} shares nothing -> 0;  k=3 -> 0;  k=4 none -> 0
    # CIDEr-D = 10 * (1 / (3 sqrt2)) / 4 = 0.5893
    got = cider_d_scores(["cat cat cat", "x"], [["a cat sat"], ["a dog ran"]])
    assert got[0] == pytest.approx(10 / (3 * math.sqrt(2)) / 4)
    assert got[1] == 0.0


def test_cider_d_averages_over_references():
    # Image A refs ["a cat sat", "a dog ran"], image B refs ["a bird flew"]; N = 2.
    # Candidate "a cat sat": vs ref 1 it is the identical case: (1+1+1+0)/4 = 3/4;
    # vs ref 2 "a dog ran": only "a" is shared, whose idf is log(2/2) = 0 -> 0.
    # CIDEr-D = 10 * (3/4 + 0) / 2 = 3.75
    got = cider_d_scores(["a cat sat", "a bird flew"], [["a cat sat", "a dog ran"], "a bird flew"])
    assert got == pytest.approx([3.75, 7.5])


def test_cider_d_edge_cases():
    # One image: every idf is log(1/1) = 0, so even a perfect candidate scores 0.
    assert cider_d(["a cat sat"], [["a cat sat"]]) == 0.0
    # Punctuation and case do not matter (words()).
    assert cider_d_scores(["A cat, sat!", "a dog sat"], [["a cat sat"], ["a dog ran"]])[0] == (
        pytest.approx(7.5))
    # Empty candidate: zero vectors -> 0.
    assert cider_d_scores(["", "a dog ran"], [["a cat sat"], ["a dog ran"]])[0] == 0.0
    assert cider_d([], []) == 0.0
    with pytest.raises(ValueError, match="reference"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(TypeError):
        cider_d("a cat", ["a cat"])


# ----------------------------------------------------------------------------- BLEU, ROUGE-L

def test_bleu_sentence_by_hand():
    # cand "the cat sat on the mat" (6 words), ref "the cat is on the mat" (6 words)
    # 1-grams: clipped matches the x2, cat, on, mat = 5 of 6           -> p1 = 5/6
    # 2-grams: the cat, on the, the mat = 3 of 5; BLEU+1 (3+1)/(5+1)    -> p2 = 4/6
    # 3-grams: "on the mat" = 1 of 4; (1+1)/(4+1)                       -> p3 = 2/5
    # 4-grams: 0 of 3; (0+1)/(3+1)                                      -> p4 = 1/4
    # BP = 1 (same length). BLEU = (5/6 * 4/6 * 2/5 * 1/4)^(1/4) = (1/18)^(1/4) = 0.48549
    assert bleu("the cat sat on the mat", "the cat is on the mat") == pytest.approx(
        (1 / 18) ** 0.25)
    # unsmoothed: p4 = 0 -> 0
    assert bleu("the cat sat on the mat", "the cat is on the mat", smooth=False) == 0.0
    # BLEU-2 unsmoothed: sqrt(5/6 * 3/5) = sqrt(1/2)
    assert bleu("the cat sat on the mat", ["the cat is on the mat"], n=2,
                smooth=False) == pytest.approx(math.sqrt(0.5))


def test_bleu_brevity_and_clipping():
    # cand "the the the" vs ref "the cat": clipped 1-gram matches 1 of 3 -> BLEU-1 = 1/3,
    # candidate longer than reference: BP = 1.
    assert bleu("the the the", "the cat", n=1) == pytest.approx(1 / 3)
    # cand "the cat" (2) vs refs of lengths 6 and 3: closest r = 3, BP = exp(1 - 3/2);
    # BLEU-1: p1 = 2/2 -> exp(-0.5)
    assert bleu("the cat", ["the cat is on the mat", "the cat sat"], n=1) == pytest.approx(
        math.exp(-0.5))
    # tie on distance (lengths 1 and 3 around 2): the shorter one, r = 1 -> BP = 1
    assert bleu("the cat", ["cat", "the cat sat"], n=1) == pytest.approx(1.0)
    assert bleu("", "the cat") == 0.0
    assert bleu("dog", "the cat") == 0.0      # no unigram match: 0 even with smoothing
    assert bleu("the cat", "the cat") == pytest.approx(1.0)  # p3 = p4 = (0+1)/(0+1)
    with pytest.raises(ValueError):
        bleu("x", [])


def test_corpus_bleu_sums_before_dividing():
    # two sentences, BLEU-1: matches 5/6 (above) and 2/2 ("the cat" vs "the cat")
    # -> p1 = 7/8; c = 8, r = 6 + 2 = 8 -> BP = 1
    got = corpus_bleu(["the cat sat on the mat", "the cat"],
                      ["the cat is on the mat", ["the cat", "a cat"]], n=1)
    assert got == pytest.approx(7 / 8)
    assert corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0


def test_rouge_l_by_hand():
    # Lin (2004): reference "police killed the gunman".
    # "police kill the gunman": LCS "police the gunman" = 3 -> P = R = 3/4 -> F = 0.75
    # "the gunman kill police": LCS "the gunman" = 2 -> P = R = 1/2 -> F = 0.5
    ref = "police killed the gunman"
    assert rouge_l("police kill the gunman", ref) == pytest.approx(0.75)
    assert rouge_l("the gunman kill police", ref) == pytest.approx(0.5)
    # unequal lengths: cand "the cat" vs ref "the black cat": LCS 2, P = 1, R = 2/3
    # F1 = 2 * 1 * (2/3) / (5/3) = 0.8; beta = 1.2: (1 + 1.44) * (2/3) / (2/3 + 1.44) = 0.7722
    assert rouge_l("the cat", "the black cat") == pytest.approx(0.8)
    assert rouge_l("the cat", "the black cat", beta=1.2) == pytest.approx(
        2.44 * (2 / 3) / (2 / 3 + 1.44))
    # several references: the best
    assert rouge_l("the cat", ["a dog", "the black cat"]) == pytest.approx(0.8)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "") == 0.0
    assert rouge_l("Café, au lait!", "café au LAIT") == pytest.approx(1.0)
