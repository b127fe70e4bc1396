"""Inference latency, ``mapping="auto"`` vs dense vs the seed: ``python tools/bench_inference.py [--quick] ...``.

A thin wrapper: the code is :mod:`fx_sparsity.benchmarks.inference`, installed with the package
(``python -m fx_sparsity.benchmarks.inference ...`` runs the same thing without a checkout).
"""
import sys

from fx_sparsity.benchmarks.inference import main

if __name__ == "__main__":
    sys.exit(main())
