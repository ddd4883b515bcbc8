"""Reading a capture store (``hp_fast.store``) lazily: ``ShardedZ`` and ``load_activations``.

Each shard is a numpy memmap of its raw tensor region (offsets from the safetensors header,
checked against the manifest). Memmaps rather than ``safe_open(...).get_slice``: a shard seen
as (s, L*H, dh) gives any set of heads (one batch of the layer-major order, or a scattered
list) with one fancy index that touches only those bytes, where ``get_slice`` takes one range
per dimension and would read whole layers. Only what an index asks for is copied into memory.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from .store import PROMPTS, ShardedStore
from .store_files import file_sha256


class ShardedZ:
    """Lazy (n, L, H, dh) float32 ``z`` of one aggregate, read from the shard memmaps.

    ``z[rows, ...]`` (rows: int, slice, list or tensor; then ints / slices) and
    ``heads(flat)`` copy only what they return; ``materialize()`` reads everything."""

    def __init__(self, store: ShardedStore, aggregate: str):
        self.store, self.aggregate = store, aggregate
        self.shape = torch.Size(store.manifest["shape"])
        self.dtype = torch.float32
        self._starts = np.array([store.shard_range(i)[0] for i in range(store.num_shards)])

    def __len__(self) -> int:
        return self.shape[0]

    def shard(self, i: int) -> np.memmap:
        """(s, L, H, dh) memmap of shard ``i``; opened per use, so a store of thousands of
        shards never holds thousands of open files."""
        return self.store.check_shard(i)[f"z.{self.aggregate}"]

    def __getitem__(self, key) -> torch.Tensor:
        key = key if isinstance(key, tuple) else (key,)
        rows, rest = key[0], key[1:]
        if any(not isinstance(r, (int, slice)) and r is not Ellipsis for r in rest):
            raise TypeError("a sharded z takes ints and slices after the sample index; use "
                            "HeadActivations.head_z for a set of heads")
        if isinstance(rows, torch.Tensor):
            rows = rows.numpy()
        idx = np.arange(self.shape[0])[rows]
        scalar, idx = idx.ndim == 0, np.atleast_1d(idx)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        order = np.argsort(which, kind="stable")
        pieces = []
        for s in np.unique(which):  # rows of one shard, then the rest of the index
            local = idx[order][which[order] == s] - self._starts[s]
            pieces.append(self.shard(int(s))[(slice(None), *rest)][local])
        out = np.concatenate(pieces)[np.argsort(order)] if pieces else \
            np.empty((0, *np.empty(self.shape[1:])[rest].shape), np.float32)
        t = torch.from_numpy(np.ascontiguousarray(out))
        return t[0] if scalar else t

    def heads(self, flat: list[int]) -> torch.Tensor:
        """(b, n, dh) of heads ``flat`` (indices into layer-major L*H), shard by shard."""
        n, L, H, dh = self.shape
        out = torch.empty(len(flat), n, dh)
        for i in range(self.store.num_shards):
            a, b = self.store.shard_range(i)
            part = self.shard(i).reshape(b - a, L * H, dh)[:, flat]  # (s, b, dh) copy
            out[:, a:b] = torch.from_numpy(part).transpose(0, 1)
        return out

    def materialize(self) -> torch.Tensor:
        return self[:]


def load_activations(folder, model=None, aggregate: str | None = None, verify: bool = False):
    """``HeadActivations`` over a complete store, ``z`` memory-mapped (``ShardedZ``).

    aggregate: which one when the store holds several; verify: also check every sha256
    (reads all shards once; sizes and headers are always checked)."""
    from .capture import HeadActivations
    store = ShardedStore.read(folder)
    store.require_complete()
    aggs = store.aggregates
    if aggregate is None and len(aggs) > 1:
        raise ValueError(f"{folder} holds the aggregates {aggs}; pass aggregate=one of them")
    aggregate = aggregate or aggs[0]
    if aggregate not in aggs:
        raise ValueError(f"{folder} holds the aggregates {aggs}, not {aggregate!r}")
    for s in store.manifest["shards"]:
        path = store.dir / s["file"]
        if not path.exists() or path.stat().st_size != s["bytes"] or (
                verify and file_sha256(path) != s["sha256"]):
            raise ValueError(f"{path} is missing, truncated or corrupt; run the capture again "
                             "to repair it (it resumes and recaptures that shard)")
    z = ShardedZ(store, aggregate)
    for i in range(store.num_shards):
        z.shard(i)  # header, dtype and shape checks of every shard, before any work
    meta = dict(store.manifest.get("meta", {}), aggregate=aggregate)
    meta.update(json.loads((store.dir / PROMPTS).read_text()))
    counts = store.extra("num_image_tokens")
    if counts is not None:
        meta["num_image_tokens"] = counts.tolist()
    acts = HeadActivations(z, meta)
    return acts.bind(model) if model is not None else acts
