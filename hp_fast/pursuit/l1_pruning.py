"""Exact L1 selection with Cauchy-Schwarz pruning (docs/fast-pursuit.md sections 1, 3 and 7).

The L1 rule needs ``sum_i |F_j . z_i|`` for every atom ``j``, where ``F = D P M.T (v, r)`` is the
head's projected dictionary (section 3) and ``z_i`` its samples. Every atom's score is bounded by
``sum_i |F_j . z_i| <= sqrt(n s_j)`` with ``s_j = ||Z F_j||^2`` the L2 score that the pursuit keeps
anyway. The ``L1_SEEDS`` atoms with the best bounds are scored exactly first and set a best exact
score ``beta``; every atom whose bound reaches ``beta`` gets its exact score (gathered rows of
``F``, in chunks, never a ``(v, n)`` matrix); all others cannot win, so the answer is the full
scan's. ``L1_MARGIN`` widens the bound to cover the fp32 drift of ``s_j``.
"""
from __future__ import annotations

import math

import torch

from .numerics import PursuitStats, pick

L1_MARGIN = 1e-4        # relative slack on the Cauchy-Schwarz bound (covers fp32 drift of s_j)
L1_SEEDS = 8            # exact L1 scores computed first, per head, to set the pruning threshold
L1_GROUP = 8            # heads scored together in the pruned L1 step (sorted by candidate count)


def l1_margin(s: torch.Tensor) -> torch.Tensor:
    """(B, 1) absolute slack added to the L2 scores s (B, v) before bounding."""
    return L1_MARGIN * s.max(dim=1, keepdim=True).values.clamp_min(0)


def l1_exact_scores(F, inv_norm, idx, Z, chunk_bytes, heads=None):
    """Exact L1 scores (b, m) of atoms idx (b, m) per head from F (B, v, r) and Z (B, n, r):
    sum_i |F_j . z_i|, times inv_norm[j] (v,) when given. ``heads`` (b,) names the heads (rows
    of F and Z) that idx's rows belong to; all B heads by default."""
    b, m = idx.shape
    n, r = Z.shape[1], Z.shape[2]
    if heads is None:
        heads = torch.arange(F.shape[0], device=F.device)
    out = torch.empty(b, m, dtype=F.dtype, device=F.device)
    mc = max(16, chunk_bytes // max(1, b * (n + r) * F.element_size()))
    ZT = Z[heads].transpose(1, 2)  # (b, r, n)
    rows = heads[:, None]
    for c0 in range(0, m, mc):
        c1 = min(m, c0 + mc)
        ii = idx[:, c0:c1]
        sc = torch.bmm(F[rows, ii], ZT).abs_().sum(dim=2)  # (b, mc): sum over samples of |corr|
        if inv_norm is not None:
            sc *= inv_norm[ii]
        out[:, c0:c1] = sc
    return out


def l1_select(F, inv_sq, inv_norm, s, margin, invalid, ub, Z, n, rtol, chunk,
              stats: PursuitStats):
    """Pruned exact L1 argmax for every head of the batch (see module docstring).

    F (B, v, r), s (B, v) L2 scores, margin (B, 1) from ``l1_margin``, invalid (B, v) atoms
    never to choose, ub (B, v) scratch, Z (B, n, r); inv_sq / inv_norm (v,) the 1/||d_j||^2
    and 1/||d_j|| scales or None. Returns (atom (B,), whether one was found (B,))."""
    B, v = s.shape
    dev = s.device
    # squared upper bound n (s + margin) / ||d||^2 of each atom's L1 score
    torch.add(s, margin, out=ub)
    ub.clamp_(min=0).mul_(n)
    if inv_sq is not None:
        ub.mul_(inv_sq)
    ub.masked_fill_(invalid, -math.inf)
    ns = min(L1_SEEDS, v)
    seed_ub, seed = ub.topk(ns, dim=1)  # best bounds first
    seed_ok = torch.isfinite(seed_ub)
    ex = l1_exact_scores(F, inv_norm, seed, Z, chunk)
    ex.masked_fill_(~seed_ok, -math.inf)
    beta = ex.max(dim=1).values  # (B,) best exact score among the seeds
    thr = beta - rtol * beta.abs()  # anything that may tie with it must be looked at
    thr2 = torch.where(thr > 0, thr.square(), torch.zeros_like(thr))
    cand = ub >= thr2[:, None]  # invalid atoms hold -inf
    counts = cand.sum(dim=1)
    stats.l1_visited += int(counts.sum())
    stats.l1_total += B * v
    m = int(counts.max())
    ok = torch.isfinite(seed_ub[:, 0])
    if m == 0:
        return torch.zeros(B, dtype=torch.long, device=dev), ok & False
    bi, ji = cand.nonzero(as_tuple=True)  # sorted by head, then atom index
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(bi.numel(), device=dev) - starts[bi]
    idx = torch.zeros(B, m, dtype=torch.long, device=dev)
    idx[bi, pos] = ji
    filled = torch.zeros(B, m, dtype=torch.bool, device=dev)
    filled[bi, pos] = True
    # heads sorted by candidate count, scored L1_GROUP at a time up to the group's own count:
    # one (B, max count) product would pad every head to the busiest one
    ex = torch.full((B, m), -math.inf, dtype=s.dtype, device=dev)
    order = torch.argsort(counts, descending=True)
    for g0 in range(0, B, L1_GROUP):
        hs = order[g0:g0 + L1_GROUP]
        mg = int(counts[hs[0]])
        if mg == 0:
            break
        ex[hs, :mg] = l1_exact_scores(F, inv_norm, idx[hs, :mg], Z, chunk, heads=hs)
    ex.masked_fill_(~filled, -math.inf)
    j, ok2 = pick(ex, rtol)  # lowest atom index among the near-best (rows are sorted)
    return idx[torch.arange(B, device=dev), j], ok & ok2
