"""The head atlas data (atlas.json, the inlined page data) and readable token forms."""
import importlib
import json
import re

import pytest
import torch
from tokenizers import pre_tokenizers

import hp_fast
from hp_fast.cli import main as cli_main
from hp_fast.atlas import build_atlas, load_atlas, resolve_concepts, write_atlas
from hp_fast.atlas_page import inline_json, render_page
from hp_fast.token_display import (byte_alphabet, readable_token, search_key, token_scheme,
                                   visible_text)
from helpers.tiny_models import tiny_model, tiny_tokenizer
from helpers.tokenizers_fixtures import bytelevel_bpe, llama_sp_bpe, sp_unigram

PROMPTS = ["the red car is big", "what is the capital of france", "one two three four",
           "a happy dog and a sad cat", "the sky is blue"]


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _one(tok, text):
    ids = _ids(tok, text)
    assert len(ids) == 1, (text, tok.convert_ids_to_tokens(ids))
    return ids[0]


# ----------------------------------------------------------------------------- readable_token

def test_byte_alphabet_is_the_gpt2_byte_level_alphabet():
    table = byte_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["A"] == 0x41


def test_readable_token_byte_level_bpe():
    tok = bytelevel_bpe()
    assert token_scheme(tok) == "bytelevel"
    assert tok.convert_ids_to_tokens(_one(tok, " red")) == "Ġred"
    assert readable_token(tok, _one(tok, " red")) == "␣red"
    assert readable_token(tok, _one(tok, "red")) == "red"
    assert readable_token(tok, _one(tok, " France")) == "␣France"
    assert readable_token(tok, _one(tok, "\n")) == "⟨0x0A⟩"
    assert readable_token(tok, _one(tok, "\t")) == "⟨0x09⟩"
    assert readable_token(tok, _one(tok, " ")) == "␣"
    # "é" is two bytes, each a token of its own: neither is valid UTF-8 alone
    assert [readable_token(tok, i) for i in _ids(tok, "é")] == ["⟨0xC3⟩", "⟨0xA9⟩"]
    assert readable_token(tok, 0) == "<|endoftext|>"  # special tokens stay as they are


def test_readable_token_matches_the_byte_level_decoder_on_every_token():
    """Undo the markers of readable_token: the tokenizer's own decoder must agree."""
    tok = bytelevel_bpe()
    unescape = lambda s: re.sub(r"⟨0x([0-9A-F]{2})⟩", lambda m: chr(int(m.group(1), 16)),
                                s.replace("␣", " "))
    checked = 0
    for i in range(len(tok)):
        text = tok.decode([i])
        if i in tok.all_special_ids or "\ufffd" in text:
            continue
        assert unescape(readable_token(tok, i)) == text, (i, tok.convert_ids_to_tokens(i))
        checked += 1
    assert checked > 150


def test_visible_text_multibyte_and_invisible_characters():
    assert visible_text("é") == "é"
    assert visible_text("  two words ") == "␣␣two words␣"
    assert visible_text("a\u200bb") == "a⟨U+200B⟩b"
    assert visible_text("\u00a0x") == "⟨0xA0⟩x"
    assert visible_text("   ") == "␣␣␣"
    assert visible_text("\udce2") == "⟨0xE2⟩"  # an undecodable byte (surrogateescape)


@pytest.mark.parametrize("legacy", [False, True])
def test_readable_token_sentencepiece_bpe(legacy):
    tok = llama_sp_bpe(legacy)
    assert token_scheme(tok) == "sentencepiece"
    vocab = tok.get_vocab()
    assert readable_token(tok, vocab["▁red"]) == "␣red"
    assert readable_token(tok, vocab["red"]) == "red"
    assert readable_token(tok, vocab["▁▁"]) == "␣␣"
    assert readable_token(tok, vocab["<0x0A>"]) == "⟨0x0A⟩"
    assert readable_token(tok, vocab["<0x41>"]) == "A"
    assert readable_token(tok, vocab["<0x20>"]) == "␣"
    assert readable_token(tok, vocab["<0xE2>"]) == "⟨0xE2⟩"
    assert readable_token(tok, vocab["<s>"]) == "<s>"


def test_readable_token_sentencepiece_unigram_and_plain():
    tok = sp_unigram()
    assert token_scheme(tok) == "sentencepiece"
    vocab = tok.get_vocab()
    assert readable_token(tok, vocab["▁United"]) == "␣United"
    assert readable_token(tok, vocab["▁"]) == "␣"
    assert readable_token(tok, vocab["<unk>"]) == "<unk>"
    plain = tiny_tokenizer()
    assert token_scheme(plain) == "plain"
    assert readable_token(plain, plain.get_vocab()["red"]) == "red"


def test_readable_token_ids_past_the_vocabulary_and_negative():
    tok = tiny_tokenizer()
    assert readable_token(tok, len(tok) + 3) == f"⟨unused id {len(tok) + 3}⟩"
    with pytest.raises(ValueError, match="negative"):
        readable_token(tok, -1)


def test_search_key():
    assert search_key("␣France") == "france"
    assert search_key("red") == search_key("␣Red") == "red"
    assert search_key("␣␣") == ""


# ----------------------------------------------------------------------------- atlas data

@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    acts = hp_fast.capture(model, tok, PROMPTS)
    data = build_atlas(model, tok, acts, k_tokens=6, lens_k=4, progress=False)
    return model, tok, acts, data


def test_atlas_structure(tiny):
    model, tok, acts, data = tiny
    ad = hp_fast.get_adapter(model)
    assert data["num_layers"] == ad.num_layers and data["num_heads"] == ad.num_heads
    assert data["model"]["model_type"] == "llama" and data["model"]["vocab_size"] == 96
    assert data["settings"]["k_tokens"] == 6 and data["settings"]["num_samples"] == len(PROMPTS)
    # the tiny word-level vocabulary has no country or toxic word: those are skipped, with why
    assert set(data["concepts"]) | set(data["skipped_concepts"]) == set(hp_fast.builtin_concepts())
    assert "colors" in data["concepts"] and "countries" in data["skipped_concepts"]
    heads = data["heads"]
    assert [(h["layer"], h["head"]) for h in heads] == [
        (l, h) for l in range(ad.num_layers) for h in range(ad.num_heads)]
    for h in heads:
        n = len(h["token_ids"])
        assert 1 <= n <= 6 and len(h["evr"]) == len(h["tokens"]) == len(h["tokens_raw"]) == n
        assert h["tokens"] == [readable_token(tok, i) for i in h["token_ids"]]
        assert h["tokens_keys"] == [search_key(t) for t in h["tokens"]]
        assert all(0 <= e <= 1 + 1e-6 for e in h["evr"])
        assert all(b >= a - 1e-6 for a, b in zip(h["evr"], h["evr"][1:]))  # EVR never drops
        assert len(h["logit_lens_ids"]) == len(h["logit_lens"]) == 4
        assert set(h["concepts"]) == set(data["concepts"])


def test_atlas_tokens_equal_describe_heads_and_logit_lens(tiny):
    model, tok, acts, data = tiny
    heads = [(0, 0), (1, 3), (2, 5)]
    desc = hp_fast.describe_heads(acts, model, tok, heads, k=6)
    lens = hp_fast.logit_lens_tokens(acts, model, tok, heads, k=4)
    H = data["num_heads"]
    for l, h in heads:
        entry = data["heads"][l * H + h]
        assert [tok.decode([i]) for i in entry["token_ids"]] == desc[(l, h)]
        assert [tok.decode([i]) for i in entry["logit_lens_ids"]] == lens[(l, h)]


def test_atlas_concept_scores_equal_rank_heads(tiny):
    model, tok, acts, data = tiny
    ranking = hp_fast.rank_heads(acts, model, tok, "colors", progress=False)
    got = torch.tensor([[data["heads"][l * data["num_heads"] + h]["concepts"]["colors"]
                         for h in range(data["num_heads"])] for l in range(data["num_layers"])])
    torch.testing.assert_close(got, ranking.scores, atol=1e-6, rtol=0)


def test_write_atlas_json_and_page(tiny, tmp_path):
    *_, data = tiny
    data = dict(data, title="atlas </script><script>alert(1)</script> & co")
    json_path, html_path = write_atlas(data, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["atlas.json", "index.html"]
    assert load_atlas(tmp_path / "out") == json.loads(json_path.read_text())
    page = html_path.read_text(encoding="utf-8")
    block = re.search(r'<script type="application/json" id="atlas-data">(.*?)</script>', page, re.S)
    assert json.loads(block.group(1)) == load_atlas(json_path)  # the inlined data is the file's
    assert page.count("</script>") == 2  # the hostile title closed no script block
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:|#)[a-z]+:""", page)


def test_inline_json_escapes_and_refuses_nan():
    text = inline_json({"t": "</script><!-- & \u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": "</script><!-- & \u2028"}
    with pytest.raises(ValueError):
        inline_json({"x": float("nan")})
    assert "__ATLAS_DATA__" not in render_page({"title": "x", "heads": []})


def test_atlas_bad_inputs_fail_before_any_work(tiny, tmp_path, monkeypatch):
    model, tok, acts, _ = tiny
    mod = importlib.import_module("hp_fast.atlas")
    monkeypatch.setattr(mod, "capture", lambda *a, **k: pytest.fail("capture ran"))
    monkeypatch.setattr(mod, "vocabulary_pursuit", lambda *a, **k: pytest.fail("SOMP ran"))
    bad = tmp_path / "nothing.txt"
    bad.write_text("zzzqqq\nxxyyzz\n")
    with pytest.raises(ValueError, match="nothing.txt"):
        hp_fast.atlas(model, tok, PROMPTS, tmp_path / "a", concept_files=[bad])
    with pytest.raises(ValueError, match="does-not-exist"):
        hp_fast.atlas(model, tok, PROMPTS, tmp_path / "a", concept_files=[tmp_path / "does-not-exist.txt"])
    with pytest.raises(ValueError, match="k_tokens"):
        hp_fast.atlas(model, tok, PROMPTS, tmp_path / "a", k_tokens=0)
    with pytest.raises(ValueError, match="list of prompt"):
        hp_fast.atlas(model, tok, "prompts.txt", tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        hp_fast.atlas(model, tok, acts, tmp_path / "file")
    with pytest.raises(ValueError, match="unknown concept"):
        hp_fast.atlas(model, tok, acts, tmp_path / "a", concepts=["colours"])
    assert not (tmp_path / "a").exists()


def test_resolve_concepts_names_files_and_duplicates(tmp_path):
    tok = tiny_tokenizer()
    f = tmp_path / "colors.txt"
    f.write_text("red\nblue\n")
    chosen, skipped = resolve_concepts(tok, ["colors", "countries"], [f])
    assert [name for name, *_ in chosen] == ["colors", "colors'"]
    assert list(skipped) == ["countries"]
    assert chosen[1][2].ids.tolist() == sorted(tok.convert_tokens_to_ids(["red", "blue"]))


def test_cli_atlas_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    loading = importlib.import_module("hp_fast.models.loading")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (tiny_model("llama"), tiny_tokenizer()))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    words = tmp_path / "pets.txt"
    words.write_text("cat\ndog\nbird\nfish\n")
    rc = cli_main(["atlas", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                           "--concepts", "colors", "--concept-file", str(words),
                           "--k-tokens", "5", "--no-chat-template"])
    assert rc == 0, capsys.readouterr().err
    data = load_atlas(tmp_path / "out")
    assert data["concepts"] == ["colors", "pets"] and data["settings"]["k_tokens"] == 5
    assert data["heads"][0]["concepts"]["pets"] is not None
    assert (tmp_path / "out" / "index.html").is_file()
    rc = cli_main(["atlas", "--prompts", str(prompts), "--out", str(tmp_path / "o2"),
                           "--concept-file", str(tmp_path / "missing.txt")])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_lens_ids_match_a_per_head_reference(arch):
    """The batched lens (one product per 256 heads) against the plain per-head write."""
    from hp_fast.ranking import logit_lens_ids
    model, tok = tiny_model(arch, seed=3), tiny_tokenizer()
    acts = hp_fast.capture(model, tok, PROMPTS[:3], progress=False)
    ad = hp_fast.get_adapter(model)
    D = ad.unembedding().detach().double()  # (v, d)
    every = [(l, h) for l in range(ad.num_layers) for h in range(ad.num_heads)]
    heads = every[::-1] * 20  # odd order, duplicates, more than one chunk of 256
    got = logit_lens_ids(acts, model, heads, k=7)
    assert set(got) == set(every)
    for l, h in every:
        logits = D @ acts.head_outputs(l, h).double().mean(0)  # (v,)
        want = torch.topk(logits, 7).values
        torch.testing.assert_close(logits[got[(l, h)]], want, atol=1e-5, rtol=0)
