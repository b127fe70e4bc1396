"""SparseGPT one-shot, ours vs llm-compressor, on the same random Llama and the same tokens, 1 thread.

    nice -n 10 python tools/bench_one_shot.py --impls llmcompressor --sizes 100m,400m,1b   # runs these three
    nice -n 10 python tools/bench_one_shot.py --impls ours --sizes 100m   # reruns ours; saved llmc JSON joins the table
    python tools/bench_one_shot.py --reuse   # the whole grid, running only what has no saved JSON
    python tools/bench_one_shot.py --impls ""   # runs nothing: the table of saved JSON

Each (impl, size) runs in its own subprocess of ``fx_sparsity/benchmarks/one_shot.py`` (the suite's
``one_shot`` case; this tool adds ``--detail`` and, for ``--delta-size``, ``--save-layers``): one JSON line,
saved as ``<out-dir>/<impl>_<size>.json``, its output in ``<impl>_<size>.log``. The driver runs ``--impls``
x ``--sizes`` (``--reuse``: those without saved JSON only) and tabulates them with every other saved result
of the same samples/seq/seed. llm-compressor runs in its own venv (``--llmc-python``, e.g.
/work/venv-llmc/bin/python), which runs that module by its path; ours runs ``python -m
fx_sparsity.benchmarks.one_shot`` with this ``sys.executable`` (PYTHONPATH=an exported commit measures that
commit).

- model: ``LlamaForCausalLM(LlamaConfig(...))`` (default attention and ``use_cache``), fp32; every parameter
  is then re-drawn from a generator seeded by its name, so both transformers versions hold identical weights;
- data: ``--samples`` batches ``{"input_ids": (1, --seq)}`` of random tokens (fixed seed), identical for both;
- ours: ``one_shot(model, SparseGPTSparsifier(0.5), batches, scope=LlamaDecoderLayer, inplace=True)``;
- llm-compressor: ``oneshot(model, dataset=DataLoader(batches), recipe=SparseGPTModifier(sparsity=0.5,
  mask_structure="0:0", targets=model.layers.N), pipeline="sequential")``, no output_dir (nothing saved);
  block_size 128 and dampening 0.01 are both sides' defaults.

Measured (the module's docstring says how): ``total_s`` (wall), ``cpu_s`` (the process's CPU time: 1 thread,
so close to ``total_s`` on an idle machine, lower when other processes share the cores), ``first_block_s``,
``first_call_s`` and ``peak_mib``. For ``--delta-size`` (100m) both save layers 0-1 after pruning and the
driver prints max |dW| and the fraction of weights whose kept/pruned state agrees.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fx_sparsity.benchmarks import one_shot

DEFAULT_SIZES = ("100m", "400m", "1b")  # one_shot.SIZES also has "tiny", for a check in seconds


def run(impl: str, size: str, args: argparse.Namespace) -> dict:
    """One SparseGPT run of the package's benchmark in a subprocess, with this tool's extras; saved as JSON."""
    python = sys.executable if impl == "ours" else args.llmc_python
    extra = ["--detail", "--workdir", str(args.out_dir)]
    if size == args.delta_size:
        extra += ["--save-layers", str(args.out_dir / f"{impl}_{size}_layers01.pt")]
    log = args.out_dir / f"{impl}_{size}.log"
    print(f"running {impl} {size} (log: {log})", file=sys.stderr, flush=True)
    try:
        result = one_shot.run_one(python, impl, "sparsegpt", size, args.samples, args.seq, args.seed, extra, log)
    except RuntimeError as e:
        sys.exit(f"{e}\n(whole output in {log})")
    result["source"] = _source() if impl == "ours" else None
    (args.out_dir / f"{impl}_{size}.json").write_text(json.dumps(result) + "\n")
    return result


def _source() -> str:
    """Which fx_sparsity ran: the commit (+dirty) of its checkout, or its path outside a git checkout."""
    import fx_sparsity
    root = Path(fx_sparsity.__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") if (root / ".git").exists() else ""
    dirty = git("status", "--porcelain", "--", "fx_sparsity", "passes") if rev else ""
    return rev + ("+dirty" if dirty else "") if rev else str(root)


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def table(results: dict) -> str:
    from tabulate import tabulate

    rows = []
    for size in one_shot.SIZES:
        ours, llmc = results.get(("ours", size), {}), results.get(("llmcompressor", size), {})
        if ours or llmc:
            for key in ("total_s", "cpu_s", "first_block_s", "peak_mib"):
                rows.append([size, (ours or llmc)["params_m"], key, ours.get(key, "-"), llmc.get(key, "-"),
                             ratio(ours.get(key), llmc.get(key))])
    return tabulate(rows, ["size", "params M", "metric", "ours", "llm-compressor", "ours/llmc"], disable_numparse=True)


def delta_report(args: argparse.Namespace) -> str | None:
    paths = [args.out_dir / f"{impl}_{args.delta_size}_layers01.pt" for impl in one_shot.IMPLS]
    if not all(p.exists() for p in paths):
        return None
    import torch

    a, b = (torch.load(p) for p in paths)
    keys = sorted(k for k in a.keys() & b.keys() if a[k].dim() == 2)
    dmax = max(float((a[k] - b[k]).abs().max()) for k in keys)
    agree = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in keys) / sum(a[k].numel() for k in keys)
    wmax = max(float(a[k].abs().max()) for k in keys)
    return (f"{args.delta_size} layers 0-1, {len(keys)} weights: max |dW| = {dmax:.3g} (max |W| {wmax:.3g}); "
            f"pruned/kept agree on {agree:.2%} of entries")


def driver(args: argparse.Namespace) -> None:
    results = {}
    for path in args.out_dir.glob("*_*.json"):
        saved = json.loads(path.read_text())
        if all(saved.get(k) == getattr(args, k) for k in ("samples", "seq", "seed")):
            results[saved["impl"], saved["size"]] = saved
    for impl in filter(None, args.impls.split(",")):
        for size in filter(None, args.sizes.split(",")):
            if not (args.reuse and (impl, size) in results):
                results[impl, size] = run(impl, size, args)
    print(f"SparseGPT 0.5 one-shot, {args.samples} samples x {args.seq} tokens, 1 thread "
          f"(saved/new JSON in {args.out_dir})")
    print(table(results))
    for (impl, size), r in sorted(results.items()):
        print(f"  {impl} {size}: cpu_s={r.get('cpu_s')} first_call_s={r.get('first_call_s')} "
              f"sparsity={r['decoder_linear_sparsity']} source={r.get('source')} versions={r['versions']}")
    fps = {str(r.get("fingerprint")) for (_, size), r in results.items() if size == args.delta_size}
    if len(fps) > 1:
        print(f"WARNING: {args.delta_size} model/data fingerprints differ between impls: {fps}")
    report = delta_report(args)
    if report:
        print(report)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=one_shot.IMPLS, help="run this one at --size and print its JSON line")
    p.add_argument("--size", choices=list(one_shot.SIZES), default="100m")
    p.add_argument("--impls", default=",".join(one_shot.IMPLS), help="driver: comma-separated impls to run")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                   help=f"driver: comma-separated sizes to run, of {', '.join(one_shot.SIZES)}")
    p.add_argument("--reuse", action="store_true", help="driver: take saved JSON with matching settings")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta-size", default="100m", help="size whose pruned layers 0-1 are saved and compared")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/bench_one_shot"))
    p.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.impl is None:
        driver(args)
    else:
        print(json.dumps(run(args.impl, args.size, args)), flush=True)


if __name__ == "__main__":
    main()
