"""The tokenizer's padding side, set for one block and restored on exit.

Generation pads on the left (new tokens are appended on the right); VLM capture pads on the
right (real tokens keep positions 0.. without explicit position ids).
"""
from __future__ import annotations

from contextlib import contextmanager

SIDES = ("left", "right")


@contextmanager
def padding_side(tokenizer, side: str):
    """Inside the block ``tokenizer.padding_side == side``; the old side comes back on exit,
    also when the block raises. Yields the tokenizer."""
    if side not in SIDES:
        raise ValueError(f"padding side must be one of {SIDES}, got {side!r}")
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old


__all__ = ["SIDES", "padding_side"]
