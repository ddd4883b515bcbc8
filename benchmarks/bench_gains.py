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
rows vs one generate of 88 rows without and with the shared trunk (``hp_fast.trunk``); with
``--shared-prefix`` also sequential and batched runs through ``generate_configs_shared_prefix``,
and every speed-up is against the faster sequential method of the same round (end to end:
prompt formatting, prefill, decode, detokenization). The decode-step line times one step of the
88-row batch vs 11 steps of 8 rows (no sharing).

Threads: on a 2-core machine shared with other jobs, two OpenMP threads are preempted inside
their barriers and a forward pass becomes many times slower and erratic; one thread gives
stable numbers. ``--threads`` sets it; the CSV records threads and the load average.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import random
import statistics
import subprocess
import time

import torch

import hp_fast
from hp_fast.batched import generate_configs
from hp_fast.edits import edit_heads, edit_path, fold_head_gains

OUT_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_gains_cpu.csv")
PROMPTS = ["What is the capital of France?", "Name a color of the sky at sunset.",
           "Which country has the largest population?", "Describe a cat in one sentence.",
           "How many legs does a spider have?", "What is the tallest mountain in Europe?",
           "Give me a synonym of happy.", "Which planet is known as the red planet?"]


def random_heads(num_layers, num_heads, k, seed):
    rng = random.Random(seed)
    return rng.sample([(l, h) for l in range(num_layers) for h in range(num_heads)], k)


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "cpu"


def _paths(model, gains):
    """name -> context-manager factory that puts the model in that state."""
    return {"unedited": contextlib.nullcontext,
            "op (attention)": lambda: edit_heads(model, gains, mode="attention"),
            "hook": lambda: edit_heads(model, gains, mode="hook"),
            "folded": lambda: fold_head_gains(model, gains)}


def _timed(fn):
    """(wall s, CPU s of this process) of fn(). With one intra-op thread all the work runs on
    this thread, so CPU time measures the work and barely depends on other processes' load."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _interleaved(paths, samples, run):
    """Time run() under every path, round-robin in rotating order;
    -> {name: {"wall": [s], "cpu": [s]}}."""
    names = list(paths)
    times = {n: {"wall": [], "cpu": []} for n in names}
    for k in range(samples):
        for n in names[k % len(names):] + names[:k % len(names)]:
            with paths[n]():                      # entering/leaving is not timed
                wall, cpu = run()
            times[n]["wall"].append(wall)
            times[n]["cpu"].append(cpu)
    return times


def _summary(times, clock):
    """{name: (median s, min s, median over rounds of t / t_unedited of the same round)}."""
    base = times["unedited"][clock]
    return {n: (statistics.median(t[clock]), min(t[clock]),
                statistics.median(a / b for a, b in zip(t[clock], base)))
            for n, t in times.items()}


def bench_latency(model, tok, heads, args):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    B, T = enc["input_ids"].shape
    paths = _paths(model, {h: -1.0 for h in heads})

    def prefill():
        return _timed(lambda: model(**enc, use_cache=True, logits_to_keep=1))

    cache = model(**enc, use_cache=True, logits_to_keep=1).cache   # (filled unedited: timing only)
    step_ids = enc["input_ids"][:, -1:]                               # (B, 1)
    step_mask = torch.cat([enc["attention_mask"], torch.ones(B, 1, dtype=torch.long)], 1)

    def decode_step():
        t = _timed(lambda: model(input_ids=step_ids, attention_mask=step_mask, cache=cache,
                                 logits_to_keep=1))
        cache.crop(-1)                                                # back to the prompt
        return t

    prefill(), decode_step()                                          # warm-up
    pre_t = _interleaved(paths, args.prefill_samples, prefill)
    dec_t = _interleaved(paths, args.decode_samples, decode_step)
    pre, pre_cpu = _summary(pre_t, "wall"), _summary(pre_t, "cpu")
    dec, dec_cpu = _summary(dec_t, "wall"), _summary(dec_t, "cpu")

    # end to end: one greedy generate per path (same tokens? total time)
    gen = {}
    for n, ctx in paths.items():
        with ctx():
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            gen[n] = (out, time.perf_counter() - t0)
    print(f"\nlatency: batch {B}, prompt {T} tokens (left padded), {len(heads)} heads at gain -1; "
          f"{args.prefill_samples} prefill and {args.decode_samples} decode-step samples per path, "
          "interleaved; medians; ratio = median over rounds of path/unedited; wall clock and "
          "process CPU time")
    print(f"{'path':16s} {'prefill ms':>10s} {'ratio':>6s} {'cpu ratio':>9s} {'decode ms':>9s} "
          f"{'ratio':>6s} {'cpu ms':>7s} {'cpu ratio':>9s} {'generate s':>10s}  tokens == op path")
    rows = []
    for n in paths:
        (pm, _, pr), (dm, dmin, dr) = pre[n], dec[n]
        pcr, (dcm, _, dcr) = pre_cpu[n][2], dec_cpu[n]
        same = torch.equal(gen[n][0], gen["op (attention)"][0])
        print(f"{n:16s} {pm * 1e3:10.1f} {pr:6.3f} {pcr:9.3f} {dm * 1e3:9.2f} {dr:6.3f} "
              f"{dcm * 1e3:7.2f} {dcr:9.3f} {gen[n][1]:10.2f}  {same}")
        rows.append(dict(bench="latency", path=n, batch=B, prompt_tokens=T, new_tokens=args.new_tokens,
                         edited_heads=len(heads), prefill_ms=round(pm * 1e3, 2),
                         prefill_ratio=round(pr, 4), prefill_cpu_ratio=round(pcr, 4),
                         decode_ms_per_token=round(dm * 1e3, 3), decode_ratio=round(dr, 4),
                         decode_ms_min=round(dmin * 1e3, 3), decode_cpu_ms=round(dcm * 1e3, 3),
                         decode_cpu_ratio=round(dcr, 4), same_tokens_as_op=same,
                         seconds=round(gen[n][1], 3)))
    return rows


def bench_op_cost(model, heads, decode_ms):
    """Microseconds the attention path adds per decode step (batch 8), timed in isolation:
    the wrapper's extra Python on every layer and one head_gain call per edited layer."""
    from torch.utils.benchmark import Timer
    from hp_fast import attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    ad = hp_fast.get_adapter(model)
    H, dh, Hkv = ad.num_heads, ad.head_dim, model.config.num_key_value_heads
    B, S = 8, 40
    q, k, v = torch.randn(B, H, 1, dh), torch.randn(B, Hkv, S, dh), torch.randn(B, Hkv, S, dh)
    mod = ad.attns[0]
    wrap = attention.ALL_ATTENTION_FUNCTIONS[attention.register("sdpa")]
    g = torch.ones(H)
    g[0] = -1.0

    class Edit:
        def resolve(self, b, t):
            return g, None

    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)       # left-padded batches carry a mask
    glob = dict(q=q, k=k, v=v, mask=mask, m=mod, f=sdpa_attention_forward, w=wrap, s=dh ** -0.5)
    stmt = "{}(m, q, k, v, mask, dropout=0.0, scaling=s)"

    def us():  # fixed work: the minimum over interleaved blocks is the least disturbed estimate
        best = {"plain": 1e9, "passthrough": 1e9, "edited": 1e9}
        for _ in range(40):
            for name, fn in (("plain", "f"), ("passthrough", "w"), ("edited", "w")):
                if name == "edited":
                    attention._ACTIVE[id(mod)] = Edit()
                try:
                    t = Timer(stmt.format(fn), globals=glob).timeit(100)
                finally:
                    attention._ACTIVE.pop(id(mod), None)
                best[name] = min(best[name], t.median * 1e6)
        return best["plain"], best["passthrough"], best["edited"]

    plain, passthrough, edited = us()
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
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    C = 11
    g = torch.stack([hp_fast.edits.gains_tensor({h: -1.0 for h in random_heads(
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
        mask = torch.cat([e["attention_mask"], torch.ones(len(gains), 1, dtype=torch.long)], 1)
        with edit_heads(model, gains):
            t0 = time.perf_counter()
            model(input_ids=e["input_ids"][:, -1:], attention_mask=mask, cache=cache, logits_to_keep=1)
            dt = time.perf_counter() - t0
        cache.crop(-1)
        return dt

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


RANKING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "ranking.json")


def config_sets(ad):
    """The two sets of 11 configurations: name -> (description, configs)."""
    import json
    sets = {"random16": ("unedited + 10 random 16-head sets anywhere in the model (gain -1)",
                         [None] + [{h: -1.0 for h in random_heads(ad.num_layers, ad.num_heads, 16, s)}
                                   for s in range(1, 11)])}
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
    from hp_fast.evaluation.prefix import generate_configs_shared_prefix
    from hp_fast.trunk import first_edited_layer
    ad = hp_fast.get_adapter(model)
    g = torch.stack([hp_fast.edits.gains_tensor(c or {}, ad.num_layers, ad.num_heads)
                     for c in configs])
    l0 = first_edited_layer(g)
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
        for key, fn in runs[r % len(runs):] + runs[:r % len(runs)]:  # rotate the order
            t0 = time.perf_counter()
            answers[key] = fn()
            times[key].append(time.perf_counter() - t0)
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
        rows_shape = f"11 x batch {len(PROMPTS)}" if key.startswith("sequential") else f"1 x batch {B}"
        print(f"  {key:<28} ({rows_shape}): {t:6.2f} s   speed-up {ratio:.2f}x   answers equal "
              f"to sequential {equal}/{B}")
        rows.append(dict(bench=f"configs {name}", path=f"{key} ({rows_shape})",
                         batch=len(PROMPTS) if key.startswith("sequential") else B,
                         new_tokens=args.config_tokens, seconds=round(t, 3),
                         speedup=round(ratio, 3), answers_equal=f"{equal}/{B}",
                         first_edited_layer=l0))
    return rows


def main():
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
    ap.add_argument("--csv", default=OUT_CSV)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = hp_fast.load_model()
    ad = hp_fast.get_adapter(model)
    heads = random_heads(ad.num_layers, ad.num_heads, 16, 0)
    load0 = os.getloadavg()[0]
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, attn {model.config._attn_implementation}, edit path "
          f"{edit_path(model)}, op backend {hp_fast.ops.op_backend('cpu')}, "
          f"load avg {load0:.2f}")
    print(f"edited heads (layer, head): {sorted(heads)} "
          f"-> {len({l for l, _ in heads})} of {ad.num_layers} layers")
    with torch.inference_mode():
        rows = []
        if not args.skip_latency:
            rows += bench_latency(model, tok, heads, args)
            rows += bench_op_cost(model, heads, rows[0]["decode_ms_per_token"])
        rows += bench_decode_batching(model, tok, args)
        if not args.skip_configs:
            for name, (desc, configs) in config_sets(ad).items():
                if name in args.config_sets:
                    rows += bench_configs(model, tok, args, name, desc, configs)
    load1 = os.getloadavg()[0]
    print(f"load avg start {load0:.2f}, end {load1:.2f} (2 cores)")
    common = dict(date=datetime.date.today().isoformat(), machine=f"{cpu_name()} x{os.cpu_count()}",
                  threads=torch.get_num_threads(), torch=torch.__version__,
                  load_avg=f"{load0:.1f}-{load1:.1f}")
    fields = ["date", "machine", "threads", "torch", "load_avg", "bench", "path", "batch",
              "prompt_tokens", "new_tokens", "edited_heads", "prefill_ms", "prefill_ratio",
              "prefill_cpu_ratio", "decode_ms_per_token", "decode_ratio", "decode_ms_min",
              "decode_cpu_ms", "decode_cpu_ratio", "same_tokens_as_op", "seconds", "speedup",
              "answers_equal", "first_edited_layer"]
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    old = []
    if os.path.exists(args.csv):  # earlier rows are kept, under the current header
        with open(args.csv, newline="") as f:
            old = list(csv.DictReader(f))
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for row in old:
            w.writerow({k: row.get(k, "") for k in fields})
        for row in rows:
            w.writerow({**common, **row})
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
