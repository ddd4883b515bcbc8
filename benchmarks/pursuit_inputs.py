"""Inputs of the pursuit benchmarks: real captured head outputs, their spectral profile, and
synthetic head outputs that follow it at any shape.

The bounded pursuit (docs/fast-pursuit.md section 8) is as fast as the singular values of each
head's samples fall, so timings need ``z`` with a realistic spectrum, not random normal numbers
(a flat spectrum: the worst case, also offered).

* ``real_head_z(path)``: z (L*H, n, dh) from ``hp-fast capture --out FILE`` (layer-major heads).
* ``fit_profile(z)``: per head, the singular values of z (n, dh) normalized by the largest,
  ``s_1 = 1`` and ``s_i = a i^(-alpha)`` for ``i >= 2``: log-log least squares over i = 2..r.
  Measured on 200 real prompts (``benchmarks/real_prompts.py``) with SmolLM2-135M: median
  ``s_2 = 0.167``, ``s_10 = 0.006``, ``s_64 = 0.0005``; median fit ``a = 0.219``,
  ``alpha = 1.41`` (10-90 % of s_2 over heads: 0.08-0.27). The leading left singular vector is the samples' mean direction (the mean
  explains 99.9 % of ``s_1``: head outputs are not centered).
* ``synthetic_z(heads, n, dh, profile, seed)``: z = U diag(s) V.T with each head's (a, alpha)
  drawn from the fitted heads (resampled with replacement), U's first column the constant
  vector (the mean direction, like real heads) and the rest random orthonormal, V random
  orthogonal; s extrapolated by the same law to dh values. ``profile=None``: random normal z.
* ``DEFAULT_PROFILE``: the fitted (a, alpha) medians, used when no capture is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_PROFILE = ((0.219, 1.41),)  # (a, alpha) of the median SmolLM2 head, 200 real prompts


@dataclass
class Profile:
    """Fitted spectral laws of real heads: params (H, 2) rows (a, alpha); where they came from."""

    params: torch.Tensor
    source: str

    def summary(self) -> str:
        med = self.params.median(dim=0).values
        return (f"s_i = a i^-alpha (i >= 2), {self.params.shape[0]} heads from {self.source}: "
                f"median a = {float(med[0]):.3g}, alpha = {float(med[1]):.3g}")


def real_head_z(path) -> torch.Tensor:
    """z (L*H, n, dh) float32 of a capture file or folder (layer-major heads)."""
    import hp_fast
    acts = hp_fast.HeadActivations.load(path)
    z = acts.z if isinstance(acts.z, torch.Tensor) else acts.z.materialize()
    n, L, H, dh = z.shape
    return z.float().reshape(n, L * H, dh).transpose(0, 1).contiguous()


def fit_profile(z: torch.Tensor, source: str = "captured activations") -> Profile:
    """Per head (a, alpha) of s_i / s_1 = a i^-alpha, i >= 2 (log-log least squares).
    z (B, n, dh)."""
    s = torch.linalg.svdvals(z.double())  # (B, r)
    r = s / s[:, :1].clamp_min(1e-300)
    i = torch.arange(2, r.shape[1] + 1, dtype=torch.float64)
    x = i.log()
    y = r[:, 1:].clamp_min(1e-300).log()  # (B, r - 1)
    A = torch.stack([torch.ones_like(x), x], dim=1)  # (r - 1, 2)
    sol = torch.linalg.lstsq(A.expand(y.shape[0], -1, -1), y[:, :, None]).solution[:, :, 0]
    return Profile(torch.stack([sol[:, 0].exp(), -sol[:, 1]], dim=1).float(), source)


def default_profile() -> Profile:
    return Profile(torch.tensor(DEFAULT_PROFILE), "the built-in SmolLM2 fit (DEFAULT_PROFILE)")


def singular_values(a: float, alpha: float, m: int) -> torch.Tensor:
    """(m,) s_1 = 1, s_i = min(1, a i^-alpha)."""
    i = torch.arange(1, m + 1, dtype=torch.float32)
    s = (a * i ** -alpha).clamp(max=1.0)
    s[0] = 1.0
    return s


def synthetic_z(heads: int, n: int, dh: int, profile: Profile | None, seed: int = 0
                ) -> torch.Tensor:
    """z (heads, n, dh) float32 with the profile's spectra (see the module docstring), or random
    normal z when ``profile`` is None."""
    g = torch.Generator().manual_seed(seed)
    if profile is None:
        return torch.randn(heads, n, dh, generator=g)
    m = min(n, dh)
    pick = torch.randint(profile.params.shape[0], (heads,), generator=g)
    z = torch.empty(heads, n, dh)
    for h in range(heads):
        a, alpha = (float(x) for x in profile.params[pick[h]])
        s = singular_values(a, alpha, m) * math.sqrt(n)
        X = torch.randn(n, m, generator=g)
        X[:, 0] = 1.0  # the mean direction leads, as in real head outputs
        U, _ = torch.linalg.qr(X)
        U[:, 0] = U[:, 0].abs()
        V, _ = torch.linalg.qr(torch.randn(dh, dh, generator=g))
        z[h] = (U * s) @ V[:, :m].T
    return z


def random_model_weights(heads: int, dh: int, d: int, v: int, seed: int = 0):
    """Random w_o (heads, dh, d) and unembedding D (v, d) of a model's shapes (fp32)."""
    g = torch.Generator().manual_seed(seed)
    w_o = torch.randn(heads, dh, d, generator=g) / math.sqrt(d)
    D = torch.randn(v, d, generator=g) / math.sqrt(d)
    return w_o, D
