"""export_edited on the embedded SmolLM2-135M: GGUF (its source is a GGUF) and HF folder.

Tolerances (see also tests/unit/test_export.py). The F32 GGUF and the HF folder hold the
folded float32 weights; ``edit_heads`` scales the o_proj input instead: same map, other
rounding order, so logits agree within 1e-4 (measured 4e-5 here: 30 layers, max |logit| 31).
F16 rounds every 2-D weight to 11 significant bits (<= 4.9e-4 relative each); through 30
layers the logits move by 0.04 (0.13 % of max |logit|, measured; printed with -s), checked at
0.5 % of max |logit| plus the same next-token choice, while the edit moves them by ~15.
"""
from __future__ import annotations

import time

import pytest
import torch
import transformers as tf

import hp_fast
from hp_fast import edit_heads, export_edited
from hp_fast.export_gguf import source_metadata
from hp_fast.models.loading import embedded_gguf

pytestmark = pytest.mark.slow

HEADS = {(29, 2): -1.0, (23, 4): -1.0, (15, 0): 3.0}
TEXTS = ["The capital of France is", "Roses are red, violets are"]


@pytest.fixture(scope="module")
def real():
    return hp_fast.load_model()


def logits(model, tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc["attention_mask"].bool()


def reference(model, tok):
    with edit_heads(model, HEADS):
        ref, mask = logits(model, tok)
    base, _ = logits(model, tok)
    return ref[mask], base[mask]                                   # (tokens, vocab)


@pytest.mark.parametrize("dtype,rel", [("f32", None), ("f16", 5e-3)])
def test_embedded_gguf_export(real, tmp_path, dtype, rel):
    model, tok = real
    ref, base = reference(model, tok)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    path = export_edited(model, tok, HEADS, tmp_path / dtype, format="gguf", gguf_dtype=dtype,
                         progress=False)
    seconds = time.perf_counter() - t0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    src_meta, src_names, src_shapes = source_metadata(embedded_gguf())
    meta, names, shapes = source_metadata(path)
    assert names == src_names and shapes == src_shapes
    changed = {k for k in src_meta if meta.get(k) != src_meta[k]}
    assert changed == {"general.file_type"}
    assert {k for k in meta if k not in src_meta} == {"hp_fast.version", "hp_fast.edit"}
    back = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                   dtype=torch.float32).eval()
    got, mask = logits(back, tok)
    diff = float((got[mask] - ref).abs().max())
    scale = float(ref.abs().max())
    print(f"\n{dtype}: {path.stat().st_size / 2**20:.1f} MiB, export {seconds:.1f} s, logits max "
          f"|diff| {diff:.3g} (max |logit| {scale:.3g}), edit moves them by "
          f"{float((base - ref).abs().max()):.3g}")
    assert diff < (1e-4 if rel is None else rel * scale)
    assert float((base - ref).abs().max()) > 20 * (1e-4 if rel is None else rel * scale)
    if rel is not None:
        assert torch.equal(got[mask].argmax(-1), ref.argmax(-1))
    if dtype == "f32":   # same tokenizer key-values in both files: read them once
        gtok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert gtok(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]


def test_embedded_hf_export(real, tmp_path):
    model, tok = real
    ref, _ = reference(model, tok)
    t0 = time.perf_counter()
    out = export_edited(model, tok, HEADS, tmp_path / "hf", progress=False)
    seconds = time.perf_counter() - t0
    back = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got, mask = logits(back, tok)
    diff = float((got[mask] - ref).abs().max())
    print(f"\nhf: export {seconds:.1f} s, logits max |diff| {diff:.3g}")
    assert diff < 1e-4
    assert back.config.tie_word_embeddings
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    card = (out / "README.md").read_text()
    assert "embedded SmolLM2-135M-Instruct" in card and "| 29 | 2 | -1 |" in card
