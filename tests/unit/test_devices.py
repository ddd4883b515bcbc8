"""Models spread over devices, offloaded by accelerate, or quantized.

A tiny Llama is saved to a folder and loaded twice: in memory, and with a device map that
offloads layers (and the embedding, so ``next(model.parameters())`` is on ``meta``) to disk.
Capture, ranking, description, both edit paths and fold must give the in-memory numbers.
bitsandbytes 4-/8-bit checkpoints (a Llama with hidden 128 = 2 heads x 64, the widths
bitsandbytes needs) capture, rank and edit through their own dequantization; fold refuses
them. GPTQ/AWQ-like layers are stand-in classes (their packages do not install here).
"""
from __future__ import annotations

import hashlib
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hp_fast
from hp_fast.cli import main
from hp_fast.models.devices import execution_device, input_device, offload_hook, offloaded_store
from hp_fast.models.placement import parse_device_map, parse_max_memory, placement_kwargs
from hp_fast.models.weights import linear_shape, module_weight, weight_format
from helpers.tiny_models import VOCAB, tiny_model, tiny_tokenizer

PROMPTS = ["what color is the sky", "which country is paris in", "one two three four five",
           "the cat and the dog"]
GAINS = {(1, 2): -1.0, (2, 0): 0.0, (2, 5): 2.5}
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
            "lm_head": "disk"}


def _logits(model, tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.float()


def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def offload_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("offload") / "not" / "yet"  # load_model creates it


@pytest.fixture(scope="module")
def models(folder, offload_dir):
    mem, tok = hp_fast.load_model(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off, _ = hp_fast.load_model(str(folder), device_map=DISK_MAP, offload_folder=offload_dir)
    return mem, off, tok


# ---- offloaded to disk --------------------------------------------------------------------

def test_the_offloaded_model_really_keeps_weights_on_meta(models, offload_dir):
    _, off, _ = models
    assert offload_dir.is_dir()  # created (transformers may read disk weights from the checkpoint)
    assert next(off.parameters()).device.type == "meta"  # the embedding is offloaded too
    for layer in (1, 2):
        o_proj = off.model.layers[layer].self_attn.o_proj
        assert o_proj.weight.device.type == "meta" and offload_hook(o_proj) is not None
        assert weight_format(o_proj) == "offloaded"
    assert weight_format(off.model.layers[0].self_attn.o_proj) == "float"
    assert input_device(off) == torch.device("cpu")
    assert execution_device(off.model.layers[1].self_attn.o_proj) == torch.device("cpu")


def test_w_o_and_unembedding_come_from_the_offload_storage(models):
    mem, off, _ = models
    am, ao = hp_fast.get_adapter(mem), hp_fast.get_adapter(off)
    for layer in range(am.num_layers):
        assert torch.equal(ao.w_o(layer), am.w_o(layer))
    assert torch.equal(ao.all_head_w_o(), am.all_head_w_o())
    assert torch.equal(ao.unembedding(), am.unembedding())
    assert ao.unembedding().device.type == "cpu"
    plain = mem.model.layers[1].self_attn.o_proj
    assert module_weight(plain) is plain.weight  # a plain layer: the weight itself, no copy


def test_heads_w_o_reads_each_layer_once_and_equals_head_w_o(models):
    mem, off, _ = models
    heads = [(2, 5), (0, 0), (2, 5), (1, 3), (2, 0)]  # unordered, a duplicate
    ao, am = hp_fast.get_adapter(off), hp_fast.get_adapter(mem)
    reads = []
    real = type(ao).w_o
    ao.w_o = lambda layer: reads.append(layer) or real(ao, layer)
    try:
        got = ao.heads_w_o(heads)
    finally:
        del ao.w_o
    assert sorted(reads) == [0, 1, 2]
    for (l, h), w in zip(heads, got):
        assert w.shape == (am.head_dim, am.hidden_size) and torch.equal(w, am.head_w_o(l, h))
    assert ao.dictionary_device == torch.device("cpu")


def test_capture_rank_describe_match_the_in_memory_model(models):
    mem, off, tok = models
    from hp_fast.capture import capture_many
    kw = dict(chat_template=False, progress=False)
    a, b = capture_many(mem, tok, PROMPTS, **kw), capture_many(off, tok, PROMPTS, **kw)
    for agg in a:
        torch.testing.assert_close(b[agg].z, a[agg].z, rtol=0, atol=1e-6)
        assert a[agg].z.abs().max() > 1e-3
    ra = hp_fast.rank_heads(a["mean"], mem, tok, "colors", k=4, progress=False)
    rb = hp_fast.rank_heads(b["mean"], off, tok, "colors", k=4, progress=False)
    torch.testing.assert_close(rb.scores, ra.scores, rtol=0, atol=1e-6)
    assert ra.top(5) == rb.top(5)
    heads = ra.top(3)
    assert (hp_fast.describe_heads(b["mean"], off, tok, heads, k=4)
            == hp_fast.describe_heads(a["mean"], mem, tok, heads, k=4))
    assert (hp_fast.logit_lens_tokens(b["mean"], off, tok, heads, k=4)
            == hp_fast.logit_lens_tokens(a["mean"], mem, tok, heads, k=4))


@pytest.mark.parametrize("mode", ["attention", "hook"])
def test_edit_heads_on_offloaded_layers_matches_in_memory(models, mode):
    mem, off, tok = models
    base = _logits(mem, tok)
    assert hp_fast.edits.edit_path(off, mode) == mode
    with hp_fast.edit_heads(mem, GAINS, mode=mode):
        want = _logits(mem, tok)
    with hp_fast.edit_heads(off, GAINS, mode=mode):
        got = _logits(off, tok)
    assert (want - base).abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(off, tok), base, rtol=0, atol=1e-6)  # restored


def test_generation_with_edits_matches_in_memory(models):
    mem, off, tok = models
    configs = [None, GAINS, {(0, 1): -2.0}]
    kw = dict(max_new_tokens=5, chat_template=False)
    assert (hp_fast.generate_configs(off, tok, PROMPTS, configs, **kw)
            == hp_fast.generate_configs(mem, tok, PROMPTS, configs, **kw))
    enc = tok(PROMPTS[0], return_tensors="pt")
    ids = {}
    for name, model in (("mem", mem), ("off", off)):
        with hp_fast.edit_heads(model, GAINS):
            ids[name] = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ids["off"], ids["mem"]) and ids["mem"].shape[1] > enc["input_ids"].shape[1]


def test_fold_writes_the_offload_storage_and_undo_restores_it(models, folder, offload_dir):
    mem, off, tok = models
    base = _logits(off, tok)
    with hp_fast.edit_heads(mem, GAINS, mode="hook"):
        want = _logits(mem, tok)
    o_proj = off.model.layers[2].self_attn.o_proj
    store, key = offloaded_store(o_proj)
    keys_before, disk_before = set(store), _folder_hash(folder) + _folder_hash(offload_dir)
    stored_before = offload_hook(o_proj).weights_map["weight"].clone()
    handle = hp_fast.fold_head_gains(off, GAINS)
    assert key in store  # the edited W_O overrides the disk copy ...
    torch.testing.assert_close(_logits(off, tok), want, rtol=0, atol=1e-6)
    folded_w = module_weight(o_proj)
    cols = slice(0, hp_fast.get_adapter(off).head_dim)
    assert torch.equal(folded_w[:, cols], torch.zeros_like(folded_w[:, cols]))  # gain 0 on (2, 0)
    handle.undo()
    assert set(store) == keys_before  # ... and files on disk are never written:
    assert _folder_hash(folder) + _folder_hash(offload_dir) == disk_before
    assert torch.equal(offload_hook(o_proj).weights_map["weight"], stored_before)
    assert torch.equal(_logits(off, tok), base)


def test_fold_on_in_memory_layers_of_the_same_model_is_exact(models):
    """Layer 0 of the offloaded model is a plain CPU layer: edited in place, undone bit for bit."""
    _, off, tok = models
    w = off.model.layers[0].self_attn.o_proj.weight
    before, base = w.clone(), _logits(off, tok)
    with hp_fast.fold_head_gains(off, {(0, 3): 0.5, (2, 1): -1.0}):
        assert not torch.equal(w, before)
        assert (_logits(off, tok) - base).abs().max() > 1e-3
    assert torch.equal(w, before) and torch.equal(_logits(off, tok), base)


def test_cpu_offload_flavour_state_dict_in_memory(folder):
    """accelerate.cpu_offload: weights on meta, kept in a plain dict of CPU tensors (what a
    device_map value "cpu" gives next to a GPU): capture equal, fold and undo exact."""
    from accelerate import cpu_offload
    mem, tok = hp_fast.load_model(str(folder))
    off, _ = hp_fast.load_model(str(folder))
    cpu_offload(off, execution_device=torch.device("cpu"))
    o_proj = off.model.layers[1].self_attn.o_proj
    assert o_proj.weight.device.type == "meta" and weight_format(o_proj) == "offloaded"
    a = hp_fast.capture(mem, tok, PROMPTS, chat_template=False, progress=False)
    b = hp_fast.capture(off, tok, PROMPTS, chat_template=False, progress=False)
    torch.testing.assert_close(b.z, a.z, rtol=0, atol=1e-6)
    store, key = offloaded_store(o_proj)
    original = store[key]
    with hp_fast.edit_heads(mem, GAINS):
        want = _logits(mem, tok)
    with hp_fast.fold_head_gains(off, GAINS):
        torch.testing.assert_close(_logits(off, tok), want, rtol=0, atol=1e-6)
        assert store[key] is not original
    assert store[key] is original and torch.equal(_logits(off, tok), _logits(mem, tok))


def test_auto_device_map_with_max_memory_offloads_and_captures(folder, tmp_path, models):
    mem, _, tok = models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto, _ = hp_fast.load_model(str(folder), device_map="auto", max_memory={"cpu": "60KB"},
                                     offload_folder=tmp_path / "off")
    assert "disk" in set(auto.hf_device_map.values())
    a = hp_fast.capture(mem, tok, PROMPTS, chat_template=False, progress=False)
    b = hp_fast.capture(auto, tok, PROMPTS, chat_template=False, progress=False)
    torch.testing.assert_close(b.z, a.z, rtol=0, atol=1e-6)


class _DroppingStore(dict):
    """A weights map that ignores writes: a fold into it would be a silent no-op."""

    def __setitem__(self, key, value):
        if key not in self:
            super().__setitem__(key, value)


def _hooked(model, layer: int, weights_map):
    o_proj = model.model.layers[layer].self_attn.o_proj
    o_proj._hf_hook = types.SimpleNamespace(offload=True, weights_map=weights_map,
                                            execution_device=torch.device("cpu"))
    return o_proj


def test_fold_refuses_when_the_forward_would_not_see_the_edit():
    model = tiny_model("llama")
    w = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    _hooked(model, 1, _DroppingStore(weight=w))
    with pytest.raises(RuntimeError, match="does not hold the edited values"):
        hp_fast.fold_head_gains(model, {(0, 1): 0.5, (1, 2): -1.0})
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight,
                       tiny_model("llama").model.layers[0].self_attn.o_proj.weight)  # rolled back


def test_fold_refuses_read_only_offload_storage():
    model = tiny_model("llama")
    w = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    _hooked(model, 1, types.MappingProxyType({"weight": w}))
    with pytest.raises(ValueError, match="cannot be written"):
        hp_fast.fold_head_gains(model, {(1, 2): -1.0})


def test_a_meta_weight_without_an_offload_hook_is_an_error():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(ValueError, match="meta device and no accelerate offload hook"):
        hp_fast.get_adapter(model).w_o(0)


# ---- bitsandbytes ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bnb_folder(tmp_path_factory):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    out = tmp_path_factory.mktemp("tiny_bnb")
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def _bnb_model(folder, bits: str):
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True) if bits == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hp_fast.load_model(str(folder), device="cpu", quantization_config=q)


def _manual_dequant(o_proj, bits: str) -> torch.Tensor:
    w = o_proj.weight
    if bits == "4bit":
        import bitsandbytes.functional as F
        return F.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else o_proj.state.SCB
    return w.data.float() * scb.float()[:, None] / 127.0  # LLM.int8(): int8 rows x absmax / 127


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_capture_rank_edit_and_fold_refusal(bnb_folder, bits):
    model, tok = _bnb_model(bnb_folder, bits)
    ad = hp_fast.get_adapter(model)
    o_proj = ad.out_projs[1]
    assert weight_format(o_proj) == f"bnb-{bits}" and linear_shape(o_proj) == (128, 128)
    assert (ad.num_heads, ad.head_dim, ad.hidden_size) == (2, 64, 128)
    base = _logits(model, tok)  # a forward pass first: 8-bit moves its scales into .state
    w = ad.w_o(1).float()
    torch.testing.assert_close(w, _manual_dequant(o_proj, bits), rtol=0, atol=1e-6)
    acts = hp_fast.capture(model, tok, PROMPTS, chat_template=False, progress=False)
    assert torch.isfinite(acts.z).all() and acts.z.abs().max() > 0
    ranking = hp_fast.rank_heads(acts, model, tok, "colors", k=3, progress=False)
    assert torch.isfinite(ranking.scores).all()
    gain, cols = -1.0, slice(64, 128)  # head 1 of layer 1
    with hp_fast.edit_heads(model, {(1, 1): gain}, mode="attention"):
        edited = _logits(model, tok)
    with hp_fast.edit_heads(model, {(1, 1): gain}, mode="hook"):
        torch.testing.assert_close(_logits(model, tok), edited, rtol=0, atol=1e-6)

    def scale_head_input(_m, args):  # manual: the definition, head 1's slice of x times g
        x = args[0].clone()
        x[..., cols] *= gain
        return (x, *args[1:])
    handle = o_proj.register_forward_pre_hook(scale_head_input)
    try:
        manual = _logits(model, tok)
    finally:
        handle.remove()
    assert (edited - base).abs().max() > 0.1
    # the quantized layer itself computes both sides (on some CPUs bitsandbytes' 4-bit kernel is
    # not x @ dequant(W).T to 1e-4: a manual product from the dequantized W missed by 0.98 on an
    # AMD EPYC), so the edit must equal the definition up to float rounding
    assert (manual - edited).abs().max() < 1e-5
    with pytest.raises(ValueError, match=f"fold_head_gains cannot edit {bits[0]}-bit bitsandbytes "
                       r"weights in place; use edit_heads \(zero weight change\) or export from "
                       "the unquantized checkpoint"):
        hp_fast.fold_head_gains(model, {(0, 0): 0.5, (1, 1): gain})
    assert torch.equal(_logits(model, tok), base)  # nothing changed


# ---- other quantized layers, unknown layers -------------------------------------------------

class QuantLinear(nn.Module):
    """Stand-in for a GPTQ QuantLinear: packed weights, a dequantize() of its own."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", (weight * 1000).round().to(torch.int32))

    def dequantize(self) -> torch.Tensor:
        return self.packed.float() / 1000  # (out, in)

    def forward(self, x):
        return x @ self.dequantize().T.to(x.dtype)


class WQLinear_GEMM(QuantLinear):  # noqa: N801 - the AWQ class name is what is recognized
    """Stand-in for an AWQ layer without a dequantize() method."""
    dequantize = None

    def forward(self, x):
        return x @ (self.packed.float() / 1000).T.to(x.dtype)


def _swap_o_proj(model, cls):
    ref = []
    for layer in model.model.layers:
        q = cls(layer.self_attn.o_proj.weight.detach())
        ref.append(q.packed.float() / 1000)
        layer.self_attn.o_proj = q
    return ref


def test_gptq_like_layer_is_read_through_its_dequantize():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ref = _swap_o_proj(model, QuantLinear)
    ad = hp_fast.get_adapter(model)
    assert weight_format(ad.out_projs[0]) == "quantized"
    for layer, w in enumerate(ref):
        assert torch.equal(ad.w_o(layer), w)
    acts = hp_fast.capture(model, tok, PROMPTS, chat_template=False, progress=False)
    assert torch.isfinite(hp_fast.rank_heads(acts, model, tok, "colors", k=3, progress=False).scores).all()
    base = _logits(model, tok)
    with hp_fast.edit_heads(model, GAINS, mode="hook"):
        assert (_logits(model, tok) - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot edit quantized .*QuantLinear weights in place"):
        hp_fast.fold_head_gains(model, GAINS)


def test_quantized_layer_without_dequantize_is_a_clear_error():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    _swap_o_proj(model, WQLinear_GEMM)
    ad = hp_fast.get_adapter(model)  # shapes come from in/out_features: no weight read
    with pytest.raises(ValueError, match="WQLinear_GEMM is a quantized linear layer without a "
                       r"dequantize\(\) method"):
        ad.w_o(0)
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="WQLinear_GEMM"):  # capture reads W_O for its
        hp_fast.capture(model, tok, PROMPTS, chat_template=False, progress=False)
    assert calls == []  # ... fingerprint before any forward pass


def test_dequantize_with_the_wrong_layout_is_an_error():
    class ShiftedQuantLinear(QuantLinear):
        def dequantize(self):
            return super().dequantize()[:, :-1]
    model = tiny_model("llama")
    _swap_o_proj(model, ShiftedQuantLinear)
    with pytest.raises(ValueError, match=r"dequantize\(\) gave \(48, 47\).*\(48, 48\)"):
        hp_fast.get_adapter(model).w_o(0)


class MyProjection(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x):
        return x @ self.weight.T


def test_unknown_linear_type_is_an_error_naming_it():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.o_proj = MyProjection(layer.self_attn.o_proj.weight.detach())
    with pytest.raises(ValueError, match="test_devices.MyProjection is not a linear layer"):
        hp_fast.get_adapter(model)
    wrapped = MyProjection(torch.zeros(4, 4))
    wrapped.base_layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="merge_and_unload"):
        module_weight(wrapped)


# ---- load_model and CLI arguments ----------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"dtype": "float8"}, "dtype='float8' is unknown; use one of float32, fp32"),
    ({"dtype": torch.int8}, "not a floating-point type"),
    ({"device": "gpu"}, "device='gpu' is not a device name"),
    ({"device": "cpu", "device_map": "auto"}, "not both"),
    ({"max_memory": {"cpu": "1GiB"}}, "max_memory only applies with device_map"),
    ({"offload_folder": "x"}, "offload_folder only applies with device_map"),
    ({"device_map": {"model.layers.0": "disk"}}, "pass offload_folder"),
    ({"device_map": "autoo"}, "device_map='autoo' is not a device name.*strategy: auto"),
    ({"device_map": {"lm_head": "cpu"}, "max_memory": {"cpu": "1GiB"}}, "would be ignored"),
    ({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}}, "max_memory key 'gpu0'"),
    ({"device_map": "auto", "max_memory": {0: "lots"}}, r"max_memory\[0\]='lots'"),
])
def test_bad_load_arguments_fail_before_loading(kw, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        hp_fast.load_model(str(tmp_path / "no_such_model"), **kw)  # the argument error, not a load error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused():
    with pytest.raises(ValueError, match="'cuda:1' is not available on this machine"):
        placement_kwargs(device="cuda:1")
    with pytest.raises(ValueError, match=r"device_map\['model.layers.0'\]='cuda:0' is not available"):
        placement_kwargs(device_map={"model.layers.0": 0})


def test_device_map_needs_accelerate(monkeypatch):
    import hp_fast.models.placement as placement
    monkeypatch.setattr(placement, "has_accelerate", lambda: False)
    with pytest.raises(ValueError, match="pip install accelerate"):
        placement_kwargs(device_map="auto")


def test_placement_kwargs_and_cli_parsers(tmp_path):
    assert placement_kwargs(dtype="bf16") == {"dtype": torch.bfloat16}
    assert placement_kwargs(dtype="auto") == {"dtype": "auto"}
    kw = placement_kwargs(device_map="auto", max_memory={"0": "2 GiB", "cpu": 10**9},
                          offload_folder=tmp_path / "a" / "b")
    assert kw["max_memory"] == {0: "2GiB", "cpu": 10**9} and (tmp_path / "a" / "b").is_dir()
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {"0": "20GiB", "cpu": "60GiB"}
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"lm_head": "disk"}') == {"lm_head": "disk"}
    path = tmp_path / "map.json"
    path.write_text('{"model.layers.0": "cpu"}')
    assert parse_device_map(str(path)) == {"model.layers.0": "cpu"}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_device_map("{lm_head: disk}")
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def _cli_capture(folder, tmp_path, name, *extra):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / f"{name}.safetensors"
    rc = main(["capture", "--model", str(folder), "--prompts", str(prompts), "--no-chat-template",
               "--out", str(out), *extra])
    return rc, out


def test_cli_dtype_device_and_device_map(folder, tmp_path, capsys):
    from hp_fast.capture import HeadActivations
    rc, f32 = _cli_capture(folder, tmp_path, "f32")
    assert rc == 0, capsys.readouterr().err
    rc, bf16 = _cli_capture(folder, tmp_path, "bf16", "--dtype", "bfloat16", "--device", "cpu")
    assert rc == 0, capsys.readouterr().err
    a, b = HeadActivations.load(f32).z, HeadActivations.load(bf16).z
    assert not torch.equal(a, b)  # bfloat16 weights were used ...
    torch.testing.assert_close(b, a, rtol=0.1, atol=0.05)  # ... and still the same model
    dmap = '{"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", ' \
           '"model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}'
    rc, off = _cli_capture(folder, tmp_path, "off", "--device-map", dmap,
                           "--offload-folder", str(tmp_path / "offload"))
    assert rc == 0, capsys.readouterr().err
    torch.testing.assert_close(HeadActivations.load(off).z, a, rtol=0, atol=1e-6)
    rc, _ = _cli_capture(folder, tmp_path, "bad", "--device-map", dmap)  # no --offload-folder
    assert rc == 2 and "pass offload_folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["capture", "--model", str(folder), "--dtype", "float8", "--out", "x.safetensors"])
