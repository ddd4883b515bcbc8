"""Bounded dictionary-space pursuit: exact SOMP that scores few atoms exactly (fast-pursuit.md 8).

The dense loop (``torch_backend._pursue``) keeps every atom's exact L2 score, which costs the
start-up product ``D @ (M.T L)`` (``2 v d rr`` per head) and two dictionary columns per step.
Here each head keeps, per atom, only what an upper bound on its score needs (``bounds``: ``R``
scaled coordinates ``yt`` along the head's top singular directions, and ``o = ||P d_j||^2``),
started by ``D @ U_R`` (``2 v d R``) and updated from ONE column ``a = D q`` per step
(``yt -= a (.)``, ``o -= a^2``). Each step, for every head of the batch:

1. seeds: the atoms that scored best at the previous step (the best bounds at the first step)
   are scored exactly from their rows (``P d_j`` by Gram-Schmidt against ``Q``, then
   ``M P d_j``); the best of them is ``beta``;
2. one fused pass over the vocabulary (``Batch.scan``, chunks that stay in cache) applies the
   previous step's rank-one update, bounds every atom's score (l1: its square, by
   Cauchy-Schwarz ``sum_i |f.z_i| <= sqrt(n s)``, section 7) and keeps the atoms whose bound
   reaches ``beta`` less the tie tolerance; the bounds are never stored;
3. those atoms are scored exactly; every other atom's score is below ``beta (1 - TIE_RTOL)``, so
   the pick (lowest index among the scores within ``TIE_RTOL`` of the best) is the full scan's;
4. adaptivity: a head that admits more than ``REFINE_FRAC`` of the vocabulary first gets seeds
   from its best bounds, then more directions (``R`` doubled: one product ``D @ (P U_new)``);
   one that still admits more than ``FALLBACK_FRAC`` at the cap, or ``HOPELESS_FRAC`` at once
   (a flat spectrum), is returned ``failed`` and the driver reruns it with the dense loop.

Exact scores come from the rows, so the fp32 drift of ``yt`` and ``o`` only loosens the bound,
and the margin (``bounds.drift_eps``) covers it. ``SPAN_TOL`` retirement happens when an atom's
exact ``o`` is computed: an atom inside the span scores ~0, so it is computed (and retired)
whenever it could matter; ormp bounds of atoms with tiny ``o`` are huge, so they always are.
``stats`` counts the atoms scored exactly per step.
"""
from __future__ import annotations

import math

import torch

from .bounds import (BOUND_R, BOUND_R_MAX, Directions, drift_eps, grow_directions,
                     make_directions, set_terms)
from .numerics import TIE_RTOL, PursuitStats, append_support, gram_factor
from .result import SPAN_TOL
from .small_dictionary import one_thread

SEEDS = 4             # atoms scored exactly first, per head and step, to set the threshold
REFINE_FRAC = 0.002   # a step admitting more than this fraction of v reseeds, then doubles R
FALLBACK_FRAC = 0.05  # more than this with R at its cap: the head is rerun by the dense loop
HOPELESS_FRAC = 0.25  # more than this: the bound is useless for the head (flat spectrum)
MIN_COUNT = 64        # absolute floor of the three thresholds above (small dictionaries)
EXACT_HEADS = 64      # heads scored together in one exact-score pass
ONE_PASS_M = 32       # up to this many atoms per head, every head is scored in one pass
THETA = 1.0 / 32      # split of the drift margin (``Batch.coefficients``)
VOCAB_CHUNK = 4096    # atoms per chunk of the fused pass (its state stays in cache)
LAZY = 4              # steps between applications of the pending rank-one updates to yt


def row_norms(yt, out=None) -> torch.Tensor:
    """||yt[:, :, j]|| over the direction axis: yt (b, Rc, vc) -> (b, vc) (into ``out``)."""
    out = torch.mul(yt[:, 0], yt[:, 0], out=out)
    for r in range(1, yt.shape[1]):
        out.addcmul_(yt[:, r], yt[:, r])
    return out.sqrt_()


def bounded_batch_size(v: int, n: int, d: int, r: int, k: int, memory: int) -> int:
    """Heads per batch so the state (yt (R, v), o, and Q, G, M-sized pieces) fits ``memory``."""
    per_head = 4 * v * (BOUND_R + LAZY + 3) + 4 * (k * d + 2 * r * d + n * r + k * k)
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
        self.atom_sq = atom_sq
        self.tol = SPAN_TOL * atom_sq
        self.inv_sq = None
        if normalize and criterion != "ormp":
            self.inv_sq = torch.where(atom_sq > 0, 1.0 / atom_sq, torch.zeros_like(atom_sq))
        self.inv_norm = self.inv_sq.sqrt() if (self.inv_sq is not None and criterion == "l1") \
            else None
        with one_thread(dev):  # small float64 eigenproblems: one thread is faster
            self.dirs = make_directions(M, self.L, BOUND_R)
        self.yt = start_up(D, self.dirs, self.chunk)  # (B, Rc, v)
        self.rho = torch.empty(B, v, dtype=dt, device=dev)  # (B, v) upper bound of ||yt_j||
        for c0 in range(0, v, VOCAB_CHUNK):
            c = slice(c0, min(v, c0 + VOCAB_CHUNK))
            row_norms(self.yt[:, :, c], self.rho[:, c])
        # rank-one updates not yet applied to yt: columns a = D q (B, LAZY, v), rows wt (B, LAZY,
        # Rc); until they are, rho grows by |a| ||wt|| per step (triangle inequality)
        self.A = torch.empty(B, LAZY, v, dtype=dt, device=dev)
        self.Wp = torch.zeros(B, LAZY, self.yt.shape[1], dtype=dt, device=dev)
        self.pending = 0
        self.o = atom_sq.expand(B, v).clone()  # (B, v) ||P d_j||^2; NaN: never to choose
        self.o[:, atom_sq <= 0] = math.nan
        self.Q = torch.zeros(B, k, d, dtype=dt, device=dev)
        self.T = torch.zeros(B, k, k, dtype=dt, device=dev)
        self.t = 0
        self.eps = drift_eps(dt, d, 0)
        self.seeds = None  # (B, S) atoms to score first at the next step, seed_ok (B, S)
        self.seed_ok = None

    # ---------------------------------------------------------------- bounds
    def coefficients(self, heads=None):
        """(alpha, tau (b, 1), kappa (b, 1)) of ``ub = alpha rho^2 + tau o + kappa ||d||^2``
        (times n for l1): ``(sqrt(x) + m)^2 <= (1 + THETA) x + (1 + 1/THETA) m^2`` turns the
        drift margin ``m = eps ||d|| sqrt(sum c)`` into terms without a square root."""
        sl = slice(None) if heads is None else heads
        scale = float(self.n) if self.criterion == "l1" else 1.0
        tau = self.dirs.tau[sl] * scale
        csum = self.dirs.sqrt_csum[sl].square() * scale
        kappa = (1.0 + 1.0 / THETA) * self.eps ** 2 * csum + tau * self.eps
        return (1.0 + THETA) * scale, tau[:, None], kappa[:, None]

    def fill_bounds(self, out, rho, o, cols, coef) -> None:
        """Bounds (b, vc) into ``out`` from rho, o (b, vc) of atoms ``cols`` (a slice): upper
        bounds of the selection score (l1: of its square); -inf for atoms never to choose (o
        NaN). o may be stale for l2/l1 (it only falls, so the bound stays one)."""
        alpha, tau, kappa = coef
        torch.mul(rho, rho, out=out)
        out.mul_(alpha)
        out.addcmul_(tau, o)
        sq = self.atom_sq[cols]
        out.addcmul_(kappa, sq[None, :])
        if self.criterion == "ormp":
            out.div_(torch.add(o, sq, alpha=-self.eps).clamp_min_(torch.finfo(o.dtype).tiny))
        elif self.inv_sq is not None:
            out.mul_(self.inv_sq[cols])
        out.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)

    def bounds(self, heads) -> torch.Tensor:
        """(b, v) bounds of ``heads`` (b,) from the current state."""
        rho, o = self.rho[heads], self.o[heads]
        ub = torch.empty_like(o)
        coef = self.coefficients(heads)
        v = o.shape[1]
        for c0 in range(0, v, VOCAB_CHUNK):
            c = slice(c0, min(v, c0 + VOCAB_CHUNK))
            self.fill_bounds(ub[:, c], rho[:, c], o[:, c], c, coef)
        return ub

    def catch_up_chunk(self, c) -> None:
        """Apply the pending rank-one updates to yt[:, :, c] and set rho exact there."""
        p = self.pending
        yt = self.yt[:, :, c]
        if p:
            yt.baddbmm_(self.Wp[:, :p].transpose(1, 2), self.A[:, :p, c], alpha=-1.0)
        row_norms(yt, self.rho[:, c])

    def catch_up(self) -> None:
        """Apply every pending update (before the directions change)."""
        if self.pending:
            v = self.o.shape[1]
            for c0 in range(0, v, VOCAB_CHUNK):
                self.catch_up_chunk(slice(c0, min(v, c0 + VOCAB_CHUNK)))
            self.pending = 0

    def scan(self, q, thr) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused pass, chunk by chunk (the chunk's state stays in cache): the column
        a = D q of the new support rows q (B, d) (None: none) per head, stored as a pending
        update of yt (applied every LAZY steps, when rho is made exact again) while rho grows by
        |a| ||wt||; o -= a^2 (ormp); the bounds, and the atoms whose bound reaches thr (B,)
        (bound units). Returns (head (m,), atom (m,)) pairs sorted by head, then atom."""
        B, v = self.o.shape
        coef = self.coefficients()
        if q is not None:
            wt = torch.bmm(q[:, None, :], self.dirs.U)[:, 0] * self.dirs.sqrt_c  # (B, Rc)
            wn = wt.norm(dim=1, keepdim=True)  # (B, 1)
            catch = self.pending == LAZY
            slot = 0 if catch else self.pending
        out = torch.empty(B, min(v, VOCAB_CHUNK), dtype=self.D.dtype, device=self.D.device)
        bis, jis = [], []
        for c0 in range(0, v, VOCAB_CHUNK):
            c = slice(c0, min(v, c0 + VOCAB_CHUNK))
            o, rho = self.o[:, c], self.rho[:, c]
            if q is not None:
                if catch:
                    self.catch_up_chunk(c)
                a = q @ self.D[c].T  # (B, vc)
                self.A[:, slot, c] = a
                if self.criterion == "ormp":
                    o.addcmul_(a, a, value=-1.0)
                rho.addcmul_(a.abs_(), wn)
            ub = out[:, :o.shape[1]]
            self.fill_bounds(ub, rho, o, c, coef)
            bi, ji = (ub >= thr[:, None]).nonzero(as_tuple=True)
            bis.append(bi)
            jis.append(ji + c0)
        if q is not None:
            self.Wp[:, slot] = wt
            self.pending = slot + 1
        bi, ji = torch.cat(bis), torch.cat(jis)
        order = torch.argsort(bi * v + ji)
        return bi[order], ji[order]

    def threshold(self, beta, heads=None) -> torch.Tensor:
        """Bound-unit threshold (b,) for best exact scores beta (b,): beta less the tie
        tolerance (squared for l1)."""
        thr = beta - self.rtol * beta.abs()
        if self.criterion == "l1":
            thr = torch.where(thr > 0, thr.square(), torch.zeros_like(thr))
        return thr

    def refine(self, heads, stats: PursuitStats) -> None:
        """Double the directions of ``heads`` (capped at BOUND_R_MAX and the rank)."""
        dirs = self.dirs
        self.catch_up()
        for R0 in torch.unique(dirs.R[heads]).tolist():
            h = heads[dirs.R[heads] == R0]
            with one_thread(self.D.device):
                R0, new = grow_directions(dirs, self.M, self.L, h,
                                          min(max(2 * R0, BOUND_R), BOUND_R_MAX))
            m = new.shape[2]
            if m == 0:
                continue
            if self.yt.shape[1] < dirs.U.shape[2]:
                pad = dirs.U.shape[2] - self.yt.shape[1]
                self.yt = torch.cat([self.yt, self.yt.new_zeros(self.yt.shape[0], pad,
                                                                self.yt.shape[2])], dim=1)
                self.Wp = self.Wp.new_zeros(self.Wp.shape[0], LAZY, self.yt.shape[1])
            with one_thread(self.D.device):
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
                self.rho[h, c0:c1] = row_norms(self.yt[h, :, c0:c1])
            stats.bounded_refined += h.numel()

    # ---------------------------------------------------------------- exact scores
    def exact(self, idx, heads) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact scores (b, m), exact o (b, m) and exact ||yt_j|| (b, m) of atoms idx (b, m) of
        ``heads`` (b,) (None: all), from their rows: x = P d_j (Gram-Schmidt twice), F = M x;
        retired atoms score -inf."""
        b, m = idx.shape
        t, d = self.t, self.D.shape[1]
        n, r = self.n, self.M.shape[1]
        sel = slice(None) if heads is None else heads
        Qh = self.Q[sel, :t]  # (b, t, d)
        MTh = self.MT[sel]  # (b, d, r)
        Uh, ch = self.dirs.U[sel], self.dirs.sqrt_c[sel]
        side = self.Z[sel].transpose(1, 2) if self.criterion == "l1" else self.L[sel]
        out = torch.empty(b, m, dtype=self.D.dtype, device=self.D.device)
        orth = torch.empty_like(out)
        rn = torch.empty_like(out)  # exact ||yt_j||: tightens rho
        mc = max(1, self.chunk // max(1, b * (d + t + r + n) * self.D.element_size()))
        for c0 in range(0, m, mc):
            ii = idx[:, c0:c0 + mc]
            X = self.D[ii]  # (b, mc, d)
            for _ in range(2 if t else 0):
                X = X - torch.bmm(torch.bmm(X, Qh.transpose(1, 2)), Qh)
            o = X.square().sum(dim=2)
            crd = torch.bmm(X, Uh).mul_(ch[:, None, :])  # (b, mc, Rc) = sqrt(c) U.T P d_j
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
            rn[:, c0:c0 + mc] = crd.norm(dim=2)
        return out, orth, rn

    def exact_sets(self, idx, valid, heads=None, current=True) -> torch.Tensor:
        """Exact scores (b, m) of idx (b, m) (rows: ``heads`` (b,), all heads by default) where
        valid, -inf elsewhere. All heads go in one pass when m <= ONE_PASS_M (padding is cheaper
        than gathering each head's Q, M, Z); otherwise rows are sorted by count and scored
        EXACT_HEADS at a time up to their group's largest count.
        Atoms found inside the span are retired (o NaN); the others' o is set exact when the
        state is ``current`` (already updated for the last support row)."""
        b, m = idx.shape
        dev = self.D.device
        ex = torch.full((b, m), -math.inf, dtype=self.D.dtype, device=dev)
        counts = valid.sum(dim=1)
        rows_all = torch.arange(b, device=dev)
        if b == 0 or m == 0 or int(counts.max()) == 0:
            return ex
        if heads is None and m <= ONE_PASS_M:
            groups = [(None, m)]  # every head, in order: no gathered copies of Q, M, Z
        else:
            order = torch.argsort(counts, descending=True)
            cnt = counts[order].tolist()
            groups = [(order[g0:g0 + EXACT_HEADS], cnt[g0]) for g0 in range(0, b, EXACT_HEADS)
                      if cnt[g0] > 0]
        for rs, mg in groups:
            hs = None if rs is None else (rs if heads is None else heads[rs])
            rs = rows_all if rs is None else rs
            ii = idx[rs, :mg]
            ok = valid[rs, :mg]
            sc, o, rn = self.exact(ii, hs)
            sc.masked_fill_(~ok, -math.inf)
            ex[rs, :mg] = sc
            hrow = (rs if heads is None else heads[rs])[:, None].expand_as(ii)[ok]
            cols, o = ii[ok], o[ok]
            self.rho[hrow, cols] = rn[ok]  # exact now; later steps add to it
            fill = torch.full_like(o, math.nan)
            if current:
                self.o[hrow, cols] = torch.where(o <= self.tol[cols], fill, o)
            else:
                dead = o <= self.tol[cols]
                self.o[hrow[dead], cols[dead]] = fill[dead]
        return ex


def pairs_to_rows(bi, ji, B) -> tuple[torch.Tensor, torch.Tensor]:
    """(head, atom) pairs sorted by head -> idx (B, m) atom indices per head (padded with 0),
    valid (B, m); m = the largest count."""
    counts = torch.bincount(bi, minlength=B)
    m = int(counts.max()) if bi.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(bi.numel(), device=bi.device) - starts[bi]
    idx = torch.zeros(B, m, dtype=torch.long, device=bi.device)
    idx[bi, pos] = ji
    valid = torch.zeros(B, m, dtype=torch.bool, device=bi.device)
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


def drop_known(bi, ji, known) -> torch.Tensor:
    """Mask (m,) of the pairs whose atom is not in their head's row of known (B, S)."""
    if bi.numel() == 0:
        return torch.ones(0, dtype=torch.bool, device=bi.device)
    return ~(known[bi] == ji[:, None]).any(dim=1)


def select(st: Batch, q, alive, stats: PursuitStats):
    """One exact selection for every head, after the rank-one update by the previous step's
    rows q (B, d) (None at the first step): (atom (B,), found (B,), failed (B,))."""
    B, v = st.o.shape
    dev = st.o.device
    S = min(SEEDS, v)
    lim = lambda frac: max(MIN_COUNT, frac * v)  # noqa: E731
    if st.seeds is None:  # first step: the best bounds
        sv, st.seeds = st.bounds(torch.arange(B, device=dev)).topk(S, dim=1)
        st.seed_ok = sv > -math.inf
    seeds, sok = st.seeds, st.seed_ok & alive[:, None]
    ex_s = st.exact_sets(seeds, sok, current=q is None)  # before the fused update
    beta = ex_s.max(dim=1).values
    lacking = alive & ~torch.isfinite(beta)
    thr = torch.where(alive & ~lacking, st.threshold(beta), torch.full_like(beta, math.inf))
    bi, ji = st.scan(q, thr)
    known = torch.where(sok, seeds, torch.full_like(seeds, -1))  # seeds scored this step
    keep = drop_known(bi, ji, known) & alive[bi]
    bi, ji = bi[keep], ji[keep]
    counts = torch.bincount(bi, minlength=B)
    blocks = [(seeds, ex_s)]
    # heads without a usable seed, or admitting too much: seeds from their best bounds, then
    # more directions; the bounds of these few heads are recomputed in full
    redo = alive & (lacking | (counts > lim(REFINE_FRAC)))
    cap = torch.clamp(st.dirs.rank, max=BOUND_R_MAX)
    if bool(redo.any()):
        hb = redo.nonzero()[:, 0]
        st.catch_up()  # exact rho first: the lazy growth may be what admits too much
        ub = st.bounds(hb)
        sv, si = ub.topk(S, dim=1)
        ex2 = st.exact_sets(si, sv > -math.inf, heads=hb)
        beta[hb] = torch.maximum(beta[hb], ex2.max(dim=1).values)
        thr[hb] = st.threshold(beta[hb])
        seeds2 = torch.full_like(seeds, -1)
        ex2_all = torch.full_like(ex_s, -math.inf)
        seeds2[hb] = torch.where(sv > -math.inf, si, torch.full_like(si, -1))
        ex2_all[hb] = ex2
        blocks.append((seeds2.clamp_min(0), ex2_all))
        known = torch.cat([known, seeds2], dim=1)
        for _ in range(3):
            cb = (ub >= thr[hb, None]).nonzero(as_tuple=True)
            nbi, nji = hb[cb[0]], cb[1]
            keepn = drop_known(nbi, nji, known)
            nbi, nji = nbi[keepn], nji[keepn]
            counts[hb] = torch.bincount(nbi, minlength=B)[hb]
            grow = (counts[hb] > lim(REFINE_FRAC)) & (counts[hb] <= lim(HOPELESS_FRAC)) \
                & (st.dirs.R[hb] < cap[hb])
            if not bool(grow.any()):
                break
            st.refine(hb[grow], stats)
            ub = st.bounds(hb)
        mine = redo[bi]
        bi = torch.cat([bi[~mine], nbi])
        ji = torch.cat([ji[~mine], nji])
        order = torch.argsort(bi * v + ji)
        bi, ji = bi[order], ji[order]
    failed = alive & ((counts > lim(HOPELESS_FRAC))
                      | ((counts > lim(FALLBACK_FRAC)) & (st.dirs.R >= cap)))
    if bool(failed.any()):
        keep = ~failed[bi]
        bi, ji = bi[keep], ji[keep]
    idx, valid = pairs_to_rows(bi, ji, B)
    blocks.append((idx, st.exact_sets(idx, valid)))
    n_exact = sum(int((ex > -math.inf).sum()) for _, ex in blocks[:-1]) + int(valid.sum())
    live = int(alive.sum())
    stats.bounded_exact += n_exact
    stats.bounded_total += live * v
    stats.bounded_per_step.append(n_exact / max(1, live * v))
    all_idx = torch.cat([b[0] for b in blocks], dim=1)
    all_ex = torch.cat([b[1] for b in blocks], dim=1)
    p, ok = pick_lowest(all_idx, all_ex, st.rtol)
    # next step's seeds: this step's best exact scores, the chosen atom left out
    nxt = all_ex.masked_fill(all_idx == p[:, None], -math.inf)
    sv, pos = nxt.topk(min(S, nxt.shape[1]), dim=1)
    st.seeds, st.seed_ok = all_idx.gather(1, pos), sv > -math.inf
    return p, ok & alive & ~failed, failed


def pursue_bounded(Z, M, D, atom_sq, k, criterion, normalize, stats: PursuitStats, memory,
                   bar=None):
    """One batch of heads. Z (B, n, r), M (B, r, d), D (v, d), all in the compute dtype.

    Returns support (B, k), evr (B, k), Q (B, k, d), T (B, k, k) and failed (B,) bool: heads
    whose bound was too loose, to be rerun by the dense loop (their rows are not valid)."""
    B = Z.shape[0]
    d = D.shape[1]
    dev = D.device
    st = Batch(Z, M, D, atom_sq, k, criterion, normalize, memory)
    support = torch.full((B, k), -1, dtype=torch.long, device=dev)
    evr = torch.zeros(B, k, dtype=D.dtype, device=dev)
    explained = torch.zeros(B, dtype=D.dtype, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    failed = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    q = None
    for t in range(k):
        st.t, st.eps = t, drift_eps(D.dtype, d, t)
        p, ok, fail = select(st, q, alive, stats)
        failed |= fail
        alive = ok
        if not bool(ok.any()):
            evr[:, t:] = evr[:, t - 1:t] if t > 0 else 0.0
            break
        q, _, _, _ = append_support(D, p, ok, st.Q, st.T, support, st.MT, st.G, explained,
                                    st.total, evr, t)
        st.o[rows[ok], p[ok]] = math.nan  # the chosen atom
        if bar is not None:
            bar.update(B)
    stats.bounded_fallback += int(failed.sum())
    return support, evr, st.Q, st.T, failed
