"""Architecture adapters: where each Hugging Face model keeps its heads.

An adapter answers, for a model as ``transformers`` built it (no rewrite):
which modules are the decoder layers, which module is each layer's attention output
projection (``W_O``), how many query heads there are and how wide each is, and which
matrix is the unembedding. A new architecture costs one entry in ``_SPECS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .weights import is_conv1d, linear_shape, module_weight, storage_device


@dataclass(frozen=True)
class _Spec:
    layers: tuple[str, ...]      # candidate dotted paths to the ModuleList of decoder layers
    attn: str                    # attribute of a layer holding the attention module
    out_proj: str                # attribute of the attention module holding W_O
    conv1d: bool = False         # GPT-2 style Conv1D: weight stored (in, out)


_LLAMA_LIKE = _Spec(layers=("model.layers", "model.language_model.layers", "language_model.model.layers"),
                    attn="self_attn", out_proj="o_proj")
_SPECS: dict[str, _Spec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "gpt2": _Spec(layers=("transformer.h",), attn="attn", out_proj="c_proj", conv1d=True),
}

# Vision-language models: the heads are those of the language backbone (never the vision
# tower's); the unembedding is the language model's lm_head. Paths: transformers >= 4.52
# first (``model.language_model``), then the older layouts.
_VLM_LM = _Spec(layers=("model.language_model.layers", "language_model.model.layers",
                        "model.layers"), attn="self_attn", out_proj="o_proj")
_IDEFICS_LM = _Spec(layers=("model.text_model.layers",), attn="self_attn", out_proj="o_proj")
VLM_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")
_SPECS.update({
    "llava": _VLM_LM,           # LLaVA-1.5 (Llama/Vicuna backbone)
    "llava_next": _VLM_LM,      # LLaVA-NeXT / 1.6 (Vicuna, Mistral, ... backbones)
    "qwen2_vl": _VLM_LM,        # Qwen2-VL
    "qwen2_5_vl": _VLM_LM,      # Qwen2.5-VL
    "qwen2_vl_text": _LLAMA_LIKE,    # their language models loaded on their own
    "qwen2_5_vl_text": _LLAMA_LIKE,
    "gemma3": _VLM_LM,          # Gemma3 multimodal (4B/12B/27B)
    "idefics3": _IDEFICS_LM,    # Idefics3
    "smolvlm": _IDEFICS_LM,     # SmolVLM / SmolVLM2 (Idefics3 layout)
})


def supported_architectures() -> list[str]:
    """Model types (``config.model_type``) with an adapter (VLMs included)."""
    return sorted(_SPECS)


def is_vlm(model: nn.Module) -> bool:
    """True for a vision-language model whose language backbone has an adapter."""
    return getattr(getattr(model, "config", None), "model_type", None) in VLM_MODEL_TYPES


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class ModelAdapter:
    """Uniform view of one model's attention heads.

    layers:     the decoder layers (L of them)
    attns:      each layer's attention module
    out_projs:  each layer's W_O module (its input is the concatenated head outputs)
    num_heads:  query heads per layer (H); with GQA/MQA the unit is the query head
    head_dim:   width of one head's output (dh)
    hidden_size: residual-stream width (d)
    """

    model_type: str
    layers: list[nn.Module]
    attns: list[nn.Module]
    out_projs: list[nn.Module]
    num_heads: int
    head_dim: int
    hidden_size: int
    conv1d: bool
    unembedding: Callable[[], torch.Tensor]
    dictionary_device: torch.device = torch.device("cpu")  # where unembedding() is returned

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def w_o(self, layer: int) -> torch.Tensor:
        """(d, H*dh) output projection of ``layer``: a view of the weight for a plain layer;
        read from accelerate's offload storage or dequantized otherwise
        (``hp_fast.models.weights.module_weight``)."""
        return module_weight(self.out_projs[layer])

    def head_w_o(self, layer: int, head: int) -> torch.Tensor:
        """(dh, d): maps one head's output z (dh,) to its residual write z @ this."""
        self._check_head(layer, head)
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return self.w_o(layer)[:, cols].T

    def heads_w_o(self, heads) -> list[torch.Tensor]:
        """[(dh, d)] float32 W_O slices of ``heads`` [(layer, head), ...] on
        ``dictionary_device``, each layer's W_O read once (an offloaded or quantized layer
        is read or dequantized once per call, not once per head); views for plain float32
        layers already there."""
        heads = [(int(l), int(h)) for l, h in heads]
        for l, h in heads:
            self._check_head(l, h)
        out: list = [None] * len(heads)
        for layer in sorted({l for l, _ in heads}):
            w = self.w_o(layer).detach()  # (d, H*dh)
            for i, (l, h) in enumerate(heads):
                if l == layer:
                    cols = slice(h * self.head_dim, (h + 1) * self.head_dim)
                    out[i] = w[:, cols].T.to(self.dictionary_device, torch.float32)
        return out

    def all_head_w_o(self, layers: list[int] | None = None) -> torch.Tensor:
        """(len(layers)*H, dh, d) float32 copies of every head's W_O slice, layer-major, on
        ``dictionary_device`` (layers spread over devices are gathered there)."""
        layers = list(range(self.num_layers)) if layers is None else layers
        H, dh, dev = self.num_heads, self.head_dim, self.dictionary_device
        out = [self.w_o(l).detach().to(dev, torch.float32).T.reshape(H, dh, -1) for l in layers]
        return torch.cat(out, dim=0)

    def _check_head(self, layer: int, head: int) -> None:
        if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
            raise ValueError(
                f"head ({layer}, {head}) does not exist: the model has {self.num_layers} layers "
                f"x {self.num_heads} heads (0-based indices)")


def _model_type(model: nn.Module) -> str:
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None)
    if cfg.model_type in _SPECS:
        return cfg.model_type
    if text_cfg is not None and getattr(text_cfg, "model_type", None) in _SPECS:
        return text_cfg.model_type
    return cfg.model_type


def _find_spec(model: nn.Module):
    return _SPECS.get(_model_type(model)) if hasattr(model, "config") else None


def _text_config(model: nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


class _AdapterCache:
    """The adapter last built for one model and the modules it was built from.

    Lives on the model (``model._hp_fast_adapter``). A copy of the model (``copy.deepcopy``,
    pickling) gets an empty cache: the copied adapter's unembedding would still read the
    original model's weight.
    """

    def __init__(self, parts: tuple = (), adapter: ModelAdapter | None = None):
        self.parts, self.adapter = parts, adapter

    def matches(self, parts: tuple) -> bool:
        return len(parts) == len(self.parts) and all(a is b for a, b in zip(parts, self.parts))

    def __deepcopy__(self, memo):
        return _AdapterCache()

    def __reduce__(self):
        return (_AdapterCache, ())


_CACHE_ATTR = "_hp_fast_adapter"


def _locate(model: nn.Module):
    """(model type, spec, layer list, out_projs, parts): where the heads are right now.

    ``parts`` are the objects an adapter depends on (layer list, layers, attention modules,
    W_O modules and their weights, output embedding); a cached adapter is valid while every
    one of them is the same object.
    """
    if not hasattr(model, "config"):
        raise ValueError("the model has no .config; pass a Hugging Face transformers model")
    mtype = _model_type(model)
    spec = _SPECS.get(mtype)
    if spec is None:
        raise ValueError(
            f"architecture {mtype!r} is not supported; supported model types: "
            f"{', '.join(supported_architectures())}. Adding one is an entry in "
            "hp_fast/models/adapters.py:_SPECS (layers path, attention attribute, W_O attribute).")
    layer_list = next((m for p in spec.layers if (m := _get_path(model, p)) is not None), None)
    if layer_list is None:
        raise ValueError(f"could not find the decoder layers of this {mtype} model "
                         f"(looked at {', '.join(spec.layers)})")
    layers = list(layer_list)
    attns = [getattr(layer, spec.attn) for layer in layers]
    out_projs = [getattr(a, spec.out_proj) for a in attns]
    parts = (layer_list, *layers, *attns, *out_projs,
             *(getattr(o, "weight", None) for o in out_projs), model.get_output_embeddings())
    return mtype, spec, layers, attns, out_projs, parts


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` or a ValueError listing the supported types.

    Memoized per model: the same adapter comes back until the model's decoder layers, their
    attention or W_O modules, the W_O weights or the output embedding are replaced (then a
    fresh one is built), so callers may ask for it as often as they like.
    """
    mtype, spec, layers, attns, out_projs, parts = _locate(model)
    cache = getattr(model, _CACHE_ATTR, None)
    if isinstance(cache, _AdapterCache) and cache.matches(parts):
        return cache.adapter
    adapter = _build(model, mtype, spec, layers, attns, out_projs)
    object.__setattr__(model, _CACHE_ATTR, _AdapterCache(parts, adapter))
    return adapter


def _build(model: nn.Module, mtype: str, spec: _Spec, layers, attns, out_projs) -> ModelAdapter:
    cfg = _text_config(model)
    H = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    d, in_width = linear_shape(out_projs[0])  # also refuses a W_O type it cannot read
    if in_width % H:
        raise ValueError(f"W_O input width {in_width} is not a multiple of {H} heads")
    out_emb = model.get_output_embeddings()
    if out_emb is None:
        raise ValueError("the model has no output embedding (lm_head); load a *ForCausalLM model")
    return ModelAdapter(model_type=mtype, layers=layers, attns=attns, out_projs=out_projs,
                        num_heads=H, head_dim=in_width // H, hidden_size=d,
                        conv1d=is_conv1d(out_projs[0]), unembedding=lambda: module_weight(out_emb),
                        dictionary_device=storage_device(out_emb))
