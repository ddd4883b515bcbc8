"""hp_fast.export_edited and `hp-fast export` on tiny random Llamas (no download).

Tolerances. The HF folder holds W_O with the gains folded in (``g * W_O[:, h]`` rounded once in
float32); ``edit_heads`` scales the o_proj input instead (``W_O[:, h] @ (g z_h)``): the same map,
rounded in another order, so float32 logits agree to ~1e-7 (atol 1e-4 leaves room for other
BLAS paths). An F32 GGUF holds the same float32 numbers (atol 1e-4 as well). An F16 GGUF rounds
every 2-D weight to 11 significant bits (relative error <= 2**-11 ~ 4.9e-4 per weight); on these
models the logits move by < 1e-3 of their largest magnitude (measured ~2e-4 absolute), checked
at 1e-2 relative; the edit itself moves them by > 10 % of it, so the checks can fail.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import hp_fast
import hp_fast.export as export_mod
from hp_fast import HeadRanking, edit_heads, export_edited
from hp_fast.cli import main
from hp_fast.export import read_gains_file
from hp_fast.export_gguf import check_gguf_export, rope_rows_to_gguf
from helpers.tiny_models import tiny_model, tiny_tokenizer
from helpers.tokenizers_fixtures import bytelevel_bpe

GAINS = {(0, 1): -1.0, (2, 3): 0.37, (1, 5): 5.0}
TEXT = " red green blue France ten happy"


def bpe_llama(tied: bool, seed: int = 0):
    """A tiny Llama whose vocabulary is the byte-level BPE fixture's (GGUF needs a real BPE)."""
    tok = bytelevel_bpe()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tied,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval().requires_grad_(False), tok


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, snap) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k  # bit for bit


def edited_logits(model, ids, gains):
    with torch.no_grad(), edit_heads(model, gains):
        return model(ids).logits


@pytest.fixture()
def llama():
    return tiny_model("llama"), tiny_tokenizer()


def ids_of(tok, text="the city of paris is in france what color"):
    return torch.tensor([tok(text)["input_ids"]])


# --- HF folder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_hf_export_reloads_with_the_edit(tmp_path, tied):
    model, tok = bpe_llama(tied)
    ids = ids_of(tok, TEXT)
    ref, base = edited_logits(model, ids, GAINS), model(ids).logits
    snap = snapshot(model)
    out = export_edited(model, tok, GAINS, tmp_path / "edited", progress=False)
    assert_same(model, snap)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "README.md", "hp_fast_edit.json"):
        assert (out / name).is_file(), name
    back = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = back(ids).logits
    assert (got - ref).abs().max() < 1e-4
    assert (base - ref).abs().max() > 0.1 * ref.abs().max()   # the edit is visible
    assert back.config.tie_word_embeddings == tied
    shares = back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert shares == tied
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
    reloaded_tok = tf.AutoTokenizer.from_pretrained(out)
    assert reloaded_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def test_tensor_gains_and_an_edit_of_every_head(tmp_path, llama):
    model, tok = llama
    g = torch.linspace(-2, 3, 18).reshape(3, 6)
    out = export_edited(model, tok, g, tmp_path / "all", progress=False)
    back = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = ids_of(tok)
    assert (back(ids).logits - edited_logits(model, ids, g)).abs().max() < 1e-4
    assert len(json.loads((out / "hp_fast_edit.json").read_text())["heads"]) == 18


def test_model_card_records_the_edit(tmp_path, llama):
    model, tok = llama
    ranking = HeadRanking(scores=torch.arange(18.0).reshape(3, 6), concept="colors",
                          method="somp", k=4, k_requested=50, num_tokens=6,
                          options={"criterion": "l1", "baseline": "random"})
    out = export_edited(model, tok, {(2, 5): -1.0, (2, 4): 0.0}, tmp_path / "c",
                        card={"ranking": ranking, "prompts": "countries.txt"}, progress=False)
    text = (out / "README.md").read_text()
    assert "| 2 | 5 | -1 |" in text and "| 2 | 4 | 0 |" in text
    assert "`colors`" in text and '"criterion": "l1"' in text and "countries.txt" in text
    assert f"hp_fast {hp_fast.__version__}" in text and "## Use" in text
    record = json.loads((out / "hp_fast_edit.json").read_text())
    assert record["source_model"] == "llama" and record["heads"] == [[2, 4, 0.0], [2, 5, -1.0]]
    assert record["ranking"]["concept"] == "colors" and record["notes"] == {"prompts": "countries.txt"}
    assert read_gains_file(out / "hp_fast_edit.json") == {(2, 4): 0.0, (2, 5): -1.0}


def test_failed_write_leaves_model_and_folder_untouched(tmp_path, llama, monkeypatch):
    model, tok = llama
    snap = snapshot(model)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")

    def broken(m, _tok, folder):
        assert not torch.equal(m.model.layers[0].self_attn.o_proj.weight,
                               snap["model.layers.0.self_attn.o_proj.weight"])  # folded now
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "write_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        export_edited(model, tok, GAINS, target, overwrite=True, progress=False)
    assert_same(model, snap)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no temporary folder left
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(OSError):
        export_edited(model, tok, GAINS, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_non_empty_folder_needs_overwrite(tmp_path, llama):
    model, tok = llama
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="not empty.*overwrite"):
        export_edited(model, tok, GAINS, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "old"
    export_edited(model, tok, GAINS, target, overwrite=True, progress=False)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    (tmp_path / "empty").mkdir()
    export_edited(model, tok, GAINS, tmp_path / "empty", progress=False)   # empty: fine
    with pytest.raises(ValueError, match="is a file"):
        export_edited(model, tok, GAINS, target / "config.json")


def test_refuses_to_replace_the_current_or_source_folder(tmp_path, llama, monkeypatch):
    model, tok = llama
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("x")
    monkeypatch.chdir(work)
    for target in (work, tmp_path):
        with pytest.raises(ValueError, match="would delete"):
            export_edited(model, tok, GAINS, target, overwrite=True)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    loaded, ltok = hp_fast.load_model(str(src))
    with pytest.raises(ValueError, match="would delete"):
        export_edited(loaded, ltok, GAINS, src, overwrite=True)
    assert (work / "data.txt").is_file() and (src / "config.json").is_file()


def test_bad_heads_gains_and_options(tmp_path, llama):
    model, tok = llama
    out = tmp_path / "o"
    cases = [({(3, 0): -1.0}, "does not exist.*3 layers x 6 heads"),
             ({(0, 6): -1.0}, "does not exist"),
             ({(0, 1): math.nan}, "gain of head .* finite"),
             ({(0, 1): "big"}, "gain of head .* finite"),
             (torch.ones(2, 3, 6), "per-row"),
             (torch.ones(4, 6), "must be \\(layers, heads\\)")]
    for gains, msg in cases:
        with pytest.raises(ValueError, match=msg):
            export_edited(model, tok, gains, out)
    half = tiny_model("llama").to(torch.float16)
    snap = snapshot(half)
    with pytest.raises(ValueError, match="gain 1e\\+07 on head \\(1, 1\\) overflows .*float16"):
        export_edited(half, tok, {(0, 2): -1.0, (1, 1): 1e7}, out)
    assert_same(half, snap)
    with pytest.raises(ValueError, match="format"):
        export_edited(model, tok, GAINS, out, format="onnx")
    with pytest.raises(ValueError, match="tokenizer"):
        export_edited(model, None, GAINS, out)
    with pytest.raises(ValueError, match="card"):
        export_edited(model, tok, GAINS, out, card="colors")
    with pytest.raises(ValueError, match="JSON"):
        export_edited(model, tok, GAINS, out, card={"x": object()})
    assert not out.exists()


def test_quantized_or_offloaded_weights_are_refused(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="bitsandbytes"))
    with pytest.raises(ValueError, match="quantized \\(bitsandbytes\\)"):
        export_edited(model, tok, GAINS, tmp_path / "q")
    model = tiny_model("llama")
    o = model.model.layers[1].self_attn.o_proj
    o.weight = torch.nn.Parameter(torch.zeros(o.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="o_proj.weight is quantized"):
        export_edited(model, tok, GAINS, tmp_path / "q")
    model = tiny_model("llama")
    up = model.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(torch.empty(up.weight.shape, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="offloaded"):
        export_edited(model, tok, GAINS, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_gains_file_forms_and_errors(tmp_path):
    p = tmp_path / "g.json"
    p.write_text('{"29.2": -1.0, "23:4": 0.5}')
    assert read_gains_file(p) == {(29, 2): -1.0, (23, 4): 0.5}
    p.write_text("[[29, 2, -1], [0, 0, 3.5]]")
    assert read_gains_file(p) == {(29, 2): -1.0, (0, 0): 3.5}
    for text, msg in [("{", "not valid JSON"), ('"x"', "must hold"), ("[]", "lists no heads"),
                      ('{"29": -1}', "entry '29'"), ('{"1.2": "NaN"}', "finite gain"),
                      ('{"1.2": true}', "finite gain"), ("[[1, 2]]", "not LAYER.HEAD"),
                      ("[[1, 2, -1], [1, 2, 0]]", "listed twice")]:
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_gains_file(p)
    with pytest.raises(ValueError, match="cannot be read"):
        read_gains_file(tmp_path / "missing.json")


# --- GGUF ---------------------------------------------------------------------------------------

def test_rope_rows_match_an_index_loop_and_transformers_inverse():
    """Against a per-row loop of the formula, and undone by the un-permutation transformers'
    GGUF loader applies to llama q/k (the loader our GGUF files are read back with)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    for n_head, dh, d in [(6, 8, 48), (2, 8, 48), (1, 4, 3), (3, 16, 5)]:
        w = torch.randn(n_head * dh, d)
        fast = rope_rows_to_gguf(w, n_head)
        ref = torch.empty_like(w)
        for h in range(n_head):
            for half in range(2):
                for i in range(dh // 2):
                    ref[h * dh + 2 * i + half] = w[h * dh + half * dh // 2 + i]
        assert torch.equal(fast, ref)
        back = LlamaTensorProcessor()._reverse_permute_weights(fast.numpy(), n_head, n_head)
        assert torch.equal(torch.from_numpy(back), w)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype,rel", [("f32", None), ("f16", 1e-2)])
def test_gguf_reloads_through_transformers(tmp_path, tied, dtype, rel):
    model, tok = bpe_llama(tied)
    ids = ids_of(tok, TEXT)
    ref, base = edited_logits(model, ids, GAINS), model(ids).logits
    snap = snapshot(model)
    path = export_edited(model, tok, GAINS, tmp_path / "g", format="gguf", gguf_dtype=dtype,
                         progress=False)
    assert_same(model, snap)
    assert path.name == f"model-{dtype}.gguf" and (path.parent / "README.md").is_file()
    back = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                   dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings == tied
    diff = (back(ids).logits - ref).abs().max()
    assert diff < (1e-4 if rel is None else rel * ref.abs().max())
    assert (base - ref).abs().max() > 0.1 * ref.abs().max()
    gtok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = TEXT + " turquoise seventeen, Red!"
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    # a model loaded from a GGUF (dequantized floats) exports again, also as an HF folder
    again = export_edited(back, gtok, {(0, 1): -1.0}, tmp_path / "again", progress=False)
    cfg = json.loads((again / "config.json").read_text())
    assert "quantization_config" not in cfg and back.hf_quantizer is not None


def test_header_reader_matches_gguf_reader(tmp_path):
    from gguf import GGUFReader
    from hp_fast.export_gguf import source_metadata
    model, tok = bpe_llama(tied=False)
    path = export_edited(model, tok, GAINS, tmp_path / "g", format="gguf", progress=False)
    meta, names, shapes = source_metadata(path)
    reader = GGUFReader(str(path))
    assert names == [t.name for t in reader.tensors]
    assert shapes == {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    fields = {k: f for k, f in reader.fields.items()
              if not k.startswith("GGUF.") and k != "general.architecture"}
    assert meta.keys() == fields.keys()
    for key, (value, vtype, sub) in meta.items():
        f = fields[key]
        assert f.types[0] == vtype and (sub is None or f.types[-1] == sub), key
        want = f.contents()
        if isinstance(value, bytes) or (isinstance(value, list) and value and isinstance(value[0], bytes)):
            value = value.decode() if isinstance(value, bytes) else [v.decode() for v in value]
        assert value == pytest.approx(want) if isinstance(want, float) else value == want, key
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        source_metadata(bad)


def test_gguf_source_metadata_is_copied(tmp_path, monkeypatch):
    """The embedded model's path: key-values and tensor order come from the source GGUF."""
    import hp_fast.export_gguf as eg
    from hp_fast.export_gguf import source_metadata
    model, tok = bpe_llama(tied=True)
    with pytest.warns(UserWarning, match="every gain is 1"):
        src = export_edited(model, tok, {}, tmp_path / "src", format="gguf", gguf_dtype="f32",
                            progress=False)
    loaded = tf.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     dtype=torch.float32).eval()
    monkeypatch.setattr(eg, "embedded_source", lambda m: src)
    out = export_edited(loaded, tok, GAINS, tmp_path / "out", format="gguf",
                        progress=False)
    smeta, snames, _ = source_metadata(src)
    meta, names, _ = source_metadata(out)
    assert names == snames
    assert {k for k in meta if meta[k] != smeta.get(k)} == {"general.file_type", "hp_fast.edit"}
    back = tf.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                                   dtype=torch.float32).eval()
    ids = ids_of(tok, TEXT)
    ref = edited_logits(loaded, ids, GAINS)
    assert (back(ids).logits - ref).abs().max() < 1e-2 * ref.abs().max()   # F16 (see top)
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(5, 48))
    monkeypatch.setattr(eg, "embedded_source", lambda m: src)
    with pytest.raises(ValueError, match="do not match the tensors"):
        export_edited(model, tok, GAINS, tmp_path / "bad", format="gguf", progress=False)
    assert not (tmp_path / "bad").exists()


def test_gguf_refuses_other_architectures_and_tokenizers(tmp_path, llama):
    for arch in ("qwen2", "gpt2"):
        with pytest.raises(ValueError, match="supports llama-architecture.*llama.cpp's converter"):
            export_edited(tiny_model(arch), tiny_tokenizer(), {(0, 0): -1.0}, tmp_path / "g",
                          format="gguf")
    model, tok = llama   # word-level tokenizer: not convertible
    with pytest.raises(ValueError, match="byte-level BPE"):
        check_gguf_export(model, tok)
    with pytest.raises(ValueError, match="gguf dtype"):
        check_gguf_export(model, tok, "q4")
    assert not (tmp_path / "g").exists()


# --- CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _check_folder(out, gains):
    model, tok = tiny_model("llama"), tiny_tokenizer()   # the weights saved in model_dir
    back = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = ids_of(tok)
    assert (back(ids).logits - edited_logits(model, ids, gains)).abs().max() < 1e-4


def test_cli_export_heads_gains_and_ranking(model_dir, tmp_path, capsys):
    out = tmp_path / "heads"
    assert main(["export", "--model", str(model_dir), "--heads", "1.2,0.3", "--alpha", "-1",
                 "--out", str(out)]) == 0
    assert "folded 2 head gains" in capsys.readouterr().out
    _check_folder(out, {(1, 2): -1.0, (0, 3): -1.0})
    gfile = tmp_path / "g.json"
    gfile.write_text('[[2, 5, 0.25], [0, 0, 4]]')
    out = tmp_path / "gains"
    assert main(["export", "--model", str(model_dir), "--gains", str(gfile), "--out", str(out)]) == 0
    _check_folder(out, {(2, 5): 0.25, (0, 0): 4.0})
    scores = torch.zeros(3, 6)
    scores[2, 1], scores[1, 4] = 2.0, 1.0
    rfile = HeadRanking(scores, "colors", "somp", 4, 50, 6, {"criterion": "l1"}).save(tmp_path / "r.json")
    assert main(["export", "--model", str(model_dir), "--ranking", str(rfile), "--top", "2",
                 "--alpha", "0", "--out", str(out), "--overwrite"]) == 0
    _check_folder(out, {(2, 1): 0.0, (1, 4): 0.0})
    assert "`colors`" in (out / "README.md").read_text()


def test_cli_export_errors(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    missing_model = str(tmp_path / "no-model")   # the gains are checked before any loading
    assert main(["export", "--model", missing_model, "--gains", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("old")
    assert main(["export", "--model", missing_model, "--heads", "0.1", "--out", str(full)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (full / "keep.txt").read_text() == "old"
    runs = [(["--heads", "9.0"], "does not exist"),
            ([], "exactly one of"),
            (["--heads", "0.1", "--gains", str(bad)], "exactly one of"),
            (["--ranking", str(bad)], "--top"),
            (["--heads", "0.1", "--alpha", "nan"], "finite"),
            (["--heads", "0.1", "--format", "gguf"], "byte-level BPE")]
    for extra, msg in runs:
        assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)
    scores = torch.zeros(4, 6)
    rfile = HeadRanking(scores, "colors", "somp", 4, 50, 6).save(tmp_path / "r.json")
    assert main(["export", "--model", str(model_dir), "--ranking", str(rfile), "--top", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "ranks 4 x 6 heads" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
