"""Fast batched SOMP in plain PyTorch (CPU and GPU): the ``"torch"`` backend.

SOMP is docs/method.md section 3; conventions as the float64 reference (``hp_fast.pursuit.result``).
This module holds the dictionary-space loop ``_pursue`` (large dictionaries), the driver that
batches heads (docs/fast-pursuit.md section 5) and the entry points ``somp_heads_torch`` /
``somp_torch``. Shared pieces live in ``numerics`` (head form, orthonormal support, refreshes),
``l1_pruning`` (the exact L1 selection) and ``small_dictionary`` (atom space, ``v <= SMALL_V``).

Dictionary space, per atom ``j`` and head the state is two numbers (section 4):
``s_j = ||Z M P d_j||^2`` (the L2 score before normalization; ``P`` projects out the support)
and ``o_j = ||P d_j||^2`` (the part of the atom outside the span). A new support vector ``q``
changes them by ``o_j -= a_j^2`` and ``s_j -= a_j * c_j`` with ``a = D q`` and
``c = D (2 P W q - ||Z M q||^2 q)``, ``W = M.T Z.T Z M``. For a batch of ``B`` heads both columns
come from ONE matrix product ``[q ; 2PWq - g q] (2B, d) @ D.T``, so the dictionary is read once
per step for all heads and the cost per step is independent of ``n``. Neither the ``(n, d)``
residual nor any ``(v, n)`` correlation matrix is ever formed (section 1).

* ``l2``: score ``s_j / ||d_j||^2`` (or ``s_j``); ``ormp``: score ``s_j / o_j``.
* ``l1``: the per-head projected dictionary ``F = D P M.T (v, r)`` is kept and updated by rank one
  (``F -= (D q) outer (M q)``, section 3); ``l1_pruning.l1_select`` scores only the atoms whose
  Cauchy-Schwarz bound can win (section 7). The fraction scored is reported in ``stats``.
* fp32 drift (section 9): after every ``REFRESH_DROP`` drop of a head's residual energy its
  ``s``/``o`` are recomputed from the rows; atoms near the span are recomputed directly and those
  inside it (``SPAN_TOL``) retired for good.

Precision: fp32 by default (``dtype=torch.float64`` for a float64 run); bf16/fp16 inputs are upcast.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .bounded import bounded_batch_size, pursue_bounded
from .l1_pruning import l1_margin, l1_select
from .numerics import (FRAGILE, REFRESH_DROP, TIE_RTOL, PursuitStats, append_support,
                       compute_dtype, full_refresh, gram_factor, init_projected, init_scores, pick,
                       refresh_fragile, somp_signals)
from .result import SPAN_TOL, SOMPResult, check_heads
from .small_dictionary import pursue_small_heads, small_kernel_available, uses_atom_space

DEFAULT_MEMORY = 1 << 30  # bytes of per-step state allowed for one batch of heads
METHODS = ("bounded", "dense")  # large dictionaries: bounded.py (default) or _pursue below
LARGE_METHOD = "dense"  # the method used when none is passed (read at call time); "bounded" is opt-in until it passes the real-model tests


def resolve_method(method: Optional[str]) -> str:
    """The large-dictionary method that will run: ``method``, else ``LARGE_METHOD``."""
    choice = LARGE_METHOD if method is None else method
    if choice not in METHODS:
        raise ValueError(f"method={choice!r} is unknown; use one of {METHODS} (or None for the "
                         f"default, {LARGE_METHOD!r})")
    return choice


def head_batch_size(v: int, n: int, d: int, r: int, k: int, memory: int, l1: bool) -> int:
    """Heads per batch so the per-step state (about 48 v bytes per head, plus F (v, r) floats for
    the L1 rule) fits ``memory`` bytes."""
    per_head = 48 * v + 8 * (k * d + r * d + n * r + k * k) + (4 * v * r if l1 else 0)
    return max(1, int(memory // per_head))


def _pursue(Z, M, D, atom_sq, k, criterion, normalize, stats, memory, bar=None, total=None):
    """One batch of heads. Z (B, n, r), M (B, r, d), D (v, d), all in the compute dtype.

    Returns support (B, k), evr (B, k), Q (B, k, d), T (B, k, k)."""
    B, n, r = Z.shape
    v, d = D.shape
    dt, dev = D.dtype, D.device
    rtol = TIE_RTOL[dt]
    G = Z.transpose(1, 2) @ Z  # (B, r, r)
    if total is None:
        total = (G * (M @ M.transpose(1, 2))).sum(dim=(1, 2))  # ||Z M||_F^2, Z M never formed
    MT = M.transpose(1, 2).contiguous()  # (B, d, r)
    U = MT @ gram_factor(Z, G)  # (B, d, rr): U U.T = M.T G M
    chunk = max(1 << 24, memory // 8)
    F = None
    if criterion == "l1":
        F = init_projected(D, MT, chunk)  # (B, v, r) per-head projected dictionaries D M.T
        Lf = gram_factor(Z, G)
        s = torch.empty(B, v, dtype=dt, device=dev)
        vc = max(64, chunk // max(1, B * Lf.shape[2] * D.element_size()))
        for c0 in range(0, v, vc):  # ||F_j L||^2 = ||Z M d_j||^2, in chunks
            s[:, c0:c0 + vc] = torch.bmm(F[:, c0:c0 + vc], Lf).square_().sum(dim=2)
        del Lf
    else:
        s = init_scores(D, U, chunk)  # (B, v)
    ref = total.clone()  # residual energy at the last exact computation of s
    tol = SPAN_TOL * atom_sq  # (v,)
    orth = atom_sq.expand(B, v).clone()  # (B, v) ||P d_j||^2
    orth[:, atom_sq <= 0] = math.nan  # NaN marks atoms never to choose (zero, chosen, in span)
    frag_thr = FRAGILE * atom_sq
    inv_sq = None
    if normalize and criterion != "ormp":
        inv_sq = torch.where(atom_sq > 0, 1.0 / atom_sq, torch.zeros_like(atom_sq))
    inv_norm = inv_sq.sqrt() if (inv_sq is not None and criterion == "l1") else None
    if criterion == "l1":
        margin = l1_margin(s)  # (B, 1)
    Q = torch.zeros(B, k, d, dtype=dt, device=dev)
    T = torch.zeros(B, k, k, dtype=dt, device=dev)
    support = torch.full((B, k), -1, dtype=torch.long, device=dev)
    evr = torch.zeros(B, k, dtype=dt, device=dev)
    explained = torch.zeros(B, dtype=dt, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    score = torch.empty(B, v, dtype=dt, device=dev)
    for t in range(k):
        Qt = Q[:, :t]
        invalid = orth <= tol
        invalid |= orth.isnan()
        # ---- selection
        if criterion == "l2":
            torch.mul(s, inv_sq, out=score) if inv_sq is not None else score.copy_(s)
            score.masked_fill_(invalid, -math.inf)
            p, ok = pick(score, rtol)
        elif criterion == "ormp":
            torch.div(s, orth, out=score)
            score.masked_fill_(invalid, -math.inf)
            p, ok = pick(score, rtol)
        else:
            p, ok = l1_select(F, inv_sq, inv_norm, s, margin, invalid, score, Z, n, rtol,
                               chunk, stats)
        ok &= alive
        alive = ok
        if not bool(ok.any()):
            evr[:, t:] = evr[:, t - 1:t] if t > 0 else 0.0
            break
        # ---- new orthonormal support vector, EVR
        q, mq, g, gamma = append_support(D, p, ok, Q, T, support, MT, G, explained, total, evr, t)
        if bar is not None:
            bar.update(B)
        if t == k - 1:
            break
        # ---- rank-one updates of s and orth: one (2B, d) @ (d, v) product for all heads
        w = torch.bmm(g, M)  # (B, 1, d) = (W q).T
        if t:
            w = w - torch.bmm(torch.bmm(w, Qt.transpose(1, 2)), Qt)  # P_{t-1} W q
        w = w[:, 0]
        X = torch.cat([q, 2.0 * w - gamma[:, None] * q], dim=0)  # (2B, d)
        Y = X @ D.T  # (2B, v)
        a, c = Y[:B], Y[B:]
        s.addcmul_(a, c, value=-1.0)
        orth.addcmul_(a, a, value=-1.0)
        if F is not None:
            F.baddbmm_(a[:, :, None], mq, alpha=-1.0)  # F -= (D q) outer (M q)
        orth[rows[ok], p[ok]] = math.nan  # the chosen atom
        # the recurrence loses digits once the residual is much smaller than it was when s was
        # last exact: recompute s, orth from the rows for those heads (rare: every 100x drop)
        residual = total - explained
        stale = (residual < REFRESH_DROP[dt] * ref) & ok
        if bool(stale.any()):
            hb = stale.nonzero()[:, 0]
            Fh = None if F is None else F[hb]
            s[hb], orth[hb] = full_refresh(D, U[hb], Q[hb, :t + 1], tol, chunk, MT[hb], Fh)
            if F is not None:
                F[hb] = Fh
            ref[hb] = residual[hb]
            stats.full_refresh += hb.numel()
            if criterion == "l1":
                margin[hb] = l1_margin(s[hb])
        refresh_fragile(D, frag_thr, tol, s, orth, Z, M, G, Q[:, :t + 1], stats, F)
    return support, evr, Q, T


# --------------------------------------------------------------------------- driver

def _dense(Z, M, D, atom_sq, k, criterion, normalize, st, memory, bar=None):
    """``_pursue`` over heads Z (b, n, r), M (b, r, d) in batches that fit ``memory``."""
    b, n, r = Z.shape
    hb = min(b, head_batch_size(D.shape[0], n, D.shape[1], r, k, memory, criterion == "l1"))
    outs = [_pursue(Z[i:i + hb], M[i:i + hb], D, atom_sq, k, criterion, normalize, st, memory,
                    bar) for i in range(0, b, hb)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def _bounded(Z, M, D, atom_sq, k, criterion, normalize, st, memory, bar):
    """``pursue_bounded`` on one batch; heads it hands back as failed are rerun densely."""
    sup, ev, Q, T, failed = pursue_bounded(Z, M, D, atom_sq, k, criterion, normalize, st, memory,
                                           bar)
    if bool(failed.any()):
        fb = failed.nonzero()[:, 0]
        sup[fb], ev[fb], Q[fb], T[fb] = _dense(Z[fb], M[fb], D, atom_sq, k, criterion, normalize,
                                               st, memory)
    return sup, ev, Q, T


def _run(Z, M, D, k, criterion, normalize, memory, progress, stats, want_factors,
         method="bounded"):
    """All heads, in batches: Z (B, n, r), M (B, r, d), D (v, d) in the compute dtype;
    ``method`` (``METHODS``) for large dictionaries.

    Returns the result, plus MQ (B, k, r) rows M q_t and T (B, k, k) with ``want_factors``."""
    B, n, r = Z.shape
    v, d = D.shape
    atom_sq = D.square().sum(dim=1)
    bounded = method == "bounded"
    hb = min(B, bounded_batch_size(v, n, d, r, k, memory) if bounded else
             head_batch_size(v, n, d, r, k, memory, criterion == "l1"))
    st = PursuitStats()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=B * k, desc=f"somp {criterion} ({B} heads)", unit="head-step")
    small = uses_atom_space(v)
    Gd = D @ D.T if small else None  # (v, v) Gram matrix of a small (concept) dictionary
    compiled = small and small_kernel_available(D, criterion)
    sups, evrs, MQs, Ts = [], [], [], []
    for b0 in range(0, B, hb):
        sl = slice(b0, min(B, b0 + hb))
        if small:
            sup, ev, MQ, T = pursue_small_heads(Z[sl], M[sl], D, Gd, atom_sq, k, criterion,
                                                normalize, st, memory, bar, compiled)
        else:
            run = _bounded if bounded else _pursue
            sup, ev, Q, T = run(Z[sl], M[sl], D, atom_sq, k, criterion, normalize, st, memory, bar)
            MQ = torch.bmm(Q, M[sl].transpose(1, 2)) if want_factors else None  # rows M q_t
        sups.append(sup)
        evrs.append(ev)
        MQs.append(MQ)
        Ts.append(T)
    if bar is not None:
        bar.close()
    if stats is not None:
        stats.update(l1_visited_fraction=(st.l1_visited / st.l1_total) if st.l1_total else None,
                     refreshed=st.refreshed, full_refresh=st.full_refresh, head_batch=hb,
                     path=(("small-compiled" if compiled else "small-torch") if small else
                           ("bounded" if bounded else "large")))
        if bounded and not small:
            stats.update(exact_fraction=st.bounded_exact / max(1, st.bounded_total),
                         exact_fraction_per_step=list(st.bounded_per_step),
                         refined=st.bounded_refined, fallback_heads=st.bounded_fallback)
    res = SOMPResult(support=torch.cat(sups), evr=torch.cat(evrs), criterion=criterion,
                     backend="torch")
    if want_factors:
        return res, torch.cat(MQs), torch.cat(Ts)
    return res


# --------------------------------------------------------------------------- public entry points

def somp_heads_torch(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int, *,
                     criterion: str = "l1", normalize: bool = True, center: bool = False,
                     dtype: Optional[torch.dtype] = None, memory: int = DEFAULT_MEMORY,
                     progress: bool = False, stats: Optional[dict] = None,
                     method: Optional[str] = None) -> SOMPResult:
    """Head-structured SOMP; see ``hp_fast.pursuit.somp_heads`` for the contract.

    z (B, n, dh), w_o (B, dh, d), dictionary (v, d) on any device. Heads are processed in
    batches sized so that the per-step state, about ``48 * v`` bytes per head (the scores
    ``s``, ``o``, the score buffer and the two rows of ``[q; .] @ D.T``) plus ``F`` (``4 * v * r``
    bytes per head, L1 only), stays under ``memory`` (1 GiB by default); the start-up product and
    the L1 candidate scoring use chunks of at most ``max(16 MiB, memory / 8)``. Extra peak memory
    is therefore about ``1.25 * memory`` plus the fp32 copy of the dictionary when it is given in
    another dtype, plus ``Q`` (``B * k * d`` floats). Small dictionaries (``v <= 4096``) also keep
    ``D D.T`` and, per head, ``E`` (``v * r``) and the ``D q`` columns (``k * v``).
    ``stats`` (a dict) receives the work counters and the path taken.
    ``method`` picks the large-dictionary algorithm (``METHODS``; default ``LARGE_METHOD``):
    ``"bounded"`` (``bounded.py``: bounds from a few singular directions, exact scores for the
    atoms that can win; ``stats["exact_fraction"]`` is the share of the vocabulary scored
    exactly, ``fallback_heads`` the heads it reran densely) or ``"dense"`` (``_pursue``).
    """
    check_heads(z, w_o, dictionary, k, criterion)
    method = resolve_method(method)
    dt = compute_dtype(dtype)
    dev = dictionary.device
    Z = z.detach().to(dev, dt)  # (B, n, dh)
    if center:
        Z = Z - Z.mean(dim=1, keepdim=True)
    M = w_o.detach().to(dev, dt)  # (B, dh, d)
    return _run(Z, M, dictionary.detach().to(dev, dt), k, criterion, normalize, memory, progress,
                stats, False, method)


def somp_torch(signals: torch.Tensor, dictionary: torch.Tensor, k: int, *, criterion: str = "l1",
               normalize: bool = True, center: bool = False, return_coefficients: bool = False,
               dtype: Optional[torch.dtype] = None, memory: int = DEFAULT_MEMORY,
               stats: Optional[dict] = None, method: Optional[str] = None) -> SOMPResult:
    """SOMP of raw signals (..., n, d) by the fast path (thin-QR reduction to head form);
    ``method`` as in ``somp_heads_torch``."""
    method = resolve_method(method)

    def run(Z, M):  # Z (B, n, r), M (B, r, d) in the compute dtype
        D = dictionary.detach().to(dictionary.device, Z.dtype)
        return _run(Z, M, D, k, criterion, normalize, memory, False, stats, True, method)

    return somp_signals(signals, dictionary, k, run, criterion=criterion, center=center,
                        return_coefficients=return_coefficients, dtype=dtype, backend="torch")
