"""Cost of head edits at inference: unedited vs attention-op path vs hook path vs folded weights,
and 11 edit configurations in one batched generate vs 11 sequential generates.

    python benchmarks/bench_gains.py                     # 1 intra-op thread (see below)
    python benchmarks/bench_gains.py --threads 2 --config-tokens 32          # idle machine
    python benchmarks/bench_gains.py --threads 2 --skip-latency --config-sets controls \
        --shared-prefix --config-tokens 12

Model: the embedded SmolLM2-135M-Instruct (``hp_fast.load_model()``, fp32, sdpa), 8 chat
prompts, left padded, greedy, under ``torch.inference_mode()``. Edit: 16 random heads
(seed 0) at gain -1.

Latency (model states: unedited, ``edit_heads(mode="attention")`` = the op inside the
attention call, ``edit_heads(mode="hook")`` = pre-hooks on W_O, ``fold_head_gains``):
the prefill forward (batch 8, logits of the last position only, as generate does) and one
decode step (batch 8, one token on the cached prompt; the cache is cropped back after each
step so every sample does the same work) are timed many times, round-robin over the four
states in rotating order, so load from other processes hits all of them alike. Entering
and leaving a state is not timed. Each state's ratio vs unedited is the median over rounds
of (its time / the unedited time of the same round). A greedy ``generate`` per state checks
that the tokens agree and gives the end-to-end time.

Configurations: two sets of 11 on the same 8 prompts. ``controls``: the unedited model + 10
random controls layer-matched to the top-8 country heads of ``benchmarks/demo/ranking.json``
(what an evaluation runs; first edited layer 22), ``random16``: the unedited model + 10 random
16-head sets anywhere (gain -1; first edited layer 0). Each set: 11 sequential generates of 8
rows vs one generate of 88 rows without and with the shared trunk
(``hp_fast.generation.trunk``); with ``--shared-prefix`` also sequential and batched runs
through ``generate_configs_shared_prefix``, and every speed-up is against the faster
sequential method of the same round (end to end: prompt formatting, prefill, decode,
detokenization). The decode-step line times one step of the
88-row batch vs 11 steps of 8 rows (no sharing).

Threads: on a 2-core machine shared with other jobs, two OpenMP threads are preempted inside
their barriers and a forward pass becomes many times slower and erratic; one thread gives
stable numbers. ``--threads`` sets it; the CSV records threads and the load average.

Rows are appended to benchmarks/results/bench_gains_cpu.csv (``--csv`` elsewhere,
``--no-write`` not at all); with ``--results-md`` a summary table goes to that file.

GPU (``--device cuda``): ``--model random-1b`` is a random Llama of Llama-3.2-1B's shape (16
layers, 32 heads of 64, d=2048, 8 KV heads, vocabulary 32000) built from a config, with a
word-level tokenizer over the prompts' words padded to the vocabulary (no download); clocks
synchronize the device; the op-cost microbenchmark (CPU tensors) and the ``controls`` set
(SmolLM2's ranking) are skipped. ``--model random-tiny --device cpu`` is the dry run of
scripts/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import statistics

import torch

import hp_fast
import random_model
from common import (HERE, RESULTS_DIR, add_table_rows, append_csv, load_average, machine,
                    median_us, timed)
from hp_fast.edits import edit_heads, edit_path, fold_head_gains, gains_tensor
from hp_fast.generation import generate_configs, generate_configs_shared_prefix
from hp_fast.generation.trunk import first_edited_layer

OUT_CSV = os.path.join(RESULTS_DIR, "bench_gains_cpu.csv")
RANKING = os.path.join(HERE, "demo", "ranking.json")
PROMPTS = ["What is the capital of France?", "Name a color of the sky at sunset.",
           "Which country has the largest population?", "Describe a cat in one sentence.",
           "How many legs does a spider have?", "What is the tallest mountain in Europe?",
           "Give me a synonym of happy.", "Which planet is known as the red planet?"]
FIELDS = ["date", "machine", "model", "dtype", "threads", "torch", "load_avg", "bench", "path",
          "batch",
          "prompt_tokens", "new_tokens", "edited_heads", "prefill_ms", "prefill_ratio",
          "prefill_cpu_ratio", "decode_ms_per_token", "decode_ratio", "decode_ms_min",
          "decode_cpu_ms", "decode_cpu_ratio", "same_tokens_as_op", "seconds", "speedup",
          "answers_equal", "first_edited_layer"]


def random_heads(num_layers, num_heads, k, seed):
    rng = random.Random(seed)
    return rng.sample([(l, h) for l in range(num_layers) for h in range(num_heads)], k)


def rotated(items, r):
    """items started at position r (mod len): the run order of round r."""
    r %= len(items)
    return items[r:] + items[:r]


def encode_prompts(tok, device="cpu"):
    """The 8 chat prompts, left padded: {"input_ids", "attention_mask"} (8, T) on ``device``."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def model_states(model, gains):
    """name -> context-manager factory that puts the model in that state."""
    return {"unedited": contextlib.nullcontext,
            "op (attention)": lambda: edit_heads(model, gains, mode="attention"),
            "hook": lambda: edit_heads(model, gains, mode="hook"),
            "folded": lambda: fold_head_gains(model, gains)}


def interleaved(states, samples, run):
    """run() -> Timing under every state, round-robin in rotating order (entering and leaving
    a state is not timed); -> {name: {"wall": [s], "cpu": [s]}}. With one intra-op thread all
    the work runs on this thread, so CPU time measures the work and barely depends on load."""
    times = {n: {"wall": [], "cpu": []} for n in states}
    for k in range(samples):
        for n in rotated(list(states), k):
            with states[n]():
                t = run()
            times[n]["wall"] += t.wall
            times[n]["cpu"] += t.cpu
    return times


def summary(times, clock):
    """{name: (median s, min s, median over rounds of t / t_unedited of the same round)}."""
    base = times["unedited"][clock]
    return {n: (statistics.median(t[clock]), min(t[clock]),
                statistics.median(a / b for a, b in zip(t[clock], base)))
            for n, t in times.items()}


def bench_latency(model, tok, heads, args):
    enc = encode_prompts(tok, args.device)
    B, T = enc["input_ids"].shape
    states = model_states(model, {h: -1.0 for h in heads})

    def prefill():
        return timed(lambda: model(**enc, use_cache=True, logits_to_keep=1), cuda=args.cuda)

    cache = model(**enc, use_cache=True, logits_to_keep=1).cache   # (filled unedited: timing only)
    step_ids = enc["input_ids"][:, -1:]                               # (B, 1)
    step_mask = torch.cat([enc["attention_mask"],
                           torch.ones(B, 1, dtype=torch.long, device=args.device)], 1)

    def decode_step():
        t = timed(lambda: model(input_ids=step_ids, attention_mask=step_mask, cache=cache,
                                logits_to_keep=1), cuda=args.cuda)
        cache.crop(-1)                                                # back to the prompt
        return t

    prefill(), decode_step()                                          # warm-up
    pre_t = interleaved(states, args.prefill_samples, prefill)
    dec_t = interleaved(states, args.decode_samples, decode_step)
    pre, pre_cpu = summary(pre_t, "wall"), summary(pre_t, "cpu")
    dec, dec_cpu = summary(dec_t, "wall"), summary(dec_t, "cpu")

    gen = {}  # end to end: one greedy generate per state (same tokens? total time)
    for n, ctx in states.items():
        with ctx():
            gen[n] = timed(lambda: model.generate(
                **enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=tok.pad_token_id), cuda=args.cuda)
    print(f"\nlatency: batch {B}, prompt {T} tokens (left padded), {len(heads)} heads at gain -1; "
          f"{args.prefill_samples} prefill and {args.decode_samples} decode-step samples per path, "
          "interleaved; medians; ratio = median over rounds of path/unedited; wall clock and "
          "process CPU time")
    print(f"{'path':16s} {'prefill ms':>10s} {'ratio':>6s} {'cpu ratio':>9s} {'decode ms':>9s} "
          f"{'ratio':>6s} {'cpu ms':>7s} {'cpu ratio':>9s} {'generate s':>10s}  tokens == op path")
    rows = []
    for n in states:
        (pm, _, pr), (dm, dmin, dr) = pre[n], dec[n]
        pcr, (dcm, _, dcr) = pre_cpu[n][2], dec_cpu[n]
        same = torch.equal(gen[n].result, gen["op (attention)"].result)
        print(f"{n:16s} {pm * 1e3:10.1f} {pr:6.3f} {pcr:9.3f} {dm * 1e3:9.2f} {dr:6.3f} "
              f"{dcm * 1e3:7.2f} {dcr:9.3f} {gen[n].best:10.2f}  {same}")
        rows.append(dict(bench="latency", path=n, batch=B, prompt_tokens=T, new_tokens=args.new_tokens,
                         edited_heads=len(heads), prefill_ms=round(pm * 1e3, 2),
                         prefill_ratio=round(pr, 4), prefill_cpu_ratio=round(pcr, 4),
                         decode_ms_per_token=round(dm * 1e3, 3), decode_ratio=round(dr, 4),
                         decode_ms_min=round(dmin * 1e3, 3), decode_cpu_ms=round(dcm * 1e3, 3),
                         decode_cpu_ratio=round(dcr, 4), same_tokens_as_op=same,
                         seconds=round(gen[n].best, 3)))
    return rows


def bench_op_cost(model, heads, decode_ms):
    """Microseconds the attention path adds per decode step (batch 8), timed in isolation:
    the wrapper's extra Python on every layer and one head_gain call per edited layer."""
    from hp_fast.edits.attention import attention_edit, register
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    ad = hp_fast.get_adapter(model)
    H, dh, Hkv = ad.num_heads, ad.head_dim, model.config.num_key_value_heads
    B, S = 8, 40
    q, k, v = torch.randn(B, H, 1, dh), torch.randn(B, Hkv, S, dh), torch.randn(B, Hkv, S, dh)
    mod = ad.attns[0]
    g = torch.ones(H)
    g[0] = -1.0

    class Edit:
        def resolve(self, b, t):
            return g, None

    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)       # left-padded batches carry a mask
    env = dict(q=q, k=k, v=v, mask=mask, m=mod, f=sdpa_attention_forward, s=dh ** -0.5,
               w=ALL_ATTENTION_FUNCTIONS[register("sdpa")])
    stmt = "{}(m, q, k, v, mask, dropout=0.0, scaling=s)"
    # fixed work: the minimum over interleaved blocks is the least disturbed estimate
    best = {"plain": 1e9, "passthrough": 1e9, "edited": 1e9}
    for _ in range(40):
        for name, fn in (("plain", "f"), ("passthrough", "w"), ("edited", "w")):
            with attention_edit({mod: Edit()}) if name == "edited" else contextlib.nullcontext():
                best[name] = min(best[name], median_us(stmt.format(fn), env, number=100))
    plain, passthrough, edited = best["plain"], best["passthrough"], best["edited"]
    n_edit = len({l for l, _ in heads})
    added = max(0.0, (ad.num_layers - n_edit) * (passthrough - plain) + n_edit * (edited - plain))
    print(f"\nattention call at decode (B={B}, S={S}): sdpa {plain:.1f} us, wrapper pass-through "
          f"{passthrough:.1f} us, wrapper + op {edited:.1f} us -> {n_edit} edited + "
          f"{ad.num_layers - n_edit} unedited layers add {added:.0f} us per step = "
          f"{added / (decode_ms * 1e3) * 100:.2f} % of the {decode_ms:.1f} ms decode step")
    return [dict(bench="op cost", path="attention path added per decode step", batch=B,
                 edited_heads=len(heads), decode_ms_per_token=round(added / 1e3, 4),
                 decode_ratio=round(1 + added / (decode_ms * 1e3), 5))]


def bench_decode_batching(model, tok, args):
    """One decode step of 11 configs x 8 rows (per-row gains) vs 11 steps of 8 rows."""
    ad = hp_fast.get_adapter(model)
    enc = encode_prompts(tok, args.device)
    C = 11
    g = torch.stack([gains_tensor({h: -1.0 for h in random_heads(
        ad.num_layers, ad.num_heads, 16, s)} if s else {}, ad.num_layers, ad.num_heads)
        for s in range(C)])                                         # (C, L, H)
    runs = {}
    for name, reps in (("batch 8", 1), ("batch 88", C)):
        e = {k: v.repeat(reps, 1) for k, v in enc.items()}
        gains = g[:1].expand(len(PROMPTS), -1, -1) if reps == 1 else g.repeat_interleave(len(PROMPTS), 0)
        with edit_heads(model, gains.contiguous()):
            cache = model(**e, use_cache=True, logits_to_keep=1).cache
        runs[name] = (e, gains.contiguous(), cache)

    def step(name):
        e, gains, cache = runs[name]
        mask = torch.cat([e["attention_mask"],
                          torch.ones(len(gains), 1, dtype=torch.long, device=args.device)], 1)
        with edit_heads(model, gains):
            t = timed(lambda: model(input_ids=e["input_ids"][:, -1:], attention_mask=mask,
                                    cache=cache, logits_to_keep=1), cuda=args.cuda)
        cache.crop(-1)
        return t.best

    t8, t88 = [], []
    for _ in range(args.decode_samples // 4):
        t8.append(step("batch 8"))
        t88.append(step("batch 88"))
    m8, m88 = statistics.median(t8), statistics.median(t88)
    print(f"decode step: batch 8 {m8 * 1e3:.1f} ms, batch 88 (11 configs) {m88 * 1e3:.1f} ms -> "
          f"11 configs per step {C * m8 / m88:.2f}x faster batched (the decode-phase bound)")
    return [dict(bench="decode step", path="11 x batch 8", batch=8,
                 decode_ms_per_token=round(m8 * 1e3, 2), speedup=1.0),
            dict(bench="decode step", path="1 x batch 88", batch=88,
                 decode_ms_per_token=round(m88 * 1e3, 2), speedup=round(C * m8 / m88, 3))]


def config_sets(ad, smollm2=True):
    """The two sets of 11 configurations: name -> (description, configs); ``controls`` only
    for SmolLM2 (its country ranking)."""
    sets = {"random16": ("unedited + 10 random 16-head sets anywhere in the model (gain -1)",
                         [None] + [{h: -1.0 for h in random_heads(ad.num_layers, ad.num_heads, 16, s)}
                                   for s in range(1, 11)])}
    if not smollm2:
        return sets
    with open(RANKING) as f:  # the demo's country ranking of SmolLM2 (committed)
        top = [tuple(h) for h in json.load(f)["top"][:8]]
    controls = hp_fast.random_control(top, ad.num_layers, ad.num_heads, n_sets=10, seed=0)
    sets["controls"] = ("unedited + 10 layer-matched random controls of the top-8 country heads "
                        "(gain -1)", [None] + [{h: -1.0 for h in c} for c in controls])
    return sets


def bench_configs(model, tok, args, name, desc, configs):
    """Sequential vs batched generates of the 11 configurations, same run, rotated order.

    With ``--shared-prefix`` the sequential and the batched runs are timed both with
    ``generate_configs`` and with ``generate_configs_shared_prefix`` (the prompts' common
    chat-template head encoded once per configuration), and every speed-up is taken against
    the faster sequential method of the same round."""
    ad = hp_fast.get_adapter(model)
    l0 = first_edited_layer(torch.stack([gains_tensor(c or {}, ad.num_layers, ad.num_heads)
                                         for c in configs]))
    kw = dict(max_new_tokens=args.config_tokens, progress=False)
    B = len(configs) * len(PROMPTS)

    def batched(gen, share):
        return lambda: gen(model, tok, PROMPTS, configs, share_trunk=share, batch_size=B, **kw)

    def sequential(gen):
        return lambda: [gen(model, tok, PROMPTS, [c], batch_size=len(PROMPTS), **kw)[0]
                        for c in configs]

    runs = [("sequential", sequential(generate_configs)),
            ("batched, no trunk sharing", batched(generate_configs, False)),
            ("batched", batched(generate_configs, True))]
    if args.shared_prefix:
        runs += [("sequential, shared prefix", sequential(generate_configs_shared_prefix)),
                 ("batched, shared prefix", batched(generate_configs_shared_prefix, True))]
    seq_keys = [k for k, _ in runs if k.startswith("sequential")]
    times = {k: [] for k, _ in runs}
    answers = {}
    for r in range(args.config_rounds):
        for key, fn in rotated(runs, r):
            t = timed(fn, cuda=args.cuda)
            answers[key] = t.result
            times[key].append(t.best)
    best_seq = [min(times[k][r] for k in seq_keys) for r in range(args.config_rounds)]
    print(f"\n[{name}] {desc}: first edited layer {l0} of {ad.num_layers}; {len(configs)} configs "
          f"x {len(PROMPTS)} prompts, {args.config_tokens} new tokens max, {args.config_rounds} "
          f"rounds (medians; speed-up vs the faster sequential method of each round)")
    rows = []
    for key, _ in runs:
        t = statistics.median(times[key])
        ratio = statistics.median(s / b for s, b in zip(best_seq, times[key]))
        equal = sum(a == b for ca, cb in zip(answers[key], answers["sequential"])
                    for a, b in zip(ca, cb))
        seq = key.startswith("sequential")
        rows_shape = f"11 x batch {len(PROMPTS)}" if seq else f"1 x batch {B}"
        print(f"  {key:<28} ({rows_shape}): {t:6.2f} s   speed-up {ratio:.2f}x   answers equal "
              f"to sequential {equal}/{B}")
        rows.append(dict(bench=f"configs {name}", path=f"{key} ({rows_shape})",
                         batch=len(PROMPTS) if seq else B, new_tokens=args.config_tokens,
                         seconds=round(t, 3), speedup=round(ratio, 3),
                         answers_equal=f"{equal}/{B}", first_edited_layer=l0))
    return rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--prefill-samples", type=int, default=10, help="prefill timings per path")
    ap.add_argument("--decode-samples", type=int, default=60, help="decode-step timings per path")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens of the end-to-end generate")
    ap.add_argument("--config-tokens", type=int, default=12, help="max new tokens per config run")
    ap.add_argument("--config-rounds", type=int, default=3)
    ap.add_argument("--skip-configs", action="store_true")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="also time sequential and batched runs with generate_configs_shared_prefix")
    ap.add_argument("--config-sets", nargs="+", default=["controls", "random16"],
                    choices=["controls", "random16"], help="which 11-configuration sets to run")
    ap.add_argument("--skip-latency", action="store_true", help="only the configuration benchmarks")
    ap.add_argument("--skip-op-cost", action="store_true", help="no attention-call microbenchmark")
    ap.add_argument("--csv", default=OUT_CSV)
    ap.add_argument("--results-md", default=None,
                    help="also add a summary table to this markdown file (e.g. RESULTS.md)")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", *random_model.SHAPES],
                    help="the embedded SmolLM2-135M, or a random Llama built from a config")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-write", action="store_true", help="print only: do not write the CSV")
    args = ap.parse_args()
    args.cuda = args.device.startswith("cuda")
    return args


def load(args):
    """(model, tokenizer) of ``--model`` on ``--device`` in ``--dtype``."""
    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        model, tok = hp_fast.load_model()
        return model.to(args.device, dtype), tok
    return random_model.build(args.model, PROMPTS, args.device, dtype)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args)
    ad = hp_fast.get_adapter(model)
    heads = random_heads(ad.num_layers, ad.num_heads, min(16, ad.num_layers * ad.num_heads), 0)
    m = machine(args.device)
    print(f"{m.summary()}, model {args.model} {args.dtype}, attn "
          f"{model.config._attn_implementation}, edit path {edit_path(model)}, op backend "
          f"{hp_fast.ops.op_backend(args.device)}")
    print(f"edited heads (layer, head): {sorted(heads)} "
          f"-> {len({l for l, _ in heads})} of {ad.num_layers} layers")
    with torch.inference_mode():
        rows = []
        if not args.skip_latency:
            rows += bench_latency(model, tok, heads, args)
            if args.device == "cpu" and not args.skip_op_cost:  # it times CPU tensors
                rows += bench_op_cost(model, heads, rows[0]["decode_ms_per_token"])
        rows += bench_decode_batching(model, tok, args)
        if not args.skip_configs:
            for name, (desc, configs) in config_sets(ad, args.model == "smollm2").items():
                if name in args.config_sets:
                    rows += bench_configs(model, tok, args, name, desc, configs)
    load1 = load_average()
    print(f"load avg start {m.load_avg:.2f}, end {load1:.2f} ({m.cores} cores)")
    if args.no_write:
        return
    where = m.device_name if args.cuda else f"{m.cpu} x{m.cores}"
    run = dict(date=datetime.date.today().isoformat(), machine=where, threads=m.threads,
               torch=m.torch, load_avg=f"{m.load_avg:.1f}-{load1:.1f}", model=args.model,
               dtype=args.dtype)
    append_csv(args.csv, [{**run, **row} for row in rows], FIELDS)
    print(f"appended {len(rows)} rows to {args.csv}")
    if args.results_md:
        cols = ["date", "machine", "model", "bench", "path", "batch", "prefill ms",
                "decode ms/token", "ratio", "s", "speed-up", "answers equal"]
        keys = ["prefill_ms", "decode_ms_per_token", "decode_ratio", "seconds", "speedup",
                "answers_equal"]
        add_table_rows(args.results_md, cols, [
            [run["date"], where, f"{args.model} {args.dtype}", r["bench"], r["path"],
             r.get("batch", ""), *[r.get(k, "") for k in keys]] for r in rows])
        print(f"added {len(rows)} rows to {args.results_md}")


if __name__ == "__main__":
    main()
