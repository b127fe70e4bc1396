import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# The tests use small tensors: one thread avoids OpenMP start-up and spin-wait costs that
# dominate at these sizes (measured: a 16x8 avg_pool2d took 11.6 ms on 2 busy threads vs 1.6 us).
torch.set_num_threads(1)
