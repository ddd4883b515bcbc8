"""The head atlas: every head described by its tokens and scored for every concept.

``atlas(model, tokenizer, acts_or_prompts, out_dir)`` writes two files:

* ``out_dir/atlas.json``: the data. ``heads`` holds one entry per head, layer-major, with
  ``layer``, ``head``, ``token_ids`` (full-vocabulary SOMP support, selection order),
  ``tokens`` (readable forms, ``hp_fast.token_display``), ``tokens_raw`` (vocabulary
  entries), ``token_keys`` (search forms), ``evr`` (the EVR after each SOMP step),
  ``logit_lens`` / ``logit_lens_ids`` / ``logit_lens_raw`` (aggregated logit lens) and
  ``concepts`` ({name: score}, ``None`` where not scored). Top level: ``model``,
  ``num_layers``, ``num_heads``, ``concepts`` (names), ``concept_info``, ``settings``.
* ``out_dir/index.html``: one self-contained page to explore it offline
  (``hp_fast.atlas_page``).

The tokens are those of ``describe_heads`` (same inputs, all heads in one batched SOMP:
``ranking.vocabulary_pursuit``); concept scores are those of ``rank_heads``.
"""
from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from .capture import HeadActivations, capture, model_fingerprint
from .concepts import builtin_concepts, concept_name, concept_tokens
from .models.adapters import get_adapter
from .ranking import logit_lens_ids, rank_heads, vocabulary_pursuit
from .token_display import raw_token, readable_token, search_key

FORMAT = "hp_fast.atlas/1"
DEFAULT_K_TOKENS = 20
DEFAULT_LENS_K = 10


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return value


def _check_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file; give a folder for atlas.json and index.html")
    return out


def resolve_concepts(tokenizer, concepts: Iterable | None, concept_files: Sequence = ()):
    """[(name, concept, ConceptTokens)] to score, and {name: reason} for built-ins skipped.

    concepts: built-in names or word lists (default: every built-in); a built-in with no
    single-token word in this tokenizer is skipped, anything else that gives no token (an
    unknown name, an empty list) raises. concept_files: word-list files; one that cannot be
    read or has no usable word raises ``ValueError`` (called before any heavy work).
    """
    chosen = builtin_concepts() if concepts is None else list(concepts)
    out, skipped, names = [], {}, set()
    for concept, is_file in [(c, False) for c in chosen] + [(f, True) for f in concept_files]:
        name = concept_name(concept)
        while name in names:
            name += "'"
        try:
            tokens = concept_tokens(tokenizer, concept)
        except ValueError as err:
            if is_file:
                raise ValueError(f"concept file {concept}: {err}") from err
            if not (isinstance(concept, str) and concept in builtin_concepts()):
                raise
            skipped[name] = str(err)
            continue
        names.add(name)
        out.append((name, concept, tokens))
    return out, skipped


def _activations(model, tokenizer, acts_or_prompts, batch_size: int) -> HeadActivations:
    if isinstance(acts_or_prompts, HeadActivations):
        return acts_or_prompts if acts_or_prompts.adapter else acts_or_prompts.bind(model)
    if isinstance(acts_or_prompts, (str, os.PathLike)):
        raise ValueError("acts_or_prompts must be HeadActivations or a list of prompt strings; "
                         "read a prompt file with hp_fast.cli.read_prompts(path) first")
    prompts = list(acts_or_prompts)
    return capture(model, tokenizer, prompts, batch_size=batch_size)


def _finite(x: float):
    return None if math.isnan(x) else round(float(x), 6)


def _token_fields(tokenizer, ids: list[int], prefix: str) -> dict:
    readable = [readable_token(tokenizer, t) for t in ids]
    return {prefix: readable, f"{prefix}_raw": [raw_token(tokenizer, t) for t in ids],
            f"{prefix}_keys": [search_key(r) for r in readable]}


def head_entries(tokenizer, L: int, H: int, somp, lens: dict, scores: dict) -> list[dict]:
    """One dict per head (layer-major) from the SOMP result, lens ids and concept scores."""
    heads = []
    for i in range(L * H):
        l, h = divmod(i, H)
        keep = somp.support[i] >= 0
        ids = [int(t) for t in somp.support[i][keep]]
        entry = {"layer": l, "head": h, "token_ids": ids,
                 **_token_fields(tokenizer, ids, "tokens"),
                 "evr": [round(float(e), 6) for e in somp.evr[i][keep]]}
        entry["logit_lens_ids"] = lens[(l, h)]
        entry.update(_token_fields(tokenizer, lens[(l, h)], "logit_lens"))
        entry["concepts"] = {name: _finite(float(s[l, h])) for name, s in scores.items()}
        heads.append(entry)
    return heads


def model_info(model, tokenizer) -> dict:
    """Name, architecture and sizes of the model (the top of atlas.json)."""
    ad = get_adapter(model)
    info = model_fingerprint(model)
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "_name_or_path", "") or ad.model_type)
    info["name"] = Path(name).name if os.path.isabs(name) else name  # a cache folder: its name
    info["tokenizer"] = type(tokenizer).__name__
    return info


def build_atlas(model, tokenizer, acts_or_prompts, *, concepts: Iterable | None = None,
                concept_files: Sequence = (), k_tokens: int = DEFAULT_K_TOKENS,
                lens_k: int = DEFAULT_LENS_K, concept_k: int = 50, criterion: str = "l1",
                baseline: str = "random", n_random: int = 3, backend: str = "auto",
                batch_size: int = 16, progress: bool = True, title: str | None = None) -> dict:
    """The atlas data (see the module docstring); writes nothing."""
    k_tokens, lens_k = _check_int("k_tokens", k_tokens), _check_int("lens_k", lens_k)
    concept_k, n_random = _check_int("concept_k", concept_k), _check_int("n_random", n_random)
    ad = get_adapter(model)
    L, H = ad.num_layers, ad.num_heads
    chosen, skipped = resolve_concepts(tokenizer, concepts, concept_files)
    t0 = time.perf_counter()
    acts = _activations(model, tokenizer, acts_or_prompts, batch_size)
    t_capture = time.perf_counter() - t0
    if progress:
        print(f"atlas: full-vocabulary SOMP, {L * H} heads, k={k_tokens}")
    somp = vocabulary_pursuit(acts, model, k_tokens, criterion=criterion, backend=backend,
                              progress=progress)
    t_somp = time.perf_counter() - t0 - t_capture
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    lens = logit_lens_ids(acts, model, all_heads, lens_k)
    t_lens = time.perf_counter() - t0 - t_capture - t_somp
    scores, info = {}, {}
    for name, concept, tokens in tqdm(chosen, desc="concepts", disable=not progress):
        r = rank_heads(acts, model, tokenizer, concept, k=concept_k, criterion=criterion,
                       baseline=baseline, n_random=n_random, backend=backend, progress=False)
        scores[name] = r.scores
        info[name] = {"num_tokens": r.num_tokens, "k": r.k, "num_words": len(tokens.words),
                      "source": concept if isinstance(concept, str) else str(concept),
                      "score": "EVR - random-token EVR" if baseline == "random" else "EVR"}
    t_total = time.perf_counter() - t0
    return {
        "format": FORMAT, "title": title or f"Head atlas: {model_info(model, tokenizer)['name']}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info(model, tokenizer), "num_layers": L, "num_heads": H,
        "concepts": list(scores), "concept_info": info, "skipped_concepts": skipped,
        "settings": {"k_tokens": k_tokens, "lens_k": lens_k, "concept_k": concept_k,
                     "criterion": criterion, "normalize": True, "baseline": baseline,
                     "n_random": n_random, "backend": somp.backend,
                     "num_samples": acts.num_samples, "aggregate": acts.meta.get("aggregate"),
                     "prompt_hash": acts.meta.get("prompt_hash")},
        "timings_s": {"capture": round(t_capture, 2), "somp": round(t_somp, 2),
                      "logit_lens": round(t_lens, 2), "total": round(t_total, 2)},
        "heads": head_entries(tokenizer, L, H, somp, lens, scores),
    }


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_atlas(data: dict, out_dir) -> tuple[Path, Path]:
    """Write ``out_dir/atlas.json`` and ``out_dir/index.html`` (atomic); returns both paths."""
    from .atlas_page import render_page
    out = _check_out_dir(out_dir)
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    json_path = write_text_atomic(out / "atlas.json", text)
    html_path = write_text_atomic(out / "index.html", render_page(data))
    return json_path, html_path


def load_atlas(path) -> dict:
    """Read an atlas.json (or the folder holding one) written by ``write_atlas``."""
    path = Path(path)
    path = path / "atlas.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable atlas.json ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by hp_fast.atlas (format {FORMAT!r} expected)")
    return data


def atlas(model, tokenizer, acts_or_prompts, out_dir, **options) -> dict:
    """Build the head atlas and write ``out_dir/atlas.json`` and ``out_dir/index.html``.

    acts_or_prompts: ``HeadActivations`` (from ``hp_fast.capture``) or a list of prompts.
    options: those of ``build_atlas`` (concepts, concept_files, k_tokens=20, lens_k=10,
    concept_k=50, criterion="l1", baseline="random", n_random=3, backend, batch_size,
    progress, title). Returns the atlas data.
    """
    _check_out_dir(out_dir)
    data = build_atlas(model, tokenizer, acts_or_prompts, **options)
    json_path, html_path = write_atlas(data, out_dir)
    if options.get("progress", True):
        print(f"wrote {json_path} and {html_path}")
    return data
