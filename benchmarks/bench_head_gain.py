"""head_gain op vs the unfused torch expression, CPU, SmolLM2-ish shapes.

    python benchmarks/bench_head_gain.py                # prints a table, writes results/head_gain_cpu.csv
    python benchmarks/bench_head_gain.py --threads 1 4  # intra-op thread counts (default: 1 and torch's)

attn is what SDPA returns, (B, H, T, dh) contiguous. The unfused baseline is what a model
does without the op: transpose to (B, T, H, dh), make it contiguous, multiply by the gains,
reshape to (B, T, H*dh) for o_proj. The op does the same in one pass. Memory columns: bytes
of new tensors each path allocates per call (the unfused path allocates the output twice).
Times: median microseconds of ``torch.utils.benchmark.Timer.blocked_autorange`` over
``--min-run-time`` seconds (0.3).

Each case is timed twice: under torch.inference_mode() (how generation runs the edit hooks)
and with grad mode on, where the op also passes through its Python autograd registration
(a few microseconds per call, which dominates at T=1).

The CSV holds the latest run only (``--csv`` elsewhere, ``--no-write`` not at all).
"""
import argparse
import contextlib
import itertools
import os

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from common import RESULTS_DIR, append_csv, machine, median_us
from hp_fast import ops

B, H, DH = 8, 9, 64
SEQ_LENS = [1, 256]          # decode step, prompt
DTYPES = [torch.float32, torch.bfloat16]
OUT_CSV = os.path.join(RESULTS_DIR, "head_gain_cpu.csv")


def unfused(attn, gains):
    B, H, T, dh = attn.shape
    x = attn.transpose(1, 2).contiguous()                    # (B, T, H, dh)
    return (x * gains.view(1, 1, H, 1).to(x.dtype)).reshape(B, T, H * dh)


class AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of new tensors (not views) that the ops inside the block create."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def allocated_bytes(fn, *args):
    with AllocatedBytes() as counter:
        fn(*args)
    return counter.bytes


def measure(mode, dtype, T, backend, min_run_time):
    """One CSV row: both paths at (B, H, T, dh) in ``dtype`` under ``mode``."""
    with torch.inference_mode() if mode == "inference_mode" else contextlib.nullcontext():
        attn = torch.randn(B, H, T, DH).to(dtype)     # (B, H, T, dh), SDPA layout
        gains = torch.randn(H)                        # (H,) float32
        base = median_us("unfused(attn, gains)", dict(unfused=unfused, attn=attn, gains=gains),
                         min_run_time=min_run_time)
        fused = median_us("head_gain(attn, gains, None, True)",
                          dict(head_gain=ops.head_gain, attn=attn, gains=gains),
                          min_run_time=min_run_time)
        base_bytes = allocated_bytes(unfused, attn, gains)
        fused_bytes = allocated_bytes(ops.head_gain, attn, gains, None, True)
    return {"mode": mode, "dtype": str(dtype).removeprefix("torch."), "B": B, "H": H,
            "T": T, "dh": DH, "threads": torch.get_num_threads(), "backend": backend,
            "unfused_us": round(base, 2), "op_us": round(fused, 2),
            "speedup": round(base / fused, 3),
            "unfused_alloc_bytes": base_bytes, "op_alloc_bytes": fused_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+",
                        default=sorted({1, torch.get_num_threads()}),
                        help="torch.set_num_threads values")
    parser.add_argument("--min-run-time", type=float, default=0.3,
                        help="seconds of timing per case and path (blocked_autorange)")
    parser.add_argument("--csv", default=OUT_CSV, help="where the rows go (replaced)")
    parser.add_argument("--no-write", action="store_true", help="print only: do not write the CSV")
    args = parser.parse_args()
    torch.manual_seed(0)
    backend = ops.op_backend("cpu")
    print(f"{machine().summary()}, op backend: {backend}")
    rows = []
    for threads, mode in itertools.product(args.threads, ["inference_mode", "grad_enabled"]):
        torch.set_num_threads(threads)
        rows += [measure(mode, dtype, T, backend, args.min_run_time)
                 for dtype in DTYPES for T in SEQ_LENS]
    print(f"{'threads':>7} {'mode':>15} {'dtype':>9} {'T':>4} {'unfused us':>11} {'op us':>9} "
          f"{'speedup':>8} {'unfused KiB':>12} {'op KiB':>8}")
    for r in rows:
        print(f"{r['threads']:>7} {r['mode']:>15} {r['dtype']:>9} {r['T']:>4} "
              f"{r['unfused_us']:>11.1f} {r['op_us']:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['unfused_alloc_bytes'] / 1024:>12.1f} {r['op_alloc_bytes'] / 1024:>8.1f}")
    if not args.no_write:
        append_csv(args.csv, rows, replace=True)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
