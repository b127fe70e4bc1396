"""Units followed as one graph: the graphs of a block scope stitched where one unit's output is the next one's input.

Each unit (a block, or a layer between the blocks that holds parameters: embeddings, a final norm, a head)
is traced alone. Where a unit's input is the very value an earlier unit returned (the model's own code
passes it on: ``hidden_states = layer(hidden_states)``), the stitched graph feeds that output straight in;
any other input stays an input of the stitched graph (its channels are not followed), and a unit output
the model returns, or that no unit reads, is an output (its channels stay). Before (two units)::

    # model.layers.0                             # model.layers.1
    %x : placeholder                             %x : placeholder
    %add : add(%x, %o_proj)                      %mul : mul(%x, %rsqrt)
    return (%add,)                               ...

After (one graph, whose root holds each unit's graph module under the unit's name)::

    %x : placeholder
    %add : add(%x, %model_layers_0_o_proj)       # the tensors of model.layers.0.*
    %mul : mul(%add, %rsqrt)                     # model.layers.1 reads model.layers.0's output
    ...
    return (%logits,)

Channel groups found on it span units (a transformer's hidden width: the embeddings, every block, the
final norm and the head). :func:`unit_analysis` gives each unit the part of the analysis about its own
graph, in its own names, to mask and cut it as any other graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from ..attrs import fetch_attr
from .groups import ChannelAnalysis, GroupedConv, Sink, Space

__all__ = ["UnitGraph", "Stitched", "stitch", "unit_analysis", "output_pairs"]


@dataclass
class UnitGraph:
    """One unit: its graph, what its placeholders received (in order), and what its output nodes returned (each
    output leaf with its value; ``None`` values where the two could not be paired)."""

    fqn: str
    gm: fx.GraphModule
    inputs: list[Any]
    outputs: list[tuple[fx.Node, Any]]
    alone: bool = False  # joined to no other unit (one called more than once: each call reads other channels)


@dataclass
class Stitched:
    gm: fx.GraphModule
    inputs: list[Any]  # the stitched graph's placeholders' values
    names: dict[str, tuple[str, str]] = field(default_factory=dict)  # stitched node -> (unit, node in the unit)
    fed: dict[str, dict[str, str]] = field(default_factory=dict)  # unit -> {stitched node: placeholder it feeds}
    links: list[tuple[str, str]] = field(default_factory=list)  # (unit whose output, unit whose input) joined


def same_value(a: Any, b: Any) -> bool:
    """``a`` is ``b``, or a tensor of the same shape, dtype, device and values (a copy passed on)."""
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))


def _root(units: list[UnitGraph]) -> nn.Module:
    """A module holding each unit's graph module at the unit's fqn (empty modules on the way)."""
    root = nn.Module()
    for unit in units:
        parent = root
        *path, leaf = unit.fqn.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, unit.gm)
    return root


def stitch(units: list[UnitGraph], returned: list[Any]) -> Stitched:
    """The units (in the order the model calls them) as one graph; ``returned``: the model's output tensors."""
    graph = fx.Graph()
    out = Stitched(fx.GraphModule(nn.Module(), fx.Graph()), [])
    produced: list[tuple[Any, fx.Node, str]] = []  # (value, stitched node, unit) of each unit output so far
    lonely: list[fx.Node] = []  # outputs no unit may read
    read: set[fx.Node] = set()
    for unit in units:
        env: dict[fx.Node, fx.Node] = {}
        fed = out.fed.setdefault(unit.fqn, {})
        placeholders = [n for n in unit.gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, unit.inputs):
            source = None if unit.alone else (
                next(((n, u) for v, n, u in reversed(produced) if v is value), None)
                or next(((n, u) for v, n, u in reversed(produced) if same_value(v, value)), None))
            if source is not None:
                env[node] = source[0]
                fed[source[0].name] = node.name
                read.add(source[0])
                out.links.append((source[1], unit.fqn))
            else:
                env[node] = graph.placeholder(f"in_{unit.fqn.replace('.', '_')}_{node.name}")
                out.inputs.append(value)
                out.names[env[node].name] = (unit.fqn, node.name)
        for node in unit.gm.graph.nodes:
            if node.op in ("placeholder", "output") or (node.op == "call_module" and node.target == "_guards_fn"):
                continue  # (torch.export's check of the unit's own inputs)
            copied = graph.node_copy(node, lambda n: env[n])
            if node.op in ("get_attr", "call_module"):
                copied.target = f"{unit.fqn}.{node.target}"
            env[node] = copied
            out.names[copied.name] = (unit.fqn, node.name)
        for node, value in unit.outputs:
            if node in env and isinstance(value, torch.Tensor):
                if unit.alone:
                    lonely.append(env[node])
                else:
                    produced.append((value, env[node], unit.fqn))
        if not unit.outputs or unit.alone:  # outputs not paired with their values: each one stays
            lonely += [env[n] for n in pytree.tree_leaves(_output_node(unit.gm).args[0]) if isinstance(n, fx.Node)
                       and n in env and env[n] not in lonely]
    kept = [n for v, n, _ in produced if n not in read or any(v is r for r in returned)] + lonely
    graph.output(tuple(kept))
    out.gm = fx.GraphModule(_root(units), graph, "Stitched")
    return out


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def output_pairs(gm: fx.GraphModule, output: Any) -> list[tuple[fx.Node, Any]]:
    """Each tensor node ``gm`` returns with the value it returned in ``output`` (a run of ``gm``'s module); none
    when the two do not line up."""
    node = _output_node(gm)
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    try:
        values = list(tree_flatten_spec(output, spec)) if spec is not None else pytree.tree_leaves(output)
    except Exception:
        return []
    nodes = pytree.tree_leaves(node.args[0])
    if len(nodes) != len(values):
        return []
    return [(n, v) for n, v in zip(nodes, values) if isinstance(n, fx.Node)]


def unit_analysis(analysis: ChannelAnalysis, stitched: Stitched, unit: str, gm: fx.GraphModule) -> ChannelAnalysis:
    """The part of ``analysis`` (of the stitched graph) about unit ``unit`` (graph ``gm``), in its own names: its
    tensors' spaces (under the names the unit holds them by; tied ones too), its sinks, size records and norms.
    Groups and element ids are the stitched analysis's."""
    own = {name: node for name, (u, node) in stitched.names.items() if u == unit}
    read = {**own, **stitched.fed.get(unit, {})}  # and the outputs of earlier units it reads, as its placeholders
    local: dict[int, str] = {}
    for held, tensor in reversed([*gm.named_parameters(remove_duplicate=False),
                                  *gm.named_buffers(remove_duplicate=False)]):
        local[id(tensor)] = held
    spaces, names = [], {}
    for space in analysis.spaces:
        name = local.get(id(fetch_attr(stitched.gm, space.fqn)))
        if name is not None:
            spaces.append(Space(name, space.dim, space.size, space.base))
            names[space.fqn] = name
    sinks = [Sink(own[s.node], s.arg, read[s.source], s.ids) for s in analysis.sinks
             if s.node in own and s.source in read]
    seen = {own[name]: s for name, s in analysis.seen.items() if name in own}
    norms = [replace(site, node=own[site.node]) for site in analysis.norms if site.node in own]
    grouped = [GroupedConv(names[g.weight], g.groups, g.inputs) for g in analysis.grouped if g.weight in names]
    return ChannelAnalysis(analysis.groups, spaces, analysis.label, analysis.group_of, analysis.class_of, sinks, seen,
                           grouped, analysis.balances, norms)

