"""2:4 on the GPU: Linear layers dense vs 2:4 semi-structured vs what ``mapping="auto"`` picks, and the
training-step overhead of masks (``python -m fx_sparsity.benchmarks.semi_structured``; CUDA only).

Ratios are medians of CUDA-event timings in round-robin rounds (every variant once per round).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
from tabulate import tabulate
from torch import nn

import fx_sparsity as fxs

__all__ = ["main"]


def _ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for r in range(rounds):
        names = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for name in names:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def linear_rows(quick: bool) -> list[list]:
    rows = []
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in shapes:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(in_f, out_f)).to("cuda", dtype)
            sparsifier = fxs.NMSparsifier(2, 4)
            fxs.prepare_fx_sparse(model, sparsifier)
            sparsifier.step()
            dense = sparsifier.squash_mask()
            two_four = fxs.convert_fx_sparse(dense, "semi_structured")
            for tokens in (1, 64, 2048):
                x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
                auto = fxs.convert_fx_sparse(dense, "auto", example_inputs=(x,))
                choice = auto.get_submodule("0").fx_sparsity_info.get("auto_choice", "?")
                with torch.inference_mode():
                    ms = _ms({"dense": lambda: dense(x), "2:4": lambda: two_four(x), "auto": lambda: auto(x)},
                             rounds=20 if quick else 50)
                rows.append([str(dtype).replace("torch.", ""), f"{out_f}x{in_f}", tokens, f"{ms['dense']:.3f}",
                             f"{ms['2:4']:.3f}", f"{ms['2:4'] / ms['dense']:.2f}", choice,
                             f"{ms['auto'] / ms['dense']:.2f}"])
    return rows


def train_rows(quick: bool) -> list[list]:
    width = 1024 if quick else 4096
    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())][:-1]
    x, y = torch.randn(64, width, device="cuda"), torch.randn(64, width, device="cuda")
    dense = nn.Sequential(*layers).cuda()
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.9)
    prepared = fxs.prepare_fx_sparse(nn.Sequential(*layers).cuda(), sparsifier)
    sparsifier.step()

    def stepper(module: nn.Module) -> Callable[[], None]:
        compiled = torch.compile(module)
        opt = torch.optim.SGD(module.parameters(), lr=1e-3)

        def step() -> None:
            loss = (compiled(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    ms = _ms({"dense": stepper(dense), "masked": stepper(prepared)}, rounds=10 if quick else 30)
    return [[f"MLP 4 x {width}², batch 64, compiled", f"{ms['dense']:.3f}", f"{ms['masked']:.3f}",
             f"{ms['masked'] / ms['dense']:.2f}"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print(tabulate(linear_rows(args.quick), headers=["dtype", "weight", "tokens", "dense ms", "2:4 ms", "2:4/dense",
                                                    "auto picked", "auto/dense"], tablefmt="github"))
    print()
    print(tabulate(train_rows(args.quick), headers=["train step", "dense ms", "masked ms", "masked/dense"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
