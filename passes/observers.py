"""Observers in the graph: one pass puts them in, one takes them out.

An observer is a ``call_module`` of a torch.ao observer that returns its input, so an
observed module computes what it did before. Two users plan where they go:

- static quantization (:func:`observe_linears`) watches the input and the output of
  chosen linears with fresh ``activation_post_process_<n>`` observers;
- Wanda (:func:`observe_linear_inputs`) watches the input of every linear whose weight
  is one of given tensors, with one :class:`ChannelNormObserver` per tensor registered
  as ``<tensor_fqn>_input_observer`` (a tied weight's linears share it).

Before (``observe_linears(gm, ["linear"], HistogramObserver)``)::

    %linear : call_function[target=torch.nn.functional.linear](args = (%x, %mul, %fc_bias))
    %relu : call_function[target=torch.relu](args = (%linear,))
    %out : call_function[target=torch.tanh](args = (%relu,))

After::

    %activation_post_process_0 : call_module[target=activation_post_process_0](args = (%x,))
    %linear : call_function[target=torch.nn.functional.linear](args = (%activation_post_process_0, %mul, %fc_bias))
    %relu : call_function[target=torch.relu](args = (%linear,))
    %activation_post_process_1 : call_module[target=activation_post_process_1](args = (%relu,))
    %out : call_function[target=torch.tanh](args = (%activation_post_process_1,))

The output of a node is observed after the ops that keep a quantized tensor meaningful
(:func:`quant_transparent`: relu, identity dropouts) when they are its only user, as
torch.ao observes a fused Linear+ReLU after the ReLU. A value is observed once per
observer: the output observer of one linear is the input observer of the next.
:class:`RemoveObservers` gives back the graph as it was.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.quantization.observer import ObserverBase
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .attrs import fetch_attr, get_submodule, has_submodule
from .insert_masks import find_masked_uses
from .linear import is_linear, linear_args
from .manager import run_passes

__all__ = ["ChannelNormObserver", "GramObserver", "SharedProduct", "Observation", "ObservedNode", "InsertObservers",
           "RemoveObservers", "observe_linears", "observe_linear_inputs", "remove_observers", "observer_fqn_for",
           "quant_transparent", "is_relu", "OBSERVER_PREFIX"]

OBSERVER_PREFIX = "activation_post_process_"
OBSERVER_SUFFIX = "_input_observer"

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


class ChannelNormObserver(ObserverBase):
    """Accumulates ``Σ x²`` per channel of the last dim, over all other dims and all calls.

    ``sqrt`` of it is Wanda's ``‖X_j‖₂`` (Sun et al. 2023). A torch.ao observer
    (``dtype=torch.float``: it asks for no quantization), so tools that look for observers
    see it as one; it computes statistics for sparsity, not quantization parameters.

    Buffers (in the prepared module's ``state_dict``, so calibration can be saved):
    ``sum_sq`` (float64, ``num_channels``) and ``num_rows`` (how many vectors were seen).
    """

    sum_sq: torch.Tensor
    num_rows: torch.Tensor

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
            f"remove it (fx_sparsity.passes.remove_observers, or the sparsifier's squash_mask()) before quantizing")

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_rows={int(self.num_rows)}"


class SharedProduct:
    """The last ``xᵀx`` a :class:`GramObserver` computed, for observers that see the same input next.

    Linears reading one activation (q/k/v, gate/up) are observed one after another on the same
    tensor object: the first computes the product, the others add it again. Holds one product
    at most (the one for the newest input), as long as that tensor lives and is unchanged.
    """

    def __init__(self) -> None:
        self._input: weakref.ref | None = None
        self._version = -1
        self.product: torch.Tensor | None = None

    def get(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._input is not None and self._input() is x and x._version == self._version:
            return self.product
        return None

    def put(self, x: torch.Tensor, product: torch.Tensor) -> None:
        self._input, self._version, self.product = weakref.ref(x), x._version, product

    def clear(self) -> None:
        self._input, self._version, self.product = None, -1, None

    def __reduce__(self) -> tuple:
        return (SharedProduct, ())  # copies and pickles start with nothing cached (a weakref cannot be saved)


class GramObserver(ObserverBase):
    """Accumulates the Gram matrix ``Σ xᵀx`` of the inputs (last dim = channels), over all calls.

    What SparseGPT (Frantar & Alistarh 2023) needs: ``H = X Xᵀ`` of a linear layer's inputs.
    Buffers (in ``state_dict``): ``gram`` (float32, ``num_channels²``, as llm-compressor and the
    reference code keep it: SparseGPT's choices are invariant to H's scale and float32 holds the
    sums of the activations' squares with room to spare) and ``num_rows``. Observers given one
    :class:`SharedProduct` compute the product once for an input they all see.
    """

    gram: torch.Tensor
    num_rows: torch.Tensor

    def __init__(self, num_channels: int, device: torch.device | str | None = None,
                 shared: SharedProduct | None = None):
        super().__init__(dtype=torch.float)
        self.num_channels = int(num_channels)
        self.shared = shared
        self.register_buffer("gram", torch.zeros(self.num_channels, self.num_channels, dtype=torch.float32,
                                                 device=device))
        self.register_buffer("num_rows", torch.zeros((), dtype=torch.int64, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_channels:
            raise RuntimeError(f"{type(self).__name__} expects {self.num_channels} input channels, got input of "
                               f"shape {tuple(x.shape)}")
        with torch.no_grad():
            product = self.shared.get(x) if self.shared is not None else None
            if product is None:
                if self.shared is not None:
                    self.shared.clear()  # free the last product before making the next: one at a time
                flat = x.detach().reshape(-1, self.num_channels).float()
                product = flat.T @ flat
                if self.shared is not None:
                    self.shared.put(x, product)
            self.gram += product
            self.num_rows += x.numel() // self.num_channels
        return x

    def channel_norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` (the diagonal's square root), as :class:`ChannelNormObserver` gives."""
        return self.gram.diagonal().sqrt().float()

    def reset(self) -> None:
        self.gram.zero_()
        self.num_rows.zero_()

    def calculate_qparams(self, **kwargs):
        raise RuntimeError(f"{type(self).__name__} collects input statistics for sparsity, not quantization "
                           f"parameters; remove it before quantizing")

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_rows={int(self.num_rows)}"


def observer_fqn_for(tensor_fqn: str) -> str:
    """``a.b.weight`` -> ``a.b.weight_input_observer`` (a submodule of ``a.b``, next to ``weight_mask``)."""
    return tensor_fqn + OBSERVER_SUFFIX


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    if node.op == "call_module":
        return type(get_submodule(gm, node)) is nn.ReLU
    return False


def _is_identity_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (torch.ops.aten.dropout.default, F.dropout):
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        kwargs = normalized.kwargs if normalized is not None else {}
        p = kwargs.get("p", 0.5)
        training = kwargs.get("train", kwargs.get("training", True))
        return p == 0 or training is False
    if node.op == "call_module":
        module = get_submodule(gm, node)
        return (isinstance(module, nn.Dropout) and module.p == 0) or isinstance(module, nn.Identity)
    return False


def quant_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops a quantized tensor passes through with its qparams still right: relu, identity dropouts.

    A relu keeps values in ``[0, max]``, so a tensor quantized with qparams observed after
    the relu (zero point at the bottom of the range) already is the relu's output.
    """
    return is_relu(gm, node) or _is_identity_dropout(gm, node)


def output_value(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The value to observe for ``node``'s output: past single-user quantization-transparent ops."""
    while len(node.users) == 1:
        (user,) = node.users
        if not quant_transparent(gm, user) or user.args[0] is not node:
            break
        node = user
    return node


@dataclass
class Observation:
    """Watch the ``input`` (first argument) or ``output`` of node ``node``.

    ``fqn`` names the observer module (``None``: a fresh ``activation_post_process_<n>``);
    ``make(value)`` builds it when it does not exist yet. An input observer feeds only
    ``node``; an output observer feeds every user of the value.
    """

    node: str
    where: str  # "input" or "output"
    make: Callable[[fx.Node], nn.Module]
    fqn: str | None = None


class InsertObservers(PassBase):
    """Insert a ``call_module`` observer for each :class:`Observation`.

    A value gets one observer node per observer fqn (a value that already is an observer's
    output is not observed again). After the pass ``self.observed[(node, where)]`` is the
    observer fqn and ``self.value_of[(node, where)]`` the name of the node it watches.
    """

    def __init__(self, observations: Iterable[Observation]):
        super().__init__()
        self.observations = list(observations)
        self.observed: dict[tuple[str, str], str] = {}
        self.value_of: dict[tuple[str, str], str] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.observed, self.value_of = {}, {}
        nodes = {node.name: node for node in gm.graph.nodes}
        made: dict[tuple[fx.Node, str | None], fx.Node] = {}  # (value, fqn) -> observer node
        ours: set[fx.Node] = set()
        counter = 0
        for obs in self.observations:
            node = nodes.get(obs.node)
            if node is None:
                raise ValueError(f"node '{obs.node}' is not in the graph")
            if obs.where == "input":
                value = linear_args(node)[0] if is_linear(node) else (node.args[0] if node.args else None)
            else:
                value = output_value(gm, node)
            if not isinstance(value, fx.Node):
                raise ValueError(f"node '{obs.node}' has no tensor {obs.where} to observe")
            if value in ours:  # already an observer's output: that observer serves
                watched = value.args[0]
                assert isinstance(watched, fx.Node)
                self.observed[(obs.node, obs.where)] = str(value.target)
                self.value_of[(obs.node, obs.where)] = watched.name
                continue
            key = (value, obs.fqn)
            observer = made.get(key)
            if observer is None:
                fqn = obs.fqn
                if fqn is None:
                    while has_submodule(gm, f"{OBSERVER_PREFIX}{counter}"):
                        counter += 1
                    fqn = f"{OBSERVER_PREFIX}{counter}"
                if not has_submodule(gm, fqn):
                    gm.add_submodule(fqn, obs.make(value))
                place = gm.graph.inserting_before(node) if obs.where == "input" else gm.graph.inserting_after(value)
                with place:
                    observer = gm.graph.call_module(fqn, (value,))
                if "val" in value.meta:
                    observer.meta["val"] = value.meta["val"]
                made[key] = observer
                ours.add(observer)
                if obs.where == "output":
                    value.replace_all_uses_with(observer, delete_user_cb=lambda user: user not in ours)
            if obs.where == "input":
                node.replace_input_with(value, observer)
            self.observed[(obs.node, obs.where)] = str(observer.target)
            self.value_of[(obs.node, obs.where)] = value.name
        return PassResult(gm, bool(self.observed))


class RemoveObservers(PassBase):
    """Drop the observer ``call_module`` nodes and modules: those named in ``fqns``, else every
    module of ``observer_type``. ``self.removed`` lists the fqns deleted."""

    def __init__(self, observer_type: type[nn.Module] = ObserverBase, fqns: Iterable[str] | None = None):
        super().__init__()
        self.observer_type = observer_type
        self.fqns = None if fqns is None else set(fqns)
        self.removed: list[str] = []

    def _selected(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        if self.fqns is not None:
            return node.target in self.fqns
        return isinstance(get_submodule(gm, node), self.observer_type)

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.removed = []
        for node in list(gm.graph.nodes):
            if self._selected(gm, node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                if node.target not in self.removed:
                    self.removed.append(node.target)
        for target in set(self.removed) | (self.fqns or set()):
            if has_submodule(gm, target):
                gm.delete_submodule(target)
        return PassResult(gm, bool(self.removed))


def remove_observers(gm: fx.GraphModule, observer_type: type[nn.Module] = ObserverBase,
                     fqns: Iterable[str] | None = None) -> list[str]:
    """Functional form of :class:`RemoveObservers`; returns the removed observers' fqns."""
    removing = RemoveObservers(observer_type, fqns)
    run_passes(gm, removing)
    return removing.removed


@dataclass
class ObservedNode:
    """Where the input and output of one node are observed (observer fqns in the graph module)."""

    input: str
    output: str
    output_node: str  # name of the node whose value the output observer sees


def observe_linears(gm: fx.GraphModule, targets: list[str],
                    make_observer: Callable[[], nn.Module]) -> dict[str, ObservedNode]:
    """Observe the input and the output of each node named in ``targets``; in place.

    ``make_observer()`` returns a fresh torch.ao observer (e.g. ``qconfig.activation``).
    """
    plan = [Observation(name, where, lambda value: make_observer()) for name in targets
            for where in ("input", "output")]
    inserting = InsertObservers(plan)
    run_passes(gm, inserting)
    return {name: ObservedNode(inserting.observed[(name, "input")], inserting.observed[(name, "output")],
                               inserting.value_of[(name, "output")]) for name in targets}


def _weight_tensor(gm: fx.GraphModule, weight, masked: dict[fx.Node, fx.Node]) -> torch.Tensor | None:
    """The tensor a linear's weight argument reads, through a mask multiply if there is one."""
    if not isinstance(weight, fx.Node):
        return None
    weight = masked.get(weight, weight)
    if weight.op != "get_attr":
        return None
    value = fetch_attr(gm, weight.target)
    return value if isinstance(value, torch.Tensor) else None


def _channel_observer(observer: Callable[[int], nn.Module], weight: torch.Tensor, value: fx.Node) -> nn.Module:
    return observer(weight.shape[-1]).to(weight.device)


def observe_linear_inputs(gm: fx.GraphModule, tensor_fqns: Iterable[str],
                          observer: Callable[[int], nn.Module] = ChannelNormObserver) -> dict[str, str]:
    """Observe the input of every linear whose weight *is* one of ``tensor_fqns`` (directly or masked).

    One ``observer(in_features)`` per tensor, at ``observer_fqn_for(tensor_fqn)``; an embedding
    sharing a tied weight is not a linear and is not observed. Returns ``{tensor_fqn:
    observer_fqn}`` for the tensors with at least one linear use.
    """
    wanted = {id(fetch_attr(gm, fqn)): fqn for fqn in tensor_fqns}
    masked = {use.mul: use.tensor for use in find_masked_uses(gm)}
    plan, observed = [], {}
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        weight = _weight_tensor(gm, linear_args(node)[1], masked)
        if weight is None or id(weight) not in wanted:
            continue
        tensor_fqn = wanted[id(weight)]
        fqn = observer_fqn_for(tensor_fqn)
        if tensor_fqn not in observed and has_submodule(gm, fqn):
            raise RuntimeError(f"'{fqn}' already exists: the inputs of '{tensor_fqn}' are already observed")
        observed[tensor_fqn] = fqn
        plan.append(Observation(node.name, "input", functools.partial(_channel_observer, observer, weight), fqn))
    run_passes(gm, InsertObservers(plan))
    return observed
