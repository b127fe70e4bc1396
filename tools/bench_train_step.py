"""Training-step overhead of masking: ``python tools/bench_train_step.py [--quick] [--json PATH] ...``.

A thin wrapper: the code is :mod:`fx_sparsity.benchmarks.train_step`, installed with the package
(``python -m fx_sparsity.benchmarks.train_step ...`` runs the same thing without a checkout).
"""
import sys

from fx_sparsity.benchmarks.train_step import main

if __name__ == "__main__":
    sys.exit(main())
