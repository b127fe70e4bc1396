"""Lowered sparse Linears vs dense fp32 and int8: ``python tools/bench_lowering.py [--quick] ...``.

A thin wrapper: the code is :mod:`fx_sparsity.benchmarks.lowering`, installed with the package
(``python -m fx_sparsity.benchmarks.lowering ...`` runs the same thing without a checkout).
"""
import sys

from fx_sparsity.benchmarks.lowering import main

if __name__ == "__main__":
    sys.exit(main())
