"""The real weight matrix of a linear layer, wherever and however the model keeps it.

``module_weight(module)`` returns the ``(out_features, in_features)`` matrix ``W`` with
``y = x @ W.T + b`` (the layout of ``nn.Linear.weight``) for:

* ``nn.Linear`` on any device: ``module.weight`` itself (no copy);
* transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``): its transpose, a view;
* a layer offloaded by accelerate (weights on ``meta`` between calls): the tensor its next
  forward pass will load, read from the hook's weights map (a copy, on the CPU or disk);
* bitsandbytes ``Linear4bit`` / ``Linear8bitLt``: dequantized by bitsandbytes' own
  functions (``dequantize_4bit`` with the weight's quant state; int8 rows ``CB`` times their
  scales ``SCB`` / 127 for LLM.int8());
* other quantized layers recognized by class name (GPTQ ``*QuantLinear``, AWQ
  ``WQLinear_*``, HQQ, quanto, ...): through their own ``dequantize()`` method, which must
  return the ``(out, in)`` matrix; without one, a ValueError naming the class.

Anything else is a ValueError naming the module's class. ``weight_format`` says which case
applies (``fold_head_gains`` edits "float" and "offloaded" weights, refuses the others).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .devices import offload_hook

FORMATS = ("float", "offloaded", "bnb-4bit", "bnb-8bit", "quantized")

# Quantized linear layers of optional libraries, recognized by class name (none of them is a
# dependency): GPTQ (auto_gptq QuantLinear, gptqmodel TorchQuantLinear / MarlinQuantLinear /
# ExllamaV2QuantLinear ...), AWQ (autoawq WQLinear_GEMM / _GEMV / _Exllama ...), HQQ
# (HQQLinear), optimum-quanto (QLinear), EETQ (EetqLinear), FP8 (FP8Linear), BitNet
# (BitLinear), compressed-tensors (CompressedLinear).
QUANTIZED_CLASS = re.compile(r"QuantLinear$|^WQLinear|^HQQLinear$|^QLinear$|^EetqLinear$|"
                             r"^FP8Linear$|^BitLinear$|^CompressedLinear$")


def class_name(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): weight stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _bnb_kind(module: nn.Module) -> str | None:
    wname = type(getattr(module, "weight", None)).__name__
    if wname == "Params4bit":
        return "bnb-4bit"
    if wname == "Int8Params":
        return "bnb-8bit"
    return None


def weight_format(module: nn.Module) -> str:
    """One of ``FORMATS``: how ``module`` keeps its weight (ValueError for unknown layers)."""
    bnb = _bnb_kind(module)
    if bnb is not None:
        return bnb
    if QUANTIZED_CLASS.search(type(module).__name__):
        return "quantized"
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ValueError(_unknown(module))
    if offload_hook(module) is not None:
        return "offloaded"
    w = module.weight
    if type(w.data) is not torch.Tensor or not w.dtype.is_floating_point or w.is_quantized:
        return "quantized"
    return "float"


def _unknown(module: nn.Module) -> str:
    hint = ("; it wraps a base layer (a PEFT/LoRA adapter?): merge it first "
            "(model = model.merge_and_unload())" if hasattr(module, "base_layer") else "")
    return (f"{class_name(module)} is not a linear layer hp_fast can read (expected nn.Linear, "
            f"transformers Conv1D, bitsandbytes Linear4bit/Linear8bitLt, or a quantized layer "
            f"with a dequantize() method){hint}")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, without reading (or dequantizing) it;
    ValueError for a module type ``module_weight`` cannot read."""
    weight_format(module)
    if is_conv1d(module):
        return int(module.nf), int(module.nx)
    for out_name, in_name in (("out_features", "in_features"), ("outfeatures", "infeatures")):
        out_f, in_f = getattr(module, out_name, None), getattr(module, in_name, None)
        if isinstance(out_f, int) and isinstance(in_f, int):
            return out_f, in_f
    raise ValueError(f"{class_name(module)} does not say its in/out features; cannot find its "
                     "shape")


def _refuse_offloaded_bnb(module: nn.Module) -> None:
    if offload_hook(module) is not None or module.weight.device.type == "meta":
        raise ValueError(f"{class_name(module)} is a bitsandbytes layer offloaded to the CPU or "
                         "disk; hp_fast cannot read offloaded quantized weights: give the model "
                         "more GPU memory (max_memory) or load it unquantized")


def _dequantize_bnb4(module: nn.Module) -> torch.Tensor:
    _refuse_offloaded_bnb(module)
    w = module.weight
    if w.quant_state is None:  # not quantized yet (still the float weight)
        return w
    import bitsandbytes.functional as bnb_f
    return bnb_f.dequantize_4bit(w.data, w.quant_state)


def _dequantize_bnb8(module: nn.Module) -> torch.Tensor:
    _refuse_offloaded_bnb(module)
    w = module.weight
    if w.dtype != torch.int8:  # has_fp16_weights: a float weight quantized per call
        return w
    scales = getattr(w, "SCB", None)  # (out,) before the first forward pass, then in .state
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if scales is None:
        raise ValueError(f"{class_name(module)}: int8 weight without its row scales (SCB)")
    import bitsandbytes.functional as bnb_f
    if hasattr(bnb_f, "int8_vectorwise_dequant"):
        return bnb_f.int8_vectorwise_dequant(w.data, scales)
    return w.data.float() * (scales.float()[:, None] / 127.0)  # LLM.int8() row-wise absmax


def _dequantize_other(module: nn.Module) -> torch.Tensor:
    fn = getattr(module, "dequantize", None)
    weight = getattr(module, "weight", None)
    subclass = isinstance(weight, torch.Tensor) and type(weight.data) is not torch.Tensor
    if not callable(fn) and subclass:
        fn = getattr(weight, "dequantize", None)  # tensor subclasses (quanto, torchao)
    if not callable(fn):
        raise ValueError(
            f"{class_name(module)} is a quantized linear layer without a dequantize() method, so "
            "hp_fast cannot read its W_O or unembedding; load the unquantized checkpoint (or a "
            "bitsandbytes 4-/8-bit one)")
    w = fn()
    out_f, in_f = linear_shape(module)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (out_f, in_f):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{class_name(module)}.dequantize() gave {got}; hp_fast needs the "
                         f"(out_features, in_features) = ({out_f}, {in_f}) matrix")
    return w


def _offloaded(module: nn.Module) -> torch.Tensor:
    try:
        w = offload_hook(module).weights_map["weight"]
    except KeyError:
        raise ValueError(f"accelerate's offload storage for {class_name(module)} holds no weight "
                         "(a tied weight offloaded apart from its twin? the model's own forward "
                         "pass fails the same way): map lm_head and the input embedding to the "
                         "same device") from None
    return w.T if is_conv1d(module) else w


def storage_device(module: nn.Module) -> torch.device:
    """The device of the tensor ``module_weight(module)`` returns, found without reading it
    (offloaded weights come from CPU memory or disk: the CPU)."""
    if offload_hook(module) is not None:
        return torch.device("cpu")
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def module_weight(module: nn.Module) -> torch.Tensor:
    """(out_features, in_features): the weight ``module``'s forward pass uses (module
    docstring). The module's own tensor (or a view of it) for plain layers, a copy otherwise;
    never on the ``meta`` device."""
    fmt = weight_format(module)
    if fmt == "bnb-4bit":
        return _dequantize_bnb4(module)
    if fmt == "bnb-8bit":
        return _dequantize_bnb8(module)
    if fmt == "quantized":
        return _dequantize_other(module)
    if fmt == "offloaded":
        return _offloaded(module)
    w = module.weight
    if w.device.type == "meta":
        raise ValueError(f"the weight of {class_name(module)} is on the meta device and no "
                         "accelerate offload hook of its own holds it: the model's weights were "
                         "never loaded; load it with from_pretrained / hp_fast.load_model")
    return w.T if is_conv1d(module) else w


__all__ = ["FORMATS", "QUANTIZED_CLASS", "class_name", "is_conv1d", "linear_shape",
           "module_weight", "storage_device", "weight_format"]
