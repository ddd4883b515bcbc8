"""Models: loading (``loading``, ``placement``: dtype, device, device maps), where each
architecture keeps its heads (``adapters``), reading weights wherever they are kept
(``weights``: offloaded, quantized; ``devices``: input and execution devices), and the
vision-language specifics (``vlm``). See docs/architecture.md."""
from .adapters import ModelAdapter, get_adapter, is_vlm, supported_architectures
from .devices import execution_device, input_device
from .loading import DEFAULT_MODEL, load_model, model_id
from .weights import module_weight

__all__ = ["ModelAdapter", "get_adapter", "is_vlm", "supported_architectures", "DEFAULT_MODEL",
           "load_model", "model_id", "execution_device", "input_device", "module_weight"]
