"""What a first-time user meets: readable plot titles, a quiet model load, early CLI errors."""
from __future__ import annotations

import importlib
import logging
import warnings

import pytest
import torch

from hp_fast.cli import main
from hp_fast.evaluation.plots import fit_title, heatmap
from helpers.tiny_models import tiny_model, tiny_tokenizer

LONG = ("countries: somp scores (EVR minus random-token EVR), aggregate mean, criterion l1, "
        "layers 2-29, SmolLM2-135M-Instruct")


@pytest.mark.parametrize("title", [LONG, "W" * 90, "short"])
@pytest.mark.parametrize("width", [4.0, 5.2, 12.0])
def test_title_is_wrapped_inside_the_figure(title, width):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(width, 3), layout="constrained")
    text = fit_title(fig, title)
    fig.canvas.draw()
    box = text.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.get_figwidth() * fig.dpi  # nothing cut at either side
    assert "".join(text.get_text().split()) == "".join(title.split())  # wrapped, nothing dropped
    plt.close(fig)


def test_heatmap_with_a_long_title_writes_a_png(tmp_path):
    out = heatmap(torch.rand(30, 9), tmp_path / "h.png", title=LONG, marked=[(3, 4)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_first_use")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("kw", [{}, {"torch_dtype": torch.float32}])
def test_load_model_emits_no_deprecation_warning(model_dir, kw):
    from transformers.utils import logging as hf_logging
    from hp_fast import load_model
    once = getattr(hf_logging, "warning_once", None)
    if hasattr(once, "cache_clear"):  # transformers prints each such warning once per process
        once.cache_clear()
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _ = load_model(str(model_dir), **kw)
    finally:
        root.removeHandler(handler)
    said = handler.messages + [str(w.message) for w in caught]
    assert not [m for m in said if "deprecat" in m.lower()], said
    assert next(model.parameters()).dtype == torch.float32


@pytest.fixture
def capture_spy(monkeypatch):
    """Wraps hp_fast.capture.capture (the one the CLI calls) and counts the calls."""
    mod = importlib.import_module("hp_fast.capture")
    calls = []
    real = mod.capture

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(mod, "capture", spy)
    return calls


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,body\n1,what color is the sky\n2,which country is paris in\n3,one two three\n")
    return path


def _run(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_good_run_captures(model_dir, prompts, capture_spy, tmp_path, capsys):
    rc, err = _run(["capture", "--model", str(model_dir), "--prompts", str(prompts), "--prompt-field",
                    "body", "--out", str(tmp_path / "a.safetensors"), "--no-chat-template"], capsys)
    assert rc == 0, err
    assert capture_spy == [1]  # the spy sees the CLI's capture, so the checks below can fail


@pytest.mark.parametrize("extra, message", [
    (["--layers", "1-99"], r"--layers 1-99: layer\(s\) \[3, 4"),
    (["--layers", "7"], "the model has 3 layers, 0 to 2"),
    (["--concept-file", "WORDS"], "none of its 2 words"),
])
def test_rank_checks_against_the_model_before_capturing(model_dir, prompts, capture_spy, tmp_path,
                                                         capsys, extra, message):
    import re
    words = tmp_path / "w.txt"
    words.write_text("zebra\nquokka\n")  # not in the tiny vocabulary
    extra = [str(words) if x == "WORDS" else x for x in extra]
    concept = [] if "--concept-file" in extra else ["--concept", "colors"]
    rc, err = _run(["rank", "--model", str(model_dir), "--prompts", str(prompts), "--prompt-field", "body",
                    *concept, *extra], capsys)
    assert rc == 2 and re.search(message, err), err
    assert capture_spy == []  # failed before any capture


@pytest.mark.parametrize("argv, message", [
    (["rank", "--k", "0", "--concept", "colors"], "--k must be at least 1"),
    (["rank", "--top", "0", "--concept", "colors"], "--top must be at least 1"),
    (["rank", "--layers", "two-five", "--concept", "colors"], "use forms like 2-29"),
    (["rank", "--concept", "colours"], "colours"),
    (["rank"], "give --concept NAME"),
    (["describe", "--heads", "1.x"], "is not LAYER.HEAD"),
    (["describe", "--heads", "1.1", "--k-tokens", "0"], "--k-tokens must be at least 1"),
    (["rank", "--concept", "colors", "--acts", "missing.safetensors"], "--acts missing.safetensors"),
])
def test_bad_arguments_fail_before_the_model_loads(monkeypatch, prompts, capsys, argv, message):
    import hp_fast.models.loading as loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    rc, err = _run([*argv, "--prompts", str(prompts), "--prompt-field", "body"], capsys)
    assert rc == 2 and message in err, err


def test_describe_checks_heads_before_capturing(model_dir, prompts, capture_spy, capsys):
    rc, err = _run(["describe", "--model", str(model_dir), "--prompts", str(prompts), "--prompt-field",
                    "body", "--heads", "1.2,2.6"], capsys)
    assert rc == 2 and "--heads: 2.6 do not exist; the model has 3 layers x 6 heads" in err, err
    assert capture_spy == []


def test_bad_prompt_file_fails_before_the_model_loads(monkeypatch, prompts, capsys):
    import hp_fast.models.loading as loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    rc, err = _run(["capture", "--prompts", str(prompts), "--out", "x.safetensors"], capsys)
    assert rc == 2 and "fields present: id, body" in err, err
