import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests
sys.path.insert(0, os.path.dirname(__file__))
