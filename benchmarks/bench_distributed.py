"""One process against several (torchrun, gloo) on this CPU: capture into a store, then ranking.

    python benchmarks/bench_distributed.py --n 64                 # quick check (loaded machine)
    python benchmarks/bench_distributed.py --n 512 --worlds 1 2   # the idle-machine run

For each process count W in ``--worlds`` the script launches
``python -m torch.distributed.run --standalone --nproc-per-node W benchmarks/bench_distributed.py
--worker ...``; every process loads the embedded SmolLM2-135M (``hp_fast.load_model()``), then,
each phase between two barriers so its time is the slowest rank's:

* capture: ``hp_fast.capture(model, tok, prompts, out=DIR)`` of ``--n`` real prompts
  (``real_prompts.py``) into a fresh store (shards of ``--shard-size``, batches of
  ``--batch-size``): the ranks share the shards;
* rank: ``hp_fast.rank_heads(HeadActivations.load(DIR), ..., --concept, k=--k)`` with the
  random baseline: the ranks share the heads.

Threads: ``--threads`` per process (default: the cores divided by W, so every run uses the whole
machine). Reported per phase: wall seconds (slowest rank), the speed-up over W=1, and the peak
RSS of each process (``VmHWM``, model included, MiB: the largest over the ranks). Checked:
the W-process store equals the 1-process store bit for bit and the rankings are equal (scores,
EVRs and supports), column "same".

Rows go to ``results/bench_distributed_cpu.csv`` and to the table "Several processes" of
RESULTS.md (``--no-write``: neither). Timings are only meaningful on an idle machine (the load
average is recorded in each row).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, RESULTS_MD, add_table_rows, append_csv, machine, peak_rss_bytes

OUT_CSV = os.path.join(RESULTS_DIR, "bench_distributed_cpu.csv")
COLUMNS = ["date", "machine", "phase", "prompts", "processes", "threads / process", "wall s",
           "speed-up", "peak RSS MiB / process", "same", "load avg"]
SECTION = """
## Several processes (`benchmarks/bench_distributed.py`, torch.distributed)

One process against several (`torchrun --standalone`, gloo) on the CPU: capture of real prompts of
SmolLM2-135M into one store (the ranks share the shards), then `rank_heads` from the store (the
ranks share the heads). Wall seconds of each phase between barriers (the slowest rank), peak RSS
of each process with the model; "same": the store and the ranking equal the 1-process ones bit
for bit. Timings are valid only on an idle machine (load avg well under the core count).
"""


# ---- worker (one per rank, under torchrun) ------------------------------------------------

def _peak_mib() -> float:
    return peak_rss_bytes() / 2**20


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import hp_fast
    from hp_fast import distributed as hd
    from hp_fast.cli import read_prompts

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    model, tok = hp_fast.load_model()
    prompts = read_prompts(args.prompts)

    def phase(fn):
        hd.barrier()
        t0 = time.perf_counter()
        out = fn()
        hd.barrier()
        return time.perf_counter() - t0, out

    capture_s, _ = phase(lambda: hp_fast.capture(
        model, tok, prompts, out=args.out, shard_size=args.shard_size, batch_size=args.batch_size,
        progress=False))
    acts = hp_fast.HeadActivations.load(args.out, model)
    rank_s, ranking = phase(lambda: hp_fast.rank_heads(acts, model, tok, args.concept, k=args.k,
                                                       progress=False))
    peaks = hd.gather_to_main(_peak_mib())
    if hd.is_main():
        Path(args.result).write_text(json.dumps({
            "capture_s": capture_s, "rank_s": rank_s, "peak_mib": peaks,
            "threads": torch.get_num_threads(), "ranking": ranking.to_json()}))
    dist.destroy_process_group()


# ---- driver -------------------------------------------------------------------------------

def launch(world: int, threads: int, prompts: Path, out: Path, result: Path, args) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(world), os.path.abspath(__file__), "--worker", "--threads", str(threads),
           "--prompts", str(prompts), "--out", str(out), "--result", str(result),
           "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
           "--concept", args.concept, "--k", str(args.k)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def same_results(dir_a: Path, dir_b: Path, res_a: dict, res_b: dict) -> tuple[bool, bool]:
    """(stores equal bit for bit, rankings equal)."""
    import torch

    import hp_fast
    za = hp_fast.HeadActivations.load(dir_a, verify=True).z[:]
    zb = hp_fast.HeadActivations.load(dir_b, verify=True).z[:]
    return torch.equal(za, zb), json.dumps(res_a["ranking"]) == json.dumps(res_b["ranking"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="prompts to capture")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="process counts")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per process (default: cores // processes)")
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--concept", default="countries")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if 1 not in args.worlds:
        ap.error("--worlds must include 1 (the reference)")
    from real_prompts import real_prompts
    m = machine()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join(real_prompts(args.n)) + "\n")
        results = {}
        for world in sorted(set(args.worlds)):
            threads = args.threads or max(1, cores // world)
            total = launch(world, threads, prompts, tmp / f"store{world}", tmp / f"r{world}.json",
                           args)
            results[world] = json.loads((tmp / f"r{world}.json").read_text())
            results[world]["launch_s"] = total
            print(f"{world} process(es) x {threads} thread(s): capture "
                  f"{results[world]['capture_s']:.2f} s, rank {results[world]['rank_s']:.2f} s, "
                  f"launch total {total:.1f} s, peak RSS {max(results[world]['peak_mib']):.0f} MiB")
        ref = results[1]
        load = os.getloadavg()[0]
        for world, res in sorted(results.items()):
            same_z, same_rank = same_results(tmp / "store1", tmp / f"store{world}", ref, res)
            for phase, same in (("capture", same_z), ("rank", same_rank)):
                wall = res[f"{phase}_s"]
                rows.append({
                    "date": datetime.date.today().isoformat(), "machine": m.summary(),
                    "phase": phase, "prompts": args.n, "processes": world,
                    "threads": res["threads"], "wall_s": round(wall, 2),
                    "speedup": round(ref[f"{phase}_s"] / wall, 2),
                    "peak_mib": round(max(res["peak_mib"])), "same": "yes" if same else "NO",
                    "load_avg": round(load, 2), "launch_s": round(res["launch_s"], 1),
                    "concept": args.concept, "k": args.k, "shard_size": args.shard_size,
                    "batch_size": args.batch_size})
    for r in rows:
        print(f"{r['phase']:>7} {r['processes']} proc: {r['wall_s']:.2f} s ({r['speedup']}x), "
              f"peak {r['peak_mib']} MiB/process, same: {r['same']}")
    if args.no_write:
        return
    append_csv(OUT_CSV, rows)
    header = "| " + " | ".join(COLUMNS) + " |"
    text = Path(RESULTS_MD).read_text() if os.path.exists(RESULTS_MD) else ""
    if header not in text:
        with open(RESULTS_MD, "a") as f:
            f.write(SECTION)
    add_table_rows(RESULTS_MD, COLUMNS, [[r["date"], f"{m.cpu}, {m.cores} cores", r["phase"],
                                          r["prompts"], r["processes"], r["threads"], r["wall_s"],
                                          f"{r['speedup']}x", r["peak_mib"], r["same"],
                                          r["load_avg"]] for r in rows])
    print(f"wrote {OUT_CSV} and {RESULTS_MD}")


if __name__ == "__main__":
    main()
