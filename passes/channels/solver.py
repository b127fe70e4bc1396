"""The solver: the joins the rules made become classes (units pruned whole) and groups (chosen together).

The connected elements are the *classes*, the units pruning removes (a channel, a head, a kv
head with its query heads). A *group* is the set of producer spaces whose classes are linked
through a shared tensor: its classes are scored and chosen together. A group is refused
(``problem``) when an op touching it is not understood, or when none of its channels can go; a
group whose channels a norm or a mean averages over together is *normalised* (and *inexact* where
the masked graph cannot average over the kept ones only). A block over several dims keeps
a grid (whole rows or whole columns go), so reshapes of it stay valid once cut.
"""
from __future__ import annotations

import torch

from .groups import FIXED, ChannelAnalysis, ChannelGroup, Space
from .tracker import Tracker, flat_blocks
from .values import Block

__all__ = ["solve"]


def _components(count: int, edges: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The smallest element id of each element's connected component (vectorised label propagation)."""
    label = torch.arange(count)
    if not edges:
        return label
    a = torch.cat([e[0] for e in edges])
    b = torch.cat([e[1] for e in edges])
    while True:
        low = torch.minimum(label[a], label[b])
        new = label.clone()
        new.scatter_reduce_(0, a, low, "amin")
        new.scatter_reduce_(0, b, low, "amin")
        new = new[new]
        if torch.equal(new, label):
            return label
        label = new



def _values_blocks(t: Tracker) -> list[Block]:
    out = []
    for value in t.values.values():
        if isinstance(value, torch.Tensor):
            continue
        out += [b for b in flat_blocks(value) if sum(1 for d in b.dims if b.ids.shape[d] > 1) > 1]
    return out


def _grid_joins(label: torch.Tensor, found: list[Block]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A block over several dims must keep a grid (whole rows or whole columns go) for its reshapes to
    stay valid once cut: where its classes vary along more than one dim, join all but the largest."""
    joins = []
    for blk in found:
        classes = label[blk.ids]
        varying = [d for d in blk.dims if not bool((classes == classes.narrow(d, 0, 1)).all())]
        if len(varying) < 2:
            continue
        keep = max(varying, key=lambda d: (blk.ids.shape[d], -d))
        for d in varying:
            if d != keep:
                a, b = torch.broadcast_tensors(blk.ids, blk.ids.narrow(d, 0, 1))
                joins.append((a.reshape(-1), b.reshape(-1)))
    return joins


def solve(t: Tracker) -> ChannelAnalysis:
    label = _components(t.count, t.edges + t.fix_edges)
    multi = _values_blocks(t)
    for _ in range(16):
        joins = _grid_joins(label, multi)
        if not joins:
            break
        t.edges += joins
        label = _components(t.count, t.edges + t.fix_edges)
    fixed = int(label[FIXED])
    count, spaces = t.count, t.spaces
    by_key = {(s.fqn, s.dim): i for i, s in enumerate(spaces)}
    producers: list[int] = []
    for key in t.producers:
        if key in by_key and by_key[key] not in producers:
            producers.append(by_key[key])
    space_of = torch.full((count,), -1, dtype=torch.long)
    for i, s in enumerate(spaces):
        space_of[s.base:s.base + s.size] = i
    # producer spaces sharing a class form one group; a class belongs to the group of its producers
    is_producer = torch.zeros(len(spaces) + 1, dtype=torch.bool)
    is_producer[producers] = True
    in_producer = (label != fixed) & is_producer[space_of]
    first = torch.full((count,), len(spaces), dtype=torch.long)
    first.scatter_reduce_(0, label[in_producer], space_of[in_producer], "amin")
    links = [(torch.tensor([by_key[a]]), torch.tensor([by_key[b]])) for a, b in t.links if a in by_key and b in by_key]
    root = _components(len(spaces), [(space_of[in_producer], first[label[in_producer]]), *links])
    groups: list[ChannelGroup] = []
    index_of_root: dict[int, int] = {}
    for p in producers:
        r = int(root[p])
        if r not in index_of_root:
            index_of_root[r] = len(groups)
            groups.append(ChannelGroup(len(groups)))
        groups[index_of_root[r]].producers.append((spaces[p].fqn, spaces[p].dim))
    label_group = torch.full((count,), -1, dtype=torch.long)
    label_class = torch.full((count,), -1, dtype=torch.long)
    for g, group in enumerate(groups):
        classes: list[int] = []  # in order of first appearance, the first producer's channels first
        known: set[int] = set()
        for key in group.producers:
            s = spaces[by_key[key]]
            for lab in label[s.base:s.base + s.size].tolist():
                if lab != fixed and lab not in known:
                    known.add(lab)
                    classes.append(lab)
        lab = torch.tensor(classes, dtype=torch.long)
        label_group[lab] = g
        label_class[lab] = torch.arange(len(classes))
        group.num_classes = len(classes)
    group_of = label_group[label]
    class_of = label_class[label]
    for group in groups:
        anchor = spaces[by_key[group.anchor]]
        anchor_classes = class_of[anchor.base:anchor.base + anchor.size]
        group.fixed = int((anchor_classes < 0).sum())
        for key in group.producers:
            s = spaces[by_key[key]]
            group.classes_of[key] = class_of[s.base:s.base + s.size]
        group.channels_per_class = torch.bincount(anchor_classes[anchor_classes >= 0],
                                                  minlength=group.num_classes).tolist()
    for s in spaces:
        mine = group_of[s.base:s.base + s.size]
        for g in mine.unique().tolist():
            if g >= 0:
                groups[g].tensors.append((s.fqn, s.dim))
                held = class_of[s.base:s.base + s.size][mine == g].unique()
                if bool((mine == g).all()) and held.numel() < groups[g].num_classes and not any(
                        torch.equal(held, k) for k in groups[g].keep_one):
                    groups[g].keep_one.append(held)
    producer_group = {p: index_of_root[int(root[p])] for p in producers}
    _attach_reasons(t, groups, group_of, space_of, producer_group)
    _attach_fixed_reasons(t, groups, spaces, by_key)
    balances = _balances(t, groups, group_of, class_of)
    return ChannelAnalysis(groups, spaces, label, group_of, class_of, t.sinks, t.seen, t.grouped, balances, t.norms)


def _attach_reasons(t: Tracker, groups: list[ChannelGroup], group_of: torch.Tensor, space_of: torch.Tensor,
                    producer_group: dict[int, int]) -> None:
    def groups_of(ids: torch.Tensor) -> list[int]:
        ids = ids[ids > FIXED]
        found = {int(g) for g in group_of[ids].unique().tolist() if g >= 0}
        found |= {producer_group[s] for s in space_of[ids].unique().tolist() if s in producer_group}
        return sorted(found)

    for ids, why in t.refused:
        for g in groups_of(ids):
            groups[g].problem = groups[g].problem or why
    for ids, why in t.soft:
        for g in groups_of(ids):
            groups[g].normalized = groups[g].normalized or why
    for ids, why in t.inexact:
        for g in groups_of(ids):
            groups[g].inexact = groups[g].inexact or why


def _attach_fixed_reasons(t: Tracker, groups: list[ChannelGroup], spaces: list[Space],
                          by_key: dict[tuple[str, int], int]) -> None:
    """Why a group has no channel left to remove: the first reason joining one of its producers' channels to
    the fixed element (followed through the joins made without it)."""
    free = _components(t.count, t.edges)
    reason = torch.full((t.count,), -1, dtype=torch.long)
    for i, (ids, _) in reversed(list(enumerate(t.fixed))):
        reason[free[ids]] = i
    for group in groups:
        if group.problem is not None or group.num_classes > 1:
            continue
        found = -1
        for key in group.producers:
            s = spaces[by_key[key]]
            hits = reason[free[s.base:s.base + s.size]]
            hits = hits[hits >= 0]
            if hits.numel():
                found = int(hits.min())
                break
        why = t.fixed[found][1] if found >= 0 else None
        if group.num_classes == 0:
            group.problem = why or "none of its channels can be removed"
        else:
            group.problem = f"all its channels go together ({why})" if why else "all its channels go together"


def _balances(t: Tracker, groups: list[ChannelGroup], group_of: torch.Tensor,
              class_of: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per group with grouped convolutions (or a multi-layer RNN): the conv-group (layer) of each class."""
    out: dict[int, torch.Tensor] = {}
    for ids, n, why in t.balances:
        gs = [int(g) for g in group_of[ids].unique().tolist() if g >= 0]
        if len(gs) != 1 or ids.numel() % n:
            for g in gs:
                groups[g].problem = groups[g].problem or why
            continue
        (g,) = gs
        group = groups[g]
        block_of = torch.full((group.num_classes,), -1, dtype=torch.long)
        classes = class_of[ids]
        blocks_ = torch.arange(n).repeat_interleave(ids.numel() // n)
        live = classes >= 0
        block_of[classes[live]] = blocks_[live]
        high = torch.zeros(group.num_classes, dtype=torch.long)
        high.scatter_reduce_(0, classes[live], blocks_[live], "amax", include_self=False)
        low = torch.zeros(group.num_classes, dtype=torch.long)
        low.scatter_reduce_(0, classes[live], blocks_[live], "amin", include_self=False)
        counts = torch.bincount(block_of[block_of >= 0], minlength=n)
        uneven = bool((counts != counts[0]).any())  # equal numbers go from each block: each must hold as many
        clash = g in out and not torch.equal(out[g], block_of)
        if bool((block_of < 0).any()) or not torch.equal(high, low) or clash or uneven:
            group.problem = group.problem or why
            continue
        out[g] = block_of
        group.balance = n
    return out

