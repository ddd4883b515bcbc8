"""``hp-fast plan``: what a run on a model costs, from its config alone (no weights loaded).

Counts (docs/fast-pursuit.md sections 5-6 for the pursuit):

* shape: layers L, query heads H, head dim dh, hidden d, vocabulary v (``text_config`` for VLMs);
* capture: ``n * L * H * dh * 4`` bytes per aggregate (fp32 ``z``), in ``ceil(n / shard_size)``
  shards;
* weights: the parameter count from the config (embeddings, attention with GQA, MLP with
  ``intermediate_size``, ``num_local_experts`` copies for MoE, norms, tied or untied output);
* pursuit peak extra memory on the unembedding's device, for ranking (all L*H heads on a concept
  dictionary of ``concept_size`` atoms, atom space when small) and for describing ``top`` heads on
  the full vocabulary: the torch backend's per-head state (``head_batch_size``, batches sized to
  ``DEFAULT_MEMORY``), its start-up chunk, the batch's support rows ``Q`` (batch * k * d floats), the
  fp32 dictionary copy when the model is not fp32, the fp32 copies of ``z`` and ``W_O``, and the
  brief cost of the input checks on the dictionary (``pursuit_memory``);
* time: FLOP floors of section 6 (L1 ``2 v n dh + v d`` per head-step, L2 rules ``v d + 2 v dh``,
  start-up ``2 v d dh`` per head) and the capture's forward passes (``2 * parameters * tokens``),
  divided by a GEMM rate (a quick fp32 matmul on the present device, or ``gflops=``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .models.adapters import supported_architectures
from .pursuit.torch_backend import DEFAULT_MEMORY, head_batch_size
from .pursuit.small_dictionary import uses_atom_space

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = float(1 << 30)
_BIG = 1 << 100  # head_batch_size(memory=_BIG) inverts to the exact per-head state bytes


def load_config(config_or_folder) -> dict:
    """A config dict from a dict, a ``PretrainedConfig``, a folder (or its config.json), or an
    HF id already in the local HF cache (``local_files_only``: nothing is downloaded)."""
    if isinstance(config_or_folder, dict):
        return dict(config_or_folder)
    if hasattr(config_or_folder, "to_dict"):
        return config_or_folder.to_dict()
    path = Path(config_or_folder)
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; pass a model folder (config.json is enough, "
                         "no weights needed) or an HF id in the local cache")
    if path.is_dir():
        try:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({err.msg}, line {err.lineno})") from None
        check_architecture(raw)
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(path) if path.is_dir() else str(config_or_folder),
                                          local_files_only=True).to_dict()
    except (OSError, ValueError) as err:
        if path.is_dir():
            return raw  # a config newer than this transformers: read the raw fields
        raise ValueError(f"{config_or_folder!r} is neither a folder with config.json nor a model id "
                         f"in the local HF cache ({err}); nothing is downloaded") from None


def check_architecture(cfg: dict) -> None:
    """A ValueError naming the model type when hp_fast has no adapter for it."""
    mtype = cfg.get("model_type")
    text = cfg.get("text_config") or {}
    if mtype not in supported_architectures() and text.get("model_type") not in supported_architectures():
        raise ValueError(f"architecture {mtype!r} is not supported; supported model types: "
                         f"{', '.join(supported_architectures())}")


def model_shape(cfg: dict) -> dict:
    """L, H, KV heads, dh, d, v, MLP width, experts, tied output, from a config dict."""
    check_architecture(cfg)
    text = cfg.get("text_config") or cfg
    get = lambda *keys, default=None: next((text[k] for k in keys if text.get(k) is not None), default)
    d, H = get("hidden_size", "n_embd"), get("num_attention_heads", "n_head")
    L, v = get("num_hidden_layers", "n_layer"), get("vocab_size") or cfg.get("vocab_size")
    if not all(isinstance(x, int) and x > 0 for x in (d, H, L, v)):
        raise ValueError(f"the config lacks hidden_size / num_attention_heads / num_hidden_layers / "
                         f"vocab_size (got {d}, {H}, {L}, {v})")
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return {"model_type": text.get("model_type") or cfg.get("model_type"), "layers": L, "heads": H,
            "kv_heads": get("num_key_value_heads", default=H), "head_dim": get("head_dim", default=d // H),
            "hidden": d, "vocab": v, "intermediate": get("intermediate_size", "n_inner", default=4 * d),
            "experts": get("num_local_experts", default=0),
            "experts_per_token": get("num_experts_per_tok", default=0),
            "tied": bool(tied), "positions": get("n_positions", default=0)}


def parameter_count(s: dict) -> dict:
    """Parameters of a decoder LM of shape ``s`` (``model_shape``): total and active per token."""
    L, H, kv, dh, d, v, inter = (s[k] for k in ("layers", "heads", "kv_heads", "head_dim", "hidden",
                                               "vocab", "intermediate"))
    mt = s["model_type"]
    gpt2 = mt == "gpt2"
    attn = d * H * dh * 2 + d * kv * dh * 2  # q, o and k, v (GQA)
    attn += (H + 2 * kv) * dh if mt in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text") else 0
    attn += (3 * H * dh + d) if gpt2 else 0  # c_attn and c_proj biases
    attn += {"qwen3": 2 * dh, "olmo2": (H + kv) * dh}.get(mt, 0)  # q/k norms
    expert = (2 * d * inter + inter + d) if gpt2 else 3 * d * inter  # gpt2 MLP has biases
    experts = max(1, s["experts"])
    mlp = expert * experts + (d * s["experts"] if s["experts"] else 0)  # + router
    norms = {"gpt2": 4 * d, "olmo": 0, "gemma2": 4 * d, "gemma3_text": 4 * d}.get(mt, 2 * d)
    final_norm = {"gpt2": 2 * d, "olmo": 0}.get(mt, d)
    emb = v * d * (1 if s["tied"] else 2) + s["positions"] * d
    total = emb + L * (attn + mlp + norms) + final_norm
    active = total - L * expert * (experts - max(1, s["experts_per_token"] or experts))
    return {"total": int(total), "active": int(active)}


def head_state_bytes(v: int, n: int, d: int, r: int, k: int, l1: bool) -> int:
    """Per-head per-step state of the torch backend, recovered from its ``head_batch_size``."""
    return _BIG // head_batch_size(v, n, d, r, k, _BIG, l1)  # exact below 2**50 bytes


def pursuit_memory(heads: int, v: int, n: int, d: int, dh: int, k: int, *, criterion: str,
                   subset: bool, memory: int = DEFAULT_MEMORY) -> dict:
    """Peak extra bytes of one ``somp_heads`` call over ``heads`` heads on a v-atom fp32
    dictionary, with the fp32 copies of z and W_O its caller makes (``rank_heads`` /
    ``describe_heads``); ``subset``: the dictionary is a row subset (a copy) of the unembedding.

    peak = held (copies of z, W_O, dictionary rows) + max(input checks, pursuit loop). The loop
    is the torch backend's memory model; the input checks (``torch.isfinite(dictionary).all()``,
    then ``D.square()``) briefly take 1.75x the fp32 dictionary (measured with RSS sampling on
    128256 x 2048 and SmolLM2's 49152 x 576 unembeddings), which dominates for the full vocabulary."""
    l1 = criterion == "l1"
    batch = min(heads, head_batch_size(v, n, d, dh, k, memory, l1))
    held = {"z_copy": heads * n * dh * 4, "w_o_fp32": heads * dh * d * 4}
    if subset:
        held["dictionary_rows"] = v * d * 4
    loop = {"state": batch * head_state_bytes(v, n, d, dh, k, l1), "chunk": max(1 << 24, memory // 8)}
    if uses_atom_space(v):  # Gram matrix D D.T, per head E = D M.T and the D q columns
        loop.update(gram=v * v * 4, atom_space=batch * (v * dh + k * v) * 4)
    else:
        loop["support_rows_Q"] = batch * k * d * 4
    checks = 7 * v * d  # 1.75 * (v * d * 4)
    return {"head_batch": batch, "parts": {**held, **loop, "input_checks": checks},
            "peak_bytes": sum(held.values()) + max(checks, sum(loop.values()))}


def pursuit_flops(heads: int, v: int, n: int, d: int, dh: int, k: int, criterion: str) -> float:
    """The section-6 floor: k head-steps plus the start-up product, per head."""
    step = 2 * v * n * dh + v * d if criterion == "l1" else v * d + 2 * v * dh
    return float(heads) * (k * step + 2 * v * d * dh)


def measure_gflops(device: str = "cpu", size: int = 1024, reps: int = 3) -> float:
    """Best of ``reps`` fp32 (size x size) matmuls on ``device``, in GFLOP/s."""
    import torch
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def device_memory(name: str) -> dict:
    """{"name", "free_bytes", "total_bytes"}; None values when the device is not present."""
    if name == "cpu":
        try:
            import psutil
            vm = psutil.virtual_memory()
            return {"name": name, "free_bytes": int(vm.available), "total_bytes": int(vm.total)}
        except ImportError:
            info = dict(ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines() if ":" in ln)
            kb = lambda key: int(info[key].split()[0]) * 1024 if key in info else None
            return {"name": name, "free_bytes": kb("MemAvailable"), "total_bytes": kb("MemTotal")}
    import torch
    idx = int(name.split(":")[1]) if ":" in name else 0
    if torch.cuda.is_available() and idx < torch.cuda.device_count():
        free, total = torch.cuda.mem_get_info(idx)
        return {"name": name, "free_bytes": int(free), "total_bytes": int(total)}
    return {"name": name, "free_bytes": None, "total_bytes": None}


def parse_devices(devices: str) -> list[str]:
    """"auto" (every CUDA device, else the CPU), "cpu", or "cuda:0,cuda:1"."""
    if devices == "auto":
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    out = [x.strip() for x in devices.split(",") if x.strip()]
    bad = [x for x in out if not (x == "cpu" or x == "cuda" or (x.startswith("cuda:") and x[5:].isdigit()))]
    if bad or not out or ("cpu" in out and len(out) > 1):
        raise ValueError(f"--devices {devices!r}: use auto, cpu, or a list like cuda:0,cuda:1")
    return ["cuda:0" if x == "cuda" else x for x in out]


def plan_run(config_or_folder, num_prompts: int, *, shard_size: int = 1000, dtype: str = "fp32",
             devices: str = "auto", gflops: float | None = None, concept_size: int = 256, k: int = 50,
             criterion: str = "l1", top: int = 10, k_tokens: int = 5, n_random: int = 3,
             tokens_per_prompt: int = 64, memory: int = DEFAULT_MEMORY) -> dict:
    """The plan of capturing ``num_prompts`` prompts, ranking every head and describing ``top``.

    Returns a JSON-ready dict (sizes in bytes, times in seconds) with a ``warnings`` list."""
    for name, val in (("num_prompts", num_prompts), ("shard_size", shard_size), ("k", k),
                      ("concept_size", concept_size), ("top", top), ("k_tokens", k_tokens)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive whole number, got {val!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
    if criterion not in ("l1", "l2", "ormp"):
        raise ValueError(f"criterion {criterion!r} is unknown; use l1, l2 or ormp")
    devs = parse_devices(devices)
    s = model_shape(load_config(config_or_folder))
    n, L, H, dh, d, v = num_prompts, s["layers"], s["heads"], s["head_dim"], s["hidden"], s["vocab"]
    params = parameter_count(s)
    weights = params["total"] * DTYPE_BYTES[dtype]
    mem = dict(criterion=criterion, memory=memory)
    kr = min(k, concept_size)
    rank = pursuit_memory(L * H, concept_size, n, d, dh, kr, subset=True, **mem)
    desc = pursuit_memory(min(top, L * H), v, n, d, dh, k_tokens, subset=False, **mem)
    for part in (rank, desc):
        if dtype != "fp32":  # rank_heads / describe_heads take .float() of the whole unembedding
            part["parts"]["unembedding_fp32"] = v * d * 4
            part["peak_bytes"] += v * d * 4
    runs = 1 + n_random
    rank["flops"] = runs * pursuit_flops(L * H, concept_size, n, d, dh, kr, criterion)
    desc["flops"] = pursuit_flops(min(top, L * H), v, n, d, dh, k_tokens, criterion)
    lookup = (0 if s["tied"] else v * d) + s["positions"] * d  # embedding lookups cost no FLOPs
    capture_flops = 2.0 * (params["active"] - lookup) * n * tokens_per_prompt
    source = "given"
    if gflops is None:
        gflops, source = measure_gflops("cuda:0" if devs[0].startswith("cuda") else "cpu"), f"measured on {devs[0]}"
    rate = gflops * 1e9
    capture_bytes = n * L * H * dh * 4
    out = {**s, "dtype": dtype, "prompts": n, "shard_size": shard_size,
           "shards": math.ceil(n / shard_size), "capture_bytes": capture_bytes,
           "capture_bytes_per_shard": min(n, shard_size) * L * H * dh * 4,
           "parameters": params["total"], "active_parameters": params["active"],
           "weights_bytes": weights, "weights_bytes_per_device": math.ceil(weights / len(devs)),
           "devices": [device_memory(x) for x in devs], "pursuit_device": devs[-1],
           "rank": {**rank, "concept_size": concept_size, "k": kr, "heads": L * H, "runs": runs,
                    "seconds": rank["flops"] / rate},
           "describe": {**desc, "k": k_tokens, "heads": min(top, L * H), "seconds": desc["flops"] / rate},
           "capture": {"flops": capture_flops, "tokens_per_prompt": tokens_per_prompt,
                       "seconds": capture_flops / rate},
           "gflops": round(gflops, 1), "gflops_source": source}
    out["seconds_total"] = out["rank"]["seconds"] + out["describe"]["seconds"] + out["capture"]["seconds"]
    out["warnings"] = fit_warnings(out)
    return out


def fit_warnings(p: dict) -> list[str]:
    """What does not fit the free memory of the devices present (or cannot be checked)."""
    out = []
    gib = lambda b: f"{b / GIB:.1f} GiB"
    host = device_memory("cpu")
    on_cpu = p["pursuit_device"] == "cpu"
    pursuit = max(p["rank"]["peak_bytes"], p["describe"]["peak_bytes"])
    for dev in p["devices"]:
        if dev["free_bytes"] is None:
            out.append(f"{dev['name']} is not present here: its fit cannot be checked")
            continue
        need = p["weights_bytes_per_device"] + (pursuit if dev["name"] == p["pursuit_device"] else 0)
        if on_cpu:
            need += p["capture_bytes"]
        if p["weights_bytes_per_device"] > dev["free_bytes"]:
            out.append(f"the weights ({gib(p['weights_bytes_per_device'])} per device, {p['dtype']}) do not "
                       f"fit {dev['name']} ({gib(dev['free_bytes'])} free): use more devices"
                       + (" or --dtype bf16" if p["dtype"] == "fp32" else ""))
        elif need > dev["free_bytes"]:
            out.append(f"{dev['name']} needs about {gib(need)} (weights + pursuit"
                       f"{' + capture' if on_cpu else ''}) but has {gib(dev['free_bytes'])} free: rank "
                       "fewer layers (--layers) or use fewer prompts")
    if host["free_bytes"] is not None and not on_cpu and p["capture_bytes"] > host["free_bytes"]:
        out.append(f"the capture ({gib(p['capture_bytes'])}) does not fit the host RAM "
                   f"({gib(host['free_bytes'])} free): capture in shards of {p['shard_size']} "
                   f"({gib(p['capture_bytes_per_shard'])} each) to disk")
    return out


def format_plan(p: dict) -> str:
    """The human-readable summary printed by ``hp-fast plan``."""
    gib = lambda b: f"{b / GIB:,.2f} GiB"
    secs = lambda x: f"{x:.2g} s" if x < 10 else f"{x:,.0f} s" if x < 3600 else f"{x / 3600:,.1f} h"
    rows = [f"model: {p['model_type']}  L={p['layers']} H={p['heads']} (KV {p['kv_heads']}) "
            f"dh={p['head_dim']} d={p['hidden']} v={p['vocab']}"
            + (f" experts={p['experts']}" if p["experts"] else ""),
            f"parameters: {p['parameters'] / 1e9:,.4g} B -> weights {gib(p['weights_bytes'])} "
            f"({p['dtype']}), {gib(p['weights_bytes_per_device'])} per device on {len(p['devices'])}",
            f"capture of {p['prompts']:,} prompts: {p['capture_bytes']:,} bytes ({gib(p['capture_bytes'])}) "
            f"per aggregate, {p['shards']} shard(s) of {gib(p['capture_bytes_per_shard'])}",
            f"rank ({p['rank']['heads']} heads, concept of {p['rank']['concept_size']}, k={p['rank']['k']}, "
            f"{p['rank']['runs']} runs): peak extra {gib(p['rank']['peak_bytes'])} on {p['pursuit_device']}, "
            f">= {secs(p['rank']['seconds'])}",
            f"describe ({p['describe']['heads']} heads, full vocabulary, k={p['describe']['k']}): peak extra "
            f"{gib(p['describe']['peak_bytes'])}, >= {secs(p['describe']['seconds'])}",
            f"capture forward passes ({p['capture']['tokens_per_prompt']} tokens/prompt): "
            f">= {secs(p['capture']['seconds'])}",
            f"time at {p['gflops']} GFLOP/s ({p['gflops_source']}): >= {secs(p['seconds_total'])} in all "
            "(FLOP floors, docs/fast-pursuit.md section 6: small concept dictionaries and loaded "
            "machines run several times slower)"]
    for dev in p["devices"]:
        if dev["free_bytes"] is not None:
            rows.append(f"{dev['name']}: {gib(dev['free_bytes'])} free of {gib(dev['total_bytes'])}")
    return "\n".join(rows)
