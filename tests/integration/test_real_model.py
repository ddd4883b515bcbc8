"""Integration on the real embedded SmolLM2-135M-Instruct (loaded once per session).

The first load converts the GGUF (~25 s) and writes the safetensors cache; later loads
read the cache in a few seconds.
"""
from __future__ import annotations

import pytest
import torch

import hp_fast
from hp_fast.generation.loop import generate_answers

pytestmark = pytest.mark.slow

PROMPTS = ["What color is the sky on a clear day?", "What color are ripe bananas?",
           "Name a color of the rainbow.", "What color is fresh grass?",
           "What is the capital of France?", "Describe a red apple in one sentence.",
           "What color is snow?", "How many legs does a spider have?"]


@pytest.fixture(scope="session")
def real():
    model, tok = hp_fast.load_model()
    return model, tok


def test_embedded_model_shape(real):
    model, tok = real
    ad = hp_fast.get_adapter(model)
    assert (ad.num_layers, ad.num_heads, ad.head_dim, ad.hidden_size) == (30, 9, 64, 576)
    assert ad.unembedding().shape == (49152, 576)


def test_capture_rank_describe_edit_generate(real, tmp_path):
    model, tok = real
    acts = hp_fast.capture(model, tok, PROMPTS, batch_size=4, progress=False)
    assert acts.z.shape == (8, 30, 9, 64) and torch.isfinite(acts.z).all()
    back = hp_fast.HeadActivations.load(acts.save(tmp_path / "a.safetensors"), model=model)
    assert torch.equal(back.z, acts.z)
    ranking = hp_fast.rank_heads(acts, model, tok, "colors", k=10, progress=False)
    top = ranking.top(4)
    assert len(top) == 4 and ranking.k == 10
    desc = hp_fast.describe_heads(acts, model, tok, top[:2], k=3)
    assert all(len(v) == 3 and all(isinstance(t, str) for t in v) for v in desc.values())
    prompt = ["What is the capital of France?"]
    base = generate_answers(model, tok, prompt, max_new_tokens=8)
    assert "paris" in base[0].lower()
    with hp_fast.edit_heads(model, {h: 0.0 for h in ranking.top(60)}):
        edited = generate_answers(model, tok, prompt, max_new_tokens=8)
    assert edited != base
    assert generate_answers(model, tok, prompt, max_new_tokens=8) == base  # restored


def test_cache_is_reused_and_corrupt_cache_is_moved_aside(real, tmp_path, monkeypatch):
    """A corrupted cache is set aside (not deleted) and rebuilt from the GGUF."""
    from hp_fast.models import loading as models
    monkeypatch.setenv("HP_FAST_CACHE", str(tmp_path))
    target = tmp_path / models._SMOLLM2_CACHE_NAME
    target.mkdir()
    (target / "config.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="moved it to"):
        model, _ = hp_fast.load_model()
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and (aside[0] / "config.json").read_text() == "{ not json"
    assert (target / "model.safetensors").is_file()
    ref, _ = real
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_readme_quick_start_runs(real, monkeypatch):
    """The README's Python quick start runs as written (documentation that runs)."""
    import pathlib
    import re
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    code = re.search(r"## Python quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.setattr(hp_fast, "load_model", lambda *a, **k: real)  # reuse the session's model
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
