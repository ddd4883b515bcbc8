"""Capture per-head attention outputs (before W_O), aggregated per prompt.

For every prompt and every query head we keep ``z`` (dh numbers): the head's attention
output averaged over the prompt's tokens (``aggregate="mean"``, padding masked out) or
taken at the last prompt token (``"last"``). Averaging is linear, so a head's mean write
into the residual stream is ``z @ W_O_slice.T`` (docs/method.md §1), applied later.

``capture_batches`` is the one capture loop (hooks on every W_O input, a mask per aggregate,
NaN check, each finished batch to a ``CaptureSink``); text capture here and image capture
(``hp_fast.capture_images``) only differ in how they build a batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .models.adapters import ModelAdapter, get_adapter
from .models.devices import input_device

AGGREGATES = ("mean", "last")
_FORMAT = "hp_fast.HeadActivations/1"
HEAD_BATCH_BYTES = 256 * 2**20  # z bytes of one batch of heads (ranking, describe, logit lens)


def prompts_hash(prompts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def model_fingerprint(model) -> dict:
    """Shapes plus a checksum of a few weights: enough to catch a mismatched model."""
    ad = get_adapter(model)
    w = ad.w_o(0).detach().float()
    u = ad.unembedding().detach().float()
    return {"model_type": ad.model_type, "num_layers": ad.num_layers, "num_heads": ad.num_heads,
            "head_dim": ad.head_dim, "hidden_size": ad.hidden_size, "vocab_size": int(u.shape[0]),
            "checksum": round(float(w[:8].sum() + u[:8].sum().to(w.device)), 3)}


@dataclass
class HeadActivations:
    """Aggregated head outputs of ``n`` prompts.

    z:    (n, layers, heads, dh) float32 token-aggregated head outputs (before W_O): a tensor,
          or for a sharded capture (``load(DIR)``) a memory-mapped ``store_read.ShardedZ``, which
          supports ``z.shape`` and ``z[rows, ...]``; read heads with ``head_z`` / ``head_batches``
    meta: model fingerprint, prompt hash, aggregate, chat template flag, prompts
    """

    z: torch.Tensor
    meta: dict
    adapter: ModelAdapter | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return self.z.shape[0]

    @property
    def prompts(self) -> list[str]:
        return list(self.meta.get("prompts", []))

    def bind(self, model) -> "HeadActivations":
        """Attach a model (for ``head_outputs``) after checking it is the captured one."""
        fp = model_fingerprint(model)
        mine = self.meta.get("model", {})
        diff = [k for k in fp if k in mine and mine[k] != fp[k] and k != "checksum"]
        if diff or (mine.get("checksum") is not None
                    and abs(mine["checksum"] - fp["checksum"]) > 1e-2 * max(1.0, abs(fp["checksum"]))):
            raise ValueError(
                f"these activations were captured on a different model ({mine}) than the one "
                f"given ({fp}); capture again with this model")
        self.adapter = get_adapter(model)
        return self

    def head_outputs(self, layer: int, head: int) -> torch.Tensor:
        """(n, d) the head's aggregated write into the residual stream."""
        if self.adapter is None:
            raise ValueError("no model bound: use HeadActivations.load(path, model=model) or .bind(model)")
        w = self.adapter.head_w_o(layer, head).detach().float()  # (dh, d)
        return self.z[:, layer, head] @ w

    def head_z(self, heads) -> torch.Tensor:
        """(b, n, dh) float32 contiguous ``z`` of ``heads`` [(layer, head), ...]."""
        n, L, H, dh = self.z.shape
        bad = [(l, h) for l, h in heads if not (0 <= l < L and 0 <= h < H)]
        if bad:
            raise ValueError(f"head {bad[0]} does not exist: these activations have {L} layers x "
                             f"{H} heads (0-based indices)")
        flat = [int(l) * H + int(h) for l, h in heads]
        if isinstance(self.z, torch.Tensor):
            return self.z.reshape(n, L * H, dh)[:, flat].transpose(0, 1).contiguous()
        return self.z.heads(flat)  # only these heads' bytes are read from the shards

    def head_batches(self, heads, max_bytes: int | None = None):
        """Yield (heads chunk, z (b, n, dh)) in order, b * n * dh * 4 <= max_bytes (default
        ``HEAD_BATCH_BYTES``; b >= 1).

        The chunks depend only on n, dh and max_bytes, never on where z lives, so a sharded
        and an in-memory capture of the same numbers give the same results bit for bit."""
        heads = list(heads)
        max_bytes = HEAD_BATCH_BYTES if max_bytes is None else max_bytes
        step = max(1, int(max_bytes) // max(1, self.z.shape[0] * self.z.shape[3] * 4))
        for i in range(0, len(heads), step):
            yield heads[i:i + step], self.head_z(heads[i:i + step])

    def subset(self, idx) -> "HeadActivations":
        """A subset of the samples (list or slice of indices)."""
        idx = torch.as_tensor(idx, dtype=torch.long) if not isinstance(idx, slice) else idx
        meta = dict(self.meta)
        prompts = self.prompts
        if prompts:
            meta["prompts"] = [prompts[i] for i in (range(len(prompts))[idx] if isinstance(idx, slice) else idx.tolist())]
            meta["prompt_hash"] = prompts_hash(meta["prompts"])
        return HeadActivations(self.z[idx], meta, self.adapter)

    def save(self, path: str | os.PathLike) -> Path:
        """Write safetensors (z) with the metadata as JSON; atomic (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        z = self.z if isinstance(self.z, torch.Tensor) else self.z.materialize()
        save_file({"z": z.contiguous()}, str(tmp),
                  metadata={"format": _FORMAT, "meta": json.dumps(self.meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, *, aggregate: str | None = None,
             verify: bool = False) -> "HeadActivations":
        """Read a file written by ``save``, or a sharded capture folder (``capture(out=DIR)``,
        z memory-mapped; ``aggregate`` picks one when it holds several, ``verify`` checks every
        shard's sha256); with ``model``, check it matches and bind it."""
        path = Path(path)
        if path.is_dir():
            from .store_read import load_activations
            return load_activations(path, model, aggregate=aggregate, verify=verify)
        if not path.is_file():
            raise ValueError(f"activation file {path} does not exist")
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors activation file ({err}); "
                             "capture again with `hp-fast capture`") from err
        if header.get("format") != _FORMAT or "z" not in tensors:
            raise ValueError(f"{path} was not written by HeadActivations.save (format "
                             f"{header.get('format')!r}); capture again")
        acts = cls(tensors["z"], json.loads(header["meta"]))
        if model is not None:
            acts.bind(model)
        return acts


def format_prompts(tokenizer, prompts: Sequence[str], chat_template: bool | None) -> tuple[list[str], bool]:
    """Wrap prompts in the tokenizer's chat template (default: when it has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = has_template if chat_template is None else chat_template
    if use and not has_template:
        raise ValueError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    if not use:
        return list(prompts), False
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return texts, True


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, so left padding changes nothing."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string; wrap it: [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt (an empty prompt file?)")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompts {bad[:5]} are empty or not strings; remove them")
    return prompts


# ---- the capture core: one loop for text and images ---------------------------------------

class CaptureSink(Protocol):
    """Where a finished batch goes.

    ``write(start, stop, z)`` receives rows ``start..stop-1`` of the capture as
    ``{aggregate: (stop - start, L, H, dh) float32}``, already checked finite, in batch order.
    ``MemorySink`` (the default) keeps them in memory; a store that streams shards to disk
    implements the same one method.
    """

    def write(self, start: int, stop: int, z: dict[str, torch.Tensor]) -> None: ...


class MemorySink:
    """Keeps every aggregate's ``z`` (n, L, H, dh) float32 in memory (``.z[aggregate]``)."""

    def __init__(self, n: int, aggregates: Sequence[str], shape: tuple[int, int, int]):
        self.z = {a: torch.empty(n, *shape) for a in aggregates}  # (n, L, H, dh) each

    def write(self, start: int, stop: int, z: dict[str, torch.Tensor]) -> None:
        for a, rows in z.items():  # rows (B, L, H, dh)
            self.z[a][start:stop] = rows


@dataclass
class CaptureBatch:
    """One batch ready for the forward pass.

    inputs: the model's keyword arguments (input_ids, attention_mask, pixel_values, ...)
    masks:  {aggregate: (B, T) mask} the positions each aggregate reads; "last" reads the last
            True position, every other aggregate averages over its True positions
    """

    inputs: Mapping
    masks: dict[str, torch.Tensor]


def check_aggregates(aggregates: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """The aggregates as a tuple, or a ValueError naming the unknown one."""
    aggregates = tuple(aggregates)
    bad = [a for a in aggregates if a not in allowed]
    if bad or not aggregates:
        raise ValueError(f"aggregate={bad[0] if bad else aggregates!r} is unknown; "
                         f"use one of {tuple(allowed)}")
    return aggregates


def aggregate_positions(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """x (B, T, H*dh), mask (B, T) {0,1} -> (B, H*dh) float32: mean over the masked positions
    (``how="mean"``) or the last masked position (``"last"``)."""
    m = mask.to(torch.float32)
    x = torch.where(mask[..., None].bool(), x.float(), 0.0)  # pad rows may hold NaN: drop them
    if how == "mean":
        return x.sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    last = (m * torch.arange(1, m.shape[1] + 1, device=m.device)).argmax(1)  # last real token
    return x[torch.arange(x.shape[0], device=x.device), last]


def forward_for_hooks(model, inputs: Mapping) -> None:
    """Forward pass for the hooks only: no cache, logits of the last position at most."""
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)  # skips the (T, vocab) logits
    except TypeError:
        model(**inputs, use_cache=False)


def _finished(out: dict, start: int, stop: int, what: str, shape: tuple) -> dict[str, torch.Tensor]:
    """{agg: [L x (B, H*dh)]} -> {agg: (B, L, H, dh)}, refusing NaN/Inf so no bad row is kept."""
    done = {}
    for a, per_layer in out.items():
        rows = torch.stack(per_layer, dim=1)  # (B, L, H*dh)
        if not torch.isfinite(rows).all():
            raise ValueError(f"the model produced NaN/Inf head outputs on {what} {start}..{stop - 1}; "
                             "try dtype=torch.float32")
        done[a] = rows.view(stop - start, *shape)
    return done


@torch.no_grad()
def capture_batches(model, n: int, make_batch: Callable[[int, int], CaptureBatch],
                    aggregates: Sequence[str], sink: CaptureSink, *, batch_size: int,
                    what: str = "prompts", progress: bool = True,
                    batches: Sequence[tuple[int, int]] | None = None) -> None:
    """The capture loop every modality uses: forward pre-hooks on every layer's W_O read its
    input (the concatenated head outputs), reduce it under each aggregate's mask, and each
    finished batch goes to ``sink.write``.

    make_batch(start, stop) -> CaptureBatch for samples start..stop-1 (tokenized text, or
    processed images with their image-token masks). what: names the samples in errors.
    batches: the (start, stop) spans to run (default: all n in batch_size steps); a resumed
    store passes its missing shards' batches, and the progress bar starts at what is done.
    """
    if batches is None:
        batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    ad = get_adapter(model)
    L, shape = ad.num_layers, (ad.num_layers, ad.num_heads, ad.head_dim)
    state: dict = {}

    def make_hook(layer: int):
        def hook(_module, args):  # args[0]: (B, T, H*dh), the W_O input
            for a in aggregates:
                how = "last" if a == "last" else "mean"
                mask = state["masks"][a].to(args[0].device)  # layers may sit on other devices
                state["out"][a][layer] = aggregate_positions(args[0], mask, how).cpu()
        return hook

    handles = [p.register_forward_pre_hook(make_hook(i)) for i, p in enumerate(ad.out_projs)]
    bar = tqdm(total=n, initial=n - sum(b - a for a, b in batches), desc=f"capture {what}",
               unit=what.rstrip("s"), disable=not progress)
    try:
        for start, stop in batches:
            batch = make_batch(start, stop)
            state["masks"] = batch.masks
            state["out"] = {a: [None] * L for a in aggregates}
            forward_for_hooks(model, batch.inputs)
            sink.write(start, stop, _finished(state["out"], start, stop, what, shape))
            bar.update(stop - start)
    finally:
        bar.close()
        for h in handles:
            h.remove()


# ---- text -----------------------------------------------------------------------------------

def capture(model, tokenizer, prompts: Sequence[str], *, aggregate: str = "mean",
            batch_size: int = 16, chat_template: bool | None = None, progress: bool = True,
            max_length: int | None = 512, out=None, shard_size: int | None = None,
            overwrite: bool = False) -> HeadActivations:
    """Run ``model`` over ``prompts`` and keep each head's aggregated output.

    aggregate: "mean" over the prompt's tokens (padding excluded) or "last" prompt token.
    chat_template: wrap each prompt as a user turn (None: if the tokenizer has a template).
    out: a path ending in ``.safetensors`` saves the result there (one file); any other path
    is a folder that receives shards of ``shard_size`` prompts (default 1000, or the stored
    one) as they finish; running again resumes after the last complete shard, and a run with
    another model, prompts or settings is refused unless ``overwrite=True`` (``hp_fast.store``).
    Returns HeadActivations with z (n, layers, heads, dh) float32 (memory-mapped for a folder).
    """
    return capture_many(model, tokenizer, prompts, aggregates=(aggregate,), batch_size=batch_size,
                        chat_template=chat_template, progress=progress, max_length=max_length,
                        out=out, shard_size=shard_size, overwrite=overwrite)[aggregate]


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    return batch_size


def is_store_path(out) -> bool:
    """True when ``out`` names a sharded capture folder (not a ``.safetensors`` file)."""
    return out is not None and not str(out).endswith(".safetensors")


def finish_capture(acts: dict[str, HeadActivations], out) -> dict[str, HeadActivations]:
    """Save the one aggregate to ``out`` (a .safetensors path) when given."""
    if out is not None:
        if len(acts) > 1:
            raise ValueError(f"out={str(out)!r} is one .safetensors file, which holds one "
                             "aggregate; capture one aggregate or give a folder")
        next(iter(acts.values())).save(out)
    return acts


def text_batch_encoder(model, tokenizer, texts: Sequence[str], *, used_template: bool,
                       aggregates: Sequence[str], max_length: int | None):
    """make_batch(start, stop) -> CaptureBatch of the (formatted) ``texts`` for ``capture_batches``."""
    device = input_device(model)  # the embedding's device (a parameter may be on meta)

    def make_batch(start: int, stop: int) -> CaptureBatch:
        enc = tokenizer(list(texts[start:stop]), return_tensors="pt", padding=True,
                        truncation=max_length is not None, max_length=max_length,
                        add_special_tokens=not used_template).to(device)
        mask = enc["attention_mask"]  # (B, T); positions count real tokens, so padding side is moot
        return CaptureBatch(dict(enc, position_ids=position_ids(mask)), {a: mask for a in aggregates})

    return make_batch


def capture_many(model, tokenizer, prompts: Sequence[str], *, aggregates=("mean", "last"),
                 batch_size: int = 16, chat_template: bool | None = None, progress: bool = True,
                 max_length: int | None = 512, out=None, shard_size: int | None = None,
                 overwrite: bool = False) -> dict[str, HeadActivations]:
    """Like ``capture`` with several aggregates from one pass: {aggregate: HeadActivations}
    (one store folder holds every aggregate)."""
    aggregates = check_aggregates(aggregates, AGGREGATES)
    prompts = _check_prompts(prompts)
    check_batch_size(batch_size)
    if out is not None and not is_store_path(out) and len(aggregates) > 1:
        finish_capture(dict.fromkeys(aggregates), out)  # the error, before any work
    ad = get_adapter(model)
    texts, used_template = format_prompts(tokenizer, prompts, chat_template)
    make_batch = text_batch_encoder(model, tokenizer, texts, used_template=used_template,
                                    aggregates=aggregates, max_length=max_length)

    L, H, dh = ad.num_layers, ad.num_heads, ad.head_dim
    meta = {"model": model_fingerprint(model), "prompt_hash": prompts_hash(prompts),
            "chat_template": used_template, "num_samples": len(prompts),
            "shape": [len(texts), L, H, dh]}
    if is_store_path(out):
        from .store import capture_to_store, store_header
        settings = {"modality": "text", "aggregates": list(aggregates), "chat_template": used_template,
                    "max_length": max_length, "texts_hash": prompts_hash(texts)}
        capture_to_store(model, len(texts), make_batch, aggregates,
                         store_header(model, meta, settings, shard_size), out, batch_size=batch_size,
                         overwrite=overwrite, progress=progress, prompts={"prompts": prompts})
        return {a: HeadActivations.load(out, model, aggregate=a) for a in aggregates}
    sink = MemorySink(len(texts), aggregates, (L, H, dh))
    capture_batches(model, len(texts), make_batch, aggregates, sink, batch_size=batch_size,
                    what="prompts", progress=progress)
    meta["prompts"] = prompts
    return finish_capture({a: HeadActivations(sink.z[a], dict(meta, aggregate=a), ad)
                           for a in aggregates}, out)
