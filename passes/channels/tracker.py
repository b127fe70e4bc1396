"""The tracker: follows the channels through one graph, the state every rule reads and writes.

A rule (``channels.registry``) reads the values of a node's inputs (:meth:`Tracker.value`: the
blocks of element ids they hold), joins elements that must go together (:meth:`Tracker.union`,
:meth:`Tracker.fix`, :meth:`Tracker.join_blocks`), marks sinks (:meth:`Tracker.sink`), records what
a node did for the rewrite after a cut (:meth:`Tracker.record`) and sets the node's output value
(``t.values[node]``). Nothing is solved here: ``channels.solver`` does that once every node ran.
"""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .groups import FIXED, GroupedConv, NodeRule, NormSite, Seen, Sink, Space
from .values import Block, Many, Value, blocks, broadcast_form

__all__ = ["Tracker", "Refuse"]

#: What ``Tracker.values`` holds per node: a parameter or buffer (a ``get_attr``), a value, or several.
NodeValue = torch.Tensor | Value | Many


_UNKNOWN = object()  # a value not known before the graph runs


class Refuse(Exception):
    """Raised by a rule: the op touches channels in a way that cannot be cut; the message says why."""


class Tracker:
    """Follows the channels through one graph: elements, their joins, and what every op did."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.count = 1  # element 0 is FIXED
        self.spaces: list[Space] = []
        self._space: dict[tuple[int, int], Space] = {}
        self.fqn_of: dict[int, str] = {}
        for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            self.fqn_of.setdefault(id(tensor), name)
        self.edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fix_edges: list[tuple[torch.Tensor, torch.Tensor]] = []  # to FIXED, kept apart to say why
        self.fixed: list[tuple[torch.Tensor, str]] = []
        self.refused: list[tuple[torch.Tensor, str]] = []
        self.soft: list[tuple[torch.Tensor, str]] = []  # averaged over together (a norm): ``normalized``
        self.inexact: list[tuple[torch.Tensor, str]] = []  # ... in a way the masked graph cannot reproduce
        self.norms: list[NormSite] = []  # where the masked graph averages over the kept channels only
        self.balances: list[tuple[torch.Tensor, int, str]] = []
        self.grouped: list[GroupedConv] = []
        self.sinks: list[Sink] = []
        self.producers: list[tuple[str, int]] = []
        self.values: dict[fx.Node, NodeValue] = {}
        self.seen: dict[str, Seen] = {}
        self.links: list[tuple[tuple[str, int], tuple[str, int]]] = []  # producer spaces scored as one group
        self._constants: dict[fx.Node, object] = {}

    # -- elements
    def space(self, tensor: torch.Tensor, dim: int, fqn: str | None = None) -> torch.Tensor:
        """The element ids of ``tensor``'s ``dim`` (one space per tensor and dim, tied names included)."""
        key = (id(tensor), dim)
        space = self._space.get(key)
        if space is None:
            name = self.fqn_of.get(id(tensor), fqn or "?")
            space = Space(name, dim, int(tensor.shape[dim]), self.count)
            self.count += space.size
            self.spaces.append(space)
            self._space[key] = space
        return torch.arange(space.base, space.base + space.size)

    def tensor_block(self, tensor: torch.Tensor, dim: int, at: int, ndim: int) -> Block | None:
        """``tensor``'s ``dim`` standing at dim ``at`` of a value of rank ``ndim`` (None when of size 1)."""
        if tensor.shape[dim] == 1:
            return None
        return Block((at,), broadcast_form(self.space(tensor, dim), at, ndim))

    def spaces_of(self, ids: torch.Tensor) -> list[tuple[str, int]]:
        """The (tensor, dim) spaces the elements ``ids`` belong to (spaces are allocated in order of base)."""
        ids = ids.reshape(-1)
        bases = torch.tensor([s.base for s in self.spaces])
        found = torch.searchsorted(bases, ids[ids > FIXED], right=True).unique() - 1
        return [(self.spaces[i].fqn, self.spaces[i].dim) for i in found.tolist()]

    def fqn(self, tensor: torch.Tensor) -> str:
        """The name of a parameter or buffer of the graph module ("" if it has none)."""
        return self.fqn_of.get(id(tensor), "")

    # -- joins
    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        self.edges.append((a.reshape(-1), b.reshape(-1)))

    def fix(self, ids: torch.Tensor, why: str) -> None:
        self.fix_edges.append((ids.reshape(-1), torch.full((ids.numel(),), FIXED, dtype=torch.long)))
        self.fixed.append((ids.reshape(-1), why))

    def refuse(self, value: object, why: str) -> None:
        for block in flat_blocks(value):
            self.refused.append((block.ids.reshape(-1), why))

    def join_along(self, block: Block, dim: int, why: str) -> None:
        """``block`` cannot shrink along ``dim``: join its elements along it (fix them if it is the only dim)."""
        if [d for d in block.dims if d != dim and block.ids.shape[d] > 1]:
            self.union(block.ids, block.ids.narrow(dim, 0, 1))
        else:
            self.fix(block.ids, why)

    def join_blocks(self, value: list[Block]) -> Value:
        """Blocks of one output that share dims are the same channels: join them, one block per dim set."""
        merged: list[Block] = []
        for block in value:
            for i, other in enumerate(merged):
                if set(other.dims) & set(block.dims):
                    a, b = torch.broadcast_tensors(other.ids, block.ids)
                    self.union(a, b)
                    merged[i] = Block(tuple(sorted(set(other.dims) | set(block.dims))), a.contiguous())
                    break
            else:
                merged.append(block)
        return blocks(merged)

    def combine(self, parts: list[tuple[tuple[int, ...], list[Block]]], why: str) -> Value:
        """The blocks of values laid over each other (``(shape, blocks)`` each, one rank), joined. Where a value
        that is not followed (an input, a constant) has entries along a block's dims, those cannot be cut: the
        block is fixed, or, when other dims of it are free (heads under a rotary table over head_dim), joined
        along them."""
        out = []
        for blk in self.join_blocks([b for _, value in parts for b in value]):
            stuck: set[int] = set()
            for shape, value in parts:
                covered = {d for b in value for d in b.dims}
                stuck |= {d for d in blk.dims if d not in covered and shape[d] > 1}
            if stuck and not [d for d in blk.dims if d not in stuck and blk.ids.shape[d] > 1]:
                self.fix(blk.ids, why)
                continue
            for d in stuck:
                self.union(blk.ids, blk.ids.narrow(d, 0, 1))
            out.append(blk)
        return tuple(out)

    def normalise(self, node: fx.Node, source: object, blk: Block, kind: str, what: str, dims: tuple[int, ...] = (),
                  keepdim: bool = False, correction: float = 1.0) -> None:
        """``node`` averages the elements of ``blk`` (its input ``source``, argument 0) together: they are
        *normalised* (``soft``), the input is a sink, and, where their group is masked, the masked graph computes
        ``node`` over the kept ones only (``NormSite``; a reduction's ``dims``, ``keepdim``, ``correction``)."""
        ids = blk.ids.reshape(-1)
        self.soft.append((ids, f"{what} normalises them together"))
        if not isinstance(source, fx.Node) or self.tensor(source) is not None:
            self.inexact.append((ids, f"{what} averages over them in a parameter, which no mask reaches"))
            return
        self.sink(node, 0, source, blk)
        self.norms.append(NormSite(node.name, kind, ids, what, dims, keepdim, correction))

    # -- masks and rewrites
    def sink(self, node: fx.Node, arg: int | str | None, source: object, blk: Block, weight: bool = False) -> None:
        """``node``'s input ``arg`` (``source``, holding ``blk``) is multiplied by the masks; a parameter only
        when ``weight`` says so (masking a contraction's weight columns instead of its input)."""
        if arg is None or not isinstance(source, fx.Node) or (self.tensor(source) is not None and not weight):
            return
        self.sinks.append(Sink(node.name, arg, source.name, blk.ids))

    def record(self, node: fx.Node, rule: NodeRule | None, kind: str, x: object, out: Value | Many) -> None:
        """What ``node`` did (``kind``, its input ``x``'s value and shape, its output value): ``rule.rewrite``
        reads it after a cut."""
        self.seen[node.name] = Seen(kind, self.value(x), out, self.shape(x) or (), node.meta.get("tensor_meta"),
                                    rule)

    # -- values
    def value(self, arg: object) -> Value:
        """The blocks a node's output holds (() for anything not followed; a parameter: each of its dims)."""
        if not isinstance(arg, fx.Node):
            return ()
        found = self.values.get(arg, ())
        if isinstance(found, torch.Tensor):  # a get_attr: a parameter's dims are followed, a buffer's not
            if not isinstance(found, nn.Parameter):
                return ()
            return tuple(b for b in (self.tensor_block(found, d, d, found.dim()) for d in range(found.dim()))
                         if b is not None)
        return found if not isinstance(found, Many) else ()

    def shape(self, node: object) -> tuple[int, ...] | None:
        """The shape ShapeProp found for a node's output (None for a non-tensor or several tensors)."""
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def tensor(self, node: object) -> torch.Tensor | None:
        """The parameter or buffer a ``get_attr`` node reads (None for anything else)."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            found = self.values.get(node)
            return found if isinstance(found, torch.Tensor) else None
        return None

    def constant(self, node: object) -> torch.Tensor | None:
        """The value of a tensor the graph computes from buffers and literals only (an index reshaped in the
        forward, ``table[self.index.view(-1)]``, which torch.export keeps as ops on the buffer; symbolic tracing
        folds it into a constant), or the buffer a ``get_attr`` reads; None for anything else."""
        found = self._constant(node, 8)
        return found if isinstance(found, torch.Tensor) else None

    def _constant(self, node: object, depth: int) -> object:
        if not isinstance(node, fx.Node):
            return node
        if node in self._constants:
            return self._constants[node]
        tensor = self.tensor(node)
        found: object = _UNKNOWN
        if tensor is not None:
            found = tensor
        elif node.op in ("call_function", "call_method") and depth > 0 and node.all_input_nodes:
            found = self._evaluate(node, depth)
        self._constants[node] = found
        return found

    def _evaluate(self, node: fx.Node, depth: int) -> object:
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
            return _UNKNOWN
        if op_name(node) == "sym_size":  # a size of a value: what ShapeProp found
            shape = self.shape(node.args[0])
            return shape[int(cast(int, node.args[1]))] if shape is not None else _UNKNOWN
        inputs = {n: self._constant(n, depth - 1) for n in node.all_input_nodes}
        if any(v is _UNKNOWN or isinstance(v, nn.Parameter) for v in inputs.values()):
            return _UNKNOWN
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: cast(fx.Node, inputs[n]))
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    result = getattr(args[0], str(target))(*args[1:], **kwargs)
                else:
                    result = cast(Any, target)(*args, **kwargs)
        except Exception:
            return _UNKNOWN
        small = not isinstance(result, torch.Tensor) or result.numel() <= 1 << 20
        return result if small and isinstance(result, (torch.Tensor, int, float, bool)) else _UNKNOWN

    def tensor_arg(self, node: fx.Node, i: int, name: str) -> torch.Tensor | None:
        """The parameter or buffer given as argument ``i`` or keyword ``name``."""
        return self.tensor(arg(node, i, name))

    def followed(self, node: fx.Node) -> bool:
        found = self.values.get(node)
        return isinstance(found, torch.Tensor) or bool(found)

    def module(self, node: fx.Node) -> nn.Module:
        """The layer a ``call_module`` node calls."""
        return self.gm.get_submodule(str(node.target))


# -- helpers the rules share


def flat_blocks(value: object) -> list[Block]:
    if isinstance(value, Block):
        return [value]
    if isinstance(value, (tuple, list)):
        return [b for v in value for b in flat_blocks(v)]
    return []


def op_name(node: fx.Node) -> str:
    """The name rules are registered under: a method's, an aten op's (without namespace and overload) or a
    function's; in-place variants (``relu_``) name their op."""
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.endswith("__") and name not in ("_",):
        name = name[:-1]  # in-place variants
    return name


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of ``node``, or its keyword ``name`` (``default`` when neither is given)."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def input_rank(t: Tracker, node: fx.Node) -> tuple[fx.Node, int] | None:
    """``node``'s tensor input (its first argument) and that input's number of dims; None when its shape is not
    known (the rule then leaves the node to the fallback)."""
    x = node.args[0]
    shape = t.shape(x) if isinstance(x, fx.Node) else None
    return None if shape is None or not isinstance(x, fx.Node) else (x, len(shape))


def dims(dim: Any, ndim: int) -> list[int]:
    """The dims a ``dim`` argument names (None or empty: all of them), non-negative and sorted."""
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted(d % ndim for d in dim) if dim else list(range(ndim))
    return [dim % ndim]


def tensor_nodes(args: fx.node.Argument) -> list[fx.Node]:
    """The nodes among (nested) arguments, in order."""
    out: list[fx.Node] = []

    def keep(node: fx.Node) -> fx.Node:
        out.append(node)
        return node

    fx.node.map_arg(args, keep)
    return out


def align_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return (1,) * (ndim - len(shape)) + tuple(shape)


def with_size(shape: tuple[int, ...], dim: int, size: int) -> tuple[int, ...]:
    out = list(shape)
    out[dim] = size
    return tuple(out)


def module_or_node(node: fx.Node, what: str) -> str:
    """The layer a node belongs to, for messages: its module (a torch.export graph records it), else the node."""
    stack = node.meta.get("nn_module_stack")
    if node.op != "call_module" and stack:
        path, cls = list(stack.values())[-1]
        name = getattr(cls, "__name__", str(cls).rpartition(".")[2].strip("'>"))
        return f"{name} '{path}'"
    return f"{what} '{node.target}'" if node.op == "call_module" else f"'{node.name}' ({what})"


def split_another_way(name: str) -> str:
    return f"grouped convolution '{name}' splits channels another way"
