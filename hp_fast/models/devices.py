"""Where a model's tensors live when it is spread over devices or offloaded by accelerate.

A model loaded with ``from_pretrained(..., device_map=...)`` keeps each module on the device
its map names; modules mapped to "cpu" (with an accelerator elsewhere) or "disk" hold their
weights on the ``meta`` device between calls, and an accelerate ``AlignDevicesHook``
(``module._hf_hook``, ``offload=True``) copies them from its ``weights_map`` onto its
``execution_device`` for each forward pass. So:

* ``execution_device(module)``: the device a module computes on (the hook's execution
  device; else where its weights are);
* ``input_device(model)``: where a model's inputs go (the input embedding's execution
  device), never ``next(model.parameters()).device``, which is ``meta`` when the first
  parameter is offloaded;
* ``offload_hook(module)`` / ``offloaded_store(module, name)``: the hook that holds a
  module's weights and the mapping its next forward pass reads them from.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import nn


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks of ``module`` (a SequentialHook unpacked), possibly none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def offload_hook(module: nn.Module):
    """The accelerate hook that keeps ``module``'s own weights offloaded, or None."""
    return next((h for h in _hooks(module) if getattr(h, "offload", False)
                 and getattr(h, "weights_map", None) is not None), None)


def _as_device(dev) -> torch.device:
    return torch.device(dev) if not isinstance(dev, torch.device) else dev


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else the
    device of its first tensor that is not on ``meta``, else the CPU."""
    for hook in _hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs (ids, masks, pixel values) go: the execution device of its
    input embedding (the first layer that reads them), else of its first real tensor."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    if isinstance(emb, nn.Module):
        return execution_device(emb)
    return execution_device(model)


def offloaded_store(module: nn.Module, name: str = "weight") -> tuple[MutableMapping, str]:
    """(mapping, key): where the next forward pass of an offloaded ``module`` reads tensor
    ``name`` from, as a mapping that may be written.

    For accelerate's ``OffloadedWeightsLoader`` this is its in-memory ``state_dict``, which
    takes priority over the files on disk: an entry written there replaces the disk copy
    (which is never touched) until it is removed. ValueError when the module is not
    offloaded or its weights map cannot take a new entry.
    """
    hook = offload_hook(module)
    if hook is None:
        raise ValueError(f"{type(module).__name__} is not offloaded by accelerate")
    wmap = hook.weights_map
    prefix = getattr(wmap, "prefix", None)
    if prefix is not None and hasattr(wmap, "dataset"):  # accelerate PrefixedDataset
        data, key = wmap.dataset, prefix + name
    else:
        data, key = wmap, name
    state = getattr(data, "state_dict", None)
    if isinstance(state, MutableMapping):  # OffloadedWeightsLoader: memory before disk
        return state, key
    if isinstance(data, MutableMapping):
        return data, key
    raise ValueError(f"the offloaded weights of {type(module).__name__} are kept in a "
                     f"{type(data).__name__}, which cannot be written; load the model without "
                     "offloading to fold gains into it")


__all__ = ["execution_device", "input_device", "offload_hook", "offloaded_store"]
