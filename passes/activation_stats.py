"""Insert (and remove) observers on the inputs of the linears that use given weights.

Before (``fc.weight`` observed; the weight may be masked or plain)::

    %fc_weight : get_attr[target=fc.weight]
    %fc_weight_mask : get_attr[target=fc.weight_mask]
    %mul : call_function[target=torch.mul](args = (%fc_weight, %fc_weight_mask))
    %linear : call_function[target=torch._C._nn.linear](args = (%x, %mul, %fc_bias))

After ``insert_activation_observers(gm, ["fc.weight"])``::

    %fc_weight_input_observer : call_module[target=fc.weight_input_observer](args = (%x,))
    %linear : call_function[target=torch._C._nn.linear](args = (%fc_weight_input_observer, %mul, %fc_bias))

The observer returns its input unchanged and accumulates, per input channel (last
dim), the sum of squares over every other dim, so ``sqrt`` of it is the ``‖X_j‖₂`` of
Wanda (Sun et al. 2023). ``remove_activation_observers`` gives back the graph as it was.

Linears are ``F.linear`` (``torch._C._nn.linear``, what symbolic tracing and our inline
pass produce) and ``aten.linear.default`` (torch.export). Only linears whose weight
argument *is* one of the given tensors (directly or through its mask multiply) are
observed: an embedding sharing a tied weight is not.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import fx, nn
from torch.ao.quantization.observer import ObserverBase
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .insert_masks import fetch_attr, find_masked_uses
from .lower_linear import LINEAR_TARGETS

__all__ = [
    "ChannelNormObserver",
    "InsertActivationObservers",
    "RemoveActivationObservers",
    "LINEAR_TARGETS",
    "insert_activation_observers",
    "remove_activation_observers",
    "observer_fqn_for",
]

OBSERVER_SUFFIX = "_input_observer"

def observer_fqn_for(tensor_fqn: str) -> str:
    """``a.b.weight`` -> ``a.b.weight_input_observer`` (a submodule of ``a.b``, next to ``weight_mask``)."""
    return tensor_fqn + OBSERVER_SUFFIX


class ChannelNormObserver(ObserverBase):
    """Accumulates ``Σ x²`` per channel of the last dim, over all other dims and all calls.

    A torch.ao observer (``dtype=torch.float``: it asks for no quantization), so tools that
    look for observers (``torch.ao.quantization``'s ``_is_activation_post_process``) see it
    as one; it computes statistics for sparsity, not quantization parameters.

    Buffers (in the prepared module's ``state_dict``, so calibration can be saved):
    ``sum_sq`` (float64, ``num_channels``) and ``num_rows`` (how many vectors were seen).
    """

    def __init__(self, num_channels: int, device: torch.device | str | None = None):
        super().__init__(dtype=torch.float)
        self.num_channels = int(num_channels)
        self.register_buffer("sum_sq", torch.zeros(self.num_channels, dtype=torch.float64, device=device))
        self.register_buffer("num_rows", torch.zeros((), dtype=torch.int64, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_channels:
            raise RuntimeError(
                f"{type(self).__name__} expects {self.num_channels} input channels (the weight's in_features), "
                f"got input of shape {tuple(x.shape)}")
        with torch.no_grad():
            flat = x.detach().reshape(-1, self.num_channels)
            # vector_norm avoids materialising x*x; squared back to add across batches.
            self.sum_sq += torch.linalg.vector_norm(flat, ord=2, dim=0, dtype=torch.float32).double().square()
            self.num_rows += flat.shape[0]
        return x

    def channel_norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` over every row seen so far (float32)."""
        return self.sum_sq.sqrt().float()

    def reset(self) -> None:
        self.sum_sq.zero_()
        self.num_rows.zero_()

    def calculate_qparams(self, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__} collects activation norms for sparsity, not quantization parameters; "
            f"remove it (fx_sparsity.passes.remove_activation_observers, or the sparsifier's squash_mask()) "
            f"before quantizing")

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_rows={int(self.num_rows)}"


def _arg(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _has_submodule(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return False
    return True


def _weight_tensor(gm: fx.GraphModule, node, masked: dict) -> torch.Tensor | None:
    """The tensor a linear's weight argument reads, through a mask multiply if there is one."""
    if not isinstance(node, fx.Node):
        return None
    if node in masked:
        node = masked[node]
    if node.op != "get_attr":
        return None
    value = fetch_attr(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


class InsertActivationObservers(PassBase):
    """Put an observer in front of the input of every linear whose weight is one of ``tensor_fqns``.

    One observer per tensor (a tensor used by several linears, e.g. tied, gets one observer
    called at each use, so it accumulates all of them), registered as
    ``observer_fqn_for(tensor_fqn)``. ``self.observed`` maps each tensor fqn that has at
    least one linear use to its observer's fqn; tensors without one are left out.
    """

    def __init__(self, tensor_fqns: Iterable[str],
                 observer: Callable[[int], nn.Module] = ChannelNormObserver):
        super().__init__()
        self.tensor_fqns = list(tensor_fqns)
        self.observer = observer
        self.observed: dict[str, str] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.observed = {}
        wanted = {id(fetch_attr(gm, fqn)): fqn for fqn in self.tensor_fqns}
        masked = {use.mul: use.tensor for use in find_masked_uses(gm)}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            weight = _weight_tensor(gm, _arg(node, 1, "weight"), masked)
            if weight is None or id(weight) not in wanted:
                continue
            tensor_fqn = wanted[id(weight)]
            target = observer_fqn_for(tensor_fqn)
            if tensor_fqn not in self.observed:
                if _has_submodule(gm, target):
                    raise RuntimeError(f"'{target}' already exists: the inputs of '{tensor_fqn}' are already observed")
                module = self.observer(weight.shape[-1]).to(weight.device)
                gm.add_submodule(target, module)
                self.observed[tensor_fqn] = target
            x = _arg(node, 0, "input")
            with gm.graph.inserting_before(node):
                obs = gm.graph.call_module(target, (x,))
            obs.meta["activation_observer"] = tensor_fqn
            if "val" in getattr(x, "meta", {}):
                obs.meta["val"] = x.meta["val"]
            _set_arg(node, 0, "input", obs)
        gm.recompile()
        return PassResult(gm, bool(self.observed))


class RemoveActivationObservers(PassBase):
    """Drop every ``call_module`` of an ``observer_type`` module and the modules themselves.

    ``self.removed`` lists the fqns of the observer modules deleted.
    """

    def __init__(self, observer_type: type[nn.Module] = ChannelNormObserver):
        super().__init__()
        self.observer_type = observer_type
        self.removed: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.removed = []
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), self.observer_type):
                continue
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            if node.target not in self.removed:
                self.removed.append(node.target)
        for target in self.removed:
            gm.delete_submodule(target)
        if self.removed:
            gm.recompile()
        return PassResult(gm, bool(self.removed))


def insert_activation_observers(gm: fx.GraphModule, tensor_fqns: Iterable[str],
                                observer: Callable[[int], nn.Module] = ChannelNormObserver) -> dict[str, str]:
    """Functional form of :class:`InsertActivationObservers`; returns ``{tensor_fqn: observer_fqn}``."""
    inserting = InsertActivationObservers(tensor_fqns, observer)
    inserting(gm)
    return inserting.observed


def remove_activation_observers(gm: fx.GraphModule,
                                observer_type: type[nn.Module] = ChannelNormObserver) -> list[str]:
    """Functional form of :class:`RemoveActivationObservers`; returns the removed observers' fqns."""
    removing = RemoveActivationObservers(observer_type)
    removing(gm)
    return removing.removed
