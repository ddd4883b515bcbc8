"""Registers, stack (spills) and shared memory of every Triton kernel configuration the pursuit's
launcher can pick, compiled ahead of time for sm_80 and sm_90 on this machine (no GPU needed).

Uses ``hp_fast.pursuit.triton_aot``: Triton compiles each (kernel, constexprs, dictionary dtype,
dot precision) for ``GPUTarget("cuda", arch, 32)``; ``cuobjdump -res-usage`` reads registers per
thread, stack frame per thread and static shared memory from the cubin, the ptxas log of the
same compilation the spill bytes, and Triton's metadata the dynamic shared memory of a block.
Every row is checked against ``triton_aot.BUDGET`` (the budget tests/unit/test_triton_aot.py
holds).

Writes every row to benchmarks/results/kernel_resources.csv (a row of this run replaces the
file's row of the same Triton version, kernel, arch, constexprs and dictionary dtype) and adds
a summary table to benchmarks/RESULTS.md (``--no-table``: not): one row per (kernel,
configuration, precision), the largest value over the dictionary dtypes and NORMALIZE, cells
"sm_80 / sm_90".

    python benchmarks/kernel_resources.py                          # every config, 2 archs
    python benchmarks/kernel_resources.py --precisions ieee --archs 90 --no-write
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

from common import RESULTS_DIR, RESULTS_MD, add_table_rows, append_csv, machine
from hp_fast.pursuit import triton_aot
from hp_fast.pursuit.triton_kernels import DOT_PRECISIONS

FIELDS = ["date", "triton", "machine", "kernel", "arch", "constexprs", "dictionary", "registers",
          "stack_bytes", "spills", "spill_loads", "shared_bytes", "static_shared_bytes",
          "over_budget"]
TABLE = ["date", "triton", "kernel", "config", "precision", "registers sm_80 / sm_90",
         "stack B", "spills B", "shared B", "within budget"]
SUMMED = ("registers", "stack_bytes", "spills", "shared_bytes")


def group_key(row: dict) -> tuple:
    """(kernel, configuration without NORMALIZE and PRECISION, precision) of a CSV row."""
    parts = row["constexprs"].split()
    prec = next((p.split("=", 1)[1] for p in parts if p.startswith("PRECISION=")), "ieee")
    rest = " ".join(p for p in parts if not p.startswith(("NORMALIZE=", "PRECISION=")))
    return row["kernel"], rest, prec


def summary_rows(rows: list[dict], archs) -> list[list]:
    """RESULTS.md rows: per group_key, the max over dictionary dtypes and NORMALIZE, per arch."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        per_arch = groups.setdefault(group_key(r), {})
        best = per_arch.setdefault(int(r["arch"]), {k: 0 for k in SUMMED} | {"ok": True})
        for k in SUMMED:
            best[k] = max(best[k], int(r[k]))
        best["ok"] &= not r["over_budget"]
    out = []
    for (kernel, cfg, prec), per_arch in groups.items():
        def cell(key):
            return " / ".join(str(per_arch[a][key]) if a in per_arch else "-" for a in archs)
        ok = all(v["ok"] for v in per_arch.values())
        out.append([rows[0]["date"], rows[0]["triton"], kernel, cfg, prec, cell("registers"),
                    cell("stack_bytes"), cell("spills"), cell("shared_bytes"),
                    "yes" if ok else "**no**"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--precisions", nargs="+", default=list(DOT_PRECISIONS),
                    choices=list(DOT_PRECISIONS))
    ap.add_argument("--kernels", nargs="+", default=None, choices=sorted(triton_aot.ARG_TYPES),
                    help="only these kernels (default: both)")
    ap.add_argument("--max-r", type=int, default=256, help="widest X row (head dim) to cover")
    ap.add_argument("--out", default=RESULTS_DIR, help="folder of kernel_resources.csv")
    ap.add_argument("--results-md", default=RESULTS_MD)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--no-table", action="store_true", help="write the CSV only")
    args = ap.parse_args()
    reason = triton_aot.missing_tools()
    if reason:
        raise SystemExit(f"[resources] cannot compile ahead of time here: {reason}")
    import triton
    m = machine()
    print(f"[resources] machine: {m.summary()}; triton {triton.__version__}", flush=True)
    t0 = time.perf_counter()
    report = triton_aot.resource_report(tuple(args.archs), args.max_r, tuple(args.precisions),
                                        args.kernels)
    took = time.perf_counter() - t0
    base = dict(date=datetime.date.today().isoformat(), triton=triton.__version__,
                machine=f"{m.cpu}, {m.cores} cores (AOT, no GPU)")
    rows = [base | {k: r[k] for k in FIELDS if k in r} for r in report]
    for r in rows:
        print(f"{r['kernel']:13s} sm_{r['arch']} {r['constexprs']:60s} {r['dictionary'] or '-':5s} "
              f"reg {r['registers']:3d} stack {r['stack_bytes']:4d} spill {r['spills']:4d} "
              f"shared {r['shared_bytes']:6d} {r['over_budget'] or 'ok'}")
    bad = [r for r in rows if r["over_budget"]]
    print(f"[resources] {len(rows)} compilations in {took:.0f} s; budget {triton_aot.BUDGET}; "
          f"{len(bad)} over budget", flush=True)
    if args.no_write:
        return
    path = os.path.join(args.out, "kernel_resources.csv")
    def key(r):
        return r["triton"], r["kernel"], str(r["arch"]), r["constexprs"], r["dictionary"]
    new = {key(r) for r in rows}
    old = []
    if os.path.exists(path):
        import csv
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if key(r) not in new]
    append_csv(path, old + rows, FIELDS, replace=True)
    added = 0 if args.no_table else add_table_rows(args.results_md, TABLE,
                                                   summary_rows(rows, args.archs))
    print(f"[resources] wrote {path} and {added} rows of the kernel resources table of "
          f"{args.results_md}")


if __name__ == "__main__":
    main()
