"""The CLI's model placement flags: ``--dtype --device --device-map --max-memory --offload-folder``.

Every command that loads a model takes them; ``load_kwargs(args)`` turns them into checked
``hp_fast.load_model`` keyword arguments before anything is loaded.
"""
from __future__ import annotations

import argparse

from .models.placement import (DEVICE_MAP_STRATEGIES, DTYPES, parse_device_map, parse_max_memory,
                               placement_kwargs)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Add the placement flags to a sub-command's parser."""
    g = p.add_argument_group("model placement")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weights dtype (default float32; auto: the checkpoint's own)")
    g.add_argument("--device", default=None,
                   help="one device for the whole model: cpu, cuda, cuda:1, mps")
    g.add_argument("--device-map", default=None,
                   help=f"spread a model over devices: {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON "
                   'object {"model.layers.0": 0, "model.layers.9": "disk", ...} or a .json file '
                   "(needs accelerate)")
    g.add_argument("--max-memory", default=None,
                   help="with a --device-map strategy: limits per device, e.g. 0=20GiB,cpu=60GiB")
    g.add_argument("--offload-folder", default=None,
                   help="folder for weights the device map puts on 'disk' (created)")


def load_kwargs(args: argparse.Namespace) -> dict:
    """``load_model`` keyword arguments from the flags, checked (ValueError on a bad one)."""
    kw = {"dtype": getattr(args, "dtype", None), "device": getattr(args, "device", None),
          "device_map": None, "max_memory": None,
          "offload_folder": getattr(args, "offload_folder", None)}
    if getattr(args, "device_map", None):
        kw["device_map"] = parse_device_map(args.device_map)
    if getattr(args, "max_memory", None):
        kw["max_memory"] = parse_max_memory(args.max_memory)
    placement_kwargs(**kw)  # every check now, before the model (or any prompt file) is read
    return kw


__all__ = ["add_placement_args", "load_kwargs"]
