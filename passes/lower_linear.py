"""Lower each linear over a sparse weight into a ``call_module`` of a sparse module.

Before (a prepared graph; ``torch.ops.aten.linear.default`` from export looks the same)::

    %fc_weight : get_attr[target=fc.weight]
    %fc_weight_mask : get_attr[target=fc.weight_mask]
    %mul : call_function[target=torch.mul](args = (%fc_weight, %fc_weight_mask))
    %fc_bias : get_attr[target=fc.bias]
    %linear : call_function[target=torch.nn.functional.linear](args = (%x, %mul, %fc_bias))

After (``fc`` is the module ``build`` returned; ``fc.weight``, ``fc.weight_mask`` and
``fc.bias`` are gone from the graph module)::

    %fc : call_module[target=fc](args = (%x,))

A linear counts as sparse when its weight is a mask multiply (:func:`find_masked_uses`)
or a ``get_attr`` of a tensor named in ``sparse_tensors`` (a squashed model). The dense
weight, its mask and the bias leave the module unless something else still reads them
(a tied weight); their owner module is replaced by the lowered one when nothing is left
in it, else the lowered module is added next to them as ``<tensor_name>_lowered``.

The static (quantized-activation) form adds two passes: :class:`QuantizeBoundaries`
puts ``Quantize``/``DeQuantize`` modules around each lowered node, and
:class:`FoldRequantize` drops ``DeQuantize -> [relu] -> Quantize`` between two lowered
linears when the qparams agree::

    %fc1 : call_module[target=fc1](args = (%fc1_quantize,))
    %fc1_dequantize : call_module[target=fc1_dequantize](args = (%fc1,))
    %relu : call_function[target=torch.relu](args = (%fc1_dequantize,))
    %fc2_quantize : call_module[target=fc2_quantize](args = (%relu,))
    %fc2 : call_module[target=fc2](args = (%fc2_quantize,))

becomes::

    %fc1 : call_module[target=fc1](args = (%fc1_quantize,))
    %relu_1 : call_function[target=torch.relu](args = (%fc1,))
    %fc2 : call_module[target=fc2](args = (%relu_1,))
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import SupportsFloat, SupportsInt, TypeVar, cast

import torch
from torch import fx, nn
from torch.ao.nn.quantized import DeQuantize, Quantize
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .attrs import fetch_attr, fetch_attr_or_none, get_submodule, unique_attr_name
from .insert_masks import find_masked_uses
from .linear import is_linear, linear_args
from .observers import is_relu, quant_transparent

__all__ = ["INFO_ATTR", "tensor_readers", "SparseLinear", "LoweredLinear", "find_sparse_linears", "LowerSparseLinears",
           "QuantizeBoundaries", "FoldRequantize", "DEFAULT_BLOCK_SHAPE"]

DEFAULT_BLOCK_SHAPE = (1, 4)
LOWERED_SUFFIX = "_lowered"
_M = TypeVar("_M", bound=nn.Module)
#: The attribute of a lowered module that records what it was lowered from and to.
INFO_ATTR = "fx_sparsity_info"


@dataclass
class SparseLinear:
    """One linear op whose weight is sparse, and the nodes that feed it."""

    node: fx.Node
    tensor_fqn: str
    weight: fx.Node  # get_attr of the dense weight
    mask: fx.Node | None  # get_attr of the mask; None for a squashed weight
    bias: fx.Node | None  # get_attr of the bias, or None
    block_shape: tuple[int, int]
    mul: fx.Node | None  # the mask multiply feeding the linear; None for a squashed weight
    problem: str | None = None  # why it cannot be lowered, if it cannot

    @property
    def input(self) -> fx.Node:
        """The linear's input as the graph is now (an earlier rewrite may have replaced it)."""
        return linear_args(self.node)[0]


@dataclass
class LoweredLinear:
    """What :class:`LowerSparseLinears` made of one :class:`SparseLinear`."""

    node: fx.Node  # the new call_module node
    linear_name: str  # name of the linear node it replaced
    module_fqn: str
    info: dict = field(default_factory=dict)


def find_sparse_linears(gm: fx.GraphModule, sparse_tensors: Mapping[str, tuple[int, int] | None] | None = None,
                        default_block_shape: tuple[int, int] = DEFAULT_BLOCK_SHAPE) -> list[SparseLinear]:
    """The linears of ``gm`` over a masked weight, or over a weight named in ``sparse_tensors``.

    ``sparse_tensors`` maps tensor fqns to their block shape (``None``: the default); a
    tensor is matched by identity, so a tied alias counts. Reads the graph, changes nothing.
    """
    sparse_tensors = dict(sparse_tensors or {})
    by_identity: dict[int, str] = {}
    for fqn in sparse_tensors:
        try:
            by_identity.setdefault(id(fetch_attr(gm, fqn)), fqn)
        except AttributeError:
            continue
    masked = {use.mul: use for use in find_masked_uses(gm)}
    sites = []
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        _, weight, bias = linear_args(node)
        if weight in masked:
            use = masked[weight]
            tensor_fqn, weight_node, mask_node = use.tensor_fqn, use.tensor, use.mask
        elif (isinstance(weight, fx.Node) and weight.op == "get_attr"
              and id(fetch_attr(gm, str(weight.target))) in by_identity):
            tensor_fqn, weight_node, mask_node = by_identity[id(fetch_attr(gm, str(weight.target)))], weight, None
        else:
            continue
        block_shape = cast("tuple[int, int]", tuple(sparse_tensors.get(tensor_fqn) or default_block_shape))
        problem = None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            problem = f"its bias is computed in the graph ({bias}), not a module attribute"
        elif fetch_attr(gm, str(weight_node.target)).dim() != 2:
            problem = f"its weight has {fetch_attr(gm, str(weight_node.target)).dim()} dims, not 2"
        sites.append(SparseLinear(node, tensor_fqn, weight_node, mask_node, bias, block_shape,
                                  weight if mask_node is not None else None, problem))
    return sites


def tensor_readers(gm: fx.GraphModule, tensor: torch.Tensor | None) -> list[fx.Node]:
    """The nodes that read ``tensor`` (through its mask multiply, if any), in graph order."""
    if tensor is None:
        return []
    readers: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and fetch_attr_or_none(gm, node.target) is tensor:
            for user in node.users:
                is_mask_mul = user.op == "call_function" and user.target in (torch.mul, torch.ops.aten.mul.Tensor)
                readers += list(user.users) if is_mask_mul else [user]
    return list(dict.fromkeys(readers))


def _stored_weight_sparsity(module: nn.Module, fallback: torch.Tensor) -> float:
    """Fraction of zeros in the weight as the lowered module stores it."""
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        weight = weight()
    if isinstance(weight, torch.Tensor):
        if weight.is_quantized:
            weight = weight.int_repr()
        if weight.layout != torch.strided:
            weight = weight.to_dense()
        return (weight == 0).float().mean().item()
    return (fallback == 0).float().mean().item()


def _tensor_names(gm: fx.GraphModule) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for fqn, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(fqn)
    return names


class LowerSparseLinears(PassBase):
    """Replace each sparse linear of ``sites`` (from :func:`find_sparse_linears` on the same graph)
    by ``call_module`` of ``build(site, weight, mask, bias)``.

    ``build`` gets the dense weight, the mask (for a squashed weight: ``weight != 0``) and
    the bias, and returns the module; returning the same module for two sites (one weight
    used twice) makes both call it. Each new node gets ``node.meta["sparsity"]`` =
    ``{"tensor_fqn", "lowered_to", "weight_sparsity", "sparse_block_shape", "dense_weight_kept"}``,
    also stored as ``fx_sparsity_info`` on the module. After the pass ``self.lowered``
    lists what was made and ``self.kept_dense`` the tensors that stayed because other
    nodes still read them (``{tensor_fqn: [node names]}``).
    """

    def __init__(self, build: Callable[[SparseLinear, torch.Tensor, torch.Tensor, torch.Tensor | None], nn.Module],
                 sites: list[SparseLinear]):
        super().__init__()
        self.build = build
        self.sites = sites
        self.lowered: list[LoweredLinear] = []
        self.kept_dense: dict[str, list[str]] = {}

    def requires(self, gm: fx.GraphModule) -> None:
        bad = [s for s in self.sites if s.problem]
        if bad:
            raise ValueError("cannot lower: " + "; ".join(f"'{s.tensor_fqn}' (node {s.node.name}): {s.problem}"
                                                          for s in bad))
        if any(s.node.graph is not gm.graph for s in self.sites):
            raise ValueError("LowerSparseLinears: the sites were found in another graph (find_sparse_linears(gm))")

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = self.sites
        self.lowered, self.kept_dense = [], {}
        graph = gm.graph
        # id(module) -> (module, temporary fqn, first site, records)
        built: dict[int, tuple[nn.Module, str, SparseLinear, list]] = {}
        maybe_dead: list[fx.Node] = []
        for site in sites:
            weight = fetch_attr(gm, str(site.weight.target)).detach()
            mask = (fetch_attr(gm, str(site.mask.target)).detach() if site.mask is not None
                    else (weight != 0).to(weight.dtype))
            bias = None if site.bias is None else fetch_attr(gm, str(site.bias.target)).detach()
            with torch.no_grad():
                module = self.build(site, weight, mask, bias)
            if id(module) not in built:
                tmp = unique_attr_name(gm, f"_fx_sparsity_lowering_{len(built)}")
                gm.add_submodule(tmp, module)
                built[id(module)] = (module, tmp, site, [])
                info = {"tensor_fqn": site.tensor_fqn,
                        "lowered_to": module._get_name() if hasattr(module, "_get_name") else type(module).__name__,
                        "weight_sparsity": _stored_weight_sparsity(module, weight * mask),
                        "sparse_block_shape": tuple(site.block_shape),
                        "dense_weight_kept": False}
                setattr(module, INFO_ATTR, {**getattr(module, INFO_ATTR, {}), **info})  # keep the target's own record
            module, tmp, _, records = built[id(module)]
            with graph.inserting_before(site.node):
                # The input as it is now: an earlier site may have replaced the node it was (linear -> linear).
                new = graph.call_module(tmp, (site.input,))
            new.meta.update({k: v for k, v in site.node.meta.items() if k != "sparsity"})
            site.node.replace_all_uses_with(new)
            records.append(LoweredLinear(new, site.node.name, tmp))
            graph.erase_node(site.node)
            maybe_dead += [n for n in (site.mul, site.weight, site.mask, site.bias) if n is not None]

        targets = [str(n.target) for n in dict.fromkeys(maybe_dead) if n.op == "get_attr"]
        # Only what the lowered linears read may go: other dead nodes (export's guards) are the user's.
        candidates = set(maybe_dead)
        graph.eliminate_dead_code(is_impure_node=lambda node: node not in candidates)
        self._delete_dead_tensors(gm, targets)

        for module, tmp, site, records in built.values():
            still_read = sorted({n.name for n in tensor_readers(gm, fetch_attr_or_none(gm, str(site.weight.target)))})
            if still_read:
                getattr(module, INFO_ATTR)["dense_weight_kept"] = True
                self.kept_dense[site.tensor_fqn] = still_read
            fqn = self._place(gm, module, tmp, site)
            for record in records:
                # A node made now is named after its final target (``fc1``, or ``fc1_1`` where torch.fx has used
                # that name before), not after the temporary one.
                with graph.inserting_before(record.node):
                    node = graph.call_module(fqn, record.node.args, record.node.kwargs)
                node.meta.update(record.node.meta)
                node.meta["sparsity"] = dict(getattr(module, INFO_ATTR))
                record.node.replace_all_uses_with(node)
                graph.erase_node(record.node)
                record.node, record.module_fqn, record.info = node, fqn, getattr(module, INFO_ATTR)
                self.lowered.append(record)
        return PassResult(gm, bool(sites))

    @staticmethod
    def _delete_dead_tensors(gm: fx.GraphModule, targets: list[str]) -> None:
        alive = {id(fetch_attr_or_none(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
        names = _tensor_names(gm)
        for target in targets:
            tensor = fetch_attr_or_none(gm, target)
            if tensor is None or id(tensor) in alive:
                continue
            for fqn in names.get(id(tensor), [target]):  # every alias: memory drops only when all go
                module_fqn, _, name = fqn.rpartition(".")
                owner = gm.get_submodule(module_fqn)
                if name in owner._parameters:
                    owner.register_parameter(name, None)  # an owner that stays (tied weight) keeps a valid layout
                elif hasattr(owner, name):
                    delattr(owner, name)

    @staticmethod
    def _place(gm: fx.GraphModule, module: nn.Module, tmp: str, site: SparseLinear) -> str:
        """Move the module from its temporary name to its owner's place, or next to the weight."""
        gm.delete_submodule(tmp)
        module_fqn, _, tensor_name = site.tensor_fqn.rpartition(".")
        owner = gm.get_submodule(module_fqn) if module_fqn else gm
        still_used = any(n.op in ("call_module", "get_attr") and (n.target == module_fqn or
                                                                  n.target.startswith(module_fqn + "."))
                         for n in gm.graph.nodes if n.op in ("call_module", "get_attr"))
        empty = (not list(owner.parameters(recurse=False)) and not list(owner.buffers(recurse=False))
                 and not list(owner.children()))
        if module_fqn and empty and not still_used:
            gm.add_submodule(module_fqn, module)  # replaces the emptied owner, as torch.ao's convert swaps modules
            return module_fqn
        name = unique_attr_name(owner, tensor_name + LOWERED_SUFFIX)
        owner.add_module(name, module)
        return f"{module_fqn}.{name}" if module_fqn else name


def _flat(fqn: str) -> str:
    return fqn.replace(".", "_")


class QuantizeBoundaries(PassBase):
    """Put ``Quantize`` before and ``DeQuantize`` after each named quantized-in/out node.

    ``qparams`` maps a ``call_module`` node name to ``(scale, zero_point, dtype)`` of its input.
    The modules are torch.ao's ``Quantize``/``DeQuantize`` (qparams are buffers, so they are in
    ``state_dict()``), registered at the root as ``<module>_quantize``/``<module>_dequantize``.
    """

    def __init__(self, qparams: Mapping[str, tuple[float, int, torch.dtype]]):
        super().__init__()
        self.qparams = dict(qparams)

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        done = 0
        for node in list(graph.nodes):
            if node.op != "call_module" or node.name not in self.qparams:
                continue
            scale, zero_point, dtype = self.qparams[node.name]
            quant = unique_attr_name(gm, _flat(node.target) + "_quantize")
            gm.add_submodule(quant, Quantize(float(scale), int(zero_point), dtype))
            dequant = unique_attr_name(gm, _flat(node.target) + "_dequantize")
            gm.add_submodule(dequant, DeQuantize())
            with graph.inserting_before(node):
                q = graph.call_module(quant, (node.args[0],))
            node.args = (q,) + tuple(node.args[1:])
            with graph.inserting_after(node):
                dq = graph.call_module(dequant, (node,))
            node.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not dq)
            done += 1
        if done != len(self.qparams):
            raise ValueError(
                f"{len(self.qparams) - done} of the nodes {sorted(self.qparams)} are not call_module nodes")
        return PassResult(gm, bool(done))


def _module(gm: fx.GraphModule, node: object, cls: type[_M]) -> _M | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = get_submodule(gm, node)
        if isinstance(module, cls):
            return module
    return None


class FoldRequantize(PassBase):
    """Drop ``DeQuantize -> [relu / identity dropout]* -> Quantize`` where the qparams agree.

    The upstream quantized module's output (its ``scale``/``zero_point``) feeds the ops on
    the quantized tensor directly: relus are replayed as ``torch.relu`` on it, identity
    dropouts vanish. ``self.folded`` counts the pairs removed.
    """

    def __init__(self):
        super().__init__()
        self.folded = 0

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        self.folded = 0
        for q in list(graph.nodes):
            quantize = _module(gm, q, Quantize)
            if quantize is None:
                continue
            chain, src = [], q.args[0]
            while isinstance(src, fx.Node) and _module(gm, src, DeQuantize) is None and quant_transparent(gm, src):
                chain.append(src)
                src = src.args[0]
            if _module(gm, src, DeQuantize) is None:
                continue
            producer = src.args[0]
            upstream = _module(gm, producer, nn.Module)
            if not (upstream is not None and hasattr(upstream, "scale") and hasattr(upstream, "zero_point")
                    # a quantized module's qparams: floats and ints, or tensors of one value
                    and float(cast(SupportsFloat, upstream.scale)) == float(quantize.scale)
                    and int(cast(SupportsInt, upstream.zero_point)) == int(quantize.zero_point)
                    and quantize.dtype == torch.quint8):
                continue
            value = producer
            with graph.inserting_before(q):
                for op in reversed(chain):
                    if is_relu(gm, op):
                        value = graph.call_function(torch.relu, (value,))
            q.replace_all_uses_with(value)
            graph.erase_node(q)
            gm.delete_submodule(q.target)
            for node in chain + [src]:
                if not node.users:
                    graph.erase_node(node)
                    if node.op == "call_module" and not any(n.op == "call_module" and n.target == node.target
                                                            for n in graph.nodes):
                        gm.delete_submodule(node.target)
            self.folded += 1
        return PassResult(gm, bool(self.folded))
