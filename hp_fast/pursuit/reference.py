"""Simultaneous Orthogonal Matching Pursuit: the plain reference, float64 by default.

This module is the ground truth every fast path is tested against. It follows
docs/method.md section 3 literally: at every step it forms the full correlation matrix
``D @ R.T (v, n)`` and refits the coefficients with a least-squares solve. The conventions
(criteria, ``normalize``, ``SPAN_TOL`` exclusion, ``-1`` padding, EVR) are listed in
``hp_fast.pursuit.result``.

``dtype=torch.float32`` runs the same textbook loop in float32: the naive baseline the
benchmarks time. float64 (the default) is the truth the tests compare against.
"""
from __future__ import annotations

import torch

from .result import SPAN_TOL, SOMPResult, check_inputs

REFERENCE_DTYPES = (torch.float64, torch.float32)


def selection_scores(corr: torch.Tensor, criterion: str) -> torch.Tensor:
    """corr (v, n) correlations -> (v,) score before masking / ormp division."""
    if criterion == "l1":
        return corr.abs().sum(dim=1)
    return corr.square().sum(dim=1)


def _somp_one(H: torch.Tensor, D: torch.Tensor, k: int, criterion: str, normalize: bool,
              want_coef: bool):
    """One batch element. H (n, d), D (v, d), both in the run's dtype."""
    n, d = H.shape
    dt = H.dtype
    floor = max(1e-300, torch.finfo(dt).tiny)  # 1e-300 in float64
    atom_sq = D.square().sum(dim=1)  # (v,)
    scale = atom_sq.sqrt().clamp_min(floor) if (normalize and criterion != "ormp") else None
    total = H.square().sum()
    support: list[int] = []
    evr = torch.zeros(k, dtype=dt)
    coef = torch.zeros(n, k, dtype=dt)
    R = H.clone()  # (n, d) residual
    for t in range(k):
        corr = D @ R.T  # (v, n) correlations of every atom with every residual
        if scale is not None:
            corr = corr / scale[:, None]
        score = selection_scores(corr, criterion)  # (v,)
        orth_sq = atom_sq.clone()  # squared norm of each atom outside span(D[S])
        if support:
            Q, _ = torch.linalg.qr(D[support].T)  # (d, t) orthonormal basis of the span
            orth_sq = atom_sq - (D @ Q).square().sum(dim=1)
        valid = orth_sq > SPAN_TOL * atom_sq
        valid &= atom_sq > 0
        if support:
            valid[support] = False
        if criterion == "ormp":
            score = score / orth_sq.clamp_min(floor)
        score = torch.where(valid, score, torch.full_like(score, -torch.inf))
        if not bool(valid.any()):
            evr[t:] = evr[t - 1] if t > 0 else 0.0
            break
        support.append(int(torch.argmax(score)))  # first maximum wins ties
        DS = D[support]  # (t+1, d)
        W = torch.linalg.lstsq(DS.T, H.T).solution.T  # (n, t+1) least-squares refit
        R = H - W @ DS
        evr[t] = 1.0 - R.square().sum() / total if total > 0 else 0.0
        coef[:, : t + 1] = W
        coef[:, t + 1:] = 0.0
    sup = torch.full((k,), -1, dtype=torch.long)
    sup[: len(support)] = torch.tensor(support, dtype=torch.long)
    return sup, evr, (coef if want_coef else None)


def somp_reference(signals: torch.Tensor, dictionary: torch.Tensor, k: int, *,
                   criterion: str = "l1", normalize: bool = True, center: bool = False,
                   return_coefficients: bool = False,
                   dtype: torch.dtype = torch.float64) -> SOMPResult:
    """Plain SOMP on the CPU, one batch element at a time (see module docstring).

    signals (..., n, d); dictionary (v, d). Returns support/evr (..., k) and, on request,
    coefficients (..., n, k), in ``dtype`` (float64, the ground truth, or float32, the naive
    baseline).
    """
    if dtype not in REFERENCE_DTYPES:
        raise ValueError(f"somp_reference: dtype={dtype} is not supported; use torch.float64 "
                         "(the ground truth) or torch.float32 (the naive baseline)")
    check_inputs(signals, dictionary, k, criterion)
    lead = signals.shape[:-2]
    n, d = signals.shape[-2:]
    H = signals.detach().to("cpu", dtype).reshape(-1, n, d)  # (B, n, d)
    if center:
        H = H - H.mean(dim=1, keepdim=True)
    D = dictionary.detach().to("cpu", dtype)  # (v, d)
    sups, evrs, coefs = [], [], []
    for b in range(H.shape[0]):
        s, e, c = _somp_one(H[b], D, k, criterion, normalize, return_coefficients)
        sups.append(s)
        evrs.append(e)
        coefs.append(c)
    support = torch.stack(sups).reshape(*lead, k)
    evr = torch.stack(evrs).reshape(*lead, k)
    coef = torch.stack(coefs).reshape(*lead, n, k) if return_coefficients else None
    return SOMPResult(support=support, evr=evr, coefficients=coef, criterion=criterion,
                      backend="reference")
