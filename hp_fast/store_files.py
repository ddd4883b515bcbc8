"""One shard file of a capture store (``hp_fast.store``): atomic writes and the safetensors format.

``write_shard`` streams tensors into a standard safetensors file (8-byte little-endian header
length, JSON header with dtype / shape / data offsets and ``__metadata__``, raw little-endian
data) straight from the tensors' memory, so no serialized copy of a shard is ever held, and
computes its sha256 on the way. Every write goes to ``.NAME.tmp``, is fsynced, renamed with
``os.replace`` and the folder fsynced: a kill leaves the old file or the complete new one.
``map_tensors`` opens a shard as numpy memmaps of its tensor regions (nothing is read until
indexed). Files it writes load with ``safetensors.safe_open`` / ``load_file`` too.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

SHARD_FORMAT = "hp_fast.ShardedActivations/1"
_DTYPES = {torch.float32: "F32", torch.int64: "I64"}
_NP = {"F32": "<f4", "I64": "<i8"}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, chunks) -> tuple[str, int]:
    """Write ``chunks`` to ``.NAME.tmp``, fsync, rename to ``path``: (sha256 hex, bytes)."""
    tmp = path.with_name(f".{path.name}.tmp")
    h, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
            h.update(c)
            size += len(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return h.hexdigest(), size


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, [json.dumps(obj, indent=1).encode()])


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> tuple[str, int]:
    """Stream ``tensors`` to a safetensors file (no serialized copy in memory); (sha256, bytes)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this machine is big-endian")
    header, arrays, off = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name].detach().cpu().contiguous().numpy()
        header[name] = {"dtype": _DTYPES[tensors[name].dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        arrays.append(a.reshape(-1).view(np.uint8))
        off += a.nbytes
    header["__metadata__"] = {"format": SHARD_FORMAT, "meta": json.dumps(metadata)}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return atomic_write_bytes(path, [struct.pack("<Q", len(hb)), hb, *arrays])


def read_shard_header(path: Path) -> tuple[dict, int]:
    """(safetensors header, byte offset of the data); ValueError when unreadable."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable safetensors shard ({err})") from err
    return header, 8 + n


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def map_tensors(path: Path) -> tuple[dict, dict[str, np.memmap]]:
    """(header, {name: read-only memmap}) of a shard; ValueError when a region is out of the file."""
    header, start = read_shard_header(path)
    size, maps = path.stat().st_size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            dtype, shape = _NP[info["dtype"]], tuple(info["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: tensor {name} has a bad header entry {info}") from err
        if start + hi > size or hi - lo != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: tensor {name} lies outside the file (truncated?)")
        maps[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + lo, shape=shape)
    return header, maps


def set_aside(path: Path, why: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest, i = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while dest.exists():
        dest, i = path.with_name(f"{path.name}.corrupt-{stamp}-{i}"), i + 1
    os.replace(path, dest)
    warnings.warn(f"capture shard {path} {why}; moved aside to {dest.name}, it will be captured "
                  "again", stacklevel=3)
    return dest
