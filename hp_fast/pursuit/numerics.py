"""Numerics shared by the torch and triton backends (docs/fast-pursuit.md sections 2-5 and 9).

* Every batch element is a *head*: samples ``H = Z @ M`` with ``Z (n, r)`` and ``M (r, d)``.
  ``somp_heads`` gets ``Z = z[b]``, ``M = w_o[b]``; raw signals are reduced to this form once
  by a thin QR (``signals_to_heads``: ``H.T = Q R`` so ``Z = R.T``, ``M = Q.T``,
  ``r = min(n, d)``), and ``somp_signals`` is the one wrapper every backend uses for them.
* The support is kept as orthonormal rows ``Q`` (Gram-Schmidt with one re-orthogonalization,
  ``orthonormalize``, section 2); least squares is a projection, the EVR is
  ``sum_t ||Z M q_t||^2 / ||Z M||_F^2`` (``append_support``) and the coefficients on the raw
  atoms come from one triangular solve at the end (``coefficients_from``).
* Start-up products in vocabulary chunks: the per-head projected dictionaries
  ``F = D M.T`` (``init_projected``, section 3) and the L2 scores ``||d_j M.T L||^2`` with
  ``L L.T = Z.T Z`` (``gram_factor``, ``init_scores``, section 4).
* fp32 drift (section 9): ``full_refresh`` recomputes a head's scores from the rows after every
  ``REFRESH_DROP`` drop of its residual energy; ``refresh_fragile`` recomputes the atoms near the
  span (``o_j < FRAGILE ||d_j||^2``) and retires those inside it (``SPAN_TOL``).
* Ties (``pick``): scores within ``TIE_RTOL`` (relative) of the best count as tied and the lowest
  index wins: the reference's exact-tie rule, made robust to rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .result import SOMPResult, check_inputs

TIE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
FRAGILE = 1e-2          # o_j / ||d_j||^2 under which s_j, o_j are recomputed from the row
REFRESH_DROP = {torch.float32: 1e-1, torch.float64: 1e-6}  # residual drop that triggers a refresh;
# with it the recurrence keeps about 1e-6 relative accuracy, well inside TIE_RTOL


@dataclass
class PursuitStats:
    """Work counters of one pursuit call (reported through ``stats=`` of the backends)."""

    l1_visited: int = 0    # atoms whose exact L1 score was computed
    l1_total: int = 0      # atoms a full L1 scan would have scored
    refreshed: int = 0     # (head, atom) pairs recomputed by refresh_fragile
    full_refresh: int = 0  # heads recomputed by full_refresh
    bounded_exact: int = 0     # bounded path (bounded.py): atoms scored exactly, all steps
    bounded_total: int = 0     # atoms a full scan would have scored (live heads x v per step)
    bounded_per_step: list = field(default_factory=list)  # exact fraction of each batch-step
    bounded_refined: int = 0   # head refinements (more singular directions)
    bounded_fallback: int = 0  # heads rerun by the dense loop (bound too loose)


def compute_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a fast backend computes in: float32 by default, or float64 on request."""
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} is not supported for the computation; use torch.float32 "
                         "or torch.float64 (bf16/fp16 inputs are accepted and upcast)")
    return dtype


# --------------------------------------------------------------------------- head form

def signals_to_heads(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor raw signals H (B, n, d) as Z (B, n, r) @ M (B, r, d), r = min(n, d), M with
    orthonormal rows."""
    B, n, d = H.shape
    if n < d:
        Qh, Rh = torch.linalg.qr(H.transpose(1, 2))  # Qh (B, d, n), Rh (B, n, n)
        return Rh.transpose(1, 2), Qh.transpose(1, 2)
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    return H, eye.expand(B, d, d)


def gram_factor(Z: torch.Tensor, G: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L (B, r, rr) with L L.T = G = Z.T Z (rr = min(n, r)): Z.T when n <= r, else a Cholesky
    factor (an eigen-factor for the rare rank-deficient Gram matrices)."""
    B, n, r = Z.shape
    if n <= r:
        return Z.transpose(1, 2)
    if G is None:
        G = Z.transpose(1, 2) @ Z
    L, info = torch.linalg.cholesky_ex(G)
    bad = info != 0
    if bool(bad.any()):
        lam, V = torch.linalg.eigh(G[bad])
        L[bad] = V * lam.clamp_min(0).sqrt()[:, None, :]
    return L


def coefficients_from(HQ: torch.Tensor, T: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Coefficients on the raw atoms from HQ = H @ Q.T (B, n, k) and T (B, k, k), D[S] = T.T Q.

    Solves W T.T = HQ per batch element over its valid steps; -1 support entries get 0."""
    B, n, k = HQ.shape
    W = torch.zeros_like(HQ)
    for b in range(B):
        t = int((support[b] >= 0).sum())
        if t:
            Tl = T[b, :t, :t].transpose(0, 1)  # lower triangular
            W[b, :, :t] = torch.linalg.solve_triangular(Tl, HQ[b, :, :t], upper=False, left=False)
    return W


HeadRun = Callable[[torch.Tensor, torch.Tensor],
                   tuple[SOMPResult, torch.Tensor, torch.Tensor]]


def somp_signals(signals: torch.Tensor, dictionary: torch.Tensor, k: int, run: HeadRun, *,
                 criterion: str, center: bool, return_coefficients: bool,
                 dtype: Optional[torch.dtype], backend: str) -> SOMPResult:
    """SOMP of raw signals (..., n, d) by a head-form backend: thin QR to ``Z, M`` (in
    ``compute_dtype(dtype)``, on the dictionary's device), then
    ``run(Z, M) -> (result over the B heads, MQ (B, k, r) rows M q_t, T (B, k, k))``, then the
    coefficients on the raw atoms (one triangular solve) when asked for."""
    check_inputs(signals, dictionary, k, criterion)
    dt = compute_dtype(dtype)
    lead = signals.shape[:-2]
    n, d = signals.shape[-2:]
    H = signals.detach().to(dictionary.device, dt).reshape(-1, n, d)  # (B, n, d)
    if center:
        H = H - H.mean(dim=1, keepdim=True)
    Z, M = signals_to_heads(H)  # (B, n, r), (B, r, d)
    res, MQ, T = run(Z, M)
    coef = None
    if return_coefficients:
        HQ = torch.bmm(Z, MQ.transpose(1, 2))  # (B, n, k) = H Q.T
        coef = coefficients_from(HQ, T, res.support).reshape(*lead, n, k)
    return SOMPResult(support=res.support.reshape(*lead, k), evr=res.evr.reshape(*lead, k),
                      coefficients=coef, criterion=criterion, backend=backend)


# --------------------------------------------------------------------------- one step

def pick(score: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """score (B, m), -inf where invalid -> (index of the lowest near-best entry (B,),
    whether any entry is valid (B,))."""
    best = score.max(dim=1, keepdim=True).values
    ok = torch.isfinite(best[:, 0])
    thr = best - rtol * best.abs()
    idx = (score >= thr).to(torch.uint8).argmax(dim=1)  # first entry within the tie tolerance
    return idx, ok


def orthonormalize(x: torch.Tensor, Qt: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram-Schmidt of rows x (B, d) against orthonormal Qt (B, t, d), twice (re-orthogonalization).

    Returns q (B, d) unit rows (0 where x lies in the span), coef (B, t) = Qt @ x, norm (B,)."""
    coef = torch.zeros(x.shape[0], Qt.shape[1], dtype=x.dtype, device=x.device)
    QtT = Qt.transpose(1, 2)
    x = x[:, None, :]  # row vectors: (B, 1, .) @ (B, ., .) products are the fast batched form
    for _ in range(2):
        if Qt.shape[1]:
            c = torch.bmm(x, QtT)  # (B, 1, t)
            x = x - torch.bmm(c, Qt)
            coef = coef + c[:, 0]
    x = x[:, 0]
    nrm = x.norm(dim=1)
    q = x / nrm.clamp_min(torch.finfo(x.dtype).tiny)[:, None]
    return q, coef, nrm


def append_support(D, p, ok, Q, T, support, MT, G, explained, total, evr, t):
    """Add atom p (B,) as support vector t of each live head ok (B,), in place: orthonormal row
    of Q (B, k, d), triangular factor T (B, k, k), support ids (B, k), running explained energy
    (B,) and EVR (B, k). D (v, d), MT (B, d, r) = M.T, G (B, r, r) = Z.T Z, total (B,).

    Returns q (B, d) the new orthonormal vector, mq (B, 1, r) = (M q).T, g = (G M q).T and
    gamma (B,) = ||Z M q||^2, the energy this step explains."""
    q, coef, nu = orthonormalize(D[p], Q[:, :t])
    q = q * ok[:, None]
    Q[:, t] = q
    T[:, :t, t] = coef
    T[:, t, t] = nu
    support[:, t] = torch.where(ok, p, torch.full_like(p, -1))
    mq = torch.bmm(q[:, None, :], MT)  # (B, 1, r) = (M q).T
    g = torch.bmm(mq, G)  # (B, 1, r) = (G M q).T
    gamma = (mq * g).sum(dim=(1, 2))  # ||Z M q||^2: energy this step explains
    explained += gamma
    tiny = torch.finfo(total.dtype).tiny
    evr[:, t] = torch.where(total > 0, explained / total.clamp_min(tiny),
                            torch.zeros_like(total)).clamp(max=1.0)
    if t > 0:
        evr[:, t] = torch.where(ok, evr[:, t], evr[:, t - 1])
    return q, mq, g, gamma


# --------------------------------------------------------------------------- start-up products

def init_scores(D: torch.Tensor, U: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """s0 (B, v) = row-wise ||D @ U_b||^2 for D (v, d), U (B, d, rr), in vocabulary chunks."""
    B, d, rr = U.shape
    v = D.shape[0]
    Ucat = U.permute(1, 0, 2).reshape(d, B * rr)
    s = torch.empty(B, v, dtype=D.dtype, device=D.device)
    vc = max(64, chunk_bytes // max(1, B * rr * D.element_size()))
    for c0 in range(0, v, vc):
        c1 = min(v, c0 + vc)
        Y = D[c0:c1] @ Ucat  # (vc, B*rr): one chunk of the per-head projected dictionaries
        s[:, c0:c1] = Y.square_().view(c1 - c0, B, rr).sum(dim=2).T
    return s


def init_projected(D: torch.Tensor, MT: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """F (B, v, r) = D @ M_b.T for every head (D (v, d), MT (B, d, r)), computed in vocabulary
    chunks of one product."""
    B, d, r = MT.shape
    v = D.shape[0]
    F = torch.empty(B, v, r, dtype=D.dtype, device=D.device)
    Mcat = MT.permute(1, 0, 2).reshape(d, B * r)
    vc = max(64, chunk_bytes // max(1, B * r * D.element_size()))
    for c0 in range(0, v, vc):
        c1 = min(v, c0 + vc)
        F[:, c0:c1] = (D[c0:c1] @ Mcat).view(c1 - c0, B, r).transpose(0, 1)
    return F


# --------------------------------------------------------------------------- fp32 drift

def full_refresh(D, U, Qt, tol, chunk_bytes, MT=None, F=None):
    """Recompute s (B', v), orth (B', v) (and F (B', v, r) = D P M.T into F when given) from the
    rows: P d_j = d_j - (d_j Q.T) Q, in vocabulary chunks. D (v, d), U (B', d, rr),
    Qt (B', t, d), tol (v,), MT (B', d, r). Atoms inside the span get orth NaN."""
    B, d, rr = U.shape
    v = D.shape[0]
    t = Qt.shape[1]
    s = torch.empty(B, v, dtype=D.dtype, device=D.device)
    o = torch.empty(B, v, dtype=D.dtype, device=D.device)
    vc = max(64, chunk_bytes // max(1, B * (d + rr + t) * D.element_size()))
    Qcat = Qt.reshape(B * t, d)
    for c0 in range(0, v, vc):
        c1 = min(v, c0 + vc)
        Dc = D[c0:c1]
        A = (Dc @ Qcat.T).view(c1 - c0, B, t).transpose(0, 1)  # (B, vc, t) = D Q.T
        X = Dc.expand(B, c1 - c0, d) - torch.bmm(A, Qt)  # (B, vc, d) = rows of D P
        o[:, c0:c1] = X.square().sum(dim=2)
        s[:, c0:c1] = torch.bmm(X, U).square_().sum(dim=2)
        if F is not None:
            F[:, c0:c1] = torch.bmm(X, MT)
    o = torch.where(o <= tol, torch.full_like(o, math.nan), o)
    return s, o


def refresh_fragile(D, frag_thr, tol, s, orth, Z, M, G, Qt, stats: PursuitStats, F=None,
                    FT=None):
    """Recompute s_j, o_j directly for atoms near the span (o_j < FRAGILE ||d_j||^2, frag_thr
    (v,)); retire the ones inside it (orth NaN). s, orth (B, v) in place (s may be None);
    F (B, v, .) rows too when given: rows of D P M.T (FT None) or of D P FT."""
    bi, ji = (orth < frag_thr).nonzero(as_tuple=True)  # chosen / retired atoms hold NaN
    if bi.numel() == 0:
        return
    stats.refreshed += bi.numel()
    x = D[ji]  # (m, d)
    Qb = Qt[bi]  # (m, t, d)
    x = x[:, None, :]
    for _ in range(2):
        x = x - torch.bmm(torch.bmm(x, Qb.transpose(1, 2)), Qb)
    o = x.square().sum(dim=(1, 2))
    mvec = torch.bmm(x, M[bi].transpose(1, 2))  # (m, 1, r)
    if s is not None:
        s[bi, ji] = (mvec * torch.bmm(mvec, G[bi])).sum(dim=(1, 2))
    if F is not None:  # rows of F = D P M.T (FT = None) or of any D P FT
        F[bi, ji] = mvec[:, 0] if FT is None else torch.bmm(x, FT[bi])[:, 0]
    dead = o <= tol[ji]
    orth[bi, ji] = torch.where(dead, torch.full_like(o, math.nan), o)
