"""Shared trunk (hp_fast.generation.trunk): rows identical below the first edited layer run once there.

Reference twin: the same generate without ``shared_trunk``. The computation is the same on
fewer rows, so fp32 scores agree to float summation order: BLAS blocks a 4-row and a 12-row
product differently, which moves the last bits (observed <= 3e-7 on these models); 1e-5 is
two orders above that and far below the logit gaps greedy decoding depends on here.
"""
from __future__ import annotations

import pytest
import torch

from hp_fast.generation.configs import generate_configs
from hp_fast.edits import edit_heads, gains_tensor
from hp_fast.generation.trunk import first_edited_layer, shared_trunk

from helpers.tiny_models import ARCHS, tiny_model, tiny_tokenizer

PROMPTS = ["what is the capital of france", "name a color", "the sky is"]
TOL = 1e-5


def _row_gains(n_prompts: int, C: int, layer: int, H: int = 6, L: int = 3) -> torch.Tensor:
    """(n_prompts * C, L, H), prompt-major rows; config 0 unedited, the others edit ``layer``
    and above with strong gains so their answers differ."""
    g = torch.ones(n_prompts * C, L, H)
    for r in range(g.shape[0]):
        c = r % C
        if c:
            g[r, layer, c % H] = -3.0
            g[r, L - 1, (c + 2) % H] = 5.0
    return g


def _generate(model, enc, g, upto=None, stats=None, **kw):
    with edit_heads(model, g):
        if upto is None:
            return model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                  output_scores=True, return_dict_in_generate=True, **kw)
        with shared_trunk(model, upto, stats):
            return model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                  output_scores=True, return_dict_in_generate=True, **kw)


def _enc(tok, rows):
    tok.padding_side = "left"
    return tok(rows, return_tensors="pt", padding=True)


def _archs():
    out = [(a, "eager") for a in ARCHS]
    return out + [("llama", "sdpa"), ("qwen2", "sdpa"), ("gpt2", "sdpa")]


@pytest.mark.parametrize("arch,attn", _archs())
def test_generate_with_shared_trunk_equals_plain_generate(arch, attn):
    model, tok = tiny_model(arch, seed=2, attn=attn), tiny_tokenizer()
    C = 4
    enc = _enc(tok, [p for p in PROMPTS for _ in range(C)])
    g = _row_gains(len(PROMPTS), C, layer=2)
    ref = _generate(model, enc, g)
    stats = {}
    got = _generate(model, enc, g, upto=first_edited_layer(g), stats=stats)
    assert torch.equal(ref.sequences, got.sequences)
    err = max(float((a - b).abs().max()) for a, b in zip(ref.scores, got.scores))
    assert err <= TOL, err
    # the prompt pass ran 3 rows instead of 12 in each of the 2 trunk layers
    assert stats["trunk_calls"] >= 1 and stats["trunk_rows_run"] < stats["trunk_rows_seen"]


def test_rows_split_when_tokens_diverge():
    """Configs that change the answer get their own trunk rows from the step they diverge."""
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    C = 4
    enc = _enc(tok, [p for p in PROMPTS for _ in range(C)])
    g = _row_gains(len(PROMPTS), C, layer=2)
    stats = {}
    out = _generate(model, enc, g, upto=2, stats=stats)
    n_distinct = len({tuple(s) for s in out.sequences.tolist()})
    assert n_distinct > len(PROMPTS)  # the edits made some answers differ
    # prompt pass: 3 groups of 4; afterwards at most one row per distinct continuation
    assert stats["trunk_rows_run"] >= 2 * len(PROMPTS)
    assert stats["trunk_rows_run"] < stats["trunk_rows_seen"]


def test_all_rows_identical_share_everything():
    """Unedited configs only (first edited layer = L): every layer runs one row per prompt,
    for the whole generation, and the logits are those of a plain call."""
    model, tok = tiny_model("qwen2", seed=3), tiny_tokenizer()
    enc = _enc(tok, [p for p in PROMPTS for _ in range(5)])
    g = torch.ones(15, 3, 6)
    assert first_edited_layer(g) == 3
    ref = _generate(model, enc, g)
    stats = {}
    got = _generate(model, enc, g, upto=3, stats=stats)
    assert torch.equal(ref.sequences, got.sequences)
    assert stats["trunk_rows_run"] * 5 == stats["trunk_rows_seen"]


def test_static_cache_runs_unshared_and_unchanged():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    enc = _enc(tok, [p for p in PROMPTS for _ in range(3)])
    g = _row_gains(len(PROMPTS), 3, layer=2)
    ref = _generate(model, enc, g, cache_implementation="static")
    stats = {}
    got = _generate(model, enc, g, upto=2, stats=stats, cache_implementation="static")
    assert torch.equal(ref.sequences, got.sequences)
    assert stats["trunk_rows_run"] == 0  # not a plain dynamic cache: every row computed


def test_layers_restored_after_the_block_and_on_errors():
    model = tiny_model("llama")
    layers = model.model.layers
    with shared_trunk(model, 2):
        assert "forward" in layers[0].__dict__ and "forward" not in layers[2].__dict__
    assert all("forward" not in l.__dict__ for l in layers)
    with pytest.raises(RuntimeError):
        with shared_trunk(model, 3):
            raise RuntimeError("boom")
    assert all("forward" not in l.__dict__ for l in layers)
    assert not model._forward_pre_hooks


def test_first_edited_layer():
    g = torch.ones(4, 5, 3)
    assert first_edited_layer(g) == 5
    g[2, 3, 1] = 0.5
    assert first_edited_layer(g) == 3
    g[0, 1, 0] = -1
    assert first_edited_layer(g) == 1
    assert first_edited_layer(torch.ones(5, 3)) == 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_configs_same_answers_with_and_without_trunk(arch):
    model, tok = tiny_model(arch, seed=1), tiny_tokenizer()
    prompts = ["describe a cat", "name a big red car", "what is the capital of spain",
               "the sky is blue and the sea is"]
    configs = [None] + [{(2, h): -3.0, (2, (h + 1) % 6): 4.0} for h in range(5)] \
        + [{(1, 0): -2.0, (2, 4): 5.0}]
    g = torch.stack([gains_tensor(c or {}, 3, 6) for c in configs])
    assert first_edited_layer(g) == 1
    want = generate_configs(model, tok, prompts, configs, max_new_tokens=5, batch_size=13,
                            progress=False, share_trunk=False)
    got = generate_configs(model, tok, prompts, configs, max_new_tokens=5, batch_size=13,
                           progress=False, share_trunk=True)
    assert got == want
    assert len({a for c in want for a in c}) > len(prompts)  # the edits change answers


def test_cache_is_whole_again_after_the_block():
    """Inside the block the trunk layers keep one cache row per group; on leaving it every
    layer holds one row per batch row again, equal to a plain call's cache."""
    model, tok = tiny_model("mistral", seed=4), tiny_tokenizer()
    enc = _enc(tok, [p for p in PROMPTS for _ in range(3)])
    g = _row_gains(len(PROMPTS), 3, layer=2)
    with edit_heads(model, g):
        ref = model(**enc, use_cache=True).cache
        with shared_trunk(model, 2):
            got = model(**enc, use_cache=True).cache
            assert got.layers[0].keys.shape[0] == len(PROMPTS)  # narrowed while inside
    for a, b in zip(ref.layers, got.layers):
        assert a.keys.shape == b.keys.shape
        assert float((a.keys - b.keys).abs().max()) <= TOL
        assert float((a.values - b.values).abs().max()) <= TOL


def test_contiguous_unembedding_input_same_logits_and_removed():
    """The prompt pass's strided last-position view is copied before the unembedding: the
    logits are the same product (fp32, 1e-6: only the GEMM path may differ)."""
    from hp_fast.generation.loop import contiguous_unembedding_input
    model, tok = tiny_model("llama", seed=5), tiny_tokenizer()
    enc = _enc(tok, PROMPTS)
    seen = []

    def probe(m, a):
        seen.append(a[0].is_contiguous())

    h = model.lm_head.register_forward_pre_hook(probe)
    ref = model(**enc, logits_to_keep=1).logits
    h.remove()
    with contiguous_unembedding_input(model):
        h = model.lm_head.register_forward_pre_hook(probe)  # runs after the block's hook
        got = model(**enc, logits_to_keep=1).logits
        h.remove()
    assert seen == [False, True]  # the view was strided; inside the block it is not
    assert float((ref - got).abs().max()) <= 1e-6
    assert not model.lm_head._forward_pre_hooks


def test_output_cache_reads_either_name_without_the_deprecated_one():
    import types
    import warnings
    from hp_fast.generation.loop import output_cache
    model, tok = tiny_model("llama"), tiny_tokenizer()
    out = model(**_enc(tok, PROMPTS), use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert output_cache(out) is out.cache
    old = types.SimpleNamespace(past_key_values="kv")  # older transformers outputs
    assert output_cache(old) == "kv"


def test_cache_widened_back_when_a_layer_raises():
    """A failing call inside the block leaves no narrowed cache behind."""
    model, tok = tiny_model("llama", seed=4), tiny_tokenizer()
    enc = _enc(tok, [p for p in PROMPTS for _ in range(3)])
    out = model(**enc, use_cache=True)
    cache = out.cache
    B = enc["input_ids"].shape[0]
    step = dict(input_ids=enc["input_ids"][:, -1:], use_cache=True, cache=cache,
                attention_mask=torch.cat([enc["attention_mask"],
                                          torch.ones(B, 1, dtype=torch.long)], 1))
    boom = model.model.layers[1].mlp.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        with shared_trunk(model, 2):
            model(**step)
    boom.remove()
    assert all(l.keys.shape[0] == B for l in cache.layers if l.keys is not None and l.keys.numel())
