"""``torchrun ... -m hp_fast capture|rank|describe``: the process group and each rank's placement.

torchrun starts one process per rank with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; ``cli_launch`` (called by
``hp_fast.cli.main``) then:

* places each rank's model: ``cuda:LOCAL_RANK`` when CUDA is available and neither ``--device``
  nor ``--device-map`` is given (one replica per GPU); with a ``--device-map`` strategy
  (auto, balanced, ...) and no ``--max-memory`` each local rank gets its own slice of the
  node's GPUs (``LOCAL_RANK * g`` to ``(LOCAL_RANK + 1) * g - 1``, ``g = GPUs // LOCAL_WORLD_SIZE``);
  ``--device`` / an explicit map / ``--max-memory`` are used as given, on every rank;
* initializes the process group: NCCL when the model goes to CUDA (and NCCL is built in), else
  gloo, timeout ``HP_FAST_DIST_TIMEOUT_MIN`` minutes (default 60: rank 0 may check the sha256 of
  every shard of a large store while the others wait);
* keeps output on rank 0 only: the other ranks' stdout goes to /dev/null and their ``--json`` /
  ``--plot`` are dropped, so rank 0 alone prints and writes files (errors go to every rank's
  stderr).

Only ``capture`` with a folder ``--out`` (a sharded store), ``rank`` and ``describe`` split
their work; other commands are refused under torchrun with more than one process.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .models.placement import DEVICE_MAP_STRATEGIES

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SPLIT_COMMANDS = ("capture", "rank", "describe")
TIMEOUT_VAR = "HP_FAST_DIST_TIMEOUT_MIN"


def torchrun_env(env=None) -> dict | None:
    """{rank, world_size, local_rank, local_world_size} from torchrun's variables, or None."""
    env = os.environ if env is None else env
    if not all(env.get(k) for k in TORCHRUN_VARS):
        return None
    try:
        out = {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
               "local_rank": int(env["LOCAL_RANK"]),
               "local_world_size": int(env.get("LOCAL_WORLD_SIZE") or env["WORLD_SIZE"])}
    except ValueError as err:
        raise ValueError(f"torchrun's environment is malformed ({err}): RANK, WORLD_SIZE, "
                         "LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    return out


def rank_placement(load_kw: dict, local_rank: int, local_world_size: int, gpus: int,
                   gpu_bytes=None) -> dict:
    """``load_model`` keyword arguments for this local rank (module docstring); ``gpus``: CUDA
    devices on this node; gpu_bytes(i): memory of GPU i (for a device-map slice)."""
    kw = dict(load_kw)
    if kw.get("device") is not None or gpus == 0:
        return kw
    dm = kw.get("device_map")
    if dm is None:
        if local_rank >= gpus:
            raise ValueError(f"local rank {local_rank} has no GPU of its own: this node has {gpus} "
                             f"GPU(s); launch with --nproc-per-node {gpus} or fewer, or pass "
                             "--device cpu (or --device cuda:0 to share one GPU)")
        kw["device"] = f"cuda:{local_rank}"
    elif dm in DEVICE_MAP_STRATEGIES and kw.get("max_memory") is None and local_world_size > 1:
        per = gpus // local_world_size
        if per < 1:
            raise ValueError(f"--device-map {dm} with {local_world_size} processes on a node of "
                             f"{gpus} GPU(s) leaves no GPU per process: launch with "
                             f"--nproc-per-node {gpus} or fewer, or pass --max-memory")
        mine = range(local_rank * per, (local_rank + 1) * per)
        kw["max_memory"] = {i: int(gpu_bytes(i)) if gpu_bytes else "0GiB" for i in mine}
    return kw


def _cuda_index(kw: dict) -> int | None:
    """The first CUDA device the placement uses, or None when the model stays off CUDA."""
    dev, dm = kw.get("device"), kw.get("device_map")
    if dev is not None:
        d = torch.device(dev)
        return (d.index or 0) if d.type == "cuda" else None
    if isinstance(dm, str) and dm in DEVICE_MAP_STRATEGIES:
        if not torch.cuda.is_available():
            return None
        ints = [k for k in (kw.get("max_memory") or {}) if isinstance(k, int)]
        return min(ints) if ints else 0
    values = dm.values() if isinstance(dm, dict) else [dm] if dm is not None else []
    for v in values:
        if isinstance(v, int) or (isinstance(v, str) and v.startswith("cuda")):
            return v if isinstance(v, int) else (torch.device(v).index or 0)
    return None


def backend_for(kw: dict) -> tuple[str, int | None]:
    """("nccl", its GPU) when the model goes to CUDA and NCCL is available, else ("gloo", None)."""
    idx = _cuda_index(kw)
    if idx is not None and dist.is_nccl_available():
        return "nccl", idx
    return "gloo", None


def init_process_group(kw: dict) -> None:
    """Initialize the default group from torchrun's environment (env:// rendezvous)."""
    backend, gpu = backend_for(kw)
    if gpu is not None:
        torch.cuda.set_device(gpu)
    minutes = float(os.environ.get(TIMEOUT_VAR) or 60)
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timedelta(minutes=minutes))


def _check_command(args, world: int) -> None:
    if world < 2:
        return
    if args.command not in SPLIT_COMMANDS:
        raise ValueError(f"`hp-fast {args.command}` does not split over torchrun's processes; "
                         f"run it as one process (torchrun splits {', '.join(SPLIT_COMMANDS)})")
    if args.command == "capture" and (args.acts or str(args.out).endswith(".safetensors")):
        raise ValueError("under torchrun, capture --out must be a folder (a sharded store the "
                         f"processes fill together), not the one file {args.out}")


def cli_launch(args, load_kw: dict) -> tuple[dict, bool]:
    """Under torchrun: checks, this rank's placement, the process group, rank-0-only output.

    Returns (load_model keyword arguments, whether a group was initialized here); outside
    torchrun (or when the caller already initialized a group) the arguments unchanged."""
    env = torchrun_env()
    if env is None or args.command in ("info", "plan"):
        return load_kw, False
    _check_command(args, env["world_size"])
    started = False
    if not dist.is_initialized():
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        load_kw = rank_placement(load_kw, env["local_rank"], env["local_world_size"], gpus,
                                 lambda i: torch.cuda.get_device_properties(i).total_memory * 0.9)
        init_process_group(load_kw)
        started = True
    if dist.get_rank() != 0:
        for name in ("json", "plot"):  # rank 0 alone writes the result files
            if getattr(args, name, None):
                setattr(args, name, None)
        if started:  # and prints (in a caller's own group its output is left alone)
            sys.stdout = open(os.devnull, "w")
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()  # one "Loading weights" bar, not one per rank
    return load_kw, started


def shutdown(started: bool) -> None:
    """Destroy the process group if ``cli_launch`` created it."""
    if started and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["torchrun_env", "rank_placement", "backend_for", "init_process_group", "cli_launch",
           "shutdown", "SPLIT_COMMANDS", "TORCHRUN_VARS", "TIMEOUT_VAR"]
