"""Capture per-head attention outputs (before W_O), aggregated per prompt.

For every prompt and every query head we keep ``z`` (dh numbers): the head's attention
output averaged over the prompt's tokens (``aggregate="mean"``, padding masked out) or
taken at the last prompt token (``"last"``). Averaging is linear, so a head's mean write
into the residual stream is ``z @ W_O_slice.T`` (method.md §1), applied later.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapters import ModelAdapter, get_adapter

AGGREGATES = ("mean", "last")
_FORMAT = "hp_fast.HeadActivations/1"


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
            "checksum": round(float(w[:8].sum() + u[:8].sum()), 3)}


@dataclass
class HeadActivations:
    """Aggregated head outputs of ``n`` prompts.

    z:    (n, layers, heads, dh) float32 token-aggregated head outputs (before W_O)
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
        save_file({"z": self.z.contiguous()}, str(tmp),
                  metadata={"format": _FORMAT, "meta": json.dumps(self.meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "HeadActivations":
        """Read a file written by ``save``; with ``model``, check it matches and bind it."""
        path = Path(path)
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


def _aggregate(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """x (B, T, H*dh), mask (B, T) {0,1} -> (B, H*dh) float32."""
    m = mask.to(torch.float32)
    x = torch.where(mask[..., None].bool(), x.float(), 0.0)  # pad rows may hold NaN: drop them
    if how == "mean":
        return x.sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    last = (m * torch.arange(1, m.shape[1] + 1, device=m.device)).argmax(1)  # last real token
    return x[torch.arange(x.shape[0], device=x.device), last]


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


def capture(model, tokenizer, prompts: Sequence[str], *, aggregate: str = "mean",
            batch_size: int = 16, chat_template: bool | None = None, progress: bool = True,
            max_length: int | None = 512) -> HeadActivations:
    """Run ``model`` over ``prompts`` and keep each head's aggregated output.

    aggregate: "mean" over the prompt's tokens (padding excluded) or "last" prompt token.
    chat_template: wrap each prompt as a user turn (None: if the tokenizer has a template).
    Returns HeadActivations with z (n, layers, heads, dh) float32.
    """
    return capture_many(model, tokenizer, prompts, aggregates=(aggregate,), batch_size=batch_size,
                        chat_template=chat_template, progress=progress, max_length=max_length)[aggregate]


def store_batch(z: dict, outs: dict, start: int, stop: int, what: str) -> None:
    """Write one batch's per-layer aggregates {agg: [L x (B, H*dh)]} into z {agg: (n, L, H, dh)},
    refusing NaN/Inf so no bad row is ever kept."""
    for a, per_layer in outs.items():
        out = torch.stack(per_layer, dim=1)  # (B, L, H*dh)
        if not torch.isfinite(out).all():
            raise ValueError(f"the model produced NaN/Inf head outputs on {what} {start}..{stop - 1}; "
                             "try dtype=torch.float32")
        z[a][start:stop] = out.view(stop - start, *z[a].shape[1:])


def _forward(model, enc) -> None:
    """Forward pass for the hooks only: logits of the last position at most."""
    kw = dict(enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
    try:
        model(**kw, logits_to_keep=1)  # skips the (T, vocab) logits most models would form
    except TypeError:
        model(**kw)


@torch.no_grad()
def capture_many(model, tokenizer, prompts: Sequence[str], *, aggregates=("mean", "last"),
                 batch_size: int = 16, chat_template: bool | None = None, progress: bool = True,
                 max_length: int | None = 512) -> dict[str, HeadActivations]:
    """Like ``capture`` with several aggregates from one pass: {aggregate: HeadActivations}."""
    bad = [a for a in aggregates if a not in AGGREGATES]
    if bad or not aggregates:
        raise ValueError(f"aggregate={bad[0] if bad else aggregates!r} is unknown; use one of {AGGREGATES}")
    prompts = _check_prompts(prompts)
    ad = get_adapter(model)
    texts, used_template = format_prompts(tokenizer, prompts, chat_template)
    device = next(model.parameters()).device
    L, H, dh = ad.num_layers, ad.num_heads, ad.head_dim
    z = {a: torch.empty(len(texts), L, H, dh) for a in aggregates}
    state: dict = {}

    def make_hook(layer: int):
        def hook(_module, args):
            for a in aggregates:
                state["out"][a][layer] = _aggregate(args[0], state["mask"], a).cpu()
        return hook

    handles = [p.register_forward_pre_hook(make_hook(i)) for i, p in enumerate(ad.out_projs)]
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="capture", unit="batch",
                          disable=not progress):
            chunk = texts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=max_length is not None,
                            max_length=max_length, add_special_tokens=not used_template).to(device)
            state["mask"] = enc["attention_mask"]
            state["out"] = {a: [None] * L for a in aggregates}
            _forward(model, enc)
            store_batch(z, state["out"], start, start + len(chunk), "prompts")
    finally:
        for h in handles:
            h.remove()
    meta = {"model": model_fingerprint(model), "prompt_hash": prompts_hash(prompts),
            "chat_template": used_template, "num_samples": len(prompts),
            "shape": [len(texts), L, H, dh], "prompts": prompts}
    return {a: HeadActivations(z[a], dict(meta, aggregate=a), ad) for a in aggregates}
