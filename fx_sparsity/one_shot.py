"""``one_shot``: prune a large model block by block, holding one block's statistics at a time.

How SparseGPT and Wanda prune large language models without retraining: run the calibration
data up to the first block, then for each block in order prepare it, run its inputs through
it (the observers collect statistics), ``step()``, squash, and run the inputs through the
pruned block to get the next block's inputs. Each block is pruned on what it will see after
the blocks before it were pruned.

The pieces (:func:`first_block_calls`, :func:`prune_block`) are shared with
:func:`fx_sparsity.one_shot_pretrained`, which runs the same loop over a checkpoint read block by
block, so the two give the same numbers.
"""
from __future__ import annotations

import copy
import gc
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .errors import SparsityConfigError
from .inputs import CallInputs, as_args_kwargs
from .scopes import Scope, as_scope
from .scoping import capture_calls, relative

__all__ = ["one_shot", "block_scope", "check_block_config", "first_block_calls", "prune_block"]


def _is_cache(value: Any) -> bool:
    """A Hugging Face KV cache (``transformers.cache_utils.Cache`` or a subclass), known without importing it."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(value).__mro__)


def _without_cache(model: nn.Module, batch: Any) -> CallInputs:
    """``batch`` as a call that builds no KV cache: ``use_cache=False`` where ``model`` takes it.

    A decoder's cache (on by default in most Hugging Face configs) would be handed to every block
    call and grow with each one: stale keys and values in attention, memory that climbs per block.
    """
    args, kwargs = as_args_kwargs(batch)
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = []
    if "use_cache" in kwargs or ("use_cache" in names and names.index("use_cache") >= len(args)):
        kwargs["use_cache"] = False
    return CallInputs(args, kwargs)


def _block_call(call: CallInputs) -> CallInputs:
    """The first block's captured inputs, each cache object (mutable, grows per call) replaced by ``None``."""
    args = tuple(None if _is_cache(a) else a for a in call.args)
    return CallInputs(args, {k: None if _is_cache(v) else v for k, v in call.kwargs.items()})


def _run(block: nn.Module, call: CallInputs) -> Any:
    """One block call on its own copy of the keyword dict (a block may add to it)."""
    args, kwargs = as_args_kwargs(call)
    return block(*args, **kwargs)


def _next_inputs(call: CallInputs, output: Any) -> CallInputs:
    """The next block's call: this block's output in place of its first input, the other inputs as they were."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if call.args:
        return CallInputs((hidden, *call.args[1:]), call.kwargs)
    first = next(iter(call.kwargs))
    return CallInputs((), {**call.kwargs, first: hidden})


def block_scope(scope: Any) -> Scope:
    """``scope`` as a :class:`~fx_sparsity.Scope` naming block types; anything else is an error."""
    scope_ = as_scope(scope)
    if not scope_.block_types:
        raise SparsityConfigError(f"one_shot prunes block by block: pass scope=<block class>, e.g. "
                                  f"scope=LlamaDecoderLayer, got scope={scope!r}")
    return scope_


def check_block_config(config: list[dict] | None, blocks: list[str]) -> None:
    """Refuse config entries outside every block (one_shot prunes inside the blocks only)."""
    if config is None:
        return
    outside = [e.get("tensor_fqn") for e in config
               if not any(str(e.get("tensor_fqn", "")).startswith(b + ".") for b in blocks)]
    if outside:
        raise SparsityConfigError(f"one_shot prunes inside the {len(blocks)} blocks; {outside} lie outside "
                                  f"every block: prune them separately (prepare_fx_sparse)")


def first_block_calls(model: nn.Module, blocks: list[str], calibration: list[Any], *,
                      progress: bool = False) -> list[CallInputs]:
    """The inputs of ``blocks[0]`` on each calibration batch: the model runs up to that block and stops there.

    Eval mode, no grad, ``use_cache=False`` where the model's forward takes it, each KV-cache
    object dropped; the RNG and every module's mode are left as they were. No block runs (their
    tensors are not read: a model whose blocks are still on the meta device works), and only the
    buffers outside the blocks, the ones the run may reach, are saved and put back: no copy of the
    model's tensors is made.
    """
    first = model.get_submodule(blocks[0])
    inside = {id(t) for fqn in blocks for t in model.get_submodule(fqn).buffers()}
    batches = (_without_cache(model, batch) for batch in tqdm(calibration, desc="calibration", unit="batch",
                                                               disable=not progress, leave=False))
    calls = capture_calls(model, [blocks[0]], batches, stop=True,
                          buffers=[b for b in model.buffers() if id(b) not in inside and not b.is_meta])[blocks[0]]
    if not calls:
        raise SparsityConfigError(f"the calibration data never reached '{blocks[0]}' (the first "
                                  f"{type(first).__name__}): pass batches on which the model runs its blocks")
    return [_block_call(call) for call in calls]


def prune_block(block: nn.Module, fqn: str, sparsifier: Any, config: list[dict] | None,
                calls: list[CallInputs]) -> list[CallInputs]:
    """Prune ``block`` (at ``fqn`` in the model) on ``calls``, in place; returns the next block's calls.

    A copy of ``sparsifier`` prepares the block (``scope="layers"`` inside it, masks stored as
    ``torch.bool``: a quarter of a float mask, the same products), the calls run through it, then
    ``step()`` and ``squash_mask()``; the sparsifier copy, its masks, observers and graphs are freed
    before the block runs again to give the next block's inputs. A block with nothing configured
    only runs.
    """
    block_config = None if config is None else [
        {**e, "tensor_fqn": relative(e["tensor_fqn"], fqn)} for e in config if e["tensor_fqn"].startswith(fqn + ".")]
    modes = {m: m.training for m in block.modules()}
    block.eval()
    try:
        with torch.no_grad():
            if block_config != []:  # a block with nothing to prune still runs: the next one needs its outputs
                block_sparsifier = copy.deepcopy(sparsifier)
                block_sparsifier.defaults.setdefault("mask_dtype", torch.bool)
                if hasattr(block_sparsifier, "free_statistics"):
                    block_sparsifier.free_statistics = True  # its one step(): each Gram matrix freed once used
                block_sparsifier.prepare(block, block_config, scope="layers", inplace=True)
                for call in calls:
                    _run(block, call)
                block_sparsifier.step()
                block_sparsifier.squash_mask()
                del block_sparsifier
                gc.collect()  # traced graphs hold reference cycles: free them (and what they hold) now
            return [_next_inputs(call, _run(block, call)) for call in calls]
    finally:
        for m, training in modes.items():
            m.training = training


def one_shot(model: nn.Module, sparsifier: Any, calibration_data: Iterable[Any], *, scope: Any,
             config: list[dict] | None = None, inplace: bool = False, progress: bool = True) -> nn.Module:
    """Prune every block of type ``scope`` of ``model`` in one shot, block by block; returns the model.

    ``sparsifier`` is an unprepared sparsifier used as a template (each block gets a copy):
    typically :class:`~fx_sparsity.SparseGPTSparsifier` or :class:`~fx_sparsity.WandaSparsifier`.
    ``calibration_data`` is an iterable of batches, each a tuple of positional inputs or a
    dict of keyword inputs. ``config`` names the tensors to prune (model fqns, inside the
    blocks); ``None`` means every ``nn.Linear`` weight of every block.

    Memory: with ``inplace=True`` nothing of the model is copied; what is held beyond it is one
    block's working set (its masks, as ``torch.bool``, its observers' statistics, the sparsifier's
    temporaries while it steps) and the calibration activations at one block boundary.
    ``inplace=False`` first makes a deep copy of the model (one more model in memory).

    A block's inputs are the first block's (captured on the calibration data, running the model
    only up to that block, with ``use_cache=False`` where its forward takes it and any KV-cache
    object dropped), with the previous block's output (its first element, for a tuple) in place
    of the first input: the convention of transformer stacks. Every block runs, configured or not.
    The result is ``model`` itself when ``inplace=True`` (else a deep copy), of the same class,
    with plain layers holding the sparse weights: ready for ``save_pretrained``.
    """
    scope_ = block_scope(scope)
    batches = list(calibration_data)
    if not batches:
        raise SparsityConfigError("calibration_data is empty: one_shot needs batches to calibrate each block on")
    work = model if inplace else copy.deepcopy(model)
    blocks = scope_.blocks(work)
    if not blocks:
        raise SparsityConfigError(f"{type(model).__name__} has no submodule of type {scope_.block_types}")
    check_block_config(config, blocks)
    calls = first_block_calls(work, blocks, batches, progress=progress)
    for fqn in tqdm(blocks, desc="one_shot", unit="block", disable=not progress):
        calls = prune_block(work.get_submodule(fqn), fqn, sparsifier, config, calls)
    return work
