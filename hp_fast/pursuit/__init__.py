"""Public pursuit entry points and backend dispatch (SOMP: docs/method.md section 3).

``somp``       raw signals (..., n, d) against a dictionary (v, d).
``somp_heads`` head-structured signals: H_b = z_b @ w_o_b, never formed by the fast paths.
Both return ``SOMPResult`` (``result``, which also lists the conventions every backend follows).

Backends: ``"reference"`` (the float64 textbook loop, ``reference``), ``"torch"``
(``torch_backend``, CPU or GPU), ``"triton"`` (``triton_backend``, CUDA tensors, or the CPU under
``TRITON_INTERPRET=1``). ``"auto"`` picks Triton for CUDA tensors when Triton imports, else torch.
The environment variable ``HP_FAST_SOMP_BACKEND`` (``ENV_VAR``) forces a backend over the
argument. ``SOMPResult.backend`` says which one ran. How the fast backends work:
docs/fast-pursuit.md.

Modules: ``result`` (output type, input checks), ``reference``, ``numerics`` (shared by the fast
backends), ``l1_pruning``, ``small_dictionary`` (atom space), ``torch_backend``,
``triton_backend`` with ``triton_kernels``.
"""
from __future__ import annotations

import os

import torch

from .reference import somp_reference
from .result import SOMPResult, check_heads, check_inputs

BACKENDS = ("auto", "reference", "torch", "triton")
ENV_VAR = "HP_FAST_SOMP_BACKEND"

__all__ = ["somp", "somp_heads", "resolve_backend", "SOMPResult", "BACKENDS", "ENV_VAR"]


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: the env var wins, then the argument; "auto" is resolved."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    choice = forced or backend
    if choice not in BACKENDS:
        where = f"environment variable {ENV_VAR}" if forced else "backend"
        raise ValueError(f"{where}={choice!r} is unknown; use one of {BACKENDS}")
    if choice == "auto":
        return "triton" if (device.type == "cuda" and _triton_usable()) else "torch"
    if choice == "triton" and not _triton_usable():
        raise ValueError("backend='triton' needs the triton package; pip install triton, or use "
                         "backend='torch'")
    return choice


def somp(signals: torch.Tensor, dictionary: torch.Tensor, k: int, *, criterion: str = "l1",
         normalize: bool = True, center: bool = False, return_coefficients: bool = False,
         backend: str = "auto") -> SOMPResult:
    """SOMP of ``signals (..., n, d)`` on ``dictionary (v, d)``; conventions in ``result``.

    Returns support/evr (..., k) and, on request, coefficients (..., n, k) on the raw atoms."""
    check_inputs(signals, dictionary, k, criterion)
    which = resolve_backend(backend, dictionary.device)
    if which == "reference":
        return somp_reference(signals, dictionary, k, criterion=criterion, normalize=normalize,
                              center=center, return_coefficients=return_coefficients)
    if which == "torch":
        from .torch_backend import somp_torch
        return somp_torch(signals, dictionary, k, criterion=criterion, normalize=normalize,
                          center=center, return_coefficients=return_coefficients)
    from .triton_backend import somp_triton
    return somp_triton(signals, dictionary, k, criterion=criterion, normalize=normalize,
                       center=center, return_coefficients=return_coefficients)


def somp_heads(z: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, k: int, *,
               criterion: str = "l1", normalize: bool = True, center: bool = False,
               backend: str = "auto", progress: bool = False) -> SOMPResult:
    """SOMP per head, equivalent to the reference SOMP on ``z[b] @ w_o[b]``.

    z (B, n, dh) token-mean head outputs, w_o (B, dh, d) the heads' W_O slices transposed,
    dictionary (v, d). Returns support/evr (B, k).

    The fast backends never form the (n, d) signals nor any (v, n) matrix: each head is a
    projected dictionary ``D @ w_o[b].T`` updated by rank one per step (docs/fast-pursuit.md
    sections 3-5), heads are batched so every step is one large matrix product, and the
    vocabulary is processed in chunks. Extra peak memory (torch backend) is bounded by about
    1.25 GiB plus an fp32 copy of the dictionary if it is given in another dtype plus ``Q``
    (``B*k*d`` floats): heads are batched so that their per-step state (about ``48*v`` bytes per
    head) stays under 1 GiB. The triton backend keeps ``F`` or ``K`` (``v*dh`` floats per head)
    for a batch of heads sized to 2 GiB. ``progress=True`` shows a tqdm bar over head-steps.
    """
    check_heads(z, w_o, dictionary, k, criterion)
    which = resolve_backend(backend, dictionary.device)
    if which == "reference":  # the ground truth: forms the signals and runs the float64 loop
        H = torch.bmm(z.detach().double().cpu(), w_o.detach().double().cpu())  # (B, n, d)
        return somp_reference(H, dictionary, k, criterion=criterion, normalize=normalize,
                              center=center)
    if which == "torch":
        from .torch_backend import somp_heads_torch
        return somp_heads_torch(z, w_o, dictionary, k, criterion=criterion, normalize=normalize,
                                center=center, progress=progress)
    from .triton_backend import somp_heads_triton
    return somp_heads_triton(z, w_o, dictionary, k, criterion=criterion, normalize=normalize,
                             center=center, progress=progress)
