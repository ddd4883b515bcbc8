"""Where and how a model is loaded: dtype, one device, or a device map with offloading.

``placement_kwargs`` checks the placement arguments of ``hp_fast.load_model`` (and of the
CLI's ``--dtype --device --device-map --max-memory --offload-folder``) before anything is
loaded and turns them into ``from_pretrained`` keyword arguments. ``parse_device_map`` and
``parse_max_memory`` read the CLI's text forms.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def has_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def resolve_dtype(dtype) -> torch.dtype | str:
    """torch dtype (or "auto": the checkpoint's own) of a name such as "bfloat16" / "bf16"."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} is not a floating-point type; use one of "
                             f"{', '.join(DTYPES)} (quantize with quantization_config instead)")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)} or a torch dtype")


def _available(dev: torch.device) -> bool:
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    if dev.type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if dev.type == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return dev.type != "meta"


def check_device(device, what: str = "device") -> torch.device:
    """A torch.device that exists on this machine, or a ValueError naming ``what``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{what}={device!r} is not a device name (use cpu, cuda, cuda:1, "
                         f"mps, ...): {err}") from None
    if not _available(dev):
        have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())])
        raise ValueError(f"{what}={device!r} is not available on this machine (available: {have})")
    return dev


def check_device_map(device_map, offload_folder) -> str | dict:
    """A device-map strategy name or {module name: device}, each device checked."""
    if isinstance(device_map, str):
        if device_map in DEVICE_MAP_STRATEGIES:
            return device_map
        try:
            check_device(device_map, "device_map")  # one device for the whole model
        except ValueError as err:
            raise ValueError(f"{err}; or use a strategy: {', '.join(DEVICE_MAP_STRATEGIES)}, or a "
                             "{module name: device} dict") from None
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"device_map={device_map!r}: use one of {DEVICE_MAP_STRATEGIES} or a "
                         "non-empty {module name: device} dict")
    for name, dev in device_map.items():
        if not isinstance(name, str):
            raise ValueError(f"device_map key {name!r} is not a module name")
        if dev == "disk":
            if offload_folder is None:
                raise ValueError(f"device_map puts {name!r} on 'disk': pass offload_folder "
                                 "(--offload-folder DIR) for the offloaded weights")
            continue
        check_device(f"cuda:{dev}" if isinstance(dev, int) else dev, f"device_map[{name!r}]")
    return device_map


def check_max_memory(max_memory) -> dict:
    """{device: size} with devices 0, 1, ..., "cpu", "disk", "mps" and sizes such as
    "20GiB" / "500MB" or a number of bytes."""
    if not isinstance(max_memory, dict) or not max_memory:
        raise ValueError(f"max_memory={max_memory!r}: use a dict such as "
                         "{0: '20GiB', 'cpu': '60GiB'}")
    out = {}
    for key, size in max_memory.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if not (isinstance(key, int) and key >= 0) and key not in ("cpu", "disk", "mps"):
            raise ValueError(f"max_memory key {key!r}: use GPU indices (0, 1, ...), 'cpu', "
                             "'disk' or 'mps'")
        ok = (isinstance(size, int) and size >= 0) or (isinstance(size, str) and _SIZE.match(size))
        if not ok:
            raise ValueError(f"max_memory[{key!r}]={size!r}: use a size such as '20GiB', '500MB' "
                             "or a number of bytes")
        out[key] = size.replace(" ", "") if isinstance(size, str) else size
    return out


def placement_kwargs(*, dtype=None, device=None, device_map=None, max_memory=None,
                     offload_folder=None) -> dict:
    """Checked ``from_pretrained`` keyword arguments for these placement arguments.

    dtype: a name in ``DTYPES`` or a torch dtype (default float32). device: one device for
    the whole model ("cpu", "cuda:1", ...). device_map: a strategy in
    ``DEVICE_MAP_STRATEGIES`` or {module name: device | "cpu" | "disk"} (needs accelerate);
    max_memory: per-device limits for a strategy; offload_folder: where "disk" weights go
    (created here). Raises ValueError naming the bad argument; loads nothing.
    """
    kw = {"dtype": resolve_dtype(dtype)}
    if device is not None and device_map is not None:
        raise ValueError("pass device (one device for the whole model) or device_map, not both")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        name = "max_memory" if max_memory is not None else "offload_folder"
        raise ValueError(f"{name} only applies with device_map (e.g. device_map='auto')")
    if device is not None:
        dev = check_device(device)
        if has_accelerate():  # straight onto the device, never a full copy on the CPU first
            kw["device_map"] = {"": str(dev)}
        return kw
    if device_map is None:
        return kw
    if not has_accelerate():
        raise ValueError("device_map needs the accelerate package: pip install accelerate")
    kw["device_map"] = check_device_map(device_map, offload_folder)
    if max_memory is not None:
        if not isinstance(kw["device_map"], str) or kw["device_map"] not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"max_memory applies to device_map in {DEVICE_MAP_STRATEGIES}; with "
                             "an explicit device map it would be ignored")
        kw["max_memory"] = check_max_memory(max_memory)
    if offload_folder is not None:
        folder = Path(offload_folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"offload_folder {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        kw["offload_folder"] = str(folder)
    return kw


def parse_device_map(text: str) -> str | dict:
    """CLI form of a device map: a strategy name, a device, a JSON object, or a .json file."""
    text = text.strip()
    if text.startswith("{"):
        source, raw = "--device-map", text
    elif text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--device-map file {path} does not exist")
        source, raw = str(path), path.read_text()
    else:
        return text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err}); write e.g. "
                         '{"model.layers.0": 0, "model.layers.1": "disk", ...}') from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object {{module name: device}}")
    return value


def parse_max_memory(text: str) -> dict:
    """CLI form of max_memory: ``0=20GiB,1=20GiB,cpu=60GiB`` or a JSON object."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--max-memory is not valid JSON ({err})") from None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        if not sep:
            raise ValueError(f"--max-memory entry {part!r}: write DEVICE=SIZE, e.g. "
                             "0=20GiB,cpu=60GiB")
        out[key.strip()] = size.strip()
    return out


__all__ = ["DTYPES", "DEVICE_MAP_STRATEGIES", "check_device", "check_device_map",
           "check_max_memory", "has_accelerate", "parse_device_map", "parse_max_memory",
           "placement_kwargs", "resolve_dtype"]
