"""Simultaneous Orthogonal Matching Pursuit: the plain float64 reference.

This module is the ground truth every fast path is tested against. It follows
method.md section 3 literally: it forms the full correlation matrix ``D @ R.T``
and refits the coefficients with a least-squares solve at every step.

Conventions shared by every implementation in the package
--------------------------------------------------------
* ``criterion="l1"``   score_j = sum_i |<a_j, r_i>|        (the paper's rule)
* ``criterion="l2"``   score_j = sum_i <a_j, r_i>^2
* ``criterion="ormp"`` score_j = sum_i <d_j, r_i>^2 / ||P_perp d_j||^2  (SPAMS' rule;
  P_perp projects onto the complement of the chosen atoms' span)
  where ``a_j`` is atom ``j`` scaled to unit norm when ``normalize=True`` and the raw
  atom otherwise (``ormp`` is scale invariant, so ``normalize`` does not change it).
* Atoms already chosen, zero atoms, and atoms whose part outside the span of the
  chosen ones has squared norm below ``SPAN_TOL * ||d_j||^2`` are never chosen.
  When no atom is left, the remaining support entries are ``-1`` and the EVR stays
  flat.
* Ties go to the lowest atom index.
* ``evr[t] = 1 - ||R_t||_F^2 / ||H||_F^2``; a batch element whose signals are all
  zero has EVR 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

CRITERIA = ("l1", "l2", "ormp")
SPAN_TOL = 1e-5  # relative squared norm under which an atom counts as inside the span


@dataclass
class SOMPResult:
    """Output of a pursuit.

    support:      (..., k) long, atom indices in selection order (-1: nothing left)
    evr:          (..., k) float, explained-variance ratio after each step
    coefficients: (..., n, k) float or None, coefficients on the raw atoms
    """

    support: torch.Tensor
    evr: torch.Tensor
    coefficients: Optional[torch.Tensor] = None
    criterion: str = "l1"
    backend: str = "reference"

    @property
    def final_evr(self) -> torch.Tensor:
        """(...,) EVR after the last step."""
        return self.evr[..., -1]


def check_inputs(signals: torch.Tensor, dictionary: torch.Tensor, k: int, criterion: str) -> None:
    """Raise a ValueError that names the bad argument and the fix."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is unknown; use one of {CRITERIA}")
    if dictionary.dim() != 2:
        raise ValueError(f"dictionary must be (v, d), got shape {tuple(dictionary.shape)}")
    if signals.dim() < 2:
        raise ValueError(f"signals must be (..., n, d), got shape {tuple(signals.shape)}")
    v, d = dictionary.shape
    if signals.shape[-1] != d:
        raise ValueError(
            f"signals have d={signals.shape[-1]} but the dictionary atoms have d={d}; "
            "pass signals in the residual-stream space of the dictionary")
    if signals.shape[-2] < 1:
        raise ValueError("signals hold no samples (n=0); capture at least one prompt")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > v:
        raise ValueError(
            f"somp was asked for k={k} atoms but the dictionary has only v={v}; "
            f"pass k <= {v} (rank_heads caps k for you)")
    if not torch.isfinite(signals).all():
        raise ValueError("signals contain NaN or Inf (check the captured activations / model dtype)")
    if not torch.isfinite(dictionary).all():
        raise ValueError("dictionary contains NaN or Inf")


def selection_scores(corr: torch.Tensor, criterion: str) -> torch.Tensor:
    """corr (v, n) correlations -> (v,) score before masking / ormp division."""
    if criterion == "l1":
        return corr.abs().sum(dim=1)
    return corr.square().sum(dim=1)


def _somp_one(H: torch.Tensor, D: torch.Tensor, k: int, criterion: str, normalize: bool,
              want_coef: bool):
    """One batch element. H (n, d) float64, D (v, d) float64."""
    n, d = H.shape
    v = D.shape[0]
    atom_sq = D.square().sum(dim=1)  # (v,)
    scale = atom_sq.sqrt().clamp_min(1e-300) if (normalize and criterion != "ormp") else None
    total = H.square().sum()
    support: list[int] = []
    evr = torch.zeros(k, dtype=torch.float64)
    coef = torch.zeros(n, k, dtype=torch.float64)
    R = H.clone()
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
            score = score / orth_sq.clamp_min(1e-300)
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
                   return_coefficients: bool = False) -> SOMPResult:
    """Plain SOMP, float64, one batch element at a time (see module docstring).

    signals (..., n, d); dictionary (v, d). Returns support/evr (..., k).
    """
    check_inputs(signals, dictionary, k, criterion)
    lead = signals.shape[:-2]
    n, d = signals.shape[-2:]
    H = signals.detach().to("cpu", torch.float64).reshape(-1, n, d)  # (B, n, d)
    if center:
        H = H - H.mean(dim=1, keepdim=True)
    D = dictionary.detach().to("cpu", torch.float64)  # (v, d)
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
