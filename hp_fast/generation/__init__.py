"""Batched greedy generation: one loop (``loop.generate_rows``) under answers, many edit
configurations per batch, the shared prompt prefix, images, and the shared trunk.
See docs/architecture.md."""
from .configs import generate_configs
from .images import generate_images
from .loop import generate_answers, generate_rows
from .prefix import generate_configs_shared_prefix

__all__ = ["generate_answers", "generate_configs", "generate_configs_shared_prefix",
           "generate_images", "generate_rows"]
