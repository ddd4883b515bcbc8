"""The ``hp-fast`` command line: capture | rank | describe | generate | demo | info."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def read_prompts(path) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl (strings or {"prompt"|"text": ...}) file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if path.suffix == ".jsonl":
        out = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i} is not valid JSON ({err.msg})") from None
            text = obj if isinstance(obj, str) else (obj.get("prompt") or obj.get("text")
                                                     if isinstance(obj, dict) else None)
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i} needs a string or an object with a 'prompt' or 'text' field")
            out.append(text)
        lines = out
    if not lines:
        raise ValueError(f"prompt file {path} is empty: put one prompt per line")
    return lines


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


def _concept(args):
    if args.concept_file:
        return args.concept_file
    if args.concept:
        return args.concept
    raise ValueError("give --concept NAME (colors, countries, sentiments, numbers, toxic) or --concept-file FILE")


def _acts(args, model, tok):
    from .capture import HeadActivations, capture
    if getattr(args, "acts", None):
        return HeadActivations.load(args.acts, model=model)
    if not getattr(args, "prompts", None):
        raise ValueError("give --acts FILE (from `hp-fast capture`) or --prompts FILE")
    return capture(model, tok, read_prompts(args.prompts), aggregate=args.aggregate,
                   batch_size=args.batch_size, chat_template=not args.no_chat_template)


def _write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")


def _rank(args, model, tok, acts):
    from .ranking import rank_heads
    return rank_heads(acts, model, tok, _concept(args), k=args.k, criterion=args.criterion,
                      method=args.method, layers=parse_layers(args.layers), center=args.center,
                      baseline=args.baseline)


def cmd_capture(args, model, tok):
    acts = _acts(args, model, tok)
    print(f"captured {tuple(acts.z.shape)} -> {acts.save(args.out)}")


def cmd_rank(args, model, tok):
    from .concepts import concept_tokens
    print(concept_tokens(tok, _concept(args)).summary())
    ranking = _rank(args, model, tok, _acts(args, model, tok))
    if ranking.k < ranking.k_requested:
        print(f"k capped at the concept dictionary size: {ranking.k} (asked {ranking.k_requested})")
    print(f"top {args.top} heads for {ranking.concept!r} ({ranking.method}, score = "
          f"{'EVR - random-token EVR' if ranking.options.get('baseline') == 'random' else 'raw'}):")
    for layer, head in ranking.top(args.top):
        raw = "" if ranking.raw_evr is None else f"  raw EVR {ranking.raw_evr[layer, head]:.3f}"
        print(f"  L{layer:>2} H{head:>2}  score {ranking.scores[layer, head]:+.4f}{raw}")
    if args.json:
        ranking.save(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import heatmap
        print("wrote", heatmap(ranking.scores, args.plot, marked=ranking.top(args.top),
                               title=f"{ranking.concept}: {ranking.method} scores"))


def cmd_describe(args, model, tok):
    from .ranking import describe_heads, logit_lens_tokens
    acts = _acts(args, model, tok)
    heads = parse_heads(args.heads) if args.heads else _rank(args, model, tok, acts).top(args.top)
    desc = describe_heads(acts, model, tok, heads, k=args.k_tokens, center=args.center)
    lens = logit_lens_tokens(acts, model, tok, heads, k=args.k_tokens)
    for hd in heads:
        print(f"L{hd[0]:>2} H{hd[1]:>2}  SOMP: {desc[hd]}   logit lens: {lens[hd]}")
    if args.json:
        _write_json(args.json, [{"layer": l, "head": h, "somp": desc[(l, h)], "logit_lens": lens[(l, h)]}
                                for l, h in heads])


def cmd_generate(args, model, tok):
    from .edits import edit_heads, uniform_gains
    from .generation import generate_answers
    prompts = [args.prompt] if args.prompt else read_prompts(args.prompts) if args.prompts else None
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts FILE")
    heads = parse_heads(args.heads) if args.heads else []
    if not heads and (args.concept or args.concept_file):
        heads = _rank(args, model, tok, _acts(args, model, tok)).top(args.top)
    base = generate_answers(model, tok, prompts, max_new_tokens=args.max_new_tokens)
    with edit_heads(model, uniform_gains(heads, args.alpha), positions=args.positions):
        edited = generate_answers(model, tok, prompts, max_new_tokens=args.max_new_tokens)
    print(f"heads edited with gain {args.alpha}: {heads}")
    for p, b, e in zip(prompts, base, edited):
        print(f"> {p}\n  unedited: {b}\n  edited:   {e}")
    if args.json:
        _write_json(args.json, {"heads": heads, "alpha": args.alpha,
                                "results": [{"prompt": p, "unedited": b, "edited": e}
                                            for p, b, e in zip(prompts, base, edited)]})


def cmd_demo(args, model, tok):
    from .demo import run_demo
    from .evaluation import set_threads
    print(f"machine: {set_threads('auto')}")  # one thread when the cores are busy (up to 20x faster)
    run_demo(model, tok, out=args.out, quick=args.quick, n_random=args.random_sets)


VLM_TASKS = ("classify", "caption")


def cmd_eval_vlm(args, model, processor):
    """classify / caption on a VLM: an image folder, or scikit-learn digits for classify."""
    from . import eval_vlm
    from .images import digits_dataset, load_image_folder
    if args.images:
        data = load_image_folder(args.images)
    elif args.task == "classify":
        data = digits_dataset(args.digits)
    else:
        raise ValueError("caption needs --images DIR (images plus a captions.json or captions.csv)")
    common = dict(alpha=args.alpha, n_random=args.random_sets, positions=args.positions,
                  out=args.out, ks=[int(k) for k in args.ks.split(",")] if args.ks else None)
    common = {k: v for k, v in common.items() if v is not None}
    if args.task == "classify":
        eval_vlm.run_classify(model, processor, data, object_name=args.object_name, **common)
    else:
        eval_vlm.run_caption(model, processor, data, **common)
    print(f"wrote {args.out}")


def cmd_eval(args, model, tok):
    if args.task in VLM_TASKS:
        return cmd_eval_vlm(args, model, tok)
    from .evaluation import Setting, run_eval, set_threads
    print(f"machine: {set_threads(args.threads)}")
    setting = (Setting(args.aggregate or "mean", args.baseline or "random", args.criterion or "l1")
               if (args.aggregate or args.baseline or args.criterion) else None)
    run_eval(args.task, model, tok, args.out, ks=[int(k) for k in args.ks.split(",")] if args.ks else None,
             n_random=args.random_sets, quick=args.quick, setting=setting, n_test=args.n_test,
             concepts=args.concepts.split(",") if args.concepts else None,
             alphas=[float(a) for a in args.alphas.split(",")] if args.alphas else None)


def cmd_info(args, model, tok):
    from .backend import backend_info
    print(json.dumps(backend_info(), indent=1))


def _common(p, *, acts=True, concept=True):
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), a folder, a .gguf file")
    if acts:
        p.add_argument("--prompts", help="prompt file: .txt one per line, or .jsonl")
        p.add_argument("--acts", help="activations saved by `hp-fast capture`")
        p.add_argument("--aggregate", default="mean", choices=["mean", "last"])
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--no-chat-template", action="store_true")
    if concept:
        p.add_argument("--concept", help="built-in concept: colors, countries, sentiments, numbers, toxic")
        p.add_argument("--concept-file", help="word-list file (one word per line, or a JSON list)")
        p.add_argument("--k", type=int, default=50, help="SOMP steps (capped at the concept size)")
        p.add_argument("--criterion", default="l1", choices=["l1", "l2", "ormp"])
        p.add_argument("--method", default="somp", choices=["somp", "logit_lens"])
        p.add_argument("--baseline", default="random", choices=["random", "none"])
        p.add_argument("--layers", help="only these layers, e.g. 2-29")
        p.add_argument("--center", action="store_true", help="subtract the sample mean first")
        p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", help="write results as JSON here")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hp-fast", description="Fast Head Pursuit: find, describe "
                                 "and edit the attention heads that specialize in a concept.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("capture", help="capture per-head outputs over prompts")
    _common(p, concept=False)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p = sub.add_parser("rank", help="rank heads for a concept")
    _common(p)
    p.add_argument("--plot", help="layers x heads heatmap PNG")
    p = sub.add_parser("describe", help="top tokens each head writes (SOMP vs logit lens)")
    _common(p)
    p.add_argument("--heads", help="LAYER.HEAD list, e.g. 12.3,4.5 (default: --top of a --concept ranking)")
    p.add_argument("--k-tokens", type=int, default=5)
    p = sub.add_parser("generate", help="generate with heads scaled by --alpha")
    _common(p)
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--heads", help="LAYER.HEAD list to edit (or rank them with --concept)")
    p.add_argument("--alpha", type=float, default=-1.0, help="gain: -1 suppresses, 5 enhances")
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"],
                   help="edit every position, only the prompt, or only generated tokens")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p = sub.add_parser("demo", help="the end-to-end country QA demo on the embedded model")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="hp_fast_out/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer questions and heads (smoke run)")
    p.add_argument("--random-sets", type=int, default=None, help="random control sets per k")
    p = sub.add_parser("eval", help="the paper's experiments with controls: qa | keywords | toxicity")
    p.add_argument("task", choices=["qa", "keywords", "toxicity", *VLM_TASKS],
                   help="classify/caption need a VLM (--model FOLDER)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", required=True, help="folder for results.json, PNGs and report.md")
    p.add_argument("--ks", help="numbers of heads to edit, e.g. 3,8,16 (quick: 3,8)")
    p.add_argument("--random-sets", type=int, default=10, help="random control sets per k")
    p.add_argument("--quick", action="store_true", help="small prompt sets (smoke run)")
    p.add_argument("--n-test", type=int, help="test questions per kind (qa) / test prompts")
    p.add_argument("--concepts", help="keywords: subset of colors,sentiments,numbers")
    p.add_argument("--aggregate", choices=["mean", "last"], help="fix the selection setting (qa: no search)")
    p.add_argument("--baseline", choices=["random", "none"])
    p.add_argument("--criterion", choices=["l1", "l2", "ormp"])
    p.add_argument("--alphas", help="qa: gains of the sweep, e.g. --alphas=-1,0 (default -1)")
    p.add_argument("--threads", default="auto", help="torch CPU threads (auto: 1 when the machine is loaded)")
    p.add_argument("--images", help="classify/caption: image folder (class subfolders, or captions file)")
    p.add_argument("--digits", type=int, default=20, help="classify without --images: digits per class")
    p.add_argument("--object-name", default="digit", help="classify: what the images show")
    p.add_argument("--alpha", type=float, default=None, help="classify/caption: head gain (default -1)")
    p.add_argument("--positions", default=None, choices=["all", "image", "text", "prompt", "generated"],
                   help="classify/caption: where the edit applies (default all)")
    p = sub.add_parser("info", help="which backends are active")
    p.add_argument("--model", default=None)
    return ap


COMMANDS = {"capture": cmd_capture, "rank": cmd_rank, "describe": cmd_describe,
            "generate": cmd_generate, "demo": cmd_demo, "eval": cmd_eval, "info": cmd_info}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = tok = None
        if args.command == "eval" and args.task in VLM_TASKS:
            from .vlm import load_vlm
            if args.model == "smollm2":
                raise ValueError(f"eval {args.task} needs a vision-language model: --model FOLDER "
                                 "(e.g. a local copy of llava-hf/llava-v1.6-mistral-7b-hf)")
            model, tok = load_vlm(args.model)
        elif args.command != "info":
            from .models import load_model
            model, tok = load_model(args.model)
        COMMANDS[args.command](args, model, tok)
    except ValueError as err:
        print(f"hp-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
