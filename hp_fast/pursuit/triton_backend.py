"""Fused Triton kernels for SOMP: the ``"triton"`` backend (CUDA; the CPU under TRITON_INTERPRET=1).

State per head (fast-pursuit.md sections 3-5), fp32:
* ``X (v, r)``: ``F = D P M.T`` for the L1 rule, ``K = F L`` (``L L.T = Z.T Z``) for
  ``l2``/``ormp``;
* ``o (v,)``: ``||P d_j||^2``, NaN for atoms never to choose (chosen, zero, inside the span).

Kernels (one family, this file):
* ``_score_kernel``   grid (heads, vocab tiles): a tile of ``F @ Z.T`` is formed on chip and
  reduced over samples (``|.|``), or the squared row norms of ``K`` are taken; scaled
  (``1/||d_j||``, ``1/||d_j||^2`` or ``1/o_j``), invalid atoms masked, and each tile writes its best
  (score, atom). No ``(v, n)`` buffer exists. A tiny torch reduction over tiles picks the winner.
* ``_update_kernel``  grid (head blocks, vocab tiles): the new column ``a = D q`` for a block of
  heads is one on-chip product of a dictionary tile with the block's ``q`` rows (the dictionary
  tile is read once per head block, in its own dtype: bf16/fp16/fp32), then fused with the
  rank-one update ``X -= a outer c`` (``c = M q`` or ``L.T M q``) and ``o -= a^2``.
The new support vector (Gram-Schmidt with re-orthogonalization, ``B x t x d``), the EVR
(``||Z M q||^2``) and the tile reduction are small torch ops shared with ``hp_fast.fast_somp``;
the start ``X = D @ (M.T or M.T L)`` is one chunked matmul.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fast_somp import (FRAGILE, REFRESH_DROP, TIE_RTOL, _full_refresh, _init_F, _refresh, _Stats,
                        append_support, check_heads, coefficients_from, gram_factor,
                        signals_to_heads)
from .somp import SPAN_TOL, SOMPResult, check_inputs

MODE = {"l1": 0, "l2": 1, "ormp": 2}
DEFAULT_MEMORY = 2 << 30


@triton.jit
def _score_kernel(X_ptr, Z_ptr, orth_ptr, tol_ptr, scale_ptr, best_ptr, arg_ptr,
                  v, n, r, n_tiles, rtol,
                  MODE: tl.constexpr, NORMALIZE: tl.constexpr,
                  BV: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: heads * v * r passes 2**31 on big models
    tile = tl.program_id(1)
    rows = tile * BV + tl.arange(0, BV)
    cols = tl.arange(0, BR)
    rmask = rows < v
    x = tl.load(X_ptr + b * v * r + rows[:, None].to(tl.int64) * r + cols[None, :],
                mask=rmask[:, None] & (cols[None, :] < r), other=0.0).to(tl.float32)
    if MODE == 0:
        score = tl.zeros([BV], dtype=tl.float32)
        for n0 in range(0, n, BN):  # a (BV, BN) tile of F @ Z.T, reduced over samples on chip
            ns = n0 + tl.arange(0, BN)
            zc = tl.load(Z_ptr + b * n * r + ns[:, None] * r + cols[None, :],
                         mask=(ns[:, None] < n) & (cols[None, :] < r), other=0.0).to(tl.float32)
            corr = tl.dot(x, tl.trans(zc), input_precision="ieee")
            score += tl.sum(tl.abs(corr), axis=1)
    else:
        score = tl.sum(x * x, axis=1)
    o = tl.load(orth_ptr + b * v + rows, mask=rmask, other=float("nan"))
    tol = tl.load(tol_ptr + rows, mask=rmask, other=0.0)
    if MODE == 2:
        score = score / o
    elif NORMALIZE:
        score = score * tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    valid = rmask & (o > tol)  # NaN compares false: chosen / retired atoms drop out
    score = tl.where(valid, score, float("-inf"))
    best = tl.max(score, axis=0)
    # lowest index among the near-best (within rtol, as the torch path's `pick`): fp32 cannot
    # order exact duplicates or true ties, so both paths resolve them the reference's way
    thr = tl.where(best == float("-inf"), best, best - rtol * tl.abs(best))
    arg = tl.min(tl.where(score >= thr, rows, 2147483647), axis=0)
    tl.store(best_ptr + b * n_tiles + tile, best)
    tl.store(arg_ptr + b * n_tiles + tile, arg)


@triton.jit
def _update_kernel(D_ptr, Qn_ptr, C_ptr, X_ptr, orth_ptr, B, v, d, r,
                   BH: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    hb = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BV + tl.arange(0, BV)
    heads = hb * BH + tl.arange(0, BH)
    rmask = rows < v
    hmask = heads < B
    # a = D_tile @ Q_block.T: the new column D q of every head of the block, fp32 accumulation
    acc = tl.zeros([BV, BH], dtype=tl.float32)
    for d0 in range(0, d, BD):
        ds = d0 + tl.arange(0, BD)
        dt = tl.load(D_ptr + rows[:, None].to(tl.int64) * d + ds[None, :],
                     mask=rmask[:, None] & (ds[None, :] < d), other=0.0).to(tl.float32)
        qt = tl.load(Qn_ptr + heads[None, :] * d + ds[:, None],
                     mask=hmask[None, :] & (ds[:, None] < d), other=0.0).to(tl.float32)
        acc += tl.dot(dt, qt, input_precision="ieee")
    cols = tl.arange(0, BR)
    hsel = tl.arange(0, BH)
    for h in tl.static_range(BH):
        head = (hb * BH + h).to(tl.int64)
        if head < B:
            a = tl.sum(tl.where(hsel[None, :] == h, acc, 0.0), axis=1)  # (BV,) column h
            c = tl.load(C_ptr + head * r + cols, mask=cols < r, other=0.0)
            xp = X_ptr + head * v * r + rows[:, None] * r + cols[None, :]
            xm = rmask[:, None] & (cols[None, :] < r)
            x = tl.load(xp, mask=xm, other=0.0)
            tl.store(xp, x - a[:, None] * c[None, :], mask=xm)  # rank-one update of F or K
            op = orth_ptr + head * v + rows
            o = tl.load(op, mask=rmask, other=0.0)
            tl.store(op, o - a * a, mask=rmask)


def _next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (int(x) - 1).bit_length()))


def _select(X, Z, orth, tol, scale, mode, normalize, rtol, BV):
    """Per-tile best (score, atom) from the score kernel, then the tiny reduction over tiles."""
    B, v, r = X.shape
    n = Z.shape[1]
    nt = triton.cdiv(v, BV)
    best = torch.empty(B, nt, dtype=torch.float32, device=X.device)
    arg = torch.empty(B, nt, dtype=torch.int32, device=X.device)
    _score_kernel[(B, nt)](X, Z, orth, tol, scale, best, arg, v, n, r, nt, float(rtol),
                           MODE=mode, NORMALIZE=normalize, BV=BV, BN=16, BR=_next_pow2(r))
    top = best.max(dim=1, keepdim=True).values
    ok = torch.isfinite(top[:, 0])
    near = best >= top - rtol * top.abs()  # tiles holding a (near-)best atom; lowest index wins
    cand = torch.where(near, arg.to(torch.long), torch.full_like(arg, v, dtype=torch.long))
    return cand.min(dim=1).values.clamp_max(v - 1), ok


def _pursue_triton(Z, M, D, Dk, atom_sq, k, criterion, normalize, stats, chunk, bar=None):
    """One batch of heads: Z (B, n, r), M (B, r, d) fp32; D fp32 (v, d); Dk: D in its own
    dtype (what the update kernel reads)."""
    B, n, r = Z.shape
    v, d = D.shape
    dev = D.device
    dt = torch.float32
    rtol = TIE_RTOL[dt]
    mode = MODE[criterion]
    G = Z.transpose(1, 2) @ Z
    total = (G * (M @ M.transpose(1, 2))).sum(dim=(1, 2))
    MT = M.transpose(1, 2).contiguous()
    U = MT @ gram_factor(Z, G)  # (B, d, rr)
    proj = MT if criterion == "l1" else U.contiguous()  # X = D P proj
    X = _init_F(D, proj, chunk).contiguous()  # (B, v, rx)
    rx = X.shape[2]
    tol = (SPAN_TOL * atom_sq).contiguous()
    orth = atom_sq.expand(B, v).clone()
    orth[:, atom_sq <= 0] = math.nan
    frag_thr = FRAGILE * atom_sq
    if criterion == "l1":
        scale = torch.where(atom_sq > 0, atom_sq.rsqrt(), torch.zeros_like(atom_sq))
    else:
        scale = torch.where(atom_sq > 0, 1.0 / atom_sq, torch.zeros_like(atom_sq))
    scale = scale.contiguous()
    Zc = Z.contiguous()
    Q = torch.zeros(B, k, d, dtype=dt, device=dev)
    T = torch.zeros(B, k, k, dtype=dt, device=dev)
    support = torch.full((B, k), -1, dtype=torch.long, device=dev)
    evr = torch.zeros(B, k, dtype=dt, device=dev)
    explained = torch.zeros(B, dtype=dt, device=dev)
    ref = total.clone()
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    BV, BH, BD = 32, 16, 32
    for t in range(k):
        p, ok = _select(X, Zc, orth, tol, scale, mode, normalize and criterion != "ormp", rtol, BV)
        ok &= alive
        alive = ok
        if not bool(ok.any()):
            evr[:, t:] = evr[:, t - 1:t] if t > 0 else 0.0
            break
        q, _, _, _ = append_support(D, p, ok, Q, T, support, MT, G, explained, total, evr, t)
        if bar is not None:
            bar.update(B)
        if t == k - 1:
            break
        c = torch.bmm(q[:, None, :], proj)[:, 0].contiguous()  # (B, rx): M q or L.T M q
        grid = (triton.cdiv(B, BH), triton.cdiv(v, BV))
        _update_kernel[grid](Dk, q.contiguous(), c, X, orth, B, v, d, rx,
                             BH=BH, BV=BV, BD=BD, BR=_next_pow2(rx))
        orth[rows[ok], p[ok]] = math.nan
        residual = total - explained
        stale = (residual < REFRESH_DROP[dt] * ref) & ok
        if bool(stale.any()):  # fp32 drift: recompute X, o from the rows for those heads
            hb = stale.nonzero()[:, 0]
            Xh = X[hb]
            _, orth[hb] = _full_refresh(D, U[hb], Q[hb, :t + 1], tol, chunk, proj[hb], Xh)
            X[hb] = Xh
            ref[hb] = residual[hb]
            stats.full_refresh += hb.numel()
        _refresh(D, frag_thr, tol, None, orth, Z, M, G, Q[:, :t + 1], stats, X, proj)
    return support, evr, Q, T


def _run(Z, M, Dk, k, criterion, normalize, memory, progress, want_factors):
    B, n, r = Z.shape
    v, d = Dk.shape
    D = Dk.to(torch.float32)
    atom_sq = D.square().sum(dim=1)
    per_head = 4 * v * (max(r, 1) + 8)
    hb = max(1, min(B, memory // per_head))
    st = _Stats()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=B * k, desc=f"somp {criterion} ({B} heads, triton)", unit="head-step")
    out = []
    for b0 in range(0, B, hb):
        sl = slice(b0, min(B, b0 + hb))
        out.append(_pursue_triton(Z[sl], M[sl], D, Dk, atom_sq, k, criterion, normalize, st,
                                  max(1 << 24, memory // 8), bar))
    if bar is not None:
        bar.close()
    sup, evr, Q, T = (torch.cat([o[i] for o in out]) for i in range(4))
    res = SOMPResult(support=sup, evr=evr, criterion=criterion, backend="triton")
    return (res, Q, T) if want_factors else res


def _kernel_dtype(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return x.contiguous()
    return x.to(torch.float32).contiguous()


def somp_heads_triton(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int, *,
                      criterion: str = "l1", normalize: bool = True, center: bool = False,
                      memory: int = DEFAULT_MEMORY, progress: bool = False) -> SOMPResult:
    """Head-structured SOMP with the Triton kernels; contract of ``hp_fast.pursuit.somp_heads``.

    Peak extra memory: ``X`` (``v * r`` fp32 per head) and ``o`` for a batch of heads sized to
    ``memory`` bytes (2 GiB by default), plus chunks of ``memory / 8`` for the start-up product."""
    check_heads(z, w_o, dictionary, k, criterion)
    dev = dictionary.device
    Z = z.detach().to(dev, torch.float32)
    if center:
        Z = Z - Z.mean(dim=1, keepdim=True)
    M = w_o.detach().to(dev, torch.float32)
    return _run(Z, M, _kernel_dtype(dictionary.detach()), k, criterion, normalize, memory,
                progress, False)


def somp_triton(signals: torch.Tensor, dictionary: torch.Tensor, k: int, *, criterion: str = "l1",
                normalize: bool = True, center: bool = False, return_coefficients: bool = False,
                memory: int = DEFAULT_MEMORY) -> SOMPResult:
    """SOMP of raw signals (..., n, d) with the Triton kernels (thin-QR reduction to head form)."""
    check_inputs(signals, dictionary, k, criterion)
    dev = dictionary.device
    lead = signals.shape[:-2]
    n, d = signals.shape[-2:]
    H = signals.detach().to(dev, torch.float32).reshape(-1, n, d)
    if center:
        H = H - H.mean(dim=1, keepdim=True)
    Z, M = signals_to_heads(H)
    res, Q, T = _run(Z.contiguous(), M.contiguous(), _kernel_dtype(dictionary.detach()), k,
                     criterion, normalize, memory, False, True)
    coef = None
    if return_coefficients:
        HQ = torch.bmm(Z, torch.bmm(M, Q.transpose(1, 2)))
        coef = coefficients_from(HQ, T, res.support).reshape(*lead, n, k)
    return SOMPResult(support=res.support.reshape(*lead, k), evr=res.evr.reshape(*lead, k),
                      coefficients=coef, criterion=criterion, backend="triton")
