"""torch.distributed helpers for runs that outgrow one process (launched with ``torchrun``).

hp_fast never needs a process group; when one is initialized (by ``torchrun -m hp_fast ...``,
``hp_fast.distributed_launch``, or by a user's own script) the heavy calls split their work over
the ranks (``hp_fast.distributed_work``):

* ``capture(..., out=DIR)`` (text and images): the store's missing shards are dealt out
  round-robin, every rank writes its own shards into the one store, rank 0 merges the
  manifest. ``DIR`` must be one folder that every rank sees (a shared filesystem on several
  nodes); this is checked with a probe file before any forward pass.
* ``rank_heads``, ``describe_heads``, ``vocabulary_pursuit``: every SOMP over a batch of heads
  is split into contiguous blocks of heads, one per rank, and the results are gathered, so
  EVERY rank returns the full result (the same one a single process gives: the pursuit of a
  head does not depend on the other heads of its batch; the random baseline sets are drawn
  from ``seed`` alone, the same on every rank).

These calls are collective: every rank must make them, in the same order, with the same
arguments (checked: a mismatch raises the same ValueError on every rank before any heavy
work). Inside ``no_split()`` each rank works alone on its own inputs.

Helpers here: ``active``, ``rank``, ``world_size``, ``is_main``, ``barrier``, ``splitting``,
``no_split``, ``all_gather_objects``, ``gather_to_main``, ``all_gather_rows``, ``agree``,
``raise_if_any_failed``, ``main_print`` and ``GlobalProgress`` (rank 0's bar over the whole
job's work). Outside a process group they all act as for one process (rank 0 of 1).
Usage, guarantees and limits: docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

_STATE = {"split": True}


def active() -> bool:
    """True when a torch.distributed process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active() and world_size() > 1:
        dist.barrier()


def splitting() -> bool:
    """True when hp_fast's heavy calls split their work over the ranks (a group of >= 2
    processes, outside ``no_split``)."""
    return _STATE["split"] and active() and world_size() > 1


@contextlib.contextmanager
def no_split():
    """Within this block every rank works alone (no collective calls): for per-rank work such
    as each rank ranking its own concept."""
    old = _STATE["split"]
    _STATE["split"] = False
    try:
        yield
    finally:
        _STATE["split"] = old


def comm_device() -> torch.device:
    """Where tensors travel through the collectives: the current GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects only)."""
    if not active() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj) -> list | None:
    """[obj of every rank] on rank 0, None elsewhere."""
    if not active() or world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows ``t (b_r, ...)`` concatenated in rank order, on every rank (the b_r may
    differ; dtype and trailing shape must agree). Returned on ``t``'s device."""
    if not active() or world_size() == 1:
        return t
    dev = comm_device()
    sizes = torch.tensor([t.shape[0]], device=dev)
    every = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(every, sizes)
    counts = [int(c) for c in every]
    if max(counts) == 0:
        return t
    pad = torch.zeros(max(counts), *t.shape[1:], dtype=t.dtype, device=dev)  # (max b, ...)
    pad[:t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def probe_sum(t: torch.Tensor) -> float:
    """A cheap float64 fingerprint of a tensor (sum of about 4096 evenly strided entries, no
    copy of the tensor), for ``agree``."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    return float(flat[::max(1, flat.numel() // 4096)].double().sum())


def _same(a, b, rtol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isfinite(a) and abs(a - b) <= rtol * max(1.0, abs(a), abs(b)))
    return a == b


def agree(what: str, facts: dict, *, rtol: float = 1e-5, hint: str = "") -> None:
    """Check that every rank passes the same ``facts`` ({name: value}; floats within ``rtol``);
    otherwise the same ValueError on every rank, naming the first rank and field that differ."""
    if not splitting():
        return
    every = all_gather_objects(facts)
    for r, other in enumerate(every[1:], start=1):
        keys = sorted(set(every[0]) | set(other), key=str)
        diff = [(k, every[0].get(k), other.get(k)) for k in keys
                if not _same(every[0].get(k), other.get(k), rtol)]
        if diff:
            shown = "; ".join(f"{k}: {b!r} there, {a!r} on rank 0" for k, a, b in diff[:4])
            raise ValueError(f"{what}: rank {r} was given other inputs than rank 0 ({shown}"
                             f"{'; ...' if len(diff) > 4 else ''}); every rank must make this "
                             "call with the same inputs" + (f" ({hint})" if hint else "") +
                             "; use hp_fast.distributed.no_split() for per-rank work")


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: every rank reports whether its part of ``what`` failed; if any did, every
    rank raises (the failed rank its own error, the others a ValueError naming it)."""
    msg = None if error is None else f"{type(error).__name__}: {error}"
    failed = [(r, m) for r, m in enumerate(all_gather_objects(msg)) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, m = failed[0]
    raise ValueError(f"{what} failed on rank {r} ({m}); nothing more was done on this rank")


def main_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


class GlobalProgress:
    """One tqdm bar, on rank 0 only, over the work of ALL ranks.

    Rank 0 cannot see the others' progress without a collective, and a collective inside the
    loop would make every rank wait for the slowest at each step (and ranks may have different
    numbers of batches). The ranks work at about the same rate on equal shares, so rank 0's
    bar advances by its own work times ``global_todo / own_todo`` (about ``world_size``): it
    reaches the total when rank 0 finishes, and ``close`` sets the exact total once all
    ranks are done. Costs nothing on the other ranks.

    total: the whole job (e.g. prompts); done: already done before this run (a resumed store);
    global_todo: left for all ranks; own_todo: left for this rank.
    """

    def __init__(self, total: int, done: int, global_todo: int, own_todo: int, *, desc: str,
                 unit: str, enabled: bool = True):
        self.scale = global_todo / own_todo if own_todo else 0.0
        self.start, self.own, self.total = done, 0, total
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit,
                        disable=not (enabled and is_main()))

    def update(self, own: int) -> None:
        """This rank finished ``own`` more units."""
        self.own += own
        target = min(self.total, self.start + round(self.own * self.scale))
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)

    def close(self, finished: bool = True) -> None:
        if finished and self.bar.n < self.total:
            self.bar.update(self.total - self.bar.n)
        self.bar.close()


__all__ = ["active", "rank", "world_size", "is_main", "barrier", "splitting", "no_split",
           "comm_device", "all_gather_objects", "gather_to_main", "all_gather_rows", "probe_sum",
           "agree", "raise_if_any_failed", "main_print", "GlobalProgress"]
