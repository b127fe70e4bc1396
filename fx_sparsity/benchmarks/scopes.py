"""The ``scopes`` case: prepare time and training-step overhead of each scope, against dense and torch.ao.

Models: an MLP (4 x Linear) and, when ``transformers`` is installed, a tiny Llama. Each
variant is trained the same way (forward, backward, SGD, and ``sparsifier.step()`` every
step); step times are medians of round-robin rounds (every variant once per round, the
order rotating), so a change in machine load hits all variants alike.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.ao.pruning as ao
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.timing import interleaved_times_ms

__all__ = ["case_scopes"]


def _mlp(width: int) -> tuple[nn.Module, Callable[[nn.Module], Any], Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())][:-1])
    x, y = torch.randn(64, width), torch.randn(64, width)
    return model, lambda m: (m(x) - y).square().mean(), None, (x,)  # type: ignore[misc]


def _llama(hidden: int, layers: int, seq: int) -> tuple[nn.Module, Callable[[nn.Module], Any], Any, Any] | None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    except ImportError:
        return None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * seq,
                         use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (4, seq))
    example = {"input_ids": ids, "labels": ids}
    return model, lambda m: m(input_ids=ids, labels=ids).loss, LlamaDecoderLayer, example  # type: ignore[misc]


def _train_step(model: nn.Module, loss_of: Callable, sparsifier: Any) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sparsifier is not None:
            sparsifier.step()

    return step


def _variants(model: nn.Module, block: Any, example: Any) -> dict[str, Callable[[], tuple[nn.Module, Any]]]:
    export = {"tracer": "export", "example_inputs": example} if isinstance(example, dict) else {}

    def ours(scope: Any, **kwargs: Any) -> Callable[[], tuple[nn.Module, Any]]:
        def make() -> tuple[nn.Module, Any]:
            sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.9)
            return fxs.prepare_fx_sparse(model, sparsifier, scope=scope, **kwargs), sparsifier
        return make

    def torch_ao() -> tuple[nn.Module, Any]:
        copied, sparsifier = copy.deepcopy(model), ao.WeightNormSparsifier(sparsity_level=0.9)
        sparsifier.prepare(copied, None)
        return copied, sparsifier

    variants = {"dense": lambda: (copy.deepcopy(model), None)}
    if not export or block is not None:
        variants['scope="model"'] = ours("model", **export)
    variants['scope="layers"'] = ours("layers")
    if block is not None:
        variants[f"scope={block.__name__}"] = ours(block, **export)
    variants["torch.ao"] = torch_ao
    return variants


def case_scopes(quick: bool) -> list[dict]:
    models = {"MLP 4 x 256² b64" if quick else "MLP 4 x 1024² b64": _mlp(256 if quick else 1024)}
    llama = _llama(64, 2, 16) if quick else _llama(256, 4, 128)
    if llama is not None:
        models["Llama 2 x 64, 4 x 16 tokens" if quick else "Llama 4 x 256, 4 x 128 tokens"] = llama
    rows = []
    for name, (model, loss_of, block, example) in models.items():
        prepare_ms, steps = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for variant, make in _variants(model, block, example).items():
                start = time.perf_counter()
                prepared, sparsifier = make()
                prepare_ms[variant] = (time.perf_counter() - start) * 1e3
                if sparsifier is not None:
                    sparsifier.step()
                prepared.train()
                steps[variant] = _train_step(prepared, loss_of, sparsifier)
            times = interleaved_times_ms(steps, warmup=1, repeat=3 if quick else 15, inference=False)
        step_ms = {variant: statistics.median(t) for variant, t in times.items()}
        dense = step_ms["dense"]
        rows.append({"case": "scopes", "name": name,
                     "ms": {**{f"prepare {k}": v for k, v in prepare_ms.items() if k != "dense"},
                            **{f"step {k}": v for k, v in step_ms.items()}},
                     "ratios": {f"step {k} / dense": v / dense for k, v in step_ms.items() if k != "dense"}})
    return rows
