"""GPU: head edits, batched edit configurations and capture on a tiny random model on CUDA, with
sdpa and eager attention. References: a plain pre-hook on every W_O scaling each head's slice
(independent of hp_fast), one-configuration-at-a-time generation, and the same model on the CPU.
Generation compares greedy tokens, so it runs in float64 where it can (no near-tie argmax flips
between kernels of different batch shapes); with eager attention in float64 transformers gives
NaN logits for left-padded rows (seen on the CPU with transformers 5.24, hp_fast not involved),
so eager runs in float32."""
from __future__ import annotations

import pytest
import torch

import hp_fast
from helpers.gpu import gpu_marks
from helpers.tiny_models import tiny_model, tiny_tokenizer
from hp_fast.generation import generate_answers

pytestmark = gpu_marks()
PROMPTS = ["the city of paris is in france", "what color is the sky", "one two three",
           "which country is berlin in", "describe a big red car"]
CONFIGS = [None, {(0, 1): -1.0, (2, 3): 5.0}, {(1, h): 0.0 for h in range(6)} | {(2, 0): -3.0}]
CASES = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gpt2", "eager")]
L, H = 3, 6


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.padding_side = "left"
    return t


def reference_edit(model, g):
    """Pre-hooks on every W_O: head h of layer l times g[..., l, h]; returns the handles."""
    ad = hp_fast.get_adapter(model)

    def hook(layer):
        def fn(_m, args):
            x = args[0]
            B, T, _ = x.shape
            gain = (g[layer] if g.dim() == 2 else g[:, layer]).reshape(-1, 1, H, 1).to(x)
            return ((x.view(B, T, H, ad.head_dim) * gain).reshape(B, T, -1),)
        return fn
    return [p.register_forward_pre_hook(hook(l)) for l, p in enumerate(ad.out_projs)]


def gains(rows=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (L, H) if rows is None else (rows, L, H)
    g = torch.ones(shape)
    pick = torch.rand(shape, generator=gen) < 0.3
    g[pick] = torch.randn(shape, generator=gen)[pick] * 2
    return g


@pytest.mark.parametrize("arch,impl", CASES)
def test_edit_heads_on_cuda_match_reference(arch, impl, tok):
    model = tiny_model(arch, attn=impl).cuda()
    enc = tok(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    for g in (gains(), gains(rows=len(PROMPTS), seed=1)):
        handles = reference_edit(model, g.cuda())
        try:
            want = model(**enc).logits
        finally:
            for h in handles:
                h.remove()
        for mode in ("auto", "hook"):
            with hp_fast.edit_heads(model, g, mode=mode):
                got = model(**enc).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert not torch.allclose(got, model(**enc).logits, atol=1e-3)  # the edit does something


@pytest.mark.parametrize("arch,impl", CASES)
def test_generate_configs_on_cuda_match_sequential_and_cpu(arch, impl, tok):
    model = tiny_model(arch, seed=2, attn=impl).to(torch.float32 if impl == "eager" else
                                                   torch.float64)
    cpu = hp_fast.generate_configs(model, tok, PROMPTS, CONFIGS, max_new_tokens=5, batch_size=8,
                                   chat_template=False, progress=False)
    model.cuda()
    got = hp_fast.generate_configs(model, tok, PROMPTS, CONFIGS, max_new_tokens=5, batch_size=8,
                                   chat_template=False, progress=False)
    seq = []
    for config in CONFIGS:
        with hp_fast.edit_heads(model, config or {}):
            seq.append(generate_answers(model, tok, PROMPTS, max_new_tokens=5, batch_size=1,
                                        chat_template=False))
    assert got == seq == cpu
    assert got[0] != got[1] or got[0] != got[2]  # the edits change some answers


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_capture_on_cuda_matches_cpu(impl, tok):
    model = tiny_model("llama", attn=impl)
    want = hp_fast.capture(model, tok, PROMPTS, chat_template=False, progress=False).z
    got = hp_fast.capture(model.cuda(), tok, PROMPTS, chat_template=False, progress=False).z
    assert got.shape == want.shape == (len(PROMPTS), L, H, 8)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
