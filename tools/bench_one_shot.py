"""SparseGPT one-shot, ours vs llm-compressor, on the same random Llama and the same tokens, 1 thread.

    nice -n 10 python tools/bench_one_shot.py --impls llmcompressor --sizes 100m,400m,1b   # runs these three
    nice -n 10 python tools/bench_one_shot.py --impls ours --sizes 100m   # reruns ours; saved llmc JSON joins the table
    python tools/bench_one_shot.py --reuse   # the whole grid, running only what has no saved JSON
    python tools/bench_one_shot.py --impls ""   # runs nothing: the table of saved JSON

Each (impl, size) runs in its own subprocess (``--impl ours|llmcompressor --size 100m|400m|1b``, one JSON
line, also saved as ``<out-dir>/<impl>_<size>.json``, its output in ``<impl>_<size>.log``). The driver runs
``--impls`` x ``--sizes`` (``--reuse``: those without saved JSON only) and tabulates them with every other
saved result of the same samples/seq/seed. llm-compressor runs in its own venv (``--llmc-python``); ours runs
whatever ``fx_sparsity`` ``sys.executable`` imports (PYTHONPATH=an exported commit measures that commit).

- model: ``LlamaForCausalLM(LlamaConfig(...))`` (default attention and ``use_cache``), fp32; every parameter
  is then re-drawn from a generator seeded by its name, so both transformers versions hold identical weights;
- data: ``--samples`` batches ``{"input_ids": (1, --seq)}`` of random tokens (fixed seed), identical for both;
- ours: ``one_shot(model, SparseGPTSparsifier(0.5), batches, scope=LlamaDecoderLayer, inplace=True)``;
- llm-compressor: ``oneshot(model, dataset=DataLoader(batches), recipe=SparseGPTModifier(sparsity=0.5,
  mask_structure="0:0", targets=model.layers.N), pipeline="sequential")``, no output_dir (nothing saved);
  block_size 128 and dampening 0.01 are both sides' defaults.

Measured: ``total_s``, wall time of the call; ``cpu_s``, the process's CPU time over it (1 thread: close
to ``total_s`` on an idle machine, lower when other processes share the cores); ``first_block_s``, from
the call's start to the first call of decoder layer 1 made after every Linear of layer 0 is pruned (a
forward pre-hook on layer 1): block 0 is calibrated, pruned and its outputs propagated; ``first_call_s``,
to the first call of layer 0 (setup before any calibration forward); ``peak_mib``, VmHWM after the call
(reset via /proc/self/clear_refs just before it) minus VmRSS after the model and data were built. For
``--delta-size`` (100m) both save layers 0-1 after pruning and the driver prints max |dW| and the
fraction of weights whose kept/pruned state agrees.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path

SIZES = {  # LlamaConfig shapes, TinyLlama-like (grouped-query attention, SiLU MLP, vocab 32000)
    "100m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=4),
    "400m": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=16,
                 num_key_value_heads=4),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4),
}
IMPLS = ("ours", "llmcompressor")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build(size: str, samples: int, seq: int, seed: int):
    """The model (eval mode) and the calibration batches, the same bits in either venv."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **SIZES[size])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # independent of the version's init order
            g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [{"input_ids": torch.randint(0, 32000, (1, seq), generator=g)} for _ in range(samples)]
    return model, batches


def run_ours(model, batches) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import fx_sparsity
    fx_sparsity.one_shot(model, fx_sparsity.SparseGPTSparsifier(0.5), batches, scope=LlamaDecoderLayer,
                         inplace=True, progress=False)


def prepare_llmc(model, workdir: Path):
    """What oneshot needs beyond the model, built before the clock starts: a config.json for its
    AutoConfig check on ``model.config.name_or_path`` and a tokenizer object (it loads one from that path
    when none is given; with a DataLoader as dataset it is never used)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model.config.save_pretrained(workdir)
    model.config._name_or_path = str(workdir)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))


def run_llmc(model, batches, processor, seq: int) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from torch.utils.data import DataLoader

    recipe = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", targets=[r"re:model\.layers\.\d+$"])
    oneshot(model=model, processor=processor, dataset=DataLoader(batches, batch_size=None), recipe=recipe,
            pipeline="sequential", sequential_targets=["LlamaDecoderLayer"], num_calibration_samples=len(batches),
            max_seq_length=seq, output_dir=None, log_dir=None)


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    model, batches = build(args.size, args.samples, args.seq, args.seed)
    layers = model.model.layers
    fingerprint = [float(layers[0].self_attn.q_proj.weight.detach().double().sum()),
                   int(sum(int(b["input_ids"].sum()) for b in batches))]
    processor = prepare_llmc(model, args.out_dir / f"config_{args.size}") if args.impl == "llmcompressor" else None
    marks: dict[str, float] = {}

    def layer0_pruned() -> bool:
        linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
        return bool(linears) and all(float((m.weight[0] == 0).float().mean()) >= 0.25 for m in linears)

    def on_layer0(*_):
        marks.setdefault("first_call", time.perf_counter())

    def on_layer1(*_):
        if "first_block" not in marks and layer0_pruned():
            marks["first_block"] = time.perf_counter()

    hooks = [layers[0].register_forward_pre_hook(on_layer0), layers[1].register_forward_pre_hook(on_layer1)]
    rss_built = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.impl == "ours":
        run_ours(model, batches)
    else:
        run_llmc(model, batches, processor, args.seq)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kib("VmHWM")
    for h in hooks:
        h.remove()
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    if args.size == args.delta_size:
        state = {f"{i}.{k}": v for i in (0, 1) for k, v in model.model.layers[i].state_dict().items()}
        torch.save(state, args.out_dir / f"{args.impl}_{args.size}_layers01.pt")
    versions = {p: _version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors")}
    return dict(impl=args.impl, size=args.size, samples=args.samples, seq=args.seq, seed=args.seed,
                params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                total_s=round(total, 2), cpu_s=round(cpu, 2), first_call_s=_since(marks, "first_call", start),
                first_block_s=_since(marks, "first_block", start), peak_mib=round((peak - rss_built) / 1024, 1),
                rss_built_mib=round(rss_built / 1024, 1), decoder_linear_sparsity=round(zeros, 4),
                fingerprint=fingerprint, versions=versions, source=_source() if args.impl == "ours" else None)


def _since(marks: dict, key: str, start: float) -> float | None:
    return round(marks[key] - start, 2) if key in marks else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _source() -> str:
    """Which fx_sparsity ran: the commit (+dirty) of its checkout, or its path outside a git checkout."""
    import fx_sparsity
    root = Path(fx_sparsity.__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") if (root / ".git").exists() else ""
    dirty = git("status", "--porcelain", "--", "fx_sparsity", "passes") if rev else ""
    return rev + ("+dirty" if dirty else "") if rev else str(root)


def run_one(impl: str, size: str, args: argparse.Namespace) -> dict:
    python = sys.executable if impl == "ours" else args.llmc_python
    cmd = [python, str(Path(__file__).resolve()), "--impl", impl, "--size", size, "--samples", str(args.samples),
           "--seq", str(args.seq), "--seed", str(args.seed), "--out-dir", str(args.out_dir),
           "--delta-size", args.delta_size]
    log = args.out_dir / f"{impl}_{size}.log"
    print(f"running {impl} {size} (log: {log})", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log.write_text(done.stdout)  # llm-compressor logs to stdout: the JSON is the last line starting with "{"
    if done.returncode != 0:
        sys.exit(f"{impl} {size} failed (exit {done.returncode}); see {log}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def table(results: dict) -> str:
    from tabulate import tabulate

    rows = []
    for size in SIZES:
        ours, llmc = results.get(("ours", size), {}), results.get(("llmcompressor", size), {})
        if ours or llmc:
            for key in ("total_s", "cpu_s", "first_block_s", "peak_mib"):
                rows.append([size, (ours or llmc)["params_m"], key, ours.get(key, "-"), llmc.get(key, "-"),
                             ratio(ours.get(key), llmc.get(key))])
    return tabulate(rows, ["size", "params M", "metric", "ours", "llm-compressor", "ours/llmc"], disable_numparse=True)


def delta_report(args: argparse.Namespace) -> str | None:
    paths = [args.out_dir / f"{impl}_{args.delta_size}_layers01.pt" for impl in IMPLS]
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
                results[impl, size] = run_one(impl, size, args)
    print(f"SparseGPT 0.5 one-shot, {args.samples} samples x {args.seq} tokens, 1 thread "
          f"(saved/new JSON in {args.out_dir})")
    print(table(results))
    for (impl, size), r in sorted(results.items()):
        print(f"  {impl} {size}: cpu_s={r.get('cpu_s')} first_call_s={r['first_call_s']} "
              f"sparsity={r['decoder_linear_sparsity']} source={r['source']} versions={r['versions']}")
    fps = {str(r["fingerprint"]) for (_, size), r in results.items() if size == args.delta_size}
    if len(fps) > 1:
        print(f"WARNING: {args.delta_size} model/data fingerprints differ between impls: {fps}")
    report = delta_report(args)
    if report:
        print(report)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=IMPLS, help="run one benchmark in this process and print its JSON line")
    p.add_argument("--size", choices=list(SIZES), default="100m")
    p.add_argument("--impls", default=",".join(IMPLS), help="driver: comma-separated impls to run")
    p.add_argument("--sizes", default=",".join(SIZES), help="driver: comma-separated sizes to run")
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
        return
    result = child(args)
    (args.out_dir / f"{args.impl}_{args.size}.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
