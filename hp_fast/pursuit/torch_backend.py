"""Fast batched SOMP in plain PyTorch (CPU and GPU): the ``"torch"`` backend.

Same conventions as the float64 reference ``hp_fast.somp`` (criteria, ``normalize``,
``center``, ``SPAN_TOL`` exclusion, ``-1`` padding, EVR), but built on the structure in
``shared/docs/fast-pursuit.md``:

* Every batch element is a *head*: samples ``H = Z @ M`` with ``Z (n, r)`` and
  ``M (r, d)``. ``somp_heads`` gets ``Z = z[b]``, ``M = w_o[b]``; raw signals are reduced
  to this form once by a thin QR (``H.T = Q R`` so ``Z = R.T``, ``M = Q.T``, ``r = min(n, d)``).
  Neither the ``(n, d)`` residual nor any ``(v, n)`` correlation matrix is ever formed.
* The support is kept as orthonormal rows ``Q`` (Gram-Schmidt with one re-orthogonalization);
  least squares is a projection, the EVR is ``sum_t ||Z M q_t||^2 / ||Z M||_F^2``, and the
  coefficients on the raw atoms come from one triangular solve at the end.
* Per atom ``j`` and head the state is two numbers:
  ``s_j = ||Z M P d_j||^2`` (the L2 score before normalization; ``P`` projects out the support)
  and ``o_j = ||P d_j||^2`` (the part of the atom outside the span). A new support vector
  ``q`` changes them by
  ``o_j -= a_j^2`` and ``s_j -= a_j * c_j`` with ``a = D q`` and
  ``c = D (2 P W q - ||Z M q||^2 q)``,
  ``W = M.T Z.T Z M`` (fast-pursuit.md section 4, in dictionary space). For a batch of ``B`` heads
  both columns come from ONE matrix product ``[q ; 2PWq - g q] (2B, d) @ D.T``, so the
  dictionary is read once per step for all heads and the cost per step is independent of ``n``.
  The start ``s_j = ||d_j M.T L||^2`` (``L L.T = Z.T Z``) is one ``D @ (M.T L)`` product,
  done in vocabulary chunks.
* ``l2``: score ``s_j / ||d_j||^2`` (or ``s_j``); ``ormp``: score ``s_j / o_j``.
* ``l1``: the per-head projected dictionary ``F = D P M.T (v, r)`` is kept and updated by rank
  one (``F -= (D q) outer (M q)``, section 3), and exact Cauchy-Schwarz pruning (section 7) decides
  which rows to score: ``sum_i |F_j . z_i| <= sqrt(n s_j)``. The atoms with the best bounds seed a
  best exact score ``beta``; every atom whose bound reaches ``beta`` gets its exact L1 score
  ``|F_j Z.T|_1`` (gathered rows, in chunks); all others cannot win, so the answer is the full
  scan's. The fraction of the vocabulary scored is reported in ``stats``.
* Small dictionaries (``v <= SMALL_V``, concept lists): ``_pursue_small`` runs the same recurrences
  in atom space with the Gram matrix ``D D.T``, ``E = D M.T`` and the stored columns ``D q_t``, so
  no step touches a d-dimensional vector (see its docstring); its many tiny ops run on one thread.
* The fp32 recurrence loses digits once the residual is much smaller than when ``s`` was last
  exact: after every 10x drop of a head's residual energy its ``s``/``o`` are recomputed from the
  rows (``REFRESH_DROP``).
* Atoms whose ``o_j`` falls below ``1e-2 ||d_j||^2`` (near the span: duplicates, the chosen atom)
  have ``s_j`` and ``o_j`` recomputed directly from their rows, where the fp32 recurrence would lose
  digits; those found inside the span (``SPAN_TOL``) are retired for good.

Precision: fp32 by default (``dtype=torch.float64`` for a float64 run); bf16/fp16 inputs are upcast.
Ties: atoms whose score is within ``TIE_RTOL`` (relative) of the best count as tied, and the lowest
index wins (the reference's exact-tie rule, made robust to rounding).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from .somp import SPAN_TOL, SOMPResult, check_inputs

TIE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
FRAGILE = 1e-2          # o_j / ||d_j||^2 under which s_j, o_j are recomputed from the row
L1_MARGIN = 1e-4        # relative slack on the Cauchy-Schwarz bound (covers fp32 drift of s_j)
L1_SEEDS = 8            # exact L1 scores computed first, per head, to set the pruning threshold
L1_GROUP = 8            # heads scored together in the pruned L1 step (sorted by candidate count)
REFRESH_DROP = {torch.float32: 1e-1, torch.float64: 1e-6}  # residual drop that triggers a refresh;
# with it the recurrence keeps about 1e-6 relative accuracy, well inside TIE_RTOL
DEFAULT_MEMORY = 1 << 30  # bytes of per-step state allowed for one batch of heads
SMALL_V = 4096  # dictionaries up to this size run the pursuit in atom space (_pursue_small)
COMPILED_SMALL = True  # l2/ormp on CPU: the compiled twin of _pursue_small when it is built


# --------------------------------------------------------------------------- preparation

def check_heads(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int,
                criterion: str) -> None:
    """``check_inputs`` for head-structured inputs (clear ValueErrors, nothing is formed)."""
    if z.dim() != 3 or w_o.dim() != 3 or z.shape[0] != w_o.shape[0] or z.shape[2] != w_o.shape[1]:
        raise ValueError(f"z must be (B, n, dh) and w_o (B, dh, d) with matching B and dh; got "
                         f"z {tuple(z.shape)} and w_o {tuple(w_o.shape)}")
    if z.shape[1] < 1:
        raise ValueError("signals hold no samples (n=0); capture at least one prompt")
    if dictionary.dim() == 2 and w_o.shape[2] != dictionary.shape[1]:
        raise ValueError(f"w_o maps to d={w_o.shape[2]} but the dictionary atoms have "
                         f"d={dictionary.shape[1]}; pass w_o as the transposed W_O slice (dh, d)")
    check_inputs(torch.zeros(1, 1, w_o.shape[2]), dictionary, k, criterion)
    for name, x in (("z", z), ("w_o", w_o)):
        # one reduction instead of an elementwise isfinite pass: NaN/Inf propagate into the sum
        if not bool(torch.isfinite(x.sum())):
            raise ValueError(f"{name} contains NaN or Inf, or values so large that they overflow "
                             "(check the captured activations / model dtype)")


def _compute_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} is not supported for the computation; use torch.float32 "
                         "or torch.float64 (bf16/fp16 inputs are accepted and upcast)")
    return dtype


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


def head_batch_size(v: int, n: int, d: int, r: int, k: int, memory: int, l1: bool) -> int:
    """Heads per batch so the per-step state (about 48 v bytes per head, plus F (v, r) floats for
    the L1 rule) fits ``memory`` bytes."""
    per_head = 48 * v + 8 * (k * d + r * d + n * r + k * k) + (4 * v * r if l1 else 0)
    return max(1, int(memory // per_head))


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


# --------------------------------------------------------------------------- the pursuit


def append_support(D, p, ok, Q, T, support, MT, G, explained, total, evr, t):
    """Add atom p (B,) as support vector t of each live head, in place: orthonormal row of Q,
    triangular factor T, support ids, running explained energy and EVR.

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

class _Stats:
    def __init__(self):
        self.l1_visited = 0
        self.l1_total = 0
        self.refreshed = 0
        self.full_refresh = 0


def _init_scores(D: torch.Tensor, U: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """s0 (B, v) = row-wise ||D @ U_b||^2 for U (B, d, rr), in vocabulary chunks."""
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


def _init_F(D, MT, chunk_bytes):
    """F (B, v, r) = D @ M_b.T for every head, computed in vocabulary chunks of one product."""
    B, d, r = MT.shape
    v = D.shape[0]
    F = torch.empty(B, v, r, dtype=D.dtype, device=D.device)
    Mcat = MT.permute(1, 0, 2).reshape(d, B * r)
    vc = max(64, chunk_bytes // max(1, B * r * D.element_size()))
    for c0 in range(0, v, vc):
        c1 = min(v, c0 + vc)
        F[:, c0:c1] = (D[c0:c1] @ Mcat).view(c1 - c0, B, r).transpose(0, 1)
    return F


def _l1_exact(F, inv_norm, idx, Z, chunk_bytes, heads=None):
    """Exact L1 scores of atoms idx (b, m) per head from F (B, v, r): sum_i |F_j . z_i|,
    normalized. ``heads`` (b,) names the heads (rows of F and Z) that idx's rows belong to;
    all B heads by default."""
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


def _full_refresh(D, U, Qt, tol, chunk_bytes, MT=None, F=None):
    """Recompute s (B', v), orth (B', v) (and F (B', v, r) = D P M.T into F when given) from the
    rows: P d_j = d_j - (d_j Q.T) Q, in vocabulary chunks."""
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


def _refresh(D, frag_thr, tol, s, orth, Z, M, G, Qt, stats, F=None, FT=None):
    """Recompute s_j, o_j directly for atoms near the span (o_j < FRAGILE ||d_j||^2); retire
    the ones inside it."""
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
        F = _init_F(D, MT, chunk)  # (B, v, r) per-head projected dictionaries D M.T
        Lf = gram_factor(Z, G)
        s = torch.empty(B, v, dtype=dt, device=dev)
        vc = max(64, chunk // max(1, B * Lf.shape[2] * D.element_size()))
        for c0 in range(0, v, vc):  # ||F_j L||^2 = ||Z M d_j||^2, in chunks
            s[:, c0:c0 + vc] = torch.bmm(F[:, c0:c0 + vc], Lf).square_().sum(dim=2)
        del Lf
    else:
        s = _init_scores(D, U, chunk)  # (B, v)
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
        margin = L1_MARGIN * s.max(dim=1, keepdim=True).values.clamp_min(0)  # (B, 1)
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
            p, ok = _l1_select(F, inv_sq, inv_norm, s, margin, invalid, score, Z, n, rtol,
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
            s[hb], orth[hb] = _full_refresh(D, U[hb], Q[hb, :t + 1], tol, chunk, MT[hb], Fh)
            if F is not None:
                F[hb] = Fh
            ref[hb] = residual[hb]
            stats.full_refresh += hb.numel()
            if criterion == "l1":
                margin[hb] = L1_MARGIN * s[hb].max(dim=1, keepdim=True).values.clamp_min(0)
        _refresh(D, frag_thr, tol, s, orth, Z, M, G, Q[:, :t + 1], stats, F)
    return support, evr, Q, T


def _pursue_small(Z, M, D, Gd, E, atom_sq, k, criterion, normalize, stats, memory, bar=None):
    """One batch of heads for a small (concept) dictionary, entirely in atom space.

    With the Gram matrix ``Gd = D D.T``, the projected dictionary ``E = D M.T (v, r)`` and the
    stored columns ``A[t] = D q_t`` no step touches a d-dimensional vector:
    ``coef = A[:t, p]`` (= Q d_p), ``nu^2 = ||d_p||^2 - ||coef||^2``,
    ``a = D q = (Gd[p] - coef A) / nu``, ``M q = (E[p] - coef MQ) / nu`` with ``MQ[s] = M q_s``,
    and ``D P W q = E G M q - A.T (MQ G M q)``; the s/o recurrences are those of ``_pursue``.
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
    margin = L1_MARGIN * s.max(dim=1, keepdim=True).values.clamp_min(0)
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
            p, ok = _l1_select(F, inv_sq, inv_norm, s, margin, invalid, score, Z, n, rtol,
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
                margin[hb] = L1_MARGIN * s[hb].max(dim=1, keepdim=True).values.clamp_min(0)
            ref[hb] = residual[hb]
            stats.full_refresh += hb.numel()
    evr = torch.cumsum(evr, dim=1)  # explained energy after each step (flat once finished)
    evr = torch.where(total[:, None] > 0, evr / total.clamp_min(torch.finfo(dt).tiny)[:, None],
                      torch.zeros_like(evr)).clamp_(max=1.0)
    return support, evr, MQ, T


def _small_kernel_available(D: torch.Tensor, criterion: str) -> bool:
    """The compiled atom-space kernel (csrc/somp_small.cpp) serves the L2-type rules on CPU."""
    if not COMPILED_SMALL or criterion == "l1" or D.device.type != "cpu":
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("hp_fast::somp_small", "CPU")
    except RuntimeError:  # the operator is not registered: extension not built
        return False


def _pursue_small_compiled(Z, M, D, Gd, atom_sq, k, criterion, normalize):
    """``_pursue_small`` for l2/ormp by the compiled kernel: every head runs its whole pursuit
    with its own ``E = D M.T`` in cache. Same inputs and outputs as the twin."""
    B, n, r = Z.shape
    v, d = D.shape
    dt = D.dtype
    G = Z.transpose(1, 2) @ Z  # (B, r, r)
    total = (G * (M @ M.transpose(1, 2))).sum(dim=(1, 2))  # ||Z M||_F^2
    L = gram_factor(Z, G).contiguous()  # (B, r, rr)
    E = (D @ M.reshape(B * r, d).T).view(v, B, r).transpose(0, 1)  # (B, v, r) view, one product
    return torch.ops.hp_fast.somp_small(E, Gd, G.contiguous(), L, atom_sq, total, k,
                                        criterion == "ormp", bool(normalize), TIE_RTOL[dt],
                                        SPAN_TOL, REFRESH_DROP[dt])


def _l1_select(F, inv_sq, inv_norm, s, margin, invalid, ub, Z, n, rtol, chunk, stats):
    """Pruned exact L1 argmax for every head of the batch (see module docstring)."""
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
    ex = _l1_exact(F, inv_norm, seed, Z, chunk)
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
        ex[hs, :mg] = _l1_exact(F, inv_norm, idx[hs, :mg], Z, chunk, heads=hs)
    ex.masked_fill_(~filled, -math.inf)
    j, ok2 = pick(ex, rtol)  # lowest atom index among the near-best (rows are sorted)
    return idx[torch.arange(B, device=dev), j], ok & ok2


# --------------------------------------------------------------------------- public entry points

def somp_heads_torch(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int, *,
                     criterion: str = "l1", normalize: bool = True, center: bool = False,
                     dtype: Optional[torch.dtype] = None, memory: int = DEFAULT_MEMORY,
                     progress: bool = False, stats: Optional[dict] = None,
                     _want_factors: bool = False):
    """Head-structured SOMP; see ``hp_fast.pursuit.somp_heads`` for the contract.

    z (B, n, dh), w_o (B, dh, d), dictionary (v, d) on any device. Heads are processed in
    batches sized so that the per-step state, about ``48 * v`` bytes per head (the scores
    ``s``, ``o``, the score buffer and the two rows of ``[q; .] @ D.T``) plus ``F`` (``4 * v * r``
    bytes per head, L1 only), stays under ``memory`` (1 GiB by default); the start-up product and
    the L1 candidate scoring use chunks of at most ``max(16 MiB, memory / 8)``. Extra peak memory
    is therefore about ``1.25 * memory`` plus the fp32 copy of the dictionary when it is given in
    another dtype, plus ``Q`` (``B * k * d`` floats). Small dictionaries (``v <= 4096``) also keep
    ``D D.T`` and, per head, ``E`` (``v * r``) and the ``D q`` columns (``k * v``).
    """
    check_heads(z, w_o, dictionary, k, criterion)
    dt = _compute_dtype(dtype)
    dev = dictionary.device
    Z = z.detach().to(dev, dt)
    if center:
        Z = Z - Z.mean(dim=1, keepdim=True)
    M = w_o.detach().to(dev, dt)
    return _run(Z, M, dictionary.detach().to(dev, dt), k, criterion, normalize, memory, progress,
                stats, _want_factors)


@contextlib.contextmanager
def _one_thread(device):
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


def _run(Z, M, D, k, criterion, normalize, memory, progress, stats, want_factors):
    B, n, r = Z.shape
    v, d = D.shape
    atom_sq = D.square().sum(dim=1)
    hb = min(B, head_batch_size(v, n, d, r, k, memory, criterion == "l1"))
    st = _Stats()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=B * k, desc=f"somp {criterion} ({B} heads)", unit="head-step")
    small = v <= SMALL_V
    Gd = D @ D.T if small else None  # (v, v) Gram matrix of a small (concept) dictionary
    compiled = small and _small_kernel_available(D, criterion)
    sups, evrs, MQs, Ts = [], [], [], []
    for b0 in range(0, B, hb):
        sl = slice(b0, min(B, b0 + hb))
        if small and compiled:
            sup, ev, MQ, T = _pursue_small_compiled(Z[sl], M[sl], D, Gd, atom_sq, k, criterion,
                                                    normalize)
            if bar is not None:
                bar.update(sup.shape[0] * k)
        elif small:
            E = _init_F(D, M[sl].transpose(1, 2), 1 << 26)  # (b, v, r) = D M.T, one product
            with _one_thread(D.device):
                sup, ev, MQ, T = _pursue_small(Z[sl], M[sl], D, Gd, E, atom_sq, k, criterion,
                                               normalize, st, memory, bar)
            del E
        else:
            sup, ev, Q, T = _pursue(Z[sl], M[sl], D, atom_sq, k, criterion, normalize, st, memory,
                                    bar)
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
                     path=("small-compiled" if compiled else "small-torch") if small else "large")
    res = SOMPResult(support=torch.cat(sups), evr=torch.cat(evrs), criterion=criterion,
                     backend="torch")
    if want_factors:
        return res, torch.cat(MQs), torch.cat(Ts)
    return res


def somp_torch(signals: torch.Tensor, dictionary: torch.Tensor, k: int, *, criterion: str = "l1",
               normalize: bool = True, center: bool = False, return_coefficients: bool = False,
               dtype: Optional[torch.dtype] = None, memory: int = DEFAULT_MEMORY,
               stats: Optional[dict] = None) -> SOMPResult:
    """SOMP of raw signals (..., n, d) by the fast path (thin-QR reduction to head form)."""
    check_inputs(signals, dictionary, k, criterion)
    dt = _compute_dtype(dtype)
    dev = dictionary.device
    lead = signals.shape[:-2]
    n, d = signals.shape[-2:]
    H = signals.detach().to(dev, dt).reshape(-1, n, d)
    if center:
        H = H - H.mean(dim=1, keepdim=True)
    Z, M = signals_to_heads(H)
    res, MQ, T = _run(Z, M, dictionary.detach().to(dev, dt), k, criterion, normalize, memory,
                      False, stats, True)
    coef = None
    if return_coefficients:
        HQ = torch.bmm(Z, MQ.transpose(1, 2))  # (B, n, k) = H Q.T
        coef = coefficients_from(HQ, T, res.support).reshape(*lead, n, k)
    return SOMPResult(support=res.support.reshape(*lead, k), evr=res.evr.reshape(*lead, k),
                      coefficients=coef, criterion=criterion, backend="torch")
