"""Host side of the ``"triton"`` backend (CUDA; the CPU under TRITON_INTERPRET=1).

SOMP is docs/method.md section 3; the kernels and their block configurations are in
``triton_kernels`` (docs/fast-pursuit.md sections 1, 3-5). Per step: ``score_kernel`` gives each
vocabulary tile's best (score, atom) and a tiny torch reduction over tiles picks the winner; the
new support vector (Gram-Schmidt with re-orthogonalization, ``B x t x d``) and the EVR
(``||Z M q||^2``) are the torch ops of ``numerics``; ``update_kernel`` applies the rank-one update.
The start ``X = D @ (M.T or M.T L)`` is one chunked matmul, and the fp32 refreshes (section 9) are
those of the torch backend.
"""
from __future__ import annotations

import math

import torch
import triton

from .numerics import (FRAGILE, REFRESH_DROP, TIE_RTOL, PursuitStats, append_support,
                       full_refresh, gram_factor, init_projected, refresh_fragile, somp_signals)
from .result import SPAN_TOL, SOMPResult, check_heads
from .triton_kernels import (DICTIONARY_DTYPES, MODE, kernel_precision, score_config,
                             score_kernel, update_config, update_kernel)

DEFAULT_MEMORY = 2 << 30


def _select(X, Z, orth, tol, scale, mode, normalize, rtol, precision):
    """Per-tile best (score, atom) from the score kernel, then the tiny reduction over tiles."""
    B, v, r = X.shape
    n = Z.shape[1]
    cfg = score_config(mode, normalize, r, precision)
    nt = triton.cdiv(v, cfg["BV"])
    best = torch.empty(B, nt, dtype=torch.float32, device=X.device)
    arg = torch.empty(B, nt, dtype=torch.int32, device=X.device)
    score_kernel[(B, nt)](X, Z, orth, tol, scale, best, arg, v, n, r, nt, float(rtol), **cfg)
    top = best.max(dim=1, keepdim=True).values
    ok = torch.isfinite(top[:, 0])
    near = best >= top - rtol * top.abs()  # tiles holding a (near-)best atom; lowest index wins
    cand = torch.where(near, arg.to(torch.long), torch.full_like(arg, v, dtype=torch.long))
    return cand.min(dim=1).values.clamp_max(v - 1), ok


def _pursue_triton(Z, M, D, Dk, atom_sq, k, criterion, normalize, stats, chunk, precision,
                   bar=None):
    """One batch of heads: Z (B, n, r), M (B, r, d) fp32; D fp32 (v, d); Dk: D in its own
    dtype (what the update kernel reads); precision: what the kernels' tl.dot gets."""
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
    X = init_projected(D, proj, chunk).contiguous()  # (B, v, rx)
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
    ucfg = update_config(rx, precision)
    for t in range(k):
        p, ok = _select(X, Zc, orth, tol, scale, mode, normalize and criterion != "ormp", rtol,
                        precision)
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
        grid = (triton.cdiv(B, ucfg["BH"]), triton.cdiv(v, ucfg["BV"]))
        update_kernel[grid](Dk, q.contiguous(), c, X, orth, B, v, d, rx, **ucfg)
        orth[rows[ok], p[ok]] = math.nan
        residual = total - explained
        stale = (residual < REFRESH_DROP[dt] * ref) & ok
        if bool(stale.any()):  # fp32 drift: recompute X, o from the rows for those heads
            hb = stale.nonzero()[:, 0]
            Xh = X[hb]
            _, orth[hb] = full_refresh(D, U[hb], Q[hb, :t + 1], tol, chunk, proj[hb], Xh)
            X[hb] = Xh
            ref[hb] = residual[hb]
            stats.full_refresh += hb.numel()
        refresh_fragile(D, frag_thr, tol, None, orth, Z, M, G, Q[:, :t + 1], stats, X, proj)
    return support, evr, Q, T


def _run(Z, M, Dk, k, criterion, normalize, memory, progress, want_factors, precision="ieee"):
    """All heads, in batches sized to ``memory``: Z (B, n, r), M (B, r, d) fp32, Dk (v, d).

    Returns the result, plus Q (B, k, d) and T (B, k, k) with ``want_factors``."""
    B, n, r = Z.shape
    v, d = Dk.shape
    precision = kernel_precision(precision)
    D = Dk.to(torch.float32)
    atom_sq = D.square().sum(dim=1)
    per_head = 4 * v * (max(r, 1) + 8)
    hb = max(1, min(B, memory // per_head))
    st = PursuitStats()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=B * k, desc=f"somp {criterion} ({B} heads, triton)", unit="head-step")
    out = []
    for b0 in range(0, B, hb):
        sl = slice(b0, min(B, b0 + hb))
        out.append(_pursue_triton(Z[sl], M[sl], D, Dk, atom_sq, k, criterion, normalize, st,
                                  max(1 << 24, memory // 8), precision, bar))
    if bar is not None:
        bar.close()
    sup, evr, Q, T = (torch.cat([o[i] for o in out]) for i in range(4))
    res = SOMPResult(support=sup, evr=evr, criterion=criterion, backend="triton")
    return (res, Q, T) if want_factors else res


def _kernel_dtype(x: torch.Tensor) -> torch.Tensor:
    """The dictionary as update_kernel reads it: its own dtype when supported, else fp32."""
    if x.dtype in DICTIONARY_DTYPES:
        return x.contiguous()
    return x.to(torch.float32).contiguous()


def somp_heads_triton(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int, *,
                      criterion: str = "l1", normalize: bool = True, center: bool = False,
                      memory: int = DEFAULT_MEMORY, progress: bool = False,
                      precision: str = "ieee") -> SOMPResult:
    """Head-structured SOMP with the Triton kernels; contract of ``hp_fast.pursuit.somp_heads``.

    precision: the kernels' ``tl.dot`` input precision (``triton_kernels.DOT_PRECISIONS``):
    ``"ieee"`` (exact fp32 products) or a tensor-core split (``"tf32x3"``, ``"bf16x3"``,
    ``"bf16x6"``), to be trusted only where benchmarks/bench_precision.py found it exact.

    z (B, n, dh), w_o (B, dh, d), dictionary (v, d). Peak extra memory: ``X`` (``v * r`` fp32 per
    head) and ``o`` for a batch of heads sized to ``memory`` bytes (2 GiB by default), plus chunks
    of ``memory / 8`` for the start-up product."""
    check_heads(z, w_o, dictionary, k, criterion)
    dev = dictionary.device
    Z = z.detach().to(dev, torch.float32)  # (B, n, dh)
    if center:
        Z = Z - Z.mean(dim=1, keepdim=True)
    M = w_o.detach().to(dev, torch.float32)  # (B, dh, d)
    return _run(Z, M, _kernel_dtype(dictionary.detach()), k, criterion, normalize, memory,
                progress, False, precision)


def somp_triton(signals: torch.Tensor, dictionary: torch.Tensor, k: int, *, criterion: str = "l1",
                normalize: bool = True, center: bool = False, return_coefficients: bool = False,
                memory: int = DEFAULT_MEMORY, precision: str = "ieee") -> SOMPResult:
    """SOMP of raw signals (..., n, d) with the Triton kernels (thin-QR reduction to head form);
    ``precision`` as in ``somp_heads_triton``."""

    def run(Z, M):  # Z (B, n, r), M (B, r, d) fp32
        res, Q, T = _run(Z.contiguous(), M.contiguous(), _kernel_dtype(dictionary.detach()), k,
                         criterion, normalize, memory, False, True, precision)
        MQ = torch.bmm(M, Q.transpose(1, 2)).transpose(1, 2)  # (B, k, r) rows M q_t
        return res, MQ, T

    return somp_signals(signals, dictionary, k, run, criterion=criterion, center=center,
                        return_coefficients=return_coefficients, dtype=torch.float32,
                        backend="triton")
