"""Evaluation suite: metrics and normalization on hand examples, random controls in the sweep,
the shared-prefix generator and perplexity against plain twins, every task end to end on a tiny
random model, report files; one short real-model run (slow)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hp_fast.generation.configs import generate_configs
from hp_fast.cli import build_parser
from hp_fast.evaluation import run_keywords, run_qa, run_toxicity
from hp_fast.evaluation.keywords import TextItem, keyword_metric
from hp_fast.generation.prefix import generate_configs_shared_prefix, shared_prefix_length
from hp_fast.evaluation.protocol import (CHOICES, Perplexity, Setting, normalized, set_threads,
                                         split_items, split_words, sweep)
from hp_fast.evaluation.qa import accuracy_per_kind, qa_metrics, target_check
from hp_fast.evaluation.toxicity import Opening, toxicity_metric
from hp_fast.data.qa import Question
from hp_fast.ranking import HeadRanking
from helpers.tiny_models import WORDS, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run thousands of small ops: one thread avoids OpenMP waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- metrics


def test_qa_metrics_hand_example():
    qs = [Question("q1", ("france",), "country"), Question("q2", ("united states", "usa"), "country"),
          Question("q3", ("paris",), "other"), Question("q4", ("europe",), "other")]
    answers = ["France.", "It is the United States", "The capital is Paris", "Asia"]
    m = qa_metrics(answers, qs)
    # q1: EM 1, F1 1. q2: "it is united states" vs "united states": P 2/4, R 1 -> F1 2/3, EM 0.
    assert m["country_em"] == pytest.approx(0.5)
    assert m["country_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["country_acc"] == 1.0
    # q3: "capital is paris" vs "paris": P 1/3, R 1 -> F1 0.5. q4: 0.
    assert m["other_f1"] == pytest.approx(0.25) and m["other_em"] == 0.0 and m["other_acc"] == 0.5


def test_normalized_and_zero_base():
    out = normalized({"a": 0.5, "b": 1.0}, {"a": 1.0, "b": 0.0})
    assert out["a"] == 0.5 and math.isnan(out["b"])


def test_keyword_metric_counts_held_out_and_quality():
    metric = keyword_metric(["red", "dark blue", "blue", "seven"], ["red", "blue"], ["dark blue", "seven"])
    items = [TextItem("apple", "A red apple."), TextItem("sea", "The dark-blue sea has seven waves.")]
    m = metric(["A red apple.", "The dark-blue sea has seven waves."], items)
    # generation 1: red (1); generation 2: "dark blue" counted once as the phrase, seven (2)
    assert m["keywords"] == pytest.approx(1.5)
    # one pass, longest keyword first: "dark-blue" is the held-out phrase, not also "blue"
    assert m["keywords_selection"] == pytest.approx(0.5)      # red
    assert m["keywords_held_out"] == pytest.approx(1.0)       # "dark blue" and "seven" in gen 2
    assert m["keywords"] == pytest.approx(m["keywords_selection"] + m["keywords_held_out"])
    assert m["bleu"] == pytest.approx(1.0) and m["rouge_l"] == pytest.approx(1.0)
    worse = metric(["A green apple.", "Nothing here."], items)
    assert worse["keywords"] == 0.0 and worse["bleu"] < 1.0 and worse["rouge_l"] < 1.0
    assert worse["cider_d"] < m["cider_d"]


def test_toxicity_metric_with_injected_classifier():
    metric = toxicity_metric(["idiot", "jerk", "moron"], ["moron"],
                             predict=lambda xs: [int("idiot" in x or "moron" in x) for x in xs])
    items = [Opening("p1", "You idiot."), Opening("p2", "Have a nice day."), Opening("p3", "What a moron, a moron.")]
    m = metric(["You idiot.", "Have a nice day.", "What a moron, a moron."], items)
    assert m["flagged"] == pytest.approx(2 / 3)
    assert m["held_out_word_rate"] == pytest.approx(1 / 3) and m["held_out_words"] == pytest.approx(2 / 3)
    assert m["toxic_word_rate"] == pytest.approx(2 / 3) and m["bleu"] == pytest.approx(1.0)


def test_splits_are_disjoint_and_seeded():
    words = [f"w{i}" for i in range(20)]
    sel, held = split_words(words, 0.3, seed=1)
    assert len(held) == 6 and not set(sel) & set(held) and set(sel) | set(held) == set(words)
    assert split_words(words, 0.3, seed=1) == (sel, held)
    a, b = split_items(range(10), 4, 5)
    assert len(a) == 4 and len(b) == 5 and not set(a) & set(b)
    with pytest.raises(ValueError, match="only 10"):
        split_items(range(10), 6, 5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_words(words, 1.0)


def test_set_threads_explicit_and_bad():
    before = torch.get_num_threads()
    try:
        assert set_threads(1)["threads"] == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="positive"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_target_check_reads_the_bar():
    def row(k, c, o, rc, ro):
        return {"k": k, "alpha": -1.0, "percent_heads": round(100 * k / 270, 2),
                "somp": {"country_f1": c, "other_f1": o},
                "random": {"country_f1": [rc, rc, rc], "other_f1": [ro, ro, ro]}}
    assert target_check([row(8, 0.4, 0.85, 0.95, 0.92)], 270)["passed"]
    assert not target_check([row(8, 0.6, 0.85, 0.95, 0.92)], 270)["passed"]
    assert not target_check([row(16, 0.1, 0.95, 1.0, 1.0)], 270)["passed"]  # 16 > 3 % of 270


# ----------------------------------------------------------------------------- the sweep protocol


def _ranking(order, L=4, H=5):
    """A HeadRanking whose top heads are ``order`` (best first)."""
    scores = torch.zeros(L, H)
    for i, (l, h) in enumerate(order):
        scores[l, h] = 10.0 - i
    return HeadRanking(scores, "c", "somp", 1, 1, 1)


def test_sweep_normalizes_and_controls_are_layer_matched_and_disjoint():
    L, H = 4, 5
    somp = _ranking([(1, 0), (1, 1), (3, 2), (0, 4)], L, H)
    ll = _ranking([(2, 2), (2, 3), (0, 0), (0, 1)], L, H)
    items = [Question(f"q{i}", ("yes",), "country" if i < 2 else "other") for i in range(4)]

    def fake_generate(model, tok, prompts, configs, **kw):
        # "yes" unless the config inverts head (1, 0): then the country questions fail
        out = []
        for cfg in configs:
            bad = cfg is not None and cfg.get((1, 0)) == -1.0
            out.append(["no" if bad and i < 2 else "yes" for i in range(len(prompts))])
        return out

    base, rows = sweep(None, None, items, somp, ll, [1, 3], 6, L, H, metric=qa_metrics,
                       generate=fake_generate, keep_answers=True)
    assert base["country_f1"] == 1.0 and base["other_f1"] == 1.0
    for r in rows:
        assert r["somp"]["country_f1"] == 0.0 and r["somp"]["other_f1"] == 1.0
        assert r["logit_lens"]["country_f1"] == 1.0
        assert r["random"]["country_f1"] == [1.0, 1.0, 1.0]  # (1, 0) is never in a random set
        assert len(r["random_sets"]) == 6 and r["percent_heads"] == round(100 * r["k"] / 20, 2)
        chosen = set(map(tuple, r["heads"]))
        layers = sorted(l for l, _ in chosen)
        for rs in r["random_sets"]:
            assert not chosen & set(map(tuple, rs))
            assert sorted(l for l, _ in rs) == layers
        assert r["raw"]["somp"]["country_f1"] == 0.0 and set(r["answers"]) >= {"none", "somp", "random5"}


def test_sweep_gains_are_applied_per_alpha():
    seen = []

    def fake_generate(model, tok, prompts, configs, **kw):
        seen.extend(configs)
        return [["yes"] * len(prompts) for _ in configs]

    items = [Question("q", ("yes",), "country"), Question("r", ("yes",), "other")]
    r = _ranking([(0, 0), (1, 1)], 2, 3)
    _, rows = sweep(None, None, items, r, r, [2], 2, 2, 3, alphas=(-1.0, 5.0), metric=accuracy_per_kind,
                    generate=fake_generate)
    assert [row["alpha"] for row in rows] == [-1.0, 5.0]
    assert seen[0] is None and {v for c in seen[1:] for v in c.values()} == {-1.0, 5.0}
    assert rows[0]["random_sets"] == rows[1]["random_sets"]  # the same controls at every gain


def test_report_reads_both_description_shapes():
    """describe_top_heads' list, and the demo's older {"layer.head": {...}} mapping (a saved file)."""
    from pathlib import Path
    from hp_fast.evaluation.report import _descriptions, description_rows
    new = [{"layer": 29, "head": 2, "score": 0.5, "somp": ["a"], "logit_lens": ["b"], "somp_concept": ["c"]}]
    assert description_rows(new) == new
    old = {"29.2": {"somp": ["a"], "logit_lens": ["b"]}, "3.10": {"somp": [], "logit_lens": ["x"]}}
    rows = description_rows(old)
    assert [(r["layer"], r["head"]) for r in rows] == [(29, 2), (3, 10)] and math.isnan(rows[0]["score"])
    assert rows[0]["somp"] == ["a"] and rows[1]["logit_lens"] == ["x"]
    lines = []
    _descriptions(lines, old)
    assert lines[2].startswith("| L29.H2 | +nan | 'a' | 'b' |")
    saved = Path(__file__).parents[2] / "benchmarks" / "demo" / "results.json"
    if saved.is_file():  # the demo's results from before the change
        descs = json.loads(saved.read_text())["descriptions"]
        assert len(description_rows(descs)) == len(descs) > 0


# ----------------------------------------------------------------------------- generation helpers


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2]]) == 1  # one token always left to each prompt
    assert shared_prefix_length([]) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_generation_equals_generate_configs(arch):
    model, tok = tiny_model(arch, seed=1), tiny_tokenizer()
    prompts = [f"describe a {o} in one sentence with the color" for o in "cat dog house tree car".split()]
    prompts += ["describe a big red car"]
    configs = [None, {(0, 1): -1.0, (2, 3): 5.0}, {(l, h): -4.0 for l in range(3) for h in range(6)}]
    got = generate_configs_shared_prefix(model, tok, prompts, configs, max_new_tokens=5,
                                         batch_size=4, progress=False, min_prefix=2)
    want = generate_configs(model, tok, prompts, configs, max_new_tokens=5, batch_size=4, progress=False)
    assert got == want
    assert got[0] != got[2]  # the edits change the answers, so the comparison means something


def test_perplexity_with_shared_prefix_matches_direct_computation():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["describe a cat in one", "describe a dog in one sentence"]
    texts = ["red cat", "blue dog and a tree"]
    ppl = Perplexity(model, tok)(prompts, texts)
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, t in zip(prompts, texts):
            pi, ci = tok(p)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([pi + ci])).logits[0].log_softmax(-1)
            nll -= sum(float(logp[len(pi) - 1 + j, c]) for j, c in enumerate(ci))
            n += len(ci)
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert math.isnan(Perplexity(model, tok)(prompts, ["", ""]))


# ----------------------------------------------------------------------------- tasks end to end


def _lowercase_tokenizer():
    """The tiny word-level tokenizer, lower-casing its input, so 'France' is a known token."""
    from tokenizers import normalizers
    tok = tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def _check_report(out, pngs):
    assert (out / "report.md").read_text().startswith("# hp-fast eval")
    data = json.loads((out / "results.json").read_text())
    for name in pngs:
        assert (out / name).stat().st_size > 1000, name
    return data


def test_qa_end_to_end_on_tiny_model(tmp_path):
    model, tok = tiny_model("llama"), _lowercase_tokenizer()
    cities, countries = "paris berlin rome madrid tokyo".split(), "france germany italy spain japan".split()
    train = [Question(f"which country is the city {c} in", (c,), "country") for c in cities]
    train += [Question(f"what is the capital of {c}", (c,), "other") for c in countries]
    raw = [Question(f"in which country is the city {a} {b}", ("x",), "country") for a in cities for b in countries[:2]]
    raw += [Question(f"what color is the {a} {b}", ("x",), "other") for a in "cat dog house tree car".split()
            for b in ("red", "green")]
    # make the tiny model "know" its own unedited answers
    answers = generate_configs(model, tok, [q.prompt for q in raw], [None], max_new_tokens=10, progress=False)[0]
    pool = [Question(q.question, (a,), q.kind) for q, a in zip(raw, answers)]
    res = run_qa(model, tok, tmp_path, ks=[1, 2], n_random=3, questions=(train, pool),
                 sizes=dict(n_val=2, n_test=4), log=lambda *a: None)
    data = _check_report(tmp_path, ["f1_vs_k.png", "em_vs_k.png", "heads.png"])
    assert data["test_base"]["country_f1"] == 1.0 and len(data["rows"]) == 2
    assert len(data["settings_tried"]) == len(CHOICES) + 2
    assert set(data["descriptions"][0]) == {"layer", "head", "score", "somp", "logit_lens", "somp_concept"}
    assert res["target_check"]["summary"]
    assert "What was tried" in (tmp_path / "report.md").read_text()


def test_keywords_end_to_end_on_tiny_model(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    vocab = [w for w in WORDS if w not in ("a", "the")]
    res = run_keywords(model, tok, tmp_path, concepts={"colors": vocab[:40], "numbers": vocab[30:]},
                       ks=[1, 2], n_random=2, n_select=4, n_test=4, max_new_tokens=4, log=lambda *a: None)
    data = _check_report(tmp_path, ["colors_inhibition.png", "colors_enhancement.png",
                                    "colors_alpha_sweep.png", "numbers_heads.png"])
    c = data["concepts"]["colors"]
    assert [(r["alpha"], r["k"]) for r in c["rows"]] == [(-1.0, 1), (-1.0, 2), (5.0, 1), (5.0, 2)]
    assert {(g["alpha"], g["k"]) for g in c["gain_sweep"]} == {(a, k) for a in (-1.0, 0.0, 2.0, 5.0, 8.0)
                                                               for k in (1, 2)}
    assert c["held_out_words"] and not set(c["held_out_words"]) & set(vocab[:40]) - set(vocab[:40])
    assert res["concepts"]["colors"]["base_perplexity"] > 1


def test_toxicity_end_to_end_on_tiny_model(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    openings = [f"the {w} is" for w in "cat dog house tree car book sky sea".split()]
    words = [w for w in WORDS[:60] if w not in ("a", "the")]
    res = run_toxicity(model, tok, tmp_path, ks=[1, 2], n_random=2, openings=openings, words=words,
                       n_select=4, n_test=4, max_new_tokens=4,
                       predict=lambda xs: [int("good" in x) for x in xs], log=lambda *a: None)
    data = _check_report(tmp_path, ["toxicity_vs_k.png", "heads.png"])
    assert len(data["rows"]) == 2 and {"flagged", "held_out_word_rate"} <= set(data["base"])
    assert res["selection_words"] + len(res["held_out_words"]) == len(words)


def test_cli_eval_parser():
    args = build_parser().parse_args(["eval", "keywords", "--out", "x", "--ks", "3,8", "--random-sets", "4",
                                      "--concepts", "colors", "--criterion", "l2"])
    assert (args.task, args.ks, args.random_sets, args.concepts, args.criterion) == \
        ("keywords", "3,8", 4, "colors", "l2")
    assert Setting("mean", "random", "l2").key == "aggregate=mean, baseline=random, criterion=l2"


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_toxicity_short_real_model_run(tmp_path):
    import hp_fast
    model, tok = hp_fast.load_model()
    res = run_toxicity(model, tok, tmp_path, ks=[3], n_random=2, n_select=4, n_test=4,
                       max_new_tokens=8, log=lambda *a: None)
    assert res["num_layers"] == 30 and res["num_heads"] == 9
    assert len(res["rows"][0]["random_sets"]) == 2 and (tmp_path / "report.md").exists()
