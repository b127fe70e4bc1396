"""Latency of lowered sparse Linears vs dense fp32 and dense dynamic int8, in one run.

    python -m fx_sparsity.benchmarks.lowering            # Linear 1024² and 4096², batch 1/16/64, sparsity 0.5/0.8/0.9
    python -m fx_sparsity.benchmarks.lowering --quick    # tiny sizes, one repeat (a smoke test of the tool)
    python -m fx_sparsity.benchmarks.lowering --json out.json
    python tools/bench_lowering.py ...                   (same thing, from a checkout)

Per row, medians over ``--repeat`` runs of:

- ``fp32``: the dense ``nn.Linear`` (the weight already masked: same numbers, dense kernel);
- ``int8``: ``torch.ao.nn.quantized.dynamic.Linear`` under the x86 engine (dense int8);
- ``lowered``: ``convert_fx_sparse`` of the prepared model (dynamic sparse-quantized mapping),
  called as users call it, engine switch included;
- ``ao raw``: torch.ao's ``sparse.quantized.dynamic.Linear`` on the same weights, the
  qnnpack engine set around each call by the caller (what torch.ao users must write).

The four are timed in turn within each repeat (a change of machine load hits all
alike), each sample running enough calls to last >= 1 ms; the cell is the median
(``--stat min``: the minimum, steadier on a machine shared with other work).

Ratios < 1 mean the lowered module is faster. ``err`` is the lowered output's relative
error against the float masked model.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.timing import interleaved_times_ms

__all__ = ["bench", "table", "main"]


@contextlib.contextmanager
def quantized_engine(name: str):
    """``torch.backends.quantized.engine = name`` inside the block, the caller's setting restored after.

    What a torch.ao user writes around torch.ao's quantized modules (ours switch engines themselves).
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def dense_int8(linear: nn.Linear) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig

    float_linear: Any = copy.deepcopy(linear)
    float_linear.qconfig = default_dynamic_qconfig
    with quantized_engine("x86"):
        return torch.ao.nn.quantized.dynamic.Linear.from_float(float_linear)


def ao_sparse_dynamic(linear: nn.Linear) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig

    float_linear: Any = copy.deepcopy(linear)
    float_linear.qconfig = default_dynamic_qconfig
    with quantized_engine("qnnpack"):
        return torch.ao.nn.sparse.quantized.dynamic.Linear.from_float(float_linear)


STATS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


def bench(sizes, batches, levels, *, warmup: int, repeat: int, number: int | None = None,
          stat: str = "median") -> list[dict]:
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(size, size))
        for level in levels:
            sparsifier = fxs.WeightNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))
            prepared = fxs.prepare_fx_sparse(model, sparsifier)
            sparsifier.step()
            lowered = fxs.convert_fx_sparse(prepared)
            masked = nn.Linear(size, size)
            with torch.no_grad():
                masked.weight.copy_(prepared.get_parameter("0.weight") * prepared.get_buffer("0.weight_mask"))
                masked.bias.copy_(prepared.get_parameter("0.bias"))
            int8 = dense_int8(masked)
            raw = ao_sparse_dynamic(masked)
            for batch in batches:
                x = torch.randn(batch, size)
                with torch.no_grad():
                    ref = masked(x)
                    err = ((lowered(x) - ref).norm() / ref.norm()).item()
                # torch.ao's modules need their engine set by the caller; ours set it themselves.
                def int8_x86():
                    with quantized_engine("x86"):
                        return int8(x)

                def raw_qnnpack():
                    with quantized_engine("qnnpack"):
                        return raw(x)

                samples = interleaved_times_ms({"fp32": lambda: masked(x), "int8": int8_x86,
                                                "lowered": lambda: lowered(x), "raw": raw_qnnpack},
                                               warmup=warmup, repeat=repeat, number=number)
                ms = {k: STATS[stat](v) for k, v in samples.items()}
                fp32_ms, int8_ms, lowered_ms, raw_ms = ms["fp32"], ms["int8"], ms["lowered"], ms["raw"]
                rows.append({"size": size, "batch": batch, "sparsity": level, "fp32_ms": fp32_ms,
                             "int8_ms": int8_ms, "lowered_ms": lowered_ms, "ao_raw_ms": raw_ms,
                             "lowered_vs_fp32": lowered_ms / fp32_ms, "lowered_vs_int8": lowered_ms / int8_ms,
                             "rel_err": err,
                             "all_stats_ms": {k: {name: f(v) for name, f in STATS.items()}
                                              for k, v in samples.items()}})
    rows.sort(key=lambda r: (r["size"], r["batch"], r["sparsity"]))
    return rows


def table(rows: list[dict]) -> str:
    headers = ["Linear", "batch", "sparsity", "fp32 ms", "int8 ms", "lowered ms", "ao raw ms",
               "lowered/fp32", "lowered/int8", "err"]
    body = [[f"{r['size']}²", r["batch"], r["sparsity"], f"{r['fp32_ms']:.3f}", f"{r['int8_ms']:.3f}",
             f"{r['lowered_ms']:.3f}", f"{r['ao_raw_ms']:.3f}", f"{r['lowered_vs_fp32']:.2f}x",
             f"{r['lowered_vs_int8']:.2f}x", f"{r['rel_err']:.2%}"] for r in rows]
    return tabulate(body, headers=headers, tablefmt="github")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_sparsity.benchmarks.lowering",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat (checks the tool runs)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per cell (median; default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="Linear sizes n (n x n)")
    parser.add_argument("--stat", choices=sorted(STATS), default="median",
                        help="statistic over the repeats (min resists a loaded machine better; default median)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the setup as JSON")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([64, 128] if args.quick else [1024, 4096])
    repeat = args.repeat or (1 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)

    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "machine": platform.machine(), "repeat": repeat, "warmup": warmup, "stat": args.stat}
    print(f"torch {setup['torch']}, {setup['threads']} threads, {setup['cpu_count']} CPUs; "
          f"{args.stat} of {repeat} runs after {warmup} warm-up")
    rows = bench(sizes, [1, 16, 64], [0.5, 0.8, 0.9], warmup=warmup, repeat=repeat,
                 number=1 if args.quick else None, stat=args.stat)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
