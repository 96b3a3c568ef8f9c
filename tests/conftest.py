"""Test set-up shared by every test file.

Without CUDA, Triton kernels run under Triton's interpreter; TRITON_INTERPRET must be set
before the first `@triton.jit` is evaluated, which is why it is set here, before any test
module imports a kernel.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # CPU tests that take minutes (the full prebuilt-cache build) run only when asked, so
    # `pytest` (CI) stays quick; DET_RUN_SLOW=1 runs them.
    skip_slow = pytest.mark.skip(reason="slow on the CPU; DET_RUN_SLOW=1 runs it")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and os.environ.get("DET_RUN_SLOW") != "1":
            item.add_marker(skip_slow)


@pytest.fixture
def device() -> str:
    return DEVICE
