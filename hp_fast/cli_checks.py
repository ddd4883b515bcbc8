"""Command-line argument parsing and the checks ``hp-fast`` runs before heavy work.

``precheck(args)`` needs no model and runs before it loads (counts, ``--layers`` / ``--heads``
syntax, the concept word list, the prompt and question files, read once and kept on ``args``);
``check_with_model(args, model, tok)`` runs right after the load and before any capture (layers
and heads exist, the concept has tokens in this vocabulary).
"""
from __future__ import annotations

from pathlib import Path

from .data.prompts import read_prompts


def parse_heads(text: str) -> list[tuple[int, int]]:
    """'12.3,4.5' or '12:3 4:5' -> [(12, 3), (4, 5)]."""
    out = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        parts = item.replace(":", ".").split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"head {item!r} is not LAYER.HEAD (e.g. --heads 12.3,4.5)")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise ValueError("--heads is empty; give LAYER.HEAD pairs like 12.3,4.5")
    return out


def parse_layers(text: str | None):
    """'2-29' or '2,3,10-12' -> list of ints; None -> None."""
    if not text:
        return None
    out: list[int] = []
    for item in text.split(","):
        a, _, b = item.partition("-")
        if not a.strip().isdigit() or (b and not b.strip().isdigit()):
            raise ValueError(f"--layers {text!r}: use forms like 2-29 or 0,3,5-7")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def concept_arg(args):
    """The --concept-file or --concept of ``args`` (a ValueError when neither is given)."""
    if args.concept_file:
        return args.concept_file
    if args.concept:
        return args.concept
    raise ValueError("give --concept NAME (colors, countries, sentiments, numbers, toxic) or --concept-file FILE")


def prompts_arg(args) -> list[str]:
    """--prompts as read by ``precheck`` (read here when a caller skipped it)."""
    if getattr(args, "prompt_list", None) is None:
        args.prompt_list = read_prompts(args.prompts, field=getattr(args, "prompt_field", None))
    return args.prompt_list


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def precheck(args) -> None:
    """Checks that need no model, before it loads: counts, --layers / --heads syntax, the concept,
    and the prompt / question files (read once, kept on ``args``)."""
    if args.command not in ("capture", "rank", "describe", "generate", "eval"):
        return
    _positive(args, "k", "top", "k_tokens", "batch_size", "max_new_tokens", "shard_size")
    parse_layers(getattr(args, "layers", None))
    heads = parse_heads(args.heads) if getattr(args, "heads", None) else None
    ranks = args.command == "rank" or (args.command == "describe" and not heads) or (
        args.command == "generate" and not heads and (args.concept or args.concept_file))
    if ranks:
        from .concepts import load_words
        load_words(concept_arg(args))
    if (ranks or args.command == "capture") and not (args.acts or args.prompts):
        raise ValueError("give --acts FILE (from `hp-fast capture`) or --prompts FILE")
    if getattr(args, "acts", None) and not (Path(args.acts).is_file() or
                                            (Path(args.acts) / "manifest.json").is_file()):
        raise ValueError(f"--acts {args.acts} is neither a .safetensors file nor a capture folder "
                         "with a manifest.json; write it with `hp-fast capture`")
    if args.command == "capture" and not args.acts and not str(args.out).endswith(".safetensors"):
        from .store import check_out_dir
        check_out_dir(args.out)  # a foreign non-empty folder fails before the model loads
    if getattr(args, "prompts", None):
        prompts_arg(args)
    if args.command == "eval" and args.out is None and args.task != "specificity":
        raise ValueError(f"eval {args.task} needs --out DIR (where results.json, PNGs and report.md go)")
    if getattr(args, "questions", None):
        if args.task != "qa":
            raise ValueError(f"--questions is for `hp-fast eval qa`, not eval {args.task}")
        from .data.questions import load_questions
        args.question_list = load_questions(args.questions)


def check_with_model(args, model, tok) -> None:
    """Checks against the loaded model, before any capture: layers, heads, concept tokens."""
    if args.command not in ("rank", "describe", "generate"):
        return
    from .models.adapters import get_adapter
    ad = get_adapter(model)
    L, H = ad.num_layers, ad.num_heads
    bad = [l for l in parse_layers(args.layers) or [] if l >= L]
    if bad:
        shown = f"{bad[:6]}"[:-1] + (", ...]" if len(bad) > 6 else "]")
        raise ValueError(f"--layers {args.layers}: layer(s) {shown} do not exist; the model has {L} "
                         f"layers, 0 to {L - 1}")
    heads = parse_heads(args.heads) if getattr(args, "heads", None) else []
    bad = [f"{l}.{h}" for l, h in heads if l >= L or h >= H]
    if bad:
        raise ValueError(f"--heads: {', '.join(bad)} do not exist; the model has {L} layers x {H} "
                         f"heads (LAYER.HEAD, 0-based)")
    if args.concept or args.concept_file:
        from .concepts import concept_tokens
        concept_tokens(tok, concept_arg(args))  # a concept with no single-token word fails here
