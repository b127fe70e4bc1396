"""The benchmark suite, same flags as ``fx-sparsity bench``: ``python tools/bench.py [--quick] [--json PATH] ...``.

A thin wrapper: the code is :mod:`fx_sparsity.benchmarks.suite`, installed with the package
(``python -m fx_sparsity bench ...`` runs the same thing without a checkout).
"""
import sys

from fx_sparsity.benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main())
