"""One-shot pruning of a random Llama, ours (SparseGPT and Wanda) vs llm-compressor: time and peak memory.

    python -m fx_sparsity bench --cases one_shot [--quick] [--llmc-python /path/to/venv/bin/python]
        [--one-shot-sizes 100m,400m]
    python -m fx_sparsity.benchmarks.one_shot --impl ours --method wanda --size 100m   # one run, one JSON line

Each (impl, method, size) runs in a subprocess of its own, 1 thread. llm-compressor runs when it is
importable here or in the venv ``--llmc-python`` names (this file runs there by its path: it imports
nothing of fx_sparsity at module level). ``tools/bench_one_shot.py`` drives this module too (SparseGPT
over 100m, 400m and 1b, with ``--detail`` and ``--save-layers`` for its first-block times and weight
comparison), so the suite's numbers and the tool's come from the same model, tokens and measurements:

- model: ``LlamaForCausalLM(LlamaConfig(...))``, fp32, eval; data: ``samples`` batches
  ``{"input_ids": (1, seq)}`` of random tokens;
- ours: ``one_shot(model, SparseGPTSparsifier(0.5) | WandaSparsifier(0.5), batches, scope=LlamaDecoderLayer,
  inplace=True)``; llm-compressor: ``oneshot(model, dataset=DataLoader(batches), recipe=SparseGPTModifier |
  WandaPruningModifier(sparsity=0.5, mask_structure="0:0"), pipeline="sequential")``, nothing saved;
- ``total_s``: wall time of the call; ``peak_mib``: VmHWM after the call (reset via /proc/self/clear_refs
  just before it) minus VmRSS before it, the model and data built: what pruning holds beyond the model;
- ``--detail`` adds ``first_call_s`` (to the first call of decoder layer 0: setup before any calibration
  forward), ``first_block_s`` (to the first call of layer 1 after every Linear of layer 0 is pruned: block 0
  calibrated, pruned and propagated; forward pre-hooks, off by default so the suite's runs carry none) and
  a ``fingerprint`` of the weights and tokens (equal across venvs when both hold the same bits).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

#: TinyLlama-like shapes (grouped-query attention, SiLU MLP, vocab 32000), and a tiny one for ``--quick``
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688, num_attention_heads=4,
                 num_key_value_heads=2),
    "100m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=4),
    "400m": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=16,
                 num_key_value_heads=4),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4),
}
METHODS = ("sparsegpt", "wanda")
IMPLS = ("ours", "llmcompressor")
LABELS = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build(size: str, samples: int, seq: int, seed: int) -> tuple[Any, list[dict]]:
    """The model (eval mode) and the calibration batches, the same bits in any venv."""
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


def run_ours(model: Any, batches: list[dict], method: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import fx_sparsity

    sparsifier = fx_sparsity.SparseGPTSparsifier(0.5) if method == "sparsegpt" else fx_sparsity.WandaSparsifier(0.5)
    fx_sparsity.one_shot(model, sparsifier, batches, scope=LlamaDecoderLayer, inplace=True, progress=False)


def prepare_llmc(model: Any, workdir: Path) -> Any:
    """What oneshot needs beyond the model, built before the clock starts: a config.json for its AutoConfig
    check on ``model.config.name_or_path`` and a tokenizer object (unused with a DataLoader as dataset)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model.config.save_pretrained(workdir)
    model.config._name_or_path = str(workdir)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))


def run_llmc(model: Any, batches: list[dict], method: str, processor: Any, seq: int) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    modifier = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    recipe = modifier(sparsity=0.5, mask_structure="0:0", targets=[r"re:model\.layers\.\d+$"])
    dataset: Any = DataLoader(batches, batch_size=None)  # type: ignore[arg-type]  # a list of batches is a dataset
    oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe,
            pipeline="sequential", sequential_targets=["LlamaDecoderLayer"], num_calibration_samples=len(batches),
            max_seq_length=seq, output_dir=None, log_dir=None)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _block_marks(layers: Any) -> tuple[dict[str, float], list[Any]]:
    """Forward pre-hooks on decoder layers 0 and 1 that stamp ``first_call`` and ``first_block`` (see the
    module's docstring): where the time goes before and after the first block, in either library."""
    import torch

    marks: dict[str, float] = {}

    def layer0_pruned() -> bool:
        linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
        return bool(linears) and all(float((m.weight[0] == 0).float().mean()) >= 0.25 for m in linears)

    def on_layer0(*_: Any) -> None:
        marks.setdefault("first_call", time.perf_counter())

    def on_layer1(*_: Any) -> None:
        if "first_block" not in marks and layer0_pruned():
            marks["first_block"] = time.perf_counter()

    return marks, [layers[0].register_forward_pre_hook(on_layer0), layers[1].register_forward_pre_hook(on_layer1)]


def _since(marks: dict[str, float], key: str, start: float) -> float | None:
    return round(marks[key] - start, 2) if key in marks else None


def _fingerprint(model: Any, batches: list[dict]) -> list:
    """A sum of layer 0's q_proj and of the tokens: equal in two venvs (two transformers versions) when
    both build the same bits, which the comparison of their pruned weights assumes."""
    return [float(model.model.layers[0].self_attn.q_proj.weight.detach().double().sum()),
            int(sum(int(b["input_ids"].sum()) for b in batches))]


def child(args: argparse.Namespace) -> dict:
    """One run in this process: build, reset the peak, prune, measure."""
    import torch

    torch.set_num_threads(1)
    model, batches = build(args.size, args.samples, args.seq, args.seed)
    detail: dict[str, Any] = {"fingerprint": _fingerprint(model, batches)} if args.detail else {}
    processor = None
    if args.impl == "llmcompressor":
        workdir = Path(args.workdir or os.environ.get("TMPDIR", "/tmp")) / f"fx_sparsity_bench_llmc_{args.size}"
        workdir.mkdir(parents=True, exist_ok=True)
        processor = prepare_llmc(model, workdir)
    marks, hooks = _block_marks(model.model.layers) if args.detail else ({}, [])
    rss_built = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.impl == "ours":
        run_ours(model, batches, args.method)
    else:
        run_llmc(model, batches, args.method, processor, args.seq)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kib("VmHWM")
    for hook in hooks:
        hook.remove()
    if args.detail:
        detail.update({f"{key}_s": _since(marks, key, start) for key in ("first_call", "first_block")})
    if args.save_layers:  # after pruning, for comparing the two libraries' weights
        torch.save({f"{i}.{k}": v for i in (0, 1) for k, v in model.model.layers[i].state_dict().items()},
                   args.save_layers)
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    return dict(impl=args.impl, method=args.method, size=args.size, samples=args.samples, seq=args.seq,
                seed=args.seed, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                total_s=round(total, 2), cpu_s=round(cpu, 2), peak_mib=round((peak - rss_built) / 1024, 1),
                rss_built_mib=round(rss_built / 1024, 1), decoder_linear_sparsity=round(zeros, 4),
                versions={p: _version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors")},
                **detail)


def run_one(python: str, impl: str, method: str, size: str, samples: int, seq: int, seed: int = 0,
            extra: Sequence[str] = (), log: Path | None = None) -> dict:
    """One (impl, method, size) in a subprocess of ``python``; its JSON result. ``extra``: more of this
    module's flags (``--detail``, ``--save-layers``, ``--workdir``); ``log``: where to keep its whole output."""
    # ours: this installation's module; llm-compressor's venv: this file by its path (no fx_sparsity there)
    script = ["-m", "fx_sparsity.benchmarks.one_shot"] if impl == "ours" else [str(Path(__file__).resolve())]
    cmd = [python, *script, "--impl", impl, "--method", method, "--size", size, "--samples", str(samples),
           "--seq", str(seq), "--seed", str(seed), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if log is not None:
        log.write_text(done.stdout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:  # llm-compressor logs to stdout: the JSON is the last line with "{"
        tail = "\n".join(done.stdout.splitlines()[-15:])
        raise RuntimeError(f"one_shot benchmark {impl} {method} {size} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


def llmc_python(given: str | None) -> str | None:
    """The python that runs llm-compressor: ``given``, else this one if it imports llmcompressor, else none."""
    if given:
        return given
    try:
        import importlib.util
        return sys.executable if importlib.util.find_spec("llmcompressor") is not None else None
    except (ImportError, ValueError):
        return None


def case_one_shot(quick: bool, llmc: str | None = None, sizes: str | None = None) -> list[dict]:
    """Rows of the suite's ``one_shot`` case: per method and size, ours and (when it runs) llm-compressor's."""
    samples, seq = (2, 64) if quick else (16, 512)
    theirs_python = llmc_python(llmc)
    rows = []
    for size in (["tiny"] if quick else (sizes or "100m").split(",")):
        for method in METHODS:
            ours = run_one(sys.executable, "ours", method, size, samples, seq)
            theirs = run_one(theirs_python, "llmcompressor", method, size, samples, seq) if theirs_python else {}
            row: dict[str, Any] = {
                "case": "one_shot", "name": f"{LABELS[method]} 0.5 | {size} ({ours['params_m']}M)",
                "params": {"method": method, "size": size, "samples": samples, "seq": seq, "threads": 1},
                "s": {"ours": ours["total_s"]}, "MiB": {"ours peak": ours["peak_mib"]},
                "ratios": {}, "results": {"ours": ours, "llm-compressor": theirs or None}}
            if theirs:
                row["s"]["llm-compressor"] = theirs["total_s"]
                row["MiB"]["llm-compressor peak"] = theirs["peak_mib"]
                row["ratios"] = {"time ours/llmc": ours["total_s"] / theirs["total_s"],
                                 "peak ours/llmc": ours["peak_mib"] / max(theirs["peak_mib"], 0.1)}
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=IMPLS, default="ours")
    p.add_argument("--method", choices=METHODS, default="sparsegpt")
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where llm-compressor's run writes the config it checks")
    p.add_argument("--detail", action="store_true",
                   help="also record first_call_s, first_block_s (hooks on layers 0 and 1) and a fingerprint")
    p.add_argument("--save-layers", type=Path, help="save decoder layers 0-1 here after pruning (torch.save)")
    args = p.parse_args(argv)
    print(json.dumps(child(args)), flush=True)


if __name__ == "__main__":
    main()
