"""What every benchmark script shares: the machine, clocks, peak memory, and result files.

The scripts run as ``python benchmarks/bench_X.py``; Python puts this folder on ``sys.path``,
so they ``from common import ...``. Every name here is public.

* ``machine()``      -> ``Machine``: CPU model, cores, device name, torch, threads, the load
                        average, optionally the fp32 GEMM rate, the git commit.
* ``gemm_rate``      fp32 GEMM FLOP/s measured now (the yardstick of "achieved fraction").
* ``PeakMemory``     peak memory growth of a block: process RSS (CPU) or CUDA allocator peak.
* ``peak_rss_bytes`` the process's resident high-water mark (``VmHWM``).
* ``Stopwatch``, ``timed``, ``median_us``: wall and CPU clocks, median / best of repeats,
  and torch's ``Timer`` for microsecond-scale statements.
* ``append_csv``     add rows to a CSV under one header, never dropping a column.
* ``add_table_rows`` insert rows at the end of a named markdown table of RESULTS.md.
"""
from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


# --------------------------------------------------------------------------- the machine

def cpu_model() -> str:
    """The CPU's model name (``lscpu``), else what ``platform`` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def device_name(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device, the CPU model otherwise."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def load_average() -> float:
    """1-minute load average (-1.0 where the OS does not report it)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return -1.0


def git_commit() -> str:
    """Short commit of the checkout this folder is in, ``+dirty`` when files differ from it."""
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", HERE, *args],
                              capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def gemm_rate(device: str = "cpu") -> float:
    """fp32 GEMM rate of this machine now (FLOP/s): (4096, 576) @ (576, 4096), best of 3."""
    a = torch.randn(4096, 576, device=device)
    b = torch.randn(576, 4096, device=device)
    a @ b  # warm-up
    cuda = str(device).startswith("cuda")
    best = timed(lambda: a @ b, repeats=3, cuda=cuda).best
    return 2 * 4096 * 576 * 4096 / best


@dataclass(frozen=True)
class Machine:
    """Where and under what load a benchmark ran."""

    cpu: str                    # CPU model name
    cores: int                  # os.cpu_count()
    device: str                 # "cpu" or "cuda"
    device_name: str            # CPU model, or the GPU's name
    torch: str                  # torch.__version__
    threads: int                # torch intra-op threads
    load_avg: float             # 1-minute load average when probed
    commit: str                 # git commit of the code measured
    gemm_flops: float | None = None  # fp32 GEMM FLOP/s, when measured

    def summary(self) -> str:
        gemm = f", fp32 GEMM now {self.gemm_flops / 1e9:.0f} GFLOP/s" if self.gemm_flops else ""
        dev = f", {self.device_name}" if self.device != "cpu" else ""
        return (f"{self.cpu}, {self.cores} cores{dev}, torch {self.torch}, threads "
                f"{self.threads}, load avg {self.load_avg:.2f}, commit {self.commit}{gemm}")


def machine(device: str = "cpu", gemm: bool = False) -> Machine:
    """Probe the machine now; ``gemm=True`` also measures the fp32 GEMM rate on ``device``."""
    return Machine(cpu=cpu_model(), cores=os.cpu_count() or 1, device=device,
                   device_name=device_name(device), torch=torch.__version__,
                   threads=torch.get_num_threads(), load_avg=load_average(),
                   commit=git_commit(), gemm_flops=gemm_rate(device) if gemm else None)


# --------------------------------------------------------------------------- memory

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (``VmHWM``). Not ``ru_maxrss``: that
    survives fork and exec, so a child would start with its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


class PeakMemory:
    """Peak memory growth (``.bytes``, an int >= 0) while the block runs.

    CPU: the process's resident set, polled every ``interval`` s by a thread, minus the
    resident set at entry. ``cuda=True``: the CUDA allocator's peak minus what was allocated
    at entry (synchronized on both ends).
    """

    def __init__(self, cuda: bool = False, interval: float = 0.01):
        self.cuda, self.interval = cuda, interval
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.bytes = max(0, int(peak - self._base))

    @property
    def mib(self) -> int:
        return round(self.bytes / 2**20)


# --------------------------------------------------------------------------- clocks

class Stopwatch:
    """``.wall`` and ``.cpu`` (this process) seconds of the block; ``cuda=True`` synchronizes
    the device on entry and exit so the wall time covers the queued kernels."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        _sync(self.cuda)
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.cuda)
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


@dataclass
class Timing:
    """Wall and CPU seconds of each repeat, and the last repeat's return value."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def timed(fn: Callable[[], Any], repeats: int = 1, warmup: int = 0,
          cuda: bool = False) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    t = Timing()
    for _ in range(repeats):
        with Stopwatch(cuda) as sw:
            t.result = fn()
        t.wall.append(sw.wall)
        t.cpu.append(sw.cpu)
    return t


def median_us(stmt: str, env: dict, number: int | None = None,
              min_run_time: float = 0.3) -> float:
    """Median microseconds of ``stmt`` (``torch.utils.benchmark.Timer`` over ``env``):
    ``number`` runs per measurement when given, else ``blocked_autorange``."""
    from torch.utils.benchmark import Timer
    timer = Timer(stmt, globals=env)
    m = timer.timeit(number) if number else timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e6


# --------------------------------------------------------------------------- result files

def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def append_csv(path: str, rows: Iterable[dict], fields: Sequence[str] | None = None,
               replace: bool = False) -> int:
    """Append ``rows`` to the CSV at ``path`` (created with a header when missing).

    fields: the column order (default: the first row's keys); a row's missing keys are
    written empty, an unknown key is an error. When the file's header differs, the file is
    rewritten under ``fields`` followed by any old columns not in ``fields``, so no earlier
    value is lost. ``replace=True``: the file holds only these rows afterwards. Written
    atomically (temporary file, then rename). Returns the number of rows written.
    """
    rows = list(rows)
    if not rows:
        return 0
    fields = list(fields or rows[0])
    old = ""
    if os.path.exists(path) and not replace:
        with open(path, newline="") as f:
            old = f.read()
    old_fields = next(csv.reader(io.StringIO(old)), None) if old else None
    out = io.StringIO()
    if old_fields == fields:  # the earlier rows stay byte for byte
        out.write(old if old.endswith("\n") else old + "\r\n")
        writer = csv.DictWriter(out, fieldnames=fields, restval="")
    else:
        fields += [c for c in old_fields or [] if c not in fields]
        writer = csv.DictWriter(out, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(csv.DictReader(io.StringIO(old)))
    writer.writerows(rows)
    _write_atomic(path, out.getvalue())
    return len(rows)


def table_line(cells: Iterable[Any]) -> str:
    """One markdown table row: ``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def add_table_rows(path: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Insert ``rows`` after the last row of the markdown table whose header is ``columns``.

    The table is found by its header line (``table_line(columns)``); when the file or the
    table is missing, the header, the ``|---|`` line and the rows go at the end. Each row
    has one cell per column. Written atomically. Returns the number of rows added.
    """
    rows = [list(r) for r in rows]
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"row {r} has {len(r)} cells; the table has {len(columns)} columns")
    lines = [table_line(r) for r in rows]
    if not lines:
        return 0
    text = []
    if os.path.exists(path):
        with open(path) as f:
            text = f.readlines()
    header = table_line(columns)
    head = next((i for i, line in enumerate(text) if line.rstrip() == header.rstrip()), None)
    if head is None:
        if text and not text[-1].endswith("\n"):
            text[-1] += "\n"
        text += (["\n"] if text else []) + [header, "|" + "---|" * len(columns) + "\n"] + lines
    else:
        end = head
        while end < len(text) and text[end].startswith("|"):
            end += 1
        text[end:end] = lines
    _write_atomic(path, "".join(text))
    return len(lines)
