"""Upper bounds on every atom's score from a few singular directions (docs/fast-pursuit.md 8).

A head's L2 score of atom ``j`` after ``t`` steps is ``s_j = ||W.T x_j||^2`` with
``W = M.T L (d, rr)`` (``L L.T = Z.T Z``) and ``x_j = P d_j`` (``P`` projects the support out).
For ANY ``R`` orthonormal columns ``U (d, R)``, split ``x = U y + w`` (``y = U.T x``,
``||w||^2 = o - ||y||^2`` with ``o = ||x||^2``). With ``K = W.T U``, ``N = W.T (I - U U.T)``:

    s = ||K y||^2 + 2 (K y).(N w) + ||N w||^2
      <= sum_r (lam_r + eta) y_r^2 + xi o + nu^2 (o - ||y||^2)
       = sum_r c_r y_r^2 + tau o,     c_r = lam_r + eta - nu^2,  tau = nu^2 + xi

where ``lam_r`` is the diagonal of ``K.T K``, ``eta`` the Frobenius norm of its off-diagonal
part, ``nu^2 = ||N||_2^2`` the largest eigenvalue of ``W.T W - K K.T`` and ``xi = ||K.T N||_2``
(``2 |a.b| <= xi (||y||^2 + ||w||^2)``). For exact singular vectors ``eta = xi = 0``,
``lam_r = sigma_r^2`` and ``nu = sigma_{R+1}``: the bound of section 8; for the computed ones the
three terms are measured (float64, small matrices) instead of assumed. ``c_r`` is raised to a tiny
floor (raising a coefficient keeps it a bound).

Per atom the pursuit keeps ``yt = sqrt(c) * y`` (so ``sum_r c_r y_r^2 = ||yt||^2``) and ``o``;
a new support vector ``q`` changes them by rank one: ``yt -= a sqrt(c) (U.T q)``, ``o -= a^2``,
``a = d_j . q``. fp32 margin (``drift_eps``): the stored ``y`` may differ from the true one by
``eps ||d_j||`` per coordinate and ``o`` by ``eps ||d_j||^2``; by the triangle inequality
``sqrt(sum c y^2) <= ||yt|| + eps ||d_j|| sqrt(sum c)``. ``eps`` covers the fp32 products
(``sqrt(d) u`` per dot product, ``u`` the unit roundoff) accumulated linearly over the steps, times
4 for safety; tests measure the real drift against float64 and check it stays far below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BOUND_R = 8          # singular directions per head at the start
BOUND_R_MAX = 32     # a head whose bound admits too many atoms may grow to this many
EPS_UNIT = {torch.float32: 4 * 2.0 ** -24, torch.float64: 4 * 2.0 ** -53}
C_FLOOR = 1e-12      # relative floor of the coefficients c_r (they stay > 0 for rescaling)


def drift_eps(dtype: torch.dtype, d: int, steps: int) -> float:
    """Relative error allowance (times ||d_j||, resp. ||d_j||^2) of the stored y and o after
    ``steps`` rank-one updates: 4 u sqrt(d) (steps + 1)."""
    return EPS_UNIT[dtype] * math.sqrt(d) * (steps + 1)


@dataclass
class Directions:
    """The bounding directions of a batch of B heads.

    U (B, d, Rc) fp32 directions (columns >= R[b] are zero), R (B,) how many each head uses,
    sqrt_c (B, Rc) the square roots of c_r (0 beyond R[b]), tau (B,), sqrt_csum (B,) =
    sqrt(sum_r c_r); the float64 pieces to add more: Gw (B, rr, rr) = W.T W, lam (B, rr)
    its eigenvalues (descending), V (B, rr, rr) its eigenvectors, rank (B,)."""

    U: torch.Tensor
    R: torch.Tensor
    sqrt_c: torch.Tensor
    tau: torch.Tensor
    sqrt_csum: torch.Tensor
    Gw: torch.Tensor
    lam: torch.Tensor
    V: torch.Tensor
    rank: torch.Tensor


def head_grams(M: torch.Tensor, L: torch.Tensor, heads_per_pass: int = 32) -> torch.Tensor:
    """Gw (B, rr, rr) = W.T W = L.T (M M.T) L in float64; M (B, r, d), L (B, r, rr)."""
    B = M.shape[0]
    out = torch.empty(B, L.shape[2], L.shape[2], dtype=torch.float64, device=M.device)
    for b0 in range(0, B, heads_per_pass):
        Mb = M[b0:b0 + heads_per_pass].double()
        Lb = L[b0:b0 + heads_per_pass].double()
        MMt = torch.bmm(Mb, Mb.transpose(1, 2))  # (b, r, r)
        out[b0:b0 + heads_per_pass] = Lb.transpose(1, 2) @ MMt @ Lb
    return out


def singular_directions(M, L, Gw, lam, V, idx_lo: int, idx_hi: int, heads) -> torch.Tensor:
    """u_r = W v_r / sqrt(lam_r) (float64) for r in [idx_lo, idx_hi) of the given heads:
    (b, d, idx_hi - idx_lo); directions with lam_r = 0 come out 0."""
    Vr = V[heads, :, idx_lo:idx_hi]  # (b, rr, m)
    scale = lam[heads, idx_lo:idx_hi].clamp_min(0).sqrt()
    inv = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-300), torch.zeros_like(scale))
    LV = torch.bmm(L[heads].double(), Vr * inv[:, None, :])  # (b, r, m)
    return torch.bmm(M[heads].double().transpose(1, 2), LV)  # (b, d, m) = M.T L V / s


def orthonormal_extension(U_old: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Columns of X (b, d, m) made orthonormal and orthogonal to U_old (b, d, R0) (both
    float64; Gram-Schmidt twice, then a QR); U_old itself is kept unchanged."""
    for _ in range(2):
        if U_old.shape[2]:
            X = X - U_old @ (U_old.transpose(1, 2) @ X)
    Qx, _ = torch.linalg.qr(X)
    return Qx


def bound_terms(M, L, Gw, U: torch.Tensor, heads):
    """(c (b, R) float64, tau (b,) float64) of the bound for directions U (b, d, R) (the fp32
    ones the state uses, promoted): see the module docstring."""
    U = U.double()
    MU = torch.bmm(M[heads].double(), U)  # (b, r, R)
    K = torch.bmm(L[heads].double().transpose(1, 2), MU)  # (b, rr, R) = W.T U
    KtK = torch.bmm(K.transpose(1, 2), K)  # (b, R, R)
    lam = torch.diagonal(KtK, dim1=1, dim2=2)
    off = KtK - torch.diag_embed(lam)
    eta = off.square().sum(dim=(1, 2)).sqrt()
    Gam = Gw[heads] - torch.bmm(K, K.transpose(1, 2))  # W.T (I - U U.T) W
    Gam = 0.5 * (Gam + Gam.transpose(1, 2))
    nu2 = torch.linalg.eigvalsh(Gam)[:, -1].clamp_min(0)
    X = torch.bmm(torch.bmm(K.transpose(1, 2), Gam), K)  # (K.T N)(K.T N).T
    X = 0.5 * (X + X.transpose(1, 2))
    xi = torch.linalg.eigvalsh(X)[:, -1].clamp_min(0).sqrt() if X.shape[1] else torch.zeros_like(nu2)
    top = Gw[heads].diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(1e-300)
    c = (lam + eta[:, None] - nu2[:, None]).clamp_min(C_FLOOR * top[:, None])
    return c, nu2 + xi


def make_directions(M, L, R0: int) -> Directions:
    """The first ``min(R0, rank)`` singular directions of every head's W = M.T L.
    M (B, r, d), L (B, r, rr) in the compute dtype."""
    B, r, d = M.shape
    dev = M.device
    Gw = head_grams(M, L)
    Gs = 0.5 * (Gw + Gw.transpose(1, 2))
    lam, V = torch.linalg.eigh(Gs)
    lam, V = lam.flip(1), V.flip(2)  # descending
    rank = (lam > 1e-12 * lam[:, :1].clamp_min(1e-300)).sum(dim=1)
    R = torch.clamp(rank, max=R0)
    Rc = max(1, int(R.max()))
    heads = torch.arange(B, device=dev)
    X = singular_directions(M, L, Gw, lam, V, 0, Rc, heads)
    U64 = orthonormal_extension(X[:, :, :0], X)
    U64 = U64 * (torch.arange(Rc, device=dev)[None, None, :] < R[:, None, None])
    U = U64.to(M.dtype)
    dirs = Directions(U=U, R=R, sqrt_c=torch.zeros(B, Rc, dtype=M.dtype, device=dev),
                      tau=torch.zeros(B, dtype=M.dtype, device=dev),
                      sqrt_csum=torch.zeros(B, dtype=M.dtype, device=dev),
                      Gw=Gw, lam=lam, V=V, rank=rank)
    set_terms(dirs, M, L, heads)
    return dirs


def set_terms(dirs: Directions, M, L, heads) -> torch.Tensor:
    """Recompute c, tau for ``heads`` from their current directions; returns the old sqrt_c
    rows (b, Rc) so the caller can rescale the stored y."""
    old = dirs.sqrt_c[heads].clone()
    c, tau = bound_terms(M, L, dirs.Gw, dirs.U[heads], heads)
    Rc = dirs.U.shape[2]
    used = torch.arange(Rc, device=c.device)[None, :] < dirs.R[heads][:, None]
    c = torch.where(used, c, torch.zeros_like(c))
    dirs.sqrt_c[heads] = c.sqrt().to(dirs.sqrt_c.dtype)
    dirs.tau[heads] = tau.to(dirs.tau.dtype)
    dirs.sqrt_csum[heads] = c.sum(dim=1).sqrt().to(dirs.tau.dtype)
    return old


def grow_directions(dirs: Directions, M, L, heads, R1: int) -> tuple[int, torch.Tensor]:
    """Add directions R[b]..R1 (capped by rank) to ``heads`` (all with the same R[b] = R0);
    widen the tensors when needed. Returns (R0, the new fp32 columns (b, d, m) placed at
    [R0, R0 + m)) and updates c/tau; the caller fills the matching columns of y."""
    R0 = int(dirs.R[heads[0]])
    R1 = min(R1, int(dirs.rank[heads].min()))
    if R1 <= R0:
        return R0, dirs.U.new_zeros(len(heads), dirs.U.shape[1], 0)
    B, d, Rc = dirs.U.shape
    if R1 > Rc:
        pad = R1 - Rc
        dirs.U = torch.cat([dirs.U, dirs.U.new_zeros(B, d, pad)], dim=2)
        dirs.sqrt_c = torch.cat([dirs.sqrt_c, dirs.sqrt_c.new_zeros(B, pad)], dim=1)
    X = singular_directions(M, L, dirs.Gw, dirs.lam, dirs.V, R0, R1, heads)
    new = orthonormal_extension(dirs.U[heads, :, :R0].double(), X).to(dirs.U.dtype)
    dirs.U[heads, :, R0:R1] = new
    dirs.R[heads] = R1
    return R0, new
