"""Head gains applied inside the attention call, through transformers' attention registry.

In transformers v5 every supported attention module does::

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
                                                                eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask,
                                                    dropout=..., scaling=..., **kwargs)
    # query (B, H, T, dh), key/value (B, Hkv, S, dh); attn_output (B, T, H, dh)
    attn_output = o_proj(attn_output.reshape(B, T, -1).contiguous())

For every implementation ``X`` a model uses (``sdpa``, ``eager``, ``flash_attention_2``, ...)
we register a wrapper ``hp_fast_X`` (and the mask function of ``X`` under the same name, so
the model builds exactly the masks it built before). While an edit is active, the configs
that the decoder's attention modules read say ``hp_fast_X``; the wrapper looks the calling
module up in ``_ACTIVE`` (filled by the edit) and

* for a module without an edit, returns ``X``'s result untouched (bit-identical);
* for ``sdpa``, runs ``scaled_dot_product_attention`` itself (mirroring transformers'
  ``sdpa_attention_forward``: GQA via ``enable_gqa`` / ``pack_gqa`` / ``repeat_kv``, causal
  handling, scaling) and feeds its ``(B, H, T, dh)`` output to ``ops.head_gain(...,
  heads_first=True)``: one pass writes the ``(B, T, H*dh)`` o_proj input with the gains
  applied, replacing transformers' transpose + contiguous copy;
* for other implementations, applies ``ops.head_gain(..., heads_first=False)`` to ``X``'s
  ``(B, T, H, dh)`` output.

``attention_edit`` switches the configs and restores their exact previous values on exit,
also when the block raises. ``registry_blocker`` says why a model cannot take this path
(then ``hp_fast.edit_heads`` uses its o_proj pre-hook path).
"""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from typing import Callable, Mapping, Protocol

import torch
from torch import nn

from .. import ops

PREFIX = "hp_fast_"

try:  # transformers >= 5: the registries and the sdpa helpers we mirror
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    _REGISTRY_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    _REGISTRY_ERROR = exc

try:
    from transformers.integrations import sdpa_attention as _hf_sdpa
    from transformers.utils.import_utils import is_torchdynamo_compiling
    _SDPA_HELPERS = all(hasattr(_hf_sdpa, n) for n in
                        ("use_gqa_in_sdpa", "pack_gqa", "repeat_kv", "sdpa_attention_forward"))
except ImportError:  # pragma: no cover
    _SDPA_HELPERS = False


class LayerEdit(Protocol):
    """What the wrapper needs from an edit for one layer (see ``hp_fast.edits``)."""

    def resolve(self, batch: int, tokens: int):
        """(gains (H,)|(B, H) float32, mask (B, T) bool or None) for this call, or None when
        no position of this call is edited."""


# id(attention module) -> its LayerEdit, for the modules of the edits active right now.
_ACTIVE: dict[int, LayerEdit] = {}
_EAGER_BY_CLASS: dict[type, Callable] = {}


def wrapper_name(impl: str) -> str:
    return PREFIX + impl


def _module_eager(module: nn.Module) -> Callable | None:
    """The eager function the module's own file passes as the registry default."""
    cls = type(module)
    fn = _EAGER_BY_CLASS.get(cls)
    if fn is None:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            _EAGER_BY_CLASS[cls] = fn
    return fn


def _underlying(impl: str, module: nn.Module) -> Callable:
    if impl in ALL_ATTENTION_FUNCTIONS:  # registered ones (a user may have registered "eager")
        return ALL_ATTENTION_FUNCTIONS[impl]
    return _module_eager(module)


# Implementations whose functions read nothing from config._attn_implementation.
_NAME_BLIND = frozenset({"sdpa", "eager"})


def _call_underlying(impl: str, module, query, key, value, attention_mask, **kwargs):
    fn = _underlying(impl, module)
    if impl in _NAME_BLIND:
        return fn(module, query, key, value, attention_mask, **kwargs)
    # flash_attention_forward passes module.config._attn_implementation on to pick its
    # kernel: show it the real name for the duration of the call.
    cfg = module.config
    ours = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = impl
    try:
        return fn(module, query, key, value, attention_mask, **kwargs)
    finally:
        cfg._attn_implementation_internal = ours


def _sdpa_is_plain(kwargs) -> bool:
    """True when our sdpa mirror computes exactly what sdpa_attention_forward computes
    (softcap, position_bias, output_attentions, NPU and tracing are left to transformers)."""
    return (_SDPA_HELPERS and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False)
            and not getattr(_hf_sdpa, "_is_torch_npu_available", False)
            and not torch.jit.is_tracing())


def _sdpa_heads_first(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, **_):
    """transformers' sdpa_attention_forward up to (and without) its final transpose.

    query (B, H, T, dh), key/value (B, Hkv, S, dh) -> (B, H, T, dh), any strides.
    """
    q_len = query.shape[2]
    sdpa_kwargs = {}
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        if _hf_sdpa.use_gqa_in_sdpa(attention_mask, key, value):
            sdpa_kwargs["enable_gqa"] = True
        elif q_len == 1 and not is_torchdynamo_compiling():
            query = _hf_sdpa.pack_gqa(query, n_rep)                  # (B, Hkv, n_rep, dh)
            attention_mask = _hf_sdpa.pack_gqa(attention_mask, n_rep)
        else:
            key = _hf_sdpa.repeat_kv(key, n_rep)                     # (B, H, S, dh)
            value = _hf_sdpa.repeat_kv(value, n_rep)
    kv_len = key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and kv_len > q_len:  # prefill into an empty static cache: crop as HF does
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, **sdpa_kwargs)
    return out.reshape(out.shape[0], -1, q_len, value.shape[-1])     # (B, H, T, dh)


def _make_wrapper(impl: str) -> Callable:
    fast_sdpa = impl == "sdpa"

    def hp_fast_attention(module, query, key, value, attention_mask, **kwargs):
        edit = _ACTIVE.get(id(module))
        if edit is None:                                  # layer not edited: untouched result
            return _call_underlying(impl, module, query, key, value, attention_mask, **kwargs)
        B, T = query.shape[0], query.shape[2]
        resolved = edit.resolve(B, T)
        if resolved is None:                              # no edited position in this call
            return _call_underlying(impl, module, query, key, value, attention_mask, **kwargs)
        gains, mask = resolved
        if fast_sdpa and _sdpa_is_plain(kwargs):
            attn = _sdpa_heads_first(module, query, key, value, attention_mask, **kwargs)
            out = ops.head_gain(attn, gains, mask, True)  # (B, T, H*dh), one pass
            return out.view(attn.shape[0], T, attn.shape[1], attn.shape[3]), None
        attn, weights = _call_underlying(impl, module, query, key, value, attention_mask, **kwargs)
        out = ops.head_gain(attn, gains, mask, False)     # (B, T, H*dh)
        return out.view(attn.shape), weights              # (B, T, H, dh) as the model expects

    hp_fast_attention.__name__ = hp_fast_attention.__qualname__ = f"hp_fast_{impl}_attention"
    return hp_fast_attention


_REGISTERED: set[str] = set()


def register(impl: str) -> str:
    """Register the wrapper of attention implementation ``impl``; returns its name."""
    if _REGISTRY_ERROR is not None:
        raise RuntimeError(f"transformers' attention registry is unavailable: {_REGISTRY_ERROR}")
    name = wrapper_name(impl)
    if name not in _REGISTERED:
        AttentionInterface.register(name, _make_wrapper(impl))
        masks = AttentionMaskInterface._global_mapping
        if impl in masks:  # same masks as the wrapped implementation
            AttentionMaskInterface.register(name, masks[impl])
        _REGISTERED.add(name)
    return name


def _code(fn):
    fn = inspect.unwrap(fn)
    return getattr(fn, "__code__", None)


def registry_blocker(attns: list[nn.Module]) -> str | None:
    """Why these attention modules cannot take the registry path (None when they can)."""
    if _REGISTRY_ERROR is not None:
        return f"transformers' attention registry is unavailable ({_REGISTRY_ERROR})"
    checked: set[tuple[type, str]] = set()
    for attn in attns:
        cls = type(attn)
        impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
        if (cls, impl) in checked:
            continue
        checked.add((cls, impl))
        code = _code(cls.forward)
        if code is None or "ALL_ATTENTION_FUNCTIONS" not in code.co_names:
            return f"{cls.__name__}.forward does not call transformers' attention registry"
        if not isinstance(impl, str):
            return f"{cls.__name__} has no attention implementation set in its config ({impl!r})"
        if impl.startswith(PREFIX):
            return "another edit_heads block on this model already uses the attention path"
        if "paged" in impl:
            return f"paged attention ({impl!r}) is not wrapped"
        if impl in code.co_consts:
            return (f"{cls.__name__}.forward compares the implementation name with {impl!r}; "
                    "renaming it could change what the module does")
        if impl not in ALL_ATTENTION_FUNCTIONS and (impl != "eager" or _module_eager(attn) is None):
            return f"attention implementation {impl!r} of {cls.__name__} is not in the registry"
        if not hasattr(attn.config, "_attn_implementation_internal"):
            return f"{type(attn.config).__name__} has no _attn_implementation_internal"
    return None


@contextmanager
def attention_edit(edits: Mapping[nn.Module, LayerEdit]):
    """Route the given attention modules' calls through the hp_fast wrappers.

    edits: attention module -> LayerEdit. The configs those modules read are switched to
    ``hp_fast_<impl>`` inside the block and restored exactly afterwards (also on errors).
    Call ``registry_blocker`` first.
    """
    modules = list(edits)
    configs = {id(m.config): m.config for m in modules}.values()
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    names = {id(cfg): register(impl) for cfg, impl in saved}
    try:
        for module, edit in edits.items():
            _ACTIVE[id(module)] = edit
        for cfg, _ in saved:
            cfg._attn_implementation_internal = names[id(cfg)]
        yield
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
        for module in modules:
            _ACTIVE.pop(id(module), None)


__all__ = ["attention_edit", "registry_blocker", "register", "wrapper_name", "PREFIX"]
