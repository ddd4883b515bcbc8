"""The ``hp-fast`` command line: capture | rank | describe | generate | demo | eval | plan | info."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_checks import (check_with_model, concept_arg, parse_heads, parse_layers, precheck,
                         prompts_arg)
from .data.prompts import read_prompts  # re-exported: hp_fast.cli.read_prompts
from .cli_placement import add_placement_args, load_kwargs


def _acts(args, model, tok):
    from .capture import HeadActivations, capture
    if getattr(args, "acts", None):
        return HeadActivations.load(args.acts, model=model)
    if not getattr(args, "prompts", None):
        raise ValueError("give --acts FILE (from `hp-fast capture`) or --prompts FILE")
    return capture(model, tok, prompts_arg(args), aggregate=args.aggregate,
                   batch_size=args.batch_size, chat_template=not args.no_chat_template)


def _write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # atomic: a crash never leaves half a file
    print(f"wrote {path}")


def _rank(args, model, tok, acts):
    from .ranking import rank_heads
    return rank_heads(acts, model, tok, concept_arg(args), k=args.k, criterion=args.criterion,
                      method=args.method, layers=parse_layers(args.layers), center=args.center,
                      baseline=args.baseline)


def cmd_capture(args, model, tok):
    from .capture import capture, is_store_path
    if args.acts or not is_store_path(args.out):
        acts = _acts(args, model, tok)
        print(f"captured {tuple(acts.z.shape)} -> {acts.save(args.out)}")
        return
    acts = capture(model, tok, prompts_arg(args), aggregate=args.aggregate, batch_size=args.batch_size,
                   chat_template=not args.no_chat_template, out=args.out,
                   shard_size=args.shard_size, overwrite=args.overwrite)
    print(f"captured {tuple(acts.z.shape)} -> {args.out} ({acts.z.store.num_shards} shards)")


def cmd_rank(args, model, tok):
    from .concepts import concept_tokens
    print(concept_tokens(tok, concept_arg(args)).summary())
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
        from .evaluation.plots import heatmap
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
    from .generation.loop import generate_answers
    prompts = [args.prompt] if args.prompt else prompts_arg(args) if args.prompts else None
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
    from .evaluation.demo import run_demo
    from .evaluation import set_threads
    print(f"machine: {set_threads('auto')}")  # one thread when the cores are busy (up to 20x faster)
    run_demo(model, tok, out=args.out, quick=args.quick, n_random=args.random_sets)


VLM_TASKS = ("classify", "caption")


def cmd_eval_vlm(args, model, processor):
    """classify / caption on a VLM: an image folder, or scikit-learn digits for classify."""
    from .evaluation import vlm as eval_vlm
    from .data.images import digits_dataset, load_image_folder
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
    if args.out is None and args.task != "specificity":
        raise ValueError(f"eval {args.task} needs --out DIR (where results.json, PNGs and report.md go)")
    if args.task in VLM_TASKS:
        return cmd_eval_vlm(args, model, tok)
    if args.task == "specificity":
        from .evaluation import set_threads
        from .evaluation.specificity import run_specificity
        print(f"machine: {set_threads(args.threads)}")
        return run_specificity(model, tok, args.out or "hp_fast_out/eval/specificity",
                               quick=args.quick)
    from .evaluation import Setting, run_eval, set_threads
    print(f"machine: {set_threads(args.threads)}")
    setting = (Setting(args.aggregate or "mean", args.baseline or "random", args.criterion or "l1")
               if (args.aggregate or args.baseline or args.criterion) else None)
    run_eval(args.task, model, tok, args.out, ks=[int(k) for k in args.ks.split(",")] if args.ks else None,
             n_random=args.random_sets, quick=args.quick, setting=setting, n_test=args.n_test,
             concepts=args.concepts.split(",") if args.concepts else None,
             alphas=[float(a) for a in args.alphas.split(",")] if args.alphas else None,
             questions=getattr(args, "question_list", None))


def cmd_plan(args, model, tok):
    """Sizes and times of a run from the model config alone (no weights are loaded)."""
    from .plan import format_plan, plan_run
    plan = plan_run(args.model, args.prompts, shard_size=args.shard_size, dtype=args.dtype,
                    devices=args.devices, gflops=args.gflops, concept_size=args.concept_size,
                    k=args.k, criterion=args.criterion, top=args.top)
    print(format_plan(plan), flush=True)
    for warning in plan["warnings"]:
        print(f"hp-fast plan: warning: {warning}", file=sys.stderr)
    if args.json:
        _write_json(args.json, plan)


def cmd_atlas(args, model, tok):
    """Every head's tokens, EVR curve, logit lens and concept scores -> atlas.json + index.html."""
    from .atlas import atlas, resolve_concepts
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else None
    resolve_concepts(tok, concepts, args.concept_file or ())  # bad concept files fail before capture
    atlas(model, tok, _acts(args, model, tok), args.out, concepts=concepts,
          concept_files=args.concept_file or (), k_tokens=args.k_tokens, lens_k=args.lens_k,
          concept_k=args.concept_k, criterion=args.criterion, baseline=args.baseline,
          n_random=args.random_sets, title=args.title)


def cmd_export(args, model, tok):
    from .export import run_cli
    run_cli(args, model, tok)


def cmd_info(args, model, tok):
    from .backend import backend_info
    print(json.dumps(backend_info(), indent=1))


def _common(p, *, acts=True, concept=True):
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), a folder, a .gguf file")
    add_placement_args(p)
    if acts:
        p.add_argument("--prompts", help="prompts: .txt (one per line), .jsonl, .json, .csv, .parquet, "
                       "or a datasets folder (save_to_disk)")
        p.add_argument("--prompt-field", help="column / key holding the prompt (default: the first "
                       "of prompt, question, text)")
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
    p.add_argument("--out", required=True, help="a .safetensors file, or a folder of resumable "
                   "shards (run the same command again to resume after a crash)")
    p.add_argument("--shard-size", type=int, default=None, help="prompts per shard of a folder "
                   "--out (default 1000, or the stored one when resuming)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier capture in the "
                   "--out folder (only the files it wrote) instead of resuming it")
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
    add_placement_args(p)
    p.add_argument("--out", default="hp_fast_out/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer questions and heads (smoke run)")
    p.add_argument("--random-sets", type=int, default=None, help="random control sets per k")
    p = sub.add_parser("eval", help="the paper's experiments with controls: qa | keywords | toxicity")
    p.add_argument("task", choices=["qa", "keywords", "toxicity", "specificity", *VLM_TASKS],
                   help="classify/caption need a VLM (--model FOLDER)")
    p.add_argument("--model", default="smollm2")
    add_placement_args(p)
    p.add_argument("--out", help="folder for results.json, PNGs and report.md (required except for "
                   "specificity: default hp_fast_out/eval/specificity)")
    p.add_argument("--ks", help="numbers of heads to edit, e.g. 3,8,16 (quick: 3,8)")
    p.add_argument("--random-sets", type=int, default=10, help="random control sets per k")
    p.add_argument("--quick", action="store_true", help="small prompt sets (smoke run)")
    p.add_argument("--n-test", type=int, help="test questions per kind (qa) / test prompts")
    p.add_argument("--concepts", help="keywords: subset of colors,sentiments,numbers")
    p.add_argument("--aggregate", choices=["mean", "last"], help="fix the selection setting (qa: no search)")
    p.add_argument("--baseline", choices=["random", "none"])
    p.add_argument("--criterion", choices=["l1", "l2", "ormp"])
    p.add_argument("--alphas", help="qa: gains of the sweep, e.g. --alphas=-1,0 (default -1)")
    p.add_argument("--questions", help="qa: TriviaQA-style file (.jsonl/.json/.csv/.parquet or a "
                   "datasets folder) with question and answer (string, list or value/aliases)")
    p.add_argument("--threads", default="auto", help="torch CPU threads (auto: 1 when the machine is loaded)")
    p.add_argument("--images", help="classify/caption: image folder (class subfolders, or captions file)")
    p.add_argument("--digits", type=int, default=20, help="classify without --images: digits per class")
    p.add_argument("--object-name", default="digit", help="classify: what the images show")
    p.add_argument("--alpha", type=float, default=None, help="classify/caption: head gain (default -1)")
    p.add_argument("--positions", default=None, choices=["all", "image", "text", "prompt", "generated"],
                   help="classify/caption: where the edit applies (default all)")
    p = sub.add_parser("plan", help="memory and time of a run, from the model config (no weights)")
    p.add_argument("--model", required=True, help="a folder with config.json, or an HF id in the local cache")
    p.add_argument("--prompts", type=int, required=True, help="number of prompts to capture")
    p.add_argument("--shard-size", type=int, default=1000, help="prompts per capture shard")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")
    p.add_argument("--devices", default="auto", help="auto, cpu, or cuda:0,cuda:1,...")
    p.add_argument("--gflops", type=float, help="GEMM rate for the time estimate (default: measured)")
    p.add_argument("--concept-size", type=int, default=256, help="concept dictionary atoms (tokens)")
    p.add_argument("--k", type=int, default=50, help="SOMP steps of the ranking")
    p.add_argument("--criterion", default="l1", choices=["l1", "l2", "ormp"])
    p.add_argument("--top", type=int, default=10, help="heads described on the full vocabulary")
    p.add_argument("--json", help="write the plan as JSON here")
    p = sub.add_parser("atlas", help="browse every head: tokens, EVR, logit lens, concept scores (HTML)")
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), a folder, a .gguf file")
    add_placement_args(p)
    p.add_argument("--prompts", help="prompt file: .txt one per line, or .jsonl")
    p.add_argument("--acts", help="activations saved by `hp-fast capture`")
    p.add_argument("--aggregate", default="mean", choices=["mean", "last"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--out", required=True, help="folder for atlas.json and index.html")
    p.add_argument("--concepts", help="built-in concepts to score, comma-separated (default: all)")
    p.add_argument("--concept-file", action="extend", nargs="+", help="word-list files to score too")
    p.add_argument("--k-tokens", type=int, default=20, help="full-vocabulary SOMP tokens per head")
    p.add_argument("--lens-k", type=int, default=10, help="logit-lens tokens per head")
    p.add_argument("--concept-k", type=int, default=50, help="SOMP steps of the concept scores")
    p.add_argument("--criterion", default="l1", choices=["l1", "l2", "ormp"])
    p.add_argument("--baseline", default="random", choices=["random", "none"])
    p.add_argument("--random-sets", type=int, default=3, help="random token sets of the baseline")
    p.add_argument("--title", help="page title (default: Head atlas: MODEL)")
    p = sub.add_parser("export", help="write the model with head gains folded into W_O (HF folder or GGUF)")
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), a folder, a .gguf file")
    add_placement_args(p)
    p.add_argument("--heads", help="LAYER.HEAD list to edit with --alpha, e.g. 29.2,23.4")
    p.add_argument("--gains", help='JSON file: {"29.2": -1.0, ...} or [[layer, head, gain], ...]')
    p.add_argument("--ranking", help="HeadRanking JSON (`hp-fast rank --json`): edit its --top heads")
    p.add_argument("--top", type=int, help="with --ranking: how many of its best heads")
    p.add_argument("--alpha", type=float, default=-1.0, help="gain for --heads/--ranking heads")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], help="HF folder or one GGUF file")
    p.add_argument("--gguf-dtype", default="f16", choices=["f16", "f32"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(precheck="export")
    p = sub.add_parser("info", help="which backends are active")
    p.add_argument("--model", default=None)
    return ap


COMMANDS = {"capture": cmd_capture, "rank": cmd_rank, "describe": cmd_describe,
            "generate": cmd_generate, "demo": cmd_demo, "eval": cmd_eval, "info": cmd_info,
            "plan": cmd_plan, "atlas": cmd_atlas, "export": cmd_export}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed_launch import cli_launch, shutdown
    started = False  # a torch.distributed group created for this run (torchrun)
    try:
        model = tok = None
        load_kw = load_kwargs(args) if args.command not in ("info", "plan") else {}
        precheck(args)  # bad counts, layers, concept, prompt files: before the model loads
        if getattr(args, "precheck", None) == "export":  # bad gains / out folder: before loading
            from .export import check_cli_args
            check_cli_args(args)
        load_kw, started = cli_launch(args, load_kw)  # torchrun: placement, group, rank-0 output
        if args.command == "eval" and args.task in VLM_TASKS:
            from .models.vlm import load_vlm
            if args.model == "smollm2":
                raise ValueError(f"eval {args.task} needs a vision-language model: --model FOLDER "
                                 "(e.g. a local copy of llava-hf/llava-v1.6-mistral-7b-hf)")
            from .models.placement import placement_kwargs
            model, tok = load_vlm(args.model, **placement_kwargs(**load_kw))
        elif args.command not in ("info", "plan"):  # plan reads the config only
            from .models.loading import load_model
            model, tok = load_model(args.model, **load_kw)
        check_with_model(args, model, tok)  # layers / heads / concept vs the model: before capture
        COMMANDS[args.command](args, model, tok)
    except ValueError as err:
        print(f"hp-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown(started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
