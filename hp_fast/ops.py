"""Compiled operators: the only module that touches ``torch.ops.hp_fast.*``.

Two operators (schemas in csrc/module.cpp): ``head_gain`` (below) and ``somp_small``, the CPU
kernel of the atom-space pursuit over small dictionaries (csrc/somp_small.cpp; its PyTorch twin
is ``hp_fast.pursuit.small_dictionary.pursue_small``, docs/fast-pursuit.md section 10).

``head_gain`` multiplies each attention head's output by a gain while writing the
(B, T, H*dh) layout that o_proj consumes, in one pass over memory:

    attn   (B, H, T, dh) with heads_first=True (what SDPA returns), or
           (B, T, H, dh) with heads_first=False (HF attention functions, o_proj input)
    gains  (H,) shared by all rows, or (B, H) per batch row
    mask   optional bool (B, T); where False the gain is 1 (output = input)
    out    contiguous (B, T, H*dh) in attn's dtype

    out[b, t, h*dh + i] = attn[b, (h,t) | (t,h), i] * (mask[b,t] ? gains[b|-, h] : 1)

Math is in float32 (float64 for float64 attn), one rounding per element.

Backends (``op_backend``): "cpp-cpu" (csrc/head_gain.cpp), "cuda-kernel"
(csrc/cuda/head_gain.cu), or "torch-fallback" (``head_gain_reference``) when the
extension was not built or has no kernel for the device; the fallback warns once.
"""
from __future__ import annotations

import importlib
import warnings

import torch

try:  # loading the shared library runs its TORCH_LIBRARY registrations
    importlib.import_module("._C", __package__)
    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError (not built) or OSError (built against another torch)
    _IMPORT_ERROR = exc

_OP_NAME = "hp_fast::head_gain"
# Whether torch.ops.hp_fast.head_gain exists; tests set it to False to exercise the fallback.
_HAS_OP: bool = _IMPORT_ERROR is None and hasattr(torch.ops.hp_fast, "head_gain")

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_warned: set[str] = set()


def extension_available() -> bool:
    """True when the compiled hp_fast._C operator library is loaded."""
    return _HAS_OP


# Device types with a compiled kernel, looked up once (the op's registrations are static).
_KERNEL_DEVICE_TYPES = frozenset(
    device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _HAS_OP and torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, key))
_BACKEND_NAMES = {"cpu": "cpp-cpu", "cuda": "cuda-kernel"}


def _uses_kernel(device_type: str) -> bool:
    return _HAS_OP and device_type in _KERNEL_DEVICE_TYPES


def op_backend(device) -> str:
    """Which implementation ``head_gain`` uses on ``device``:
    "cpp-cpu", "cuda-kernel" or "torch-fallback"."""
    device_type = torch.device(device).type
    return _BACKEND_NAMES[device_type] if _uses_kernel(device_type) else "torch-fallback"


def _fallback_reason(device: torch.device) -> str:
    if not _HAS_OP:
        why = f" ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})" if _IMPORT_ERROR else ""
        return ("hp_fast: the compiled extension hp_fast._C is not available" + why +
                "; head_gain uses the PyTorch fallback (an extra copy per call). "
                "Rebuild with `pip install --no-build-isolation -e .`")
    return (f"hp_fast: hp_fast._C has no head_gain kernel for device type '{device.type}' "
            "(CUDA kernels are built only when setup.py finds CUDA); head_gain uses the "
            "PyTorch fallback there")


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)


def _normalize(attn, gains, mask, heads_first: bool):
    """Validate inputs (ValueError naming the bad argument); return gains as
    float32 (float64 for float64 attn) on attn's device and mask on attn's device."""
    if not isinstance(attn, torch.Tensor):
        raise TypeError(f"head_gain: attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dim() != 4:
        raise ValueError(
            "head_gain: attn must be 4-D, (B, H, T, dh) with heads_first=True or (B, T, H, dh) "
            f"with heads_first=False; got shape {tuple(attn.shape)}")
    if attn.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"head_gain: attn has dtype {attn.dtype}; supported: float32, float16, "
                         "bfloat16, float64 (convert with attn.float())")
    B = attn.shape[0]
    H, T = (attn.shape[1], attn.shape[2]) if heads_first else (attn.shape[2], attn.shape[1])
    opmath = torch.float64 if attn.dtype == torch.float64 else torch.float32
    if isinstance(gains, torch.Tensor) and gains.dtype == opmath and gains.device == attn.device:
        g = gains                                                # common case: no conversion
    else:
        g = torch.as_tensor(gains).to(device=attn.device, dtype=opmath)
    if g.dim() == 0:
        g = g.expand(H)
    if g.shape != (H,) and g.shape != (B, H):
        raise ValueError(
            f"head_gain: gains must have shape (H,) = ({H},) or (B, H) = ({B}, {H}) for attn of "
            f"shape {tuple(attn.shape)} (heads_first={heads_first}); got {tuple(g.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("head_gain: mask must be a bool tensor of shape (B, T), got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} (use mask.bool())")
        if mask.shape != (B, T):
            raise ValueError(
                f"head_gain: mask must have shape (B, T) = ({B}, {T}) for attn of shape "
                f"{tuple(attn.shape)} (heads_first={heads_first}); got {tuple(mask.shape)}")
        if mask.device != attn.device:
            mask = mask.to(attn.device)
    return g, mask


def head_gain_reference(attn: torch.Tensor, gains, mask: torch.Tensor | None = None,
                        heads_first: bool = False) -> torch.Tensor:
    """Plain PyTorch twin of ``head_gain`` (same semantics, same rounding; differentiable)."""
    g, mask = _normalize(attn, gains, mask, heads_first)
    x = attn.transpose(1, 2) if heads_first else attn           # (B, T, H, dh)
    B, T, H, dh = x.shape
    g = g.reshape(-1, 1, H, 1)                                   # (1|B, 1, H, 1)
    if mask is not None:
        g = torch.where(mask.reshape(B, T, 1, 1), g, torch.ones_like(g))  # (B, T, H, 1)
    out = (x.to(g.dtype) * g).to(attn.dtype)                     # one rounding
    return out.reshape(B, T, H * dh).contiguous()                # (B, T, H*dh)


def head_gain(attn: torch.Tensor, gains, mask: torch.Tensor | None = None,
              heads_first: bool = False) -> torch.Tensor:
    """Scale each head of ``attn`` by its gain; returns contiguous (B, T, H*dh).

    attn: (B, H, T, dh) if heads_first else (B, T, H, dh), any strides, float32/16, bf16, f64.
    gains: (H,) or (B, H) (a scalar is broadcast to all heads); converted to float32.
    mask: optional bool (B, T); rows where it is False are copied unchanged.

    >>> attn = torch.randn(2, 5, 3, 4)                 # (B, T, H, dh)
    >>> head_gain(attn, torch.tensor([1.0, -1.0, 5.0])).shape
    torch.Size([2, 5, 12])
    """
    g, mask = _normalize(attn, gains, mask, heads_first)
    if not _uses_kernel(attn.device.type):
        _warn_once(_fallback_reason(attn.device))
        return head_gain_reference(attn, g, mask, heads_first)
    return torch.ops.hp_fast.head_gain.default(attn, g, mask, heads_first)


# ---- fake (meta) kernel and autograd for the compiled op ----------------------------------

def _head_gain_fake(attn, gains, mask, heads_first):
    torch._check(attn.dim() == 4, lambda: f"head_gain: attn must be 4-D, got {attn.dim()}-D")
    B, dh = attn.shape[0], attn.shape[3]
    H, T = (attn.shape[1], attn.shape[2]) if heads_first else (attn.shape[2], attn.shape[1])
    return attn.new_empty((B, T, H * dh))                        # contiguous (B, T, H*dh)


def _setup_context(ctx, inputs, output):
    attn, gains, mask, heads_first = inputs
    ctx.heads_first = heads_first
    ctx.save_for_backward(attn, gains, mask)


def _backward(ctx, grad_out):
    """out = x * g_eff with g_eff = mask ? g : 1, so
    d attn = grad_out * g_eff (the same op on grad_out, laid back out like attn);
    d gains[b, h] = sum_{t, i} mask[b, t] * grad_out[b, t, h, i] * x[b, t, h, i]
    (then summed over b for (H,) gains).
    """
    attn, gains, mask = ctx.saved_tensors
    hf = ctx.heads_first
    B, dh = attn.shape[0], attn.shape[3]
    H, T = (attn.shape[1], attn.shape[2]) if hf else (attn.shape[2], attn.shape[1])
    go = grad_out.reshape(B, T, H, dh)                           # (B, T, H, dh)
    grad_attn = grad_gains = None
    if ctx.needs_input_grad[0]:
        grad_attn = torch.ops.hp_fast.head_gain.default(go, gains, mask, False).view(B, T, H, dh)
        if hf:
            grad_attn = grad_attn.transpose(1, 2)                # (B, H, T, dh)
    if ctx.needs_input_grad[1]:
        x = attn.transpose(1, 2) if hf else attn                 # (B, T, H, dh)
        prod = go.to(gains.dtype) * x.to(gains.dtype)            # (B, T, H, dh)
        if mask is not None:
            prod = prod * mask.reshape(B, T, 1, 1)
        grad_gains = prod.sum(dim=(1, 3))                        # (B, H)
        if gains.dim() == 1:
            grad_gains = grad_gains.sum(0)                       # (H,)
    return grad_attn, grad_gains, None, None


if _HAS_OP:
    torch.library.register_fake(_OP_NAME)(_head_gain_fake)
    torch.library.register_autograd(_OP_NAME, _backward, setup_context=_setup_context)


# ---- somp_small: atom-space SOMP over a small dictionary, one head per thread ------------------

_SOMP_SMALL = "hp_fast::somp_small"


def somp_small_available() -> bool:
    """True when hp_fast._C has the CPU kernel of ``somp_small``."""
    if _IMPORT_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_SOMP_SMALL, "CPU")
    except RuntimeError:  # the operator is not registered
        return False


def somp_small(E: torch.Tensor, Gd: torch.Tensor, G: torch.Tensor, L: torch.Tensor,
               atom_sq: torch.Tensor, total: torch.Tensor, k: int, ormp: bool, normalize: bool,
               rtol: float, span_tol: float, refresh_drop: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SOMP of B heads over v atoms in atom space, rules l2 (``ormp=False``) or ormp.

    E (B, v, r) = D M.T per head (unit last stride), Gd (v, v) = D D.T, G (B, r, r) = Z.T Z,
    L (B, r, rr) with L L.T = G, atom_sq (v,) = ||d_j||^2, total (B,) = ||Z M||_F^2; CPU tensors
    of one float dtype. rtol: tie tolerance, span_tol: SPAN_TOL, refresh_drop: REFRESH_DROP.
    Returns support (B, k) long (-1: nothing left), evr (B, k), MQ (B, k, r) rows M q_t and
    T (B, k, k) with D[S] = T.T Q. Raises RuntimeError when the extension is not built (check
    ``somp_small_available()`` first).
    """
    return torch.ops.hp_fast.somp_small.default(E, Gd, G, L, atom_sq, total, k, ormp, normalize,
                                                rtol, span_tol, refresh_drop)


def _somp_small_fake(E, Gd, G, L, atom_sq, total, k, ormp, normalize, rtol, span_tol,
                     refresh_drop):
    torch._check(E.dim() == 3, lambda: f"somp_small: E must be (B, v, r), got {E.dim()}-D")
    torch._check(k >= 1, lambda: "somp_small: k must be >= 1")
    B, r = E.shape[0], E.shape[2]
    return (E.new_empty((B, k), dtype=torch.long),  # support
            E.new_empty((B, k)),                    # evr
            E.new_empty((B, k, r)),                 # MQ
            E.new_empty((B, k, k)))                 # T


if somp_small_available():
    torch.library.register_fake(_SOMP_SMALL)(_somp_small_fake)


__all__ = ["head_gain", "head_gain_reference", "extension_available", "op_backend",
           "somp_small", "somp_small_available"]
