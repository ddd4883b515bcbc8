"""Offline data: the built-in word lists (``*.txt`` beside this file), question sets (``qa``)
and image datasets (``images``). See docs/architecture.md."""
