"""Public pursuit entry points and backend dispatch.

``somp``       raw signals (..., n, d) against a dictionary (v, d).
``somp_heads`` head-structured signals: H_b = z_b @ w_o_b, never formed by the fast paths.
Both return ``SOMPResult`` with the conventions of ``hp_fast.somp`` (the reference module).
"""
from __future__ import annotations

import torch

from .somp import SOMPResult, somp_reference


def somp(signals: torch.Tensor, dictionary: torch.Tensor, k: int, *, criterion: str = "l1",
         normalize: bool = True, center: bool = False, return_coefficients: bool = False,
         backend: str = "reference") -> SOMPResult:
    """SOMP of ``signals (..., n, d)`` on ``dictionary (v, d)``; see ``hp_fast.somp`` module."""
    return somp_reference(signals, dictionary, k, criterion=criterion, normalize=normalize,
                          center=center, return_coefficients=return_coefficients)


def somp_heads(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int, *,
               criterion: str = "l1", normalize: bool = True, center: bool = False,
               backend: str = "reference", progress: bool = False) -> SOMPResult:
    """SOMP per head. z (B, n, dh) token-mean head outputs, w_o (B, dh, d) the heads' W_O
    slices transposed (so each head's samples are ``z[b] @ w_o[b]``), dictionary (v, d).
    Returns support/evr (B, k)."""
    H = torch.bmm(z.double(), w_o.double())  # (B, n, d)
    return somp_reference(H, dictionary, k, criterion=criterion, normalize=normalize,
                          center=center)
