"""Which channel sits where in a value: blocks of element ids, and how shape ops move them.

A *block* covers the dims of a value that hold channels, as one tensor of element ids in
*broadcast form*: it has the value's rank, the channel dims at their sizes and every other
dim of size 1. A Linear's output ``(B, T, C)`` is one block ``ids.shape == (1, 1, C)``; after
``view(B, T, H, D)`` and ``transpose(1, 2)`` it is ``(1, H, 1, D)`` over dims ``(1, 3)``.
Shape ops act on the ids as they act on the value (a permute permutes them, a slice slices
them, a reshape regroups the dims it merges or splits), so following channels through the
graph is running the graph's shape ops on small id tensors. Nothing here knows graphs.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

__all__ = ["Block", "Value", "Many", "canonical", "align", "permute", "reshape", "dim_groups", "take",
           "keep_sizes", "kept_along", "broadcast_form", "new_shape", "value_kept_along"]


class Block(NamedTuple):
    dims: tuple[int, ...]  # the value's dims this block spans, ascending
    ids: torch.Tensor  # int64 element ids, broadcast form (rank of the value, 1 outside ``dims``)


Value = tuple[Block, ...]


class Many(tuple):
    """The values of a node with several tensor outputs (split, chunk, native ops), in order."""


def broadcast_form(ids: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """1-D ``ids`` standing at ``dim`` of a value of rank ``ndim``."""
    shape = [1] * ndim
    shape[dim] = ids.numel()
    return ids.reshape(shape)


def canonical(block: Block) -> Block | None:
    """Drop the dims along which every id is repeated (an expand, a flatten of spatial dims): they
    hold the same channel at every index, so nothing follows them. ``None`` if no dim is left."""
    ids, dims = block.ids, list(block.dims)
    for d in list(dims):
        if ids.shape[d] > 1 and bool((ids == ids.narrow(d, 0, 1)).all()):
            ids = ids.narrow(d, 0, 1)
            dims.remove(d)
    return Block(tuple(dims), ids) if dims else None


def blocks(candidates: Iterable[Block | None]) -> Value:
    out = []
    for block in candidates:
        block = canonical(block) if block is not None else None
        if block is not None:
            out.append(block)
    return tuple(out)


def align(block: Block, ndim: int) -> Block:
    """``block`` of a value broadcast (right-aligned) to rank ``ndim``."""
    extra = ndim - block.ids.dim()
    if extra == 0:
        return block
    return Block(tuple(d + extra for d in block.dims), block.ids.reshape((1,) * extra + tuple(block.ids.shape)))


def permute(value: Value, order: list[int]) -> Value:
    """The value's dims reordered: output dim ``i`` is input dim ``order[i]``."""
    where = {src: dst for dst, src in enumerate(order)}
    return tuple(Block(tuple(sorted(where[d] for d in b.dims)), b.ids.permute(order)) for b in value)


def dim_groups(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """The smallest runs of input dims and output dims a reshape maps onto each other (equal products);
    size-1 dims a reshape adds or drops form runs of their own."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(before) and j < len(after):
        if before[i] == 1 and after[j] != 1:
            groups.append(([i], []))
            i += 1
            continue
        if after[j] == 1 and before[i] != 1:
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj, pa, pb = [i], [j], before[i], after[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(i)
                pa *= before[i]
                i += 1
            else:
                gj.append(j)
                pb *= after[j]
                j += 1
        groups.append((gi, gj))
    groups += [([k], []) for k in range(i, len(before))]
    groups += [([], [k]) for k in range(j, len(after))]
    return groups


def reshape(value: Value, before: tuple[int, ...], after: tuple[int, ...]) -> tuple[Value, list[Block]]:
    """The blocks after a reshape from ``before`` to ``after``, and the blocks it cannot follow (two
    blocks merged into one dim: a pair of channels is no channel)."""
    groups = dim_groups(before, after)
    out, lost = [], []
    claimed: dict[int, Block] = {}
    for block in value:
        touched = [k for k, (gi, _) in enumerate(groups) if set(gi) & set(block.dims)]
        if any(k in claimed for k in touched):
            lost += [block, claimed[next(k for k in touched if k in claimed)]]
            continue
        sizes = list(block.ids.shape)
        for k in touched:
            for d in groups[k][0]:
                sizes[d] = before[d]
        shape, dims = [], []
        for k, (_, gj) in enumerate(groups):
            for d in gj:
                shape.append(after[d] if k in touched else 1)
                if k in touched:
                    dims.append(d)
        for k in touched:
            claimed[k] = block
        if dims:
            out.append(Block(tuple(dims), block.ids.expand(sizes).reshape(shape)))
    return blocks(out), lost


def take(ids: torch.Tensor, dim: int, index: int | slice) -> torch.Tensor:
    """``ids`` indexed along ``dim`` by an int (dim kept, size 1) or a slice, clamped as tensors are."""
    if isinstance(index, int):
        return ids.narrow(dim, index % ids.shape[dim], 1)
    return ids[(slice(None),) * dim + (index,)]


def kept_along(block: Block, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """Per index along ``dim`` of ``block``: does any of its elements stay (``keep``: per element)?"""
    kept = keep[block.ids]
    others = [o for o in range(kept.dim()) if o != dim]
    return kept.amax(dim=others) if others else kept


def keep_sizes(block: Block, keep: torch.Tensor) -> dict[int, int]:
    """``{dim: entries left}`` along each dim of ``block`` once the elements where ``keep`` is False go
    (the block's kept entries form a grid: see ``channels.solver``)."""
    return {d: int(kept_along(block, d, keep).sum()) for d in block.dims}


def new_shape(value: Value, shape: tuple[int, ...], keep: torch.Tensor) -> list[int]:
    """``shape`` of a value holding ``value`` once the elements where ``keep`` is False go."""
    out = list(shape)
    for blk in value:
        for d, n in keep_sizes(blk, keep).items():
            out[d] = n
    return out


def value_kept_along(value: Value, dim: int, keep: torch.Tensor) -> torch.Tensor | None:
    """Per index along ``dim`` of a value: kept? (None when no block holds ``dim``)."""
    return next((kept_along(blk, dim, keep) for blk in value if dim in blk.dims), None)
