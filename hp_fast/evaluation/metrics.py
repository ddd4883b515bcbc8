"""Evaluation metrics for the experiments of docs/method.md section 6. Plain Python, no heavy deps.

QA (TriviaQA, SQuAD conventions)
    ``normalize_answer``, ``exact_match``, ``token_f1``.
Keyword counts (captions / generations: colors, sentiments, numbers, toxic words)
    ``count_keywords``, ``keyword_hits``.
Caption quality
    ``cider_d`` / ``cider_d_scores`` (Vedantam et al. 2015), ``bleu`` / ``corpus_bleu``
    (Papineni et al. 2002), ``rouge_l`` (Lin 2004).

Two text normalizations are used:

* Answers (``normalize_answer``): the SQuAD v1.1 evaluation rule (lower-case, delete
  punctuation, delete the articles a/an/the, collapse whitespace), extended to Unicode: the
  text is NFKC-normalized first and every Unicode punctuation character (category ``P*``) is
  deleted, not only ASCII ``string.punctuation``. Deleting (not replacing by a space) is
  SQuAD's choice: ``"don't"`` -> ``"dont"``, ``"red-brown"`` -> ``"redbrown"``.
* Words (``words``, used by the keyword counts and the caption metrics): NFKC, case-folded,
  then the maximal runs of letters and digits; an apostrophe between two such runs stays inside
  the word (``"don't"``, ``"man's"`` are one word each); every other character (space,
  punctuation, hyphen, underscore, symbol) separates words, so ``"red-brown"`` is
  ``["red", "brown"]`` and ``"3.5"`` is ``["3", "5"]``.
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["normalize_answer", "exact_match", "token_f1", "words", "keyword_hits",
           "count_keywords", "cider_d", "cider_d_scores", "bleu", "corpus_bleu", "rouge_l"]

# ----------------------------------------------------------------------------- QA

_ARTICLES = re.compile(r"\b(a|an|the)\b", flags=re.UNICODE)
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
    """SQuAD answer normalization (Unicode-aware, see the module docstring).

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    if not isinstance(s, str):
        raise TypeError(f"answer must be a string, got {type(s).__name__}")
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(ch for ch in s if not _is_punct(ch))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(golds: str | Iterable[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("no gold answers given; pass a string or a non-empty list of strings")
    return golds


def exact_match(pred: str, golds: str | Iterable[str]) -> float:
    """1.0 if ``pred`` equals one of ``golds`` after ``normalize_answer``, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:  # SQuAD v2: both empty counts as a match
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, golds: str | Iterable[str]) -> float:
    """SQuAD token F1 (bag of normalized whitespace tokens), maximum over ``golds``.

    An empty prediction scores 1.0 against an empty gold answer and 0.0 against any other.
    """
    p = normalize_answer(pred).split()
    return max(_f1(p, normalize_answer(g).split()) for g in _golds(golds))


# ----------------------------------------------------------------------------- keywords

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """Case-folded words of ``text`` (module docstring): ``"Red-brown, isn't it?"`` ->
    ``["red", "brown", "isn't", "it"]``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _keyword_index(keywords: str | Iterable[str]) -> dict[str, list[tuple[str, ...]]]:
    """First word -> keyword word-tuples starting with it, longest first."""
    keywords = [keywords] if isinstance(keywords, str) else list(keywords)
    index: dict[str, set[tuple[str, ...]]] = {}
    for kw in keywords:
        parts = tuple(words(kw))
        if not parts:
            raise ValueError(f"keyword {kw!r} has no letters or digits, so it can never match")
        index.setdefault(parts[0], set()).add(parts)
    return {first: sorted(group, key=lambda p: (-len(p), p)) for first, group in index.items()}


def keyword_hits(text: str, keywords: str | Iterable[str]) -> Counter:
    """Occurrences of each keyword in ``text``: ``Counter`` keyed by the keyword's words joined
    by single spaces (``"Dark-Blue"`` is counted as ``"dark blue"``).

    Matching rules (``count_keywords`` is the total):

    * on whole words of ``words(text)``: case-insensitive; ``"red"`` does not match ``"bored"``,
      ``"reduce"`` or ``"reds"`` (plurals and other inflections match only if listed);
      adjacent punctuation does not matter (``"red,"`` and ``"(red)"`` match);
    * a hyphen separates words: ``"red-brown"`` counts ``red`` and ``brown``; a phrase keyword
      such as ``"dark blue"`` matches ``"dark blue"``, ``"Dark-blue"`` and ``"dark  blue"``;
    * left to right, longest keyword first, without overlap: with keywords ``"dark blue"`` and
      ``"blue"``, ``"dark blue"`` in the text counts once, as ``"dark blue"``;
    * a keyword listed twice (or in two spellings of the same words) counts once.
    """
    index = _keyword_index(keywords)
    tokens = words(text)
    hits: Counter = Counter()
    i = 0
    while i < len(tokens):
        for parts in index.get(tokens[i], ()):
            if tuple(tokens[i:i + len(parts)]) == parts:
                hits[" ".join(parts)] += 1
                i += len(parts)
                break
        else:
            i += 1
    return hits


def count_keywords(text: str, keywords: str | Iterable[str]) -> int:
    """How many times the keywords (words or phrases) occur in ``text`` (rules: ``keyword_hits``).

    >>> count_keywords("A red-brown dog on a red, bored sofa.", ["red", "brown"])
    3
    """
    return sum(keyword_hits(text, keywords).values())


# ----------------------------------------------------------------------------- captions

def _ngram_counts(tokens: Sequence[str], n: int) -> list[Counter]:
    """``[Counter of 1-grams, ..., Counter of n-grams]`` of ``tokens``."""
    return [Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1))
            for k in range(1, n + 1)]


def _references(references: str | Iterable[str], what: str) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError(f"{what}: no reference given; pass a string or a non-empty list")
    if not all(isinstance(r, str) for r in refs):
        raise TypeError(f"{what}: references must be strings")
    return refs


def cider_d_scores(candidates: Sequence[str], references: Sequence[str | Sequence[str]], *,
                   n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each candidate against its references (Vedantam et al. 2015, section 4.2).

    Written from the paper's definition; the variant is the one of the COCO evaluation server:

    * Words: ``words(s)`` (lower-cased, punctuation dropped).
    * For k = 1..n, a candidate or reference sentence ``s`` is the vector ``g^k(s)`` with one
      entry per k-gram w: ``count(w in s) * idf(w)``, ``idf(w) = log(N / max(1, df(w)))``,
      N = number of candidates (images) and df(w) = number of images with w in at least one
      of their references. The idf comes from the references of *this* corpus, so scores
      depend on the whole batch and a single-image corpus scores 0 (every idf is log 1 = 0).
      Term frequencies are raw counts (as in the COCO code, rather than the paper's
      length-normalized ones) so that the clipping below clips counts.
    * Against reference ``s_j`` of length ``l_j`` (candidate length ``l_c``, in words)::

          CIDEr-D_k(c, s_j) = exp(-(l_c - l_j)^2 / (2 sigma^2))
                              * <min(g^k(c), g^k(s_j)), g^k(s_j)> / (|g^k(c)| |g^k(s_j)|)

      where ``min`` is element-wise: a candidate k-gram counts at most as often as it occurs
      in the reference (a repeated word earns nothing). A zero vector gives 0.
    * ``CIDEr-D(c) = 10 * mean_j mean_k CIDEr-D_k(c, s_j)`` (uniform weights 1/n, x10 scale).

    candidates: one string per image; references: for each image a string or a list of strings.
    """
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of strings (one per image), not a string")
    candidates = list(candidates)
    references = list(references)
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets; "
                         "give one reference set (a string or a list of strings) per candidate")
    if not candidates:
        return []
    cands = [words(c) for c in candidates]
    refs = [[words(r) for r in _references(rs, f"image {i}")] for i, rs in enumerate(references)]

    doc_freq: Counter = Counter()
    for ref_set in refs:
        doc_freq.update({g for r in ref_set for counts in _ngram_counts(r, n) for g in counts})
    log_n = math.log(len(cands))

    def tfidf(tokens):  # -> ([ {k-gram: weight} for k=1..n ], [norms], length)
        vecs = [{g: c * (log_n - math.log(max(1.0, doc_freq[g]))) for g, c in counts.items()}
                for counts in _ngram_counts(tokens, n)]
        norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
        return vecs, norms, len(tokens)

    scores = []
    for cand, ref_set in zip(cands, refs):
        vc, nc, lc = tfidf(cand)
        total = 0.0
        for ref in ref_set:
            vr, nr, lr = tfidf(ref)
            sims = []
            for k in range(n):
                if nc[k] == 0.0 or nr[k] == 0.0:
                    sims.append(0.0)
                    continue
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                sims.append(dot / (nc[k] * nr[k]))
            penalty = math.exp(-((lc - lr) ** 2) / (2.0 * sigma ** 2))
            total += penalty * sum(sims) / n
        scores.append(10.0 * total / len(ref_set))
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[str | Sequence[str]], *,
            n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of ``cider_d_scores`` (0.0 for an empty corpus)."""
    scores = cider_d_scores(candidates, references, n=n, sigma=sigma)
    return sum(scores) / len(scores) if scores else 0.0


def _bleu_stats(candidate: str, references: str | Iterable[str], n: int):
    """(clipped matches per k, candidate k-gram totals per k, candidate length, ref length)."""
    cand = words(candidate)
    refs = [words(r) for r in _references(references, "bleu")]
    cand_counts = _ngram_counts(cand, n)
    max_ref: list[Counter] = [Counter() for _ in range(n)]
    for r in refs:
        for k, counts in enumerate(_ngram_counts(r, n)):
            max_ref[k] |= counts  # element-wise max over references
    matches = [sum((cand_counts[k] & max_ref[k]).values()) for k in range(n)]
    totals = [max(len(cand) - k, 0) for k in range(n)]
    # effective reference length: the closest to the candidate's, the shorter one on a tie
    ref_len = min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    return matches, totals, len(cand), ref_len


def _bleu_from(matches, totals, cand_len, ref_len, smooth: bool) -> float:
    if cand_len == 0:
        return 0.0
    log_p = 0.0
    for k, (m, t) in enumerate(zip(matches, totals)):
        if smooth and k > 0:
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        log_p += math.log(m / t) / len(matches)
    brevity = 0.0 if cand_len > ref_len else 1.0 - ref_len / cand_len
    return math.exp(brevity + log_p)


def bleu(candidate: str, references: str | Iterable[str], n: int = 4, *,
         smooth: bool = True) -> float:
    """Sentence BLEU-n in [0, 1] (uniform weights, clipped counts, brevity penalty).

    Smoothing (``smooth=True``): "BLEU+1" of Lin & Och (2004): the k-gram precisions for
    k >= 2 are ``(matches + 1) / (total + 1)``; the unigram precision is not smoothed, so a
    candidate with no word in common with the references scores 0. ``smooth=False`` is plain
    BLEU, which is 0 whenever some k-gram order has no match. The brevity penalty uses the
    reference length closest to the candidate's (the shorter on a tie); an empty candidate
    scores 0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return _bleu_from(*_bleu_stats(candidate, references, n), smooth=smooth)


def corpus_bleu(candidates: Sequence[str], references: Sequence[str | Sequence[str]],
                n: int = 4) -> float:
    """Corpus BLEU-n (Papineni et al. 2002): matches, totals and lengths summed over sentences
    before the precisions and the brevity penalty are formed; no smoothing."""
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of strings, not a string")
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    matches, totals, c_len, r_len = [0] * n, [0] * n, 0, 0
    for cand, refs in zip(candidates, references):
        m, t, c, r = _bleu_stats(cand, refs, n)
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
        c_len, r_len = c_len + c, r_len + r
    return _bleu_from(matches, totals, c_len, r_len, smooth=False)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str | Iterable[str], *, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin 2004) on ``words``: with ``L = LCS(candidate, reference)``,
    ``P = L / len(candidate)``, ``R = L / len(reference)``,
    ``F = (1 + beta^2) P R / (R + beta^2 P)``.

    ``beta=1`` (default) is the F1 of Google's rouge-score; the COCO caption code uses
    ``beta=1.2``. Several references: the maximum F over them. An empty candidate or
    reference scores 0.
    """
    cand = words(candidate)
    best = 0.0
    for ref in _references(reference, "rouge_l"):
        r = words(ref)
        lcs = _lcs(cand, r) if cand and r else 0
        if lcs == 0:
            continue
        p, rec = lcs / len(cand), lcs / len(r)
        best = max(best, (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p))
    return best
