"""Decide the Triton kernels' dot precision with numbers: does a tensor-core split (tf32x3,
bf16x3, bf16x6) keep the pursuit's selections exact, and how much faster is it than "ieee"?

For every precision the installed Triton offers (``triton_kernels.supported_precisions``):

* planted problems (unique greedy path, tests/helpers/planted.py's recipe): the support must
  equal the float64 reference's;
* random heads at model shapes (z, w_o normal, a bf16 dictionary: near-ties do happen there):
  the supports are compared head by head with the "ieee" kernels and with the torch backend
  (fp32 cuBLAS, TF32 off), the first step where they differ is noted, and the time is the best
  of ``--repeats`` runs.

A precision is ``exact`` when every planted support matches and every random head's support
equals both ieee's and torch's; the decision line names the fastest exact precision (ieee if no
split is exact). Writes ``precision.csv`` into ``--out`` and rows to the precision table of
``--results-md``. Needs CUDA; ``--device cpu --tiny`` is the dry run of scripts/gpu_check.sh
(the Triton interpreter ignores the precision, so there every precision runs as ieee, and the
output says so).

    python benchmarks/bench_precision.py --out gpu_check_out       # on a GPU machine
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

from common import RESULTS_DIR, RESULTS_MD, add_table_rows, append_csv, machine, timed
from hp_fast.pursuit import somp_heads
from hp_fast.pursuit.torch_backend import somp_heads_torch
from hp_fast.pursuit.triton_backend import somp_heads_triton
from hp_fast.pursuit.triton_kernels import kernel_precision, supported_precisions

FIELDS = ["date", "machine", "precision", "criterion", "shape", "heads", "n", "k",
          "planted_exact", "same_as_ieee", "same_as_torch", "first_diff_step", "seconds",
          "speedup_vs_ieee", "exact", "note"]
TABLE = ["date", "machine", "precision", "criterion", "shape", "planted exact", "same as ieee",
         "same as torch", "s", "speed-up", "exact"]
SHAPES = {"model": dict(heads=64, n=512, dh=128, d=4096, v=32000, k=20),
          "tiny": dict(heads=2, n=5, dh=16, d=24, v=40, k=3)}


def planted_heads(B, n, dh, d, v, ks, seed):
    """z (B, n, dh), w_o (B, dh, d) whose products combine ks atoms of D (v, d) with weights
    8, 4, 2, ...: a unique greedy path (the recipe of tests/helpers/planted.py)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(v, d, generator=g)
    idx = torch.stack([torch.randperm(v, generator=g)[:ks] for _ in range(B)])
    A = torch.randn(B, dh, ks, generator=g) * (8.0 * 2.0 ** -torch.arange(ks, dtype=torch.float32))
    w_o = A @ D[idx] + 1e-3 * torch.randn(B, dh, d, generator=g)
    return torch.randn(B, n, dh, generator=g), w_o, D


PLANTED = {"model": [(3, 1, 64, 96, 1001), (2, 9, 128, 130, 2051), (2, 40, 128, 200, 777)],
           "tiny": [(2, 5, 16, 24, 40)]}  # (B, n, dh, d, v)


def planted_exact(precision, criterion, device, size="model") -> bool:
    """Supports equal to the float64 reference on the planted problems (odd shapes)."""
    for shape in PLANTED[size]:
        z, w_o, D = planted_heads(*shape, 4, seed=sum(shape))
        ref = somp_heads(z, w_o, D, 4, criterion=criterion, backend="reference")
        got = somp_heads_triton(z.to(device), w_o.to(device), D.to(device), 4,
                                criterion=criterion, precision=precision)
        if not torch.equal(ref.support, got.support.cpu()):
            return False
    return True


def first_diff(a, b) -> int | str:
    """First step (0-based) where two (B, k) supports differ in any head; "" when equal."""
    diff = (a != b).any(dim=0).nonzero()
    return int(diff[0]) if len(diff) else ""


def run(args):
    dev = args.device
    cuda = dev.startswith("cuda")
    m = machine(dev)
    label = m.device_name if cuda else f"{m.cpu} (dry run, Triton interpreter)"
    print(f"[precision] machine: {m.summary()}", flush=True)
    s = SHAPES["tiny" if args.tiny else "model"]
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(s["heads"], s["n"], s["dh"], generator=g).to(dev)
    w_o = (torch.randn(s["heads"], s["dh"], s["d"], generator=g) / s["d"] ** 0.5).to(dev)
    D = torch.randn(s["v"], s["d"], generator=g).to(dev, torch.bfloat16)
    shape = "x".join(f"{k}={v}" for k, v in s.items())
    rows = []
    for criterion in args.criteria:
        torch_sup = somp_heads_torch(z, w_o, D, s["k"], criterion=criterion).support
        base = None
        for p in ["ieee"] + [p for p in args.precisions if p != "ieee"]:
            t = timed(lambda: somp_heads_triton(z, w_o, D, s["k"], criterion=criterion,
                                                precision=p), repeats=args.repeats, warmup=1,
                      cuda=cuda)
            sup = t.result.support
            base = (sup, t.best) if p == "ieee" else base
            same_ieee = int((sup == base[0]).all(dim=1).sum())
            same_torch = int((sup == torch_sup).all(dim=1).sum())
            planted = planted_exact(p, criterion, dev, "tiny" if args.tiny else "model")
            exact = planted and same_ieee == same_torch == s["heads"]
            note = "" if kernel_precision(p) == p else "interpreter: ran as ieee"
            rows.append(dict(date=datetime.date.today().isoformat(), machine=label, precision=p,
                             criterion=criterion, shape=shape, heads=s["heads"], n=s["n"],
                             k=s["k"], planted_exact=planted,
                             same_as_ieee=f"{same_ieee}/{s['heads']}",
                             same_as_torch=f"{same_torch}/{s['heads']}",
                             first_diff_step=first_diff(sup, torch_sup),
                             seconds=round(t.best, 3),
                             speedup_vs_ieee=round(base[1] / t.best, 2), exact=exact, note=note))
            print(f"[precision] {criterion} {p:7s}: {t.best:.3f} s ({rows[-1]['speedup_vs_ieee']}x "
                  f"ieee) planted exact {planted}, same as ieee {same_ieee}/{s['heads']}, as torch "
                  f"{same_torch}/{s['heads']} {note}", flush=True)
    return rows


def decision(rows) -> str:
    """The fastest precision exact for every criterion measured (ieee when none is)."""
    names = {r["precision"] for r in rows}
    ok = [p for p in names if all(r["exact"] for r in rows if r["precision"] == p)]
    speed = {p: min(r["speedup_vs_ieee"] for r in rows if r["precision"] == p) for p in ok}
    best = max(speed, key=speed.get) if speed else "ieee"
    return (f"fastest exact precision: {best} ({speed.get(best, 1.0)}x ieee at worst); exact: "
            f"{sorted(ok)}; not exact: {sorted(names - set(ok))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the dry run)")
    ap.add_argument("--criteria", nargs="+", default=["l1", "l2"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=list(supported_precisions()),
                    choices=list(supported_precisions()), help="ieee always runs (the baseline)")
    ap.add_argument("--out", default=RESULTS_DIR, help="folder of precision.csv")
    ap.add_argument("--results-md", default=RESULTS_MD)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("[precision] --device cuda but no CUDA device; use --device cpu --tiny")
    rows = run(args)
    line = decision(rows)
    print(f"[precision] decision: {line}")
    if args.no_write:
        return
    path = os.path.join(args.out, "precision.csv")
    append_csv(path, rows, FIELDS)
    add_table_rows(args.results_md, TABLE, [
        [r["date"], r["machine"], r["precision"], r["criterion"], r["shape"], r["planted_exact"],
         r["same_as_ieee"], r["same_as_torch"], r["seconds"], r["speedup_vs_ieee"],
         "yes" if r["exact"] else "no"] for r in rows])
    print(f"[precision] wrote {path} and {len(rows)} rows to {args.results_md}")


if __name__ == "__main__":
    main()
