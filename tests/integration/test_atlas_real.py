"""The head atlas of the embedded SmolLM2-135M (270 heads) through the CLI, timed.

The time is printed, not asserted: on a shared machine it says more about the load than
about the code (about 1 min of work on a quiet 2-core CPU: docs in README, "Head atlas").
"""
from __future__ import annotations

import time

import pytest

import hp_fast
from hp_fast.atlas import load_atlas
from hp_fast.cli import main as cli_main
from hp_fast.token_display import readable_token

pytestmark = pytest.mark.slow

PROMPTS = ["What color is the sky on a clear day?", "Name a country in Europe.",
           "How many legs does a spider have?", "Describe a happy day at the beach.",
           "What is the capital of Japan?", "Write one word that rhymes with red."]


def test_atlas_of_the_embedded_model(tmp_path, capsys):
    model, tok = hp_fast.load_model()
    acts = hp_fast.capture(model, tok, PROMPTS, progress=False)
    acts_path = acts.save(tmp_path / "acts.safetensors")
    start = time.perf_counter()
    rc = cli_main(["atlas", "--acts", str(acts_path), "--out", str(tmp_path / "atlas")])
    seconds = time.perf_counter() - start
    out = capsys.readouterr()
    assert rc == 0, out.err
    data = load_atlas(tmp_path / "atlas")
    with capsys.disabled():
        print(f"\natlas of the embedded model: {len(data['heads'])} heads, k={data['settings']['k_tokens']}, "
              f"{seconds:.1f} s with model load (steps: {data['timings_s']})")
    assert (data["num_layers"], data["num_heads"]) == (30, 9) and len(data["heads"]) == 270
    assert data["concepts"] == hp_fast.builtin_concepts()  # every built-in has tokens here
    heads = [(0, 0), (7, 4), (15, 8), (29, 2)]
    k = data["settings"]["k_tokens"]
    desc = hp_fast.describe_heads(acts, model, tok, heads, k=k)
    for l, h in heads:
        entry = data["heads"][l * 9 + h]
        assert [tok.decode([i]) for i in entry["token_ids"]] == desc[(l, h)], (l, h)
        assert entry["tokens"] == [readable_token(tok, i) for i in entry["token_ids"]]
    assert any(t.startswith("␣") for e in data["heads"] for t in e["tokens"])  # Ġ made readable
    assert not any("Ġ" in t for e in data["heads"] for t in e["tokens"])
