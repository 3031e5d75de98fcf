"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit kernel module is imported,
so kernels run on the CPU under Triton's interpreter (there is no GPU in CI)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
