"""2:4 on the GPU: Linear layers dense vs 2:4 semi-structured vs what ``mapping="auto"`` picks, and the
training-step overhead of masks, dense vs fx_sparsity vs torch.ao.pruning, compiled.

    python -m fx_sparsity.benchmarks.semi_structured [--quick] [--json PATH]
        [--sizes 4096x4096,11008x4096,4096x11008] [--tokens 1,64,2048] [--train mlp4096] [--device cuda]

Sizes are ``out x in`` (Llama-7B's MLP: 4096 → 11008 → 4096). Each layer's weight gets an
exact 2:4 mask (``NMSparsifier(2, 4)``) and is lowered twice: ``mapping="semi_structured"``
and ``mapping="auto"`` on that row's input (``auto`` may keep it dense). The three run
round-robin, each sample waiting for the GPU (``fx_sparsity.timing``); ratios are against
dense from the same rounds. A row whose 2:4 lowering is refused says why. ``--device cpu``
runs the same code on the CPU (2:4 is refused there: a smoke test with ``--sizes`` small).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, cast

import torch
from tabulate import tabulate
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.timing import device_synchronizer, interleaved_times_ms

from . import train_step

__all__ = ["linear_rows", "main"]


def _sizes(text: str) -> list[tuple[int, int]]:
    return [(int(out_f), int(in_f)) for out_f, in_f in (item.split("x") for item in text.split(","))]


def linear_rows(sizes: list[tuple[int, int]], tokens: list[int], device: str, rounds: int) -> list[dict]:
    """One row per dtype × size × token count: ms of dense, 2:4 and auto, their ratios, and auto's choice."""
    rows = []
    wait = device_synchronizer(device)
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in sizes:
            torch.manual_seed(0)
            sparsifier = fxs.NMSparsifier(2, 4)
            fxs.prepare_fx_sparse(nn.Sequential(nn.Linear(in_f, out_f)).to(device, dtype), sparsifier)
            sparsifier.step()
            dense = sparsifier.squash_mask().eval()
            try:
                two_four, refused = fxs.convert_fx_sparse(dense, "semi_structured"), None
            except (fxs.SparsityConfigError, RuntimeError) as e:
                two_four, refused = None, str(e).splitlines()[-1].strip()
            for n in tokens:
                x = torch.randn(n, in_f, device=device, dtype=dtype)
                auto = fxs.convert_fx_sparse(dense, "auto", example_inputs=(x,))
                info = cast("dict[str, Any]", auto.get_submodule("0").fx_sparsity_info)
                fns = {"dense": lambda: dense(x), "auto": lambda: auto(x)}
                if two_four is not None:
                    fns["2:4"] = lambda: two_four(x)
                samples = interleaved_times_ms(fns, warmup=2, repeat=rounds, number=None, min_sample_ms=2.0,
                                               synchronize=wait)
                ms = {k: statistics.median(v) for k, v in samples.items()}
                ratio = {k: statistics.median(c / d for c, d in zip(v, samples["dense"])) for k, v in samples.items()}
                rows.append({"dtype": str(dtype).removeprefix("torch."), "weight": f"{out_f}x{in_f}", "tokens": n,
                             "dense_ms": ms["dense"], "two_four_ms": ms.get("2:4"),
                             "two_four_vs_dense": ratio.get("2:4"), "auto_picked": info.get("auto_choice"),
                             "auto_vs_dense": ratio["auto"],
                             "two_four_refused": refused, "auto_not_timed_2_4": info.get("not_timed", {}).get("2:4")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_sparsity.benchmarks.semi_structured",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (every size, every token count)")
    parser.add_argument("--sizes", default="4096x4096,11008x4096,4096x11008", help="Linear weights, out x in")
    parser.add_argument("--tokens", default="1,64,2048", help="input rows")
    parser.add_argument("--train", default="mlp4096", help=f"train_step case ({list(train_step.CASES)}), or none")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{where}, torch {torch.__version__}\n")
    rows = linear_rows(_sizes(args.sizes), [int(t) for t in args.tokens.split(",")], args.device,
                       rounds=10 if args.quick else 30)
    print(tabulate([[r["dtype"], r["weight"], r["tokens"], r["dense_ms"], r["two_four_ms"], r["two_four_vs_dense"],
                     r["auto_picked"], r["auto_vs_dense"]] for r in rows], floatfmt=".3f", missingval="—",
                   headers=["dtype", "weight", "tokens", "dense ms", "2:4 ms", "2:4/dense", "auto picked",
                            "auto/dense"], tablefmt="github"))
    for reason in sorted({r["two_four_refused"] for r in rows if r["two_four_refused"]}):
        print(f"\n2:4 refused: {reason}")
    sparse = [r["auto_vs_dense"] for r in rows if r["auto_picked"] != "dense"]
    kept = [r["auto_vs_dense"] for r in rows if r["auto_picked"] == "dense"]
    print(f"\nauto picked a sparse kernel in {len(sparse)} of {len(rows)} rows"
          + (f"; there auto/dense is at worst {max(sparse):.3f} ({'never slower' if max(sparse) <= 1.0 else 'SLOWER'})"
             if sparse else "")
          + (f"; elsewhere it kept the dense layer itself (auto/dense {min(kept):.3f}-{max(kept):.3f}: timing noise)"
             if kept else ""))
    result: dict = {"linear": rows}
    if args.train != "none":
        train = train_step.measure(args.train, args.quick, rounds=10 if args.quick else 30, device=args.device)
        print(f"\n## train step: {train['name']}, {train_step.SPARSITY:.0%} masked, on {args.device}\n")
        print(tabulate([[f"{kind} {mode}", train["ms"][f"{kind} {mode}"],
                         None if kind == "dense" else train["ratios"][f"{kind} {mode} / dense {mode}"]]
                        for mode in ("compiled", "eager") for kind in ("dense", "fx_sparsity", "torch.ao")],
                       floatfmt=".3f", missingval="", headers=["train step", "ms", "vs dense (same mode)"],
                       tablefmt="github"))
        result["train_step"] = train
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
