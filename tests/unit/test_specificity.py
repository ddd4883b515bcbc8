"""The specificity protocol: next-token scorer vs its plain twin, the held-out split, the
contrastive rule, and the whole protocol end to end on a tiny random model (2 concepts)."""
from __future__ import annotations

import json

import pytest
import torch

import hp_fast
from hp_fast.data.concept_sets import CONCEPTS, Item, concept_items
from hp_fast.edits import uniform_gains
from hp_fast.evaluation.nexttoken import (answer_token_ids, next_token_scores,
                                          next_token_scores_reference)
from hp_fast.evaluation.specificity import (Sizes, choose_rule, other_items, passes_bar,
                                            run_specificity, split_concept, uniform_sets)
from helpers.tiny_models import WORDS, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(n, seed=0, lo=2, hi=7):
    g = torch.Generator().manual_seed(seed)
    words = [w for w in WORDS]
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (L,), generator=g)))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_next_token_scores_match_plain_twin(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    prompts = _prompts(7, seed=1) + ["red"]  # odd count, a one-word prompt
    gold = [[5 + i % 4, 9] if i % 2 else [7] for i in range(len(prompts))]
    configs = [None, uniform_gains([(2, 1)], -1.0), uniform_gains([(0, 3), (1, 0)], -1.0),
               uniform_gains([(2, 1)], -1.0), {(1, 5): 0.0, (2, 2): 5.0}]  # a duplicate config
    fast = next_token_scores(model, tok, prompts, configs, gold, batch_size=5, progress=False)
    ref = next_token_scores_reference(model, tok, prompts, configs, gold)
    # float32, tiny model: same computation up to summation order (padding, batch, trunk rows)
    assert torch.allclose(fast["prob"], ref["prob"], atol=1e-5)
    assert torch.equal(fast["top"], ref["top"]) and torch.equal(fast["hit"], ref["hit"])
    assert not torch.equal(fast["prob"][0], fast["prob"][2])  # edits change something


def test_answer_token_ids_real_tokenizer_forms():
    tok = tiny_tokenizer()
    assert answer_token_ids(tok, ["red", "red", "blue"]) == [tok.convert_tokens_to_ids("red"),
                                                            tok.convert_tokens_to_ids("blue")]


def test_split_and_other_items():
    items = [Item(f"p{i}", ("a",), "x", "a") for i in range(10)]
    known = [True, False, True, True, True, True, False, True]  # items[2:] scored
    s = split_concept(items, known, n_train=2, n_val=2, n_test=3)
    assert [it.prompt for it in s["train"]] == ["p0", "p1"]
    assert [it.prompt for it in s["val"]] == ["p2", "p4"]
    assert [it.prompt for it in s["test"]] == ["p5", "p6", "p7"] and [it.prompt for it in s["spare"]] == ["p9"]
    splits = {"a": {"test": [1, 2, 3]}, "b": {"test": [4, 5]}, "c": {"test": [6]}}
    assert other_items(splits, "a", "test", 4) == [4, 6, 5]


def test_uniform_sets_and_bar():
    sets = uniform_sets(4, 3, 5, 6, seed=0)
    assert len(sets) == 6 and all(len(set(s)) == 4 for s in sets)
    assert sets == uniform_sets(4, 3, 5, 6, seed=0) and sets != uniform_sets(4, 3, 5, 6, seed=1)
    good = {"acc": {"target": 0.4, "other": 0.9}, "vs_layer_matched": {"n": 20, "index": {"p": 1 / 21}}}
    assert passes_bar(good, 8, 270)
    assert not passes_bar(good, 9, 270)  # 9 > 3 % of 270
    assert not passes_bar({**good, "vs_layer_matched": {"n": 19, "index": {"p": 0.05}}}, 8, 270)
    assert not passes_bar({**good, "acc": {"target": 0.6, "other": 0.9}}, 8, 270)


def _evidence(tune_best: str, held_best: str):
    ev = {}
    for c, best in (("countries", tune_best), ("languages", tune_best), ("numbers", held_best)):
        ev[c] = {r: {3: {"index": 0.5 if r == best else 0.1, "other": 0.9, "target": 0.4}}
                 for r in ("random/mean", "none/mean", "contrastive/mean")}
    return ev


def test_choice_uses_tuning_concepts_only():
    tuning = ["countries", "languages"]
    base = choose_rule(_evidence("none/mean", "none/mean"), tuning)
    assert base == "none/mean"
    # held-out results change completely: the choice does not move
    assert choose_rule(_evidence("none/mean", "contrastive/mean"), tuning) == base
    # tuning results change: the choice follows them (so this test can fail)
    assert choose_rule(_evidence("contrastive/mean", "none/mean"), tuning) == "contrastive/mean"
    with pytest.raises(ValueError, match="tuning evidence"):
        choose_rule(_evidence("none/mean", "none/mean"), ["colors"])


def test_bar_criterion_prefers_specific_edits_over_breaking_everything():
    cell_break = {"target": 0.0, "other": 0.4, "index": 0.6}   # breaks both, target a bit more
    cell_spec = {"target": 0.45, "other": 0.9, "index": 0.45}  # the bar's kind of edit
    ev = {"countries": {"none/mean": {2: cell_break}, "random/mean": {2: cell_spec}}}
    assert choose_rule(ev, ["countries"], "index") == "none/mean"
    assert choose_rule(ev, ["countries"], "bar") == "random/mean"
    with pytest.raises(ValueError, match="criterion"):
        choose_rule(ev, ["countries"], "best")


def test_contrastive_rule_and_its_errors():
    model, tok = tiny_model(), tiny_tokenizer()
    acts = hp_fast.capture(model, tok, _prompts(6, 2), chat_template=False, progress=False)
    other = hp_fast.capture(model, tok, _prompts(5, 3), chat_template=False, progress=False)
    words = ["red", "green", "blue", "yellow"]
    with pytest.raises(ValueError, match="contrast"):
        hp_fast.rank_heads(acts, model, tok, words, baseline="contrastive", progress=False)
    r = hp_fast.rank_heads(acts, model, tok, words, baseline="contrastive", contrast=other, progress=False)
    raw = hp_fast.rank_heads(acts, model, tok, words, baseline="none", progress=False)
    on_other = hp_fast.rank_heads(other, model, tok, words, baseline="none", progress=False)
    assert torch.allclose(r.scores, raw.scores - on_other.scores, atol=1e-6)
    assert r.options["baseline"] == "contrastive"


def _tiny_items(model, tok, words, template, kind, n, seed):
    """Items the tiny model knows (gold = its own greedy next word) and some it does not."""
    prompts = [f"{template} {p}" for p in _prompts(n, seed, 1, 4)]
    top = next_token_scores(model, tok, prompts, [None], [[0]] * n, progress=False)["top"][0]
    items = []
    for i, (p, t) in enumerate(zip(prompts, top)):
        word = tok.convert_ids_to_tokens(int(t))  # None for ids past the tokenizer's words
        answer = word if (i % 4 and word) else words[i % len(words)]  # every 4th: likely unknown
        items.append(Item(p, (answer,), kind, answer))
    return items


def test_specificity_end_to_end_on_tiny_model(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    countries = ["france", "germany", "italy", "spain", "japan", "china"]
    item_sets = {"colors": (_tiny_items(model, tok, colors, "what color is", "colors", 40, 4), colors),
                 "countries": (_tiny_items(model, tok, countries, "which country", "countries", 40, 5),
                               countries)}
    sizes = Sizes(ks=(1, 2), n_train=6, n_val=3, n_test=5, pool_max=30, n_controls=3,
                  n_rule_controls=1, n_uniform=2, n_resamples=100, batch_size=32)
    res = run_specificity(model, tok, tmp_path, concepts=["colors", "countries"], tuning=["colors"],
                          item_sets=item_sets, sizes=sizes, log=lambda *a: None)
    assert res["held_out"] == ["countries"] and res["chosen"] in res["rules"]
    assert res["chosen"] == choose_rule(res["tuning_evidence"], ["colors"])
    assert set(res["tuning_evidence"]) == {"colors"}  # nothing measured on held-out items to tune
    for c in ("colors", "countries"):
        rep = res["report"][c]
        assert rep["n_target"] == 5 and rep["n_other"] == 5
        for r, by_k in rep["cells"].items():
            for k, cell in by_k.items():
                a = cell["acc"]
                lo, hi = a["target_ci"]
                assert lo <= a["target"] + 1e-9 and a["target"] <= hi + 1e-9
                assert cell["vs_uniform"]["n"] == 2
                n_lm = 3 if r == res["chosen"] else 1
                assert cell["vs_layer_matched"]["n"] == n_lm
                assert len(cell["heads"]) == k
                assert 1 <= cell["vs_layer_matched"]["index"]["rank"] <= n_lm + 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["bootstrap"]["method"] == "percentile"
    report = (tmp_path / "report.md").read_text()
    assert "index [95 % CI]" in report and "countries" in report
    assert (tmp_path / "colors_curves.png").stat().st_size > 0 and (tmp_path / "index_k2.png").exists()


def test_bad_inputs_fail_before_work(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    with pytest.raises(ValueError, match="proper subset"):
        run_specificity(model, tok, tmp_path, concepts=["colors"], tuning=["colors"], item_sets={})
    with pytest.raises(ValueError, match="no items"):
        run_specificity(model, tok, tmp_path, concepts=["colors", "countries"], tuning=["colors"],
                        item_sets={"colors": ([], [])})


def test_builtin_concept_items_are_offline_and_large():
    sizes = {c: len(concept_items(c)) for c in CONCEPTS}
    assert len(sizes) >= 6 and all(n >= 200 for n in sizes.values()), sizes
    it = concept_items("elements")[0]
    assert it.prompt == "The chemical element with the symbol H is" and it.answers[0] == "hydrogen"


def test_rank_rules_shares_the_concept_pursuit_but_matches_rank_heads():
    from hp_fast.evaluation.specificity import RULES, rank_rules
    model, tok = tiny_model(), tiny_tokenizer()
    from hp_fast.capture import capture_many
    acts = capture_many(model, tok, _prompts(11, 7), chat_template=False, progress=False)
    words = ["red", "green", "blue", "yellow", "paris"]
    own, rest = list(range(6)), list(range(6, 11))
    got = rank_rules(model, tok, acts, own, rest, words, RULES)
    from hp_fast.evaluation.specificity import subset
    for name, (agg, baseline) in RULES.items():
        mine = subset(acts[agg], own, model)
        contrast = subset(acts[agg], rest, model) if baseline == "contrastive" else None
        want = hp_fast.rank_heads(mine, model, tok, words, baseline=baseline, contrast=contrast,
                                  progress=False)
        assert torch.allclose(got[name].scores, want.scores, atol=1e-6), name
        assert got[name].top(4) == want.top(4)
