"""rank_heads / describe_heads / logit lens on a tiny model with a planted concept head."""
from __future__ import annotations

import pytest
import torch

import hp_fast
from hp_fast.models.adapters import get_adapter
from helpers.tiny_models import tiny_model, tiny_tokenizer

CONCEPT = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
PROMPTS = ["the city of paris is in france", "what color is the sky", "one two three four",
           "which country is berlin in", "a red car and a blue house", "describe a cat",
           "the sun and the moon", "how many birds", "a big river", "the dog is happy",
           "what is the capital of italy", "a small green tree"]
PLANTED = (2, 4)


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=3)
    ad = get_adapter(model)
    ids = hp_fast.concept_tokens(tok, CONCEPT).ids
    D_c = ad.unembedding()[ids]  # (c, d)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # head (2, 4) writes only inside span(concept unembeddings)
        cols = slice(PLANTED[1] * ad.head_dim, (PLANTED[1] + 1) * ad.head_dim)
        A = torch.randn(len(ids), ad.head_dim, generator=gen)
        ad.out_projs[PLANTED[0]].weight[:, cols] = D_c.T @ A / len(ids)
    acts = hp_fast.capture(model, tok, PROMPTS, chat_template=False, progress=False)
    return model, tok, acts, ids


@pytest.mark.parametrize("baseline", ["none", "random"])
@pytest.mark.parametrize("criterion", ["l1", "l2", "ormp"])
def test_planted_head_ranks_first(setup, baseline, criterion):
    model, tok, acts, ids = setup
    r = hp_fast.rank_heads(acts, model, tok, CONCEPT, k=10, criterion=criterion, baseline=baseline,
                           progress=False)
    assert r.top(1) == [PLANTED]
    assert r.raw_evr[PLANTED] > 0.999  # its writes lie in the concept span: fully explained
    assert r.scores.shape == (3, 6) and r.k == len(ids) == 10
    assert set(r.support[PLANTED].tolist()) <= set(ids.tolist())


def test_k_capped_layers_filter_and_json_roundtrip(setup, tmp_path):
    model, tok, acts, ids = setup
    r = hp_fast.rank_heads(acts, model, tok, CONCEPT, k=500, layers=[1, 2], baseline="none",
                           progress=False)
    assert r.k == len(ids) and r.k_requested == 500
    assert torch.isnan(r.scores[0]).all() and not torch.isnan(r.scores[1:]).any()
    assert all(layer in (1, 2) for layer, _ in r.top(100)) and len(r.top(100)) == 12
    back = hp_fast.HeadRanking.load(r.save(tmp_path / "r.json"))
    assert torch.equal(torch.isnan(back.scores), torch.isnan(r.scores))
    assert back.top(12) == r.top(12) and torch.equal(back.support, r.support)
    with pytest.raises(ValueError, match="out of range"):
        hp_fast.rank_heads(acts, model, tok, CONCEPT, layers=[7], progress=False)


def test_logit_lens_equals_manual_mean_logit(setup):
    model, tok, acts, ids = setup
    r = hp_fast.rank_heads(acts, model, tok, CONCEPT, method="logit_lens")
    ad = get_adapter(model)
    D_c = ad.unembedding()[ids]
    for layer, head in [(0, 0), (2, 4), (1, 5)]:
        logits = acts.head_outputs(layer, head) @ D_c.T  # (n, c)
        torch.testing.assert_close(r.scores[layer, head], logits.mean(), rtol=1e-4, atol=1e-5)


def test_describe_planted_head_writes_concept_tokens(setup):
    model, tok, acts, ids = setup
    desc = hp_fast.describe_heads(acts, model, tok, [PLANTED, (0, 1)], k=3)
    assert set(desc) == {PLANTED, (0, 1)} and all(len(v) == 3 for v in desc.values())
    assert set(desc[PLANTED]) <= set(CONCEPT)
    lens = hp_fast.logit_lens_tokens(acts, model, tok, [PLANTED], k=3)
    assert len(lens[PLANTED]) == 3


def test_bad_concept_and_method(setup):
    model, tok, acts, _ = setup
    with pytest.raises(ValueError, match="unknown concept"):
        hp_fast.rank_heads(acts, model, tok, "colours_typo", progress=False)
    with pytest.raises(ValueError, match="method"):
        hp_fast.rank_heads(acts, model, tok, CONCEPT, method="pca", progress=False)
