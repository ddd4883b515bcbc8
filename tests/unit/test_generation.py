"""The batched generation loop and its callers on tiny random models.

The reference twin of every batched path is ``generate_answers`` one prompt at a time (no
padding, no other rows) inside ``edit_heads`` with one configuration: the plain
(config, prompt) batches of ``generate_configs`` and the shared-prefix batches of
``generate_configs_shared_prefix`` must give the same answers, for prompts of different
lengths (so rows are padded differently in every batch) and batches that mix configurations.
"""
from __future__ import annotations

import pytest
import torch

import hp_fast
from hp_fast.generation import generate_answers, generate_configs_shared_prefix, prefix
from hp_fast.generation.loop import by_config, config_gains, config_rows
from hp_fast.models.padding import padding_side
from helpers.tiny_models import tiny_model, tiny_tokenizer

# shared head "describe the color of" (4 tokens), suffixes of 1 to 8 words
PROMPTS = ["describe the color of the sky", "describe the color of a big red car and a blue house",
           "describe the color of it", "describe the color of the sea and the sun",
           "describe the color of a small cat"]
CONFIGS = [None, {(0, 1): -1.0, (2, 3): 5.0}, {(1, h): 0.0 for h in range(6)} | {(2, 0): -3.0}]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run thousands of small ops: one thread avoids OpenMP waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sequential(model, tok, prompts, configs, max_new_tokens):
    out = []
    for config in configs:
        with hp_fast.edit_heads(model, config if config is not None else {}):
            out.append(generate_answers(model, tok, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=1, chat_template=False))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("share_trunk", [True, False])
def test_shared_prefix_configs_and_sequential_answers_agree(arch, share_trunk, monkeypatch):
    model, tok = tiny_model(arch, seed=2), tiny_tokenizer()
    lengths = {len(tok(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # every prompt padded differently

    want = _sequential(model, tok, PROMPTS, CONFIGS, max_new_tokens=5)
    plain = hp_fast.generate_configs(model, tok, PROMPTS, CONFIGS, max_new_tokens=5, batch_size=4,
                                     chat_template=False, progress=False, share_trunk=share_trunk)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the shared-prefix path fell back to generate_configs")
    monkeypatch.setattr(prefix, "generate_configs", no_fallback)
    shared = generate_configs_shared_prefix(model, tok, PROMPTS, CONFIGS, max_new_tokens=5,
                                            batch_size=4, chat_template=False, progress=False,
                                            min_prefix=4, share_trunk=share_trunk)
    assert plain == want
    assert shared == want
    assert want[0] != want[1] and want[0] != want[2]  # the edits change the answers


def test_tensor_configs_equal_dict_configs():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    as_tensor = [None if c is None else hp_fast.edits.gains_tensor(c, 3, 6) for c in CONFIGS]
    want = hp_fast.generate_configs(model, tok, PROMPTS[:3], CONFIGS, max_new_tokens=3,
                                    chat_template=False, progress=False)
    got = hp_fast.generate_configs(model, tok, PROMPTS[:3], as_tensor, max_new_tokens=3,
                                   chat_template=False, progress=False)
    assert got == want


def test_rows_and_gains_helpers():
    model = tiny_model("llama")
    rows = config_rows([2, 0, 1], 2)
    assert rows == [(0, 2), (1, 2), (0, 0), (1, 0), (0, 1), (1, 1)]
    assert by_config(rows, [f"{c}{i}" for c, i in rows], 2, 3) == [["00", "01", "02"],
                                                                   ["10", "11", "12"]]
    g = config_gains(model, [None, {(1, 2): -1.0}])  # (C, L, H)
    assert g.shape == (2, 3, 6) and g[0].eq(1).all() and g[1, 1, 2] == -1 and (g[1] != 1).sum() == 1


def test_padding_side_restored_also_on_error():
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    with padding_side(tok, "left") as t:
        assert t.padding_side == "left"
    assert tok.padding_side == "right"
    with pytest.raises(RuntimeError), padding_side(tok, "left"):
        raise RuntimeError("boom")
    assert tok.padding_side == "right"
    with pytest.raises(ValueError, match="padding side"), padding_side(tok, "middle"):
        pass
    assert tok.padding_side == "right"


def test_generate_answers_leaves_padding_side_and_model_unchanged():
    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    tok.padding_side = "right"
    before = [p.clone() for p in model.parameters()]
    one = generate_answers(model, tok, PROMPTS, max_new_tokens=4, batch_size=2, chat_template=False)
    alone = [generate_answers(model, tok, [p], max_new_tokens=4, chat_template=False)[0]
             for p in PROMPTS]
    assert one == alone and tok.padding_side == "right"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
