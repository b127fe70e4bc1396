"""fx_sparsity benchmark suite: every number a ratio measured in one run.

    python -m fx_sparsity bench [--quick] [--json PATH] [--cases mask_update,prepare,memory,train_step,inference]
    python -m fx_sparsity bench --cases one_shot [--llmc-python PATH] [--one-shot-sizes 100m,400m,1b]
    fx-sparsity bench ...  /  python tools/bench.py ...  /  python -m fx_sparsity.benchmarks ...   (same thing)

Cases measured here: ``mask_update`` (sparsifier.step, ours vs torch.ao.pruning, masks
checked identical in the same run), ``prepare`` (prepare_fx_sparse on chains of Linear
layers), ``memory`` (mask and lowered-model bytes). ``train_step`` and ``inference`` run
the sibling modules :mod:`fx_sparsity.benchmarks.train_step` /
:mod:`fx_sparsity.benchmarks.inference` in a child process each (their own torch.compile
caches, thread count and warning filters) and fold their JSON in.
Timings are medians from ``torch.utils.benchmark`` (warm-up included).
``one_shot`` (:mod:`fx_sparsity.benchmarks.one_shot`: one-shot pruning of a random Llama, ours vs
llm-compressor, time and peak memory, a subprocess per run) takes minutes per size: it runs only
when ``--cases`` names it.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.ao.pruning as ao
from tabulate import tabulate
from torch import nn
from torch.utils.benchmark import Timer

import fx_sparsity as fxs

from .scopes import case_scopes
from .structured import case_structured

__all__ = ["CASES", "main"]


def median_ms(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def _ao_mask(model, fqn):
    module_fqn, _, name = fqn.rpartition(".")
    return getattr(model.get_submodule(module_fqn).parametrizations, name)[0].mask


def _stack(width: int, depth: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


# -- mask_update --------------------------------------------------------------------------

SPARSIFIERS = {
    "WeightNorm (1,4) z=4 sl=0.8": (
        lambda lib: lib.WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4), zeros_per_block=4)),
    "WeightNorm (4,4) z=2 sl=0.8": (
        lambda lib: lib.WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(4, 4), zeros_per_block=2)),
    "NearlyDiagonal n=3": (lambda lib: lib.NearlyDiagonalSparsifier(nearliness=3)),
}


def case_mask_update(quick: bool) -> list[dict]:
    models = {"1 x 256²": lambda: _stack(256, 1)} if quick else {
        "1 x 1024²": lambda: _stack(1024, 1),
        "1 x 4096²": lambda: _stack(4096, 1),
        "50 x 512²": lambda: _stack(512, 50),
    }
    rows = []
    for model_name, make in models.items():
        for sp_name, make_sparsifier in SPARSIFIERS.items():
            torch.manual_seed(0)
            model = make()
            ours, theirs = make_sparsifier(fxs), make_sparsifier(ao)
            prepared = fxs.prepare_fx_sparse(model, ours)
            ao_model = copy.deepcopy(model)
            theirs.prepare(ao_model, None)
            ours.step()
            theirs.step()
            identical = all(torch.equal(ours.get_mask(g["tensor_fqn"]), _ao_mask(ao_model, g["tensor_fqn"]))
                            for g in ours.groups)
            budget = 0.2 if quick else 1.0
            t_ours = median_ms(ours.step, budget)
            t_ao = median_ms(theirs.step, budget)
            identical &= all(torch.equal(ours.get_mask(g["tensor_fqn"]), _ao_mask(ao_model, g["tensor_fqn"]))
                             for g in ours.groups)
            del prepared
            rows.append({"case": "mask_update", "name": f"{sp_name} | {model_name}",
                         "params": {"sparsifier": sp_name, "model": model_name},
                         "ms": {"fx_sparsity": t_ours, "torch.ao": t_ao},
                         "ratios": {"torch.ao / fx_sparsity (speedup)": t_ao / t_ours},
                         "masks_identical": identical})
    return rows


# -- prepare ------------------------------------------------------------------------------

def case_prepare(quick: bool) -> list[dict]:
    rows = []
    for depth in ((10, 50) if quick else (100, 500, 1000)):
        model = _stack(16, depth)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier())
            times.append((time.perf_counter() - start) * 1e3)
        ours = sorted(times)[1]
        times = []
        for _ in range(3):
            ao_model = copy.deepcopy(model)
            start = time.perf_counter()
            ao.WeightNormSparsifier().prepare(ao_model, None)
            times.append((time.perf_counter() - start) * 1e3)
        theirs = sorted(times)[1]
        rows.append({"case": "prepare", "name": f"{depth} Linear layers", "params": {"layers": depth},
                     "ms": {"fx_sparsity": ours, "torch.ao (in place, no copy/trace)": theirs},
                     "ratios": {"fx_sparsity ms / layer": ours / depth,
                                "fx_sparsity / torch.ao": ours / theirs}})
    return rows


# -- memory -------------------------------------------------------------------------------

def _state_bytes(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def case_memory(quick: bool) -> list[dict]:
    width = 256 if quick else 1024
    rows = []
    for mask_dtype in (None, torch.bool):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.9)
        config: list[dict[str, Any]] = [
            {"tensor_fqn": f"{i}.weight", **({"mask_dtype": mask_dtype} if mask_dtype else {})} for i in range(4)]
        prepared = fxs.prepare_fx_sparse(_stack(width, 4), sparsifier, config)
        sparsifier.step()
        mask_bytes = sum(b.numel() * b.element_size() for n, b in prepared.named_buffers() if n.endswith("_mask"))
        weight_bytes = sum(prepared.get_parameter(c["tensor_fqn"]).numel() * 4 for c in config)
        rows.append({"case": "memory", "name": f"masks, dtype={'bool' if mask_dtype else 'float32'}",
                     "params": {"width": width, "layers": 4},
                     "bytes": {"masks": mask_bytes, "weights": weight_bytes},
                     "ratios": {"mask / weight bytes": mask_bytes / weight_bytes}})
    lowerings: dict[str, Any] = {}
    if hasattr(fxs, "convert_fx_sparse"):
        lowerings["dynamic sparse-quantized"] = None
        for name in ("get_sparse_csr_mapping", "get_sparse_bsr_mapping"):
            if hasattr(fxs, name):
                lowerings[name.replace("get_sparse_", "").replace("_mapping", "").upper()] = getattr(fxs, name)()
    for name, mapping in lowerings.items():
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 4))
        dense = _stack(width, 4)
        prepared = fxs.prepare_fx_sparse(dense, sparsifier)
        sparsifier.step()
        try:
            lowered = fxs.convert_fx_sparse(prepared, mapping)
        except Exception as e:  # a lowering target this build cannot run is reported, not fatal
            print(f"memory: lowering to {name} failed: {e}", file=sys.stderr)
            continue
        rows.append({"case": "memory", "name": f"lowered ({name}) at 90%", "params": {"width": width, "layers": 4},
                     "bytes": {"lowered": _state_bytes(lowered), "dense": _state_bytes(dense)},
                     "ratios": {"lowered / dense bytes": _state_bytes(lowered) / _state_bytes(dense)}})
    return rows


# -- cases measured by sibling modules ----------------------------------------------------

def _sibling(module: str, case: str, quick: bool) -> list[dict]:
    """Run ``python -m fx_sparsity.benchmarks.<module> --json ...`` and return its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", f"fx_sparsity.benchmarks.{module}", "--json", out] + (["--quick"] if quick else [])
        subprocess.run(cmd, check=True)
        with open(out) as f:
            data = json.load(f)
    rows = data if isinstance(data, list) else data.get("cases", data.get("rows", [data]))
    for row in rows:
        row.setdefault("case", case)
    return rows


CASES = {
    "mask_update": case_mask_update,
    "prepare": case_prepare,
    "memory": case_memory,
    "scopes": case_scopes,
    "structured": case_structured,
    "train_step": lambda quick: _sibling("train_step", "train_step", quick),
    "inference": lambda quick: _sibling("inference", "inference", quick),
    "one_shot": lambda quick: _case_one_shot(quick),
}


def _case_one_shot(quick: bool, llmc_python: str | None = None, sizes: str | None = None) -> list[dict]:
    # imported when run: ``python -m fx_sparsity.benchmarks.one_shot`` must find it not yet imported
    from .one_shot import case_one_shot
    return case_one_shot(quick, llmc_python, sizes)
#: Cases that run only when ``--cases`` names them (minutes each).
OPT_IN = ("one_shot",)


WIDTH = 120  # a printed table fits a terminal; every number is in --json too


def _table(rows: list[dict]) -> str:
    """The rows as tables at most WIDTH characters wide: headers wrapped, the name column first in each, the other
    columns split over as many tables as it takes."""
    flat = [_flat(r) for r in rows]
    names = [{"name": r.pop("name")} for r in flat]
    columns = list(dict.fromkeys(k for r in flat for k in r))

    def render(cols: list[str]) -> str:
        data = [{**n, **{c: r.get(c, "") for c in cols}} for n, r in zip(names, flat)]
        return tabulate(data, headers="keys", floatfmt=".3f", maxheadercolwidths=16,
                        maxcolwidths=[40] + [None] * len(cols))

    tables: list[str] = []
    chunk: list[str] = []
    for column in columns:
        if chunk and max(map(len, render([*chunk, column]).splitlines())) > WIDTH:
            tables.append(render(chunk))
            chunk = []
        chunk.append(column)
    tables.append(render(chunk))
    return "\n\n".join(tables)


def _flat(row: dict) -> dict:
    out = {"name": row.get("name")}
    for group in ("ms", "s", "MiB", "bytes", "ratios"):
        for k, v in (row.get(group) or {}).items():
            out[f"{k} ({group})" if group != "ratios" else k] = round(v, 3) if isinstance(v, float) else v
    if "masks_identical" in row:
        out["masks identical"] = row["masks_identical"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fx-sparsity bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short timings (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write one JSON object per case row")
    default = ",".join(c for c in CASES if c not in OPT_IN)
    parser.add_argument("--cases", default=default, help=f"comma-separated subset of {','.join(CASES)} (default: "
                                                          f"all but {','.join(OPT_IN)})")
    parser.add_argument("--llmc-python", metavar="PATH", help="one_shot: the python of a venv with llm-compressor "
                        "(default: this one, when it imports llmcompressor; else ours only)")
    parser.add_argument("--one-shot-sizes", default="100m", metavar="SIZES",
                        help="one_shot: comma-separated model sizes of tiny,100m,400m,1b (default 100m; --quick: tiny)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    all_rows = []
    for case in args.cases.split(","):
        if case == "one_shot":
            rows = _case_one_shot(args.quick, args.llmc_python, args.one_shot_sizes)
        else:
            rows = CASES[case](args.quick)
        all_rows += rows
        if rows:
            print(f"\n## {case}\n")
            print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
