"""Bounded dictionary-space pursuit: exact SOMP that scores few atoms exactly (fast-pursuit.md 8).

The dense loop (``torch_backend``) keeps every atom's exact L2 score, which costs the start-up
product ``D @ (M.T L)`` (``2 v d rr`` per head) and two dictionary columns per step. Here each
head keeps, per atom, only an upper bound on its score (``bounds``: ``R`` scaled coordinates
``yt`` along the head's top singular directions and ``o = ||P d_j||^2``), started by
``D @ U_R`` (``2 v d R``) and updated from ONE column ``a = D q`` per step (``yt -= a (.)``,
``o -= a^2``). Each step:

1. bound every atom's selection score (``score_bounds``; l1: ``n s / ||d||^2`` squared, by
   Cauchy-Schwarz, section 7); atoms near the span (``FRAGILE``) get ``+inf``: always exact;
2. score exactly the ``SEEDS`` atoms with the best bounds (from their rows: ``P d_j`` by
   Gram-Schmidt against ``Q``, then ``M P d_j``); the best of them is ``beta``;
3. every atom whose bound reaches ``beta`` less the tie tolerance is scored exactly; the others
   cannot be within ``TIE_RTOL`` of the best, so the pick (lowest index among the near-best)
   is the full scan's;
4. adaptivity: a head whose bound admits more than ``REFINE_FRAC`` of the vocabulary gets more
   directions (``R`` doubled, one product ``D @ (P U_new)``); one that still admits more than
   ``FALLBACK_FRAC`` (or ``HOPELESS_FRAC`` at once: a flat spectrum) is handed back ``failed``
   and the driver reruns it with the dense loop, so every head's answer is exact.

Exact scores come from the rows, so the fp32 drift of ``yt`` and ``o`` only loosens the bound;
the margin ``drift_eps`` covers it. ``SPAN_TOL`` retirement happens when an atom's exact
``o`` is computed (atoms near the span always are). ``stats`` counts the atoms scored exactly.
"""
from __future__ import annotations

import math

import torch

from .bounds import (BOUND_R, BOUND_R_MAX, Directions, drift_eps, grow_directions,
                     make_directions, set_terms)
from .numerics import FRAGILE, TIE_RTOL, PursuitStats, append_support, gram_factor
from .result import SPAN_TOL

SEEDS = 4             # atoms with the best bounds scored exactly first, per head and step
REFINE_FRAC = 0.002   # a step admitting more than this fraction of v doubles the head's R
FALLBACK_FRAC = 0.05  # more than this with R at its cap: the head is rerun by the dense loop
HOPELESS_FRAC = 0.25  # more than this: the bound is useless for the head (flat spectrum)
MIN_COUNT = 64        # absolute floor of the three thresholds above (small dictionaries)
EXACT_HEADS = 64      # heads scored together in one exact-score pass


def bounded_batch_size(v: int, n: int, d: int, r: int, k: int, memory: int) -> int:
    """Heads per batch so the per-step state (yt (R, v), o, bounds, one column, masks, and Q)
    fits ``memory`` bytes."""
    per_head = 4 * v * (BOUND_R + 6) + 4 * (k * d + 2 * r * d + n * r + k * k)
    return max(1, int(memory // per_head))


def start_up(D, dirs: Directions, chunk_bytes: int) -> torch.Tensor:
    """yt (B, Rc, v) = sqrt(c) * (D @ U) per head, in vocabulary chunks of one product."""
    B, d, Rc = dirs.U.shape
    v = D.shape[0]
    Ucat = (dirs.U * dirs.sqrt_c[:, None, :]).permute(1, 0, 2).reshape(d, B * Rc)
    yt = torch.empty(B, Rc, v, dtype=D.dtype, device=D.device)
    vc = max(64, chunk_bytes // max(1, B * Rc * D.element_size()))
    for c0 in range(0, v, vc):
        c1 = min(v, c0 + vc)
        yt[:, :, c0:c1] = (D[c0:c1] @ Ucat).view(c1 - c0, B, Rc).permute(1, 2, 0)
    return yt


class Batch:
    """State of one batch of heads: the inputs in head form, the support, and the bounds."""

    def __init__(self, Z, M, D, atom_sq, k, criterion, normalize, memory):
        B, n, r = Z.shape
        v, d = D.shape
        dt, dev = D.dtype, D.device
        self.Z, self.M, self.D, self.criterion, self.n = Z, M, D, criterion, n
        self.MT = M.transpose(1, 2)  # (B, d, r) view
        self.G = Z.transpose(1, 2) @ Z  # (B, r, r)
        self.total = (self.G * (M @ M.transpose(1, 2))).sum(dim=(1, 2))  # ||Z M||_F^2
        self.L = gram_factor(Z, self.G)  # (B, r, rr)
        self.chunk = max(1 << 24, memory // 8)
        self.rtol = TIE_RTOL[dt]
        self.atom_sq, self.atom_norm = atom_sq, atom_sq.sqrt()
        self.tol, self.frag = SPAN_TOL * atom_sq, FRAGILE * atom_sq
        self.inv_sq = None
        if normalize and criterion != "ormp":
            self.inv_sq = torch.where(atom_sq > 0, 1.0 / atom_sq, torch.zeros_like(atom_sq))
        self.inv_norm = self.inv_sq.sqrt() if (self.inv_sq is not None and criterion == "l1") \
            else None
        self.dirs = make_directions(M, self.L, BOUND_R)
        self.yt = start_up(D, self.dirs, self.chunk)  # (B, Rc, v)
        self.o = atom_sq.expand(B, v).clone()  # (B, v) ||P d_j||^2; NaN: never to choose
        self.o[:, atom_sq <= 0] = math.nan
        self.Q = torch.zeros(B, k, d, dtype=dt, device=dev)
        self.T = torch.zeros(B, k, k, dtype=dt, device=dev)
        self.t = 0
        self.eps = drift_eps(dt, d, 0)

    # ---------------------------------------------------------------- bounds
    def bounds(self, heads=None) -> torch.Tensor:
        """(b, v) upper bounds of the selection score (l1: of its square); -inf for atoms never
        to choose, +inf for atoms near the span (always scored exactly)."""
        sl = slice(None) if heads is None else heads
        yt, o, dirs = self.yt[sl], self.o[sl], self.dirs
        eps = self.eps
        ub = torch.linalg.vector_norm(yt, dim=1)  # (b, v) = ||sqrt(c) y||
        ub.addcmul_(dirs.sqrt_csum[sl][:, None], self.atom_norm[None, :], value=eps)
        ub.square_()
        ub.addcmul_(dirs.tau[sl][:, None], torch.add(o, self.atom_sq, alpha=eps))
        if self.criterion == "ormp":
            ub.div_(torch.add(o, self.atom_sq, alpha=-eps).clamp_min_(torch.finfo(o.dtype).tiny))
        elif self.inv_sq is not None:
            ub.mul_(self.inv_sq)
        if self.criterion == "l1":
            ub.mul_(self.n)
        ub.masked_fill_(o.isnan(), -math.inf)
        ub.masked_fill_(o < self.frag, math.inf)
        return ub

    def refine(self, heads, stats: PursuitStats) -> None:
        """Double the directions of ``heads`` (capped at BOUND_R_MAX and the rank)."""
        dirs = self.dirs
        for R0 in torch.unique(dirs.R[heads]).tolist():
            h = heads[dirs.R[heads] == R0]
            R0, new = grow_directions(dirs, self.M, self.L, h, min(max(2 * R0, BOUND_R),
                                                                     BOUND_R_MAX))
            m = new.shape[2]
            if m == 0:
                continue
            if self.yt.shape[1] < dirs.U.shape[2]:
                pad = dirs.U.shape[2] - self.yt.shape[1]
                self.yt = torch.cat([self.yt, self.yt.new_zeros(self.yt.shape[0], pad,
                                                                self.yt.shape[2])], dim=1)
            old = set_terms(dirs, self.M, self.L, h)  # sqrt(c) before, (b, Rc)
            ratio = dirs.sqrt_c[h, :R0] / old[:, :R0].clamp_min(torch.finfo(old.dtype).tiny)
            self.yt[h, :R0] = self.yt[h, :R0] * ratio[:, :, None]
            Qt = self.Q[h, :self.t]  # (b, t, d)
            PU = new - torch.bmm(Qt.transpose(1, 2), torch.bmm(Qt, new))  # (b, d, m) = P U_new
            PU = PU * dirs.sqrt_c[h, R0:R0 + m][:, None, :]
            b, d = PU.shape[0], PU.shape[1]
            Ucat = PU.permute(1, 0, 2).reshape(d, b * m)
            v = self.D.shape[0]
            vc = max(64, self.chunk // max(1, b * m * self.D.element_size()))
            for c0 in range(0, v, vc):
                c1 = min(v, c0 + vc)
                Y = (self.D[c0:c1] @ Ucat).view(c1 - c0, b, m).permute(1, 2, 0)
                self.yt[h, R0:R0 + m, c0:c1] = Y
            stats.bounded_refined += h.numel()

    # ---------------------------------------------------------------- exact scores
    def exact(self, idx, heads) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact scores (b, m) and exact o (b, m) of atoms idx (b, m) of ``heads`` (b,), from
        their rows: x = P d_j (Gram-Schmidt twice), F = M x; retired atoms score -inf."""
        b, m = idx.shape
        t, d = self.t, self.D.shape[1]
        n, r = self.n, self.M.shape[1]
        Qh = self.Q[heads, :t]  # (b, t, d)
        MTh = self.MT[heads]  # (b, d, r)
        side = self.Z[heads].transpose(1, 2) if self.criterion == "l1" else self.L[heads]
        out = torch.empty(b, m, dtype=self.D.dtype, device=self.D.device)
        orth = torch.empty_like(out)
        mc = max(1, self.chunk // max(1, b * (d + t + r + n) * self.D.element_size()))
        for c0 in range(0, m, mc):
            ii = idx[:, c0:c0 + mc]
            X = self.D[ii]  # (b, mc, d)
            for _ in range(2 if t else 0):
                X = X - torch.bmm(torch.bmm(X, Qh.transpose(1, 2)), Qh)
            o = X.square().sum(dim=2)
            F = torch.bmm(X, MTh)  # (b, mc, r) rows of D P M.T
            if self.criterion == "l1":
                sc = torch.bmm(F, side).abs_().sum(dim=2)  # sum_i |F_j . z_i|
                if self.inv_norm is not None:
                    sc *= self.inv_norm[ii]
            else:
                sc = torch.bmm(F, side).square_().sum(dim=2)  # ||Z M P d_j||^2
                if self.criterion == "ormp":
                    sc = sc / o.clamp_min(torch.finfo(o.dtype).tiny)
                elif self.inv_sq is not None:
                    sc *= self.inv_sq[ii]
            sc.masked_fill_(o <= self.tol[ii], -math.inf)
            out[:, c0:c0 + mc] = sc
            orth[:, c0:c0 + mc] = o
        return out, orth

    def exact_sets(self, idx, valid) -> torch.Tensor:
        """Exact scores (B, m) of idx (B, m) where valid, -inf elsewhere; heads sorted by count
        and scored EXACT_HEADS at a time up to their group's largest count. Atoms found inside
        the span are retired (o NaN); the others' o is refreshed with the exact value."""
        B, m = idx.shape
        ex = torch.full((B, m), -math.inf, dtype=self.D.dtype, device=self.D.device)
        counts = valid.sum(dim=1)
        order = torch.argsort(counts, descending=True)
        cnt = counts[order].tolist()
        for g0 in range(0, B, EXACT_HEADS):
            mg = cnt[g0]
            if mg == 0:
                break
            hs = order[g0:g0 + EXACT_HEADS]
            ii = idx[hs, :mg]
            ok = valid[hs, :mg]
            sc, o = self.exact(ii, hs)
            sc.masked_fill_(~ok, -math.inf)
            ex[hs, :mg] = sc
            rows = hs[:, None].expand_as(ii)[ok]
            cols = ii[ok]
            o = o[ok]
            self.o[rows, cols] = torch.where(o <= self.tol[cols], torch.full_like(o, math.nan), o)
        return ex


def ragged(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (B, v) -> idx (B, m) atom indices of each row's True entries (ascending, padded
    with 0) and valid (B, m); m = the largest count."""
    B = mask.shape[0]
    counts = mask.sum(dim=1)
    m = int(counts.max()) if B else 0
    bi, ji = mask.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(bi.numel(), device=mask.device) - starts[bi]
    idx = torch.zeros(B, m, dtype=torch.long, device=mask.device)
    idx[bi, pos] = ji
    valid = torch.zeros(B, m, dtype=torch.bool, device=mask.device)
    valid[bi, pos] = True
    return idx, valid


def pick_lowest(idx, ex, rtol) -> tuple[torch.Tensor, torch.Tensor]:
    """Among entries ex (B, m) of atoms idx (B, m) within rtol of the row's best, the lowest
    atom index (B,), and whether the row has a finite best (B,)."""
    best = ex.max(dim=1, keepdim=True).values
    ok = torch.isfinite(best[:, 0])
    near = ex >= best - rtol * best.abs()
    big = torch.iinfo(idx.dtype).max
    return torch.where(near, idx, torch.full_like(idx, big)).min(dim=1).values, ok


def select(st: Batch, alive, stats: PursuitStats):
    """One exact selection for every head: (atom (B,), found (B,), failed (B,))."""
    B, v = st.o.shape
    ub = st.bounds()
    S = min(SEEDS, v)
    sv, si = ub.topk(S, dim=1)  # (B, S) best bounds first
    ex_s = st.exact_sets(si, (sv > -math.inf) & alive[:, None])
    beta = ex_s.max(dim=1).values
    thr = beta - st.rtol * beta.abs()
    if st.criterion == "l1":  # bounds are of the squared L1 score
        thr = torch.where(thr > 0, thr.square(), torch.zeros_like(thr))

    def admitted(ub_rows, rows):
        c = (ub_rows >= thr[rows, None]) & (ub_rows > -math.inf)
        c.scatter_(1, si[rows], False)  # the seeds are scored already
        return c & alive[rows, None]

    allh = torch.arange(B, device=ub.device)
    cand = admitted(ub, allh)
    counts = cand.sum(dim=1)
    lim = lambda frac: max(MIN_COUNT, frac * v)  # noqa: E731
    cap = torch.clamp(st.dirs.rank, max=BOUND_R_MAX)
    for _ in range(3):  # refine heads whose bound admits too much (not the hopeless ones)
        grow = (counts > lim(REFINE_FRAC)) & (counts <= lim(HOPELESS_FRAC)) & (st.dirs.R < cap)
        if not bool(grow.any()):
            break
        hb = grow.nonzero()[:, 0]
        st.refine(hb, stats)
        cand[hb] = admitted(st.bounds(hb), hb)
        counts[hb] = cand[hb].sum(dim=1)
    failed = alive & ((counts > lim(HOPELESS_FRAC))
                      | ((counts > lim(FALLBACK_FRAC)) & (st.dirs.R >= cap)))
    if bool(failed.any()):
        cand[failed] = False
    idx, valid = ragged(cand)
    ex_c = st.exact_sets(idx, valid)
    n_exact = int(((sv > -math.inf) & alive[:, None]).sum()) + int(valid.sum())
    stats.bounded_exact += n_exact
    stats.bounded_total += int(alive.sum()) * v
    stats.bounded_per_step.append(n_exact / max(1, int(alive.sum()) * v))
    p, ok = pick_lowest(torch.cat([si, idx], dim=1), torch.cat([ex_s, ex_c], dim=1), st.rtol)
    return p, ok & alive & ~failed, failed


def pursue_bounded(Z, M, D, atom_sq, k, criterion, normalize, stats: PursuitStats, memory,
                   bar=None):
    """One batch of heads. Z (B, n, r), M (B, r, d), D (v, d), all in the compute dtype.

    Returns support (B, k), evr (B, k), Q (B, k, d), T (B, k, k) and failed (B,) bool: heads
    whose bound was too loose, to be rerun by the dense loop (their rows are not valid)."""
    B = Z.shape[0]
    v, d = D.shape
    dev = D.device
    st = Batch(Z, M, D, atom_sq, k, criterion, normalize, memory)
    support = torch.full((B, k), -1, dtype=torch.long, device=dev)
    evr = torch.zeros(B, k, dtype=D.dtype, device=dev)
    explained = torch.zeros(B, dtype=D.dtype, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    failed = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    vc = max(256, st.chunk // max(1, B * (st.yt.shape[1] + 2) * D.element_size()))
    for t in range(k):
        st.t, st.eps = t, drift_eps(D.dtype, d, t)
        p, ok, fail = select(st, alive, stats)
        failed |= fail
        alive = ok
        if not bool(ok.any()):
            evr[:, t:] = evr[:, t - 1:t] if t > 0 else 0.0
            break
        q, _, _, _ = append_support(D, p, ok, st.Q, st.T, support, st.MT, st.G, explained,
                                    st.total, evr, t)
        if bar is not None:
            bar.update(B)
        if t == k - 1:
            break
        # rank-one updates of the bounds' state from one column a = D q per head
        wt = torch.bmm(q[:, None, :], st.dirs.U)[:, 0] * st.dirs.sqrt_c  # (B, Rc)
        Rc = wt.shape[1]
        for c0 in range(0, v, vc):
            c1 = min(v, c0 + vc)
            a = q @ D[c0:c1].T  # (B, vc)
            st.o[:, c0:c1].addcmul_(a, a, value=-1.0)
            st.yt[:, :Rc, c0:c1].addcmul_(wt[:, :, None], a[:, None, :], value=-1.0)
        st.o[rows[ok], p[ok]] = math.nan  # the chosen atom
    stats.bounded_fallback += int(failed.sum())
    return support, evr, st.Q, st.T, failed
