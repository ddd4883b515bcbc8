"""edit_heads through transformers' attention registry (hp_fast.edits.attention) vs references.

The reference is independent of hp_fast: a plain pre-hook on every W_O that multiplies
each head's (B, T, dh) slice of the input by its gain (where a position mask says so).
The hook path of edit_heads is the second twin (generate comparisons).
"""
from __future__ import annotations

import pytest
import torch

from hp_fast.edits import attention
from hp_fast.models.adapters import get_adapter
from hp_fast.edits import edit_heads, edit_path
from helpers.tiny_models import oproj_inputs, tiny_model, tiny_tokenizer

PROMPTS = ["the city of paris is in france", "what color is the sky", "one two three",
           "which country is berlin in"]
# (arch, attention implementation); gemma2's logit softcapping is not supported by sdpa,
# GPT-2 eager compares the implementation name ("eager") and therefore takes the hook path.
CASES = [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "eager"),
         ("qwen3", "sdpa"), ("gemma", "sdpa"), ("gemma2", "eager"), ("phi3", "sdpa"),
         ("phi3", "eager"), ("gpt2", "sdpa")]
L, H = 3, 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine two OpenMP
    threads preempted inside their barriers make these tests about 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def enc(tok):
    tok.padding_side = "left"
    return tok(PROMPTS, return_tensors="pt", padding=True)


def _gains(seed=0, rows=None, scale=2.0):
    """(L, H) or (rows, L, H) gains with a few heads edited (N(0, scale^2)), the rest exactly 1."""
    gen = torch.Generator().manual_seed(seed)
    shape = (L, H) if rows is None else (rows, L, H)
    g = torch.ones(shape)
    pick = torch.rand(shape, generator=gen) < 0.3
    g[pick] = torch.randn(shape, generator=gen)[pick] * scale
    return g


class ReferenceEdit:
    """W_O input x (B, T, H*dh) -> x with head h of layer l times g[.., l, h] where mask."""

    def __init__(self, model, g, mask=None):
        ad = get_adapter(model)
        self.handles = [p.register_forward_pre_hook(self._hook(l, g, mask, ad.head_dim))
                        for l, p in enumerate(ad.out_projs)]

    @staticmethod
    def _hook(layer, g, mask, dh):
        def hook(_m, args):
            x = args[0]
            B, T, _ = x.shape
            gain = (g[layer] if g.dim() == 2 else g[:, layer]).reshape(-1, 1, H, 1)  # (1|B, 1, H, 1)
            if mask is not None:
                gain = torch.where(mask.reshape(B, T, 1, 1), gain, torch.ones(()))
            return ((x.view(B, T, H, dh) * gain).reshape(B, T, H * dh),)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("arch,impl", CASES)
def test_per_head_and_per_row_gains_match_reference(arch, impl, enc):
    model = tiny_model(arch, attn=impl)
    assert edit_path(model) == "attention"
    for g in (_gains(1), _gains(2, rows=len(PROMPTS))):
        with ReferenceEdit(model, g):
            want = model(**enc).logits
        with edit_heads(model, g, mode="attention"):
            got = model(**enc).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert not torch.allclose(got, model(**enc).logits, atol=1e-3)  # the edit does something


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("qwen2", "eager"), ("gemma2", "eager")])
def test_position_mask_matches_reference(arch, impl, enc):
    model = tiny_model(arch, attn=impl)
    B, T = enc["input_ids"].shape
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) < 0.5   # (B, T)
    g = _gains(4, rows=B)
    with ReferenceEdit(model, g, mask):
        want = model(**enc).logits
    with edit_heads(model, g, positions=mask, mode="attention"):
        got = model(**enc).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with edit_heads(model, g, positions="prompt"):   # a single pass is all prompt
        prompt = model(**enc).logits
    with edit_heads(model, g):
        torch.testing.assert_close(prompt, model(**enc).logits, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_masked_out_positions_and_unedited_heads_untouched(impl, enc):
    """o_proj inputs: bit-identical where the mask is off and for heads at gain 1, exactly
    gain x input for the edited heads of the first edited layer."""
    model = tiny_model("mistral", attn=impl)
    B, T = enc["input_ids"].shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 2:] = True
    mask[1] = False
    base = oproj_inputs(model, enc)
    with edit_heads(model, {(1, 2): -1.0, (1, 4): 5.0, (2, 0): 0.5}, positions=mask,
                    mode="attention"):
        edited = oproj_inputs(model, enc)
    assert torch.equal(edited[0], base[0])                     # layer before any edit
    x, ref = edited[1].view(B, T, H, -1), base[1].view(B, T, H, -1)
    assert torch.equal(x[~mask], ref[~mask])                   # masked-out positions
    for h, gain in ((2, -1.0), (4, 5.0)):
        assert torch.equal(x[mask][:, h], ref[mask][:, h] * gain)
    keep = [h for h in range(H) if h not in (2, 4)]
    assert torch.equal(x[mask][:, keep], ref[mask][:, keep])   # heads at gain 1
    x2, ref2 = edited[2].view(B, T, H, -1), base[2].view(B, T, H, -1)
    assert not torch.equal(x2[mask], ref2[mask])               # later layers see the edit


def test_sdpa_uses_heads_first_op(enc, monkeypatch):
    """With sdpa the op reads SDPA's (B, H, T, dh) output directly (no transpose copy first;
    on CPU that output is often already laid out as (B, T, H, dh) in memory)."""
    model = tiny_model("llama", attn="sdpa")
    calls = []
    real = attention.ops.head_gain

    def spy(attn, gains, mask, heads_first):
        calls.append((heads_first, tuple(attn.shape)))
        return real(attn, gains, mask, heads_first)
    monkeypatch.setattr(attention.ops, "head_gain", spy)
    with edit_heads(model, {(0, 0): -1.0, (2, 5): 2.0}):
        model(**enc)
    B, T = enc["input_ids"].shape
    assert calls == [(True, (B, H, T, 8))] * 2


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("qwen3", "eager"), ("phi3", "sdpa"),
                                       ("gemma2", "eager"), ("gpt2", "sdpa")])
def test_generate_attention_equals_hook_token_for_token(arch, impl, enc):
    model = tiny_model(arch, attn=impl, seed=1)
    B, T = enc["input_ids"].shape
    image_like = enc["input_ids"] % 3 == 0                            # (B, T) prompt mask
    configs = [(_gains(5, scale=6), "all"), (_gains(6, rows=B, scale=6), "all"),
               (_gains(7, scale=6), "generated"), (_gains(8, scale=6), "prompt"),
               (_gains(9, scale=6), image_like)]
    base = model.generate(**enc, max_new_tokens=6, do_sample=False)
    changed = 0
    for g, positions in configs:
        out = {}
        for mode in ("attention", "hook"):
            with edit_heads(model, g, positions=positions, mode=mode):
                out[mode] = model.generate(**enc, max_new_tokens=6, do_sample=False)
        assert torch.equal(out["attention"], out["hook"]), positions
        changed += not torch.equal(out["attention"], base)
    assert changed >= 3  # the edits change tokens, so the comparison can fail


def test_generated_positions_leave_prompt_logits_unchanged(enc):
    model = tiny_model("llama", attn="sdpa", seed=2)
    g = _gains(10, scale=6)
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    base = model.generate(**enc, **kw)
    with edit_heads(model, g, positions="generated"):
        gen = model.generate(**enc, **kw)
        no_cache = model.generate(**enc, **kw, use_cache=False)   # recomputes every position
    with edit_heads(model, g, positions="prompt"):
        prompt = model.generate(**enc, **kw)
    with edit_heads(model, g):
        full = model.generate(**enc, **kw)
    assert torch.equal(gen.logits[0], base.logits[0])             # the prompt pass: unedited
    assert not torch.allclose(gen.logits[1], base.logits[1], atol=1e-3)  # decode steps edited
    assert torch.equal(prompt.logits[0], full.logits[0])          # prompt pass fully edited
    assert torch.equal(gen.sequences, no_cache.sequences)
    for a, b in zip(gen.logits, no_cache.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # prompt-only: decode steps are not edited (they only read the edited prompt's cache)
    assert not torch.allclose(prompt.logits[1], full.logits[1], atol=1e-3)


def test_gain_one_is_bit_identical(enc):
    for impl in ("sdpa", "eager"):
        model = tiny_model("qwen2", attn=impl)
        base = model(**enc).logits
        with edit_heads(model, torch.ones(L, H), mode="attention"):
            assert torch.equal(model(**enc).logits, base)
        with edit_heads(model, {(1, 1): 1.0}, positions="generated", mode="attention"):
            assert torch.equal(model(**enc).logits, base)


def test_attn_implementation_restored_after_exit_and_error(enc):
    model = tiny_model("llama", attn="sdpa")
    base = model(**enc).logits
    with edit_heads(model, {(0, 1): -1.0}, mode="attention"):
        assert model.config._attn_implementation == "hp_fast_sdpa"
    assert model.config._attn_implementation == "sdpa" and not attention._ACTIVE
    with pytest.raises(RuntimeError, match="boom"):
        with edit_heads(model, {(0, 1): -1.0}, mode="attention"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and not attention._ACTIVE
    assert torch.equal(model(**enc).logits, base)


def test_nested_edit_falls_back_to_hook_and_composes(enc):
    model = tiny_model("llama", attn="eager")
    with ReferenceEdit(model, torch.tensor([[1.0] * 6, [1.0, -2.0, 1, 1, 1, 1], [1.0] * 6])):
        want = model(**enc).logits
    with edit_heads(model, {(1, 1): -1.0}):
        assert edit_path(model) == "hook"
        with pytest.raises(ValueError, match="already uses the attention path"):
            with edit_heads(model, {(1, 1): 2.0}, mode="attention"):
                pass
        with edit_heads(model, {(1, 1): 2.0}):
            torch.testing.assert_close(model(**enc).logits, want, rtol=0, atol=1e-5)


def test_bad_arguments(enc):
    model = tiny_model("llama")
    gpt2 = tiny_model("gpt2", attn="eager")
    assert edit_path(gpt2) == "hook"  # GPT2Attention branches on the name "eager"
    with pytest.raises(ValueError, match="not possible"):
        with edit_heads(gpt2, {(0, 0): -1.0}, mode="attention"):
            pass
    with pytest.raises(ValueError, match="mode must be"):
        with edit_heads(model, {(0, 0): -1.0}, mode="fast"):
            pass
    with pytest.raises(ValueError, match="positions must be"):
        with edit_heads(model, {(0, 0): -1.0}, positions="image"):
            pass
    with pytest.raises(ValueError, match="positions mask has shape"):
        with edit_heads(model, {(0, 0): -1.0}, positions=torch.ones(2, 3, dtype=torch.bool)):
            model(**enc)
    with pytest.raises(ValueError, match="per-row gains were given for 2 rows"):
        with edit_heads(model, torch.ones(2, L, H) * 2):
            model(**enc)
    assert model.config._attn_implementation == "eager" and not attention._ACTIVE


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_vlm_language_backbone_attention_path(family):
    """VLMs: the decoder's attention goes through the wrapper (sdpa), the vision tower keeps its
    implementation, and image-position edits equal the hook path exactly."""
    tiny_vlms = pytest.importorskip("tiny_vlms")
    vlm = pytest.importorskip("hp_fast.models.vlm")
    import numpy as np
    from PIL import Image
    model, proc = tiny_vlms.tiny_vlm(family)
    model.set_attn_implementation("sdpa")
    images = [Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8"))
              for i in range(2)]
    texts, used = vlm.format_vlm_prompts(proc, model, PROMPTS[:2])
    enc = vlm.encode(proc, texts, images, used_template=used, padding_side="left")
    img = vlm.image_positions_mask(model, enc["input_ids"], enc["attention_mask"], "image")
    gains = {(0, 0): -1.0, (1, 3): 4.0}
    assert edit_path(model) == "attention"
    out = {}
    for mode in ("attention", "hook"):
        with edit_heads(model, gains, positions=img, mode=mode):
            if mode == "attention":
                assert model.config.text_config._attn_implementation == "hp_fast_sdpa"
                assert model.config.vision_config._attn_implementation == "sdpa"
            out[mode] = model(**enc).logits
    assert torch.equal(out["attention"], out["hook"])
    assert not torch.allclose(out["attention"], model(**enc).logits, atol=1e-4)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_static_cache_and_gradients_match_hook_path(enc):
    model = tiny_model("llama", attn="sdpa", seed=1)
    g = _gains(11, scale=6)
    for positions in ("generated", "prompt"):
        out = {}
        for mode in ("attention", "hook"):
            with edit_heads(model, g, positions=positions, mode=mode):
                out[mode] = model.generate(**enc, max_new_tokens=5, do_sample=False,
                                           cache_implementation="static")
        assert torch.equal(out["attention"], out["hook"]), positions
    model.requires_grad_(True)
    grads = {}
    for mode in ("attention", "hook"):
        model.zero_grad()
        with edit_heads(model, g, mode=mode):
            model(**enc).logits.square().mean().backward()
        grads[mode] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    torch.testing.assert_close(grads["attention"], grads["hook"], rtol=1e-5, atol=1e-8)
    assert grads["hook"].abs().max() > 0
