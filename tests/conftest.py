"""Test set-up shared by tests/unit and tests/integration (helpers are importable as
``helpers.*`` through ``pythonpath`` in pyproject.toml)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests
