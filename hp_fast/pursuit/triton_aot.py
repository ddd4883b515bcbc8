"""Ahead-of-time compilation of the pursuit's Triton kernels for a named GPU, on any machine.

Triton compiles for a target given by name (``GPUTarget("cuda", 90, 32)``) without a GPU: the
result is PTX and a cubin (ptxas, bundled with Triton). ``cuobjdump -res-usage`` (also bundled)
reads each kernel's registers per thread, stack frame per thread and static shared memory from
the cubin, and the ptxas log of the same compilation gives the spill stores and loads. This is
how the register and stack budget of every block configuration the launcher can pick
(``triton_kernels.launch_configs``) is checked on a machine without a GPU
(tests/unit/test_triton_aot.py, benchmarks/kernel_resources.py).

* ``compile_kernel(name, constexprs, arch, dtypes)`` -> ``CompiledInfo``; cached per process.
* ``compile_many(requests)``  several at once (one worker process when the interpreter is on).
* ``resource_report(archs)``  one row per (kernel, configuration, dictionary dtype, arch).
* ``over_budget(info)``       what breaks ``BUDGET`` (empty when within it).
* ``missing_tools()``         why AOT compilation cannot run here (None when it can).

Compiled as the launcher's launches are specialized: num_warps=4, num_stages=3 (Triton's
defaults, which the launcher keeps), every pointer 16-byte aligned (fresh torch allocations),
integers unspecialized. Under ``TRITON_INTERPRET=1`` the kernels in this process are interpreter
objects (as are Triton's own library functions) and cannot be compiled here, so the work goes
to one child process started without that variable.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

# pointer and scalar types of each kernel's runtime arguments (constexprs come from the config)
ARG_TYPES = {
    "score_kernel": {"X_ptr": "*fp32", "Z_ptr": "*fp32", "orth_ptr": "*fp32", "tol_ptr": "*fp32",
                     "scale_ptr": "*fp32", "best_ptr": "*fp32", "arg_ptr": "*i32", "v": "i32",
                     "n": "i32", "r": "i32", "n_tiles": "i32", "rtol": "fp32"},
    "update_kernel": {"D_ptr": "*fp32", "Qn_ptr": "*fp32", "C_ptr": "*fp32", "X_ptr": "*fp32",
                      "orth_ptr": "*fp32", "B": "i32", "v": "i32", "d": "i32", "r": "i32"},
}
# the dictionary dtypes update_kernel reads (triton_kernels.DICTIONARY_DTYPES), as Triton types
DICTIONARY_TYPES = ("*fp32", "*bf16", "*fp16")
NUM_WARPS, NUM_STAGES = 4, 3  # what the launcher gets (Triton's defaults)

# Budget every configuration the launcher can pick must hold on sm_80 and sm_90 (measured and
# justified in benchmarks/RESULTS.md, "Kernel resources"). No spill stores or loads and no stack
# frame at all: these kernels call nothing, so any stack is spilled registers in local memory,
# and the 112-272-byte stacks measured before the tile-height rule came with 124-316 bytes of
# spills. At most 192 registers per thread: ptxas never exceeds 255 (it spills instead), so the
# budget keeps 63 registers of headroom for the other ptxas of another Triton release (the
# GPU machines run Triton 3.6; this was measured with Triton 3.9's bundled ptxas) and still
# lets two 128-thread blocks share an SM's 64K registers. Shared memory (Triton's dynamic
# allocation plus the static reservation) at most 80 KiB per block, so two blocks fit an SM
# of sm_80 (164 KiB) and sm_90 (228 KiB).
BUDGET = {"registers": 192, "spills": 0, "stack_bytes": 0, "shared_bytes": 80 * 1024}


@dataclass(frozen=True)
class CompiledInfo:
    """One kernel compiled for one GPU architecture, and what it uses per thread / block."""

    kernel: str
    arch: int                  # compute capability * 10 + minor, e.g. 80, 90
    constexprs: dict
    dtypes: dict               # runtime argument types used (pointer dtypes)
    registers: int             # per thread (cuobjdump REG)
    stack_bytes: int           # stack frame per thread (cuobjdump STACK)
    shared_bytes: int          # per block: Triton's dynamic shared memory + static (cuobjdump)
    spills: int                # spill store bytes per thread (ptxas log; -1 if not reported)
    spill_loads: int = -1      # spill load bytes per thread (ptxas log)
    static_shared_bytes: int = 0
    ptx: str = field(default="", repr=False)
    cubin: bytes = field(default=b"", repr=False)
    ptxas_log: str = field(default="", repr=False)

    def row(self) -> dict:
        """Flat summary (no PTX/cubin) for CSVs and tables."""
        out = {k: v for k, v in asdict(self).items() if k not in ("ptx", "cubin", "ptxas_log")}
        out["constexprs"] = config_label(self.constexprs)
        out["dictionary"] = self.dtypes.get("D_ptr", "").lstrip("*")
        del out["dtypes"]
        return out


def config_label(constexprs: dict) -> str:
    """``BV=32 BN=16 BR=128 MODE=0 ...``: a stable, readable key of a configuration."""
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())


# --------------------------------------------------------------------------- tools

def nvidia_tool(name: str) -> str | None:
    """Path of a CUDA tool bundled with Triton (``ptxas``, ``cuobjdump``), else on PATH."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except Exception:  # noqa: BLE001 - no triton: only PATH is left
        pass
    return shutil.which(name)


def missing_tools() -> str | None:
    """Why ahead-of-time compilation cannot run on this machine, or None when it can."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton with ASTSource/GPUTarget is not importable ({type(e).__name__}: {e})"
    for tool in ("ptxas", "cuobjdump"):
        if nvidia_tool(tool) is None:
            return f"{tool} is neither bundled with triton nor on PATH"
    return None


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def res_usage(path: str) -> str:
    """``cuobjdump -res-usage`` of a cubin or an object file with device code."""
    tool = nvidia_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (bundled with triton or on PATH)")
    return subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def cubin_resources(cubin: bytes, kernel: str) -> dict:
    """{"registers", "stack_bytes", "static_shared_bytes"} of ``kernel`` in a cubin (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return parse_res_usage(res_usage(f.name), kernel)
    finally:
        os.unlink(f.name)


def res_usage_table(text: str) -> list[dict]:
    """Every function of ``cuobjdump -res-usage`` output: {"arch" (e.g. "sm_90", "" when not
    said), "function" (as printed, mangled for C++), "registers", "stack_bytes",
    "static_shared_bytes"}."""
    out, arch = [], ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        a = re.match(r"\s*arch = (sm_\w+)", line)
        if a:
            arch = a[1]
        f = re.match(r"\s*Function (.+):\s*$", line)
        m = _RES.search(lines[i + 1]) if f and i + 1 < len(lines) else None
        if m:
            out.append({"arch": arch, "function": f[1], "registers": int(m[1]),
                        "stack_bytes": int(m[2]), "static_shared_bytes": int(m[3])})
    return out


def parse_res_usage(text: str, kernel: str) -> dict:
    """Registers, stack and static shared memory of the function named ``kernel``."""
    for row in res_usage_table(text):
        if row["function"] == kernel:
            return {k: row[k] for k in ("registers", "stack_bytes", "static_shared_bytes")}
    raise ValueError(f"cuobjdump -res-usage output names no function {kernel!r}:\n{text}")


def parse_spills(ptxas_log: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from a ``ptxas -v`` log; (-1, -1) if absent."""
    m = _SPILL.search(ptxas_log)
    return (int(m[1]), int(m[2])) if m else (-1, -1)


# --------------------------------------------------------------------------- compiling

def request(name: str, constexprs: dict, arch: int = 90, dtypes: dict | None = None) -> dict:
    """A normalized compile request (checks the kernel name, the arch and the dtype keys)."""
    if name not in ARG_TYPES:
        raise ValueError(f"kernel {name!r} is unknown; use one of {sorted(ARG_TYPES)}")
    if int(arch) < 70:
        raise ValueError(f"arch={arch}: give a compute capability like 80 (A100) or 90 (H100)")
    types = dict(ARG_TYPES[name])
    for k, t in (dtypes or {}).items():
        if k not in types:
            raise ValueError(f"dtypes names {k!r}, not an argument of {name}: {sorted(types)}")
        types[k] = t
    return {"name": name, "constexprs": dict(constexprs), "arch": int(arch), "dtypes": types}


def _key(req: dict) -> str:
    return json.dumps(req, sort_keys=True)


def _compile_here(req: dict) -> dict:
    """Compile one request in this process (the interpreter must be off); a JSON-able dict."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels
    fn = getattr(triton_kernels, req["name"])
    sig = dict(req["dtypes"]) | {k: "constexpr" for k in req["constexprs"]}
    sig = {a: sig[a] for a in fn.arg_names}  # the kernel's own argument order (KeyError: drift)
    ptrs = [i for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in ptrs}
    src = ASTSource(fn=fn, signature=sig, constexprs=req["constexprs"], attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        k = triton.compile(src, target=GPUTarget("cuda", req["arch"], 32),
                           options={"num_warps": NUM_WARPS, "num_stages": NUM_STAGES})
    res = cubin_resources(k.asm["cubin"], k.metadata.name)
    stores, loads = parse_spills(log.getvalue())
    return dict(res, shared_bytes=int(k.metadata.shared) + res["static_shared_bytes"],
                spills=stores, spill_loads=loads, ptx=k.asm["ptx"],
                cubin=base64.b64encode(k.asm["cubin"]).decode(), ptxas_log=log.getvalue())


def compile_env() -> dict:
    """Environment of a compilation: interpreter off, no Triton cache (ptxas must run to log),
    the ptxas log dumped, FP fusion as the launcher gets it by default (on)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1",
               TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"))
    return env


def _interpreting() -> bool:
    try:
        import triton
        return bool(triton.knobs.runtime.interpret)
    except Exception:  # noqa: BLE001 - older triton: the environment decides
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compile_in_child(reqs: list[dict], timeout: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "requests.json"), os.path.join(tmp, "results.json")
        with open(src, "w") as f:
            json.dump(reqs, f)
        env = compile_env()  # the child imports the same hp_fast as this process
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "hp_fast.pursuit.triton_aot", src, dst],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"AOT compile worker failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        with open(dst) as f:
            return json.load(f)


def _compile_in_process(reqs: list[dict]) -> list[dict]:
    keys = ("TRITON_ALWAYS_COMPILE", "TRITON_DUMP_PTXAS_LOG")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        return [_compile_here(r) for r in reqs]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_CACHE: dict[str, CompiledInfo] = {}


def compile_many(requests: list[dict], timeout: float = 1800.0) -> list[CompiledInfo]:
    """Compile every ``request(...)``; results cached per process, same order as given."""
    todo = [r for r in {_key(r): r for r in requests}.values() if _key(r) not in _CACHE]
    if todo:
        reason = missing_tools()
        if reason:
            raise RuntimeError(f"cannot compile Triton kernels ahead of time: {reason}")
        done = _compile_in_child(todo, timeout) if _interpreting() else _compile_in_process(todo)
        for r, d in zip(todo, done):
            _CACHE[_key(r)] = CompiledInfo(
                kernel=r["name"], arch=r["arch"], constexprs=r["constexprs"], dtypes=r["dtypes"],
                registers=d["registers"], stack_bytes=d["stack_bytes"],
                shared_bytes=d["shared_bytes"], spills=d["spills"], spill_loads=d["spill_loads"],
                static_shared_bytes=d["static_shared_bytes"], ptx=d["ptx"],
                cubin=base64.b64decode(d["cubin"]), ptxas_log=d["ptxas_log"])
    return [_CACHE[_key(r)] for r in requests]


def compile_kernel(name: str, constexprs: dict, arch: int = 90,
                   dtypes: dict | None = None) -> CompiledInfo:
    """Compile ``triton_kernels.<name>`` with ``constexprs`` for ``sm_<arch>``.

    dtypes: runtime argument types to override (``{"D_ptr": "*bf16"}``); the rest are
    ``ARG_TYPES``. Needs no GPU; cached per process."""
    return compile_many([request(name, constexprs, arch, dtypes)])[0]


# --------------------------------------------------------------------------- the budget

def over_budget(info: CompiledInfo, budget: dict | None = None) -> list[str]:
    """Each way ``info`` breaks the budget (``BUDGET`` by default), as readable strings."""
    b = BUDGET | (budget or {})
    out = []
    for key in ("registers", "spills", "stack_bytes", "shared_bytes"):
        value = getattr(info, key)
        if value > b[key]:
            out.append(f"{key} {value} > {b[key]}")
    if info.spill_loads > b["spills"]:
        out.append(f"spill_loads {info.spill_loads} > {b['spills']}")
    return out


def launcher_requests(archs=(80, 90), max_r: int = 256, precisions=("ieee",),
                      kernels=None) -> list[dict]:
    """One request per (configuration the launcher can pick, dictionary dtype, arch), for the
    kernels named in ``kernels`` (all by default)."""
    from .triton_kernels import launch_configs
    out = []
    for arch in archs:
        for name, cfg in launch_configs(max_r, precisions):
            if kernels is not None and name not in kernels:
                continue
            types = DICTIONARY_TYPES if name == "update_kernel" else (None,)
            for t in types:
                out.append(request(name, cfg, arch, {"D_ptr": t} if t else None))
    return out


def resource_report(archs=(80, 90), max_r: int = 256, precisions=("ieee",),
                    kernels=None) -> list[dict]:
    """Registers, stack, spills and shared memory of every launcher configuration on ``archs``
    (for each of ``precisions``): one flat dict per (kernel, configuration, dictionary dtype,
    arch), ``over_budget`` filled."""
    rows = []
    for info in compile_many(launcher_requests(archs, max_r, precisions, kernels)):
        rows.append(info.row() | {"over_budget": "; ".join(over_budget(info))})
    return rows


def _worker(src: str, dst: str) -> None:
    """Child process: compile the requests in ``src`` (JSON), write the results to ``dst``."""
    with open(src) as f:
        reqs = json.load(f)
    out = [_compile_here(r) for r in reqs]
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, dst)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
