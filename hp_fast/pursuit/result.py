"""What every pursuit backend returns, and the input checks they all run first.

SOMP itself is docs/method.md section 3. Conventions shared by every implementation
(reference, torch, triton, the compiled small-dictionary kernel):

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

The checks raise a ``ValueError`` that names the bad argument and the fix, before any
heavy work.
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
    """Raise a ValueError that names the bad argument and the fix.

    signals (..., n, d), dictionary (v, d)."""
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
    if not all_finite(signals):
        raise ValueError("signals contain NaN or Inf (check the captured activations / model dtype)")
    if not all_finite(dictionary):
        raise ValueError("dictionary contains NaN or Inf")


def all_finite(x: torch.Tensor, chunk_rows: int = 4096) -> bool:
    """True when every entry of ``x`` is finite, without an elementwise pass over all of it in
    the common case: one sum (NaN and Inf propagate into it); only when the sum is not finite
    (a NaN/Inf, or finite values whose sum overflows) are the rows checked, in chunks, so the
    check never holds a mask the size of ``x`` (a full-vocabulary dictionary of a 70B model is
    4 GB in fp32)."""
    if bool(torch.isfinite(x.sum())):
        return True
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    return all(bool(torch.isfinite(rows[i:i + chunk_rows]).all())
               for i in range(0, rows.shape[0], chunk_rows))


def check_heads(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int,
                criterion: str) -> None:
    """``check_inputs`` for head-structured inputs z (B, n, dh), w_o (B, dh, d), dictionary
    (v, d): clear ValueErrors, the (B, n, d) signals are never formed."""
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
        if not all_finite(x):
            raise ValueError(f"{name} contains NaN or Inf (check the captured activations / "
                             "model dtype)")
