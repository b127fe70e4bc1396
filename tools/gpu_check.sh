#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (under 8 minutes on one GPU), from the repository root:
# install the project offline (--no-deps: the GPU image's own torch, tabulate, tqdm and pytest), run the tests
# marked `cuda`, then the 2:4 benchmark (Linear 4096x4096, 11008x4096 and 4096x11008 in fp16 and bf16 at 1, 64
# and 2048 tokens; the MLP 4 x 4096² compiled training step). The benchmark runs even if a test fails; the exit
# status is the first failure's. Everything printed also goes to ${OUT:-/tmp}/gpu_check.log (and gpu_check.json).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1
status=0
step() { "$@" 2>&1 | tee -a "$log"; local rc=${PIPESTATUS[0]}; [ "$status" -ne 0 ] || status=$rc; }

: > "$log"
step python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
step python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), 'torch', torch.__version__, \
'cuSPARSELt', torch.backends.cusparselt.version())"
[ "$status" -eq 0 ] || exit "$status"
# Only the files that hold `cuda` tests: the others need test-only packages a GPU image may lack.
step timeout 360 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py tests/test_semi_structured.py
step timeout 240 python3 -m fx_sparsity.benchmarks.semi_structured --quick --json "$out/gpu_check.json"
echo "gpu_check: exit status $status" | tee -a "$log"
exit "$status"
