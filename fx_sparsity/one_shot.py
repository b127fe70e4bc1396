"""``one_shot``: prune a large model block by block, holding one block's statistics at a time.

How SparseGPT and Wanda prune large language models without retraining: run the calibration
data up to the first block, then for each block in order prepare it, run its inputs through
it (the observers collect statistics), ``step()``, squash, and run the inputs through the
pruned block to get the next block's inputs. Each block is pruned on what it will see after
the blocks before it were pruned.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .errors import SparsityConfigError
from .inputs import CallInputs, as_args_kwargs
from .scoping import capture_calls, check_scope, relative, unit_fqns

__all__ = ["one_shot"]


def _next_inputs(call: CallInputs, output: Any) -> CallInputs:
    """The next block's call: this block's output in place of its first input, the other inputs as they were."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if call.args:
        return CallInputs((hidden, *call.args[1:]), call.kwargs)
    first = next(iter(call.kwargs))
    return CallInputs((), {**call.kwargs, first: hidden})


def one_shot(model: nn.Module, sparsifier: Any, calibration_data: Iterable[Any], *, scope: Any,
             config: list[dict] | None = None, inplace: bool = False, progress: bool = True) -> nn.Module:
    """Prune every block of type ``scope`` of ``model`` in one shot, block by block; returns the model.

    ``sparsifier`` is an unprepared sparsifier used as a template (each block gets a copy):
    typically :class:`~fx_sparsity.SparseGPTSparsifier` or :class:`~fx_sparsity.WandaSparsifier`.
    ``calibration_data`` is an iterable of batches, each a tuple of positional inputs or a
    dict of keyword inputs. ``config`` names the tensors to prune (model fqns, inside the
    blocks); ``None`` means every ``nn.Linear`` weight of every block. Memory holds one block's
    statistics and the calibration activations at one block boundary.

    A block's inputs are the first block's (captured on the calibration data), with the
    previous block's output (its first element, for a tuple) in place of the first input: the
    convention of transformer stacks. The result is ``model`` itself when ``inplace=True``
    (else a deep copy), of the same class, with plain layers holding the sparse weights: ready
    for ``save_pretrained``.
    """
    block_types = check_scope(scope)
    if not block_types:
        raise SparsityConfigError(f"one_shot prunes block by block: pass scope=<block class>, e.g. "
                                  f"scope=LlamaDecoderLayer, got scope={scope!r}")
    batches = list(calibration_data)
    if not batches:
        raise SparsityConfigError("calibration_data is empty: one_shot needs batches to calibrate each block on")
    work = model if inplace else copy.deepcopy(model)
    blocks = unit_fqns(work, block_types, [])
    if not blocks:
        raise SparsityConfigError(f"{type(model).__name__} has no submodule of type {block_types}")
    if config is not None:
        outside = [e.get("tensor_fqn") for e in config
                   if not any(str(e.get("tensor_fqn", "")).startswith(b + ".") for b in blocks)]
        if outside:
            raise SparsityConfigError(f"one_shot prunes inside the {len(blocks)} blocks; {outside} lie outside "
                                      f"every block: prune them separately (prepare_fx_sparse)")
    calls = capture_calls(work, blocks[:1], batches)[blocks[0]]
    modes = {m: m.training for m in work.modules()}
    work.eval()
    try:
        for fqn in tqdm(blocks, desc="one_shot", unit="block", disable=not progress):
            block = work.get_submodule(fqn)
            block_config = None if config is None else [
                {**e, "tensor_fqn": relative(e["tensor_fqn"], fqn)} for e in config
                if e["tensor_fqn"].startswith(fqn + ".")]
            if block_config == []:
                continue
            block_sparsifier = copy.deepcopy(sparsifier)
            block_sparsifier.prepare(block, block_config, scope="layers", inplace=True)
            with torch.no_grad():
                for call in calls:
                    args, kwargs = as_args_kwargs(call)
                    block(*args, **kwargs)
                block_sparsifier.step()
                block_sparsifier.squash_mask()
                calls = [_next_inputs(call, block(*call.args, **call.kwargs)) for call in calls]
    finally:
        for m, training in modes.items():
            m.training = training
    return work
