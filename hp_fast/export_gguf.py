"""GGUF writer for ``export_edited(..., format="gguf")``: llama-architecture models only.

Two sources of the file's metadata (everything but the tensors):

* the embedded model: its source IS a GGUF (``hp_fast.models.loading.embedded_gguf()``), so
  every key-value of that file (tokenizer, merges, chat template, names) is copied as it is;
  only ``general.file_type`` changes. The tensors keep the source's names and order.
* any other ``llama`` model: the keys llama.cpp's converter writes, from ``config.json``, and
  the tokenizer's vocabulary and merges (byte-level BPE tokenizers only).

Layout. A 2-D weight ``(out, in)`` is written as the row-major numpy array ``(out, in)`` (GGUF
lists the dims innermost first, so the file says ``[in, out]``). llama.cpp rotates query/key
dimensions as interleaved pairs (2i, 2i+1), Hugging Face Llama as halves (i, i + dh/2);
llama.cpp's converter reorders the rows of each q/k head accordingly and transformers' GGUF
loader (``LlamaTensorProcessor``) undoes it on load, so ``rope_rows_to_gguf`` writes q/k in
llama.cpp's order. 1-D tensors (norms) stay float32 in an F16 file, as llama.cpp writes them.
"""
from __future__ import annotations

import json
import mmap
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

GGUF_DTYPES = ("f16", "f32")
GGUF_ARCH = "llama"
UNSUPPORTED = ("--format gguf supports llama-architecture models; export an HF folder and use "
               "llama.cpp's converter")


@dataclass
class GGUFPlan:
    """What ``write_gguf`` needs, checked before any heavy work."""

    dtype: str                           # "f16" or "f32"
    n_head: int                          # query heads
    n_kv_head: int                       # key/value heads
    tied: bool                           # no output.weight: the unembedding is token_embd
    source: Path | None = None           # source GGUF whose key-values are copied
    metadata: dict = field(default_factory=dict)  # {key: (value, GGUFValueType, sub type)}
    order: list = field(default_factory=list)     # GGUF tensor names, in file order


def embedded_source(model) -> Path | None:
    """The embedded GGUF when ``model`` was loaded by ``load_model()`` (the default), else None."""
    from .models.loading import embedded_cache_dir, embedded_gguf
    name = getattr(model.config, "_name_or_path", "") or ""
    try:
        if not name or Path(name).resolve() != embedded_cache_dir().resolve():
            return None
        return embedded_gguf()
    except (OSError, ValueError):
        return None


def rope_rows_to_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (n_head*dh, d) from HF's half-split order to llama.cpp's interleaved order.

    Within a head, HF row ``half*dh/2 + i`` (i < dh/2) becomes llama.cpp row ``2*i + half``.
    """
    rows = w.shape[0]
    dh = rows // n_head
    return w.reshape(n_head, 2, dh // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_gguf_export(model, tokenizer, dtype: str = "f16") -> GGUFPlan:
    """Validate a GGUF export (architecture, dtype, tokenizer) and gather its metadata."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"gguf dtype {dtype!r} is unknown; use one of {GGUF_DTYPES}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"{UNSUPPORTED} (this model is {cfg.model_type!r})")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise ValueError(f"{UNSUPPORTED} without biases (this one has {flag}=True)")
    rope_type = (_rope(cfg).get("rope_type") or "default")
    if rope_type != "default":
        raise ValueError(f"{UNSUPPORTED} with plain rotary embeddings (this one uses "
                         f"rope_type={rope_type!r})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"{UNSUPPORTED} with SiLU MLPs (this one has {cfg.hidden_act!r})")
    tied = _is_tied(model)
    plan = GGUFPlan(dtype=dtype, n_head=cfg.num_attention_heads,
                    n_kv_head=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                    tied=tied, source=embedded_source(model))
    names = {g: tuple(w.shape) for g, (_, w) in gguf_names(model, plan).items()}
    if plan.source is None:
        plan.metadata = config_metadata(cfg) | bpe_metadata(tokenizer, cfg.vocab_size)
        plan.order = list(names)
    else:
        plan.metadata, plan.order, shapes = source_metadata(plan.source)
        if names != shapes:
            raise ValueError(f"the model's weights do not match the tensors of "
                             f"{plan.source.name} (names or shapes differ); was it resized?")
    return plan


def _rope(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return dict(params)


def _is_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def config_metadata(cfg) -> dict:
    """llama.cpp's llama keys from a Hugging Face config."""
    from gguf import GGUFValueType as T
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = _rope(cfg).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    a = GGUF_ARCH
    meta = {
        "general.name": (Path(str(cfg._name_or_path or "model")).name, T.STRING, None),
        f"{a}.context_length": (cfg.max_position_embeddings, T.UINT32, None),
        f"{a}.embedding_length": (cfg.hidden_size, T.UINT32, None),
        f"{a}.block_count": (cfg.num_hidden_layers, T.UINT32, None),
        f"{a}.feed_forward_length": (cfg.intermediate_size, T.UINT32, None),
        f"{a}.attention.head_count": (cfg.num_attention_heads, T.UINT32, None),
        f"{a}.attention.head_count_kv": (getattr(cfg, "num_key_value_heads", None)
                                         or cfg.num_attention_heads, T.UINT32, None),
        f"{a}.rope.freq_base": (float(theta), T.FLOAT32, None),
        f"{a}.attention.layer_norm_rms_epsilon": (float(cfg.rms_norm_eps), T.FLOAT32, None),
        f"{a}.rope.dimension_count": (head_dim, T.UINT32, None),
        f"{a}.vocab_size": (cfg.vocab_size, T.UINT32, None),
    }
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        meta[f"{a}.attention.key_length"] = (head_dim, T.UINT32, None)
        meta[f"{a}.attention.value_length"] = (head_dim, T.UINT32, None)
    return meta


def _byte_level(pre) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(_byte_level(p) for p in pre["pretokenizers"])


def bpe_metadata(tokenizer, vocab_size: int) -> dict:
    """GGUF tokenizer keys ("gpt2" model) from a byte-level BPE fast tokenizer."""
    from gguf import GGUFValueType as T, TokenType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise ValueError("--format gguf converts byte-level BPE tokenizers only (GPT-2 style, "
                         f"this one is {model.get('type', type(tokenizer).__name__)!r}); export "
                         "an HF folder and use llama.cpp's converter")
    pre = spec["pre_tokenizer"]
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)):
        warnings.warn("the tokenizer splits text with its own rule before byte-level BPE; the "
                      "GGUF records llama.cpp's 'default' (GPT-2) split, so llama.cpp may "
                      "tokenize some text differently (llama.cpp's converter knows more rules)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    entries = [(i, t, int(TokenType.NORMAL)) for t, i in model["vocab"].items()]
    entries += [(a["id"], a["content"], int(TokenType.CONTROL if a["special"]
                                            else TokenType.USER_DEFINED))
                for a in spec.get("added_tokens", [])]
    for i, text, kind in entries:
        if i >= vocab_size:
            raise ValueError(f"token {text!r} has id {i} but the model's vocabulary has "
                             f"{vocab_size} rows; the tokenizer does not match the model")
        tokens[i], types[i] = text, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokenizer.ggml.model": ("gpt2", T.STRING, None),
            "tokenizer.ggml.pre": ("default", T.STRING, None),
            "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
            "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32)}
    if merges:
        meta["tokenizer.ggml.merges"] = (merges, T.ARRAY, T.STRING)
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = (int(tid), T.UINT32, None)
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    meta["tokenizer.ggml.add_bos_token"] = (len(with_special) > len(plain) and
                                            with_special[0] == tokenizer.bos_token_id, T.BOOL, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = (template, T.STRING, None)
    return meta


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}                        # GGUF value type -> struct format (8 string, 9 array)


class _Cursor:
    """Little-endian reads from a buffer (the GGUF header layout)."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> bytes:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def array(self, vtype: int, count: int) -> list:
        if vtype == 8:
            return [self.string() for _ in range(count)]
        fmt = _SCALAR[vtype]
        width = struct.calcsize("<" + fmt)
        out = np.frombuffer(self.buf, np.dtype("<" + fmt), count, self.pos).tolist()
        self.pos += width * count
        return out


def source_metadata(path: Path) -> tuple[dict, list[str], dict]:
    """Key-values of a GGUF ({key: (value, type, sub type)}, strings as raw bytes), its tensor
    names in file order and their shapes ((out, in) for a 2-D weight). Reads only the header;
    same content as ``gguf.GGUFReader`` (compared in tests/unit/test_export.py), ~100x faster
    on a 49k-token vocabulary."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            meta, names, shapes = _parse_header(_Cursor(view))
        except (struct.error, KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a readable GGUF file ({err})") from None
        finally:
            view.release()
    meta.pop("general.architecture", None)                     # the writer adds it itself
    return meta, names, shapes


def _parse_header(cur: _Cursor):
    from gguf import GGUFValueType as T
    magic, version = cur.take("4s"), cur.take("I")
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError("not a little-endian GGUF v2/v3 file")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    meta = {}
    for _ in range(n_kv):
        key, vtype = cur.string().decode("utf-8"), cur.take("I")
        if vtype == 9:
            sub, count = cur.take("I"), cur.take("Q")
            meta[key] = (cur.array(sub, count), T.ARRAY, T(sub))
        else:
            meta[key] = (cur.string() if vtype == 8 else cur.take(_SCALAR[vtype]), T(vtype), None)
    names, shapes = [], {}
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8")
        dims = [cur.take("Q") for _ in range(cur.take("I"))]
        cur.take("I"), cur.take("Q")                           # ggml type, data offset
        names.append(name)
        shapes[name] = tuple(reversed(dims))
    return meta, names, shapes


def gguf_names(model, plan: GGUFPlan) -> dict[str, tuple[str, torch.Tensor]]:
    """{GGUF tensor name: (HF name, weight)} for every weight ``write_gguf`` writes."""
    from gguf import MODEL_ARCH, get_tensor_name_map
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = {}
    for hf_name, w in model.state_dict().items():
        stem, _, suffix = hf_name.rpartition(".")
        if plan.tied and stem == "lm_head":
            continue
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise ValueError(f"{UNSUPPORTED} (no GGUF name for the weight {hf_name!r})")
        out[f"{gguf_name}.{suffix}"] = (hf_name, w)
    return out


def gguf_tensor(name: str, w: torch.Tensor, plan: GGUFPlan) -> torch.Tensor:
    """One weight in the file's layout (q/k rows in llama.cpp's rotary order)."""
    w = w.detach()
    if ".attn_q." in name:
        return rope_rows_to_gguf(w, plan.n_head)
    if ".attn_k." in name:
        return rope_rows_to_gguf(w, plan.n_kv_head)
    return w


def _numpy(w: torch.Tensor, dtype: str, name: str) -> np.ndarray:
    target = np.float16 if dtype == "f16" and w.dim() > 1 else np.float32
    arr = w.to(torch.float32).cpu().numpy().astype(target)
    if not np.isfinite(arr).all():
        raise ValueError(f"tensor {name} has values outside the {target.__name__} range after the "
                         "edit; use --gguf-dtype f32 (gguf_dtype='f32')")
    return arr


def write_gguf(model, plan: GGUFPlan, path: Path, extra: dict | None = None,
               progress: bool = True) -> Path:
    """Write ``model``'s current weights as a GGUF file at ``path`` (see the module docstring)."""
    from gguf import GGUFValueType as T, GGUFWriter, LlamaFileType
    from tqdm import tqdm
    weights = gguf_names(model, plan)   # read now: the weights with the edit folded in
    meta = dict(plan.metadata)
    ftype = LlamaFileType.MOSTLY_F16 if plan.dtype == "f16" else LlamaFileType.ALL_F32
    meta["general.file_type"] = (int(ftype), T.UINT32, None)
    meta.setdefault("general.quantization_version", (2, T.UINT32, None))
    for key, value in (extra or {}).items():
        meta[key] = (value, T.STRING, None)
    writer = GGUFWriter(str(path), GGUF_ARCH)
    try:
        for key, (value, vtype, sub) in meta.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name in tqdm(plan.order, desc="GGUF tensors", disable=not progress):
            w = gguf_tensor(name, weights[name][1], plan)
            writer.add_tensor(name, _numpy(w, plan.dtype, name))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()
    return path
