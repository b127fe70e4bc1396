"""timm's ViT-Tiny, DeiT-Tiny, ConvNeXt-Tiny and PoolFormer-S12 at 50% structured pruning: fx_sparsity against
Torch-Pruning, one run, random weights (no download), on this machine's CPU.

Both prune every width they can at 50% (the residual width through the LayerNorms/GroupNorms, attention heads,
MLP widths) with an L1 importance: fx_sparsity's ``SaliencyPruner(0.5)`` (``tracer="export"``) and Torch-Pruning's
``MetaPruner`` with ``GroupMagnitudeImportance(p=1)``, heads pruned whole (``prune_num_heads=True``,
``prune_head_dims=False``), the classifier kept. Reported: parameters left, latency of the pruned model (batch 8,
224², median of 5), preparing and cutting time, and for fx_sparsity how far the pruned model is from the masked one
(the model that was fine-tuned: a LayerNorm over fewer channels averages over the kept ones in both). Torch-Pruning
has no masked model; its ``pruned vs masked`` column is empty.

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
import statistics
import sys
import time
import types
import warnings
from typing import Any

import torch

MODELS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_tiny", "poolformer_s12"]


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
def latencies_ms(models: list[torch.nn.Module], x: torch.Tensor, rounds: int = 5) -> list[float]:
    """Median time of each model on ``x``, measured in turns (one run of each per round), so that load from other
    work on the machine falls on all of them alike."""
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
    out = f"width {norm[0]}, MLP {shapes['mlp.fc1.weight'][0]}"
    if "attn.qkv.weight" in shapes and head_dim:
        out += f", heads {shapes['attn.qkv.weight'][0] // (3 * head_dim)}"
    return out


def with_fx_sparsity(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    import fx_sparsity as fxs

    pruner = fxs.SaliencyPruner(0.5)
    start = time.perf_counter()
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,), tracer="export")
    prepared = time.perf_counter() - start
    pruner.step()
    start = time.perf_counter()
    pruned = pruner.prune().eval()
    cut = time.perf_counter() - start
    with torch.no_grad():
        ours, theirs = masked.eval()(x), pruned(x)
    return {"pruned": pruned, "prepare_s": prepared, "prune_s": cut,
            "vs_masked": float((ours - theirs).abs().max() / ours.abs().max())}


def with_torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    import timm
    import torch_pruning as tp

    model = copy.deepcopy(model)
    attention = [m for m in model.modules() if isinstance(m, timm.models.vision_transformer.Attention)]
    head = model.get_classifier()  # type: ignore[operator]
    start = time.perf_counter()
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
    return {"pruned": model.eval(), "prepare_s": 0.0, "prune_s": time.perf_counter() - start, "vs_masked": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    sys.meta_path.insert(0, _TorchvisionStandIn())
    warnings.filterwarnings("ignore")
    import timm

    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        example, batch = torch.randn(2, 3, 224, 224), torch.randn(args.batch, 3, 224, 224)
        head_dim = next((m.head_dim for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "head_dim")), None)
        found: dict[str, dict[str, Any]] = {}
        for tool, run in (("fx_sparsity", with_fx_sparsity), ("Torch-Pruning", with_torch_pruning)):
            try:
                result = run(model, example)
                with torch.inference_mode():
                    result["pruned"](batch)  # it must run
                found[tool] = result
            except Exception as e:  # a tool that cannot prune the model, or whose model does not run: say so
                rows.append(f"| {name} | {tool} | failed: {type(e).__name__}: {str(e).splitlines()[0][:90]} |"
                            f" | | | |")
        timed = latencies_ms([model, *(r["pruned"] for r in found.values())], batch)
        for (tool, result), ms in zip(found.items(), timed[1:]):
            pruned = result["pruned"]
            close = "" if result["vs_masked"] is None else f"{result['vs_masked']:.1e}"
            left = f"{params(pruned) / 1e6:.2f} M of {params(model) / 1e6:.2f} M ({params(pruned) / params(model):.2f})"
            rows.append(f"| {name} | {tool} | {left} | {widths(pruned, head_dim)} | {ms:.0f} ms (dense {timed[0]:.0f}) "
                        f"| {result['prepare_s'] + result['prune_s']:.1f} s | {close} |")
        print("\n".join(rows[-2:]), flush=True)
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, batch "
          f"{args.batch}, 224x224\n")
    print("| model | tool | parameters left | widths (first block) | latency | prepare + prune | pruned vs masked |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
