#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (under 8 minutes on one GPU):
# the tests marked `cuda`, then a short 2:4 benchmark. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -m cuda tests
timeout 300 python -m fx_sparsity.benchmarks.semi_structured --quick
