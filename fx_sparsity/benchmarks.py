"""``python -m fx_sparsity bench``: runs the benchmark suite in the checkout's ``tools/bench.py``."""
from __future__ import annotations

import importlib.util
import os

__all__ = ["main"]

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench.py")


def main(argv=None) -> int:
    if not os.path.exists(_BENCH):
        raise SystemExit("the benchmarks live in tools/bench.py of a source checkout (pip install -e .); "
                         f"not found at {_BENCH}")
    spec = importlib.util.spec_from_file_location("fx_sparsity_tools_bench", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
