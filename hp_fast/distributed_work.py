"""The work hp_fast splits over torch.distributed ranks (``hp_fast.distributed``).

``somp_heads_split``  SOMP of a batch of heads: rank ``r`` of ``W`` pursues the contiguous
                      block ``[B*r//W, B*(r+1)//W)`` of the ``B`` heads, the supports and EVRs
                      are gathered, every rank returns the whole batch's result. The pursuit of
                      a head does not depend on the other heads of its batch (bit for bit on
                      the CPU: tests/integration/test_distributed.py; on a GPU a batched product
                      may pick another kernel for another batch size, which changes rounding
                      only).
``capture_to_store_ranks``  the several-writers protocol of ``hp_fast.store`` (its module
                      docstring): rank 0 creates or repairs the store, every rank captures the
                      shards ``pending()[rank::world]`` into its own part file, rank 0 merges.
                      Shards and batches are those of a single-process capture, so the store is
                      bit for bit the same on a deterministic device.

Both check first that every rank was given the same inputs (``distributed.agree``) and turn a
failure on one rank into an error on every rank, never a hang.
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import torch

from .distributed import (GlobalProgress, agree, all_gather_objects, all_gather_rows, is_main,
                          probe_sum, raise_if_any_failed, rank, splitting, world_size)
from .pursuit import somp_heads
from .pursuit.result import SOMPResult, check_heads
from .store import HEADER_FIELDS, ShardedStore, ShardSink, capture_to_store

PROBE_WAIT_S = 10.0  # how long a rank waits for rank 0's probe file (slow network filesystems)


def head_block(num_heads: int, r: int, world: int) -> tuple[int, int]:
    """[start, stop) of the heads rank ``r`` of ``world`` pursues (sizes differ by at most 1)."""
    return num_heads * r // world, num_heads * (r + 1) // world


def somp_heads_split(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int, *,
                     criterion: str = "l1", normalize: bool = True, center: bool = False,
                     backend: str = "auto", progress: bool = False) -> SOMPResult:
    """``hp_fast.pursuit.somp_heads`` with the heads split over the ranks (module docstring);
    plain ``somp_heads`` outside a process group. z (B, n, dh), w_o (B, dh, d), dictionary (v, d);
    returns support / evr (B, k) on every rank. ``progress``: rank 0's bar (its own block)."""
    kw = dict(criterion=criterion, normalize=normalize, center=center, backend=backend)
    if not splitting():
        return somp_heads(z, w_o, dictionary, k, progress=progress, **kw)
    check_heads(z, w_o, dictionary, k, criterion)
    B, world = z.shape[0], world_size()
    agree("SOMP over heads", {"heads": B, "samples": z.shape[1], "head_dim": z.shape[2],
                              "atoms": dictionary.shape[0], "atom_dim": dictionary.shape[1],
                              "k": k, **kw, "z": probe_sum(z), "w_o": probe_sum(w_o),
                              "dictionary": probe_sum(dictionary)},
          hint="the same activations, heads, model and dictionary")
    if B < world:  # fewer heads than ranks: every rank pursues them all, nothing to gather
        return somp_heads(z, w_o, dictionary, k, progress=progress and is_main(), **kw)
    lo, hi = head_block(B, rank(), world)
    part = somp_heads(z[lo:hi], w_o[lo:hi], dictionary, k, progress=progress and is_main(), **kw)
    return SOMPResult(support=all_gather_rows(part.support), evr=all_gather_rows(part.evr),
                      criterion=part.criterion, backend=part.backend)


# ---- capture into one store from every rank -----------------------------------------------

def _probe_visible(folder: Path, name: str, token: str) -> str | None:
    """None when rank 0's probe file is visible here with its token, else the error text."""
    deadline = time.time() + PROBE_WAIT_S
    while True:
        try:
            if (folder / name).read_text() == token:
                return None
        except OSError:
            pass
        if time.time() > deadline:
            return (f"the capture folder {folder} that rank 0 just created is not visible on rank "
                    f"{rank()} (host {os.uname().nodename}): --out / out= must be one folder on a "
                    "filesystem that every rank sees (shared storage when the ranks run on "
                    "several nodes), with the same path on every rank")
        time.sleep(0.2)


def _open_on_every_rank(out, header: dict, overwrite: bool, prompts) -> tuple[ShardedStore, list]:
    """Rank 0 creates / repairs the store and writes a probe file; the others check they see
    it and open the store without writing. Returns (store, rank 0's pending shards)."""
    folder = Path(out)
    probe = f".manifest-probe-{secrets.token_hex(8)}.tmp"  # a temp name: a crash leaves no clutter
    store, error, todo = None, None, None
    if is_main():
        try:
            store = ShardedStore.open(folder, header, overwrite=overwrite, prompts=prompts)
            todo = store.pending()
            (folder / probe).write_text(probe)
        except (ValueError, OSError) as err:
            error = err
    status = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if status[0] is not None:
        if error is not None:
            raise error
        raise ValueError(f"rank 0 could not open the capture folder {folder}: {status[0]}")
    probe, todo = all_gather_objects((probe, todo))[0]
    if not is_main():
        try:
            why = _probe_visible(folder, probe, probe)
            if why:
                raise ValueError(why)
            store = ShardedStore.open(folder, header, writer=False)
        except (ValueError, OSError) as err:
            error = err
    try:
        raise_if_any_failed(error, f"opening the capture folder {folder}")
    finally:
        if is_main():
            (folder / probe).unlink(missing_ok=True)
    return store, todo


class _CountingSink:
    """Passes batches to ``sink`` and advances a ``GlobalProgress`` by their rows."""

    def __init__(self, sink, bar: GlobalProgress):
        self.sink, self.bar = sink, bar

    def write(self, start: int, stop: int, z) -> None:
        self.sink.write(start, stop, z)
        self.bar.update(stop - start)


def capture_to_store_ranks(model, n: int, make_batch, aggregates, header: dict, out, *,
                           batch_size: int, overwrite: bool = False, progress: bool = True,
                           prompts: dict | None = None, extras=None,
                           what: str = "prompts") -> ShardedStore:
    """``hp_fast.store.capture_to_store`` with the missing shards split over the ranks (module
    docstring); every rank returns the merged store. Plain ``capture_to_store`` outside a
    process group."""
    if not splitting():
        return capture_to_store(model, n, make_batch, aggregates, header, out,
                                batch_size=batch_size, overwrite=overwrite, progress=progress,
                                prompts=prompts, extras=extras, what=what)
    from .capture import capture_batches
    facts = {key: header.get(key) for key in HEADER_FIELDS}
    agree(f"capture into {out}", dict(facts, batch_size=batch_size, overwrite=overwrite,
                                      aggregates=list(aggregates)),
          hint="the same model, prompts and settings on every rank: check that the prompt file "
               "and the model are the same on every node")
    store, todo = _open_on_every_rank(out, header, overwrite, prompts)
    mine = todo[rank()::world_size()]

    def rows(ids) -> int:
        return sum(b - a for a, b in (store.shard_range(i) for i in ids))

    bar = GlobalProgress(n, n - rows(todo), rows(todo), rows(mine), desc=f"capture {what}",
                         unit=what.rstrip("s"), enabled=progress)
    error = None
    try:
        if mine:
            sink = ShardSink(store, shard_ids=mine, part=f"rank{rank()}", extras=extras,
                             batch_size=batch_size)
            capture_batches(model, n, make_batch, aggregates, _CountingSink(sink, bar),
                            batch_size=batch_size, what=what, progress=False,
                            batches=store.batches(mine, batch_size))
    except Exception as err:  # reported to every rank below: no rank is left waiting
        error = err
    try:
        raise_if_any_failed(error, f"capture into {out}")
    finally:
        bar.close(finished=error is None)
    if is_main():
        try:
            store.merge_parts()
        except (ValueError, OSError) as err:
            error = err
    raise_if_any_failed(error, f"merging the manifest of {out}")
    return ShardedStore.read(out)


__all__ = ["head_block", "somp_heads_split", "capture_to_store_ranks", "PROBE_WAIT_S"]
