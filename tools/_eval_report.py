"""What ``tools/eval_minilm.py`` and ``tools/eval_tiny_lm.py`` share: collecting what each pruning step's
sparsifier recorded, summing up ADMM's per-layer errors and times, and printing the table and the JSON.

Imported as ``_eval_report``: a tool run as ``python tools/x.py`` has ``tools/`` on its path.
"""
from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Callable, Iterator, Sequence

from tabulate import tabulate

import fx_sparsity as fxs

#: the two columns ``reconstruction_cells`` fills: ADMM's layer error as a fraction of SparseGPT's on the
#: same statistics, and ADMM's seconds per layer with ADMM's time divided by SparseGPT's
RECONSTRUCTION_HEADERS = ["layer error / SparseGPT's (mean / max)", "s/layer (ADMM time / SparseGPT's)"]


@contextlib.contextmanager
def recorded_states(before_step: Callable[[fxs.BaseSparsifier], None] | None = None) -> Iterator[list[dict]]:
    """While inside, every sparsifier's per-weight ``state`` after each ``step()``, in one list.

    ``one_shot`` steps a copy of the sparsifier per block and drops it, so what the copies record (ADMM's
    errors and times) is only reachable from ``step`` itself. ``before_step(sparsifier)`` runs first.
    """
    states: list[dict] = []
    original_step = fxs.BaseSparsifier.step

    def step(self, *args, **kwargs):
        if before_step is not None:
            before_step(self)
        result = original_step(self, *args, **kwargs)
        states.extend(dict(self.state[g["tensor_fqn"]]) for g in self.groups if self.state.get(g["tensor_fqn"]))
        return result

    fxs.BaseSparsifier.step = step  # type: ignore[method-assign]
    try:
        yield states
    finally:
        fxs.BaseSparsifier.step = original_step  # type: ignore[method-assign]


def reconstruction_summary(states: list[dict]) -> dict:
    """ADMM's per-layer errors and times, summed up (empty for the methods that record none)."""
    if not states or "reconstruction_error" not in states[0]:
        return {}
    summary = {"layers": len(states),
               "mean_error": statistics.mean(s["reconstruction_error"] for s in states),
               "layer_s": statistics.mean(s["seconds"] for s in states),
               "mean_iterations": statistics.mean(s["iterations"] for s in states)}
    if "relative_to_sparsegpt" in states[0]:
        ratios = [s["relative_to_sparsegpt"] for s in states]
        summary.update(mean_ratio=statistics.mean(ratios), max_ratio=max(ratios),
                       sparsegpt_layer_s=statistics.mean(s["sparsegpt_seconds"] for s in states),
                       slowdown=sum(s["seconds"] for s in states) / sum(s["sparsegpt_seconds"] for s in states))
    return summary


def reconstruction_cells(summary: dict | None) -> list[str]:
    """The ``RECONSTRUCTION_HEADERS`` cells of a row; ``-`` where no SparseGPT reference was run."""
    if not summary or "mean_ratio" not in summary:
        return ["-", "-"]
    return [f"{summary['mean_ratio']:.2f} / {summary['max_ratio']:.2f}",
            f"{summary['layer_s']:.2f} ({summary['slowdown']:.1f}x)"]


def github_table(rows: list[list[str]], headers: list[str]) -> str:
    """A Markdown table of cells formatted by the caller: no re-parsing, so "66.0" stays "66.0"."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def report(title: str, table: str, result: dict, json_path: str | None, notes: Sequence[str] = ()) -> None:
    """Print the title, the table and the notes under it; write ``result`` to ``json_path`` if given."""
    print(f"\n{title}\n")
    print(table)
    for note in notes:
        print(f"\n{note}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
