"""VLMs on tiny random models of every supported family (tests/tiny_vlms.py), and image data.

Checked per family: the adapter finds the language backbone's heads and lm_head; image-token
positions agree with the processor's own ids and multimodal masks; image / text / mean / last
aggregates equal a manual computation from hooks on the W_O input (also across batch sizes,
i.e. padding); image-only edits leave the writes at text positions untouched (and text-only
edits those at image positions); generation with edits runs.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from PIL import Image

from helpers import tiny_vlms
from hp_fast import ops
from hp_fast.models import vlm
from hp_fast.models.adapters import VLM_MODEL_TYPES, get_adapter, is_vlm
from hp_fast.capture import HeadActivations
from hp_fast.capture_images import IMAGE_AGGREGATES, capture_images, capture_images_many
from hp_fast.edits import edit_heads
from hp_fast.generation import generate_images
from hp_fast.generation.images import POSITIONS
from hp_fast.data.images import DIGIT_WORDS, digits_dataset, load_image_folder
from hp_fast.ranking import rank_heads

FAMILIES = list(tiny_vlms.FAMILIES)
PROMPTS = ["what color is the sky", "name a big city", "how many cat and dog"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _built(family: str):
    if family == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words")
    return tiny_vlms.tiny_vlm(family)


@functools.lru_cache(maxsize=None)
def _images():
    """Three images of different sizes and aspect ratios (LLaVA-NeXT picks different grids)."""
    ds = digits_dataset(1, size=32, seed=1)
    return [ds.images[0], ds.images[1].resize((48, 24)), ds.images[2].resize((20, 40))]


def _proc_image_id(family, proc) -> int:
    # Gemma3's processor.image_token_id is its <start_of_image> marker; the soft token is the
    # tokenizer's image_token
    return proc.tokenizer.image_token_id if family == "gemma3" else proc.image_token_id


def _full_inputs(model, proc, images, prompts):
    """W_O inputs (per layer, (T, H*dh)) and input_ids of each sample run alone (no padding)."""
    ad = get_adapter(model)
    texts, used = vlm.format_vlm_prompts(proc, model, prompts)
    out = []
    for text, image in zip(texts, images):
        enc = vlm.encode(proc, [text], [image], used_template=used)
        seen = [None] * ad.num_layers

        def make(l):
            def hook(_m, args):
                seen[l] = args[0][0].detach().clone()
            return hook
        hs = [p.register_forward_pre_hook(make(l)) for l, p in enumerate(ad.out_projs)]
        try:
            with torch.no_grad():
                model(**enc, use_cache=False)
        finally:
            for h in hs:
                h.remove()
        out.append((enc["input_ids"][0], torch.stack(seen)))  # (T,), (L, T, H*dh)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_language_backbone(family):
    model, _ = _built(family)
    ad = get_adapter(model)
    assert is_vlm(model) and ad.model_type == family == model.config.model_type
    text_cfg = model.config.text_config
    assert (ad.num_layers, ad.num_heads) == (text_cfg.num_hidden_layers, text_cfg.num_attention_heads)
    assert ad.head_dim == text_cfg.head_dim and ad.hidden_size == text_cfg.hidden_size
    names = {id(m): n for n, m in model.named_modules()}
    for proj in ad.out_projs:  # the language model's W_O, never the vision tower's
        assert ("language_model" in names[id(proj)] or "text_model" in names[id(proj)])
        assert proj.weight.shape == (text_cfg.hidden_size, ad.num_heads * ad.head_dim)
    assert ad.unembedding() is model.lm_head.weight
    assert ad.unembedding().shape == (tiny_vlms.VOCAB, text_cfg.hidden_size)


def test_vlm_types_are_listed():
    from hp_fast.models.adapters import supported_architectures
    assert set(VLM_MODEL_TYPES) <= set(supported_architectures())


@pytest.mark.parametrize("family", FAMILIES)
def test_image_token_positions_match_processor(family):
    model, proc = _built(family)
    texts, used = vlm.format_vlm_prompts(proc, model, PROMPTS)
    enc = proc(text=texts, images=[[im] for im in _images()], return_tensors="pt", padding=True,
               return_mm_token_type_ids=True)
    mask = vlm.image_token_mask(model, enc["input_ids"])
    assert vlm.image_token_id(model) == _proc_image_id(family, proc)
    assert torch.equal(mask, enc["input_ids"] == _proc_image_id(family, proc))
    # the processor's own multimodal mask (Gemma3 renames it token_type_ids); Idefics3 marks the
    # whole image span, delimiters included: the patch tokens are the image-token ids inside it
    mm = enc["token_type_ids"] if family == "gemma3" else enc["mm_token_type_ids"]
    span = mm == 1
    assert torch.equal(mask, span & (enc["input_ids"] == _proc_image_id(family, proc)))
    if family not in ("idefics3",):
        assert torch.equal(mask, span)
    expected = {"llava": 16, "gemma3": 4, "idefics3": 4, "smolvlm": 4}
    counts = mask.sum(1).tolist()
    if family in expected:
        assert counts == [expected[family]] * 3
    elif family.startswith("qwen"):  # native resolution: (t*h*w patches) / (2x2 merge)
        assert counts == (enc["image_grid_thw"].prod(-1) // 4).tolist()
    else:  # LLaVA-NeXT: base 16 + AnyRes tiles + newlines, depends on the image's shape
        assert min(counts) > 16 and len(set(counts)) > 1
    text = vlm.image_positions_mask(model, enc["input_ids"], enc["attention_mask"], "text")
    assert not (text & mask).any() and torch.equal(text | mask, enc["attention_mask"].bool())


@pytest.mark.parametrize("family", FAMILIES)
def test_aggregates_equal_manual_computation(family):
    model, proc = _built(family)
    ad = get_adapter(model)
    images = _images()
    got = capture_images_many(model, proc, images, PROMPTS, aggregates=IMAGE_AGGREGATES,
                              batch_size=2, progress=False)
    pid = _proc_image_id(family, proc)
    L, H, dh = ad.num_layers, ad.num_heads, ad.head_dim
    for i, (ids, x) in enumerate(_full_inputs(model, proc, images, PROMPTS)):  # x (L, T, H*dh)
        img = ids == pid
        manual = {"image": x[:, img].mean(1), "text": x[:, ~img].mean(1), "mean": x.mean(1),
                  "last": x[:, -1]}
        for a, want in manual.items():
            torch.testing.assert_close(got[a].z[i], want.view(L, H, dh), atol=2e-5, rtol=1e-4)
        # the head's mean write over image tokens (method.md §1) from the stored z
        l, h = L - 1, H - 1
        w = ad.head_w_o(l, h).detach()  # (dh, d)
        write = (x[l, img].view(-1, H, dh)[:, h] @ w).mean(0)  # (d,)
        torch.testing.assert_close(got["image"].bind(model).head_outputs(l, h)[i], write,
                                   atol=2e-5, rtol=1e-4)
        assert got["image"].meta["num_image_tokens"][i] == int(img.sum())
    meta = got["image"].meta
    assert meta["aggregate"] == "image" and meta["prompts"] == PROMPTS and len(meta["images"]) == 3


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "idefics3"])
def test_without_chat_template_and_batch_size_independent(family):
    model, proc = _built(family)
    a = capture_images(model, proc, _images(), PROMPTS, chat_template=False, batch_size=1,
                       progress=False)
    b = capture_images(model, proc, _images(), PROMPTS, chat_template=False, batch_size=3,
                       progress=False)
    assert a.meta["chat_template"] is False
    torch.testing.assert_close(a.z, b.z, atol=2e-5, rtol=1e-4)
    assert a.meta["num_image_tokens"] == b.meta["num_image_tokens"]


def _writes(model, enc, gains=None, positions=None, mode="auto"):
    """o_proj outputs (each layer's heads' write), per layer (B, T, d), with optional edits."""
    ad = get_adapter(model)
    seen = [None] * ad.num_layers

    def make(l):
        def hook(_m, _args, out):
            seen[l] = out.detach().clone()
        return hook
    hs = [p.register_forward_hook(make(l)) for l, p in enumerate(ad.out_projs)]
    try:
        with torch.no_grad():
            if gains is None:
                model(**enc, use_cache=False)
            else:
                with edit_heads(model, gains, positions=positions, mode=mode):
                    model(**enc, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_image_only_edits_leave_text_writes_untouched(family):
    model, proc = _built(family)
    texts, used = vlm.format_vlm_prompts(proc, model, PROMPTS[:2])
    enc = vlm.encode(proc, texts, _images()[:2], used_template=used, padding_side="left")
    img = vlm.image_positions_mask(model, enc["input_ids"], enc["attention_mask"], "image")
    txt = vlm.image_positions_mask(model, enc["input_ids"], enc["attention_mask"], "text")
    gains = {(0, 0): -1.0, (0, 3): 5.0, (1, 2): 0.0}
    base = _writes(model, enc)
    for mode in ("attention", "hook"):  # gains inside the attention call, or on the W_O input
        edited = _writes(model, enc, gains, img, mode)
        # layer 0: the edit's own write; text positions bit-identical, image positions changed
        assert torch.equal(edited[0][~img], base[0][~img])
        assert not torch.allclose(edited[0][img], base[0][img])
        text_edit = _writes(model, enc, gains, txt, mode)
        assert torch.equal(text_edit[0][~txt], base[0][~txt])
        assert not torch.allclose(text_edit[0][txt], base[0][txt])


def test_head_gain_op_with_image_mask_keeps_other_rows():
    """The operator the position edits use: rows outside the image mask are copied exactly."""
    model, proc = _built("llava")
    texts, used = vlm.format_vlm_prompts(proc, model, PROMPTS[:2])
    enc = vlm.encode(proc, texts, _images()[:2], used_template=used)
    img = vlm.image_token_mask(model, enc["input_ids"])                   # (B, T)
    x = torch.randn(*img.shape, 6, 6)                                      # (B, T, H, dh)
    y = ops.head_gain(x, torch.tensor([-1.0, 1, 1, 5, 1, 1]), img).view_as(x)
    assert torch.equal(y[~img], x[~img])
    assert torch.equal(y[img][:, 0], -x[img][:, 0]) and torch.equal(y[img][:, 1], x[img][:, 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_edits_runs(family):
    model, proc = _built(family)
    heads = {(0, 0): -1.0, (0, 1): 5.0, (1, 4): -1.0}
    for positions in POSITIONS:
        out = generate_images(model, proc, _images()[:2], "what is this", configs=[None, heads],
                              positions=positions, max_new_tokens=3, batch_size=4,
                              progress=False)
        assert len(out) == 2 and all(len(o) == 2 and all(isinstance(s, str) for s in o) for o in out)
    # the unedited rows of a mixed batch equal a run without any edit
    plain = generate_images(model, proc, _images()[:2], "what is this", max_new_tokens=3,
                            batch_size=1, progress=False)
    assert plain[0] == out[0]


def test_image_capture_goes_through_the_text_core(monkeypatch):
    """One capture loop: image capture calls hp_fast.capture's core and registers no hooks."""
    import importlib
    import inspect
    core = importlib.import_module("hp_fast.capture")
    images_mod = importlib.import_module("hp_fast.capture_images")
    assert images_mod.capture_batches is core.capture_batches
    calls = []
    real = core.capture_batches
    monkeypatch.setattr(images_mod, "capture_batches",
                        lambda *a, **k: calls.append(k["what"]) or real(*a, **k))
    model, proc = _built("llava")
    capture_images(model, proc, _images()[:2], "what is this", progress=False)
    assert calls == ["images"]
    assert not any(p._forward_pre_hooks for p in get_adapter(model).out_projs)
    for mod in (images_mod, vlm):
        assert "register_forward_pre_hook" not in inspect.getsource(mod)


def test_capture_errors_name_the_problem():
    model, proc = _built("llava")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        capture_images(model, proc, _images()[:2], PROMPTS, progress=False)
    with pytest.raises(ValueError, match="unknown"):
        capture_images(model, proc, _images(), PROMPTS, aggregate="patches", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        capture_images(model, proc, ["/nonexistent/cat.png"], "what", progress=False)
    with pytest.raises(ValueError, match="list of PIL images"):
        capture_images(model, proc, "cat.png", "what", progress=False)
    from helpers.tiny_models import tiny_model
    with pytest.raises(ValueError, match="not a supported vision-language model"):
        capture_images(tiny_model("llama"), proc, _images(), "what", progress=False)
    with pytest.raises(ValueError, match="image_token_id"):
        vlm.image_token_id(tiny_model("llama"))


def test_vlm_activations_save_load_and_rank(tmp_path):
    model, proc = _built("qwen2_vl")
    paths = []
    for i, im in enumerate(_images()):  # images given as paths
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    acts = capture_images(model, proc, [str(p) for p in paths], "what color is this",
                          progress=False)
    assert acts.meta["images"] == [str(p) for p in paths]
    loaded = HeadActivations.load(acts.save(tmp_path / "acts.safetensors"), model=model)
    assert torch.equal(loaded.z, acts.z) and loaded.meta == acts.meta
    ranking = rank_heads(loaded, model, proc.tokenizer, ["red", "green", "blue", "pink"], k=2,
                         progress=False)
    assert len(ranking.top(3)) == 3


# ---- images.py ------------------------------------------------------------------------------

def _png(path, color=(255, 0, 0), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_load_image_folder_classes(tmp_path):
    _png(tmp_path / "dog" / "b.png")
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "cat" / "c.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.labels == ["cat", "cat", "dog"]
    assert ds.names == ["cat/a.png", "cat/c.jpg", "dog/b.png"] and ds.captions is None
    assert ds.load(0).mode == "RGB" and len(ds.subset([2])) == 1


def test_load_image_folder_captions_json_and_csv(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "sub" / "b.png")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": "a red square",
                                                        "sub/b.png": ["red", "a red thing"]}))
    ds = load_image_folder(tmp_path)
    assert ds.captions == [["a red square"], ["red", "a red thing"]] and ds.labels is None
    (tmp_path / "caps.csv").write_text("image,caption\na.png,one\nsub/b.png,two\na.png,three\n")
    ds = load_image_folder(tmp_path / "caps.csv")
    assert ds.names == ["a.png", "sub/b.png"] and ds.captions == [["one", "three"], ["two"]]
    (tmp_path / "list.json").write_text(json.dumps([{"image": "a.png", "caption": "x"}]))
    assert load_image_folder(tmp_path / "list.json").captions == [["x"]]


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="it is empty"):
        load_image_folder(tmp_path / "empty")
    _png(tmp_path / "loose" / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path / "loose")
    _png(tmp_path / "cls" / "cat" / "a.png")
    (tmp_path / "cls" / "dog").mkdir()
    with pytest.raises(ValueError, match="dog hold no images"):
        load_image_folder(tmp_path / "cls")
    _png(tmp_path / "bad" / "cat" / "a.png")
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cat/broken.png"):
        load_image_folder(tmp_path / "bad")
    _png(tmp_path / "caps" / "a.png")
    (tmp_path / "caps" / "captions.json").write_text(json.dumps({"a.png": "x", "gone.png": "y"}))
    with pytest.raises(ValueError, match="gone.png"):
        load_image_folder(tmp_path / "caps")
    (tmp_path / "caps" / "c.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(ValueError, match="'image' and 'caption' columns"):
        load_image_folder(tmp_path / "caps" / "c.csv")


def test_digits_dataset():
    ds = digits_dataset(3, size=40, seed=0)
    assert len(ds) == 30 and ds.classes == list(DIGIT_WORDS)
    assert ds.labels[:3] == ["zero"] * 3 and ds.labels[-1] == "nine"
    assert all(im.size == (40, 40) and im.mode == "RGB" for im in ds.images)
    again = digits_dataset(3, size=40, seed=0)
    assert ds.names == again.names and ds.names != digits_dataset(3, size=40, seed=1).names
    assert digits_dataset(1, labels="digits").labels == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="n_per_class"):
        digits_dataset(10_000)


# ---- eval_vlm.py: every path end to end on a tiny random VLM (numbers are meaningless) ----

def test_classify_end_to_end(tmp_path):
    from hp_fast.evaluation import vlm as eval_vlm
    model, proc = _built("llava")
    ds = digits_dataset(2, size=32)
    logs = []
    rep = eval_vlm.run_classify(model, proc, ds, ks=(2, 4), n_random=3, max_new_tokens=2,
                                out=tmp_path / "cls", log=logs.append)
    assert rep["prompt"].startswith("What digit is depicted in this image? Answer EXACTLY with one "
                                    "of the following class names only: zero, one, two")
    assert rep["n_select"] == rep["n_eval"] == 10 and rep["concept_tokens"] >= 9
    assert [r["k"] for r in rep["results"]] == [2, 4]
    for r in rep["results"]:
        assert len(r["heads"]) == r["k"] and len(r["random_sets"]) == 3
        assert not set(map(tuple, r["heads"])) & {tuple(h) for s in r["random_sets"] for h in s}
        assert len(r["random"]["accuracy"]) == 3
    assert json.loads((tmp_path / "cls" / "results.json").read_text())["task"] == "classify"
    assert any("k= 4" in line for line in logs)


def test_classify_many_reports_jaccard():
    from hp_fast.evaluation import vlm as eval_vlm
    model, proc = _built("qwen2_vl")
    a, b = digits_dataset(2, size=32, seed=0), digits_dataset(2, size=32, seed=1)
    rep = eval_vlm.classify_many(model, proc, {"a": (a, "digit"), "b": (b, "number")}, ks=(3,),
                                 n_random=2, max_new_tokens=2, log=lambda s: None,
                                 positions="image")
    assert set(rep["datasets"]) == {"a", "b"} and 0.0 <= rep["jaccard"][3]["a|b"] <= 1.0
    assert eval_vlm.jaccard([(0, 1), (1, 2)], [(1, 2)]) == 0.5


def test_caption_end_to_end(tmp_path):
    from hp_fast.evaluation import vlm as eval_vlm
    from hp_fast.data.images import ImageDataset
    model, proc = _built("gemma3")
    digits = digits_dataset(1, size=32)
    ds = ImageDataset(digits.images, captions=[[f"a white {w} on black", f"the number {w}"]
                                               for w in digits.labels])
    rep = eval_vlm.run_caption(model, proc, ds, concepts=("colors", "numbers"), ks=(2,),
                               n_random=2, max_new_tokens=4, alpha=5.0, out=tmp_path,
                               log=lambda s: None)
    assert set(rep["concepts"]) == {"colors", "numbers"} and rep["n_eval"] == 5
    row = rep["concepts"]["colors"]["results"][0]
    assert set(row["somp"]) == {"keywords", "cider"} and len(row["random"]["cider"]) == 3
    with pytest.raises(ValueError, match="reference captions"):
        eval_vlm.run_caption(model, proc, digits)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_load_vlm_from_folder(tmp_path, family):
    model, proc = _built(family)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, lproc = vlm.load_vlm(str(tmp_path))
    assert type(loaded) is type(model) and not loaded.training
    a = capture_images(model, proc, _images()[:2], "what is this", progress=False)
    b = capture_images(loaded, lproc, _images()[:2], "what is this", progress=False)
    torch.testing.assert_close(a.z, b.z)
    with pytest.raises(ValueError, match="could not load VLM"):
        vlm.load_vlm(str(tmp_path / "nothing"))
