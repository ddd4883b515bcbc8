"""Export an edit for any inference engine: the heads' gains folded into W_O, written to disk.

``export_edited(model, tokenizer, gains, out_dir)`` writes a standard Hugging Face folder
(safetensors weights, config.json, generation_config.json, tokenizer files) that
``AutoModelForCausalLM.from_pretrained`` and engines reading such folders (vLLM, TGI,
llama.cpp's converter) load like any model: the edit is in the weights, so it costs nothing at
inference. ``format="gguf"`` writes one GGUF file instead (hp_fast/export_gguf.py).

Scaling head h's W_O columns by g is the same map as scaling head h's output before W_O (what
``edit_heads`` does): ``W_O[:, h] (g z_h) = (g W_O[:, h]) z_h``. The edit is folded with
``fold_head_gains`` and undone bit for bit after writing, also when writing fails, so the
caller's model is left unedited. Everything is written into a temporary sibling folder that
is renamed to ``out_dir`` at the end: a failure leaves nothing half-written there.

Each folder gets a model card (README.md) and ``hp_fast_edit.json`` recording the heads and
gains, the ranking that chose them when known, the source model and the hp_fast version.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import torch

from .edits import fold_head_gains, gains_tensor
from .models.adapters import get_adapter
from .ranking import HeadRanking

FORMATS = ("hf", "gguf")
CARD_NAME = "README.md"
RECORD_NAME = "hp_fast_edit.json"


def export_edited(model, tokenizer, gains, out_dir, *, format: str = "hf",
                  overwrite: bool = False, card=None, gguf_dtype: str = "f16",
                  progress: bool = True) -> Path:
    """Write ``model`` with ``gains`` folded into W_O to ``out_dir``; returns what was written.

    gains: {(layer, head): gain} or a (layers, heads) tensor (1 = unedited).
    format: "hf" (returns the folder) or "gguf" (returns the .gguf file inside the folder;
    llama architecture; ``gguf_dtype`` "f16" or "f32").
    overwrite: replace a non-empty ``out_dir`` (refused otherwise).
    card: a HeadRanking (the ranking that chose the heads), or a mapping of extra notes for
    the model card (a "ranking" entry may hold a HeadRanking).
    The model is never left edited; bad input raises ValueError before anything is written.
    """
    from . import __version__
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is unknown; use one of {FORMATS}")
    if tokenizer is None:
        raise ValueError("pass the tokenizer: the exported folder needs its files")
    out = check_out_dir(out_dir, overwrite, model)
    check_editable(model)
    table = gains_table(model, gains)
    plan = None
    if format == "gguf":
        from .export_gguf import check_gguf_export
        plan = check_gguf_export(model, tokenizer, gguf_dtype)
    record = edit_record(model, table, card, format, gguf_dtype, __version__)
    if not table:
        warnings.warn("every gain is 1: the exported model is the unedited one")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        handle = fold_head_gains(model, {(l, h): g for l, h, g in table})
        try:
            check_finite_heads(model, table)
            written = _write(model, tokenizer, tmp, plan, record, progress)
        finally:
            handle.undo()
        write_card(tmp, record)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / written.name if plan is not None else out


def _write(model, tokenizer, folder: Path, plan, record: dict, progress: bool) -> Path:
    if plan is None:
        return write_hf(model, tokenizer, folder)
    from .export_gguf import write_gguf
    extra = {"hp_fast.version": record["hp_fast_version"],
             "hp_fast.edit": json.dumps({"heads": record["heads"], "source": record["source_model"]})}
    return write_gguf(model, plan, folder / f"model-{plan.dtype}.gguf", extra, progress)


def write_hf(model, tokenizer, folder: Path) -> Path:
    """save_pretrained (safetensors) + generation_config.json + tokenizer files into folder."""
    from transformers import GenerationConfig
    with without_gguf_marks(model):
        model.save_pretrained(folder)
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def is_dequantized_gguf(model) -> bool:
    """True for a model transformers loaded from a GGUF file: its weights are plain floats."""
    qcfg = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return str(getattr(qcfg, "quant_method", "")).lower().endswith("gguf")


@contextmanager
def without_gguf_marks(model):
    """Hide the GGUF "quantizer" of a model loaded from a GGUF (its weights were dequantized on
    load) while saving, so config.json describes the float weights written; restored after."""
    if not is_dequantized_gguf(model):
        yield
        return
    cfg, quantizer = model.config, model.hf_quantizer
    qcfg = getattr(cfg, "quantization_config", None)
    model.hf_quantizer = None
    if qcfg is not None:
        del cfg.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if qcfg is not None:
            cfg.quantization_config = qcfg


def check_out_dir(out_dir, overwrite: bool, model=None) -> Path:
    """The output folder, if writing there is allowed (see export_edited)."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} is not empty; pass overwrite=True (--overwrite) "
                         "to replace it, or choose another folder")
    inside = [Path.cwd()]
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if source and Path(source).exists():
        inside.append(Path(source).absolute())
    for p in inside:
        if out.exists() and (p.resolve() == out.resolve() or out.resolve() in p.resolve().parents):
            raise ValueError(f"output folder {out} holds {p} (the model's source or the current "
                             "folder), which replacing it would delete; choose another folder")
    return out


def check_editable(model) -> None:
    """Refuse quantized or offloaded weights: folding edits weights in place."""
    get_adapter(model)
    qcfg = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if qcfg is not None and not is_dequantized_gguf(model):
        raise ValueError(f"the model's weights are quantized ({getattr(qcfg, 'quant_method', qcfg)}"
                         "); load it in float (e.g. dtype=torch.float16) to export an edit")
    if "disk" in set(getattr(model, "hf_device_map", {}).values()):
        raise ValueError("part of the model is offloaded to disk; load it fully to export an edit")
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ValueError(f"weight {name} is offloaded (on the meta device); load the whole "
                             "model on one device (no device_map offloading) to export an edit")
        if not p.dtype.is_floating_point or type(p.data) is not torch.Tensor:
            raise ValueError(f"weight {name} is quantized ({type(p.data).__name__}, {p.dtype}); "
                             "load the model in float to export an edit")


def gains_table(model, gains) -> list[tuple[int, int, float]]:
    """[(layer, head, gain)] of the edited heads (gain != 1), validated against the model."""
    ad = get_adapter(model)
    if isinstance(gains, Mapping):
        for key, value in gains.items():
            try:
                ok = math.isfinite(float(value))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"the gain of head {key} is {value!r}; gains must be finite numbers")
    g = gains_tensor(gains, ad.num_layers, ad.num_heads)
    if g.dim() != 2:
        raise ValueError("per-row gains cannot be exported; give one gain per (layer, head)")
    return [(l, h, float(g[l, h])) for l, h in torch.nonzero(g != 1).tolist()]


def check_finite_heads(model, table) -> None:
    """After folding: a gain too large for the weights' dtype gives inf; refuse it."""
    ad = get_adapter(model)
    for l, h, g in table:
        w = ad.head_w_o(l, h)                                   # (dh, d) view of W_O
        if not torch.isfinite(w).all():
            raise ValueError(f"gain {g:g} on head ({l}, {h}) overflows the model's {w.dtype} "
                             "weights; use a smaller gain (or load the model in float32)")


def source_name(model) -> str:
    from .export_gguf import embedded_source
    gguf = embedded_source(model)
    if gguf is not None:
        return f"smollm2 (embedded SmolLM2-135M-Instruct, {gguf.name})"
    cfg = model.config
    return str(getattr(cfg, "_name_or_path", "") or cfg.model_type)


def load_name(model) -> str:
    """What to pass to ``hp_fast.load_model`` for the source model."""
    from .export_gguf import embedded_source
    from .models.loading import DEFAULT_MODEL
    if embedded_source(model) is not None:
        return DEFAULT_MODEL
    return str(getattr(model.config, "_name_or_path", "") or "PATH/OF/THE/SOURCE")


def ranking_summary(ranking) -> dict:
    if isinstance(ranking, HeadRanking):
        ranking = ranking.to_json()
    keys = ("concept", "method", "k", "k_requested", "num_tokens", "options")
    return {k: ranking[k] for k in keys if k in ranking}


def edit_record(model, table, card, format: str, gguf_dtype: str, version: str) -> dict:
    """The facts the model card and hp_fast_edit.json record."""
    notes = {}
    ranking = None
    if isinstance(card, HeadRanking):
        ranking = ranking_summary(card)
    elif isinstance(card, Mapping):
        notes = dict(card)
        if "ranking" in notes:
            ranking = ranking_summary(notes.pop("ranking"))
    elif card is not None:
        raise ValueError(f"card must be a HeadRanking or a mapping of notes, not {type(card).__name__}")
    record = {"hp_fast_version": version, "source_model": source_name(model),
              "load_as": load_name(model),
              "model_type": model.config.model_type, "format": format,
              "gguf_dtype": gguf_dtype if format == "gguf" else None,
              "heads": [[l, h, g] for l, h, g in table], "ranking": ranking, "notes": notes}
    try:
        json.dumps(record, allow_nan=True)
    except TypeError as err:
        raise ValueError(f"card notes must be JSON values (strings, numbers, lists): {err}") from None
    return record


def card_text(record: dict) -> str:
    """README.md (Hugging Face model card) text for an export record."""
    heads = record["heads"]
    lines = ["---", "library_name: transformers", "tags:", "- hp_fast", "- head-pursuit",
             "- attention-head-edit", "---", "",
             f"# {record['source_model']} with {len(heads)} attention heads rescaled", "",
             f"This is `{record['source_model']}` with the output-projection (W_O) columns of the "
             "heads below multiplied by their gain (a gain of -1 flips the head's write, 0 removes "
             f"it, 5 amplifies it), written by hp_fast {record['hp_fast_version']} "
             "(`hp_fast.export_edited`). It loads like any "
             f"{record['model_type']} model; the edit costs nothing at inference.", "",
             "| layer | head | gain |", "|---:|---:|---:|"]
    lines += [f"| {l} | {h} | {g:g} |" for l, h, g in heads]
    r = record["ranking"]
    if r:
        lines += ["", "## How the heads were chosen", "",
                  f"Head Pursuit ranking for the concept `{r.get('concept')}` (method "
                  f"`{r.get('method')}`, k = {r.get('k')} of {r.get('k_requested')} requested, "
                  f"{r.get('num_tokens')} concept tokens); settings: "
                  f"`{json.dumps(r.get('options', {}))}`."]
    if record["notes"]:
        lines += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in record["notes"].items()]
    gains = "{" + ", ".join(f"({l}, {h}): {g:g}" for l, h, g in heads) + "}"
    if record["format"] == "gguf":
        name = f"model-{record['gguf_dtype']}.gguf"
        use = ["```", f"llama-cli -m {name}        # llama.cpp", "```", "", "```python",
               "from transformers import AutoModelForCausalLM",
               f'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", gguf_file="{name}")',
               "```"]
    else:
        use = ["```python", "from transformers import AutoModelForCausalLM",
               'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")', "```"]
    lines += ["", "## Use", ""] + use
    lines += ["", "## Reproduce the edit on the source model", "", "```python",
              "import hp_fast", f"model, tok = hp_fast.load_model({record['load_as']!r})",
              f"with hp_fast.edit_heads(model, {gains}):", "    ...", "```", "",
              f"The same record, machine-readable: `{RECORD_NAME}`.", ""]
    return "\n".join(lines)


def write_card(folder: Path, record: dict) -> None:
    (folder / CARD_NAME).write_text(card_text(record), encoding="utf-8")
    (folder / RECORD_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished tmp folder to out (an existing out is replaced only at the end)."""
    if not out.exists():
        tmp.rename(out)
        return
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# --- the `hp-fast export` command --------------------------------------------------------------

def read_gains_file(path) -> dict[tuple[int, int], float]:
    """Gains from JSON: {"29.2": -1.0, ...}, [[layer, head, gain], ...], or an hp_fast_edit.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"gains file {path} cannot be read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"gains file {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("heads"), list):
        data = data["heads"]                       # an hp_fast_edit.json
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = [(f"{e[0]}.{e[1]}", e[2]) if isinstance(e, list) and len(e) == 3 else (e, None)
                 for e in data]
    else:
        raise ValueError(f"gains file {path} must hold an object {{\"LAYER.HEAD\": gain}} or a "
                         "list of [layer, head, gain]")
    from .cli import parse_heads
    out = {}
    for key, gain in items:
        try:
            (head,) = parse_heads(str(key))
            if isinstance(gain, bool) or not math.isfinite(float(gain)):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"gains file {path}: entry {key!r}: {gain!r} is not LAYER.HEAD with a "
                             "finite gain (e.g. {\"29.2\": -1.0} or [[29, 2, -1.0]])") from None
        if out.get(head, float(gain)) != float(gain):
            raise ValueError(f"gains file {path}: head {key} is listed twice with different gains")
        out[head] = float(gain)
    if not out:
        raise ValueError(f"gains file {path} lists no heads")
    return out


def cli_gains(args) -> tuple[dict, HeadRanking | None]:
    """(gains, ranking or None) from --heads / --gains / --ranking --top, model-independent."""
    given = [n for n in ("heads", "gains", "ranking") if getattr(args, n)]
    if len(given) != 1:
        raise ValueError("give exactly one of --heads LAYER.HEAD,... (with --alpha), --gains FILE."
                         f"json, or --ranking R.json --top N (got {', '.join(given) or 'none'})")
    if not math.isfinite(args.alpha):
        raise ValueError(f"--alpha must be a finite number, got {args.alpha}")
    if args.gains:
        return read_gains_file(args.gains), None
    if args.heads:
        from .cli import parse_heads
        return {hd: args.alpha for hd in parse_heads(args.heads)}, None
    if not args.top or args.top < 1:
        raise ValueError("--ranking needs --top N (how many of its best heads to edit)")
    ranking = HeadRanking.load(args.ranking)
    return {hd: args.alpha for hd in ranking.top(args.top)}, ranking


def check_cli_args(args) -> None:
    """Cheap checks of `hp-fast export` before the model is loaded."""
    cli_gains(args)
    check_out_dir(args.out, args.overwrite)


def run_cli(args, model, tokenizer) -> Path:
    gains, ranking = cli_gains(args)
    ad = get_adapter(model)
    if ranking is not None and (ranking.num_layers, ranking.num_heads) != (ad.num_layers, ad.num_heads):
        raise ValueError(f"{args.ranking} ranks {ranking.num_layers} x {ranking.num_heads} heads "
                         f"but the model has {ad.num_layers} x {ad.num_heads}; rank this model")
    written = export_edited(model, tokenizer, gains, args.out, format=args.format,
                            overwrite=args.overwrite, card=ranking, gguf_dtype=args.gguf_dtype)
    heads = ", ".join(f"L{l}.H{h} x {g:g}" for (l, h), g in sorted(gains.items()))
    print(f"folded {len(gains)} head gains ({heads}) -> {written}")
    return written
