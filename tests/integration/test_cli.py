"""The hp-fast command line on a tiny model saved to a folder (load_model's folder path)."""
from __future__ import annotations

import json

import pytest

from hp_fast.cli import main, parse_heads, parse_layers, read_prompts
from helpers.tiny_models import tiny_model, tiny_tokenizer

PROMPTS = ["the city of paris is in france", "what color is the sky", "a red car and a blue house",
           "which country is berlin in", "describe a cat", "one two three"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def test_capture_rank_describe_generate(model_dir, prompt_file, tmp_path, capsys):
    acts = tmp_path / "acts.safetensors"
    assert main(["capture", "--model", str(model_dir), "--prompts", str(prompt_file),
                 "--no-chat-template", "--out", str(acts)]) == 0
    assert acts.is_file()
    out_json, plot = tmp_path / "rank.json", tmp_path / "rank.png"
    assert main(["rank", "--model", str(model_dir), "--acts", str(acts), "--concept-file",
                 str(_colors(tmp_path)), "--top", "3", "--k", "4", "--json", str(out_json),
                 "--plot", str(plot)]) == 0
    ranking = json.loads(out_json.read_text())
    assert ranking["k"] == 4 and len(ranking["scores"]) == 3
    assert plot.stat().st_size > 1000
    assert main(["describe", "--model", str(model_dir), "--acts", str(acts), "--heads", "0.1,2.3",
                 "--k-tokens", "2"]) == 0
    assert main(["generate", "--model", str(model_dir), "--prompt", "the city of", "--heads", "1.2",
                 "--alpha", "-1", "--max-new-tokens", "3", "--no-chat-template"]) == 0
    text = capsys.readouterr().out
    assert "L 0 H 1" in text and "edited:" in text


def _colors(tmp_path):
    path = tmp_path / "colors.txt"
    path.write_text("red\ngreen\nblue\nyellow\nblack\nwhite\n")
    return path


def test_bad_inputs_give_messages_not_tracebacks(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["capture", "--model", str(model_dir), "--prompts", str(empty),
                 "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["rank", "--model", str(model_dir), "--prompts", str(empty), "--concept", "nope"]) == 2
    assert main(["rank", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_parsers(tmp_path):
    assert parse_heads("12.3,4.5") == [(12, 3), (4, 5)]
    assert parse_heads("1:2 3:4") == [(1, 2), (3, 4)]
    with pytest.raises(ValueError, match="LAYER.HEAD"):
        parse_heads("12")
    assert parse_layers("2-4,7") == [2, 3, 4, 7] and parse_layers(None) is None
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n"b"\n{"text": "c"}\n')
    assert read_prompts(jl) == ["a", "b", "c"]
    jl.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        read_prompts(jl)


def test_eval_classify_on_a_tiny_vlm_folder(tmp_path):
    """`hp-fast eval classify` loads a VLM folder and runs the digits protocol end to end."""
    from helpers.tiny_vlms import tiny_vlm
    model, proc = tiny_vlm("llava")
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    out = tmp_path / "classify"
    assert main(["eval", "classify", "--model", str(folder), "--digits", "2", "--ks", "2",
                 "--random-sets", "2", "--out", str(out)]) == 0
    assert (out / "results.json").is_file()


def test_eval_classify_refuses_a_text_model():
    assert main(["eval", "classify", "--out", "unused"]) == 2
