"""Atom-space pursuit for small (concept) dictionaries (docs/fast-pursuit.md section 10).

For ``v <= SMALL_V`` atoms (a concept's token list) the pursuit runs in atom space: with the Gram
matrix ``Gd = D D.T (v, v)``, the per-head projected dictionary ``E = D M.T (v, r)`` and the stored
columns ``A[t] = D q_t (v,)``, no step touches a d-dimensional vector. Same selection rules, tie
rule, ``SPAN_TOL`` retirement and ``REFRESH_DROP`` refresh as the dictionary-space loop.

Two implementations of the same recurrences:
* ``pursue_small``: PyTorch, all heads of a batch in lock step; every rule. Its many tiny ops run
  on one thread (``one_thread``).
* ``pursue_small_compiled``: ``hp_fast.ops.somp_small`` (csrc/somp_small.cpp), each head runs its
  whole pursuit with its ``E`` in cache; ``l2``/``ormp`` on the CPU, when the extension is built
  and ``COMPILED_SMALL`` is True (``small_kernel_available``).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import ops
from .l1_pruning import l1_margin, l1_select
from .numerics import REFRESH_DROP, TIE_RTOL, PursuitStats, gram_factor, init_projected, pick
from .result import SPAN_TOL

SMALL_V = 4096  # dictionaries up to this size run the pursuit in atom space
COMPILED_SMALL = True  # l2/ormp on CPU: the compiled twin of pursue_small when it is built


def uses_atom_space(v: int) -> bool:
    """Whether a dictionary of v atoms runs in atom space (reads SMALL_V at call time)."""
    return v <= SMALL_V


def small_kernel_available(D: torch.Tensor, criterion: str) -> bool:
    """The compiled atom-space kernel (csrc/somp_small.cpp) serves the L2-type rules on CPU."""
    if not COMPILED_SMALL or criterion == "l1" or D.device.type != "cpu":
        return False
    return ops.somp_small_available()


@contextlib.contextmanager
def one_thread(device: torch.device):
    """The atom-space steps are many tiny ops: on the CPU one thread beats two (no fork/join
    per op, and no stalls when the cores are shared)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pursue_small_heads(Z, M, D, Gd, atom_sq, k, criterion, normalize, stats: PursuitStats,
                       memory, bar, compiled: bool):
    """One batch of heads in atom space, by the compiled kernel (``compiled``) or the PyTorch
    twin. Z (B, n, r), M (B, r, d), D (v, d), Gd (v, v) = D D.T, atom_sq (v,).
    Returns support (B, k), evr (B, k), MQ (B, k, r) rows M q_t, T (B, k, k)."""
    if compiled:
        out = pursue_small_compiled(Z, M, D, Gd, atom_sq, k, criterion, normalize)
        if bar is not None:
            bar.update(out[0].shape[0] * k)
        return out
    E = init_projected(D, M.transpose(1, 2), 1 << 26)  # (B, v, r) = D M.T, one product
    with one_thread(D.device):
        return pursue_small(Z, M, D, Gd, E, atom_sq, k, criterion, normalize, stats, memory, bar)


def pursue_small_compiled(Z, M, D, Gd, atom_sq, k, criterion, normalize):
    """``pursue_small`` for l2/ormp by the compiled kernel: every head runs its whole pursuit
    with its own ``E = D M.T`` in cache. Same inputs (less E) and outputs as the twin."""
    B, n, r = Z.shape
    v, d = D.shape
    dt = D.dtype
    G = Z.transpose(1, 2) @ Z  # (B, r, r)
    total = (G * (M @ M.transpose(1, 2))).sum(dim=(1, 2))  # ||Z M||_F^2
    L = gram_factor(Z, G).contiguous()  # (B, r, rr)
    E = (D @ M.reshape(B * r, d).T).view(v, B, r).transpose(0, 1)  # (B, v, r) view, one product
    return ops.somp_small(E, Gd, G.contiguous(), L, atom_sq, total, k, criterion == "ormp",
                          bool(normalize), TIE_RTOL[dt], SPAN_TOL, REFRESH_DROP[dt])


def pursue_small(Z, M, D, Gd, E, atom_sq, k, criterion, normalize, stats, memory, bar=None):
    """One batch of heads for a small (concept) dictionary, entirely in atom space.

    With the Gram matrix ``Gd = D D.T``, the projected dictionary ``E = D M.T (v, r)`` and the
    stored columns ``A[t] = D q_t`` no step touches a d-dimensional vector:
    ``coef = A[:t, p]`` (= Q d_p), ``nu^2 = ||d_p||^2 - ||coef||^2``,
    ``a = D q = (Gd[p] - coef A) / nu``, ``M q = (E[p] - coef MQ) / nu`` with ``MQ[s] = M q_s``,
    and ``D P W q = E G M q - A.T (MQ G M q)``; the s/o recurrences are those of the
    dictionary-space loop (``torch_backend``).
    E (B, v, r) = D M.T is passed in. Returns support, evr, MQ (B, k, r), T (B, k, k)."""
    B, n, r = Z.shape
    v, d = D.shape
    dt, dev = D.dtype, D.device
    rtol = TIE_RTOL[dt]
    G = Z.transpose(1, 2) @ Z
    total = (G * (M @ M.transpose(1, 2))).sum(dim=(1, 2))
    Lf = gram_factor(Z, G)
    s = torch.bmm(E, Lf).square_().sum(dim=2)  # (B, v) = ||Z M d_j||^2
    tol = SPAN_TOL * atom_sq
    orth = atom_sq.expand(B, v).clone()
    orth[:, atom_sq <= tol] = math.nan  # zero atoms
    inv_sq = None
    if normalize and criterion != "ormp":
        inv_sq = torch.where(atom_sq > 0, 1.0 / atom_sq, torch.zeros_like(atom_sq))
    inv_norm = inv_sq.sqrt() if (inv_sq is not None and criterion == "l1") else None
    F = E.clone() if criterion == "l1" else None
    margin = l1_margin(s)
    A = torch.zeros(B, k, v, dtype=dt, device=dev)
    MQ = torch.zeros(B, k, r, dtype=dt, device=dev)
    T = torch.zeros(B, k, k, dtype=dt, device=dev)
    support = torch.full((B, k), -1, dtype=torch.long, device=dev)
    evr = torch.zeros(B, k, dtype=dt, device=dev)
    explained = torch.zeros(B, dtype=dt, device=dev)
    ref = total.clone()
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    score = torch.empty(B, v, dtype=dt, device=dev)
    chunk = max(1 << 24, memory // 8)
    for t in range(k):
        # orth holds NaN for every atom never to choose (zero, chosen, inside the span)
        if criterion == "l2":
            torch.mul(s, inv_sq, out=score) if inv_sq is not None else score.copy_(s)
            score.add_(orth, alpha=0.0).nan_to_num_(nan=-math.inf)  # NaN orth -> -inf
            p, ok = pick(score, rtol)
        elif criterion == "ormp":
            torch.div(s, orth, out=score).nan_to_num_(nan=-math.inf)
            p, ok = pick(score, rtol)
        else:
            invalid = orth.isnan()
            p, ok = l1_select(F, inv_sq, inv_norm, s, margin, invalid, score, Z, n, rtol,
                               chunk, stats)
        ok &= alive
        alive = ok
        if not bool(ok.any()):
            break  # evr holds per-step energies here: zeros keep the EVR flat
        At, MQt = A[:, :t], MQ[:, :t]
        coef = A[rows, :t, p] if t else torch.zeros(B, 0, dtype=dt, device=dev)  # (B, t) = Q d_p
        nu = (atom_sq[p] - coef.square().sum(dim=1)).clamp_min_(0).sqrt_()  # ||P d_p||
        inv_nu = (ok / nu.clamp_min(torch.finfo(dt).tiny))[:, None]  # 0 for finished heads
        a = Gd[p]  # (B, v)
        mq = E[rows, p]  # (B, r)
        if t:
            a = a - torch.bmm(coef[:, None, :], At)[:, 0]
            mq = mq - torch.bmm(coef[:, None, :], MQt)[:, 0]
        a = a * inv_nu  # D q
        mq = mq * inv_nu  # M q
        A[:, t] = a
        MQ[:, t] = mq
        T[:, :t, t] = coef
        T[:, t, t] = nu * ok
        support[:, t] = p.masked_fill(~ok, -1)
        g = torch.bmm(mq[:, None, :], G)  # (B, 1, r)
        gamma = (mq[:, None, :] * g).sum(dim=(1, 2))  # 0 for finished heads (mq = 0)
        explained += gamma
        evr[:, t] = gamma  # turned into the EVR after the loop
        if bar is not None:
            bar.update(B)
        if t == k - 1:
            break
        b = torch.bmm(E, g.transpose(1, 2))[:, :, 0]  # (B, v) = D W q
        if t:
            h = torch.bmm(g, MQt.transpose(1, 2))  # (B, 1, t) = Q W q
            b = b - torch.bmm(h, At)[:, 0]  # D P_{t-1} W q
        c = torch.addcmul(b.mul_(2.0), gamma[:, None], a, value=-1.0)  # 2b - gamma a
        s.addcmul_(a, c, value=-1.0)
        orth.addcmul_(a, a, value=-1.0)
        if F is not None:
            F.addcmul_(a[:, :, None], mq[:, None, :], value=-1.0)
        orth.scatter_(1, p[:, None], math.nan)  # the chosen atom
        orth.masked_fill_(orth <= tol, math.nan)  # inside the span: retired for good
        residual = total - explained
        stale = residual < REFRESH_DROP[dt] * ref  # finished heads have ref = residual
        if bool(stale.any()):  # recompute s (and F) from E, A, MQ for those heads
            hb = stale.nonzero()[:, 0]
            Fh = E[hb] - torch.bmm(A[hb, :t + 1].transpose(1, 2), MQ[hb, :t + 1])  # (h, v, r)
            s[hb] = torch.bmm(Fh, Lf[hb]).square_().sum(dim=2)
            if F is not None:
                F[hb] = Fh
                margin[hb] = l1_margin(s[hb])
            ref[hb] = residual[hb]
            stats.full_refresh += hb.numel()
    evr = torch.cumsum(evr, dim=1)  # explained energy after each step (flat once finished)
    evr = torch.where(total[:, None] > 0, evr / total.clamp_min(torch.finfo(dt).tiny)[:, None],
                      torch.zeros_like(evr)).clamp_(max=1.0)
    return support, evr, MQ, T
