"""The data the channel analysis produces: spaces, groups, sinks, and what each op did.

Every dim of a parameter (and of the running statistics a batch norm keeps per channel) is a
:class:`Space`: one *element* per channel, numbered from ``base``. Element ``FIXED`` (0) is the
one every channel that cannot be removed is joined to. :class:`ChannelAnalysis` holds, per
element, its group and class once the joins are solved (``channels.solver``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from .values import Many, Value

__all__ = ["SizeRewriter", "NodeRule", "FIXED", "Space", "ChannelGroup", "Sink", "NormSite", "GroupedConv", "Seen",
           "ChannelAnalysis"]

FIXED = 0  # the element every channel that cannot be removed is joined to


class SizeRewriter(Protocol):
    """What a rule's ``rewrite`` gets after a cut (``cut.RewriteSizes``): the kept elements, and how to write a size."""

    keep: torch.Tensor

    def size(self, node: fx.Node, size: object, old: int, new: int) -> int | fx.Node: ...


class NodeRule(Protocol):
    """The part of a ``registry.ChannelRule`` that a node's record keeps: how its sizes are rewritten after a cut.
    (A protocol here, so the data types import nothing above them.)"""

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool: ...


@dataclass(frozen=True)
class Space:
    """One dim of one tensor: elements ``base .. base + size - 1``."""

    fqn: str
    dim: int
    size: int
    base: int


@dataclass
class ChannelGroup:
    """Channels chosen together: ``num_classes`` units (a channel, a head, ...) that go whole."""

    index: int
    producers: list[tuple[str, int]] = field(default_factory=list)  # (tensor, dim) holding its output channels
    tensors: list[tuple[str, int]] = field(default_factory=list)  # every (tensor, dim) cut with it
    num_classes: int = 0
    channels_per_class: list[int] = field(default_factory=list)  # entries of the first producer in each class
    fixed: int = 0  # entries of the first producer that cannot go
    balance: int = 1  # equal numbers go from each of this many contiguous blocks (grouped convolutions)
    problem: str | None = None  # why it cannot be pruned
    normalized: str | None = None  # which norm averages over its channels (the masked graph then normalises over
    # the kept ones only: ``masked_norms``)
    inexact: str | None = None  # why the masked graph cannot compute what the cut one will (pruned on request only)
    classes_of: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)  # producer -> class
    # of each entry (-1: cannot go)
    keep_one: list[torch.Tensor] = field(default_factory=list, repr=False)  # class sets of which one must stay (a
    # tensor holding only them would be empty)

    @property
    def anchor(self) -> tuple[str, int]:
        return self.producers[0]

    @property
    def prunable(self) -> bool:
        return bool(self.producers) and self.problem is None and self.num_classes > 1


@dataclass
class Sink:
    """Where the masked model multiplies a value by masks: ``node``'s input ``arg`` (the value ``source``)."""

    node: str
    arg: int | str
    source: str
    ids: torch.Tensor


@dataclass
class NormSite:
    """A node that averages over channels (a LayerNorm, RMSNorm, GroupNorm, mean or variance): with their group
    masked, the masked graph computes it over the kept channels only (``masked_norms.MaskNorms``)."""

    node: str
    kind: str  # "layer_norm", "rms_norm", "group_norm", "mean", "var", "std", "var_mean" or "std_mean"
    ids: torch.Tensor  # the elements it averages over together
    what: str  # the layer or op, for messages and the printed graph
    dims: tuple[int, ...] = ()  # reductions: the dims reduced (non-negative)
    keepdim: bool = False
    correction: float = 1.0  # var/std: the divisor is (count - correction)


@dataclass
class GroupedConv:
    weight: str
    groups: int
    inputs: torch.Tensor  # element ids of the input channels, in order


@dataclass
class Seen:
    """What a node did to the channels, for rewriting its size arguments after a cut (``rule.rewrite``)."""

    kind: str
    inputs: Value
    output: Value | Many
    in_shape: tuple[int, ...]
    out_shape: TensorMetadata | list[TensorMetadata] | tuple[TensorMetadata, ...] | None
    rule: NodeRule | None = None  # the rule that followed the node, and rewrites it


class ChannelAnalysis:
    """The result of ``find_channel_groups``: groups, and where every element sits."""

    def __init__(self, groups: list[ChannelGroup], spaces: list[Space], label: torch.Tensor, group_of: torch.Tensor,
                 class_of: torch.Tensor, sinks: list[Sink], seen: dict[str, Seen], grouped: list[GroupedConv],
                 balances: dict[int, torch.Tensor], norms: list[NormSite] | None = None):
        self.groups, self.spaces, self.label = groups, spaces, label
        self.group_of, self.class_of = group_of, class_of  # per element: group index / class index (-1: none)
        self.sinks, self.seen, self.grouped, self.balances = sinks, seen, grouped, balances
        self.norms: list[NormSite] = norms or []

    def group_of_tensor(self, fqn: str) -> ChannelGroup | None:
        """The group a config entry naming ``fqn`` means: the one it produces channels for, else the first
        group any of its dims is cut with."""
        for group in self.groups:
            if any(p == fqn for p, _ in group.producers):
                return group
        for space in sorted((s for s in self.spaces if s.fqn == fqn), key=lambda s: s.dim):
            index = int(self.group_of[space.base:space.base + space.size].amax())
            if index >= 0:
                return self.groups[index]
        return None

    def keep(self, chosen: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per element: kept? ``chosen`` maps group index -> keep vector over its classes."""
        keep = torch.ones(self.label.numel(), dtype=torch.bool)
        for index, classes in chosen.items():
            mine = self.group_of == index
            keep[mine] = classes.to(torch.bool).cpu()[self.class_of[mine]]
        return keep
