"""The head atlas page in a real browser (Debian's chromium driven by playwright).

The atlas is built from a tiny random Llama with the byte-level BPE test tokenizer (tokens
with ``Ġ`` markers) and random head outputs: fast, no real model. Without playwright or a
chromium binary every test here is skipped, with the reason.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf

import hp_fast
from hp_fast.atlas import build_atlas, write_atlas
from helpers.tokenizers_fixtures import bytelevel_bpe

HOSTILE_TITLE = "tiny atlas </script><script>window.pwned = 1</script>"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory):
    tok = bytelevel_bpe()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=40, intermediate_size=48,
                         num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=5,
                         max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval().requires_grad_(False)
    ad = hp_fast.get_adapter(model)
    z = torch.randn(12, ad.num_layers, ad.num_heads, ad.head_dim)  # (n, L, H, dh)
    acts = hp_fast.HeadActivations(z, {"aggregate": "mean"}).bind(model)
    data = build_atlas(model, tok, acts, k_tokens=8, lens_k=5, progress=False, title=HOSTILE_TITLE)
    out = tmp_path_factory.mktemp("atlas")
    write_atlas(data, out)
    return out


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        except Error as err:
            pytest.skip(f"chromium at {exe} does not start under playwright: {err}")
        yield b
        b.close()


@pytest.fixture
def page(browser, atlas_dir):
    """The atlas page, with its script errors and every request it makes recorded."""
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    pg.errors, pg.requests = [], []
    pg.on("pageerror", lambda e: pg.errors.append(f"pageerror: {e}"))
    pg.on("console", lambda m: pg.errors.append(f"console: {m.text}") if m.type == "error" else None)

    def route(r):
        pg.requests.append(r.request.url)
        if r.request.url.startswith(("file:", "data:")):
            r.continue_()
        else:
            r.abort()
    pg.route("**/*", route)
    pg.goto((atlas_dir / "index.html").as_uri())
    yield pg
    pg.close()


def _data(atlas_dir):
    return json.loads((atlas_dir / "atlas.json").read_text(encoding="utf-8"))


def _fills(pg):
    return pg.eval_on_selector_all("rect.cell", "cs => cs.map(c => c.getAttribute('fill'))")


def test_page_loads_without_errors_or_network(page, atlas_dir):
    data = _data(atlas_dir)
    assert page.errors == []
    assert page.title() == HOSTILE_TITLE
    assert page.inner_text("#title") == HOSTILE_TITLE  # shown as text, never run
    assert page.evaluate("window.pwned") is None
    assert page.locator("rect.cell").count() == data["num_layers"] * data["num_heads"]
    assert page.locator("#legend-svg rect").count() > 10
    bad = [u for u in page.requests if not u.startswith(("file:", "data:"))]
    assert bad == [], f"the page asked the network for {bad}"


def test_click_on_a_cell_shows_that_heads_tokens(page, atlas_dir):
    data = _data(atlas_dir)
    for layer, head in [(2, 3), (0, 0), (3, 4)]:
        entry = data["heads"][layer * data["num_heads"] + head]
        page.click(f'rect.cell[data-layer="{layer}"][data-head="{head}"]')
        assert page.inner_text("#panel-title") == f"Layer {layer} · Head {head}"
        assert page.eval_on_selector_all("#panel-tokens .text", "e => e.map(x => x.textContent)") \
            == entry["tokens"]
        assert page.eval_on_selector_all("#panel-lens .text", "e => e.map(x => x.textContent)") \
            == entry["logit_lens"]
        assert page.locator("#evr-plot circle").count() == len(entry["evr"])
        assert page.locator("#concept-bars text").count() == 2 * len(data["concepts"])
    assert page.errors == []


def test_search_finds_the_heads_that_write_a_token(page, atlas_dir):
    data = _data(atlas_dir)
    key = data["heads"][7]["tokens_keys"][0]
    want = {i for i, h in enumerate(data["heads"]) if key in h["tokens_keys"]}
    for query in (key, f"  {key.upper()} ", f"Ġ{key}"):  # case, spaces and markers ignored
        page.fill("#search", query)
        got = page.eval_on_selector_all("#search-results li", "e => e.map(x => +x.dataset.index)")
        assert set(got) == want and 7 in got
        assert set(page.eval_on_selector_all("rect.cell.match", "e => e.map(x => +x.dataset.index)")) == want
    page.click("#search-results li >> nth=0")
    assert page.locator("#panel-tokens .tok.hit").count() >= 1
    page.fill("#search", "")
    assert page.locator("rect.cell.match").count() == 0 and page.locator("rect.cell.dim").count() == 0
    assert page.errors == []


def test_search_strips_byte_level_markers(page, atlas_dir):
    data = _data(atlas_dir)
    spaced = next((h["tokens_raw"][j] for h in data["heads"] for j, r in enumerate(h["tokens"])
                   if r.startswith("␣") and len(r) > 1), None)
    if spaced is None:
        pytest.fail("the fixture atlas has no token with a leading space; change the seed")
    word = spaced.lstrip("Ġ").lower()
    page.fill("#search", word)
    assert page.locator("#search-results li").count() >= 1


def test_concept_chooser_changes_the_colouring(page, atlas_dir):
    data = _data(atlas_dir)
    assert data["concepts"], "the fixture should score at least one concept"
    before = _fills(page)
    legend = page.text_content("#legend-svg")
    page.select_option("#colour-by", data["concepts"][0])
    after = _fills(page)
    assert after != before and len(set(after)) > 1
    assert page.text_content("#legend-svg") != legend
    assert data["concepts"][0] in page.text_content("#top-title")
    assert page.errors == []
