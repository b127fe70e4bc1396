"""Insert a mask-multiply node in front of every use of a sparsified tensor.

Before (``fc.weight`` configured)::

    %fc_weight : get_attr[target=fc.weight]
    %linear : call_function[target=torch.nn.functional.linear](args = (%x, %fc_weight, %fc_bias))

After::

    %fc_weight : get_attr[target=fc.weight]
    %fc_weight_mask : get_attr[target=fc.weight_mask]          # buffer on module ``fc``
    %mul : call_function[target=torch.mul](args = (%fc_weight, %fc_weight_mask))
    %linear : call_function[target=torch.nn.functional.linear](args = (%x, %mul, %fc_bias))

Uses are found by tensor identity, so a parameter tied under several names gets one
mask applied at every use.  ``call_module`` users must have been inlined first
(:class:`~fx_sparsity.passes.InlineModules`): a mask cannot be put inside a leaf module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.ao.nn.intrinsic import _FusedModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .attrs import fetch_attr
from .errors import FxSparsityError
from .manager import run_passes

__all__ = ["MaskSpec", "InsertMasks", "insert_masks", "MaskedUse", "find_masked_uses", "mask_fqn_for",
           "MaskInsertionError", "MASK_SUFFIX"]

MASK_SUFFIX = "_mask"


class MaskInsertionError(FxSparsityError, RuntimeError):
    """A mask could not be placed in front of every use of a tensor."""


def mask_fqn_for(tensor_fqn: str) -> str:
    """``a.b.weight`` -> ``a.b.weight_mask`` (the ``torch.nn.utils.prune`` convention)."""
    return tensor_fqn + MASK_SUFFIX


@dataclass
class MaskSpec:
    """One tensor to mask: its fqn in the graph module, its initial mask, node metadata.

    ``persistent=False`` keeps the buffer out of ``state_dict()``: for a second graph that
    reads a tied tensor whose mask another graph module owns and saves.
    """

    tensor_fqn: str
    mask: torch.Tensor
    meta: dict = field(default_factory=dict)
    persistent: bool = True


@dataclass
class MaskedUse:
    """One ``mul(tensor, mask)`` node of a prepared graph."""

    mul: fx.Node
    tensor: fx.Node
    mask: fx.Node

    @property
    def mask_fqn(self) -> str:
        return str(self.mask.target)

    @property
    def tensor_fqn(self) -> str:
        return self.mask_fqn[: -len(MASK_SUFFIX)]


class InsertMasks(PassBase):
    """Register ``<tensor_name>_mask`` buffers and multiply every use of each tensor by its mask."""

    def __init__(self, specs: list[MaskSpec], not_inlined: dict[str, str] | None = None):
        super().__init__()
        self.specs = specs
        self.not_inlined = {} if not_inlined is None else not_inlined  # layer fqn -> why it stayed a call

    def requires(self, gm: fx.GraphModule) -> None:
        masked: dict[int, str] = {}
        for spec in self.specs:
            tensor = fetch_attr(gm, spec.tensor_fqn)
            if spec.mask.shape != tensor.shape:
                raise MaskInsertionError(
                    f"mask for '{spec.tensor_fqn}' has shape {tuple(spec.mask.shape)}, "
                    f"the tensor has {tuple(tensor.shape)}")
            masked[id(tensor)] = spec.tensor_fqn
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            for tensor in (*module.parameters(), *module.buffers()):
                if id(tensor) in masked and isinstance(module, _FusedModule):
                    raise MaskInsertionError(
                        f"'{masked[id(tensor)]}' is used inside '{node.target}' ({type(module).__name__}), a module "
                        f"torch.ao.quantization fused (prepare_fx or fuse_modules) and quantizes whole, so no mask "
                        f"can be put in front of that use. Prepare sparsity first and quantize the prepared model "
                        f"(prepare_fx on it keeps the masks, convert_fx folds them into the quantized weights), or "
                        f"quantize after squash_mask().")
                if id(tensor) in masked:
                    why = self.not_inlined.get(str(node.target))
                    raise MaskInsertionError(
                        f"'{masked[id(tensor)]}' is used inside the leaf module '{node.target}' "
                        f"({type(module).__name__}), which fx_sparsity cannot inline{f' ({why})' if why else ''}, "
                        f"so no mask can be put "
                        f"in front of that use. Trace with tracer=\"export\" (and example_inputs=...) to "
                        f"see through it.")

    def call(self, gm: fx.GraphModule) -> PassResult:
        uses_by_tensor: dict[int, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                uses_by_tensor.setdefault(id(fetch_attr(gm, node.target)), []).append(node)

        for spec in self.specs:
            module_fqn, _, tensor_name = spec.tensor_fqn.rpartition(".")
            owner = gm.get_submodule(module_fqn)
            mask_name = tensor_name + MASK_SUFFIX
            owner.register_buffer(mask_name, spec.mask, persistent=spec.persistent)
            mask_fqn = mask_fqn_for(spec.tensor_fqn)
            meta = {"tensor_fqn": spec.tensor_fqn, "mask_fqn": mask_fqn, **spec.meta}
            for attr_node in uses_by_tensor.get(id(fetch_attr(gm, spec.tensor_fqn)), []):
                if not attr_node.users:
                    continue  # export keeps reads of tied/unused tensors: a mul there is dead work per forward
                with gm.graph.inserting_after(attr_node):
                    mask_node = gm.graph.get_attr(mask_fqn)
                with gm.graph.inserting_after(mask_node):
                    mul = gm.graph.call_function(torch.mul, (attr_node, mask_node))
                attr_node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
                mask_node.meta["sparsity_mask"] = mask_fqn
                mul.meta["sparsity"] = dict(meta)
        return PassResult(gm, bool(self.specs))


def insert_masks(gm: fx.GraphModule, specs: list[MaskSpec]) -> fx.GraphModule:
    """Functional form of :class:`InsertMasks`; modifies ``gm`` in place and returns it."""
    return run_passes(gm, InsertMasks(specs))


def find_masked_uses(gm: fx.GraphModule) -> list[MaskedUse]:
    """Every ``mul(tensor, mask)`` that :class:`InsertMasks` made.

    Recognised by shape, not only by ``node.meta`` (metadata does not survive pickling a
    GraphModule): ``mul(get_attr T, get_attr <fqn>_mask)`` where the mask is a buffer.
    """
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.mul, torch.ops.aten.mul.Tensor):
            continue
        if len(node.args) != 2 or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args):
            continue
        tensor, mask = node.args
        if not mask.target.endswith(MASK_SUFFIX):
            continue
        module_fqn, _, name = mask.target.rpartition(".")
        owner = gm.get_submodule(module_fqn)
        frozen = owner._parameters.get(name)
        if name not in owner._buffers and not (frozen is not None and not frozen.requires_grad):
            continue  # a mask is a buffer, or a frozen parameter (fx_sparsity.masks_as_parameters)
        use = MaskedUse(node, tensor, mask)
        node.meta.setdefault("sparsity", {"tensor_fqn": use.tensor_fqn, "mask_fqn": use.mask_fqn})
        mask.meta.setdefault("sparsity_mask", use.mask_fqn)
        found.append(use)
    return found
