"""``python -m fx_sparsity.benchmarks``: the suite, as ``fx-sparsity bench``."""
import sys

from fx_sparsity.benchmarks import main

sys.exit(main())
