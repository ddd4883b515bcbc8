"""scripts/gpu_check.sh --dry-run: the one-command GPU check runs end to end on this CPU (tiny
shapes, the Triton interpreter, no build) and writes its files into the one output folder, so
the script and the benchmark modes it calls cannot rot between GPU sessions."""
from __future__ import annotations

import csv
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_writes_every_output(tmp_path):
    out = tmp_path / "gpu_out"
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                           str(out), "--budget", "300"], capture_output=True, text=True,
                          timeout=600)
    took = time.perf_counter() - t0
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log[-6000:]}"
    summary = (out / "summary.txt").read_text()
    for name in ("info", "gpu_tests", "precision", "bench_pursuit", "bench_gains"):
        assert f"{name} rc=0" in summary, summary
    assert "all steps passed" in summary
    files = {p.name for p in out.iterdir()}
    assert files <= {"summary.txt", "gpu_check.log", "pytest_gpu.xml", "precision.csv",
                     "bench_pursuit_cpu.csv", "bench_gains_cpu.csv", "RESULTS.md"}, files
    assert len(files) == 7, files  # the device tool brings back 8 files at most
    assert "skipped" in (out / "pytest_gpu.xml").read_text()  # no CUDA here: skipped, with reason
    for name, key in (("precision.csv", "precision"), ("bench_pursuit_cpu.csv", "backend"),
                      ("bench_gains_cpu.csv", "bench")):
        with open(out / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(r[key] for r in rows), name
    results = (out / "RESULTS.md").read_text()
    assert "| precision |" in results and "| backend |" in results and "| speed-up |" in results
    print(f"\n[gpu_check --dry-run] {took:.0f} s\n{summary}")
