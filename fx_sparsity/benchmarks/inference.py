"""Inference latency of sparse MLPs: ``mapping="auto"`` vs dense fp32 vs the seed's dynamic mapping.

    python -m fx_sparsity.benchmarks.inference [--quick] [--json PATH] [--threads N] [--repeat R] [--int8 E]
    python tools/bench_inference.py ...   (same thing, from a checkout)

Model: 4 × ``nn.Linear(w, w)`` with ReLUs between, ``w`` = 1024 and 4096; every weight
sparsified by ``WeightNormSparsifier`` at 80/90/95% with (1, 4) blocks and unstructured
((1, 1) blocks); batch 1, 16 and 64. Per row, one run, each variant on the same input:

- ``dense``: the model with the masked weights, plain fp32 ``nn.Linear``;
- ``auto``: ``convert_fx_sparse(prepared, "auto", example_inputs=(x,))`` with that batch
  (the per-layer choice is made for the batch it will serve; default ``max_rel_error``,
  so float kernels only);
- ``seed``: ``convert_fx_sparse(prepared)``, torch.ao's sparse-quantized dynamic Linear
  (qnnpack, (1, 4) blocks; not run for unstructured masks, which it cannot take);
- ``auto int8`` (with ``--int8 0.02``): ``mapping="auto"`` with that ``max_rel_error``, so
  dense int8 and the seed's op compete too.

Variants run in turn for many rounds; times are medians per variant, ratios (variant time
over dense time, lower is faster) are medians of the ratios within each round, so load
changes on a shared machine cancel out.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from typing import cast

import torch
from tabulate import tabulate
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.timing import interleaved_times_ms

__all__ = ["run", "main"]

PATTERNS = {"(1,4) blocks": (1, 4), "unstructured": (1, 1)}
TARGET = {"sparsity": 0.9, "batch": 64, "speedup": 2.5}


def _mlp(width: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _prepared(width: int, sparsity: float, block: tuple[int, int]):
    model = _mlp(width)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=block,
                                          zeros_per_block=block[0] * block[1])
    prepared = fxs.prepare_fx_sparse(model, sparsifier)
    sparsifier.step()
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for i in range(0, 7, 2):
            cast(nn.Linear, dense[i]).weight.mul_(prepared.get_buffer(f"{i}.weight_mask"))
    return prepared, dense


def _choices(lowered) -> str:
    counts = Counter(m.fx_sparsity_info.get("auto_choice") for m in lowered.modules()
                     if "auto_choice" in getattr(m, "fx_sparsity_info", {}))
    return " ".join(f"{name}×{n}" for name, n in counts.items())


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def run(quick: bool, repeat: int, budget_s: float, int8_bound: float | None = None) -> list[dict]:
    widths = [256] if quick else [1024, 4096]
    sparsities = [0.9] if quick else [0.8, 0.9, 0.95]
    batches = [1, 64] if quick else [1, 16, 64]
    rows = []
    for width in widths:
        for sparsity in sparsities:
            for pattern, block in PATTERNS.items():
                prepared, dense = _prepared(width, sparsity, block)
                seed = None
                if block == (1, 4):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        seed = fxs.convert_fx_sparse(prepared)
                for batch in batches:
                    x = torch.randn(batch, width)
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        auto = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,))
                    convert_s = time.perf_counter() - start
                    fns = {"dense": functools.partial(dense, x), "auto": functools.partial(auto, x)}
                    if int8_bound:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            auto8 = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,),
                                                          max_rel_error=int8_bound)
                        fns["auto int8"] = functools.partial(auto8, x)
                    if seed is not None:
                        fns["seed"] = functools.partial(seed, x)
                    # one short sample per variant per round: a sample preempted by another
                    # process is an outlier the median drops
                    samples = interleaved_times_ms(fns, warmup=1, repeat=repeat, number=None, min_sample_ms=0.2,
                                                   budget_s=budget_s)
                    ms = {k: statistics.median(v) for k, v in samples.items()}
                    with torch.no_grad():
                        ref = dense(x)
                        errors = {"auto": _rel(auto(x), ref)}
                        if int8_bound:
                            errors["auto int8"] = _rel(auto8(x), ref)
                        if seed is not None:
                            errors["seed"] = _rel(seed(x), ref)
                    # Ratios are medians of same-round ratios: load changes between rounds cancel out.
                    ratios = {f"{k} / dense": statistics.median(a / d for a, d in zip(v, samples["dense"]))
                              for k, v in samples.items() if k != "dense"}
                    ratios["auto speedup"] = 1.0 / ratios["auto / dense"]
                    rows.append({
                        "case": "inference",
                        "name": f"MLP 4×{width}², {sparsity:.0%} {pattern}, batch {batch}",
                        "params": {"width": width, "sparsity": sparsity, "pattern": pattern, "batch": batch,
                                   "threads": torch.get_num_threads()},
                        "ms": ms, "ratios": ratios, "rel_error": errors,
                        "auto_choices": _choices(auto), "auto_convert_s": convert_s,
                        **({"auto_int8_choices": _choices(auto8)} if int8_bound else {}),
                    })
                    print(f"  {rows[-1]['name']}: auto {ratios['auto / dense']:.2f}× dense "
                          f"({rows[-1]['auto_choices']})", file=sys.stderr, flush=True)
                del prepared, dense, seed
    return rows


def _table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        p, ms, ratios = r["params"], r["ms"], r["ratios"]
        out.append({"width": p["width"], "pattern": p["pattern"], "sparsity": p["sparsity"], "batch": p["batch"],
                    "dense ms": ms["dense"], "auto ms": ms["auto"], "seed ms": ms.get("seed"),
                    "auto/dense": ratios["auto / dense"], "seed/dense": ratios.get("seed / dense"),
                    "auto speedup": ratios["auto speedup"], "auto choices": r["auto_choices"],
                    "auto err": r["rel_error"]["auto"]})
        if "auto int8 / dense" in ratios:
            out[-1].update({"auto int8/dense": ratios["auto int8 / dense"], "auto int8 choices": r["auto_int8_choices"],
                            "auto int8 err": r["rel_error"]["auto int8"]})
    return tabulate(out, headers="keys", floatfmt=".3g", missingval="n/a")


def _verdict(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        p = r["params"]
        if p["sparsity"] == TARGET["sparsity"] and p["batch"] == TARGET["batch"]:
            ok = r["ratios"]["auto speedup"] >= TARGET["speedup"]
            lines.append(f"target ≥{TARGET['speedup']}× at {p['sparsity']:.0%}, batch {p['batch']}, {p['width']}², "
                         f"{p['pattern']}: {r['ratios']['auto speedup']:.2f}× {'met' if ok else 'NOT met'}")
    slower = [r["name"] for r in rows if r["ratios"]["auto / dense"] > 1.05]
    lines.append("auto slower than dense (>5%) in: " + (", ".join(slower) if slower else "no row"))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_sparsity.benchmarks.inference",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small size, two batches (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=None, help="least timed rounds per row (default 15, quick 5)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per row, rounds added until spent (default 2, quick 0.3)")
    parser.add_argument("--int8", type=float, metavar="MAX_REL_ERROR", default=None,
                        help="also lower with mapping='auto' and this max_rel_error (e.g. 0.02), which lets the "
                             "int8 kernels compete")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = args.repeat or (5 if args.quick else 15)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = run(args.quick, repeat, args.budget or (0.3 if args.quick else 2.0), args.int8)
    print(_table(rows))
    if not args.quick:
        print("\n".join(_verdict(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
