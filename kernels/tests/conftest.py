"""The kernels run on the CPU under Triton's interpreter (no GPU in CI): set before any @triton.jit import."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
