"""Peak-RSS growth of a sharded and an in-memory capture, measured in a fresh interpreter.

Run through ``multiprocessing``'s spawn context: a forked child would share the allocator's
free, already resident memory of a long test session. The peak is the kernel's high-water mark
of this process's own memory map (``VmHWM``), not ``ru_maxrss``: that one survives fork and
exec, so a child starts with the parent's peak and shows no growth below it (seen in CI).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

import hp_fast
from helpers.tiny_models import VOCAB, WORDS, tiny_tokenizer


def peak_rss_kib() -> int:
    """The high-water mark of resident memory of this process's memory map (KiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def capture_rss_growth(out: Path, result: Path) -> None:
    """Peak-RSS growth (KiB) of a sharded, then an in-memory capture of 240 one-token prompts
    of a narrow model with wide heads: 288 KiB of z per prompt (z 67.5 MiB in all, 5.6 MiB per
    shard), little compute. Writes "sharded in_memory" to ``result``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=12, intermediate_size=16,
                                   num_hidden_layers=3, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=4096, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    tok = tiny_tokenizer()
    prompts = [WORDS[i % 40] for i in range(240)]
    kw = dict(batch_size=20, chat_template=False, progress=False)
    hp_fast.capture(model, tok, prompts[:40], out=out / "warm", shard_size=20, **kw)  # warm up
    hp_fast.capture(model, tok, prompts[:40], **kw)
    peak = peak_rss_kib  # only rises
    base = peak()
    hp_fast.capture(model, tok, prompts, out=out / "sharded", shard_size=20, **kw)
    sharded = peak() - base
    hp_fast.capture(model, tok, prompts, **kw)
    result.write_text(f"{sharded} {peak() - base - sharded}")
