"""The benchmarks, installed with the package: ``fx-sparsity bench`` / ``python -m fx_sparsity bench``.

- :mod:`fx_sparsity.benchmarks.suite`: the suite ``bench`` runs (``mask_update``, ``prepare``,
  ``memory``; ``train_step`` and ``inference`` folded in from the two modules below);
- :mod:`fx_sparsity.benchmarks.train_step`: training-step overhead of masking, eager and compiled;
- :mod:`fx_sparsity.benchmarks.inference`: ``mapping="auto"`` vs dense fp32 vs the seed's mapping;
- :mod:`fx_sparsity.benchmarks.lowering`: each lowered sparse Linear vs dense fp32 and dense int8;
- :mod:`fx_sparsity.benchmarks.one_shot`: ``one_shot`` (SparseGPT, Wanda) vs llm-compressor's ``oneshot``,
  time and peak memory, a subprocess per run (``bench --cases one_shot``, only when named).

Each module runs with ``python -m fx_sparsity.benchmarks.<name> [--quick] [--json PATH] ...``;
``tools/bench*.py`` in a checkout are the same commands. The benchmarks use only the public
``fx_sparsity`` API and :mod:`fx_sparsity.timing`, as a user would.
"""
from __future__ import annotations

from .suite import CASES, main

__all__ = ["CASES", "main"]
