"""Planted pursuit inputs with a unique greedy path, and the comparison every backend test uses.

Inputs are sparse combinations of planted atoms with weights 8, 4, 2, 1, ... and small noise, so a
different support is a bug, not a tie. EVR tolerance: 2e-5 absolute; the fast paths compute in fp32
and the EVR is a ratio of sums of squares, good to about 1e-6.
"""
import zlib

import torch

EVR_ATOL = 2e-5
CRITERIA = ("l1", "l2", "ormp")


def stable_seed(*parts) -> int:
    """A seed that is the same in every process (Python's str hash is salted per process)."""
    return zlib.crc32(repr(parts).encode()) % 1000


def planted(B, n, d, v, ks, seed, dup=False, dtype=torch.float32):
    """H (B, n, d) = sparse combos of ks planted atoms with geometric weights; D (v, d)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(v, d, generator=g)
    D = D * (0.5 + torch.rand(v, 1, generator=g))  # unequal norms: normalize matters
    idx = torch.stack([torch.randperm(v, generator=g)[:ks] for _ in range(B)])
    if dup:  # an exact copy of a planted atom elsewhere in the dictionary
        j = int(idx[0, 0])
        D[(j + 5) % v] = D[j]
    w = 8.0 * 2.0 ** -torch.arange(ks, dtype=torch.float32)
    C = (torch.rand(B, n, ks, generator=g) + 0.5) * w
    H = torch.einsum("bnk,bkd->bnd", C, D[idx]) + 1e-3 * torch.randn(B, n, d, generator=g)
    return H.to(dtype), D.to(dtype)


def planted_heads(B, n, dh, d, v, ks, seed):
    """z (B, n, dh), w_o (B, dh, d) whose products are combos of ks planted atoms."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(v, d, generator=g)
    idx = torch.stack([torch.randperm(v, generator=g)[:ks] for _ in range(B)])
    w = 8.0 * 2.0 ** -torch.arange(ks, dtype=torch.float32)
    A = torch.randn(B, dh, ks, generator=g) * w
    w_o = A @ D[idx] + 1e-3 * torch.randn(B, dh, d, generator=g)
    z = torch.randn(B, n, dh, generator=g)
    return z, w_o, D


# (B, n, d, v, ks, k, extra): odd sizes, n=1, v below one tile, k = v, duplicates, bf16
CASES = {
    "odd": (2, 7, 23, 37, 4, 4, {}),
    "n1": (2, 1, 16, 29, 3, 3, {}),
    "v_small": (1, 5, 16, 10, 3, 3, {}),
    "k_eq_v": (2, 4, 12, 5, 5, 5, {}),
    "dup": (2, 6, 16, 20, 3, 3, {"dup": True}),
    "bf16": (2, 6, 20, 33, 3, 3, {"dtype": torch.bfloat16}),
}


def check_same(ref, got, coef=False):
    assert torch.equal(ref.support, got.support.cpu()), (ref.support, got.support)
    torch.testing.assert_close(got.evr.double().cpu(), ref.evr, atol=EVR_ATOL, rtol=0)
    if coef:
        scale = ref.coefficients.abs().max().clamp_min(1.0)
        assert (got.coefficients.double().cpu() - ref.coefficients).abs().max() < 1e-3 * scale
