"""Benchmark: naive SOMP (forms D @ R.T, lstsq every step) vs the fast torch path vs Triton.

Same inputs, one run; prints time, the FLOP floor of docs/fast-pursuit.md section 6, the
achieved fraction of the machine's fp32 GEMM rate, peak extra memory, and the ratio to naive.
Writes benchmarks/results/bench_pursuit_<device>.csv and appends rows to the pursuit table of
benchmarks/RESULTS.md (``--no-write``: neither).

Naive = the package's textbook loop ``hp_fast.pursuit.reference.somp_reference`` run in fp32
(``dtype=torch.float32``): the full (v, n) correlations ``D @ R.T`` and a ``lstsq`` refit at
every step, one head at a time.

CPU: SmolLM2-135M shapes (270 heads, d=576, dh=64, v=49152, k=50), real lm_head and o_proj
weights of the embedded model (``hp_fast.load_model()``) when they load (else random, said in
the output); z is random normal (n, 64) per head. The naive loop is timed on --naive-heads
heads and scaled to all heads (the fastest head times the head count).
GPU (CUDA; ``--device``): Mistral-7B (all 1024 heads) and Llama-3-70B (a 256-head slice of
5120, label says so, the all-heads time printed scaled) shapes, random weights (``GPU_SHAPES``);
the naive loop is timed on one head for ``--naive-steps`` steps and scaled to all heads and k
steps; its support must equal the first steps of head 0's. ``somp_reference`` runs on the CPU,
so on a GPU machine the ratio is against the textbook loop on that machine's CPU. The rows of
each (shape, criterion) are written as soon as they are measured (``--out`` folder of the CSV,
``--results-md`` file).
scripts/gpu_check.sh runs ``--gpu-only``; its dry run ``--device cpu --gpu-shapes tiny``.

    python benchmarks/bench_pursuit.py                       # CPU, l1 l2 ormp, n=200 and 2000
    python benchmarks/bench_pursuit.py --criteria l2 --heads 64 --naive-heads 1

Large-dictionary methods (``--methods``, default both): ``dense`` (torch_backend._pursue) and
``bounded`` (bounded.py, section 8), timed on the same inputs in the same run, with the naive
loop; each row says the method, the fraction of the vocabulary scored exactly
(``exact_fraction``), whether its supports equal the other method's on every head, and the load
average. ``--acts FILE`` (``hp-fast capture --out FILE``, e.g. the prompts of
``benchmarks/real_prompts.py``): the real captured z instead of random normal z.
``--shapes llama3-8b``: Llama-3-8B shapes (1024 heads, d=4096, dh=128, v=128256), random w_o and
unembedding, z synthetic with the spectral profile of real heads (``pursuit_inputs``: fitted on
``--acts`` when given, else the built-in fit); ``--heads`` takes the first heads only (the row
says so) and the naive loop is timed on ``--naive-heads`` heads for ``--naive-steps`` steps and
scaled.

    PYTHONPATH=. python benchmarks/bench_pursuit.py --criteria l1 l2 ormp --ns 200 \
        --acts /tmp/acts200.safetensors --naive-heads 2
    PYTHONPATH=. python benchmarks/bench_pursuit.py --shapes llama3-8b --criteria l1 --ns 200 \
        --acts /tmp/acts200.safetensors --methods bounded --naive-heads 1 --naive-steps 5
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

from common import (RESULTS_DIR, RESULTS_MD, PeakMemory, add_table_rows, append_csv,
                    load_average, machine, timed)
from pursuit_inputs import (default_profile, fit_profile, random_model_weights, real_head_z,
                            synthetic_z)
from hp_fast.pursuit.reference import somp_reference
from hp_fast.pursuit.torch_backend import somp_heads_torch

FIELDS = ["date", "machine", "device", "shape", "weights", "criterion", "heads", "n", "k", "v",
          "d", "dh", "backend", "seconds", "naive_seconds_scaled", "naive_heads_timed",
          "ratio_to_naive", "naive_same_support", "floor_gflop", "achieved_fraction",
          "gemm_gflops", "peak_mem_mib", "l1_visited", "final_evr_mean", "method", "z",
          "exact_fraction", "twin_same_support", "load_avg"]
TABLE = [("date", "date"), ("machine", "machine"), ("shape", "shape"),  # RESULTS.md column, field
         ("criterion", "criterion"), ("heads", "heads"), ("n", "n"), ("backend", "backend"),
         ("s", "seconds"), ("naive s (scaled)", "naive_seconds_scaled"),
         ("ratio", "ratio_to_naive"), ("achieved", "achieved_fraction"),
         ("peak MiB", "peak_mem_mib"), ("same support", "naive_same_support")]
TABLE_METHODS = [("date", "date"), ("machine", "machine"), ("shape", "shape"), ("z", "z"),
                 ("criterion", "criterion"), ("heads", "heads"), ("n", "n"), ("method", "method"),
                 ("s", "seconds"), ("naive s (scaled)", "naive_seconds_scaled"),
                 ("ratio", "ratio_to_naive"), ("exact fraction", "exact_fraction"),
                 ("peak MiB", "peak_mem_mib"), ("same as naive", "naive_same_support"),
                 ("same as twin", "twin_same_support"), ("load", "load_avg")]
SHAPES = {"smollm2": None, "llama3-8b": (1024, 4096, 128, 128256)}  # heads, d, dh, v


def result_row(**values) -> dict:
    """A CSV row: every field of FIELDS, empty where not given."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise KeyError(f"not a bench_pursuit column: {sorted(unknown)}")
    return {f: values.get(f, "") for f in FIELDS} | {"date": datetime.date.today().isoformat()}


def speed_fields(seconds, naive_seconds, floor, rate) -> dict:
    """Time, the naive time (None: not measured), its ratio, the floor and the achieved fraction."""
    return dict(seconds=round(seconds, 2),
                naive_seconds_scaled=round(naive_seconds, 1) if naive_seconds else "",
                ratio_to_naive=round(naive_seconds / seconds, 1) if naive_seconds else "",
                floor_gflop=round(floor / 1e9, 1),
                achieved_fraction=round(floor / seconds / rate, 3), gemm_gflops=round(rate / 1e9))


def naive_support(H, D, k, criterion):
    """(k,) support of the textbook loop in fp32. H (n, d), D (v, d)."""
    return somp_reference(H, D, k, criterion=criterion, normalize=True,
                          dtype=torch.float32).support


def floor_flops(criterion, heads, v, d, dh, n, k):
    """docs/fast-pursuit.md section 6 floor, summed over steps and heads."""
    per_step = (2 * v * n * dh + v * d) if criterion == "l1" else (v * d + 2 * v * dh)
    return per_step * k * heads


def smollm2_inputs(n, heads, seed=0):
    """z (heads, n, 64), w_o (heads, 64, 576), D (49152, 576), and where the weights came from."""
    g = torch.Generator().manual_seed(seed)
    D = None
    if heads:
        try:
            import hp_fast
            model, _ = hp_fast.load_model()
            ad = hp_fast.get_adapter(model)
            D = ad.unembedding().detach().float().clone()   # (v, d)
            w_o = ad.all_head_w_o()                          # (L*H, dh, d), layer-major
            src = "real SmolLM2-135M lm_head and o_proj"
        except Exception as e:  # noqa: BLE001
            print(f"[bench] SmolLM2 weights not loaded ({type(e).__name__}: {e}); "
                  "using random weights")
    if D is None:
        D = torch.randn(49152, 576, generator=g) / 24
        w_o = torch.randn(270, 64, 576, generator=g) / 8
        src = "random weights"
    w_o = w_o[:heads].contiguous()
    z = torch.randn(w_o.shape[0], n, w_o.shape[1], generator=g)
    return z, w_o, D, src


def time_naive(z, w_o, D, k, criterion, heads, steps=0):
    """(fastest seconds of one head for k steps, [support of each head]) over the first
    ``heads`` heads; ``steps`` > 0: only that many steps are run and the time is scaled to k
    (the supports then hold the first ``steps`` atoms)."""
    runs = []
    kk = min(k, steps) if steps else k
    for b in range(heads):
        H = z[b] @ w_o[b]  # (n, d): formed outside the clock
        runs.append(timed(lambda: naive_support(H, D, kk, criterion)))
    best = min(t.best for t in runs) * k / kk if runs else None
    return best, [t.result for t in runs]


# --------------------------------------------------------------------------- runs

def cpu_inputs(args):
    """(z (B, n_max, dh), w_o, D, weights label, z label) for ``--shapes``, ``--acts``, ``--z``."""
    n_max = max(args.ns)
    profile = None
    if args.acts:
        zr = real_head_z(args.acts)
        if zr.shape[1] < n_max:
            raise SystemExit(f"--acts {args.acts} holds {zr.shape[1]} samples, --ns asks for "
                             f"{n_max}; capture more prompts or lower --ns")
        profile = fit_profile(zr, args.acts)
    if args.shapes == "smollm2":
        z, w_o, D, src = smollm2_inputs(n_max, args.heads or 270)
        if args.acts:
            if zr.shape[0] < w_o.shape[0] or zr.shape[2] != w_o.shape[1]:
                raise SystemExit(f"--acts holds z of {tuple(zr.shape)} (heads, n, dh); the model "
                                 f"has {tuple(w_o.shape[:2])} (heads, dh)")
            return zr[:w_o.shape[0], :n_max].contiguous(), w_o, D, src, f"real ({args.acts})"
        return z, w_o, D, src, "random normal"
    heads, d, dh, v = SHAPES[args.shapes]
    heads = min(heads, args.heads or heads)
    w_o, D = random_model_weights(heads, dh, d, v)
    if args.z == "normal":
        return synthetic_z(heads, n_max, dh, None), w_o, D, "random", "random normal"
    profile = profile or default_profile()
    print(f"[bench] z profile: {profile.summary()}")
    return synthetic_z(heads, n_max, dh, profile), w_o, D, "random", "profile of real heads"


def run_method(z, w_o, D, k, criterion, method, memory):
    """(timed result, stats, peak MiB) of the fast path with one large-dictionary method."""
    st = {}
    with PeakMemory() as mem:
        fast = timed(lambda: somp_heads_torch(z, w_o, D, k, criterion=criterion, stats=st,
                                              method=method, memory=memory))
    return fast, st, mem.mib


def run_cpu(args):
    m = machine("cpu", gemm=True)
    rate = m.gemm_flops
    print(f"[bench] machine: {m.summary()}")
    z_all, w_o, D, src, zsrc = cpu_inputs(args)
    shape = "SmolLM2-135M" if args.shapes == "smollm2" else args.shapes
    full = SHAPES[args.shapes][0] if SHAPES[args.shapes] else w_o.shape[0]
    if w_o.shape[0] < full:
        shape += f" ({w_o.shape[0]} of {full} heads)"
    print(f"[bench] inputs: {src}; z {zsrc}; heads={w_o.shape[0]}")
    B, v, d, dh, k = w_o.shape[0], D.shape[0], D.shape[1], w_o.shape[1], args.k
    memory = int(args.memory_gib * (1 << 30))
    rows = []
    for criterion in args.criteria:
        for n in (args.ns if criterion != "l1" else args.ns[:1]):
            z = z_all[:, :n].contiguous()
            t_head, sups = time_naive(z, w_o, D, k, criterion, args.naive_heads,
                                      args.naive_steps if args.shapes != "smollm2" else 0)
            results = {}
            for method in args.methods:
                load = load_average()
                fast, st, mib = run_method(z, w_o, D, k, criterion, method, memory)
                res = results[method] = fast.result
                agree = sum(int(torch.equal(s, res.support[b, :s.shape[0]]))
                            for b, s in enumerate(sups))
                visited = st.get("l1_visited_fraction")
                frac = st.get("exact_fraction")
                row = result_row(
                    machine=f"{m.cpu}, {m.cores} cores", device="cpu", shape=shape,
                    weights=src, criterion=criterion, heads=B, n=n, k=k, v=v, d=d, dh=dh,
                    backend="torch", method=method, z=zsrc, naive_heads_timed=args.naive_heads,
                    naive_same_support=f"{agree}/{len(sups)}" if sups else "",
                    peak_mem_mib=mib, l1_visited=round(visited, 4) if visited is not None else "",
                    exact_fraction=f"{frac:.2e}" if frac is not None else "",
                    load_avg=f"{load:.2f}-{load_average():.2f}",
                    final_evr_mean=round(float(res.evr[:, -1].mean()), 4),
                    **speed_fields(fast.best, t_head * B if t_head else None,
                                   floor_flops(criterion, B, v, d, dh, n, k), rate))
                rows.append(row)
                print(f"[bench] {criterion:4s} n={n:5d} heads={B} {method:7s}: {fast.best:7.2f} s "
                      f"| naive {row['naive_seconds_scaled']} s (timed {args.naive_heads} heads, "
                      f"scaled) | ratio {row['ratio_to_naive']}x | exact fraction "
                      f"{row['exact_fraction']} (fallback heads {st.get('fallback_heads', '-')}"
                      f", refined {st.get('refined', '-')}) | peak +{mib} MiB | same as naive "
                      f"{row['naive_same_support']} | L1 visited {row['l1_visited']} | load "
                      f"{row['load_avg']}", flush=True)
            if len(results) == 2:
                a, b = results.values()
                same = int((a.support == b.support).all(dim=1).sum())
                for row in rows[-2:]:
                    row["twin_same_support"] = f"{same}/{B}"
                print(f"[bench] {criterion} n={n}: dense and bounded supports equal on "
                      f"{same}/{B} heads", flush=True)
    if args.spams:
        rows += run_spams(z_all[:, :args.ns[0]], w_o, D, k, rate, f"{m.cpu}, {m.cores} cores")
    return rows


def run_spams(z, w_o, D, k, rate, machine_label):
    """ormp on a concept-sized dictionary vs SPAMS' somp (one thread), same selections check."""
    try:
        import numpy as np
        import spams
    except Exception as e:  # noqa: BLE001
        print(f"[bench] SPAMS comparison skipped: cannot import spams ({type(e).__name__}: {e})")
        return []
    g = torch.Generator().manual_seed(1)
    Dc = D[torch.randperm(D.shape[0], generator=g)[:300]]  # (300, d) a concept-sized dictionary
    Dn = Dc / Dc.norm(dim=1, keepdim=True)
    B = w_o.shape[0]
    H = torch.bmm(z, w_o)  # (B, n, d): SPAMS needs the signals
    X = np.asfortranarray(H.permute(2, 0, 1).reshape(Dc.shape[1], -1).double().numpy())
    Dm = np.asfortranarray(Dn.T.double().numpy())
    ind = np.arange(0, B * z.shape[1] + 1, z.shape[1], dtype=np.int32)
    somp_heads_torch(z[:2], w_o[:2], Dn, k, criterion="ormp")  # warm-up (LAPACK, allocator)
    threads = torch.get_num_threads()
    st = {}
    t_spams, t_fast, t_fast1 = [], [], []
    for _ in range(3):  # alternate, best of 3 each: the cores may be shared with other work
        t_spams.append(timed(lambda: spams.somp(X, Dm, ind, L=k, eps=0.0, numThreads=1)))
        t_fast.append(timed(lambda: somp_heads_torch(z, w_o, Dn, k, criterion="ormp", stats=st)))
        torch.set_num_threads(1)  # the same single thread SPAMS gets
        try:
            t_fast1.append(timed(lambda: somp_heads_torch(z, w_o, Dn, k, criterion="ormp")))
        finally:
            torch.set_num_threads(threads)
    A, res = t_spams[-1].result.tocsc(), t_fast[-1].result
    assert torch.equal(res.support, t_fast1[-1].result.support)
    t_spams, t_fast, t_fast1 = (min(t.best for t in ts) for ts in (t_spams, t_fast, t_fast1))
    same = 0
    for b in range(B):
        cols = A[:, ind[b]:ind[b + 1]]
        sel = set(np.nonzero(np.asarray(abs(cols).sum(axis=1)).ravel())[0].tolist())
        same += int(sel == set(res.support[b].tolist()) - {-1})
    print(f"[bench] ormp concept dict v=300, {B} heads ({st.get('path')}): fast {t_fast:.3f} s on "
          f"{threads} threads, {t_fast1:.3f} s on 1 thread | SPAMS somp 1 thread {t_spams:.3f} s "
          f"(the call alone; forming H and the float64 copies not counted) | ratio "
          f"{t_spams / t_fast:.1f}x ({threads} threads), {t_spams / t_fast1:.1f}x (1 thread vs 1 "
          f"thread) | same selections {same}/{B}")
    return [result_row(machine=machine_label, device="cpu", shape="SmolLM2 concept v=300",
                       criterion="ormp", heads=B, n=z.shape[1], k=k, v=300, d=D.shape[1], dh=64,
                       backend="torch", seconds=round(t_fast1, 3),
                       naive_seconds_scaled=round(t_spams, 3),
                       naive_heads_timed="SPAMS, both 1 thread",
                       ratio_to_naive=round(t_spams / t_fast1, 1), naive_same_support=f"{same}/{B}",
                       gemm_gflops=round(rate / 1e9))]


# name: (heads in the model, heads run by default, d, dh, v, n); the rest of the heads are
# scaled (every head costs the same): Llama-3-70B runs a slice, said in its shape label
GPU_SHAPES = {"Mistral-7B": (1024, 1024, 4096, 128, 32000, 1000),
              "Llama-3-70B": (5120, 256, 8192, 128, 128256, 1000),
              "tiny": (2, 2, 24, 16, 40, 5)}  # the dry run (scripts/gpu_check.sh --dry-run)


def gpu_inputs(heads, d, dh, v, n, device):
    """D (v, d) bf16, w_o (heads, dh, d), z (heads, n, dh): random, on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    D = torch.randn(v, d, device=device, generator=g, dtype=torch.bfloat16)
    w_o = torch.randn(heads, dh, d, device=device, generator=g) / d ** 0.5
    z = torch.randn(heads, n, dh, device=device, generator=g)
    return z, w_o, D


def run_gpu(args, on_rows=None):
    """Triton and torch backends at the GPU_SHAPES of ``args.gpu_shapes`` on ``args.device``;
    the textbook loop runs on the CPU for one head and ``args.naive_steps`` steps, scaled to all
    heads and k steps, and its support is compared with the first steps of head 0's.
    ``on_rows(rows)`` gets each (shape, criterion)'s rows as soon as they are measured."""
    from hp_fast.pursuit.triton_backend import somp_heads_triton
    dev = args.device
    cuda = dev.startswith("cuda")
    m = machine(dev, gemm=True)
    rate = m.gemm_flops
    print(f"[bench] machine: {m.summary()}")
    rows = []
    for name in args.gpu_shapes:
        total, heads, d, dh, v, n = GPU_SHAPES[name]
        heads = min(heads, args.gpu_heads)
        label = name if heads == total else f"{name} ({heads} of {total} heads)"
        z, w_o, D = gpu_inputs(heads, d, dh, v, n, dev)
        steps = min(args.naive_steps or args.k, args.k)
        shape_rows = []
        for criterion in args.criteria:
            H = (z[0].float() @ w_o[0]).cpu()  # (n, d)
            D32 = D.float().cpu()               # the reference runs on the CPU
            naive = timed(lambda: naive_support(H, D32, steps, criterion))
            t_naive = naive.best * heads * args.k / steps
            for backend, fn in (("triton", somp_heads_triton), ("torch", somp_heads_torch)):
                with PeakMemory(cuda=cuda) as mem:
                    fast = timed(lambda: fn(z, w_o, D, args.k, criterion=criterion), cuda=cuda)
                same = int(torch.equal(naive.result.cpu(), fast.result.support[0, :steps].cpu()))
                shape_rows.append(result_row(
                    machine=m.device_name, device=dev, shape=label, weights="random",
                    criterion=criterion, heads=heads, n=n, k=args.k, v=v, d=d, dh=dh,
                    backend=backend, peak_mem_mib=mem.mib,
                    naive_heads_timed=f"1 head, {steps} of {args.k} steps",
                    naive_same_support=f"{same}/1",
                    final_evr_mean=round(float(fast.result.evr[:, -1].mean()), 4),
                    **speed_fields(fast.best, t_naive,
                                   floor_flops(criterion, heads, v, d, dh, n, args.k), rate)))
                print(f"[bench] {label} {criterion} {backend}: {fast.best:.2f} s "
                      f"(all {total} heads: {fast.best * total / heads:.1f} s), naive "
                      f"{t_naive:.1f} s (1 head on the CPU, {steps} steps, scaled), ratio "
                      f"{t_naive / fast.best:.1f}x, same first {steps} atoms {same}/1", flush=True)
            if on_rows is not None:
                on_rows(shape_rows[-2:])
        rows += shape_rows
        del z, w_o, D
    return rows


def write(rows, device, out_dir=RESULTS_DIR, results_md=RESULTS_MD):
    if not rows:
        return
    path = os.path.join(out_dir, f"bench_pursuit_{device}.csv")
    append_csv(path, rows, FIELDS)
    table = TABLE_METHODS if any(r.get("method") for r in rows) else TABLE
    add_table_rows(results_md, [c for c, _ in table], [[r[f] for _, f in table] for r in rows])
    print(f"[bench] wrote {path} and added {len(rows)} rows to the pursuit table of {results_md}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criteria", nargs="*", default=["l1", "l2", "ormp"],
                    help="pass none with --spams to run only the SPAMS comparison")
    ap.add_argument("--ns", nargs="+", type=int, default=[200, 2000])
    ap.add_argument("--heads", type=int, default=0,
                    help="first heads only (default: all heads of the shape)")
    ap.add_argument("--shapes", default="smollm2", choices=list(SHAPES),
                    help="smollm2: the embedded model's weights; llama3-8b: random weights of "
                         "Llama-3-8B shapes with z of the real spectral profile")
    ap.add_argument("--acts", default=None,
                    help="captured activations (hp-fast capture --out FILE): real z for smollm2, "
                         "the spectral profile for llama3-8b")
    ap.add_argument("--z", default="profile", choices=["profile", "normal"],
                    help="llama3-8b z: the real heads' spectral profile or random normal")
    ap.add_argument("--methods", nargs="+", default=["bounded", "dense"],
                    choices=["bounded", "dense"], help="large-dictionary methods to time")
    ap.add_argument("--memory-gib", type=float, default=1.0,
                    help="per-batch state budget of the fast path (somp_heads_torch memory=)")
    ap.add_argument("--naive-heads", type=int, default=2)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--spams", action="store_true", help="add the SPAMS somp (ormp) comparison")
    ap.add_argument("--gpu-heads", type=int, default=1024, help="cap on heads per GPU shape")
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU (SmolLM2) run")
    ap.add_argument("--gpu-shapes", nargs="+", default=["Mistral-7B", "Llama-3-70B"],
                    choices=list(GPU_SHAPES))
    ap.add_argument("--device", default="cuda",
                    help="device of the GPU branch (cpu with --gpu-shapes tiny: the dry run)")
    ap.add_argument("--naive-steps", type=int, default=0,
                    help="GPU branch and --shapes llama3-8b: steps of the textbook loop timed "
                         "(scaled to k; 0 = k)")
    ap.add_argument("--out", default=RESULTS_DIR, help="folder of the CSVs")
    ap.add_argument("--results-md", default=RESULTS_MD)
    ap.add_argument("--no-write", action="store_true",
                    help="print only: write neither the CSV nor RESULTS.md")
    args = ap.parse_args()
    if not args.gpu_only:
        rows = run_cpu(args)
        if not args.no_write:
            write(rows, "cpu", args.out, args.results_md)
    if args.device != "cuda" or torch.cuda.is_available():
        run_gpu(args, None if args.no_write else
                lambda rows: write(rows, args.device.split(":")[0], args.out, args.results_md))
    else:
        print("[bench] no CUDA device: Triton path and GPU shapes skipped")


if __name__ == "__main__":
    main()
