"""The pursuit's Triton kernels compiled ahead of time for sm_80 and sm_90 (no GPU needed), and
the register / stack / spill / shared-memory budget every launcher configuration must hold
(hp_fast.pursuit.triton_aot.BUDGET, justified in benchmarks/RESULTS.md "Kernel resources").

Compiling one configuration takes 1-6 s here; every configuration the launcher can pick
(every width, rule, dictionary dtype and dot precision, two archs: 230 compilations) took 812 s
on this 2-core machine at a load average of 5-6. So the default test compiles a representative
subset (the widths real models use, the configurations that once spilled, the tightest ones,
and one tile that must fail the budget: 10 compilations in one worker process, about a minute)
and ``test_every_launcher_configuration_within_budget`` (slow) the whole grid. Results are
cached for the session (``triton_aot.compile_many``).
"""
from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("triton")

from hp_fast.pursuit import triton_aot  # noqa: E402
from hp_fast.pursuit.triton_kernels import (  # noqa: E402
    DOT_PRECISIONS, launch_configs, score_config, score_kernel, update_config, update_kernel)

REASON = triton_aot.missing_tools()
needs_tools = pytest.mark.skipif(REASON is not None, reason=f"no AOT compilation here: {REASON}")

# (kernel, constexprs, arch, dtypes): what the default test compiles
SUBSET = [
    (name, cfg, arch, dt)
    for arch in (80, 90)
    for name, cfg, dt in [
        ("score_kernel", score_config(0, True, 128), None),       # L1 at dh=128: spilled on sm_90
        ("score_kernel", score_config(1, False, 128), None),      # l2 at 128: spilled on sm_80
        ("update_kernel", update_config(128), {"D_ptr": "*bf16"}),  # bf16 dictionary, dh=128
        ("update_kernel", update_config(256), {"D_ptr": "*fp32"}),  # the widest rows
    ]
] + [("score_kernel", score_config(0, True, 64, "tf32x3"), 90, None)]  # tensor-core split:
# 8 bytes of spills on sm_90 with BK=32, none with the BK=16 of chunk_cols


def _id(entry):
    name, cfg, arch, dt = entry
    return f"{name}-sm{arch}-{triton_aot.config_label(cfg).replace(' ', ',')}" + \
        (f"-{dt['D_ptr'][1:]}" if dt else "")


# 64 rows of X at width 128 held whole (BK = BR): the kind of tile that spilled on sm_90
SPILLING = ("score_kernel", score_config(0, True, 128) | {"BV": 64, "BK": 128}, 90, None)


@pytest.fixture(scope="module")
def subset():
    """SUBSET and SPILLING compiled in one go (one worker process under the interpreter)."""
    t0 = time.perf_counter()
    entries = SUBSET + [SPILLING]
    infos = triton_aot.compile_many([triton_aot.request(*e) for e in entries])
    print(f"\n[aot] {len(infos)} compilations in {time.perf_counter() - t0:.1f} s")
    return {_id(e): i for e, i in zip(entries, infos)}


@needs_tools
@pytest.mark.parametrize("entry", SUBSET, ids=_id)
def test_subset_compiles_within_budget(subset, entry):
    info = subset[_id(entry)]
    arch = entry[2]
    assert info.cubin[:4] == b"\x7fELF"
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    assert f".target {target}" in info.ptx
    assert info.spills >= 0 and info.spill_loads >= 0, "ptxas log gave no spill line"
    assert 0 < info.registers <= 255
    assert triton_aot.over_budget(info) == [], (info.row(), info.ptxas_log)


@needs_tools
def test_budget_check_catches_a_spilling_tile(subset):
    """The budget is not vacuous: 64 rows of X at width 128 held whole (BK = BR) spill on sm_90."""
    info = subset[_id(SPILLING)]
    problems = triton_aot.over_budget(info)
    assert any(p.startswith(("spills", "registers", "stack_bytes")) for p in problems), info


@needs_tools
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HP_FAST_AOT_FULL") != "1",
                    reason="the full grid takes about 15 minutes here: HP_FAST_AOT_FULL=1 runs it")
def test_every_launcher_configuration_within_budget():
    """Every (kernel, constexprs) of launch_configs for every dot precision, every dictionary
    dtype of update_kernel, on sm_80 and sm_90 (812 s here at a load average of 5-6: passed,
all 230 within budget)."""
    rows = triton_aot.resource_report((80, 90), 256, DOT_PRECISIONS)
    assert len(rows) == 2 * (len(launch_configs(256, DOT_PRECISIONS)) + 2 * 5 * len(DOT_PRECISIONS))
    bad = [r for r in rows if r["over_budget"]]
    assert bad == [], bad


def test_arg_types_match_the_kernels():
    """ARG_TYPES names every runtime argument, the configs every constexpr, of each kernel."""
    for name, fn, cfg in (("score_kernel", score_kernel, score_config(0, True, 64)),
                          ("update_kernel", update_kernel, update_config(64))):
        assert set(fn.arg_names) == set(triton_aot.ARG_TYPES[name]) | set(cfg), name
    assert {n for n, _ in launch_configs(32)} == set(triton_aot.ARG_TYPES)


def test_requests_are_checked():
    with pytest.raises(ValueError, match="kernel 'gemm' is unknown"):
        triton_aot.request("gemm", {}, 90)
    with pytest.raises(ValueError, match="arch=9"):
        triton_aot.request("score_kernel", score_config(0, True, 64), 9)
    with pytest.raises(ValueError, match="dtypes names 'Y_ptr'"):
        triton_aot.request("update_kernel", update_config(64), 90, {"Y_ptr": "*bf16"})


RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function score_kernel:
  REG:54 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function update_kernel:
  REG:102 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
PTXAS_LOG = """ptxas info    : Function properties for score_kernel
    112 bytes stack frame, 124 bytes spill stores, 116 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 112 bytes cumulative stack size
"""


def test_parsers():
    table = triton_aot.res_usage_table(RES_USAGE)
    assert [(r["arch"], r["function"], r["registers"]) for r in table] == [
        ("sm_90", "score_kernel", 54), ("sm_90", "update_kernel", 102)]
    assert triton_aot.parse_res_usage(RES_USAGE, "score_kernel") == {
        "registers": 54, "stack_bytes": 16, "static_shared_bytes": 1024}
    with pytest.raises(ValueError, match="no function 'other'"):
        triton_aot.parse_res_usage(RES_USAGE, "other")
    assert triton_aot.parse_spills(PTXAS_LOG) == (124, 116)
    assert triton_aot.parse_spills("nothing") == (-1, -1)


def test_over_budget_names_each_excess():
    info = triton_aot.CompiledInfo(kernel="score_kernel", arch=90, constexprs={}, dtypes={},
                                   registers=255, stack_bytes=112, shared_bytes=100_000,
                                   spills=124, spill_loads=116)
    assert triton_aot.over_budget(info) == [
        "registers 255 > 192", "spills 124 > 0", "stack_bytes 112 > 0",
        "shared_bytes 100000 > 81920", "spill_loads 116 > 0"]
    ok = triton_aot.CompiledInfo(kernel="score_kernel", arch=90, constexprs={}, dtypes={},
                                 registers=192, stack_bytes=0, shared_bytes=81920, spills=0,
                                 spill_loads=0)
    assert triton_aot.over_budget(ok) == []
