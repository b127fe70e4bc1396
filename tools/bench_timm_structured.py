"""timm's ViT-Tiny, DeiT-Tiny, ConvNeXt-Tiny and PoolFormer-S12 at 50% structured pruning: fx_sparsity against
Torch-Pruning, random weights (no download), on this machine's CPU.

Both prune every width they can at 50% (the residual width through the LayerNorms/GroupNorms, attention heads,
MLP widths) with an L1 importance: fx_sparsity's ``SaliencyPruner(0.5)`` (``tracer="export"``) and Torch-Pruning's
``MetaPruner`` with ``GroupMagnitudeImportance(p=1)``, heads pruned whole (``prune_num_heads=True``,
``prune_head_dims=False``), the classifier kept. Of 3 heads, fx_sparsity drops ``int(0.5 × 3)`` = 1 (torch.ao's
count) and Torch-Pruning 2; so fx_sparsity is also run at Torch-Pruning's shapes, its head groups given level 0.7
(``group["sparsity_level"]`` after prepare: ``int(0.7 × 3)`` = 2 go), for parameters and latency at equal shapes.

Reported per model: parameters left, the first block's widths, latency (batch 8, 224², 1 thread) of the dense
model and of each pruned one with its speed-up over dense (median of ``--rounds`` runs, taken in turns: one run of
each model per round, so load from other work on the machine falls on all alike), and for fx_sparsity how far the
pruned model is from the masked one (the model that is fine-tuned: a LayerNorm over fewer channels averages over
the kept ones in both). Torch-Pruning has no masked model. The load average before and after is printed.

Run in a virtual environment that sees the system torch (never move it off its version)::

    python -m venv /tmp/tpvenv --system-site-packages
    /tmp/tpvenv/bin/pip install --no-deps timm torch-pruning && /tmp/tpvenv/bin/pip install pillow
    /tmp/tpvenv/bin/python tools/bench_timm_structured.py [--models vit_tiny_patch16_224 ...]

No torchvision wheel imports on this CPU torch, and timm imports names from it when it loads: a stand-in module
(below) answers those imports; none of the four models calls torchvision.
"""
from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.machinery
import os
import statistics
import sys
import time
import types
import warnings
from typing import Any

import torch

MODELS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_tiny", "poolformer_s12"]
HEAD_LEVEL = 0.7  # int(0.7 × 3) = 2 of 3 heads go, as Torch-Pruning drops at 50% (round(0.5 × 3))


class _Anything(type):
    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return name


class _Placeholder(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Anything(name, (), {})
        setattr(self, name, value)
        return value


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Placeholder(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def latencies_ms(models: list[torch.nn.Module], x: torch.Tensor, rounds: int) -> list[float]:
    """Median time of each model on ``x``, measured in turns (one run of each per round, after one warm-up run of
    each), so that load from other work on the machine falls on all of them alike."""
    for model in models:
        model(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, kept in zip(models, times):
            start = time.perf_counter()
            model(x)
            kept.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def widths(model: torch.nn.Module, head_dim: int | None) -> str:
    """The residual width, MLP width and heads of the first block (what was cut), from its tensors' names (the
    pruned model may be a GraphModule)."""
    first = "blocks.0." if hasattr(model, "blocks") else "stages.0.blocks.0."
    shapes = {name[len(first):]: p.shape for name, p in model.named_parameters() if name.startswith(first)}
    norm = next(s for n, s in shapes.items() if n in ("norm1.weight", "norm.weight"))
    out = f"{norm[0]}, MLP {shapes['mlp.fc1.weight'][0]}"
    if "attn.qkv.weight" in shapes and head_dim:
        out += f", heads {shapes['attn.qkv.weight'][0] // (3 * head_dim)}"
    return out


def _masked_vs_pruned(pruner: Any, masked: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    pruner.step()
    pruned = pruner.prune().eval()
    with torch.no_grad():
        ours, theirs = masked(x), pruned(x)
    return {"pruned": pruned, "vs_masked": f"{float((ours - theirs).abs().max() / ours.abs().max()):.1e}"}


def with_fx_sparsity(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, dict[str, Any]]]:
    """fx_sparsity's pruned model at 50%, and (a model with attention heads) at Torch-Pruning's shapes: the same
    prepared model, its head groups (first producer ``...attn.qkv.weight``) at ``HEAD_LEVEL``."""
    import fx_sparsity as fxs

    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,), tracer="export").eval()
    found = [("fx_sparsity", _masked_vs_pruned(pruner, masked, x))]
    heads = [g for g in pruner.groups if g["tensor_fqn"].endswith("attn.qkv.weight")]
    if heads:
        for group in heads:  # torch.ao's per-group level, read by step() (a scheduler made now starts from it)
            group["sparsity_level"] = HEAD_LEVEL
        found.append((f"fx_sparsity, heads {HEAD_LEVEL}", _masked_vs_pruned(pruner, masked, x)))
    return found


def with_torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, dict[str, Any]]]:
    import timm
    import torch_pruning as tp

    model = copy.deepcopy(model)
    attention = [m for m in model.modules() if isinstance(m, timm.models.vision_transformer.Attention)]
    head = model.get_classifier()  # type: ignore[operator]
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[head],
                                  num_heads={m.qkv: m.num_heads for m in attention}, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=0.5)
    pruner.step()
    for m in attention:  # (Torch-Pruning's timm example: the attention's sizes set by hand)
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim
    return [("Torch-Pruning", {"pruned": model.eval(), "vs_masked": "(none)"})]


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=21, help="timed runs of each model (the median is reported)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.meta_path.insert(0, _TorchvisionStandIn())
    warnings.filterwarnings("ignore")
    import timm

    before, rows = load(), []
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        example, batch = torch.randn(2, 3, 224, 224), torch.randn(args.batch, 3, 224, 224)
        head_dim = next((m.head_dim for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "head_dim")), None)
        found: list[tuple[str, dict[str, Any]]] = [("dense", {"pruned": model, "vs_masked": ""})]
        failed = []
        for tool, run in (("fx_sparsity", with_fx_sparsity), ("Torch-Pruning", with_torch_pruning)):
            try:
                results = run(model, example)
                with torch.inference_mode():
                    for _, result in results:
                        result["pruned"](batch)  # it must run
                found += results
            except Exception as e:  # a tool that cannot prune the model, or whose model does not run: say so
                why = str(e).splitlines()[0][:70] if str(e) else ""
                failed.append(f"| {name} | {tool} | failed: {type(e).__name__}: {why} | | | |")
        timed = latencies_ms([result["pruned"] for _, result in found], batch, args.rounds)
        dense_ms, dense_params = timed[0], params(model)
        for (tool, result), ms in zip(found, timed):
            pruned = result["pruned"]
            speed = "" if tool == "dense" else f", {dense_ms / ms:.2f}×"
            rows.append(f"| {name} | {tool} | {params(pruned) / 1e6:.2f} M ({params(pruned) / dense_params:.2f}) | "
                        f"{widths(pruned, head_dim)} | {ms:.0f} ms{speed} | {result['vs_masked']} |")
        rows += failed
        print("\n".join(rows[-len(found) - len(failed):]), flush=True)
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} thread(s), batch "
          f"{args.batch}, 224x224, median of {args.rounds} runs in turns; load average (1, 5, 15 min) before "
          f"{before}, after {load()}\n")
    print("| model | tool | parameters left | first block: width, MLP, heads | latency, speed-up | pruned vs masked |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
