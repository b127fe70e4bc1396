import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# The tests use small tensors: one thread avoids OpenMP start-up and spin-wait costs that
# dominate at these sizes (measured: a 16x8 avg_pool2d took 11.6 ms on 2 busy threads vs 1.6 us).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where there is no GPU (CI); tools/gpu_check.sh runs them on one."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
