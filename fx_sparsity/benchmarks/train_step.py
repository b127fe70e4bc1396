"""Training-step overhead of masking: dense vs fx_sparsity vs torch.ao.pruning, eager and compiled.

    python -m fx_sparsity.benchmarks.train_step [--quick] [--json PATH] [--models mlp,encoder,mlp4096] [--rounds N]
                                                [--threads N] [--profile] [--device cuda]
    python tools/bench_train_step.py ...   (same thing, from a checkout)

One training step is forward + loss + backward + ``SGD.step`` (mask updates are measured by
``fx-sparsity bench``'s ``mask_update`` case, not here). Every variant trains its own copy of
the same model on the same batch:

- ``dense``: the plain model;
- ``fx_sparsity``: ``prepare_fx_sparse`` (masks set by one ``sparsifier.step()``);
- ``torch.ao``: ``torch.ao.pruning.WeightNormSparsifier`` parametrizations, same config;

each eager and under ``torch.compile`` (inductor). Compiled variants report how many
graphs dynamo made (0 = dynamo skipped the module: it ran eagerly).

Variants take one step each in turn, for many rounds, and the median per-step time per
variant is kept, so a load change on a shared machine hits all of them alike; ratios
are against dense (eager vs dense eager, compiled vs dense compiled) from the same run,
of the median step and, steadier on a busy machine, of the fastest step and of the
median CPU time (use ``--threads 1`` on a shared machine: then CPU time is our own work only).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
import torch._dynamo
import torch.ao.pruning as ao
from tabulate import tabulate
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fx_sparsity as fxs
from fx_sparsity.timing import device_synchronizer

__all__ = ["CASES", "measure", "main"]

SPARSITY = 0.9
TARGETS = {"eager": 1.10, "compiled": 1.05}


def mlp_case(quick: bool):
    width, batch = (256, 16) if quick else (1024, 64)
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    config = [{"tensor_fqn": f"{i}.weight"} for i in range(0, 7, 2)]
    return (f"MLP 4 x {width}², batch {batch}", model, config, "symbolic",
            (torch.randn(batch, width),), torch.randn(batch, width))


def encoder_case(quick: bool):
    d_model, heads, ff, batch, seq = (64, 4, 128, 4, 16) if quick else (512, 8, 2048, 8, 64)
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
    config = [{"tensor_fqn": f} for f in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                           "linear1.weight", "linear2.weight")]
    return (f"TransformerEncoderLayer d={d_model} ff={ff}, {batch}x{seq} tokens", model, config, "export",
            (torch.randn(batch, seq, d_model),), torch.randn(batch, seq, d_model))


def mlp4096_case(quick: bool):
    """The GPU case: MLP 4 x 4096², batch 64, whatever ``quick`` says (CPU: seconds per step)."""
    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (nn.Linear(4096, 4096), nn.ReLU())][:-1]
    config = [{"tensor_fqn": f"{i}.weight"} for i in range(0, 7, 2)]
    return ("MLP 4 x 4096², batch 64", nn.Sequential(*layers), config, "symbolic", (torch.randn(64, 4096),),
            torch.randn(64, 4096))


CASES = {"mlp": mlp_case, "encoder": encoder_case, "mlp4096": mlp4096_case}
DEFAULT_CASES = ("mlp", "encoder")


def _variants(model: nn.Module, config: list[dict], tracer: str, inputs: tuple) -> dict[str, nn.Module]:
    ours = fxs.WeightNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=(1, 4))
    prepared = fxs.prepare_fx_sparse(model, ours, config, tracer=tracer, example_inputs=inputs)
    ours.step()
    theirs = ao.WeightNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=(1, 4))
    ao_model = copy.deepcopy(model)
    theirs.prepare(ao_model, config)
    theirs.step()
    for entry in config:  # same masks in both, so both do the same work
        module_fqn, _, name = entry["tensor_fqn"].rpartition(".")
        ao_mask = getattr(ao_model.get_submodule(module_fqn).parametrizations, name)[0].mask
        assert torch.equal(ours.get_mask(entry["tensor_fqn"]), ao_mask), entry
    return {"dense": copy.deepcopy(model), "fx_sparsity": prepared, "torch.ao": ao_model}


class Step:
    """One SGD training step of ``call`` (the module or its compiled wrapper)."""

    def __init__(self, module: nn.Module, call, inputs: tuple, target: torch.Tensor):
        self.module, self.call, self.inputs, self.target = module, call, inputs, target
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)

    def __call__(self):
        loss = nn.functional.mse_loss(self.call(*self.inputs), self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def measure(case: str, quick: bool, rounds: int, profile: bool = False, device: str = "cpu") -> dict:
    name, model, config, tracer, inputs, target = CASES[case](quick)
    model, inputs, target = model.to(device), tuple(x.to(device) for x in inputs), target.to(device)
    wait = device_synchronizer(device) or (lambda: None)  # a GPU step returns before its kernels finish
    steps, graphs = {}, {}
    for kind, module in _variants(model, config, tracer, inputs).items():
        steps[f"{kind} eager"] = Step(module, module, inputs, target)
        compiled_copy = copy.deepcopy(module)
        counter = CompileCounterWithBackend("inductor")
        steps[f"{kind} compiled"] = Step(compiled_copy, torch.compile(compiled_copy, backend=counter), inputs, target)
        graphs[kind] = counter
    compile_s = {}
    for label, step in steps.items():  # warm-up; compiles happen here
        start = time.perf_counter()
        for _ in range(3):
            step()
        wait()
        compile_s[label] = time.perf_counter() - start
    # One step of each variant in turn, many times: load changes on a shared machine hit
    # every variant alike.
    times: dict[str, list[float]] = {label: [] for label in steps}
    cpu: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            wait()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wait()
            cpu[label].append((time.process_time() - start_cpu) * 1e3)
            times[label].append((time.perf_counter() - start) * 1e3)
    if profile:
        for label in ("dense eager", "fx_sparsity eager", "dense compiled", "fx_sparsity compiled"):
            with torch.profiler.profile() as prof:
                for _ in range(5):
                    steps[label]()
            print(f"\n### profile: {name}, {label} (5 steps)\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    ms = {label: statistics.median(t) for label, t in times.items()}
    # Two steadier estimates for a busy machine: the fastest step, and the median CPU time
    # of this process (with --threads 1 it counts only our own work, whoever else runs;
    # with more threads, OpenMP's spin-waiting inflates it under load).
    min_ms = {label: min(t) for label, t in times.items()}
    cpu_ms = {label: statistics.median(t) for label, t in cpu.items()}
    ratios, ratios_min, ratios_cpu = {}, {}, {}
    for kind in ("fx_sparsity", "torch.ao"):
        for mode in ("eager", "compiled"):
            key, ours, dense = f"{kind} {mode} / dense {mode}", f"{kind} {mode}", f"dense {mode}"
            ratios[key] = ms[ours] / ms[dense]
            ratios_min[key] = min_ms[ours] / min_ms[dense]
            ratios_cpu[key] = cpu_ms[ours] / cpu_ms[dense]
    ratios["dense compiled / dense eager"] = ms["dense compiled"] / ms["dense eager"]
    # Interquartile range over median: how steady the machine was.
    spread = {label: (statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0]) / statistics.median(t)
              for label, t in times.items()}
    return {"case": "train_step", "name": name, "params": {"sparsity": SPARSITY, "rounds": rounds,
                                                            "threads": torch.get_num_threads(), "device": device},
            "ms": ms, "min_ms": min_ms, "cpu_ms": cpu_ms, "ratios": ratios, "ratios_min": ratios_min,
            "ratios_cpu": ratios_cpu,
            "compiled_graphs": {k: c.frame_count for k, c in graphs.items()},
            "spread": spread, "warmup_s": compile_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_sparsity.benchmarks.train_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--models", default=",".join(DEFAULT_CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--device", default="cpu", help="where the models train, e.g. cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables (dense vs ours)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10 quick, 100 full)")
    args = parser.parse_args(argv)
    cases = args.models.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(CASES)}")
    rounds = args.rounds or (10 if args.quick else 100)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, on {args.device}; "
          f"sparsity {SPARSITY}; per-step medians over {rounds} round-robin rounds")
    warnings.filterwarnings("ignore", category=UserWarning)
    rows = []
    for case in cases:
        torch._dynamo.reset()
        row = measure(case, args.quick, rounds, args.profile, args.device)
        rows.append(row)
        print(f"\n## {row['name']}\n")
        table = []
        for kind in ("dense", "fx_sparsity", "torch.ao"):
            line: list[Any] = [kind]
            for mode in ("eager", "compiled"):
                line.append(row["ms"][f"{kind} {mode}"])
                for group in ("ratios", "ratios_min", "ratios_cpu"):
                    line.append(None if kind == "dense" else row[group][f"{kind} {mode} / dense {mode}"])
            line.append(row["compiled_graphs"][kind])
            table.append(line)
        print(tabulate(table, floatfmt=".3f", missingval="", headers=[
            "train step", "eager ms", "vs dense", "(min)", "(cpu)", "compiled ms", "vs dense", "(min)", "(cpu)",
            "compiled graphs"]))
        ours_eager = row["ratios"]["fx_sparsity eager / dense eager"]
        ours_compiled = row["ratios"]["fx_sparsity compiled / dense compiled"]
        spread = max(row["spread"].values())

        def verdict(ratio: float, target: float) -> str:
            return f"{ratio:.2f}x of dense ({'within' if ratio <= target else 'over'} the {target}x target)"

        print(f"\nfx_sparsity eager {verdict(ours_eager, TARGETS['eager'])}, compiled "
              f"{verdict(ours_compiled, TARGETS['compiled'])}")
        if spread > 0.25:  # interquartile range over median: the machine was not idle
            print(f"timings are unreliable: steps varied by up to {min(spread, 9.99):.0%} of their median (a busy "
                  f"machine); rerun on an idle one")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
