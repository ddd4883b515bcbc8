"""Smoke tests of benchmarks/common.py: result files round-trip, memory and clocks are sane."""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "common.py"


@pytest.fixture(scope="module")
def common():
    """benchmarks/ is a folder of scripts, not a package: load common.py from its path."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_append_csv_writes_the_header_once(common, tmp_path):
    path = tmp_path / "sub" / "r.csv"
    assert common.append_csv(str(path), [{"a": 1, "b": "x, y"}], ["a", "b"]) == 1
    assert common.append_csv(str(path), [{"a": 2}, {"b": 3}], ["a", "b"]) == 2
    assert read_rows(path) == [["a", "b"], ["1", "x, y"], ["2", ""], ["", "3"]]
    assert common.append_csv(str(path), [], ["a", "b"]) == 0
    assert len(read_rows(path)) == 4
    assert not list(tmp_path.glob("sub/*.tmp-*"))  # the temporary file was renamed


def test_append_csv_keeps_old_columns_when_the_header_changes(common, tmp_path):
    path = str(tmp_path / "r.csv")
    common.append_csv(path, [{"a": 1, "old": "kept"}])
    common.append_csv(path, [{"a": 2, "new": 5}], ["a", "new"])
    assert read_rows(path) == [["a", "new", "old"], ["1", "", "kept"], ["2", "5", ""]]
    with pytest.raises(ValueError):  # a key outside the header is an error, not a lost value
        common.append_csv(path, [{"zzz": 1}], ["a", "new", "old"])
    assert len(read_rows(path)) == 3


def test_append_csv_replace(common, tmp_path):
    path = str(tmp_path / "r.csv")
    common.append_csv(path, [{"a": 1}, {"a": 2}])
    common.append_csv(path, [{"a": 3}], replace=True)
    assert read_rows(path) == [["a"], ["3"]]


def test_add_table_rows_inserts_after_the_named_table(common, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n| date | s |\n|---|---|\n| d1 | 1 |\n\ntext\n\n"
                    "| date | t |\n|---|---|\n| e1 | 9 |\n")
    assert common.add_table_rows(str(path), ["date", "s"], [["d2", 2], ["d3", ""]]) == 2
    assert path.read_text() == ("# R\n\n| date | s |\n|---|---|\n| d1 | 1 |\n| d2 | 2 |\n"
                                "| d3 |  |\n\ntext\n\n| date | t |\n|---|---|\n| e1 | 9 |\n")


def test_add_table_rows_creates_a_missing_table(common, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("intro")
    common.add_table_rows(str(path), ["a", "b"], [[1, 2]])
    assert path.read_text() == "intro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    with pytest.raises(ValueError, match="3 cells"):
        common.add_table_rows(str(path), ["a", "b"], [[1, 2, 3]])


def test_peak_memory_is_a_non_negative_int(common):
    import mmap
    with common.PeakMemory() as idle:
        pass
    assert isinstance(idle.bytes, int) and idle.bytes >= 0
    size = 64 * 2**20
    with common.PeakMemory() as mem:
        # an anonymous mapping is always fresh pages; a tensor of this size may come from
        # memory the allocator already holds resident after a long session (seen in CI)
        block = mmap.mmap(-1, size)
        block.write(b"x" * size)
    assert isinstance(mem.bytes, int) and mem.bytes >= size // 2
    assert mem.mib == round(mem.bytes / 2**20)
    block.close()


def test_peak_rss_rises_with_fresh_pages(common):
    import mmap
    import os
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    size = 64 * 2**20
    block = mmap.mmap(-1, size)
    block.write(b"x" * size)  # the resident set grows by size; its high-water mark with it
    assert common.peak_rss_bytes() >= resident + size // 2
    block.close()


def test_timed_repeats_and_result(common):
    calls = []
    t = common.timed(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and t.result == 5
    assert len(t.wall) == len(t.cpu) == 3
    assert 0 <= t.best <= t.median
    with pytest.raises(ValueError, match="repeats"):
        common.timed(lambda: None, repeats=0)


def test_machine_describes_this_cpu(common):
    m = common.machine()
    assert m.device == "cpu" and m.cores >= 1 and m.gemm_flops is None
    assert m.cpu and m.cpu in m.summary() and "load avg" in m.summary()
    assert common.device_name("cpu") == m.cpu
