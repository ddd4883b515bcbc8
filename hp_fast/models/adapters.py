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

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def w_o(self, layer: int) -> torch.Tensor:
        """(d, H*dh) output projection of ``layer`` (a view, never a copy)."""
        w = self.out_projs[layer].weight
        return w.T if self.conv1d else w

    def head_w_o(self, layer: int, head: int) -> torch.Tensor:
        """(dh, d): maps one head's output z (dh,) to its residual write z @ this."""
        self._check_head(layer, head)
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return self.w_o(layer)[:, cols].T

    def all_head_w_o(self, layers: list[int] | None = None) -> torch.Tensor:
        """(len(layers)*H, dh, d) float32 copies of every head's W_O slice, layer-major."""
        layers = list(range(self.num_layers)) if layers is None else layers
        H, dh = self.num_heads, self.head_dim
        out = [self.w_o(l).detach().float().T.reshape(H, dh, -1) for l in layers]
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


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Build the adapter for ``model`` or raise a ValueError listing the supported types."""
    if not hasattr(model, "config"):
        raise ValueError("the model has no .config; pass a Hugging Face transformers model")
    mtype = _model_type(model)
    spec = _SPECS.get(mtype)
    if spec is None:
        raise ValueError(
            f"architecture {mtype!r} is not supported; supported model types: "
            f"{', '.join(supported_architectures())}. Adding one is an entry in "
            "hp_fast/adapters.py:_SPECS (layers path, attention attribute, W_O attribute).")
    layer_list = next((m for p in spec.layers if (m := _get_path(model, p)) is not None), None)
    if layer_list is None:
        raise ValueError(f"could not find the decoder layers of this {mtype} model "
                         f"(looked at {', '.join(spec.layers)})")
    layers = list(layer_list)
    attns = [getattr(layer, spec.attn) for layer in layers]
    out_projs = [getattr(a, spec.out_proj) for a in attns]
    cfg = _text_config(model)
    H = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    w = out_projs[0].weight
    in_width = w.shape[0] if spec.conv1d else w.shape[1]
    d = w.shape[1] if spec.conv1d else w.shape[0]
    if in_width % H:
        raise ValueError(f"W_O input width {in_width} is not a multiple of {H} heads")
    out_emb = model.get_output_embeddings()
    if out_emb is None:
        raise ValueError("the model has no output embedding (lm_head); load a *ForCausalLM model")
    return ModelAdapter(model_type=mtype, layers=layers, attns=attns, out_projs=out_projs,
                        num_heads=H, head_dim=in_width // H, hidden_size=d, conv1d=spec.conv1d,
                        unembedding=lambda: out_emb.weight)
