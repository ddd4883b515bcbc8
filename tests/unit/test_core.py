"""Adapters, capture, edits and ranking on tiny random models (fast, no download)."""
from __future__ import annotations

import pytest
import torch

import hp_fast
from hp_fast.models.adapters import get_adapter
from helpers.tiny_models import oproj_inputs, ARCHS, tiny_model, tiny_tokenizer

PROMPTS = ["the city of paris is in france", "what color is the sky", "one two three",
           "which country is berlin in", "a red car and a blue house", "describe a cat"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, texts, side="right"):
    tok.padding_side = side
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adapter_shapes_and_head_slices(arch):
    model = tiny_model(arch)
    ad = get_adapter(model)
    assert ad.num_layers == 3 and ad.num_heads == 6
    assert ad.w_o(0).shape == (ad.hidden_size, ad.num_heads * ad.head_dim)
    assert ad.unembedding().shape == (96, ad.hidden_size)
    # the head slices tile W_O: sum of head writes == W_O applied to the concatenation
    z = torch.randn(ad.num_heads, ad.head_dim)
    total = sum(z[h] @ ad.head_w_o(1, h) for h in range(ad.num_heads))
    torch.testing.assert_close(total, ad.w_o(1) @ z.flatten(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_capture_mean_matches_manual(arch, tok):
    model = tiny_model(arch)
    acts = hp_fast.capture(model, tok, PROMPTS[:3], chat_template=False, batch_size=2, progress=False)
    ad = get_adapter(model)
    assert acts.z.shape == (3, 3, 6, ad.head_dim) and acts.z.dtype == torch.float32
    for i, p in enumerate(PROMPTS[:3]):
        ref = oproj_inputs(model, tok([p], return_tensors="pt"))  # one prompt, no padding
        for layer in range(3):
            want = ref[layer][0].mean(0).view(6, -1)
            torch.testing.assert_close(acts.z[i, layer], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("aggregate", ["mean", "last"])
def test_capture_padding_does_not_change_rows(side, aggregate, tok):
    model = tiny_model("llama")
    tok.padding_side = side
    batched = hp_fast.capture(model, tok, PROMPTS, aggregate=aggregate, chat_template=False,
                              batch_size=6, progress=False)
    single = hp_fast.capture(model, tok, PROMPTS, aggregate=aggregate, chat_template=False,
                             batch_size=1, progress=False)
    tok.padding_side = "right"
    torch.testing.assert_close(batched.z, single.z, rtol=1e-4, atol=1e-5)


def test_capture_save_load_roundtrip_and_model_check(tmp_path, tok):
    model = tiny_model("qwen2")
    acts = hp_fast.capture(model, tok, PROMPTS, chat_template=False, progress=False)
    path = acts.save(tmp_path / "acts.safetensors")
    back = hp_fast.HeadActivations.load(path, model=model)
    assert torch.equal(back.z, acts.z) and back.meta == acts.meta
    torch.testing.assert_close(back.head_outputs(1, 2), acts.z[:, 1, 2] @ get_adapter(model).head_w_o(1, 2))
    with pytest.raises(ValueError, match="different model"):
        hp_fast.HeadActivations.load(path, model=tiny_model("llama"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="capture again"):
        hp_fast.HeadActivations.load(bad)
    with pytest.raises(ValueError, match="no model bound"):
        hp_fast.HeadActivations.load(path).head_outputs(0, 0)


def test_capture_bad_inputs(tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no prompts"):
        hp_fast.capture(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="not one string"):
        hp_fast.capture(model, tok, "a prompt", progress=False)
    with pytest.raises(ValueError, match="aggregate"):
        hp_fast.capture(model, tok, ["a"], aggregate="median", progress=False)


def test_unsupported_architecture_lists_supported():
    import transformers as tf
    model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=32))
    with pytest.raises(ValueError, match="llama.*not supported|not supported.*llama"):
        get_adapter(model)


def _logits(model, enc):
    return model(**enc).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_gain_one_changes_nothing_and_restore(arch, tok):
    model = tiny_model(arch)
    enc = _ids(tok, PROMPTS)
    base = _logits(model, enc)
    with hp_fast.edit_heads(model, {(0, 1): 1.0, (2, 5): 1.0}):
        assert torch.equal(_logits(model, enc), base)
    with hp_fast.edit_heads(model, {(1, 3): -1.0}):
        assert not torch.allclose(_logits(model, enc), base)
    assert torch.equal(_logits(model, enc), base)
    with pytest.raises(RuntimeError, match="boom"):
        with hp_fast.edit_heads(model, {(1, 3): 5.0}):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, enc), base)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_gain_zero_equals_removing_the_slice(arch, tok):
    model = tiny_model(arch)
    enc = _ids(tok, PROMPTS)
    ad = get_adapter(model)
    with hp_fast.edit_heads(model, {(1, 4): 0.0}):
        edited = _logits(model, enc)
    with torch.no_grad():  # zero the head's W_O slice by hand
        w = ad.out_projs[1].weight
        cols = slice(4 * ad.head_dim, 5 * ad.head_dim)
        saved = (w[cols, :] if ad.conv1d else w[:, cols]).clone()
        if ad.conv1d:
            w[cols, :] = 0
        else:
            w[:, cols] = 0
        manual = _logits(model, enc)
        if ad.conv1d:
            w[cols, :] = saved
        else:
            w[:, cols] = saved
    torch.testing.assert_close(edited, manual, rtol=1e-5, atol=1e-5)


def test_gqa_query_head_maps_to_its_own_slice(tok):
    """Editing query head h scales exactly the h-th dh-block of W_O's input (6 q heads, 2 kv)."""
    model = tiny_model("llama")
    enc = _ids(tok, PROMPTS[:2])
    ref = oproj_inputs(model, enc)
    seen = {}
    hook = get_adapter(model).out_projs[2].register_forward_hook(
        lambda m, a, o: seen.__setitem__("x", a[0].clone()))
    with hp_fast.edit_heads(model, {(2, 3): 2.5}):
        model(**enc)
    hook.remove()
    # pre-hooks registered by edit_heads run before this forward hook sees the input
    want = ref[2].clone().view(2, -1, 6, 8)
    want[:, :, 3] *= 2.5
    torch.testing.assert_close(seen["x"], want.view_as(ref[2]), rtol=0, atol=0)


def test_fold_matches_edit_and_undo_is_exact(tok):
    model = tiny_model("mistral")
    enc = _ids(tok, PROMPTS)
    before = {n: p.clone() for n, p in model.named_parameters()}
    gains = {(0, 0): -1.0, (1, 5): 5.0, (2, 2): 0.0}
    with hp_fast.edit_heads(model, gains):
        edited = _logits(model, enc)
    handle = hp_fast.fold_head_gains(model, gains)
    torch.testing.assert_close(_logits(model, enc), edited, rtol=1e-5, atol=1e-5)
    handle.undo()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_edit_generate_with_cache_matches_no_cache(tok):
    model = tiny_model("llama")
    enc = _ids(tok, ["the city of paris"])
    with hp_fast.edit_heads(model, {(1, 0): -1.0, (2, 4): 3.0}):
        cached = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_per_row_gains_equal_separate_runs(tok):
    model = tiny_model("qwen2")
    enc = _ids(tok, PROMPTS[:3])
    g = torch.ones(3, 3, 6)
    g[1, 0, 2] = -1.0
    g[2, 2, 5] = 4.0
    with hp_fast.edit_heads(model, g):
        batched = _logits(model, enc)
    for row in range(3):
        with hp_fast.edit_heads(model, g[row]):
            alone = _logits(model, enc)[row]
        torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)


def test_edit_bad_heads():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="does not exist"):
        with hp_fast.edit_heads(model, {(3, 0): -1.0}):
            pass
    with pytest.raises(ValueError, match="finite"):
        with hp_fast.edit_heads(model, {(0, 0): float("nan")}):
            pass


def test_random_control_layer_matched_and_disjoint():
    selected = [(0, 1), (0, 2), (3, 4), (5, 0)]
    sets = hp_fast.random_control(selected, num_layers=6, num_heads=5, n_sets=10, seed=1)
    assert len(sets) == 10
    for s in sets:
        assert len(s) == len(set(s)) == 4
        assert not set(s) & set(selected)
        assert sorted(l for l, _ in s) == sorted(l for l, _ in selected)
    assert len({tuple(s) for s in sets}) > 1  # really random


def test_random_control_fallback_when_layer_full():
    selected = [(0, h) for h in range(3)] + [(1, 0)]  # layer 0 has no free head left
    sets = hp_fast.random_control(selected, num_layers=3, num_heads=3, n_sets=5)
    for s in sets:
        assert len(s) == len(set(s)) == 4 and not set(s) & set(selected)
        assert all(l in (1, 2) for l, _ in s)
    tiny = hp_fast.random_control([(0, 0), (0, 1)], num_layers=1, num_heads=3, n_sets=2)
    assert all(s == [(0, 2)] for s in tiny)  # fewer free heads than needed: all of them


def test_capture_many_equals_separate_captures(tok):
    from hp_fast.capture import capture_many
    model = tiny_model("gemma")
    both = capture_many(model, tok, PROMPTS, aggregates=("mean", "last"), chat_template=False,
                        progress=False)
    for agg in ("mean", "last"):
        alone = hp_fast.capture(model, tok, PROMPTS, aggregate=agg, chat_template=False, progress=False)
        assert torch.equal(both[agg].z, alone.z) and both[agg].meta == alone.meta


def test_generate_configs_equals_sequential_runs(tok):
    from hp_fast.generation.configs import generate_configs
    from hp_fast.generation.loop import generate_answers
    model = tiny_model("llama", seed=5)
    prompts = PROMPTS[:4]
    configs = [None, {(0, 1): -1.0, (2, 3): 5.0}, {(1, 0): 0.0}]
    batched = generate_configs(model, tok, prompts, configs, max_new_tokens=5, batch_size=5,
                               chat_template=False, progress=False)
    for config, answers in zip(configs, batched):
        with hp_fast.edit_heads(model, config or {}):
            alone = generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=1,
                                     chat_template=False)
        assert answers == alone
    assert batched[0] != batched[1]  # the edits change something, so the test can fail


def test_capture_nan_activations_raise_clear_error(tok):
    model = tiny_model("llama")
    with torch.no_grad():
        get_adapter(model).attns[1].v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf head outputs"):
        hp_fast.capture(model, tok, PROMPTS[:2], chat_template=False, progress=False)


# ---- get_adapter memoization ----------------------------------------------------------------

def test_get_adapter_is_memoized_per_model():
    model = tiny_model("llama")
    ad = get_adapter(model)
    assert get_adapter(model) is ad and hp_fast.get_adapter(model) is ad
    other = tiny_model("llama")
    assert get_adapter(other) is not ad and get_adapter(other).out_projs[0] is not ad.out_projs[0]


def test_get_adapter_is_rebuilt_when_modules_are_swapped():
    import copy
    model = tiny_model("llama")
    layers = model.model.layers
    ad = get_adapter(model)
    layers[1].self_attn.o_proj = copy.deepcopy(layers[1].self_attn.o_proj)      # a new W_O module
    ad2 = get_adapter(model)
    assert ad2 is not ad and ad2.out_projs[1] is layers[1].self_attn.o_proj
    assert get_adapter(model) is ad2
    layers[0].self_attn.o_proj.weight = torch.nn.Parameter(torch.zeros(48, 48))  # a new W_O weight
    ad3 = get_adapter(model)
    assert ad3 is not ad2 and torch.equal(ad3.w_o(0), torch.zeros(48, 48))
    layers[2] = copy.deepcopy(layers[2])                                         # a new decoder layer
    ad4 = get_adapter(model)
    assert ad4 is not ad3 and ad4.layers[2] is layers[2] and ad4.out_projs[2] is layers[2].self_attn.o_proj
    del layers[2]                                                                # same list, shorter
    assert get_adapter(model).num_layers == 2
    model.model.layers = torch.nn.ModuleList([layers[1]])                        # a new list object
    ad6 = get_adapter(model)
    assert ad6.num_layers == 1 and ad6.layers[0] is layers[1]


def test_get_adapter_of_a_copied_model_reads_the_copy():
    import copy
    model = tiny_model("gpt2")
    ad = get_adapter(model)
    clone = copy.deepcopy(model)
    cad = get_adapter(clone)
    assert cad is not ad and cad.out_projs[0] is clone.transformer.h[0].attn.c_proj
    assert cad.unembedding() is clone.lm_head.weight and ad.unembedding() is model.lm_head.weight
    assert get_adapter(model) is ad


# ---- one capture core -----------------------------------------------------------------------

def test_capture_core_sends_each_batch_to_the_sink(tok):
    from hp_fast.capture import CaptureBatch, capture_batches, capture_many, position_ids
    model = tiny_model("llama")
    texts = PROMPTS[:5]

    def make_batch(start, stop):
        enc = tok(texts[start:stop], return_tensors="pt", padding=True)
        mask = enc["attention_mask"]  # (B, T)
        return CaptureBatch(dict(enc, position_ids=position_ids(mask)), {"mean": mask, "last": mask})

    class Spy:
        def __init__(self):
            self.calls = []

        def write(self, start, stop, z):
            self.calls.append((start, stop, {a: t.clone() for a, t in z.items()}))

    sink = Spy()
    capture_batches(model, len(texts), make_batch, ("mean", "last"), sink, batch_size=2, progress=False)
    assert [(a, b) for a, b, _ in sink.calls] == [(0, 2), (2, 4), (4, 5)]
    ad = get_adapter(model)
    assert all(z[a].shape == (b - s, 3, 6, ad.head_dim) for s, b, z in sink.calls for a in z)
    assert not any(p._forward_pre_hooks for p in ad.out_projs)  # hooks removed afterwards
    want = capture_many(model, tok, texts, chat_template=False, batch_size=2, progress=False)
    for agg in ("mean", "last"):
        got = torch.cat([z[agg] for _, _, z in sink.calls])
        torch.testing.assert_close(got, want[agg].z, rtol=0, atol=0)


def test_text_capture_goes_through_the_core(tok, monkeypatch):
    import importlib
    import inspect
    core = importlib.import_module("hp_fast.capture")
    calls = []
    real = core.capture_batches
    monkeypatch.setattr(core, "capture_batches", lambda *a, **k: calls.append(k["what"]) or real(*a, **k))
    hp_fast.capture(tiny_model("llama"), tok, PROMPTS[:2], chat_template=False, progress=False)
    assert calls == ["prompts"]
    assert inspect.getsource(core).count("register_forward_pre_hook") == 1  # the one hook site
